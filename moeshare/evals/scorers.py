"""What scores a model: our engine (Mixtral, dense), our Switch forward (engine/models/switch.py, which the engine
does not serve yet), or transformers (the check). All give teacher-forced logits and greedy continuations."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from moeshare.checkpoint.hf import load_model
from moeshare.engine.api import Submit
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
    """One variant (row) of a Switch store or checkpoint through our reference forward, float32. Greedy output is
    what transformers' batched generate gives: each prompt until its eos (kept) or n tokens, the shorter ones
    padded to the longest with the pad token."""

    name = "engine"

    def __init__(self, model: MultiVariantSwitch, row: int, config: dict) -> None:
        self.model, self.row = model, row
        self.start = config.get("decoder_start_token_id") or 0
        self.eos, self.pad = config.get("eos_token_id", 1), config.get("pad_token_id") or 0

    @torch.inference_mode()
    def logits(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = []
        for x, y in zip(inputs.tolist(), labels.tolist(), strict=True):
            decoder = [self.start] + [t if t >= 0 else self.pad for t in y[:-1]]  # labels shifted right
            out.append(self.model.decode(self.model.encode(x, self.row), decoder, self.row))
        return torch.stack(out)

    @torch.inference_mode()
    def greedy(self, prompts: torch.Tensor, n: int) -> list[list[int]]:
        outs = []
        for x in prompts.tolist():
            encoded, ids = self.model.encode(x, self.row), [self.start]
            while len(ids) <= n and (len(ids) == 1 or ids[-1] != self.eos):
                ids.append(int(self.model.decode(encoded, ids, self.row)[-1].argmax()))
            outs.append(ids[1:])
        longest = max((len(o) for o in outs), default=0)
        return [o + [self.pad] * (longest - len(o)) for o in outs]


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
