"""Decode steps captured as CUDA graphs, one per padded batch size.

Shapes depend only on the number of tokens, so one graph per size serves any mix of variants; a step with n
sequences replays the smallest captured size >= n, padding rows pointing at the pool's scratch block.
"""

from __future__ import annotations

import torch

from moeshare.engine.attention import AttnBatch
from moeshare.engine.models.mixtral import MultiVariantMixtral
from moeshare.memory.pool import PagePool

SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)


class DecodeGraphs:
    def __init__(self, model: MultiVariantMixtral, pool: PagePool, max_batch: int, max_context: int) -> None:
        self.model, self.pool = model, pool
        self.sizes = [s for s in SIZES if s <= max_batch] or [1]
        dev = model.device
        n = self.sizes[-1]
        self.width = pool.blocks_for(max_context)
        z = lambda *shape, dtype=torch.int64: torch.zeros(*shape, dtype=dtype, device=dev)  # noqa: E731
        self.ids, self.positions, self.rows = z(n), z(n), z(n)
        self.block_of, self.offset_of = z(n), z(n)
        self.block_tables = z(n, self.width, dtype=torch.int32)
        self.context_lens = z(n, dtype=torch.int32)
        self.query_start = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.out: dict[int, torch.Tensor] = {}
        self._mempool = None

    def _attn(self, b: int) -> AttnBatch:
        return AttnBatch(
            self.block_of[:b],
            self.offset_of[:b],
            self.block_tables[:b],
            self.context_lens[:b],
            self.query_start[: b + 1],
        )

    def _forward(self, b: int) -> torch.Tensor:
        return self.model.forward(
            self.ids[:b], self.positions[:b], self.rows[:b], self._attn(b), self.pool.kv
        )

    @torch.inference_mode()
    def capture(self) -> None:
        self._pad(0, self.sizes[-1])
        stream = torch.cuda.Stream(self.model.device)
        stream.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(stream):
            for b in reversed(self.sizes):
                for _ in range(2):  # compile and autotune outside the capture
                    self._forward(b)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._mempool, stream=stream):
                    self.out[b] = self._forward(b)
                self._mempool = graph.pool()
                self.graphs[b] = graph
        torch.cuda.current_stream(self.model.device).wait_stream(stream)

    def _pad(self, start: int, end: int) -> None:
        if end <= start:
            return
        for t in (self.ids, self.positions, self.rows, self.offset_of):
            t[start:end] = 0
        self.block_of[start:end] = self.pool.scratch_block
        self.block_tables[start:end] = self.pool.scratch_block
        self.context_lens[start:end] = 1

    def fits(self, n: int) -> bool:
        return n <= self.sizes[-1]

    @torch.inference_mode()
    def run(
        self, ids: list[int], positions: list[int], rows: list[int], tables: list[list[int]]
    ) -> torch.Tensor:
        """One decode token per sequence -> final hidden states [n, H]."""
        n = len(ids)
        b = next(s for s in self.sizes if s >= n)
        bs = self.pool.block_size
        dev = self.model.device
        host = torch.tensor(
            [
                ids,
                positions,
                rows,
                [t[p // bs] for t, p in zip(tables, positions, strict=True)],
                [p % bs for p in positions],
                [p + 1 for p in positions],
            ],
            dtype=torch.int64,
        )
        host = host.to(dev, non_blocking=True)
        self.ids[:n], self.positions[:n], self.rows[:n] = host[0], host[1], host[2]
        self.block_of[:n], self.offset_of[:n], self.context_lens[:n] = (
            host[3],
            host[4],
            host[5].to(torch.int32),
        )
        padded = torch.full((n, self.width), self.pool.scratch_block, dtype=torch.int32)
        for i, t in enumerate(tables):
            padded[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        self.block_tables[:n] = padded.to(dev, non_blocking=True)
        self._pad(n, b)
        self.graphs[b].replay()
        return self.out[b][:n]
