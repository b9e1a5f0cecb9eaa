"""What each tensor of a checkpoint is: the one place that knows an architecture's key names."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from moeshare.errors import CheckpointError

if TYPE_CHECKING:
    from moeshare.checkpoint.io import Checkpoint

Kind = Literal["expert", "router", "other"]


@dataclass(frozen=True)
class TensorInfo:
    kind: Kind
    layer: str | None = None  # MoE layer id, e.g. "3" (Mixtral) or "encoder.1" (Switch)
    expert: int | None = None  # None on an expert tensor: stacked over all experts (fused layout)
    role: str | None = None  # w1 / w2 / w3, gate_up / down (fused), wi / wo


OTHER = TensorInfo("other")


class Adapter(ABC):
    """Key names, expected shapes and expert layout of one architecture, read from its config."""

    name: str
    model_types: tuple[str, ...]
    expert_roles: tuple[str, ...]  # the canonical per-expert weights, in a fixed order

    def __init__(self, config: dict, source: Path) -> None:
        self.config = config
        self.source = source

    def _cfg(self, key: str) -> int:
        value = self.config.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise CheckpointError(f"{self.source}: config.json has no integer '{key}' ({self.name} needs it)")
        return value

    @property
    @abstractmethod
    def moe_layers(self) -> list[str]:
        """Ids of the layers that hold experts, in model order; empty for a dense model."""

    @property
    def num_experts(self) -> int:
        return 0

    @abstractmethod
    def classify(self, name: str) -> TensorInfo: ...

    @abstractmethod
    def expected_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape config.json implies for this tensor, or None for a name we do not know."""

    @abstractmethod
    def expert_key(self, layer: str, expert: int, role: str) -> str:
        """The per-expert (unfused) key of one expert weight: the layout we write."""

    def router_key(self, layer: str) -> str:
        raise CheckpointError(f"{self.name} has no routers")

    def read_expert(self, ckpt: Checkpoint, layer: str, expert: int) -> dict[str, torch.Tensor]:
        """One expert's weights by canonical role, from whichever layout the checkpoint uses."""
        return {role: ckpt.tensor(self.expert_key(layer, expert, role)) for role in self.expert_roles}


_ADAPTERS: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    for model_type in cls.model_types:
        _ADAPTERS[model_type] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_for(config: dict, source: Path) -> Adapter:
    model_type = config.get("model_type")
    if model_type not in _ADAPTERS:
        raise CheckpointError(
            f"{source}: architecture {model_type!r} is not supported "
            f"(supported model_type values: {', '.join(supported_model_types())})"
        )
    return _ADAPTERS[model_type](config, source)


def match(pattern: str, name: str) -> re.Match[str] | None:
    return re.fullmatch(pattern, name)
