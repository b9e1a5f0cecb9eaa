"""The registry entry for dense checkpoints (Llama, Mistral, Qwen2): one model in one row, no bank."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moeshare.engine.api import DENSE as DENSE_KIND
from moeshare.engine.config import EngineConfig
from moeshare.engine.models import Footprint, Layout
from moeshare.engine.models.llama import DenseLlama, LlamaDims, tensor_names
from moeshare.engine.residency import LazyTensor, Residency


@dataclass(frozen=True)
class Dense:
    name: str = "llama"  # the checkpoint adapter's name: llama, mistral and qwen2 configs
    kind: str = DENSE_KIND

    def footprint(self, config: dict) -> Footprint:
        d = LlamaDims.from_config(config)  # an unsupported feature is one line here, before anything loads
        return Footprint(
            layers=d.layers,
            kv_heads=d.kv_heads,
            heads=d.heads,
            lookup=0 if d.tied else d.vocab * d.hidden,
            head_dim=d.head_dim,
            context=d.max_positions,
            vocab=d.vocab,
            work_per_token=3 * d.intermediate + 8 * d.hidden + d.vocab,
            largest_load=max(2 * d.intermediate * d.hidden, d.vocab * d.hidden),
        )

    def layout(self, source: Any, config: EngineConfig, dtype: torch.dtype) -> Layout:
        probe = DenseLlama(LlamaDims.from_config(source.config), 1, dtype, torch.device("meta"))
        return Layout(rows=1, slots=(), row_bytes=probe.row_bytes(), slot_bytes=0)

    def build(
        self,
        source: Any,
        names: dict[str, str],
        layout: Layout,
        offload: frozenset[int],
        config: EngineConfig,
        dtype: torch.dtype,
        device: torch.device,
    ) -> tuple[DenseLlama, Residency]:
        """The model, its weights read from the checkpoint one tensor at a time straight into the row."""
        dims = LlamaDims.from_config(source.config)
        model = DenseLlama(dims, layout.rows, dtype, device)
        keys = tensor_names(dims)
        no_table = torch.zeros(0, dtype=torch.int64)

        def fetch(name: str) -> tuple[dict, torch.Tensor]:
            return {k: LazyTensor(source, names[name], n) for k, n in keys.items()}, no_table

        return model, Residency(layout.rows, list(names), fetch, model.load, device)


DENSE = Dense()
