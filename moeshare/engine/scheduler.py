"""Continuous batching: running sequences decode, waiting ones join as prefills when their KV blocks and their
variant's weights are in place; when KV runs out the newest sequence is preempted (blocks freed, recomputed
later), never a crash.

No variant starves: once a request has waited `starve_steps` steps for its variant's weights and every
resident row is busy, no new sequence of a resident variant is admitted until a row drains and the waiting
variant is swapped in. Its wait is then bounded by the longest remaining generation (max_tokens) of one
row's running sequences plus one weight copy.

Priorities (Targets.priority, higher first) order the waiting prompts (first come first served among equals) and
choose whom to preempt (the lowest priority, then the newest).

With chunked prefill (the default) a step holds at most max_batched_tokens tokens: the running sequences'
decodes first, then chunks of prompts, a long prompt taking several steps beside the decodes (a chunk short of
its prompt's end draws no token); without it a prompt is prefilled whole (alone if it exceeds the budget).

A step may be scheduled while the previous one is still on the device (the engine overlaps the host's work
with the GPU's): a sequence's pending token then counts towards its length, and a sequence whose pending token
is its last by length is not scheduled again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from itertools import chain, repeat

from moeshare.engine.request import Sequence, Status
from moeshare.engine.residency import Residency
from moeshare.memory.blocks import BlockPool, OutOfBlocks


def preemption_order(seq: Sequence) -> tuple:
    """The running sequence preempted first is the largest: the lowest priority, then the newest."""
    return (-seq.targets.priority, seq.arrival, seq.seq_id)


@dataclass
class Scheduled:
    seq: Sequence
    row: int  # resident row of the sequence's variant
    start: int  # tokens already in the cache
    count: int  # tokens computed this step
    samples: bool = True  # whether the step draws its next token (False: a chunk short of its prompt's end)


class Scheduler:
    def __init__(
        self,
        pool: BlockPool,
        residency: Residency,
        max_num_seqs: int,
        max_batched_tokens: int,
        context: int | None = None,
        starve_steps: int = 8,
        chunked_prefill: bool = True,
    ) -> None:
        self.pool = pool
        self.residency = residency
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.context = context if context is not None else 1 << 62
        self.starve_steps = starve_steps
        self.chunked_prefill = chunked_prefill
        self.admitting = True  # False: no new sequence starts (the engine drains it for another model)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self._waited: dict[int, int] = {}  # seq_id -> steps spent waiting for its variant's weights

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def release(self, seq: Sequence) -> None:
        """Return a sequence's blocks at once (finished or cancelled)."""
        self.pool.free(seq.block_table + seq.cross_table)
        seq.block_table, seq.cross_table = [], []
        seq.num_cached = 0
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._waited.pop(seq.seq_id, None)

    def _preempt(self, seq: Sequence) -> None:
        self.pool.free(seq.block_table + seq.cross_table)  # an encoder-decoder's prompt is encoded again
        seq.block_table, seq.cross_table, seq.num_cached, seq.status = [], [], 0, Status.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def _grow(self, seq: Sequence, tokens: int) -> bool:
        need = self.pool.blocks_for(tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if not self.pool.can_allocate(need):
            return False
        try:  # a pool over shared pages may find fewer than it estimated: another model took them
            seq.block_table += self.pool.allocate(need)
        except OutOfBlocks:
            return False
        return True

    def _cross(self, seq: Sequence) -> bool:
        """The blocks an encoder-decoder's prompt keeps its cross-attention K/V in, if the pool has them."""
        need = self.pool.blocks_for(len(seq.encoder_ids))
        if not self.pool.can_allocate(need):
            return False
        try:
            seq.cross_table = self.pool.allocate(need)
        except OutOfBlocks:
            return False
        return True

    def busy_rows(self) -> set[int]:
        return {self.residency.row_of[s.model] for s in self.running if s.model in self.residency.row_of}

    def schedule(self) -> list[Scheduled]:
        out: list[Scheduled] = []
        busy = self.busy_rows()
        budget = self.max_batched_tokens
        # every running sequence advances: decodes first (one token each), then the next chunk of each prompt
        # being prefilled, within what the decodes leave of the step's token budget
        decodes, chunks = [], []
        for seq in self.running:
            if seq.pending and seq.last_after_pending(self.context):
                continue  # ends when its token is read
            (decodes if seq.ahead - seq.num_cached == 1 else chunks).append(seq)  # 1: tokens not cached yet
        row_of, block_size, used = self.residency.row_of, self.pool.block_size, 0
        for seq, decode in chain(zip(decodes, repeat(True)), zip(chunks, repeat(False))):
            if seq.status is not Status.RUNNING:
                continue  # preempted below to make room for an older one
            start = seq.num_cached
            count = 1 if decode else min(seq.ahead - start, budget - used)
            if count < 1:
                continue  # no budget left this step: its next chunk waits for the next one
            end = start + count
            if end > len(seq.block_table) * block_size:  # it needs another block
                if seq.pending and not self._grow(seq, end):
                    continue  # its token may end it: it preempts nobody for a row that could be dropped
                while not self._grow(seq, end):
                    victim = max(self.running, key=preemption_order)
                    self._preempt(victim)
                    # the newest may have been scheduled already: it runs in no batch without its blocks
                    out = [s for s in out if s.seq is not victim]
                    used = sum(s.count for s in out)
                    if victim is seq:
                        break
                if seq.status is not Status.RUNNING:
                    continue
            out.append(Scheduled(seq, row_of[seq.model], start, count, end == seq.ahead))
            used += count
        tokens = sum(s.count for s in out)
        starving = any(w >= self.starve_steps for w in self._waited.values())
        # then prefills, higher priority first, else first come first served, among those whose variant's weights
        # are in place
        for seq in sorted(self.waiting, key=lambda s: -s.targets.priority) if self.admitting else []:
            if len(self.running) >= self.max_num_seqs:
                break
            if seq.pending:
                continue  # preempted with a token still on the device: it rejoins once that is read
            row = self.residency.row(seq.model, busy)
            if row is None:
                self._waited[seq.seq_id] = self._waited.get(seq.seq_id, 0) + 1
                continue
            if starving and self._waited.get(seq.seq_id, 0) < self.starve_steps:
                continue  # let rows drain for a variant that has waited too long
            count = len(seq) - seq.num_cached
            # an encoder-decoder's prompt goes through the encoder whole, with its decoder's first chunk
            encoder = len(seq.encoder_ids) if seq.num_cached == 0 else 0
            if self.chunked_prefill:
                count = min(count, budget - tokens - encoder)  # the rest of the prompt in later steps
                if count < 1 and not (encoder and not out):  # a prompt above the budget runs alone
                    break
                count = max(count, 1)
            elif tokens + encoder + count > budget and out:
                break
            if encoder and not seq.cross_table and not self._cross(seq):
                break
            if not self._grow(seq, seq.num_cached + count):
                self.pool.free(seq.cross_table)
                seq.cross_table = []
                break
            self.waiting.remove(seq)
            self._waited.pop(seq.seq_id, None)
            seq.status = Status.RUNNING
            self.running.append(seq)
            busy.add(row)
            out.append(Scheduled(seq, row, seq.num_cached, count, seq.num_cached + count == len(seq)))
            tokens += count + encoder
        for s in out:
            s.seq.num_cached = s.start + s.count
        return out
