"""The registry entry for Switch Transformers stores: encoder-decoder variants of one base that share a bank of
top-1 experts. Each prompt is encoded once (its cross-attention K/V kept in blocks of its own), then the decoder
generates as a decoder-only model does (engine/runner.py, `_launch_encoder_decoder`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moeshare.engine.api import VARIANT
from moeshare.engine.config import EngineConfig
from moeshare.engine.models import Footprint, Layout
from moeshare.engine.models.switch import MultiVariantSwitch, SwitchDims, tensor_names
from moeshare.engine.residency import LazyTensor, Residency
from moeshare.errors import MoeshareError

CONTEXT = 512  # what T5-family configs that do not say (n_positions) were trained on


@dataclass(frozen=True)
class SwitchVariants:
    name: str = "switch"
    kind: str = VARIANT

    def footprint(self, config: dict) -> Footprint:
        d = SwitchDims.from_config(config)  # an unsupported feature is one line here, before anything loads
        return Footprint(
            layers=d.decoder_layers,  # KV blocks hold each decoder block's self (or cross) K/V
            kv_heads=d.heads,
            heads=d.heads,
            head_dim=d.d_kv,
            context=int(config.get("n_positions") or CONTEXT),
            vocab=d.vocab,
            work_per_token=d.d_ff + 8 * d.d_model + d.vocab,
            largest_load=max(2 * d.d_ff * d.d_model, d.vocab * d.d_model),
            lookup=0 if d.tied else d.vocab * d.d_model,
            experts=d.experts,
            experts_per_token=1,
        )

    def layout(self, source: Any, config: EngineConfig, dtype: torch.dtype) -> Layout:
        """Rows: every variant unless a limit says fewer; the bank as the store holds it."""
        c, dims, variants = config, SwitchDims.from_config(source.config), source.variants
        if c.swap_whole_variants:
            raise MoeshareError("switch: whole-variant swaps are not supported (the bank is shared)")
        probe = MultiVariantSwitch(dims, 1, {}, dtype, torch.device("meta"))
        rows = min(c.max_resident_variants or len(variants), len(variants))
        if c.max_resident_bytes is not None:
            rows = max(1, min(rows, c.max_resident_bytes // probe.row_bytes()))
        slots = tuple(source.bank_slots(x) for x in source.adapter.moe_layers)
        return Layout(rows, slots, probe.row_bytes(), probe.expert_bytes())

    def build(
        self,
        source: Any,
        names: dict[str, str],
        layout: Layout,
        offload: frozenset[int],
        config: EngineConfig,
        dtype: torch.dtype,
        device: torch.device,
    ) -> tuple[MultiVariantSwitch, Residency]:
        """The model, its bank read in one slot at a time, and a residency that reads each variant's weights
        when its row is filled."""
        if offload:
            raise MoeshareError(
                "switch: MoE layers waiting in host memory are not supported yet: raise --memory-limit"
            )
        layers, dims = list(source.adapter.moe_layers), SwitchDims.from_config(source.config)
        model = MultiVariantSwitch(
            dims, layout.rows, dict(zip(layers, layout.slots, strict=True)), dtype, device
        )
        for layer in layers:
            for slot in range(source.bank_slots(layer)):
                model.load_slot(layer, slot, source.bank_slot(layer, slot))
        keys = tensor_names(dims)

        def fetch(name: str) -> tuple[dict, torch.Tensor]:
            v = names[name]
            tensors = {k: LazyTensor(source, v, n) for k, n in keys.items()}
            return tensors, torch.tensor([source.table(v, x) for x in layers])

        return model, Residency(layout.rows, list(names), fetch, model.load, device)


SWITCH = SwitchVariants()
