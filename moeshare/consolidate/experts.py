"""One MoE layer's experts across all variants, in the canonical roles, and what an expert computes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from moeshare.checkpoint import Checkpoint
from moeshare.consolidate.align import neuron_matrix
from moeshare.errors import MoeshareError

# The role that maps the intermediate activations back to the hidden size.
OUTPUT_ROLE = {"mixtral": "w2", "switch": "wo"}


def expert_hidden(arch: str, expert: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The expert's intermediate activations on hidden states x [T, H] -> [T, I], in float32."""
    if arch == "mixtral":
        return F.silu(x @ expert["w1"].float().T) * (x @ expert["w3"].float().T)
    return F.relu(x @ expert["wi"].float().T)


def expert_forward(arch: str, expert: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The expert's function on hidden states x [T, H] -> [T, H], in float32."""
    return expert_hidden(arch, expert, x) @ expert[OUTPUT_ROLE[arch]].float().T


@dataclass
class LayerExperts:
    """Experts of one layer: index i = variant * E + local expert."""

    layer: str
    roles: tuple[str, ...]
    experts: list[dict[str, torch.Tensor]]
    owner: np.ndarray  # [n] variant index

    @property
    def neurons(self) -> list[torch.Tensor]:
        return [neuron_matrix(e, self.roles) for e in self.experts]


def require_finite(ckpt: Checkpoint, name: str, t: torch.Tensor) -> None:
    """Refuse a NaN or infinite weight: merged into a shared slot it would poison every variant using it."""
    if t.is_floating_point() and not (finite := torch.isfinite(t)).all():
        raise MoeshareError(
            f"{ckpt.path}: tensor {name} has {int((~finite).sum())} NaN or infinite values; a variant with "
            f"non-finite weights would poison the experts it shares: repair {ckpt.path.name} or leave it out"
        )


def load_layer(ckpts: list[Checkpoint], layer: str) -> LayerExperts:
    adapter = ckpts[0].adapter
    experts, owner = [], []
    for v, ckpt in enumerate(ckpts):
        for e in range(adapter.num_experts):
            expert = ckpt.read_expert(layer, e)
            for role, t in expert.items():
                key = adapter.expert_key(layer, e, role)
                require_finite(ckpt, key if key in ckpt.names else f"{role} of layer {layer} expert {e}", t)
            experts.append(expert)
            owner.append(v)
    return LayerExperts(layer, adapter.expert_roles, experts, np.array(owner))
