"""The model registry: one entry per architecture, keyed by the checkpoint adapter's name.

An entry tells the planner what a model needs (its footprint and layout) and builds its weights (the model
and its residency) into memory the planner has placed. `kind` says how names map to rows: VARIANT, the
variants of a store share a bank and take turns in R rows; DENSE, one model in one row, no bank.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from moeshare.errors import MoeshareError

if TYPE_CHECKING:
    from moeshare.engine.attention import AttnBatch
    from moeshare.engine.config import EngineConfig
    from moeshare.engine.residency import Residency


@dataclass(frozen=True)
class Footprint:
    """What placement needs to know of a model; sizes in elements."""

    layers: int
    kv_heads: int
    head_dim: int
    context: int
    vocab: int
    work_per_token: int  # activations one token holds in a step
    largest_load: int  # the largest tensor (or expert) loading reads at once
    heads: int = 0  # query heads
    experts: int = 0  # per MoE layer, in one variant (0: dense)
    experts_per_token: int = 0  # routed per token per MoE layer
    lookup: int = 0  # elements of a row's weights a step only looks up a few rows of (an untied embedding)


@dataclass(frozen=True)
class Layout:
    """How many rows the instance holds, and its bank: slots per MoE layer (none for a dense model)."""

    rows: int
    slots: tuple[int, ...]
    row_bytes: int  # one row's weights outside the bank
    slot_bytes: int  # one bank slot (one expert of one layer)


class Model(Protocol):
    """The forward of one architecture over its resident rows."""

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        rows: torch.Tensor,
        attn: AttnBatch,
        kv: torch.Tensor,
    ) -> torch.Tensor: ...

    def head(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """hidden [B, H] -> LM-head logits [B, V] in the model's dtype: what sampling takes."""
        ...

    def logits(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """`head` in float32: what scoring takes."""
        ...


class Architecture(Protocol):
    name: str
    kind: str

    def footprint(self, config: dict) -> Footprint: ...

    def layout(self, source: Any, config: EngineConfig, dtype: torch.dtype) -> Layout: ...

    def build(
        self,
        source: Any,
        names: dict[str, str],
        layout: Layout,
        offload: frozenset[int],
        config: EngineConfig,
        dtype: torch.dtype,
        device: torch.device,
    ) -> tuple[Model, Residency]:
        """The model and its residency, weights read in. `names`: model name -> the source's variant."""
        ...


_REGISTRY: dict[str, Architecture] = {}


def register(entry: Architecture) -> None:
    _REGISTRY[entry.name] = entry


def architecture(name: str, where: object) -> Architecture:
    """The entry for a checkpoint adapter's name; a one-line error naming what is served otherwise."""
    _load_builtin()
    if name not in _REGISTRY:
        raise MoeshareError(
            f"{where}: serving {name} is not supported yet (served architectures: {', '.join(sorted(_REGISTRY))})"
        )
    return _REGISTRY[name]


def architectures() -> Iterable[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def _builtin() -> list[Architecture]:
    """The entries that ship with the engine (imported on first use: their models import this package)."""
    from moeshare.engine.models.dense import DENSE
    from moeshare.engine.models.seq2seq import SWITCH
    from moeshare.engine.models.variants import MIXTRAL

    return [MIXTRAL, DENSE, SWITCH]


_loaded = False


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        for entry in _builtin():
            _REGISTRY.setdefault(entry.name, entry)
        _loaded = True
