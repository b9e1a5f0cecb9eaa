"""The registry entry for MoE stores: variants of one base that share a bank of experts (Mixtral)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moeshare.engine.api import VARIANT
from moeshare.engine.config import EngineConfig
from moeshare.engine.models import Footprint, Layout
from moeshare.engine.models.mixtral import MixtralDims, MultiVariantMixtral, variant_tensor_names
from moeshare.engine.residency import LazyTensor, Residency


@dataclass(frozen=True)
class MoeVariants:
    name: str = "mixtral"
    kind: str = VARIANT

    def footprint(self, config: dict) -> Footprint:
        d = MixtralDims.from_config(config)
        return Footprint(
            layers=d.layers,
            kv_heads=d.kv_heads,
            heads=d.heads,
            lookup=d.vocab * d.hidden,
            head_dim=d.head_dim,
            context=d.max_positions,
            vocab=d.vocab,
            work_per_token=d.top_k * 3 * d.intermediate + 8 * d.hidden + d.vocab,
            largest_load=max(3 * d.intermediate * d.hidden, d.vocab * d.hidden),
            experts=d.experts,
            experts_per_token=d.top_k,
        )

    def layout(self, source: Any, config: EngineConfig, dtype: torch.dtype) -> Layout:
        """Rows: every variant unless a limit says fewer. With whole-variant swaps each row owns its
        experts, so a row is the whole variant and the bank is R * E slots per layer."""
        c, dims, variants = config, MixtralDims.from_config(source.config), source.variants
        probe = MultiVariantMixtral(dims, 1, [], dtype, torch.device("meta"))
        private = dims.layers * dims.experts * probe.expert_bytes() if c.swap_whole_variants else 0
        rows = min(c.max_resident_variants or len(variants), len(variants))
        if c.max_resident_bytes is not None:
            rows = max(1, min(rows, c.max_resident_bytes // (probe.row_bytes() + private)))
        layers = source.adapter.moe_layers
        if c.swap_whole_variants:
            slots = [rows * dims.experts] * len(layers)
        else:
            slots = [source.bank_slots(x) for x in layers]
        return Layout(rows, tuple(slots), probe.row_bytes(), probe.expert_bytes())

    def build(
        self,
        source: Any,
        names: dict[str, str],
        layout: Layout,
        offload: frozenset[int],
        config: EngineConfig,
        dtype: torch.dtype,
        device: torch.device,
    ) -> tuple[MultiVariantMixtral, Residency]:
        """The model, its bank read in one slot at a time (host memory holds one expert, not the bank), and
        a residency that reads each variant's weights when its row is filled."""
        layers, dims = source.adapter.moe_layers, MixtralDims.from_config(source.config)
        private = config.swap_whole_variants
        model = MultiVariantMixtral(dims, layout.rows, list(layout.slots), dtype, device, offload, private)
        # with whole-variant swaps the bank waits in host memory, a variant's experts moving in with the
        # rest of its weights
        host = [model.empty_bank(source.bank_slots(x), host=True) for x in layers] if private else []
        for i, layer in enumerate(layers):
            for slot in range(source.bank_slots(layer)):
                weights = source.bank_slot(layer, slot)
                if private:
                    for role, t in weights.items():
                        host[i][role][slot].copy_(t)
                else:
                    model.load_slot(i, slot, weights)
        keys = variant_tensor_names(dims)

        def fetch(name: str) -> tuple[dict, torch.Tensor]:
            v = names[name]
            tensors: dict = {k: LazyTensor(source, v, n) for k, n in keys.items()}
            table = torch.tensor([source.table(v, layer) for layer in layers])
            if not private:
                return tensors, table
            for i in range(len(layers)):
                for e, slot in enumerate(table[i].tolist()):
                    tensors |= {f"bank.{i}.{e}.{r}": t[slot] for r, t in host[i].items()}
            return tensors, torch.arange(dims.experts).expand(len(layers), -1).clone()

        return model, Residency(layout.rows, list(names), fetch, model.load, device)


MIXTRAL = MoeVariants()
