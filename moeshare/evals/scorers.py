"""What scores a model: our engine (Mixtral, dense), our Switch forward (engine/models/switch.py, which the engine
does not serve yet), or transformers (the check). All give teacher-forced logits and greedy continuations."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from moeshare.checkpoint.hf import load_model
from moeshare.engine.api import Submit
from moeshare.engine.attention import AttnBatch
from moeshare.engine.engine import Engine
from moeshare.engine.models.switch import MultiVariantSwitch
from moeshare.engine.request import FinishReason, SamplingParams
from moeshare.errors import MoeshareError

BATCH = 32


class Scorer(Protocol):
    name: str

    def logits(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[R, L] inputs (and [R, L'] labels for encoder-decoders) -> [R, L', V] float32 logits whose
        position t predicts labels[:, t]."""
        ...

    def greedy(self, prompts: torch.Tensor, n: int) -> list[list[int]]:
        """Greedy continuations of each prompt [P, Lp]."""
        ...


class EngineScorer:
    """One model (a variant of a store, or a checkpoint) that an Engine serves."""

    name = "engine"

    def __init__(self, engine: Engine, model: str) -> None:
        self.engine, self.model = engine, model

    def logits(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.engine.teacher_forced(self.model, row.tolist()).cpu() for row in inputs])

    def greedy(self, prompts: torch.Tensor, n: int) -> list[list[int]]:
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        handles = [self.engine.submit(Submit(self.model, p.tolist(), params)) for p in prompts]
        tokens: dict[int, list[int]] = {h: [] for h in handles}
        left = set(handles)
        while left:
            for ev in self.engine.step():
                if ev.seq_id not in tokens:
                    continue
                if ev.finish_reason is FinishReason.ERROR:
                    raise MoeshareError(ev.error)
                if ev.token_id >= 0:
                    tokens[ev.seq_id].append(ev.token_id)
                if ev.finished:
                    left.discard(ev.seq_id)
        return [tokens[h] for h in handles]


class SwitchScorer:
    """One variant (row) of a Switch store or checkpoint through our forward, float32, batched over paged KV
    blocks (encode_paged, decode_paged). Greedy output is what transformers' batched generate gives: each prompt
    until its eos (kept) or n tokens, the shorter ones padded to the longest with the pad token."""

    name = "engine"
    block = 16

    def __init__(self, model: MultiVariantSwitch, row: int, config: dict) -> None:
        self.model, self.row = model, row
        self.start = config.get("decoder_start_token_id") or 0
        self.eos, self.pad = config.get("eos_token_id", 1), config.get("pad_token_id") or 0

    def _encode(
        self, rows_ids: list[list[int]], decoder_lengths: list[int]
    ) -> tuple[torch.Tensor, list[list[int]], list[list[int]], torch.Tensor]:
        """Prompts through the encoder -> (the KV pool, each prompt's cross blocks in it, each sequence's own
        blocks for `decoder_lengths` decoder tokens, the row of each sequence)."""
        m, d = self.model, self.model.dims
        lengths = [len(x) for x in rows_ids]
        kv_enc, enc_tables = m.kv_blocks(lengths, self.block, d.encoder_layers)
        kv, tables = m.kv_blocks(lengths + decoder_lengths, self.block, d.decoder_layers)
        cross, own = tables[: len(lengths)], tables[len(lengths) :]
        attn = AttnBatch.build(enc_tables, [0] * len(lengths), lengths, self.block, m.device)
        store = AttnBatch.build(cross, [0] * len(lengths), lengths, self.block, m.device)
        ids = torch.tensor([t for x in rows_ids for t in x], device=m.device)
        seq_rows = torch.full((len(rows_ids),), self.row, device=m.device)
        m.encode_paged(ids, torch.full_like(ids, self.row), seq_rows, attn, kv_enc, store, kv)
        return kv, cross, own, seq_rows

    def _decode(self, kv, cross, seq_rows, own, starts, tokens: list[list[int]], lengths) -> torch.Tensor:
        """New decoder tokens of every sequence (tokens[b], after starts[b] cached) -> logits [sum, V]."""
        m, counts = self.model, [len(t) for t in tokens]
        attn = AttnBatch.build(own, starts, counts, self.block, m.device)
        over = AttnBatch.build(cross, [n - c for n, c in zip(lengths, counts, strict=True)], counts, self.block, m.device)  # fmt: skip
        ids = torch.tensor([t for x in tokens for t in x], device=m.device)
        rows = torch.full_like(ids, self.row)
        return m.decode_paged(ids, rows, seq_rows, attn, over, kv)

    @torch.inference_mode()
    def logits(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = []
        for lo in range(0, len(inputs), BATCH):
            xs, ys = inputs[lo : lo + BATCH].tolist(), labels[lo : lo + BATCH].tolist()
            decoder = [
                [self.start] + [t if t >= 0 else self.pad for t in y[:-1]] for y in ys
            ]  # shifted right
            kv, cross, own, seq_rows = self._encode(xs, [len(t) for t in decoder])
            lengths = [len(x) for x in xs]
            logits = self._decode(kv, cross, seq_rows, own, [0] * len(xs), decoder, lengths)
            out.append(logits.view(len(xs), len(ys[0]), -1))
        return torch.cat(out)

    @torch.inference_mode()
    def greedy(self, prompts: torch.Tensor, n: int) -> list[list[int]]:
        xs = prompts.tolist()
        kv, cross, own, seq_rows = self._encode(xs, [n + 1] * len(xs))
        lengths, outs = [len(x) for x in xs], [[self.start] for _ in xs]
        for step in range(n):
            logits = self._decode(
                kv, cross, seq_rows, own, [step] * len(xs), [[o[-1]] for o in outs], lengths
            )
            for o, nxt in zip(outs, logits.argmax(-1).tolist(), strict=True):
                o.append(nxt)
            if all(self.eos in o[1:] for o in outs):
                break
        cut = [o[1 : o.index(self.eos, 1) + 1] if self.eos in o[1:] else o[1:] for o in outs]
        longest = max((len(c) for c in cut), default=0)
        return [c + [self.pad] * (longest - len(c)) for c in cut]


class TransformersScorer:
    """A HuggingFace checkpoint loaded with transformers, float32, on `device`."""

    name = "transformers"

    def __init__(self, path: Path, arch: str, device: str = "cpu") -> None:
        self.model = load_model(path, arch, device)
        self.seq2seq = arch != "mixtral"
        self.device = torch.device(device)

    @torch.inference_mode()
    def logits(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, len(inputs), BATCH):
            x = inputs[start : start + BATCH].to(self.device)
            if self.seq2seq:
                y = labels[start : start + BATCH].to(self.device)
                out.append(self.model(input_ids=x, labels=y).logits.float().cpu())
            else:
                out.append(self.model(input_ids=x).logits.float().cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def greedy(self, prompts: torch.Tensor, n: int) -> list[list[int]]:
        x = prompts.to(self.device)
        if self.seq2seq:  # a reconstruction ends at its eos
            out = self.model.generate(input_ids=x, max_new_tokens=n, do_sample=False)[:, 1:]  # drop the start
        else:  # exactly n tokens, past any eos, as the engine's ignore_eos gives
            out = x
            for _ in range(n):
                nxt = self.model(input_ids=out).logits[:, -1].argmax(dim=-1, keepdim=True)  # [P, 1]
                out = torch.cat([out, nxt], dim=1)
            out = out[:, x.shape[1] :]
        return [row.tolist() for row in out.cpu()]
