"""The engine's public API: what goes in and what comes out, as plain data.

Everything here can cross a thread or process boundary: no live engine objects, no closures. The engine's
methods that take or give these are `submit`, `cancel`, `step`, `models`, `stats`, `load` and `unload`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moeshare.engine.request import FinishReason, SamplingParams, Targets
from moeshare.errors import MoeshareError
from moeshare.memory.pages import PageStats

VARIANT = "variant"  # a fine-tune inside a store; the store's variants share one bank of experts
DENSE = "dense"  # a dense checkpoint: one model, one row, no bank


class EngineFailed(MoeshareError):
    """The engine cannot go on (a device error that every later step would hit too)."""


class EngineUnavailable(MoeshareError):
    """The engine holding a request went away, or none holding its model is up now (UNAVAILABLE): retry."""


@dataclass(frozen=True)
class Submit:
    """One request: a model's name, its prompt (text or token ids) and how to sample."""

    model: str
    prompt: str | list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    targets: Targets = field(default_factory=Targets)


@dataclass(frozen=True)
class Usage:
    """A finished request's token counts and times (time.perf_counter seconds of the engine's process)."""

    prompt_tokens: int
    completion_tokens: int
    arrival: float
    first_token: float | None  # None: it ended before its first token
    finish: float
    targets: Targets = field(default_factory=Targets)

    @property
    def ttft(self) -> float:
        return (self.first_token or self.finish) - self.arrival

    @property
    def total(self) -> float:
        return self.finish - self.arrival

    @property
    def tpot(self) -> float | None:
        """Seconds per output token after the first; None with fewer than two."""
        if self.first_token is None or self.completion_tokens < 2:
            return None
        return (self.finish - self.first_token) / (self.completion_tokens - 1)

    @property
    def met_targets(self) -> bool | None:
        """Whether it met its latency targets (None: it had none)."""
        return self.targets.met(self.ttft, self.tpot)


@dataclass(slots=True)  # not frozen: one is built per sequence per step, and a frozen one's __init__ costs 4x
class TokenEvent:
    """One new token of a request (token_id -1: it ended without one); the final event carries its usage."""

    seq_id: int  # the engine's handle, from submit
    request_id: str
    model: str
    token_id: int
    text: str  # newly decodable text
    logprob: float
    finished: bool
    finish_reason: FinishReason | None
    error: str = ""  # with FinishReason.ERROR: what went wrong
    usage: Usage | None = None  # on the final event


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str  # the store or checkpoint the model comes from ("" for a synthetic one)
    architecture: str  # the checkpoint adapter's name: mixtral, llama, ...
    kind: str  # VARIANT or DENSE
    context: int
    resident: bool  # its weights are on the device now
    max_batched_tokens: int = 0  # its instance's step budgets: tokens a step computes at most
    max_num_seqs: int = 0  # and sequences it decodes at most
    text_to_text: bool = (
        False  # an encoder-decoder: the prompt is the encoder's input, the tokens the decoder's
    )


@dataclass(frozen=True)
class StepTotals:
    """Steps of an instance so far: how many, their wall time, and their floor (engine/stepcost.py)."""

    steps: int = 0
    seconds: float = 0.0
    floor_seconds: float = 0.0


@dataclass(frozen=True)
class ModelLoad:
    """A model's requests in the engine right now, and its instance's steps so far."""

    name: str
    waiting: int
    running: int
    decode_steps: StepTotals = field(default_factory=StepTotals)  # steps of decodes only
    all_steps: StepTotals = field(default_factory=StepTotals)  # every step, prompt chunks included


@dataclass(frozen=True)
class EngineStats:
    steps: int
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_free: int  # in memory each instance holds; with the page pool its free pages are in `pages`
    resident_variants: list[str]
    swap_ins: int
    swap_seconds: float
    preemptions: int
    offloaded_layers: int
    models: list[ModelLoad] = field(default_factory=list)
    pages: PageStats | None = None  # the elastic KV pool's pages (None: fixed pools)
