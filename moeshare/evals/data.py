"""Held-out text turned into fixed model inputs: windows to score and prompts to continue."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moeshare.errors import MoeshareError
from moeshare.zoo.evaluate import EVAL_SEED, IGNORE
from moeshare.zoo.spans import corrupt, span_counts


@dataclass(frozen=True)
class Specials:
    """The special tokens of the scored checkpoint's own tokenizer, as scoring needs them."""

    eos: int | None
    sentinels: tuple[int, ...]  # <extra_id_0>, <extra_id_1>, ...: what span denoising drops spans for
    ids: frozenset[int]  # every special id (not text)
    vocab: int  # ids at or above are not the tokenizer's


def specials_of(tokenizer) -> Specials:
    vocab = tokenizer.get_vocab()
    sentinels = []
    while (tok := f"<extra_id_{len(sentinels)}>") in vocab:
        sentinels.append(vocab[tok])
    ids = frozenset(tokenizer.all_special_ids) | frozenset(sentinels)
    return Specials(tokenizer.eos_token_id, tuple(sentinels), ids, len(tokenizer))


NO_SPECIALS = Specials(None, (), frozenset(), 0)


@dataclass(frozen=True)
class EvalSet:
    """One domain's held-out text, ready for one architecture."""

    domain: str
    inputs: torch.Tensor  # [R, L] causal: <s> + tokens; denoising: span-corrupted encoder ids
    labels: torch.Tensor  # [R, L'] causal: the next token at each input position; denoising: decoder labels
    prompts: torch.Tensor  # [P, Lp] what greedy continuations start from
    prompt_rows: torch.Tensor  # [P] the window each prompt comes from
    tokens: int  # scored target tokens
    specials: Specials = NO_SPECIALS  # of the tokenizer that made the set


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
    scored = int((labels != IGNORE).sum())
    return EvalSet(domain, inputs, labels, inputs[pick, : seq_len // 2], pick, scored, specials_of(tokenizer))


def denoising_set(domain: str, text: str, tokenizer, seq_len: int, max_tokens: int, prompts: int) -> EvalSet:
    """Seeded span corruption of consecutive windows (the zoo's objective), with the tokenizer's own sentinels
    and end of sequence; prompts are corrupted windows."""
    specials = specials_of(tokenizer)
    _, spans = span_counts(seq_len)
    if len(specials.sentinels) < spans or specials.eos is None:
        raise MoeshareError(
            f"span-denoising evaluation needs {spans} sentinels <extra_id_0>..<extra_id_{spans - 1}> and an "
            f"end-of-sequence token in the variants' tokenizer; it has {len(specials.sentinels)} sentinels"
            f"{'' if specials.eos is not None else ' and no end-of-sequence token'}"
        )
    ids = _encode(tokenizer, text, max_tokens)
    if len(ids) < seq_len:
        raise MoeshareError(f"held-out text of {domain!r} is {len(ids)} tokens; it needs at least {seq_len}")
    rows = len(ids) // seq_len
    windows = ids[: rows * seq_len].view(rows, seq_len)
    gen = torch.Generator().manual_seed(EVAL_SEED)
    pairs = [corrupt(row, gen, specials.sentinels, specials.eos) for row in windows]
    inputs = torch.tensor([p[0] for p in pairs], dtype=torch.long)  # [R, L - noise + spans + 1]
    labels = torch.tensor([p[1] for p in pairs], dtype=torch.long)  # [R, noise + spans + 1]
    pick = torch.linspace(0, rows - 1, min(prompts, rows)).round().long().unique()
    return EvalSet(domain, inputs, labels, inputs[pick], pick, labels.numel(), specials)
