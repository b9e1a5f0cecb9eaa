"""Decode steps captured as CUDA graphs, one per padded batch size: forward, LM head and sampling in one replay.

Shapes depend only on the number of tokens, so one graph per size serves any mix of variants; a step with n
sequences replays the smallest captured size >= n, padding rows pointing at the pool's scratch block. Each size
has a graph per sampling mode (greedy, plain, filtered), so a batch that needs no top-k / top-p cut never sorts
the vocabulary. A step's input ids are the host's plus, for decodes whose token the previous step sampled,
that token read on the device (LastTokens), and each replay leaves its own tokens there for the next.
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
IDS, SRC, POS, ROWS, BLOCK, OFFSET, CTX, TOP_K, SEED, STEP = range(10)


class LastTokens:
    """The token each row of an instance's last step sampled, on the device: the next step's input ids are
    host_ids + ids[src], with src = `none` (an entry that stays 0) where the host knows the id."""

    def __init__(self, rows: int, device: torch.device) -> None:
        self.ids = torch.zeros(rows + 1, dtype=torch.int64, device=device)  # [rows + 1]
        self.none = rows


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
        self.ints = torch.zeros(10, n, dtype=torch.int64, device=dev)
        self.floats = torch.ones(2, n, dtype=torch.float32, device=dev)  # temperature, top_p
        self.block_tables = torch.zeros(n, self.width, dtype=torch.int32, device=dev)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.query_start = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[tuple[int, str], torch.cuda.CUDAGraph] = {}
        self.out: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._mempool = None

    def _step(self, b: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.ints[:, :b]
        self.context_lens[:b].copy_(i[CTX])
        attn = AttnBatch(
            i[BLOCK], i[OFFSET], self.block_tables[:b], self.context_lens[:b], self.query_start[: b + 1]
        )
        ids = i[IDS] + self.last.ids[i[SRC]]
        hidden = self.model.forward(ids, i[POS], i[ROWS], attn, self.pool.kv)
        logits = self.model.logits(hidden, i[ROWS])
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
        self.floats[:, start:end] = 1.0
        self.block_tables[start:end] = self.pool.scratch_block

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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode token per sequence -> (chosen token ids [n], their logprobs [n]); src: see LastTokens."""
        n = len(ids)
        b = next(s for s in self.sizes if s >= n)
        bs = self.pool.block_size
        temperature, top_p, top_k, seeds, steps = sampling
        pos = np.asarray(positions, dtype=np.int64)
        blocks = np.array([t[p // bs] for t, p in zip(tables, positions, strict=True)], dtype=np.int64)
        packed = np.stack(
            [
                np.asarray(ids),
                np.asarray(src),
                pos,
                np.asarray(rows),
                blocks,
                pos % bs,
                pos + 1,
                np.asarray(top_k),
                np.asarray(seeds),
                np.asarray(steps),
            ]
        ).astype(np.int64)
        table = np.full((n, self.width), self.pool.scratch_block, dtype=np.int32)
        for i, t in enumerate(tables):
            table[i, : len(t)] = t
        floats = np.array([temperature, top_p], dtype=np.float32)
        for dst, host in (
            (self.ints[:, :n], packed),
            (self.floats[:, :n], floats),
            (self.block_tables[:n], table),
        ):
            # from pinned memory, so the copy is queued behind the step in flight instead of waiting for it
            dst.copy_(torch.from_numpy(host).pin_memory(), non_blocking=True)
        self._pad(n, b)
        mode = mode_for(temperature, top_p, top_k)
        self.graphs[b, mode].replay()
        chosen, logprobs = self.out[b, mode]
        return chosen[:n], logprobs[:n]
