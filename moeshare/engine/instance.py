"""One served model source (a store or a checkpoint) at run time: its model and residency, its KV block pool,
its scheduler queue, its runner (forward, CUDA graphs, sampling) and its detokenization state.

An instance is handed its block pool and its placement (what it may take of the memory limit) by the planner;
it never sizes or allocates memory itself. Within it, requests are Sequences; outside it, plain events.

A step queues the next batch on the device before it reads back the tokens of the batch queued by the step
before (config.overlap), so the host's scheduling and detokenizing run while the GPU computes: a step's
events are those of the batch before it. A sequence that stops on a token the host has not seen yet (eos,
a stop string) runs one more row whose token is dropped.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from moeshare.engine.api import EngineFailed, ModelInfo, ModelLoad, TokenEvent, Usage
from moeshare.engine.config import EngineConfig
from moeshare.engine.detokenize import Detokenizer, token_chars
from moeshare.engine.models import Footprint, Model
from moeshare.engine.request import (
    FinishReason,
    InvalidRequest,
    RequestTooLarge,
    SamplingParams,
    Sequence,
    Status,
)
from moeshare.engine.residency import Residency
from moeshare.engine.runner import Launched, Runner
from moeshare.engine.scheduler import Scheduled, Scheduler
from moeshare.engine.stepcost import StepCost
from moeshare.errors import summary
from moeshare.memory.blocks import BlockPool
from moeshare.memory.weights import WeightArena

log = logging.getLogger(__name__)


def usage(seq: Sequence) -> Usage:
    finish = seq.finish_time or time.perf_counter()
    return Usage(
        seq.prompt_tokens, len(seq.output_ids), seq.arrival, seq.first_token_time, finish, seq.targets
    )


def final_event(seq: Sequence, reason: FinishReason, error: str = "") -> TokenEvent:
    """The last event of a sequence that ends without a new token (cancelled, unloaded, failed)."""
    return TokenEvent(seq.seq_id, seq.request_id, seq.model, -1, "", 0.0, True, reason, error, usage(seq))


class Instance:
    def __init__(
        self,
        source: Any,
        architecture: str,
        kind: str,
        names: dict[str, str],
        footprint: Footprint,
        model: Model,
        residency: Residency,
        pool: BlockPool,
        runner: Runner,
        config: EngineConfig,
        tokenizers: dict[str, Any],
        offloaded_layers: int = 0,
        placed_bytes: int = 0,
        weights: WeightArena | None = None,
        cost: StepCost | None = None,
    ) -> None:
        """`names`: each model name this instance serves -> the source's variant it reads."""
        self.source, self.architecture, self.kind, self.names = source, architecture, kind, names
        self.footprint, self.model, self.residency, self.pool, self.runner = (
            footprint,
            model,
            residency,
            pool,
            runner,
        )
        self.config, self.device = config, runner.device
        self.offloaded_layers, self.placed_bytes = offloaded_layers, placed_bytes
        self.scheduler = Scheduler(
            pool,
            residency,
            config.max_num_seqs,
            config.max_batched_tokens,
            footprint.context,
            chunked_prefill=config.chunked_prefill,
        )
        self._inflight: Launched | None = None  # the batch queued by the last step, not read back yet
        # step(wait=False) leaves the batch before it here while the device still runs it
        self._unread: Launched | None = None
        self.launches = self.collected = 0  # batches queued, batches read back
        self.tokenizers = tokenizers  # per model name, or None: loaded before any memory was taken
        self.token_chars = {m: token_chars(t) for m, t in self.tokenizers.items()}
        eos = source.config.get("eos_token_id")
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.detok = Detokenizer(self.tokenizers, eos_ids, footprint.context)
        # an encoder-decoder model's decoder starts from this token (None: decoder-only)
        self.decoder_start: int | None = getattr(model, "decoder_start", None)
        self.seqs: dict[int, Sequence] = {}
        self.weights = weights  # in the engine's page pool (it can be evicted), or None: where torch put it
        self.last_busy = time.perf_counter()  # when it last had a request (idle eviction counts from here)
        self.became_resident = self.last_busy  # when its weights last came (back) to the device
        self.step_seconds: float | None = None  # moving average of the time between its busy steps
        self._last_step: float | None = None
        self.cost = cost  # each step's floor beside its time (None: not counted)
        self._last_done: tuple[object, float] | None = None  # the last batch read back: its event, host time
        self.wants_device_since: float | None = None  # evicted with requests waiting: since when
        # multiplex "streams": its batches queue on a CUDA stream of its own (None: the device's current one)
        self.stream = None
        if config.multiplex == "streams" and self.device.type == "cuda":
            self.stream = torch.cuda.Stream(self.device)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # behind what building it queued

    @property
    def models(self) -> list[str]:
        return list(self.names)

    @property
    def context(self) -> int:
        return self.footprint.context

    # ---- requests ----------------------------------------------------------------------------------------

    def prepare(self, model: str, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Validate a request and tokenize its prompt; touches nothing, so any thread may call it."""
        params.validate(self.config.max_tokens_limit)
        context = self.context
        if isinstance(prompt, str):
            tokenizer = self.tokenizers[model]
            if tokenizer is None:
                raise InvalidRequest(f"{model} has no tokenizer: send token ids")
            most = (context - 1) * self.token_chars[model]
            if len(prompt) > most:
                raise RequestTooLarge(
                    f"prompt is {len(prompt)} characters; {model} takes at most {context - 1} "
                    f"tokens (at most {most} characters)"
                )
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            ids = list(prompt)
        if not ids:
            raise InvalidRequest("prompt is empty")
        if len(ids) >= context:
            raise RequestTooLarge(f"prompt is {len(ids)} tokens; {model} takes at most {context - 1}")
        vocab = self.footprint.vocab
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidRequest(f"prompt has token ids outside [0, {vocab})")
        total = min(len(ids) + params.max_tokens, context)
        capacity = self.pool.capacity  # with a page pool, a walk over every region: once
        if capacity <= 0:
            raise RequestTooLarge(
                f"its own weights and the other models' minimums leave {model}'s KV no page of the pool: "
                "lower --kv-min or grow --pool"
            )
        need, what = self.pool.blocks_for(total), f"prompt + max_tokens = {total} tokens"
        if self.decoder_start is not None:  # the prompt's cross blocks, and the decoder's own
            decoder = min(1 + params.max_tokens, context)
            need = self.pool.blocks_for(len(ids)) + self.pool.blocks_for(decoder)
            what = f"a prompt of {len(ids)} tokens and {decoder} decoder tokens"
        if need > capacity:
            raise RequestTooLarge(
                f"{what} needs {need} KV blocks; the pool has {capacity}: lower max_tokens or shorten the prompt"
            )
        return ids

    def add(self, seq: Sequence) -> None:
        if self.decoder_start is not None and not seq.encoder_ids:  # the prompt is the encoder's input
            seq.encoder_ids, seq.prompt_ids = seq.prompt_ids, [self.decoder_start]
        self.seqs[seq.seq_id] = seq
        self.scheduler.add(seq)

    def has_work(self) -> bool:
        # a queued batch's unfinished sequences are running or waiting: nothing else to count
        return bool(self.scheduler.running or self.scheduler.waiting)

    def ttft_estimate(self, prompt_tokens: int) -> float | None:
        """About how long a request of `prompt_tokens` queued now would wait for its first token: the prompt
        tokens ahead of it and its own, at what the step's token budget leaves beside the running decodes, times
        the measured step time (None: no step measured yet, or its weights are off the device)."""
        if self.step_seconds is None or not self.on_device:
            return None
        s = self.scheduler
        # a waiting encoder-decoder request's prompt goes through the encoder with its first decoder token
        ahead = sum(
            len(q) - q.num_cached + (0 if q.num_cached else len(q.encoder_ids)) for q in s.waiting
        ) + sum(max(0, q.ahead - q.num_cached - 1) for q in s.running)
        per_step = max(1, s.max_batched_tokens - len(s.running))
        return math.ceil((ahead + prompt_tokens) / per_step) * self.step_seconds

    def slack(self, now: float) -> float:
        """Seconds until the most pressing deadline of its requests' latency targets (inf: none has targets):
        a request's next token is due at its arrival plus its TTFT target before the first token, then at its
        first token's time plus its TPOT target per token since."""
        least = math.inf
        for seq in (*self.scheduler.running, *self.scheduler.waiting):
            t = seq.targets
            if seq.first_token_time is None:
                if t.ttft is not None:
                    least = min(least, seq.arrival + t.ttft - now)
            elif t.tpot is not None:
                least = min(least, seq.first_token_time + t.tpot * len(seq.output_ids) - now)
        return least

    # ---- weights on and off the device -------------------------------------------------------------------

    @property
    def on_device(self) -> bool:
        """Whether its weights are on the device and usable (an activation's copy done)."""
        return self.weights is None or (self.weights.resident and self.weights.copied())

    def evictable(self, idle: bool = True) -> bool:
        """Its weights can leave the device now: in the pool, on the device, no request of it running (with
        `idle`, none waiting either) and no variant swap under way (a batch still in flight is of finished
        requests: evict reads it back)."""
        return (
            self.weights is not None
            and self.on_device
            and not self.scheduler.running
            and not (idle and self.scheduler.waiting)
            and not self.residency.pending
        )

    @property
    def reloadable(self) -> bool:
        """Whether its weights can be dropped on eviction and read again from its checkpoint."""
        return bool(getattr(self.model, "reloadable", False))

    def evict(self, keep: bool) -> list[TokenEvent]:
        """Weights off the device (to host memory with `keep`, else dropped); its pages go back to the pool.
        Returns the events of the batch still in flight (read back first: it reads the weights)."""
        assert self.evictable(idle=False)
        events = self.read_back()
        self.weights.evict(keep or not self.reloadable)
        return events

    def activate(self) -> bool:
        """Weights back on the device at the same addresses (its captured graphs stay valid): from the host
        copy on a side stream, or read again from its checkpoint. False if the pool has no room now."""
        w = self.weights
        if not w.activate():
            return False
        self.became_resident = time.perf_counter()
        if w.host is None:  # dropped: every row again from the checkpoint, and what the model computes

            def reload() -> None:
                self.model.reload_constants()
                self.residency.reload()

            w.load_in_background(reload)
        return True

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a sequence: its blocks go back at once."""
        seq.status, seq.finish_reason, seq.finish_time = Status.FINISHED, reason, time.perf_counter()
        self.scheduler.release(seq)
        self.detok.forget(seq.seq_id)
        self.seqs.pop(seq.seq_id, None)

    def cancel(self, seq_id: int) -> TokenEvent | None:
        """The cancelled request's final event, or None if it is not here (finished, or never was)."""
        seq = self.seqs.get(seq_id)
        if seq is None:
            return None
        self.finish(seq, FinishReason.CANCELLED)
        return final_event(seq, FinishReason.CANCELLED)

    def cancel_all(self) -> list[TokenEvent]:
        return [ev for seq_id in list(self.seqs) if (ev := self.cancel(seq_id)) is not None]

    # ---- stepping ----------------------------------------------------------------------------------------

    def skipped(self) -> None:
        """A step passed it by (the policy, or its weights off the device): its next batch is not back to back
        with its last, so neither its time nor the step-time average counts the gap."""
        self._last_step = None

    def can_launch(self) -> bool:
        """Whether a step could queue a batch now (no batch before its last still on the device)."""
        return self._unread is None or self._unread.ready()

    def on_stream(self) -> AbstractContextManager:
        """Where its GPU work queues: its own stream with multiplex "streams", else the current one."""
        return torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()

    def step(self, wait: bool = True) -> list[TokenEvent]:
        """Queue the next batch, then read back the one queued before it: that batch's events. A batch that
        fails ends its own sequences with FinishReason.ERROR (their KV goes back); raises EngineFailed only
        if the device itself is broken. Without `wait` nothing blocks: a batch before the last one that the
        device still runs is read back by a later step, which queues nothing until it is (so the device
        holds at most two batches of this instance, and the scheduler always sees the tokens of all but the
        last one, as with `wait`)."""
        events: list[TokenEvent] = []
        if self._unread is not None:
            if not self._unread.ready():
                return events
            events, self._unread = self._collect(self._unread), None
        if not self.on_device:  # evicted, or its weights still coming back: its requests wait
            self.skipped()
            return events + self._activation_failed()
        continuing = self._last_step is not None  # it had work at its last step too
        if self.has_work():
            now = time.perf_counter()
            if self._last_step is not None:  # the time a step of this model takes, others' steps included
                dt = now - self._last_step
                self.step_seconds = dt if self.step_seconds is None else 0.8 * self.step_seconds + 0.2 * dt
            self.last_busy = self._last_step = now
        else:
            self._last_step = None
        prev, self._inflight = self._inflight, None
        refused = self._beyond_the_pool()
        batch = self.scheduler.schedule()
        launched, failed = None, None
        if batch:
            try:
                launched = self.runner.launch(batch, prev)
            except Exception as e:
                failed = e
            else:
                self.launches += 1
                launched.queued_behind = continuing
                for s in batch:
                    s.seq.pending += s.samples
        events += refused
        if prev is not None and (wait or prev.ready()):
            events += self._collect(prev)
        elif prev is not None:
            self._unread = prev
        if failed is not None:
            events += self._fail(batch, failed)
        if launched is not None:
            if self.config.overlap:
                self._inflight = launched
            else:
                events += self._collect(launched)
        return events

    def _activation_failed(self) -> list[TokenEvent]:
        """End the waiting requests if its weights could not come back (the next request tries again)."""
        w = self.weights
        if w is None or w.failed is None:
            return []
        message, w.failed = f"{self.models[0]}: {w.failed}", None
        return self.end_waiting(message)

    def end_waiting(self, message: str) -> list[TokenEvent]:
        """End every waiting request with FinishReason.ERROR and `message`; their final events."""
        events = []
        for seq in list(self.scheduler.waiting):
            self.finish(seq, FinishReason.ERROR)
            events.append(final_event(seq, FinishReason.ERROR, message))
        return events

    def _beyond_the_pool(self) -> list[TokenEvent]:
        """End the waiting sequences that no longer fit the pool at all (an elastic pool's share of this model
        can shrink: another model's minimum, or a lower maximum), so they do not hold up the queue."""
        waiting = self.scheduler.waiting
        if not waiting:
            return []
        most = self.pool.capacity
        events = []
        for seq in list(waiting):
            need = self.pool.blocks_for(len(seq) + 1) + self.pool.blocks_for(len(seq.encoder_ids))
            if seq.pending or need <= most:
                continue
            self.finish(seq, FinishReason.ERROR)
            message = f"this request needs {need} KV blocks; its model's share of the pool now holds {most}"
            events.append(final_event(seq, FinishReason.ERROR, message))
        return events

    def read_back(self, wait: bool = True) -> list[TokenEvent]:
        """The events of the batches queued by earlier steps, without queueing another; without `wait`, only
        of those the device has finished."""
        events: list[TokenEvent] = []
        for attr in ("_unread", "_inflight"):
            launched = getattr(self, attr)
            if launched is None:
                continue
            if not (wait or launched.ready()):
                break  # the later batch finishes after this one
            setattr(self, attr, None)
            events += self._collect(launched)
        return events

    def _count(self, launched: Launched) -> None:
        """A batch read back: its time is from the end of this instance's batch before it (on the device, by
        their events; on CPU, by the host's clock), counted when it was queued at a step right after one that
        had work too, so the two ran back to back (with multiplex "serial" the batches of other instances queued
        between count too)."""
        now = time.perf_counter()
        last, self._last_done = self._last_done, (launched.done, now)
        if self.cost is None or last is None or not launched.queued_behind:
            return
        if launched.done is not None and last[0] is not None:
            seconds = last[0].elapsed_time(launched.done) / 1e3
        else:
            seconds = now - last[1]
        self.cost.record(launched.batch, seconds)

    def _collect(self, launched: Launched) -> list[TokenEvent]:
        self.collected += 1
        events: list[TokenEvent] = []
        try:
            chosen, logprobs = launched.read()
            self._advance(launched.batch, chosen, logprobs, events)
        except Exception as e:
            return events + self._fail(launched.batch, e)
        self._count(launched)
        return events

    def _advance(
        self, batch: list[Scheduled], chosen: list[int], logprobs: list[float], events: list[TokenEvent]
    ) -> None:
        now = time.perf_counter()
        for s, token, lp in zip(batch, chosen, logprobs, strict=True):
            if not s.samples:
                continue  # a chunk of a prompt: its next token comes with the prompt's last chunk
            seq = s.seq
            seq.pending -= 1
            if seq.finished:
                continue  # cancelled, or stopped on an earlier token while this row was queued
            seq.output_ids.append(token)
            if seq.params.logprobs:
                seq.logprobs.append(lp)
            seq.first_token_time = seq.first_token_time or now
            text, reason = self.detok.advance(seq, token)
            if reason is not None:
                self.finish(seq, reason)
            done = reason is not None
            events.append(
                TokenEvent(
                    seq.seq_id,
                    seq.request_id,
                    seq.model,
                    token,
                    text,
                    lp,
                    done,
                    reason,
                    "",
                    usage(seq) if done else None,
                )  # fmt: skip
            )

    def _fail(self, batch: list[Scheduled], error: Exception) -> list[TokenEvent]:
        where = self.source.path or self.models[0]
        log.error(
            "a step of %s failed; its %d request(s) end with an error", where, len(batch), exc_info=error
        )
        what = summary(error)
        message = f"the engine step running this request failed ({what})"
        events = []
        for s in batch:
            if s.seq.finished:
                continue  # its final event is out already (cancelled, or stopped before this batch)
            self.finish(s.seq, FinishReason.ERROR)
            events.append(final_event(s.seq, FinishReason.ERROR, message))
        if self.device.type == "cuda":
            try:  # an error on the device itself is sticky: every later step would fail the same way
                torch.cuda.synchronize(self.device)
            except Exception as e:
                raise EngineFailed(f"the device failed: {type(e).__name__}: {e}") from e
        return events

    # ---- outside the scheduler ---------------------------------------------------------------------------

    def ready_row(self, model: str) -> int:
        """The model's row once its weights are in place (for a forward outside any batch, e.g. scoring)."""
        row = self.residency.row(model, self.scheduler.busy_rows())
        while row is None:
            if not self.residency.pending:
                raise InvalidRequest(
                    f"every row of {model}'s instance is busy: let its requests finish first"
                )
            torch.cuda.synchronize(self.device)
            row = self.residency.row(model, self.scheduler.busy_rows())
        return row

    # ---- what it tells the engine ------------------------------------------------------------------------

    def info(self) -> list[ModelInfo]:
        resident = set(self.residency.resident) if self.on_device else set()
        path = str(self.source.path) if self.source.path is not None else ""
        c = self.config
        return [
            ModelInfo(
                m,
                path,
                self.architecture,
                self.kind,
                self.context,
                m in resident,
                c.max_batched_tokens,
                c.max_num_seqs,
                self.decoder_start is not None,
            )
            for m in self.names
        ]

    def loads(self) -> list[ModelLoad]:
        waiting = [s.model for s in self.scheduler.waiting]
        running = [s.model for s in self.scheduler.running]
        c = self.cost
        steps = (c.decode, c.all) if c is not None else ()
        return [ModelLoad(m, waiting.count(m), running.count(m), *steps) for m in self.names]
