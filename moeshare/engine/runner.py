"""One step of one instance on the device: the scheduled batch's inputs, the forward (a captured CUDA graph
when every sequence decodes one token), the LM head and sampling -> chosen tokens and their logprobs."""

from __future__ import annotations

import torch

from moeshare.engine.attention import AttnBatch
from moeshare.engine.graphs import DecodeGraphs
from moeshare.engine.models import Model
from moeshare.engine.sampling import SamplingBatch, mode_for, sample
from moeshare.engine.scheduler import Scheduled
from moeshare.memory.blocks import BlockPool


class Runner:
    def __init__(
        self, model: Model, pool: BlockPool, device: torch.device, graphs: DecodeGraphs | None = None
    ) -> None:
        self.model, self.pool, self.device, self.graphs = model, pool, device, graphs

    def _longs(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    @torch.inference_mode()
    def run(self, batch: list[Scheduled]) -> tuple[list[int], list[float]]:
        """The next token of every scheduled sequence, and its logprob."""
        ids, positions, rows, last = [], [], [], []
        for s in batch:
            ids += s.seq.token_ids[s.start : s.start + s.count]
            positions += range(s.start, s.start + s.count)
            rows += [s.row] * s.count
            last.append(len(ids) - 1)
        params = [s.seq.params for s in batch]
        temperature = [p.temperature for p in params]
        top_p = [p.top_p for p in params]
        top_k = [p.top_k for p in params]
        seeds = [p.seed for p in params]
        steps = [len(s.seq.output_ids) for s in batch]
        if self.graphs is not None and len(ids) == len(batch) and self.graphs.fits(len(batch)):
            tables = [s.seq.block_table for s in batch]
            sampling = (temperature, top_p, top_k, seeds, steps)
            chosen, logprobs = self.graphs.run(ids, positions, rows, tables, sampling)
            return chosen.tolist(), logprobs.tolist()
        attn = AttnBatch.build(
            [s.seq.block_table for s in batch],
            [s.start for s in batch],
            [s.count for s in batch],
            self.pool.block_size,
            self.device,
        )
        row_t, last_t = self._longs(rows), self._longs(last)
        hidden = self.model.forward(self._longs(ids), self._longs(positions), row_t, attn, self.pool.kv)
        logits = self.model.logits(hidden[last_t], row_t[last_t])  # [B, V]
        dev = self.device
        sb = SamplingBatch(
            temperature=torch.tensor(temperature, device=dev),
            top_p=torch.tensor(top_p, device=dev),
            top_k=torch.tensor(top_k, device=dev),
            seeds=self._longs(seeds),
            steps=self._longs(steps),
        )
        chosen, logprobs = sample(logits, sb, mode_for(temperature, top_p, top_k))
        return chosen.tolist(), logprobs.tolist()

    @torch.inference_mode()
    def prefill_logits(self, row: int, ids: list[int]) -> torch.Tensor:
        """Teacher-forced next-token logits at every position of `ids` [T, V], float32, outside any batch:
        blocks borrowed from the pool and returned."""
        blocks = self.pool.allocate(self.pool.blocks_for(len(ids)))
        try:
            attn = AttnBatch.build([blocks], [0], [len(ids)], self.pool.block_size, self.device)
            t = self._longs(ids)
            rows = torch.full_like(t, row)
            hidden = self.model.forward(
                t, torch.arange(len(ids), device=self.device), rows, attn, self.pool.kv
            )
            return self.model.logits(hidden, rows)
        finally:
            self.pool.free(blocks)
