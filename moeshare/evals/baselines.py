"""Merging baselines the quality evals compare consolidation against; each writes HuggingFace checkpoints."""

from __future__ import annotations

import math
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import torch

from moeshare.checkpoint import Checkpoint, open_checkpoint, write_checkpoint
from moeshare.checkpoint.io import publish
from moeshare.consolidate.align import neuron_matrix, relative_distance
from moeshare.consolidate.store import TOKENIZER_FILES
from moeshare.errors import MoeshareError

MAX_SHARD_BYTES = 5 * 2**30  # what write_checkpoint holds in memory before it writes a shard
_SLACK = 1e-9  # budgets such as 1/3 are floats: compare them with this relative slack


@dataclass(frozen=True)
class SharedPosition:
    layer: str
    expert: int  # local expert index
    owner: str  # the variant whose copy every variant uses
    distance: float  # mean pairwise relative distance between the variants' copies


@dataclass(frozen=True)
class SameIndexPick:
    checkpoints: dict[str, Path]  # variant name -> its checkpoint
    fraction: float  # bank bytes (distinct copies) / unconsolidated expert bytes (all copies)
    shared: list[SharedPosition]  # in sharing order: most similar first


def average(paths: list[Path], out: Path) -> Path:
    """Plain weight averaging of every tensor of all variants into one checkpoint at `out`."""
    out = _free(out)
    ckpts = _open_variants(paths, "average")

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name in ckpts[0].names:
            ts = _read_all(ckpts, name)
            yield name, ts[0] if _identical(ts) else (sum(t.double() for t in ts) / len(ts)).to(ts[0].dtype)

    return _write(out, ckpts[0], tensors())


def ties(paths: list[Path], base: Path, out: Path, density: float = 0.2, scale: float = 1.0) -> Path:
    """TIES merging: base + scale × the sign-elected disjoint mean of the variants' trimmed deltas."""
    if not 0 < density <= 1:
        raise MoeshareError(f"ties: density {density} must be in (0, 1] (the fraction of each delta kept)")
    if not math.isfinite(scale):
        raise MoeshareError(f"ties: scale {scale} must be a finite number")
    out = _free(out)
    ckpts = _open_variants(paths, "ties")
    base_ckpt = open_checkpoint(base)
    _check_same_model(ckpts[0], base_ckpt)

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

    return _write(out, ckpts[0], tensors())


def same_index_pick(paths: list[Path], out_dir: Path, budget: float) -> SameIndexPick:
    """Share whole (layer, expert index) positions, most similar first, until the bank fits `budget`."""
    out_dir = _free(out_dir)
    ckpts = _open_variants(paths, "same_index_pick")
    names = [c.path.resolve().name for c in ckpts]
    n = len(ckpts)
    if dup := [x for x, c in Counter(names).items() if c > 1]:
        raise MoeshareError(
            f"two variants are named {dup[0]!r} (a variant is named after its directory); rename one"
        )
    if not ckpts[0].adapter.moe_layers:
        raise MoeshareError(
            f"{ckpts[0].path}: a dense model with no experts; same_index_pick needs MoE variants"
        )
    if not 1 / n * (1 - _SLACK) <= budget <= 1:
        raise MoeshareError(
            f"same_index_pick: budget {budget} must be in [1/{n}, 1] (1/{n}: every position shared, 1: none)"
        )
    ranked = _rank_positions(ckpts)
    total = n * sum(nbytes for _, _, _, nbytes in ranked)
    bank = total
    shared: list[SharedPosition] = []
    for distance, layer, expert, nbytes in ranked:
        if bank <= budget * total * (1 + _SLACK):
            break
        shared.append(SharedPosition(layer, expert, names[len(shared) % n], distance))
        bank -= (n - 1) * nbytes
    owners = {(s.layer, s.expert): names.index(s.owner) for s in shared}

    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for v, (name, ckpt) in enumerate(zip(names, ckpts, strict=True)):
            _write(tmp / name, ckpt, _picked_tensors(ckpts, v, owners))
        publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SameIndexPick({name: out_dir / name for name in names}, bank / total, shared)


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


def _rank_positions(ckpts: list[Checkpoint]) -> list[tuple[float, str, int, int]]:
    """(distance, layer, expert, bytes of one copy) of every position, most similar first, then model order."""
    adapter = ckpts[0].adapter
    ranked = []
    for layer in adapter.moe_layers:
        for e in range(adapter.num_experts):
            copies = [c.read_expert(layer, e) for c in ckpts]
            mats = [neuron_matrix(x, adapter.expert_roles) for x in copies]
            pairs = [relative_distance(a, b) for a, b in combinations(mats, 2)]
            nbytes = sum(t.numel() * t.element_size() for t in copies[0].values())
            ranked.append((sum(pairs) / len(pairs), layer, e, nbytes))
    return sorted(ranked, key=lambda r: r[0])  # stable: equal distances keep model order


def _picked_tensors(
    ckpts: list[Checkpoint], v: int, owners: dict[tuple[str, int], int]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Variant v's tensors in its own order, each shared expert read from its owner's checkpoint."""
    own = ckpts[v]
    for name in own.names:
        info = own.adapter.classify(name)
        if info.kind != "expert":
            yield name, own.tensor(name)
        elif info.expert is not None:
            yield name, ckpts[owners.get((info.layer, info.expert), v)].tensor(name)
        else:  # fused layout [E, ...]: one row per expert
            rows = range(own.shape(name)[0])
            yield name, torch.stack([ckpts[owners.get((info.layer, e), v)].tensor(name, e) for e in rows])


def _open_variants(paths: list[Path], method: str) -> list[Checkpoint]:
    if len(paths) < 2:
        raise MoeshareError(f"{method} needs at least two variants, got {len(paths)}")
    ckpts = [open_checkpoint(p) for p in paths]
    for ckpt in ckpts[1:]:
        _check_same_model(ckpts[0], ckpt)
    return ckpts


def _check_same_model(ref: Checkpoint, ckpt: Checkpoint) -> None:
    """`ckpt` has `ref`'s architecture, tensor names and tensor shapes."""
    if ckpt.adapter.name != ref.adapter.name:
        raise MoeshareError(
            f"{ckpt.path} is {ckpt.adapter.name} but {ref.path} is {ref.adapter.name}: merge checkpoints of one architecture"
        )
    if missing := sorted(set(ref.names) ^ set(ckpt.names)):
        where, other = (ckpt, ref) if missing[0] in ref.names else (ref, ckpt)
        raise MoeshareError(
            f"{where.path}: has no tensor {missing[0]}, which {other.path} has: not the same model shape"
        )
    for name in ref.names:
        if ckpt.shape(name) != ref.shape(name):
            raise MoeshareError(
                f"{ckpt.path}: tensor {name} is {list(ckpt.shape(name))} but {list(ref.shape(name))} in {ref.path}"
            )


def _read_all(ckpts: list[Checkpoint], name: str) -> list[torch.Tensor]:
    ts = [c.tensor(name) for c in ckpts]
    if not ts[0].is_floating_point() and not _identical(ts):
        raise MoeshareError(f"{ckpts[0].path}: tensor {name} is {ts[0].dtype} and differs between variants")
    return ts


def _identical(ts: list[torch.Tensor]) -> bool:
    return all(t.dtype == ts[0].dtype and torch.equal(t, ts[0]) for t in ts[1:])


def _free(out: Path) -> Path:
    out = Path(out)
    if out.exists():
        raise MoeshareError(f"{out}: already exists; choose another output path or remove it")
    return out


def _write(out: Path, like: Checkpoint, tensors: Iterable[tuple[str, torch.Tensor]]) -> Path:
    """A checkpoint with `like`'s config and tokenizer files, written all or nothing."""
    files = [like.path / f for f in TOKENIZER_FILES if (like.path / f).is_file()]
    return write_checkpoint(out, like.config, tensors, max_shard_bytes=MAX_SHARD_BYTES, copy_files=files)
