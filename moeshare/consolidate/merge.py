"""Merging a slot's members into one expert: `average`, `frequency` (router-weighted), `medoid` or `fit`
(fitted to the members' outputs on calibration tokens, see fit.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moeshare.consolidate.align import neuron_matrix, relative_distance, split_neuron_matrix
from moeshare.consolidate.experts import expert_forward
from moeshare.consolidate.fit import FitData, fit_expert
from moeshare.consolidate.similarity import AlignmentCache

METHODS = ("average", "frequency", "medoid", "fit")


@dataclass
class MergedSlot:
    members: list[int]
    expert: dict[str, torch.Tensor]
    errors: list[float]  # relative distance of each (aligned) member to the merged weights


def medoid(members: list[int], dist: np.ndarray) -> int:
    finite = np.where(np.isfinite(dist), dist, 0.0)
    return min(members, key=lambda m: (finite[m, members].sum(), m))


def merge_slot(
    members: list[int],
    cache: AlignmentCache,
    dist: np.ndarray,
    method: str,
    freq: np.ndarray | None,
    fit: FitData | None = None,
) -> MergedSlot:
    lx = cache.lx
    if len(members) == 1:
        return MergedSlot(members, lx.experts[members[0]], [0.0])
    ref = medoid(members, dist)
    aligned = [cache.aligned(ref, m) if m != ref else cache.neurons[ref] for m in members]  # each [I, D']
    if all(torch.equal(x, aligned[0]) for x in aligned[1:]):
        # identical members: keep the bits, not a float32 round trip
        return MergedSlot(members, lx.experts[ref], [0.0] * len(members))
    fitted = _fit(fit, members, aligned, lx.experts[ref], lx.roles) if method == "fit" and fit else None
    if fitted is not None:
        expert, _ = fitted
        # fit moves weights far from every member while matching their outputs: judge it by its outputs
        return MergedSlot(members, expert, [output_error(fit, m, lx.experts[m], expert) for m in members])
    if method == "medoid":
        merged = cache.neurons[ref]
        expert = lx.experts[ref]
    else:
        if method == "frequency" and freq is not None:
            w = torch.tensor([float(freq[m]) for m in members]) + 1e-6
        else:
            w = torch.ones(len(members))
        w = w / w.sum()
        merged = sum(wi * x for wi, x in zip(w, aligned, strict=True))
        expert = split_neuron_matrix(merged, lx.experts[ref], lx.roles)
    errors = [relative_distance(x, merged) for x in aligned]
    return MergedSlot(members, expert, errors)


def output_error(
    fit: FitData, member: int, original: dict[str, torch.Tensor], merged: dict[str, torch.Tensor]
) -> float:
    """Relative error of the merged expert's outputs against the member's own, on the calibration tokens
    the member's router sends it (weighted by gate weight squared, as the fit is)."""
    x, w = fit.routed(member)  # [T, H], [T]
    if len(x) == 0:
        return 0.0
    want = expert_forward(fit.arch, original, x)  # [T, H]
    got = expert_forward(fit.arch, merged, x)
    den = (w[:, None] * want.square()).sum()
    return float(((w[:, None] * (got - want).square()).sum() / den).sqrt()) if den > 0 else 0.0


def _fit(
    fit: FitData,
    members: list[int],
    aligned: list[torch.Tensor],
    like: dict[str, torch.Tensor],
    roles: tuple[str, ...],
) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
    """The fitted expert in `like`'s dtypes and as a neuron matrix [I, D']; None when no calibration token
    reached any member."""
    fitted = fit_expert(fit, members, [split_neuron_matrix(x, like, roles) for x in aligned])
    if fitted is None:
        return None
    expert = {r: fitted[r].to(like[r].dtype).contiguous() for r in roles}
    return expert, neuron_matrix(expert, roles)
