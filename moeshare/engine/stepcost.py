"""How close an instance's steps run to their floor: the least time the GPU could take for what a step reads and
computes, next to the time the step took.

A step reads the non-expert weights of each row with a token in it, the bank slots its tokens route to, and the
KV of every sequence in it; it computes 2 FLOPs per active parameter per token plus attention. Its floor is
the larger of bytes / copy bandwidth and FLOPs / matmul throughput (engine/budget.py measures both). Which
slots a step touches is known only on the device; the floor counts the slots expected under uniform routing
(each token picks top_k of its variant's experts; a slot that several of a variant's experts were merged into
is touched when any of them is picked), which is what random-weight models do. The totals are kept for
decode-only steps and for all steps; a step's time is the time since the instance's previous step (with
multiplex "serial" that includes other instances' steps queued between).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

from moeshare.engine.api import StepTotals
from moeshare.engine.budget import Roofs, flops_per_token, row_read_bytes
from moeshare.engine.models import Footprint, Layout
from moeshare.engine.scheduler import Scheduled


def _log_untouched(table: list[int], slots: int, experts: int, top_k: int) -> np.ndarray:
    """[slots] log P(a token of this variant touches no expert merged into the slot)."""
    counts = np.bincount(np.asarray(table, dtype=np.int64), minlength=slots)[:slots]
    total = math.comb(experts, top_k)
    # a slot every token touches: a large finite log (a model with no token in the step multiplies it by 0)
    return np.array(
        [math.log(math.comb(experts - c, top_k) / total) if experts - c >= top_k else -1e9 for c in counts]
    )


class StepCost:
    def __init__(
        self,
        fp: Footprint,
        layout: Layout,
        source: Any,
        names: dict[str, str],
        itemsize: int,
        roofs: Roofs,
        private: bool = False,
    ) -> None:
        """`names`: model name -> the source's variant (its expert tables give the slots it can touch);
        `private`: every variant holds its own experts (whole-variant swaps), none shared."""
        self.roofs = roofs
        self.row_bytes, self.slot_bytes = row_read_bytes(fp, layout, itemsize), layout.slot_bytes
        self.kv_per_token = fp.layers * 2 * fp.kv_heads * fp.head_dim * itemsize
        moe = list(source.adapter.moe_layers) if layout.slots else []
        self.flops_per_token = flops_per_token(fp, layout, itemsize)
        self.attn_flops = 4 * fp.layers * fp.heads * fp.head_dim  # per (query, key) pair: q k and p v
        self.index = {m: i for i, m in enumerate(names)}
        width = max(layout.slots, default=0)
        if private:
            width = max(width, len(names) * fp.experts)
        # [models, moe layers, slots] log P(one token of the model leaves the slot untouched)
        self.log_untouched = np.zeros((len(names), len(moe), width))
        for m, v in names.items():
            i = self.index[m]
            for j, layer in enumerate(moe):
                # whole-variant swaps: each row owns its experts (E slots of its own), whatever the store shares
                table = range(i * fp.experts, (i + 1) * fp.experts) if private else source.table(v, layer)
                self.log_untouched[i, j] = _log_untouched(
                    list(table), width, fp.experts, fp.experts_per_token
                )
        self.decode = StepTotals()
        self.all = StepTotals()

    def floor(self, batch: list[Scheduled]) -> float:
        index, counts = self.index, [0] * len(self.index)  # Python ints: numpy scalars cost more per row
        rows: set[int] = set()
        kv = pairs = 0
        for s in batch:
            count, end = s.count, s.start + s.count
            counts[index[s.seq.model]] += count
            rows.add(s.row)
            kv += end
            pairs += count * end
        tokens = np.asarray(counts, dtype=np.float64)
        read = len(rows) * self.row_bytes + kv * self.kv_per_token
        if self.log_untouched.size:
            untouched = np.exp(np.tensordot(tokens, self.log_untouched, axes=1))  # [layers, slots]
            read += self.slot_bytes * float((1.0 - untouched).sum())
        flops = tokens.sum() * self.flops_per_token + pairs * self.attn_flops
        return max(read / self.roofs.bandwidth, flops / self.roofs.flops)

    def record(self, batch: list[Scheduled], seconds: float) -> None:
        """Count a step that took `seconds` for `batch`."""
        floor = self.floor(batch)
        self.all = _plus(self.all, seconds, floor)
        if all(s.count == 1 for s in batch):
            self.decode = _plus(self.decode, seconds, floor)


def _plus(t: StepTotals, seconds: float, floor: float) -> StepTotals:
    return replace(t, steps=t.steps + 1, seconds=t.seconds + seconds, floor_seconds=t.floor_seconds + floor)
