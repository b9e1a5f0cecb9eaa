"""Per-model latency samples the worker keeps, and the snapshot GetStats and the metrics gauges read."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from moeshare.engine.api import EngineStats, StepTotals

SAMPLES = 1024  # recent TTFT / TPOT samples kept per model
WINDOW_S = 10.0  # tokens/s is measured over this many recent seconds


@dataclass
class ModelSamples:
    ttft: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))
    tpot: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))
    tokens: deque[float] = field(default_factory=lambda: deque(maxlen=65536))  # time of each token
    requests_total: int = 0
    slo_requests: int = 0  # finished requests that had latency targets
    slo_met: int = 0  # of those, how many met them


@dataclass
class ModelSnapshot:
    name: str
    queue_depth: int
    running: int
    tokens_per_second: float
    ttft_p50: float
    ttft_p99: float
    tpot_p50: float
    tpot_p99: float
    requests_total: int
    resident: bool
    slo_requests: int = 0
    slo_met: int = 0
    decode_steps: StepTotals = field(default_factory=StepTotals)
    all_steps: StepTotals = field(default_factory=StepTotals)
    engines: list[int] = field(default_factory=list)  # with several engines: those holding the model


@dataclass
class Snapshot:
    models: list[ModelSnapshot]
    engine: EngineStats
    placement: list[str] = field(default_factory=list)  # with several engines: placement decisions so far


def percentile(samples: deque[float] | list[float], q: float) -> float:
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
