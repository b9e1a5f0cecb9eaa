"""Seeded multi-variant workloads: Zipf variant popularity, Gamma renewal arrivals, lognormal lengths.

The gRPC API takes prompts as text, so prompts are born as token ids in a caller-given range and sent as
the text `byte_text` makes of them; under a byte-level tokenizer (the zoo's) one character is one token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# The zoo tokenizer (moeshare.zoo.tokenizer) maps byte b to id b + 4. Printable ASCII only: every id is then
# one character of valid UTF-8 and never a special, control or sentinel token.
ZOO_BYTE_OFFSET = 4
ZOO_PRINTABLE = (ZOO_BYTE_OFFSET + 0x20, ZOO_BYTE_OFFSET + 0x7F)  # token ids [lo, hi)


@dataclass(frozen=True)
class Lengths:
    """Token counts: lognormal around `median` (`sigma` in log space), rounded and clipped to [lo, hi]."""

    median: int
    sigma: float = 0.5
    lo: int = 1
    hi: int = 4096

    @classmethod
    def fixed(cls, n: int) -> Lengths:
        return cls(median=n, sigma=0.0, lo=n, hi=n)

    def validate(self, name: str) -> None:
        if not 1 <= self.lo <= self.hi or self.median < 1 or self.sigma < 0:
            raise ValueError(f"{name}: need 1 <= lo <= hi, median >= 1 and sigma >= 0, got {self}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:  # [n] int64, tokens
        raw = self.median * np.exp(self.sigma * rng.standard_normal(n))
        return np.clip(np.rint(raw), self.lo, self.hi).astype(np.int64)


def around(input_len: int, output_len: int) -> tuple[Lengths, Lengths]:
    """Prompt and output lengths lognormal around the medians: prompts within [1/4, 4] x theirs, outputs within
    [1/4, 2] x theirs (at least 2 tokens, so every request has a time per output token)."""
    out = Lengths(output_len, lo=max(2, output_len // 4), hi=2 * output_len)
    return Lengths(input_len, lo=max(1, input_len // 4), hi=4 * input_len), out


@dataclass(frozen=True)
class WorkloadSpec:
    variants: list[str]  # most popular first: variants[i] has Zipf rank i + 1
    rate_rps: float  # requests per second, all variants together
    duration_s: float
    zipf_alpha: float = 0.9  # popularity of rank r is proportional to 1 / r**alpha
    cv: float = 1.0  # of each variant's inter-arrival times: 1 Poisson, > 1 bursty, 0 evenly spaced
    input_len: Lengths = Lengths(512)
    output_len: Lengths = Lengths(128)
    vocab: tuple[int, int] = ZOO_PRINTABLE  # prompt token ids are drawn from [lo, hi)
    seed: int = 0

    def validate(self) -> None:
        if not self.variants or len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants must be non-empty and distinct, got {self.variants}")
        if self.rate_rps <= 0 or self.duration_s <= 0:
            raise ValueError(f"rate_rps and duration_s must be > 0, got {self.rate_rps}, {self.duration_s}")
        if self.zipf_alpha < 0 or self.cv < 0:
            raise ValueError(f"zipf_alpha and cv must be >= 0, got {self.zipf_alpha}, {self.cv}")
        if not 0 <= self.vocab[0] < self.vocab[1]:
            raise ValueError(f"vocab must be a range [lo, hi) of token ids, got {self.vocab}")
        self.input_len.validate("input_len")
        self.output_len.validate("output_len")


@dataclass(frozen=True)
class RequestSpec:
    id: str
    variant: str
    arrival_s: float  # seconds from the start of the run
    prompt_ids: tuple[int, ...]
    max_tokens: int  # output tokens asked for

    @property
    def prompt_len(self) -> int:  # tokens, before any special the server's tokenizer adds
        return len(self.prompt_ids)


def zipf_shares(n: int, alpha: float) -> np.ndarray:  # [n] float64, sums to 1
    weights = 1.0 / np.arange(1, n + 1) ** alpha
    return weights / weights.sum()


def gamma_arrivals(rng: np.random.Generator, rate_rps: float, cv: float, duration_s: float) -> np.ndarray:
    """Arrival times (seconds, increasing, < duration_s) of a renewal process with Gamma gaps of mean
    1/rate_rps and coefficient of variation cv (shape 1/cv**2)."""
    mean_gap = 1.0 / rate_rps  # seconds
    expected = rate_rps * duration_s
    chunk = int(expected + 4 * max(cv, 1.0) * np.sqrt(expected)) + 16  # nearly always one draw suffices
    pieces, t = [], 0.0
    while t < duration_s:
        if cv == 0:
            gaps = np.full(chunk, mean_gap)
        else:
            gaps = rng.gamma(shape=1.0 / cv**2, scale=mean_gap * cv**2, size=chunk)
        times = t + np.cumsum(gaps)
        pieces.append(times)
        t = float(times[-1])
    times = np.concatenate(pieces)
    return times[times < duration_s]


def generate(spec: WorkloadSpec) -> list[RequestSpec]:
    """The requests of one run, sorted by arrival; the same spec (seed included) gives the same list."""
    spec.validate()
    arrivals_seed, lengths_seed, prompts_seed = np.random.SeedSequence(spec.seed).spawn(3)
    # one stream per variant, so a variant's arrivals do not depend on how many the others drew
    streams = [np.random.default_rng(s) for s in arrivals_seed.spawn(len(spec.variants))]
    rates = spec.rate_rps * zipf_shares(len(spec.variants), spec.zipf_alpha)  # [V] requests/s
    per_variant = [
        gamma_arrivals(rng, r, spec.cv, spec.duration_s) for rng, r in zip(streams, rates, strict=True)
    ]
    times = np.concatenate(per_variant)  # [N] seconds
    which = np.concatenate([np.full(len(a), v) for v, a in enumerate(per_variant)])  # [N] variant index
    order = np.argsort(times, kind="stable")
    times, which = times[order], which[order]
    if len(times) == 0:
        return []

    lengths_rng = np.random.default_rng(lengths_seed)
    inputs = spec.input_len.sample(lengths_rng, len(times))  # [N] tokens
    outputs = spec.output_len.sample(lengths_rng, len(times))  # [N] tokens
    ids = np.random.default_rng(prompts_seed).integers(*spec.vocab, size=int(inputs.sum()))
    prompts = np.split(ids, np.cumsum(inputs)[:-1])
    return [
        RequestSpec(f"req-{i}", spec.variants[v], float(t), tuple(p.tolist()), int(o))
        for i, (t, v, p, o) in enumerate(zip(times, which, prompts, outputs, strict=True))
    ]


def byte_text(ids: Sequence[int], byte_offset: int = ZOO_BYTE_OFFSET) -> str:
    """The text a byte-level tokenizer turns into exactly `ids` (ASCII bytes only). The engine encodes
    prompts without specials, so a zoo server counts exactly len(ids) prompt tokens."""
    raw = bytes(i - byte_offset for i in ids)  # ValueError outside one byte
    if not raw.isascii():
        raise ValueError(f"ids must map to ASCII bytes (offset {byte_offset}) to be one character each")
    return raw.decode("ascii")
