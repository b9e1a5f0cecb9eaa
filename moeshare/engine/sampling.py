"""Batched sampling with per-request parameters.

Randomness is a counter-based hash of (seed, step, vocabulary index), not a shared generator, so a seeded
request draws the same tokens whatever else is in its batch, and a decode step stays one fixed set of tensor
ops (CUDA-graph friendly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeshare.engine import ops

_M1, _M2, _M3 = 0x5851F42D4C957F2D, 0x14057B7EF767814F, 0x2545F4914F6CDD1D  # odd, below 2**63


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A splitmix-style scramble of int64 counters (wrapping multiply, logical shifts)."""
    x = x ^ ((x >> 31) & ((1 << 33) - 1))
    x = x * _M1
    x = x ^ ((x >> 29) & ((1 << 35) - 1))
    x = x * _M3
    return x ^ ((x >> 32) & ((1 << 32) - 1))


def uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """U(0, 1) noise [B, V] that depends only on each row's (seed, step)."""
    idx = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    base = _mix(seeds.to(torch.int64) * _M2 + steps.to(torch.int64))  # [B]
    bits = _mix(base[:, None] + idx[None, :] * _M3)
    return (((bits >> 8) & ((1 << 24) - 1)).to(torch.float32) + 0.5) / (1 << 24)


@dataclass
class SamplingBatch:
    """Per-row parameters as tensors. [B] each"""

    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    seeds: torch.Tensor
    steps: torch.Tensor


# What a batch's parameters need, cheapest first. A mode leaves out work (the vocabulary sort, the noise) that
# the batch's parameters do not call for, so a request draws the same token in every mode that can serve it
# (up to the filtered sampler's top_p = 1 cut of tokens whose float32 cumulative mass before them reaches 1).
GREEDY, PLAIN, FILTERED = "greedy", "plain", "filtered"
MODES = (GREEDY, PLAIN, FILTERED)


def mode_for(temperature: list[float], top_p: list[float], top_k: list[int]) -> str:
    """GREEDY: every row takes its argmax; PLAIN: no top-k or top-p cut (no sort of the vocabulary);
    FILTERED: the full sampler."""
    if all(t <= 0 for t in temperature):
        return GREEDY
    cut = [k > 0 or p < 1 for t, p, k in zip(temperature, top_p, top_k, strict=True) if t > 0]
    return FILTERED if any(cut) else PLAIN


def sample(
    logits: torch.Tensor, batch: SamplingBatch, mode: str = FILTERED
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] in the model's dtype or float32 -> chosen token ids [B] and their log-probabilities under
    the unmodified distribution [B] (float32)."""
    if mode == GREEDY:  # one pass over the logits in their own dtype: no float32 copy, no [B, V] logprobs
        return ops.greedy_pick(logits)
    logits = logits.float()  # [B, V]
    logprobs = torch.log_softmax(logits, dim=-1)
    greedy = batch.temperature <= 0
    scaled = logits / torch.where(greedy, 1.0, batch.temperature)[:, None]
    vocab = logits.shape[-1]
    if mode == PLAIN:
        return _draw(logits, scaled, logprobs, greedy, batch, vocab)
    # top-k: keep values >= the k-th largest (k = 0 keeps all)
    k = torch.where(batch.top_k > 0, batch.top_k.clamp(max=vocab), vocab)
    sorted_vals, _ = scaled.sort(dim=-1, descending=True)
    kth = sorted_vals.gather(1, (k - 1)[:, None])
    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    # top-p over what top-k kept: the smallest prefix whose probability reaches top_p
    sorted_vals = sorted_vals.masked_fill(sorted_vals < kth, float("-inf"))
    probs = sorted_vals.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly before each sorted position
    keep = before < batch.top_p[:, None]
    cutoff = sorted_vals.masked_fill(~keep, float("inf")).min(dim=-1, keepdim=True).values
    scaled = scaled.masked_fill(scaled < cutoff, float("-inf"))
    return _draw(logits, scaled, logprobs, greedy, batch, vocab)


def _draw(
    logits: torch.Tensor,
    scaled: torch.Tensor,
    logprobs: torch.Tensor,
    greedy: torch.Tensor,
    batch: SamplingBatch,
    vocab: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gumbel-max over the scaled (and cut) logits; greedy rows take the argmax."""
    gumbel = -torch.log(-torch.log(uniform(batch.seeds, batch.steps, vocab)))
    sampled = (scaled + gumbel).argmax(dim=-1)
    chosen = torch.where(greedy, logits.argmax(dim=-1), sampled)
    return chosen, logprobs.gather(1, chosen[:, None]).squeeze(1)
