"""Merging baselines the quality evals compare consolidation against; each writes HuggingFace checkpoints.
Same-index pick, a consolidation method, lives in moeshare.consolidate.same_index."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch

from moeshare.checkpoint import Checkpoint, open_checkpoint
from moeshare.consolidate.same_index import SameIndexPick, SharedPosition, same_index_pick
from moeshare.consolidate.variants import check_same_model, new_output, open_variants, write_like
from moeshare.errors import MoeshareError

__all__ = ["SameIndexPick", "SharedPosition", "average", "same_index_pick", "ties"]


def average(paths: list[Path], out: Path) -> Path:
    """Plain weight averaging of every tensor of all variants into one checkpoint at `out`."""
    out = new_output(out)
    ckpts = open_variants(paths, "average")

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name in ckpts[0].names:
            ts = _read_all(ckpts, name)
            yield name, ts[0] if _identical(ts) else (sum(t.double() for t in ts) / len(ts)).to(ts[0].dtype)

    return write_like(out, ckpts[0], tensors())


def ties(paths: list[Path], base: Path, out: Path, density: float = 0.2, scale: float = 1.0) -> Path:
    """TIES merging: base + scale × the sign-elected disjoint mean of the variants' trimmed deltas."""
    if not 0 < density <= 1:
        raise MoeshareError(f"ties: density {density} must be in (0, 1] (the fraction of each delta kept)")
    if not math.isfinite(scale):
        raise MoeshareError(f"ties: scale {scale} must be a finite number")
    out = new_output(out)
    ckpts = open_variants(paths, "ties")
    base_ckpt = open_checkpoint(base)
    check_same_model(ckpts[0], base_ckpt)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name in ckpts[0].names:
            ts = _read_all(ckpts, name)
            if _identical(ts):
                yield name, ts[0]
                continue
            b = base_ckpt.tensor(name).float()
            deltas = torch.stack([t.float() - b for t in ts])  # [N, *shape]
            merged = _ties_merge(deltas, _trim_groups(ckpts[0], name), density)
            yield name, (b + scale * merged).to(ts[0].dtype)

    return write_like(out, ckpts[0], tensors())


def _ties_merge(deltas: torch.Tensor, groups: int, density: float) -> torch.Tensor:
    """Trim each delta to its top `density` by magnitude per group, elect signs, take the disjoint mean."""
    n = deltas.shape[0]
    rows = deltas.reshape(n, groups, -1)  # [N, G, M]
    k = math.ceil(density * rows.shape[2])
    keep = torch.zeros_like(rows, dtype=torch.bool).scatter_(2, rows.abs().topk(k, dim=2).indices, True)
    trimmed = rows * keep
    sign = trimmed.sum(0).sign()  # [G, M]
    agree = (trimmed != 0) & (trimmed.sign() == sign)
    merged = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    return merged.reshape(deltas.shape[1:])


def _trim_groups(ckpt: Checkpoint, name: str) -> int:
    """How many parts a tensor is trimmed in: a fused one per expert and role, so both layouts merge alike."""
    info = ckpt.adapter.classify(name)
    if info.kind != "expert" or info.expert is not None:
        return 1
    experts = ckpt.shape(name)[0]
    return 2 * experts if info.role == "gate_up" else experts  # gate_up [E, 2I, H]: gate rows, then up rows


def _read_all(ckpts: list[Checkpoint], name: str) -> list[torch.Tensor]:
    ts = [c.tensor(name) for c in ckpts]
    if not ts[0].is_floating_point() and not _identical(ts):
        raise MoeshareError(f"{ckpts[0].path}: tensor {name} is {ts[0].dtype} and differs between variants")
    return ts


def _identical(ts: list[torch.Tensor]) -> bool:
    return all(t.dtype == ts[0].dtype and torch.equal(t, ts[0]) for t in ts[1:])
