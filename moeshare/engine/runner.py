"""One step of one instance on the device: the scheduled batch's inputs, the forward (a captured CUDA graph
when every sequence decodes one token), the LM head and sampling -> chosen tokens and their logprobs.

`launch` only queues the step: its sampled tokens come back to pinned host memory behind an event, and
`Launched.read` waits for them. A decode whose input is the token the previous launch sampled reads it on
the device (LastTokens), so the next step can be queued before the host has seen the last one's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

from moeshare.engine.attention import AttentionCalls, AttnBatch
from moeshare.engine.graphs import DecodeGraphs, LastTokens
from moeshare.engine.models import Model
from moeshare.engine.sampling import MODES, SamplingBatch, mode_for, sample
from moeshare.engine.scheduler import Scheduled
from moeshare.memory.blocks import BlockPool


@dataclass
class Launched:
    """A step queued on the device: its batch and where its tokens come back."""

    batch: list[Scheduled]
    chosen: torch.Tensor  # [n] int64 on the host (pinned on CUDA), filled when `done` fires
    logprobs: torch.Tensor  # [n] float32 likewise
    done: torch.cuda.Event | None  # None on CPU: already there
    row_of: dict[int, int]  # seq_id -> its row in the batch (where the next step finds its token)
    queued_behind: bool = (
        False  # queued at a step right after one with work (its time counts; Instance._count)
    )

    def ready(self) -> bool:
        """Whether its tokens are back (read would not wait)."""
        return self.done is None or self.done.query()

    def read(self) -> tuple[list[int], list[float]]:
        if self.done is not None:
            self.done.synchronize()
        return self.chosen.tolist(), self.logprobs.tolist()


class Runner:
    def __init__(
        self,
        model: Model,
        pool: BlockPool,
        device: torch.device,
        last: LastTokens,
        graphs: DecodeGraphs | None = None,
    ) -> None:
        self.model, self.pool, self.device, self.last, self.graphs = model, pool, device, last, graphs

    def _to_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        host = torch.tensor(values, dtype=dtype)
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)  # queued, not waited for

    def _longs(self, values: list[int]) -> torch.Tensor:
        return self._to_device(values, torch.int64)

    @torch.inference_mode()
    def launch(self, batch: list[Scheduled], prev: Launched | None) -> Launched:
        """Queue the step that samples the next token of every scheduled sequence. A decode whose input token
        is still pending reads it from `prev`, the step launched just before."""
        if getattr(self.model, "encoder_decoder", False):
            return self._launch_encoder_decoder(batch, prev)
        ids, src, last = self._inputs(batch, prev)
        if len(ids) == len(batch):  # the common step: one token each
            positions, rows = [s.start for s in batch], [s.row for s in batch]
        else:
            positions = [p for s in batch for p in range(s.start, s.start + s.count)]
            rows = [s.row for s in batch for _ in range(s.count)]
        knobs = self._knobs(batch)
        if self.graphs is not None and len(ids) == len(batch) and self.graphs.fits(len(batch)):
            tables = [s.seq.block_table for s in batch]
            chosen, logprobs = self.graphs.run(ids, src, positions, rows, tables, knobs)
            return self._back(batch, chosen, logprobs)
        attn = AttnBatch.build(
            [s.seq.block_table for s in batch],
            [s.start for s in batch],
            [s.count for s in batch],
            self.pool.block_size,
            self.device,
        )
        ids_t, row_t, last_t = self._ids(ids, src), self._longs(rows), self._longs(last)
        hidden = self.model.forward(ids_t, self._longs(positions), row_t, attn, self.pool.kv)
        logits = self.model.head(hidden[last_t], row_t[last_t])  # [B, V] in the model dtype
        return self._sample(batch, logits, knobs)

    def _inputs(
        self, batch: list[Scheduled], prev: Launched | None
    ) -> tuple[list[int], list[int], list[int]]:
        """The step's new tokens (0 where it is the one `prev` sampled, read on the device from src, see
        LastTokens), and the index of each sequence's last."""
        ids, src, last = [], [], []
        none = self.last.none
        for s in batch:
            seq = s.seq
            if s.start >= len(seq):
                assert prev is not None and s.count == 1, "a pending token comes from the step before"
                ids.append(0)
                src.append(prev.row_of[seq.seq_id])
            else:
                ids += seq.tokens(s.start, s.count)
                src += [none] * s.count
            last.append(len(ids) - 1)
        return ids, src, last

    def _ids(self, ids: list[int], src: list[int]) -> torch.Tensor:
        ids_t = self._longs(ids)
        if any(i != self.last.none for i in src):
            ids_t += self.last.ids[self._longs(src)]
        return ids_t

    @staticmethod
    def _knobs(batch: list[Scheduled]) -> tuple[list, list, list, list, list]:
        """Each sequence's temperature, top_p, top_k, seed, and the index of the token it draws now."""
        params = [s.seq.params for s in batch]
        steps = [len(s.seq.output_ids) + s.seq.pending for s in batch]
        return (
            [p.temperature for p in params],
            [p.top_p for p in params],
            [p.top_k for p in params],
            [p.seed for p in params],
            steps,
        )

    def _sample(self, batch: list[Scheduled], logits: torch.Tensor, knobs: tuple) -> Launched:
        temperature, top_p, top_k, seeds, steps = knobs
        sb = SamplingBatch(
            temperature=self._to_device(temperature, torch.float32),
            top_p=self._to_device(top_p, torch.float32),
            top_k=self._longs(top_k),
            seeds=self._longs(seeds),
            steps=self._longs(steps),
        )
        chosen, logprobs = sample(logits, sb, mode_for(temperature, top_p, top_k))
        self.last.ids[: len(batch)].copy_(chosen)
        return self._back(batch, chosen, logprobs)

    def _launch_encoder_decoder(self, batch: list[Scheduled], prev: Launched | None) -> Launched:
        """A step of an encoder-decoder model (Switch): the prompts starting now through the encoder (their
        cross K/V into their cross blocks), then every sequence's new decoder tokens: a captured graph when each
        has one (the common step)."""
        model, bs, dev = self.model, self.pool.block_size, self.device
        fresh = [s for s in batch if s.start == 0 and s.seq.encoder_ids]
        if fresh:
            lengths = [len(s.seq.encoder_ids) for s in fresh]
            kv_enc, tables = model.kv_blocks(
                lengths, bs, model.dims.encoder_layers
            )  # the encoder's own K/V: this step only
            attn = AttnBatch.build(tables, [0] * len(fresh), lengths, bs, dev)
            store = AttnBatch.build([s.seq.cross_table for s in fresh], [0] * len(fresh), lengths, bs, dev)
            ids = self._longs([t for s in fresh for t in s.seq.encoder_ids])
            rows = self._longs([s.row for s in fresh for _ in s.seq.encoder_ids])
            model.encode_paged(
                ids, rows, self._longs([s.row for s in fresh]), attn, kv_enc, store, self.pool.kv
            )
        ids, src, last = self._inputs(batch, prev)
        prompts = [len(s.seq.encoder_ids) for s in batch]
        crosses = [s.seq.cross_table for s in batch]
        graph = self.graphs is not None and len(ids) == len(batch) and self.graphs.fits(len(batch))
        if graph and max(map(len, crosses)) <= self.graphs.width:  # a prompt within the captured context
            positions, rows = [s.start for s in batch], [s.row for s in batch]
            tables = [s.seq.block_table for s in batch]
            knobs = self._knobs(batch)
            chosen, logprobs = self.graphs.run(ids, src, positions, rows, tables, knobs, (crosses, prompts))
            return self._back(batch, chosen, logprobs)
        counts = [s.count for s in batch]
        attn = AttnBatch.build([s.seq.block_table for s in batch], [s.start for s in batch], counts, bs, dev)
        cross = AttnBatch.over(crosses, prompts, counts, bs, dev)
        rows = self._longs([s.row for s in batch for _ in range(s.count)])
        seq_rows = self._longs([s.row for s in batch])
        ids_t, last_t = self._ids(ids, src), self._longs(last)
        logits = model.decode_paged(ids_t, rows, seq_rows, attn, cross, self.pool.kv, last_t, capped=False)
        return self._sample(batch, logits, self._knobs(batch))

    def _back(self, batch: list[Scheduled], chosen: torch.Tensor, logprobs: torch.Tensor) -> Launched:
        """Queue the copy of the step's tokens to the host."""
        row_of = {s.seq.seq_id: i for i, s in enumerate(batch)}
        if self.device.type != "cuda":
            return Launched(batch, chosen, logprobs, None, row_of)
        host_c = torch.empty(chosen.shape, dtype=chosen.dtype, pin_memory=True)
        host_l = torch.empty(logprobs.shape, dtype=logprobs.dtype, pin_memory=True)
        host_c.copy_(chosen, non_blocking=True)
        host_l.copy_(logprobs, non_blocking=True)
        done = torch.cuda.Event(enable_timing=True)  # its time counts against its floor (stepcost.py)
        done.record()
        return Launched(batch, host_c, host_l, done, row_of)

    @torch.inference_mode()
    def warm_up(self, max_seqs: int, max_tokens: int, context: int, row: int = 0) -> int:
        """Run the step that is not a captured graph (prompt chunks beside decodes) once at every shape that
        makes Triton compile a kernel again, so it compiles now and not in the middle of traffic, where each
        compile stalls every running request for up to a second: a sequence count in each bucket the
        attention kernel specializes on, token counts across the MoE kernels' tile choices (odd and even),
        decodes over short and long contexts; then each kind of attention call those made, at every tile,
        BLOCK_S bucket and number of key splits the kernel may pick for it. Every row reads and writes the
        pool's scratch block only. Returns the steps run."""
        calls = AttentionCalls()
        with calls.record():
            if getattr(self.model, "encoder_decoder", False):
                steps = self._warm_up_encoder(max_seqs, max_tokens, context)
            else:
                steps = self._warm_up_steps(max_seqs, max_tokens, context, row)
        steps += calls.warm_up(max_seqs, self.pool.scratch_block)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return steps

    def _warm_up_steps(self, max_seqs: int, max_tokens: int, context: int, row: int) -> int:
        scratch, size = self.pool.scratch_block, self.pool.block_size
        long = max(1, min(context, 4096) - 1)
        steps = 0
        for n in [1] + [b + 1 for b in (16, 32, 64, 128, 256) if b < max_seqs]:
            for t in sorted(
                {n, n + 1, 2 * n + 1, *(n + x for x in (63, 191, 383, 767)), max_tokens - 1, max_tokens}
            ):
                chunk = t - (n - 1)
                if chunk < 1 or t > max_tokens or chunk > context:
                    continue
                for past in {1, long} if n > 1 else {1}:
                    starts = [0] + [past - 1] * (n - 1)
                    counts = [chunk] + [1] * (n - 1)
                    tables = [
                        [scratch] * self.pool.blocks_for(s + c) for s, c in zip(starts, counts, strict=True)
                    ]
                    attn = AttnBatch.build(tables, starts, counts, size, self.device)
                    positions = [p for s, c in zip(starts, counts, strict=True) for p in range(s, s + c)]
                    ids = self._longs([0] * t)
                    rows = self._longs([row] * t)
                    hidden = self.model.forward(ids, self._longs(positions), rows, attn, self.pool.kv)
                    last = self._longs([end - 1 for end in accumulate(counts)])
                    logits = self.model.head(hidden[last], rows[last])
                    ones = self._to_device([1.0] * n, torch.float32)
                    zeros = self._longs([0] * n)
                    for mode in MODES:
                        sample(logits, SamplingBatch(ones, ones, zeros, zeros, zeros), mode)
                    steps += 1
        return steps

    def _warm_up_encoder(self, max_seqs: int, max_tokens: int, context: int) -> int:
        """An encoder-decoder's warm-up: prompts of the lengths that tile the MoE kernels differently through
        the encoder (their cross K/V into the scratch block), and the eager decoder step beside them."""
        scratch, size, model = self.pool.scratch_block, self.pool.block_size, self.model
        steps = 0
        for n in [1] + [b + 1 for b in (16, 32, 64, 128) if b < max_seqs]:
            for length in sorted({1, 2, 63, 64, 191, 383, context - 1}):
                if not 0 < length < context or n * length > max_tokens:
                    continue
                lengths = [length] * n
                kv_enc, tables = model.kv_blocks(lengths, size, model.dims.encoder_layers)
                attn = AttnBatch.build(tables, [0] * n, lengths, size, self.device)
                cross_tables = [[scratch] * self.pool.blocks_for(length)] * n
                store = AttnBatch.build(cross_tables, [0] * n, lengths, size, self.device)
                rows, seq_rows = self._longs([0] * (n * length)), self._longs([0] * n)
                model.encode_paged(rows, rows, seq_rows, attn, kv_enc, store, self.pool.kv)
                own = AttnBatch.build([[scratch]] * n, [0] * n, [1] * n, size, self.device)
                cross = AttnBatch.over(cross_tables, lengths, [1] * n, size, self.device)
                model.decode_paged(seq_rows, seq_rows, seq_rows, own, cross, self.pool.kv, capped=False)
                steps += 1
        return steps

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
