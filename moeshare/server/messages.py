"""What the asyncio side sends the engine thread: typed messages, each with the future its answer goes to.

An `Ask` carries one of the admin/listing operations below; the worker answers each with plain data
(model names, ModelInfo, a Snapshot), never a live engine object.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from moeshare.engine.api import Submit, TokenEvent


@dataclass(eq=False)
class Ticket:
    """One submitted request: where its events go, and the engine's handle once the engine took it."""

    model: str
    request_id: str
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[TokenEvent | Exception]  # an exception: the request's remote engine was lost
    seq_id: int | None = None


@dataclass(frozen=True)
class Load:
    """Serve these stores / checkpoints (PATH or NAME=PATH) and synthetic specs; answers the model names."""

    paths: tuple[str, ...] = ()
    synthetic: tuple[str, ...] = ()


@dataclass(frozen=True)
class Unload:
    """Stop serving the instance that holds `model`; answers the model names unloaded."""

    model: str


@dataclass(frozen=True)
class ListModels:
    """Answers list[ModelInfo]."""


@dataclass(frozen=True)
class TakeSnapshot:
    """Answers a Snapshot (GetStats and the metrics gauges)."""


@dataclass(frozen=True)
class CancelAll:
    """End every running request with a final CANCELLED event (shutdown)."""


@dataclass(frozen=True)
class SetKvLimits:
    """Keep least_bytes of the elastic KV pool for `model`'s instance, hold it to most_bytes (None: no cap)."""

    model: str
    least_bytes: int = 0
    most_bytes: int | None = None


Operation = Load | Unload | ListModels | TakeSnapshot | CancelAll | SetKvLimits


@dataclass(eq=False)
class SubmitRequest:
    request: Submit
    ticket: Ticket
    future: Future[int] = field(default_factory=Future)


@dataclass(eq=False)
class CancelRequest:
    ticket: Ticket


@dataclass(eq=False)
class Ask:
    operation: Operation
    future: Future[Any] = field(default_factory=Future)


@dataclass(eq=False)
class Stop:
    pass


Message = SubmitRequest | CancelRequest | Ask | Stop
