"""T5-style span corruption: the denoising objective the Switch models are trained and scored on."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeshare.zoo.tokenizer import EOS, NUM_SENTINELS, sentinel_id

NOISE_DENSITY = 0.15
MEAN_SPAN = 3.0


@dataclass(frozen=True)
class Denoising:
    inputs: torch.Tensor  # [B, Le] kept tokens, a sentinel per dropped span, eos
    labels: torch.Tensor  # [B, Ld] per span: its sentinel then its tokens; eos


def span_counts(length: int) -> tuple[int, int]:
    """(noise tokens, spans) for a window of `length` tokens; fixed per length, so batches need no padding."""
    noise = min(max(1, round(length * NOISE_DENSITY)), length - 1)
    spans = min(NUM_SENTINELS, max(1, round(noise / MEAN_SPAN)), length - noise)
    return noise, spans


def _partition(total: int, parts: int, gen: torch.Generator) -> list[int]:
    """`total` split into `parts` positive lengths at random cut points."""
    cuts = (torch.randperm(total - 1, generator=gen)[: parts - 1] + 1).sort().values.tolist()
    bounds = [0, *cuts, total]
    return [b - a for a, b in zip(bounds, bounds[1:], strict=False)]


def corrupt(
    window: torch.Tensor,
    gen: torch.Generator,
    sentinels: tuple[int, ...] | None = None,
    eos: int = EOS,
) -> tuple[list[int], list[int]]:
    """One window [L] → (encoder ids, decoder labels). Spans alternate kept, dropped, kept, ..., dropped.
    `sentinels` and `eos`: another tokenizer's ids (default: the zoo tokenizer's)."""
    sentinels = sentinels or tuple(sentinel_id(i) for i in range(NUM_SENTINELS))
    tokens = window.tolist()
    noise, spans = span_counts(len(tokens))
    noise_lengths = _partition(noise, spans, gen)
    kept_lengths = _partition(len(tokens) - noise, spans, gen)
    inputs: list[int] = []
    labels: list[int] = []
    pos = 0
    for i, (kept, dropped) in enumerate(zip(kept_lengths, noise_lengths, strict=True)):
        inputs += tokens[pos : pos + kept] + [sentinels[i]]
        pos += kept
        labels += [sentinels[i]] + tokens[pos : pos + dropped]
        pos += dropped
    return inputs + [eos], labels + [eos]


def corrupt_batch(windows: torch.Tensor, gen: torch.Generator) -> Denoising:
    """windows [B, L] of token ids → a denoising batch."""
    pairs = [corrupt(row, gen) for row in windows]
    inputs = torch.tensor([p[0] for p in pairs], dtype=torch.long)  # [B, L - noise + spans + 1]
    labels = torch.tensor([p[1] for p in pairs], dtype=torch.long)  # [B, noise + spans + 1]
    return Denoising(inputs, labels)
