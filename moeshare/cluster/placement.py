"""Where each store or checkpoint runs when there are several GPUs (engines): a pure function of the models'
sizes and expected load and the GPUs' memory, MuxServe-style greedy.

Heaviest demand first (load, then bytes), each replica onto the GPU where it costs least: the lowest load after
adding it, a GPU already holding the model counted as a little cheaper (`STICKY` of the replica's load, so a
re-plan moves a model only for a real gain), then the GPU holding it (an idle model stays put), then more free
memory. Never over a GPU's memory: a
model that fits nowhere is a one-line error. A model whose load is more than one GPU carries (`capacity`) gets
one replica per `capacity` of it, on distinct GPUs, each taking an equal share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from moeshare.errors import MoeshareError

STICKY = 0.25  # a GPU that holds the model already costs this share of the replica's load less


class PlacementError(MoeshareError):
    """The models do not fit the GPUs' memory."""


@dataclass(frozen=True)
class Demand:
    name: str  # what is placed: one store (all its variants) or one checkpoint
    bytes: int  # on the device: weights, work space and the KV it is expected to use
    load: float = 1.0  # expected demand, in the unit of `capacity` (requests/s, or shares)


@dataclass(frozen=True)
class Plan:
    replicas: dict[str, tuple[int, ...]]  # name -> the GPUs (engine indices) holding it
    used_bytes: tuple[int, ...]  # per GPU
    load: tuple[float, ...]  # per GPU
    decisions: tuple[str, ...]  # one line per replica placed, for the log and stats


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def place(
    models: Sequence[Demand],
    memory: Sequence[int],
    capacity: float | None = None,
    current: Mapping[str, Sequence[int]] | None = None,
    alive: Sequence[int] | None = None,
) -> Plan:
    """A plan for `models` over GPUs with `memory` bytes each (only the `alive` ones, default all);
    `current`: where models are now (stickiness); `capacity`: the load one GPU carries per model (None: one
    replica each)."""
    gpus = list(range(len(memory))) if alive is None else sorted(alive)
    if not gpus:
        raise PlacementError("no GPU is left to place models on")
    if twice := sorted({m.name for m in models if sum(x.name == m.name for x in models) > 1}):
        raise PlacementError(f"{twice[0]} is given twice: serve each store or checkpoint once")
    used = [0] * len(memory)
    load = [0.0] * len(memory)
    replicas: dict[str, tuple[int, ...]] = {}
    decisions = []
    current = current or {}
    for m in sorted(models, key=lambda m: (-m.load, -m.bytes, m.name)):
        want = 1 if capacity is None or m.load <= 0 else max(1, math.ceil(m.load / capacity))
        fits = [g for g in gpus if used[g] + m.bytes <= memory[g]]
        if not fits:
            free = ", ".join(f"GPU {g} {_gib(memory[g] - used[g])}" for g in gpus)
            raise PlacementError(f"{m.name} needs {_gib(m.bytes)} and no GPU has that much left ({free})")
        k = min(want, len(fits))
        share = m.load / k
        chosen: list[int] = []
        for _ in range(k):
            options = [g for g in fits if g not in chosen and used[g] + m.bytes <= memory[g]]
            if not options:
                break

            held = current.get(m.name, ())
            # lowest load after it (a GPU that holds it already a little cheaper), then where it is, then room
            g = min(
                options,
                key=lambda g: (
                    load[g] + share - (STICKY * share if g in held else 0.0),
                    g not in held,
                    used[g] - memory[g],
                ),
            )
            chosen.append(g)
            used[g] += m.bytes
            load[g] += share
        replicas[m.name] = tuple(sorted(chosen))
        hot = f" (wanted {want} replicas: {want - len(chosen)} more do not fit)" if len(chosen) < want else ""
        decisions.append(
            f"{m.name} ({_gib(m.bytes)}, load {m.load:g}) -> GPU {', '.join(map(str, sorted(chosen)))}{hot}"
        )
    return Plan(replicas, tuple(used), tuple(load), tuple(decisions))


def moves(
    before: Mapping[str, Sequence[int]], after: Plan
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """What turns `before` into `after`: the (model, GPU) replicas to add, then those to remove (a model is
    loaded where it goes before it leaves where it was, so it is served throughout)."""
    add = [(m, g) for m, gs in after.replicas.items() for g in gs if g not in before.get(m, ())]
    remove = [(m, g) for m, gs in before.items() for g in gs if g not in after.replicas.get(m, ())]
    return sorted(add), sorted(remove)
