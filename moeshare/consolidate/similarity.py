"""Distances between every pair of one layer's experts across variants: `weight` or `output`."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from moeshare.consolidate.align import Alignment, align
from moeshare.consolidate.experts import LayerExperts, expert_forward

Aligner = Callable[[int, int], Alignment]


class AlignmentCache:
    """Alignments of expert j onto expert i, computed once per ordered pair."""

    def __init__(self, lx: LayerExperts, done: dict[tuple[int, int], Alignment] | None = None) -> None:
        self.lx = lx
        self.neurons = lx.neurons
        self.done: dict[tuple[int, int], Alignment] = {} if done is None else done

    def __call__(self, i: int, j: int) -> Alignment:
        if (i, j) not in self.done:
            self.done[(i, j)] = align(self.neurons[i], self.neurons[j])
        return self.done[(i, j)]

    def aligned(self, ref: int, j: int) -> torch.Tensor:
        """Expert j's neuron matrix with its rows permuted to match expert `ref`."""
        a = self(ref, j)
        return self.neurons[j] if a.perm is None else self.neurons[j][a.perm]


def _pairs(owner: np.ndarray) -> list[tuple[int, int]]:
    n = len(owner)
    return [(i, j) for i in range(n) for j in range(i + 1, n) if owner[i] != owner[j]]


def _empty(n: int) -> tuple[np.ndarray, np.ndarray]:
    dist = np.full((n, n), np.inf)
    np.fill_diagonal(dist, 0.0)
    return dist, np.zeros((n, n), dtype=bool)


def weight_distances(lx: LayerExperts, cache: AlignmentCache) -> tuple[np.ndarray, np.ndarray]:
    """Aligned relative weight distance [n, n] (inf within a variant) and which pairs are bitwise equal."""
    dist, exact = _empty(len(lx.owner))
    for i, j in _pairs(lx.owner):
        a = cache(i, j)
        dist[i, j] = dist[j, i] = a.distance
        exact[i, j] = exact[j, i] = a.exact
    return dist, exact


def output_distances(
    arch: str, lx: LayerExperts, inputs: list[torch.Tensor], max_tokens: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Relative distance between two experts' outputs on calibration hidden states of both their variants.

    inputs[v]: [T, H] hidden states that variant v feeds to this layer. Output distance needs no alignment:
    permuting neurons does not change an expert's outputs.
    """
    n = len(lx.owner)
    dist, exact = _empty(n)
    outs = []  # per variant: every expert's outputs on that variant's tokens [n, T, H]
    for x in inputs:
        x = x[:: max(1, len(x) // max_tokens)][:max_tokens].float()  # an even sample through the text
        outs.append(torch.stack([expert_forward(arch, e, x) for e in lx.experts]))
    sq = torch.stack([o.square().sum(dim=(1, 2)) for o in outs])  # [V, n] squared output norms
    for i, j in _pairs(lx.owner):
        vi, vj = int(lx.owner[i]), int(lx.owner[j])
        diff = (outs[vi][i] - outs[vi][j]).square().sum() + (outs[vj][i] - outs[vj][j]).square().sum()
        scale = (sq[vi, i] + sq[vj, i] + sq[vi, j] + sq[vj, j]) / 2
        dist[i, j] = dist[j, i] = float((diff / scale).sqrt()) if scale > 0 else 0.0
        same = all(torch.equal(lx.experts[i][r], lx.experts[j][r]) for r in lx.roles)
        exact[i, j] = exact[j, i] = same
    return dist, exact
