"""What the engine serves: a store, or a plain HF checkpoint treated as a store of one variant."""

from __future__ import annotations

from pathlib import Path

import torch

from moeshare.checkpoint import Adapter, open_checkpoint
from moeshare.store import Store, is_store, to_bank


class Source:
    """Tensors by variant and name, the bank per MoE layer, and each variant's expert -> slot table."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if is_store(self.path):
            self._store: Store | None = Store(self.path)
            self.config = self._store.config
            self.adapter: Adapter = self._store.adapter
            self.variants = list(self._store.variants)
        else:
            self._store = None
            self._ckpt = open_checkpoint(self.path)
            self.config = self._ckpt.config
            self.adapter = self._ckpt.adapter
            self.variants = [self.path.name]

    @property
    def architecture(self) -> str:
        return self.adapter.name

    def tensor(self, variant: str, name: str) -> torch.Tensor:
        if self._store:
            return self._store.tensor(variant, name)
        return self._ckpt.tensor(name)

    def bank_slots(self, layer: str) -> int:
        if self._store:
            return self._store.slots(layer)
        return self.adapter.num_experts

    def bank_slot(self, layer: str, slot: int) -> dict[str, torch.Tensor]:
        """One slot of one MoE layer in the fused layout, read on its own. {role: [...]}"""
        if self._store:
            return self._store.bank_slot(layer, slot)
        return to_bank(self.architecture, self._ckpt.read_expert(layer, slot))

    def table(self, variant: str, layer: str) -> list[int]:
        if self._store:
            return self._store.variant(variant).tables[layer]
        return list(range(self.adapter.num_experts))

    def tokenizer_dir(self, variant: str) -> Path:
        return self._store.tokenizer_dir(variant) if self._store else self.path
