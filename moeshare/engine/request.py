"""Requests, their sampling parameters, and the sequences the scheduler moves between queues."""

from __future__ import annotations

import enum
import itertools
import math
from dataclasses import dataclass, field

from moeshare.errors import MoeshareError


class LateRequest(MoeshareError):
    """A request that asked to be refused if it would miss its TTFT target, and would (RESOURCE_EXHAUSTED)."""


class InvalidRequest(MoeshareError):
    """A request the engine refuses before it touches the batch (maps to INVALID_ARGUMENT)."""


class RequestTooLarge(MoeshareError):
    """A prompt longer than the context, or a request that could never fit in KV memory (RESOURCE_EXHAUSTED)."""


class UnknownModel(MoeshareError):
    """A model name the engine does not serve (NOT_FOUND)."""


MAX_SEED = 2**63 - 1  # seeds travel as int64 tensors
MAX_STOPS = 16
MAX_STOP_CHARS = 256
ECHO_CHARS = 64  # client-supplied text quoted back in an error message


def clip(text: str, limit: int = ECHO_CHARS) -> str:
    """A client's string as an error message quotes it: repr, cut to `limit` characters (a huge model name
    must not make the error itself too large to send)."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: bool = False
    ignore_eos: bool = False

    def validate(self, max_tokens_limit: int) -> None:
        if not 1 <= self.max_tokens <= max_tokens_limit:
            raise InvalidRequest(
                f"max_tokens must be between 1 and {max_tokens_limit}, got {self.max_tokens}"
            )
        if not self.temperature >= 0:
            raise InvalidRequest(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise InvalidRequest(f"seed must be between 0 and 2**63 - 1, got {self.seed}")
        if len(self.stop) > MAX_STOPS:
            raise InvalidRequest(f"at most {MAX_STOPS} stop strings, got {len(self.stop)}")
        for stop in self.stop:
            if not 0 < len(stop) <= MAX_STOP_CHARS:
                raise InvalidRequest(
                    f"a stop string must have 1 to {MAX_STOP_CHARS} characters, got {clip(stop)}"
                )


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_tokens reached
    STOP = "stop"  # eos, a stop token or a stop string
    CANCELLED = "cancelled"
    CONTEXT = "context"  # the model's context is full
    ERROR = "error"  # the step that ran the sequence failed; the event carries the message


_ids = itertools.count()


@dataclass(frozen=True)
class Targets:
    """A request's latency targets in seconds (None: none) — time to first token and time per output token
    after it — and its priority (higher first). A finished request met its targets if it met both it has."""

    ttft: float | None = None
    tpot: float | None = None
    priority: int = 0
    refuse_if_late: bool = False  # refuse it at once if the queue ahead already makes it miss its TTFT target

    def validate(self) -> None:
        for name, value in (("ttft target", self.ttft), ("tpot target", self.tpot)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise InvalidRequest(f"{name} must be a number of seconds > 0, got {value}")

    @property
    def any(self) -> bool:
        return self.ttft is not None or self.tpot is not None

    def met(self, ttft: float, tpot: float | None) -> bool | None:
        """Whether a request with this time to first token and time per output token met them (None: no
        targets)."""
        if not self.any:
            return None
        return (self.ttft is None or ttft <= self.ttft) and (
            self.tpot is None or tpot is None or tpot <= self.tpot
        )


@dataclass(eq=False)  # identity: the scheduler looks sequences up in its queues every step
class Sequence:
    """One request as the engine sees it: its tokens, where its KV lives, and what it has produced."""

    model: str
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str = ""
    targets: Targets = field(default_factory=Targets)
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    block_table: list[int] = field(default_factory=list)
    # an encoder-decoder model's request (Switch): the prompt goes through the encoder once, its cross-attention
    # K/V into cross_table's blocks (kept until it ends or is preempted); prompt_ids is then the decoder's
    # start token, so the decoder's tokens are prompt_ids + output_ids as a decoder-only model's are
    encoder_ids: list[int] = field(default_factory=list)
    cross_table: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose KV is in the cache (or being written by a launched step)
    pending: int = 0  # tokens sampled by launched steps, not read back yet (2 at most: read next, queued now)
    arrival: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    preemptions: int = 0

    def tokens(self, start: int, count: int) -> list[int]:
        """(prompt_ids + output_ids)[start : start + count] without building the whole list."""
        p = len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p : start - p + count]
        return self.prompt_ids[start : start + count] + self.output_ids[: max(0, start + count - p)]

    @property
    def ahead(self) -> int:
        """Tokens once the pending ones are read back: where the next token goes."""
        return len(self.prompt_ids) + len(self.output_ids) + self.pending

    def last_after_pending(self, context: int) -> bool:
        """Whether the pending token ends the sequence by length (max_tokens or the context) whatever it is."""
        return self.pending > 0 and (
            len(self.output_ids) + self.pending >= self.params.max_tokens or self.ahead >= context
        )

    @property
    def prompt_tokens(self) -> int:
        """What the request's prompt was (the encoder's input for an encoder-decoder model)."""
        return len(self.encoder_ids) if self.encoder_ids else len(self.prompt_ids)

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
