"""Decode steps captured as CUDA graphs, one per padded batch size: forward, LM head and sampling in one replay.

Shapes depend only on the number of tokens, so one graph per size serves any mix of variants; a step with n
sequences replays the smallest captured size >= n, padding rows pointing at the pool's scratch block. Each size
has a graph per sampling mode (greedy, plain, filtered), so a batch that needs no top-k / top-p cut never sorts
the vocabulary. A step's input ids are the host's plus, for decodes whose token the previous step sampled,
that token read on the device (LastTokens), and each replay leaves its own tokens there for the next.

An encoder-decoder model (Switch) replays its decoder step the same way, each sequence's cross-attention over its
prompt's cross blocks (fixed after the encoder pass, which runs outside the graph) as a second table.
"""

from __future__ import annotations

import numpy as np
import torch

from moeshare.engine.attention import AttnBatch
from moeshare.engine.models import Model
from moeshare.engine.sampling import MODES, SamplingBatch, mode_for, sample
from moeshare.memory.blocks import BlockPool

SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)
# rows of the packed int64 input: one host-to-device copy per step
IDS, SRC, POS, ROWS, BLOCK, OFFSET, CTX, TOP_K, SEED, STEP, CROSS = range(11)  # CROSS: prompt length


class LastTokens:
    """The token each row of an instance's last step sampled, on the device: the next step's input ids are
    host_ids + ids[src], with src = `none` (an entry that stays 0) where the host knows the id."""

    def __init__(self, rows: int, device: torch.device) -> None:
        self.ids = torch.zeros(rows + 1, dtype=torch.int64, device=device)  # [rows + 1]
        self.none = rows


class _Tables:
    """A step's block tables on the device [n, width] int32, written from pinned staging (two sets taken in turn,
    as DecodeGraphs' inputs) with only what changed: entries past a table's end are never read (the context
    length bounds them), and a row holding the same table (a list the scheduler only appends to, or replaces)
    gets only the entries appended since that staging set last held it."""

    def __init__(self, n: int, width: int, device: torch.device) -> None:
        self.device = torch.zeros(n, width, dtype=torch.int32, device=device)
        self._staging = [torch.zeros(n, width, dtype=torch.int32, pin_memory=True) for _ in range(2)]
        # per staging set and row: the list last written there and how many entries (holding the list keeps
        # its id from being reused)
        self._written: list[list[tuple[list | None, int]]] = [[(None, 0)] * n for _ in range(2)]
        self._shown = np.zeros((n, width), dtype=np.int32)  # what `device` holds

    def pad(self, start: int, end: int, block: int) -> None:
        self.device[start:end] = block
        self._shown[start:end] = block

    def write(self, turn: int, tables: list[list[int]]) -> None:
        table_t = self._staging[turn]
        table, written = table_t.numpy(), self._written[turn]
        for i, t in enumerate(tables):
            was, k = written[i]
            if was is not t:
                k = 0
            if k != len(t):
                table[i, k : len(t)] = t[k:]
                written[i] = (t, len(t))
        # copy the rows whose entries in use differ from the device's (one contiguous range; none in most
        # decode steps: a table grows once per block of tokens)
        lens = [len(t) for t in tables]
        n, w = len(lens), max(lens)
        in_use = np.arange(w) < np.asarray(lens)[:, None]
        changed = np.flatnonzero(((table[:n, :w] != self._shown[:n, :w]) & in_use).any(axis=1))
        if changed.size:
            lo, hi = int(changed[0]), int(changed[-1]) + 1
            self.device[lo:hi].copy_(table_t[lo:hi], non_blocking=True)
            self._shown[lo:hi] = table[lo:hi]


class DecodeGraphs:
    def __init__(
        self,
        model: Model,
        pool: BlockPool,
        device: torch.device,
        max_batch: int,
        max_context: int,
        last: LastTokens,
    ) -> None:
        self.model, self.pool, self.device, self.last = model, pool, device, last
        self.sizes = [s for s in SIZES if s <= max_batch] or [1]
        assert self.sizes[-1] <= last.none, "a replay writes its padded rows' tokens too"
        dev = device
        n = self.sizes[-1]
        self.width = pool.blocks_for(max_context)
        self.ints = torch.zeros(11, n, dtype=torch.int64, device=dev)
        self.floats = torch.ones(2, n, dtype=torch.float32, device=dev)  # temperature, top_p
        self.tables = _Tables(n, self.width, dev)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=dev)
        # an encoder-decoder's cross blocks (a prompt is at most max_context tokens) and prompt lengths
        self.cross = _Tables(n, self.width, dev) if getattr(model, "encoder_decoder", False) else None
        self.cross_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.query_start = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[tuple[int, str], torch.cuda.CUDAGraph] = {}
        self.out: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._mempool = None
        # pinned host copies of the inputs, two sets taken in turn: the set a step fills was last copied two
        # steps ago, and the host has waited for that step's tokens since, so its copy is done
        self._staging = [
            (
                torch.zeros(11, n, dtype=torch.int64, pin_memory=True),
                torch.ones(2, n, dtype=torch.float32, pin_memory=True),
            )
            for _ in range(2)
        ]
        self._turn = 0

    def _step(self, b: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.ints[:, :b]
        self.context_lens[:b].copy_(i[CTX])
        starts = self.query_start[: b + 1]
        attn = AttnBatch(i[BLOCK], i[OFFSET], self.tables.device[:b], self.context_lens[:b], starts)
        ids = i[IDS] + self.last.ids[i[SRC]]
        if self.cross is None:
            hidden = self.model.forward(ids, i[POS], i[ROWS], attn, self.pool.kv)
            logits = self.model.head(hidden, i[ROWS])
        else:  # the decoder's step: one token per sequence, so no expert capacity binds
            self.cross_lens[:b].copy_(i[CROSS])
            cross = AttnBatch(i[BLOCK], i[OFFSET], self.cross.device[:b], self.cross_lens[:b], starts)
            logits = self.model.decode_paged(ids, i[ROWS], i[ROWS], attn, cross, self.pool.kv, capped=False)
        params = SamplingBatch(self.floats[0, :b], self.floats[1, :b], i[TOP_K], i[SEED], i[STEP])
        chosen, logprobs = sample(logits, params, mode)
        self.last.ids[:b].copy_(chosen)
        return chosen, logprobs

    @torch.inference_mode()
    def capture(self) -> None:
        self._pad(0, self.sizes[-1])
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for b in reversed(self.sizes):
                for mode in MODES:
                    for _ in range(2):  # compile and tune outside the capture
                        self._step(b, mode)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self._mempool, stream=stream):
                        self.out[b, mode] = self._step(b, mode)
                    self._mempool = graph.pool()
                    self.graphs[b, mode] = graph
        torch.cuda.current_stream(self.device).wait_stream(stream)

    def _pad(self, start: int, end: int) -> None:
        if end <= start:
            return
        self.ints[:, start:end] = 0
        self.ints[SRC, start:end] = self.last.none
        self.ints[BLOCK, start:end] = self.pool.scratch_block
        self.ints[CTX, start:end] = 1
        self.ints[CROSS, start:end] = 1
        self.floats[:, start:end] = 1.0
        for tables in (self.tables, self.cross):
            if tables is not None:
                tables.pad(start, end, self.pool.scratch_block)

    def fits(self, n: int) -> bool:
        return n <= self.sizes[-1]

    @torch.inference_mode()
    def run(
        self,
        ids: list[int],
        src: list[int],
        positions: list[int],
        rows: list[int],
        tables: list[list[int]],
        sampling: tuple[list, list, list, list, list],
        cross: tuple[list[list[int]], list[int]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode token per sequence -> (chosen token ids [n], their logprobs [n]); src: see LastTokens;
        cross: an encoder-decoder's cross blocks and prompt length of each sequence."""
        n = len(ids)
        b = next(s for s in self.sizes if s >= n)
        bs = self.pool.block_size
        temperature, top_p, top_k, seeds, steps = sampling
        turn, self._turn = self._turn, self._turn ^ 1
        ints_t, floats_t = self._staging[turn]
        ints, floats = ints_t.numpy(), floats_t.numpy()
        for row, values in ((IDS, ids), (SRC, src), (POS, positions), (ROWS, rows), (TOP_K, top_k)):
            ints[row, :n] = values
        ints[SEED, :n], ints[STEP, :n] = seeds, steps
        pos = ints[POS, :n]
        ints[BLOCK, :n] = [t[p // bs] for t, p in zip(tables, positions, strict=True)]
        np.remainder(pos, bs, out=ints[OFFSET, :n])
        np.add(pos, 1, out=ints[CTX, :n])
        floats[0, :n], floats[1, :n] = temperature, top_p
        if cross is not None:
            ints[CROSS, :n] = cross[1]
        # whole buffers (contiguous) from pinned memory: queued behind the step in flight, not waited for
        self.ints.copy_(ints_t, non_blocking=True)
        self.floats.copy_(floats_t, non_blocking=True)
        self.tables.write(turn, tables)
        if cross is not None:
            self.cross.write(turn, cross[0])
        self._pad(n, b)
        mode = mode_for(temperature, top_p, top_k)
        self.graphs[b, mode].replay()
        chosen, logprobs = self.out[b, mode]
        return chosen[:n], logprobs[:n]
