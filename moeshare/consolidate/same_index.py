"""Same-index pick: share whole (layer, expert index) positions across variants, most similar first, keeping
one variant's copy of each; the simplest consolidation, and the bank the serving benchmark compares with."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import torch

from moeshare.checkpoint import Checkpoint
from moeshare.checkpoint.output import publish
from moeshare.consolidate.align import neuron_matrix, relative_distance
from moeshare.consolidate.variants import new_output, open_variants, write_like
from moeshare.errors import MoeshareError

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


def same_index_pick(paths: list[Path], out_dir: Path, budget: float) -> SameIndexPick:
    """Share whole (layer, expert index) positions, most similar first, until the bank fits `budget`."""
    out_dir = new_output(out_dir)
    ckpts = open_variants(paths, "same_index_pick")
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
            write_like(tmp / name, ckpt, _picked_tensors(ckpts, v, owners))
        publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SameIndexPick({name: out_dir / name for name in names}, bank / total, shared)


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
