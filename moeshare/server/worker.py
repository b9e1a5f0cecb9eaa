"""The engine's own thread: it alone touches the engine; gRPC handlers enqueue, stream and cancel.

Handlers submit through a thread-safe queue and get a concurrent Future back (the Sequence, or the
engine's validation error); token events come back on the request's asyncio.Queue through
`loop.call_soon_threadsafe`. With no work the thread blocks on its queue.

If the thread dies (an error the engine could not confine to one step's requests), every waiting request
and call fails with EngineFailed, later ones fail at once, and `on_fatal` tells the server to go down:
never a silent wedge.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from moeshare.engine.engine import Engine, EngineFailed, TokenEvent
from moeshare.engine.request import FinishReason, SamplingParams, Sequence
from moeshare.errors import MoeshareError

log = logging.getLogger(__name__)

SAMPLES = 1024  # recent TTFT / TPOT samples kept per model
WINDOW_S = 10.0  # tokens/s is measured over this many recent seconds


class QueueFull(MoeshareError):
    """More requests wait than --max-queue allows (RESOURCE_EXHAUSTED)."""


@dataclass(eq=False)
class Ticket:
    """One submitted request: where its events go, and its sequence once the engine took it."""

    variant: str
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[TokenEvent]
    seq: Sequence | None = None


@dataclass
class ModelSamples:
    ttft: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))
    tpot: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))
    tokens: deque[float] = field(default_factory=lambda: deque(maxlen=65536))  # time of each token
    requests_total: int = 0


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


@dataclass
class Snapshot:
    models: list[ModelSnapshot]
    engine: dict[str, Any]


def percentile(samples: deque[float] | list[float], q: float) -> float:
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


FinishHook = Callable[[str, float, float | None, float], None]  # variant, ttft, tpot, end-to-end seconds
FatalHook = Callable[[str], None]  # called on the engine thread as it dies, with what went wrong


class EngineWorker:
    def __init__(
        self,
        engine: Engine,
        max_queue: int = 256,
        on_finish: FinishHook | None = None,
        on_fatal: FatalHook | None = None,
    ) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.on_finish = on_finish
        self.on_fatal = on_fatal
        self.failure: str | None = None  # why the engine thread died, once it has
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending: dict[str, int] = defaultdict(int)  # submitted, not yet seen by the engine thread
        self._waiting = 0  # the engine's waiting sequences after the last step
        self._tickets: dict[int, Ticket] = {}
        self._samples: dict[str, ModelSamples] = defaultdict(ModelSamples)
        self._thread = threading.Thread(target=self._loop, name="moeshare-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._inbox.put(("stop", None))
            self._thread.join()

    # ---- called from the asyncio side (any thread) -------------------------------------------------------

    def prepare(self, variant: str, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Validate and tokenize off the engine thread (a long prompt must not stall every stream)."""
        return self.engine.prepare(variant, prompt, params)

    def serves(self, variant: str) -> bool:
        return self.engine.serves(variant)

    def submit(
        self, variant: str, prompt: str | list[int], params: SamplingParams, request_id: str, ticket: Ticket
    ) -> Future[Sequence]:
        """Queue a request; raises QueueFull at once past max_queue waiting requests."""
        future: Future[Sequence] = Future()
        with self._lock:  # the inbox is filled under the lock, so a dying thread drains every item
            self._check_alive()
            depth = self._waiting + sum(self._pending.values())
            if depth >= self.max_queue:
                raise QueueFull(f"the queue is full ({depth} requests waiting); retry shortly")
            self._pending[variant] += 1
            self._inbox.put(("submit", (variant, prompt, params, request_id, ticket, future)))
        return future

    def cancel(self, ticket: Ticket) -> None:
        """Cancel a request; its KV goes back to the pool as soon as the engine thread sees this."""
        with self._lock:
            if self.failure is None:
                self._inbox.put(("cancel", ticket))

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run fn on the engine thread between steps (load, unload, listing)."""
        future: Future[Any] = Future()
        with self._lock:
            self._check_alive()
            self._inbox.put(("call", (fn, future)))
        return future

    def _check_alive(self) -> None:
        if self.failure is not None:
            raise EngineFailed(self.failure)

    # ---- the engine thread -------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as e:
            self._die(e)

    def _die(self, error: BaseException) -> None:
        """Fail every request and call, now and later, and tell the server."""
        log.critical("the engine thread died", exc_info=error)
        what = (f"{type(error).__name__}: {error}".splitlines() or [""])[0][:200]
        message = f"the engine stopped after an internal error ({what}); the server is going down"
        with self._lock:
            self.failure = message
        failed = EngineFailed(message)
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            future = payload[-1] if kind == "submit" else payload[1] if kind == "call" else None
            if future is not None and future.set_running_or_notify_cancel():
                future.set_exception(failed)
        for ticket in self._tickets.values():
            seq = ticket.seq
            assert seq is not None
            ev = TokenEvent(
                seq.seq_id, seq.request_id, seq.variant, -1, "", 0.0, True, FinishReason.ERROR, message
            )
            ticket.loop.call_soon_threadsafe(ticket.events.put_nowait, ev)
        self._tickets.clear()
        if self.on_fatal:
            self.on_fatal(message)

    def _serve(self) -> None:
        while True:
            try:
                block = not self.engine.has_work()
                kind, payload = self._inbox.get(block=block)
            except queue.Empty:
                kind, payload = "", None
            while kind:
                if kind == "stop":
                    self._close_all()
                    return
                self._handle(kind, payload)
                try:
                    kind, payload = self._inbox.get_nowait()
                except queue.Empty:
                    kind = ""
            if self.engine.has_work():
                self._dispatch(self.engine.step())
            with self._lock:
                self._waiting = self.engine.stats()["waiting"]

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "submit":
            variant, prompt, params, request_id, ticket, future = payload
            with self._lock:
                self._pending[variant] -= 1
            if not future.set_running_or_notify_cancel():
                return  # the caller went away before the engine saw the request
            try:
                seq = self.engine.add_request(variant, prompt, params, request_id)
            except Exception as e:  # validation errors go back to the handler
                future.set_exception(e)
                return
            ticket.seq = seq
            self._tickets[seq.seq_id] = ticket
            self._samples[variant].requests_total += 1
            future.set_result(seq)
        elif kind == "cancel":
            ticket = payload
            if ticket.seq is not None and self._tickets.pop(ticket.seq.seq_id, None) is not None:
                self.engine.cancel(ticket.seq.seq_id)
        elif kind == "call":
            fn, future = payload
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except Exception as e:
                future.set_exception(e)
            self._close_orphans()

    def _dispatch(self, events: list[TokenEvent]) -> None:
        now = time.perf_counter()
        for ev in events:
            ticket = self._tickets.get(ev.seq_id)
            if ticket is None:
                continue
            samples = self._samples[ev.variant]
            samples.tokens.append(now)
            if ev.finished:
                del self._tickets[ev.seq_id]
                if ev.finish_reason is not FinishReason.ERROR:
                    self._record(ticket)
            ticket.loop.call_soon_threadsafe(ticket.events.put_nowait, ev)

    def _record(self, ticket: Ticket) -> None:
        seq = ticket.seq
        if seq is None or seq.first_token_time is None or seq.finish_time is None:
            return
        ttft = seq.first_token_time - seq.arrival
        n = len(seq.output_ids)
        tpot = (seq.finish_time - seq.first_token_time) / (n - 1) if n > 1 else None
        samples = self._samples[seq.variant]
        samples.ttft.append(ttft)
        if tpot is not None:
            samples.tpot.append(tpot)
        if self.on_finish:
            self.on_finish(seq.variant, ttft, tpot, seq.finish_time - seq.arrival)

    def _close(self, ticket: Ticket) -> None:
        """Tell a stream its sequence is gone (unloaded or shutting down) with a final CANCELLED event."""
        seq = ticket.seq
        assert seq is not None
        ev = TokenEvent(seq.seq_id, seq.request_id, seq.variant, -1, "", 0.0, True, FinishReason.CANCELLED)
        ticket.loop.call_soon_threadsafe(ticket.events.put_nowait, ev)

    def _close_orphans(self) -> None:
        for seq_id, ticket in list(self._tickets.items()):
            if seq_id not in self.engine.seqs:  # finished behind our back (an unload)
                del self._tickets[seq_id]
                self._close(ticket)

    def _close_all(self) -> None:
        for seq_id, ticket in list(self._tickets.items()):
            self.engine.cancel(seq_id)
            self._close(ticket)
        self._tickets.clear()

    def cancel_all(self) -> None:
        """End every running request with a final CANCELLED message (shutdown); call through `call`."""
        self._close_all()

    def snapshot(self) -> Snapshot:
        """Stats for GetStats and the metrics gauges; call on the engine thread (through `call`)."""
        stats = self.engine.stats()
        waiting: dict[str, int] = defaultdict(int)
        running: dict[str, int] = defaultdict(int)
        for group in self.engine.groups:
            for seq in group.scheduler.waiting:
                waiting[seq.variant] += 1
            for seq in group.scheduler.running:
                running[seq.variant] += 1
        with self._lock:
            for v, n in self._pending.items():
                waiting[v] += n
        resident = set(stats["resident_variants"])
        now = time.perf_counter()
        models = []
        for v in self.engine.variants:
            s = self._samples[v]
            recent = sum(1 for t in s.tokens if t >= now - WINDOW_S)
            models.append(
                ModelSnapshot(
                    v,
                    waiting[v],
                    running[v],
                    recent / WINDOW_S,
                    percentile(s.ttft, 0.5),
                    percentile(s.ttft, 0.99),
                    percentile(s.tpot, 0.5),
                    percentile(s.tpot, 0.99),
                    s.requests_total,
                    v in resident,
                )
            )
        return Snapshot(models, stats)
