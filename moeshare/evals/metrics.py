"""How far a method's model is from the original variant, and how good it is on the held-out text."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeshare.evals.data import EvalSet, Specials
from moeshare.evals.scorers import Scorer
from moeshare.zoo.evaluate import IGNORE

CONTINUATION = 64  # greedy tokens compared against the original's


@dataclass
class Reference:
    """The original variant's outputs on one EvalSet, computed once."""

    logprobs: torch.Tensor  # [R, L', V] float32
    greedy: list[list[int]]


def reference(scorer: Scorer, data: EvalSet, n: int = CONTINUATION) -> Reference:
    return Reference(scorer.logits(data.inputs, data.labels).log_softmax(-1), scorer.greedy(data.prompts, n))


def perplexity(logp: torch.Tensor, data: EvalSet) -> float:
    """exp of the mean negative log-likelihood of the labels under log-probabilities logp [R, L', V]."""
    mask = data.labels != IGNORE
    return math.exp(F.nll_loss(logp[mask], data.labels[mask]).item())


def quality(
    scorer: Scorer, data: EvalSet, ref: Reference, denoising: bool, n: int = CONTINUATION
) -> dict[str, float]:
    """perplexity, kl (mean KL(original || this) per scored token), top1_agreement, greedy_match (share of
    prompts whose n greedy tokens equal the original's); for denoising also rouge1/2/L of the greedy
    reconstruction against the dropped spans."""
    logp = scorer.logits(data.inputs, data.labels).log_softmax(-1)  # [R, L', V]
    mask = data.labels != IGNORE  # [R, L']
    kl = (ref.logprobs.exp() * (ref.logprobs - logp)).sum(-1)[mask].mean().item()
    top1 = (ref.logprobs.argmax(-1) == logp.argmax(-1))[mask].float().mean().item()
    greedy = scorer.greedy(data.prompts, n)
    out = {
        "perplexity": perplexity(logp, data),
        "kl": max(kl, 0.0),
        "top1_agreement": top1,
        "greedy_match": sum(a == b for a, b in zip(greedy, ref.greedy, strict=True)) / len(greedy),
    }
    if denoising:
        scores = [
            rouge(_spans(g, data.specials), _spans(t.tolist(), data.specials))
            for g, t in zip(greedy, data.labels[data.prompt_rows], strict=True)
        ]
        for key in ("rouge1", "rouge2", "rougeL"):
            out[key] = sum(s[key] for s in scores) / len(scores)
    return out


def _spans(ids: list[int], specials: Specials) -> list[int]:
    """The reconstructed text's tokens: the output cut at eos, every special token (sentinels, padding) and
    any id outside the tokenizer dropped; specials are the scored checkpoint's tokenizer's own."""
    if specials.eos in ids:
        ids = ids[: ids.index(specials.eos)]
    return [t for t in ids if t not in specials.ids and 0 <= t < specials.vocab]


def _ngrams(ids: list[int], n: int) -> dict[tuple[int, ...], int]:
    counts: dict[tuple[int, ...], int] = {}
    for i in range(len(ids) - n + 1):
        counts[tuple(ids[i : i + n])] = counts.get(tuple(ids[i : i + n]), 0) + 1
    return counts


def _f1(overlap: int, cand: int, ref: int) -> float:
    if overlap == 0:
        return 0.0
    p, r = overlap / cand, overlap / ref
    return 2 * p * r / (p + r)


def _lcs(a: list[int], b: list[int]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge(cand: list[int], ref: list[int]) -> dict[str, float]:
    """ROUGE-1, -2 and -L F1 over token sequences (bytes, for the zoo's byte-level tokenizer)."""
    out = {}
    for n in (1, 2):
        c, r = _ngrams(cand, n), _ngrams(ref, n)
        overlap = sum(min(k, r.get(g, 0)) for g, k in c.items())
        out[f"rouge{n}"] = _f1(overlap, sum(c.values()), sum(r.values()))
    out["rougeL"] = _f1(_lcs(cand, ref), len(cand), len(ref))
    return out
