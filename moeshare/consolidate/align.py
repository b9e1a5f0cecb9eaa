"""Neuron alignment: an expert's function is unchanged when its intermediate neurons are permuted."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

# Which axis of each weight runs over the intermediate neurons.
NEURON_AXIS = {"w1": 0, "w3": 0, "w2": 1, "wi": 0, "wo": 1}


def neuron_matrix(expert: dict[str, torch.Tensor], roles: tuple[str, ...]) -> torch.Tensor:
    """One row per intermediate neuron: its input weights and output weights side by side. [I, D']"""
    parts = [expert[r].float() if NEURON_AXIS[r] == 0 else expert[r].float().T for r in roles]
    return torch.cat(parts, dim=1)


def split_neuron_matrix(
    x: torch.Tensor, like: dict[str, torch.Tensor], roles: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """The inverse of neuron_matrix, in each role's shape and dtype."""
    out, col = {}, 0
    for r in roles:
        width = like[r].shape[1 - NEURON_AXIS[r]]
        part = x[:, col : col + width]
        out[r] = (part if NEURON_AXIS[r] == 0 else part.T).to(like[r].dtype).contiguous()
        col += width
    return out


def relative_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| over the experts' RMS norm: 0 for equal, about sqrt(2) for unrelated weights."""
    scale = ((a.square().sum() + b.square().sum()) / 2).sqrt()
    return float((a - b).norm() / scale) if scale > 0 else 0.0


@dataclass(frozen=True)
class Alignment:
    distance: float
    perm: np.ndarray | None  # rows of `other` reordered to match `ref`; None: identity
    exact: bool  # bitwise equal without permuting


def align(
    ref: torch.Tensor, other: torch.Tensor, identity_ok: float = 0.3, max_features: int = 512
) -> Alignment:
    """Best neuron permutation of `other` onto `ref` ([I, D'] each) and the distance after it.

    Fine-tunes of one base keep their neurons in place, so an identity match that is already close is taken
    as is; otherwise a linear assignment on neuron similarity finds the permutation.
    """
    if torch.equal(ref, other):
        return Alignment(0.0, None, True)
    d0 = relative_distance(ref, other)
    if d0 <= identity_ok:
        return Alignment(d0, None, False)
    r, o = ref, other
    if ref.shape[1] > max_features:  # a fixed random projection keeps the cost matrix cheap at large widths
        g = torch.Generator().manual_seed(0)
        proj = torch.randn(ref.shape[1], max_features, generator=g) / max_features**0.5
        r, o = ref @ proj, other @ proj
    # squared distance between every pair of neurons, up to the constant |r_i|^2 per row [I, I]
    cost = (o.square().sum(1)[None, :] - 2 * r @ o.T).double().numpy()
    _, perm = linear_sum_assignment(cost)
    d = relative_distance(ref, other[perm])
    if d < d0:
        return Alignment(d, perm, False)
    return Alignment(d0, None, False)
