"""The engine's own thread: it alone touches the engine; gRPC handlers enqueue, stream and cancel.

Handlers send typed messages (messages.py) through a thread-safe queue and get a concurrent Future back
(the request's handle, or the engine's validation error); token events come back on the request's
asyncio.Queue through `loop.call_soon_threadsafe`. With no work the thread blocks on its queue.

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
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from moeshare.engine.api import EngineFailed, Submit, TokenEvent, Usage
from moeshare.engine.engine import Engine
from moeshare.engine.request import FinishReason, InvalidRequest, SamplingParams, Targets
from moeshare.engine.synthetic import from_spec, named_spec
from moeshare.errors import MoeshareError, summary
from moeshare.server.messages import (
    Ask,
    CancelAll,
    CancelRequest,
    ListModels,
    Load,
    Message,
    Operation,
    SetKvLimits,
    Stop,
    SubmitRequest,
    TakeSnapshot,
    Ticket,
    Unload,
)
from moeshare.server.snapshot import WINDOW_S, ModelSamples, ModelSnapshot, Snapshot, percentile

log = logging.getLogger(__name__)


class QueueFull(MoeshareError):
    """More requests wait than --max-queue allows (RESOURCE_EXHAUSTED)."""


def named_path(given: str) -> tuple[str | None, str]:
    """PATH, or NAME=PATH (a dense checkpoint served as NAME); an existing path is always a path."""
    name, sep, path = given.partition("=")
    if not sep or Path(given).exists() or "/" in name:
        return None, given
    return name, path


# model, ttft, tpot, end-to-end seconds, whether it met its latency targets (None: it had none)
FinishHook = Callable[[str, float, float | None, float, bool | None], None]
FatalHook = Callable[[str], None]  # called on the engine thread as it dies, with what went wrong


class RequestFailed(MoeshareError):
    """The step that held a request failed: it ended with FinishReason.ERROR (the engine serves on)."""


async def request_events(
    worker: EngineWorker,
    model: str,
    prompt: str | list[int],
    params: SamplingParams,
    request_id: str,
    targets: Callable[[], Targets],
) -> AsyncIterator[TokenEvent]:
    """What a front end (gRPC or HTTP) streams for one request: tokenize off the event loop, submit (`targets`
    is asked once the prompt is known good), yield its token events to the last; a final ERROR event raises
    RequestFailed. A caller that stops reading (deadline, disconnect, shutdown) cancels the request: its KV
    goes back at once."""
    ids = await asyncio.to_thread(worker.prepare, model, prompt, params)
    ticket = Ticket(model, request_id, asyncio.get_running_loop(), asyncio.Queue())
    future = worker.submit(Submit(model, ids, params, request_id, targets()), ticket)
    done = False
    try:
        await asyncio.wrap_future(future)
        while not done:
            ev = await ticket.events.get()
            if isinstance(ev, BaseException):  # a front end over remote engines lost the request's engine
                done = True
                raise ev
            done = ev.finished
            if ev.finish_reason is FinishReason.ERROR:
                raise RequestFailed(ev.error)
            yield ev
    finally:
        if not done:
            worker.cancel(ticket)


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
        self._inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending: dict[str, int] = defaultdict(int)  # submitted, not yet seen by the engine thread
        self._waiting = 0  # the engine's waiting requests after the last step
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
            self._inbox.put(Stop())
            self._thread.join()

    # ---- called from the asyncio side (any thread) -------------------------------------------------------

    def prepare(self, model: str, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Validate and tokenize off the engine thread (a long prompt must not stall every stream)."""
        return self.engine.prepare(model, prompt, params)

    def chat_prompt(self, model: str, messages: list[dict[str, str]]) -> str:
        """The prompt `model`'s tokenizer's chat template makes of `messages` (ready for the reply); one line
        if the model has no tokenizer or no template."""
        tokenizer = self.engine.tokenizer(model)  # UnknownModel for a name not served
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise InvalidRequest(f"{model} has no chat template: use /v1/completions with a prompt")
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def serves(self, model: str) -> bool:
        return self.engine.serves(model)

    def submit(self, request: Submit, ticket: Ticket) -> Future[int]:
        """Queue a request; raises QueueFull at once past max_queue waiting requests."""
        message = SubmitRequest(request, ticket)
        with self._lock:  # the inbox is filled under the lock, so a dying thread drains every item
            self._check_alive()
            depth = self._waiting + sum(self._pending.values())
            if depth >= self.max_queue:
                raise QueueFull(f"the queue is full ({depth} requests waiting); retry shortly")
            self._pending[request.model] += 1
            self._inbox.put(message)
        return message.future

    def cancel(self, ticket: Ticket) -> None:
        """Cancel a request; its KV goes back to the pool as soon as the engine thread sees this."""
        with self._lock:
            if self.failure is None:
                self._inbox.put(CancelRequest(ticket))

    def ask(self, operation: Operation) -> Future[Any]:
        """Run an operation on the engine thread between steps."""
        message = Ask(operation)
        with self._lock:
            self._check_alive()
            self._inbox.put(message)
        return message.future

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
        what = summary(error)
        message = f"the engine stopped after an internal error ({what}); the server is going down"
        with self._lock:
            self.failure = message
        failed = EngineFailed(message)
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, SubmitRequest | Ask) and item.future.set_running_or_notify_cancel():
                item.future.set_exception(failed)
        for seq_id, ticket in self._tickets.items():
            ev = TokenEvent(
                seq_id, ticket.request_id, ticket.model, -1, "", 0.0, True, FinishReason.ERROR, message
            )
            ticket.loop.call_soon_threadsafe(ticket.events.put_nowait, ev)
        self._tickets.clear()
        if self.on_fatal:
            self.on_fatal(message)

    def _serve(self) -> None:
        while True:
            # with idle eviction, wake up now and then to evict models idle for too long
            tick = 1.0 if self.engine.config.evict_after is not None else None
            try:
                busy = self.engine.has_work()
                item: Message | None = self._inbox.get(block=not busy, timeout=None if busy else tick)
            except queue.Empty:
                item = None
            while item is not None:
                if isinstance(item, Stop):
                    self._close_all()
                    return
                self._handle(item)
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    item = None
            if self.engine.has_work():
                self._dispatch(self.engine.step())
            else:
                self.engine.maintain()
            with self._lock:
                self._waiting = self.engine.stats().waiting

    def _handle(self, item: Message) -> None:
        if isinstance(item, SubmitRequest):
            with self._lock:
                self._pending[item.request.model] -= 1
            if not item.future.set_running_or_notify_cancel():
                return  # the caller went away before the engine saw the request
            try:
                seq_id = self.engine.submit(item.request)
            except Exception as e:  # validation errors go back to the handler
                item.future.set_exception(e)
                return
            item.ticket.seq_id = seq_id
            self._tickets[seq_id] = item.ticket
            self._samples[item.request.model].requests_total += 1
            item.future.set_result(seq_id)
        elif isinstance(item, CancelRequest):
            seq_id = item.ticket.seq_id
            if seq_id is not None and self._tickets.pop(seq_id, None) is not None:
                self.engine.cancel(seq_id)
        elif isinstance(item, Ask):
            if not item.future.set_running_or_notify_cancel():
                return
            try:
                item.future.set_result(self._answer(item.operation))
            except Exception as e:
                item.future.set_exception(e)

    def _answer(self, op: Operation) -> Any:
        if isinstance(op, Load):
            device = self.engine.config.device
            named = [named_path(p) for p in op.paths]
            loaded = [m for name, path in named for m in self.engine.load(path, name)]
            for text in op.synthetic:
                name, spec = named_spec(text)
                loaded += self.engine.load(from_spec(spec, device), name=name)
            return loaded
        if isinstance(op, SetKvLimits):
            return self.engine.set_kv_limits(op.model, op.least_bytes, op.most_bytes)
        if isinstance(op, Unload):
            return self.engine.unload(op.model)  # its requests' final events come out of the next step
        if isinstance(op, ListModels):
            return self.engine.models()
        if isinstance(op, TakeSnapshot):
            return self.snapshot()
        if isinstance(op, CancelAll):
            return self._close_all()
        raise TypeError(f"unknown operation {type(op).__name__}")

    def _dispatch(self, events: list[TokenEvent]) -> None:
        now = time.perf_counter()
        for ev in events:
            ticket = self._tickets.get(ev.seq_id)
            if ticket is None:
                continue
            samples = self._samples[ev.model]
            if ev.token_id >= 0:
                samples.tokens.append(now)
            if ev.finished:
                del self._tickets[ev.seq_id]
                if ev.finish_reason not in (FinishReason.ERROR, FinishReason.CANCELLED) and ev.usage:
                    self._record(ev.model, ev.usage)
            ticket.loop.call_soon_threadsafe(ticket.events.put_nowait, ev)

    def _record(self, model: str, usage: Usage) -> None:
        if usage.first_token is None:
            return
        samples = self._samples[model]
        samples.ttft.append(usage.ttft)
        if usage.tpot is not None:
            samples.tpot.append(usage.tpot)
        met = usage.met_targets
        if met is not None:
            samples.slo_requests += 1
            samples.slo_met += met
        if self.on_finish:
            self.on_finish(model, usage.ttft, usage.tpot, usage.total, met)

    def _close_all(self) -> None:
        """End every request with a final CANCELLED event (shutdown)."""
        for seq_id, ticket in list(self._tickets.items()):
            ev = self.engine.cancel(seq_id)
            if ev is None:  # already ended behind our back
                ev = TokenEvent(
                    seq_id, ticket.request_id, ticket.model, -1, "", 0.0, True, FinishReason.CANCELLED
                )
            ticket.loop.call_soon_threadsafe(ticket.events.put_nowait, ev)
        self._tickets.clear()

    def snapshot(self) -> Snapshot:
        """Stats for GetStats and the metrics gauges (on the engine thread: ask(TakeSnapshot()))."""
        stats = self.engine.stats()
        waiting = {m.name: m.waiting for m in stats.models}
        running = {m.name: m.running for m in stats.models}
        loads = {m.name: m for m in stats.models}
        with self._lock:
            for v, n in self._pending.items():
                waiting[v] = waiting.get(v, 0) + n
        now = time.perf_counter()
        models = []
        for info in self.engine.models():
            s = self._samples[info.name]
            recent = sum(1 for t in s.tokens if t >= now - WINDOW_S)
            models.append(
                ModelSnapshot(
                    info.name,
                    waiting.get(info.name, 0),
                    running.get(info.name, 0),
                    recent / WINDOW_S,
                    percentile(s.ttft, 0.5),
                    percentile(s.ttft, 0.99),
                    percentile(s.tpot, 0.5),
                    percentile(s.tpot, 0.99),
                    s.requests_total,
                    info.resident,
                    s.slo_requests,
                    s.slo_met,
                    loads[info.name].decode_steps,
                    loads[info.name].all_steps,
                )
            )
        return Snapshot(models, stats)
