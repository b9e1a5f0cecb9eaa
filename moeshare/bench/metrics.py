"""Latency and throughput of one replayed run: per request TTFT, TPOT and turnaround; per run their mean,
P50 and P99, throughput, and SLO attainment against each variant's latency when served alone, for the
request's own prompt and output lengths (`Solo`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from moeshare.bench.replay import RequestRecord


@dataclass(frozen=True)
class RequestLatency:
    """Seconds, measured from the moment the request was sent; None where the request has no such time."""

    variant: str
    ok: bool
    prompt_len: int
    max_tokens: int
    tokens_out: int
    turnaround_s: float
    ttft_s: float | None
    tpot_s: float | None  # mean gap between output tokens after the first; needs two tokens


def request_latency(r: RequestRecord) -> RequestLatency:
    ttft = None if r.first_token_s is None else r.first_token_s - r.sent_s
    tpot = None
    if r.tokens_out >= 2:
        tpot = (r.token_times_s[-1] - r.token_times_s[0]) / (r.tokens_out - 1)
    return RequestLatency(
        r.variant, r.ok, r.prompt_len, r.max_tokens, r.tokens_out, r.finish_s - r.sent_s, ttft, tpot
    )


@dataclass(frozen=True)
class Solo:
    """A variant's latency with nothing else on its server, by request size: the first token after
    `ttft0_s + ttft_per_token_s * prompt tokens`, then one token every `tpot_s`."""

    ttft0_s: float
    ttft_per_token_s: float
    tpot_s: float

    def latency(self, prompt_len: int, max_tokens: int) -> float:
        return self.ttft0_s + self.ttft_per_token_s * prompt_len + max(0, max_tokens - 1) * self.tpot_s

    @classmethod
    def fit(cls, records: Sequence[RequestRecord]) -> Solo:
        """From solo requests of one or more prompt lengths: TTFT is the line through each length's median
        (a constant from one length; never falling with length), TPOT the median."""
        done = [request_latency(r) for r in records if r.ok]
        if not done:
            raise ValueError("no completed solo request to fit")
        lengths = sorted({x.prompt_len for x in done})
        ttft = [float(np.median([x.ttft_s for x in done if x.prompt_len == n])) for n in lengths]
        slope = 0.0
        if len(lengths) > 1:
            slope = max(0.0, float(np.polyfit(lengths, ttft, 1)[0]))
        base = float(np.mean(ttft)) - slope * float(np.mean(lengths))
        tpots = [x.tpot_s for x in done if x.tpot_s is not None]
        return cls(base, slope, float(np.median(tpots)) if tpots else 0.0)


@dataclass(frozen=True)
class Stat:
    mean: float
    p50: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        if not values:
            return cls(math.nan, math.nan, math.nan)
        a = np.asarray(values, dtype=np.float64)
        return cls(float(a.mean()), float(np.percentile(a, 50)), float(np.percentile(a, 99)))


@dataclass(frozen=True)
class RunMetrics:
    """One run. Latency stats cover completed requests only; failed ones count as SLO misses."""

    system: str
    rate_rps: float  # offered load
    requests: int
    failed: int
    span_s: float  # first send to last finish
    throughput_rps: float  # completed requests / span
    tokens_per_s: float  # output tokens of completed requests / span
    turnaround: Stat
    # mean over every request, a failed one counted until it failed: where requests were cancelled
    # unfinished, a lower bound on what the system's mean turnaround would be
    mean_turnaround_all_s: float
    ttft: Stat
    tpot: Stat
    slo_attainment_5x: float  # fraction of all requests finished within 5x their solo latency
    slo_attainment_10x: float
    max_send_lag_s: float  # worst lateness of a send against the schedule: large means the client lagged

    def to_record(self) -> dict[str, str | int | float]:
        """Flat, for a results table; the caller adds gpu, date and the like."""
        out: dict[str, str | int | float] = {}
        for key, value in asdict(self).items():
            if isinstance(value, dict):
                out |= {f"{stat}_{key}_s": v for stat, v in value.items()}
            else:
                out[key] = value
        return out


def _per_s(n: float, span_s: float) -> float:
    return n / span_s if span_s > 0 else math.nan


def slo_attainment(latencies: Sequence[RequestLatency], solo: Mapping[str, Solo], scale: float) -> float:
    met = sum(
        1
        for x in latencies
        if x.ok and x.turnaround_s <= scale * solo[x.variant].latency(x.prompt_len, x.max_tokens)
    )
    return met / len(latencies) if latencies else math.nan


def summarize(
    records: Sequence[RequestRecord], solo: Mapping[str, Solo], system: str, rate_rps: float
) -> RunMetrics:
    """`solo`: each variant's latency when its request is the only one on the server."""
    missing = sorted({r.variant for r in records} - set(solo))
    if missing:
        raise ValueError(f"no solo latency for variants {missing}")
    latencies = [request_latency(r) for r in records]
    done = [x for x in latencies if x.ok]
    span = max((r.finish_s for r in records), default=0.0) - min((r.sent_s for r in records), default=0.0)
    return RunMetrics(
        system=system,
        rate_rps=rate_rps,
        requests=len(records),
        failed=len(records) - len(done),
        span_s=span,
        throughput_rps=_per_s(len(done), span),
        tokens_per_s=_per_s(sum(x.tokens_out for x in done), span),
        turnaround=Stat.of([x.turnaround_s for x in done]),
        mean_turnaround_all_s=float(np.mean([x.turnaround_s for x in latencies])) if latencies else math.nan,
        ttft=Stat.of([x.ttft_s for x in done if x.ttft_s is not None]),
        tpot=Stat.of([x.tpot_s for x in done if x.tpot_s is not None]),
        slo_attainment_5x=slo_attainment(latencies, solo, 5),
        slo_attainment_10x=slo_attainment(latencies, solo, 10),
        max_send_lag_s=max((r.sent_s - r.arrival_s for r in records), default=0.0),
    )


def latency_targets(solo: Mapping[str, Solo], k: float):
    """A function of a request (RequestSpec) to its latency targets as generate() takes them: k x its
    model's solo TTFT at its prompt length, k x its solo TPOT."""

    def of(r) -> dict[str, float]:
        s = solo[r.variant]
        return {
            "ttft_target": k * (s.ttft0_s + s.ttft_per_token_s * r.prompt_len),
            "tpot_target": k * s.tpot_s,
        }

    return of
