"""Held-out text turned into fixed model inputs: windows to score and prompts to continue."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moeshare.errors import MoeshareError
from moeshare.zoo.evaluate import EVAL_SEED, IGNORE
from moeshare.zoo.spans import corrupt_batch
from moeshare.zoo.tokenizer import sentinel_id


@dataclass(frozen=True)
class EvalSet:
    """One domain's held-out text, ready for one architecture."""

    domain: str
    inputs: torch.Tensor  # [R, L] causal: <s> + tokens; denoising: span-corrupted encoder ids
    labels: torch.Tensor  # [R, L'] causal: the next token at each input position; denoising: decoder labels
    prompts: torch.Tensor  # [P, Lp] what greedy continuations start from
    prompt_rows: torch.Tensor  # [P] the window each prompt comes from
    tokens: int  # scored target tokens


def _encode(tokenizer, text: str, max_tokens: int) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    return torch.tensor(ids, dtype=torch.long)  # [N]


def causal_set(domain: str, text: str, tokenizer, seq_len: int, max_tokens: int, prompts: int) -> EvalSet:
    """Consecutive windows of seq_len - 1 tokens after <s>, as `moeshare.zoo.evaluate` scores them; the
    prompts are the first half of evenly spaced windows."""
    ids = _encode(tokenizer, text, max_tokens)
    width = seq_len - 1
    if len(ids) < width + 1:
        raise MoeshareError(f"held-out text of {domain!r} is {len(ids)} tokens; it needs at least {seq_len}")
    bos = tokenizer.bos_token_id
    if bos is None:
        raise MoeshareError(
            f"the tokenizer has no beginning-of-sequence token to start windows of {domain!r}"
        )
    rows = math.ceil(len(ids) / width)
    padded = torch.full((rows * width + 1,), tokenizer.pad_token_id or 0, dtype=torch.long)
    padded[: len(ids)] = ids
    body = padded[: rows * width].view(rows, width)
    inputs = torch.cat([torch.full((rows, 1), bos), body], dim=1)  # [R, seq_len]
    labels = torch.full((rows, seq_len), IGNORE, dtype=torch.long)  # position t predicts input t + 1
    labels[:, :-1] = body
    real = torch.arange(rows * width).view(rows, width) < len(ids)
    labels[:, :-1][~real] = IGNORE
    full = int(real.all(dim=1).sum())  # windows with no padding
    pick = torch.linspace(0, full - 1, min(prompts, full)).round().long().unique()
    return EvalSet(domain, inputs, labels, inputs[pick, : seq_len // 2], pick, int((labels != IGNORE).sum()))


def denoising_set(domain: str, text: str, tokenizer, seq_len: int, max_tokens: int, prompts: int) -> EvalSet:
    """Seeded span corruption of consecutive windows (the zoo's objective); prompts are corrupted windows."""
    if tokenizer.convert_tokens_to_ids("<extra_id_0>") != sentinel_id(0):
        raise MoeshareError(
            "span-denoising evaluation needs the T5 sentinels <extra_id_N> at the zoo tokenizer's ids; "
            "this tokenizer places them elsewhere"
        )
    ids = _encode(tokenizer, text, max_tokens)
    if len(ids) < seq_len:
        raise MoeshareError(f"held-out text of {domain!r} is {len(ids)} tokens; it needs at least {seq_len}")
    rows = len(ids) // seq_len
    windows = ids[: rows * seq_len].view(rows, seq_len)
    batch = corrupt_batch(windows, torch.Generator().manual_seed(EVAL_SEED))
    pick = torch.linspace(0, rows - 1, min(prompts, rows)).round().long().unique()
    return EvalSet(domain, batch.inputs, batch.labels, batch.inputs[pick], pick, batch.labels.numel())
