"""The engine: a multiplexer over instances (one per store or checkpoint) behind a small typed API.

submit / cancel / step / models / stats / load / unload take and give the plain dataclasses of api.py, so
the server, the benchmark and the eval harness never hold a live engine object. A Policy picks which
instances' work runs in each step.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from moeshare.engine.api import EngineFailed, EngineStats, ModelInfo, Submit, TokenEvent
from moeshare.engine.config import EngineConfig
from moeshare.engine.instance import Instance
from moeshare.engine.planner import build_instance, model_names, open_source, plan, weights_owner
from moeshare.engine.policy import POLICIES, Policy
from moeshare.engine.request import (
    FinishReason,
    LateRequest,
    SamplingParams,
    Sequence,
    UnknownModel,
    clip,
)
from moeshare.engine.stalls import timed_step, watch_compiles
from moeshare.errors import MoeshareError
from moeshare.memory.elastic import ElasticBlockPool
from moeshare.memory.pages import PageManager
from moeshare.memory.weights import arena_pages, host_bytes_available

ACTIVATION_POLL_S = 0.002  # how long a step with nothing to run but activations pauses
# with multiplex "streams", how long a step that found every batch still running pauses
STREAMS_POLL_S = 50e-6
HOST_RESERVE = 4 << 30  # host memory an "auto" eviction leaves free beside the copy it makes

__all__ = ["Engine", "EngineConfig", "EngineFailed", "TokenEvent"]


class Engine:
    def __init__(
        self, paths: list[str | Path | Any], config: EngineConfig | None = None, policy: Policy | None = None
    ) -> None:
        self.config = config or EngineConfig()
        self.config.validate()
        self.device = self.config.torch_device
        self.policy = policy or POLICIES[self.config.policy]()
        self._instances: list[Instance] = []
        self._by_model: dict[str, Instance] = {}
        self._by_seq: dict[int, Instance] = {}
        self._outbox: list[TokenEvent] = []  # final events of requests ended between steps (an unload)
        self._steps = 0
        if self.device.type == "cuda":
            watch_compiles()
        self.pages = None
        if self.config.pool_bytes is not None:  # its pages are made now, outside torch's allocator
            self.pages = PageManager.for_device(
                self.device, self.config.pool_bytes, self.config.pool_page_bytes
            )
            self.pages.streams = self._streams
        limit = self.config.memory_limit_bytes
        if limit is not None and self.device.type == "cuda":  # hold the caching allocator to the rest too
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            total = torch.cuda.get_device_properties(index).total_memory
            torch.cuda.set_per_process_memory_fraction(
                max(0.0, min(1.0, (limit - self._pool_bytes) / total)), index
            )
        for path in paths:
            self.load(path)

    # ---- models ------------------------------------------------------------------------------------------

    def load(self, target: str | Path | Any, name: str | None = None) -> list[str]:
        """Serve a store, an HF checkpoint (as `name` if given), or any object with Source's interface (e.g.
        a synthetic source). Returns the names of the models it serves."""
        source = open_source(target)
        names = model_names(source, name)
        if clash := [m for m in names if m in self._by_model]:
            raise MoeshareError(f"{target}: model {clash[0]!r} is already served; unload it first")
        if self.pages is not None:  # room in the pool for its weights and KV scratch page: idle models leave
            placement = plan(source, self.config, self._left(), target, self.pages).placement
            # its weights (and their storages' alignment in the range) and its KV scratch block's page
            need = arena_pages(self.pages.pages_for(placement.rows + placement.banks + (1 << 16))) + 1
            self._evict_for(None, weights_owner(next(iter(names))), need)
        instance = build_instance(source, names, self.config, self._left(), target, self.pages)
        self._instances.append(instance)
        for m in instance.models:
            self._by_model[m] = instance
        self._share_weights()
        return instance.models

    def _share_weights(self) -> None:
        """Tell each model's KV pool whose weights could leave the device for it (every model's in the pool,
        idle ones at once, busy ones once drained) and which must stay (its own): the longest request it can
        take counts on that room, whichever models are on the device when it arrives."""
        owners = self._weight_owners()
        for i in self._instances:
            if isinstance(i.pool, ElasticBlockPool):
                i.pool.evictable = owners
                i.pool.beside = i.weights.npages if i.weights is not None else 0

    def _weight_owners(self) -> frozenset[str]:
        """The page pool's owners of every instance's weights."""
        return frozenset(i.weights.region.owner for i in self._instances if i.weights is not None)

    def check_fits(self, targets: list[tuple[str | Path | Any, str | None]]) -> None:
        """Raise the one-line error that loading these (target, name) pairs in order would raise for their
        architecture or the memory limit, without reading weights or allocating anything."""
        left = self._left()
        for target, _ in targets:
            placement = plan(open_source(target), self.config, left, target, self.pages).placement
            if left is not None:
                left -= placement.work if self.pages is not None else placement.total

    def _left(self) -> int | None:
        """What the memory limit leaves for the next instance (None: no limit)."""
        limit = self.config.memory_limit_bytes
        if limit is None:
            return None
        return limit - self._pool_bytes - sum(i.placed_bytes for i in self._instances)

    @property
    def _pool_bytes(self) -> int:
        """The elastic KV pool's share of the memory limit (0 with fixed pools: each instance places its own)."""
        return self.pages.total_bytes if self.pages is not None else 0

    def unload(self, model: str) -> list[str]:
        """Stop serving the instance that holds `model`: its requests end (CANCELLED, their KV goes back at
        once; their final events come out of the next step) and its memory is dropped. Returns the models
        that were unloaded."""
        instance = self._instance(model)
        if instance.stream is not None:  # its batches on its own stream finish before its memory goes back
            instance.stream.synchronize()
        for ev in instance.cancel_all():
            self._by_seq.pop(ev.seq_id, None)
            self._outbox.append(ev)
        self._instances.remove(instance)
        instance.pool.release()
        if instance.weights is not None:
            if instance.weights.ready is not None:  # an activation's copy or re-read still writes its pages
                instance.weights.ready.synchronize()
            instance.weights.release()
        for m in instance.models:
            del self._by_model[m]
        self._share_weights()
        if self.config.torch_device.type == "cuda":  # give its memory back to the device, not the cache,
            torch.cuda.empty_cache()  # so the next load sizes its KV pool from what is really free
        return instance.models

    def set_kv_limits(self, model: str, least_bytes: int = 0, most_bytes: int | None = None) -> None:
        """Keep `least_bytes` of the elastic KV pool for `model`'s instance and hold it to `most_bytes` (None:
        no cap), rounded to pages. A one-line MoeshareError, nothing changed, for fixed pools, limits that
        contradict the pool or each other, or a maximum below one request of the model's full context."""
        instance = self._instance(model)
        pages = self.pages
        if pages is None:
            raise MoeshareError("KV limits are for the elastic KV pool: give --pool GIB (pool_bytes)")
        least = pages.pages_for(least_bytes)
        most = None if most_bytes is None else most_bytes // pages.page_bytes
        pool = instance.pool
        if most is not None:
            need = pool.pages_to_hold(pool.blocks_for(instance.context))
            if most < need:
                raise MoeshareError(
                    f"{model}: a KV maximum of {most} pages ({most_bytes / 2**30:.3f} GiB) cannot hold one "
                    f"request of its {instance.context}-token context ({need} pages): raise it"
                )
        pages.set_limits(pool.region.owner, least, most)

    def models(self) -> list[ModelInfo]:
        return [info for i in self._instances for info in i.info()]

    def serves(self, model: str) -> bool:
        """Whether `model` is served (safe from any thread)."""
        return model in self._by_model

    def instance(self, model: str) -> Instance:
        """The live instance serving `model`: for in-process inspection (tests, GPU checks), not an API."""
        return self._instance(model)

    @torch.inference_mode()
    def teacher_forced(self, model: str, ids: list[int]) -> torch.Tensor:
        """Next-token logits at every position of `ids` [T, V], float32 (the eval scorers): one prefill of
        `model`'s row outside any batch, its KV blocks borrowed from the instance's pool and returned."""
        instance = self._instance(model)
        w = instance.weights
        if w is not None and not (w.resident and w.copied()):  # bring it back first, and wait for it
            if not w.resident and not self._bring_back(instance):
                raise MoeshareError(
                    f"{model}: its weights are off the device and the pool has no room for them now"
                )
            if w.ready is not None:
                w.ready.synchronize()
            if not w.copied():
                raise MoeshareError(f"{model}: {w.failed}")
        with instance.on_stream():  # behind its own batches (the blocks it borrows were theirs)
            logits = instance.runner.prefill_logits(instance.ready_row(model), ids)
        self._join_streams()
        if instance.stream is not None:  # read on this stream now: its memory is not reused before that
            logits.record_stream(torch.cuda.current_stream(self.device))
        return logits

    def tokenizer(self, model: str):
        """`model`'s tokenizer (None if it has none); an in-process convenience."""
        return self._instance(model).tokenizers[model]

    def _instance(self, model: str) -> Instance:
        # one lookup and a copy of the names: other threads call this (prepare) while load/unload change it
        instance = self._by_model.get(model)
        if instance is None:
            served = ", ".join(list(self._by_model)) or "none"
            raise UnknownModel(f"unknown model {clip(model)}; served models: {served}")
        return instance

    # ---- requests ----------------------------------------------------------------------------------------

    def prepare(self, model: str, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Validate a request and tokenize its prompt; returns the prompt's token ids. Touches nothing, so
        any thread may call it (the server tokenizes long prompts off the engine thread)."""
        return self._instance(model).prepare(model, prompt, params)

    def submit(self, request: Submit) -> int:
        """Validate and queue; returns the request's handle (seq_id in its events). Raises before anything
        is touched if the request is bad."""
        instance = self._instance(request.model)
        params = request.params
        ids = instance.prepare(request.model, request.prompt, params)
        if params.seed is None:
            params = replace(params, seed=int.from_bytes(os.urandom(6), "little"))
        request.targets.validate()
        t = request.targets
        if t.refuse_if_late and t.ttft is not None:
            expect = instance.ttft_estimate(len(ids))
            if expect is not None and expect > t.ttft:
                raise LateRequest(
                    f"the work queued ahead of this request would take about {expect:.3f} s before its first "
                    f"token, above its TTFT target of {t.ttft:.3f} s: retry later or raise the target"
                )
        seq = Sequence(
            request.model,
            ids,
            params,
            request_id=request.request_id,
            targets=request.targets,
            arrival=time.perf_counter(),
        )
        instance.add(seq)
        self._by_seq[seq.seq_id] = instance
        return seq.seq_id

    def cancel(self, seq_id: int) -> TokenEvent | None:
        """End a request now (its KV goes back at once); its final CANCELLED event with usage, or None if it
        had already finished or never was."""
        instance = self._by_seq.pop(seq_id, None)
        return instance.cancel(seq_id) if instance is not None else None

    def has_work(self) -> bool:
        return bool(self._outbox) or any(i.has_work() for i in self._instances)

    def step(self) -> list[TokenEvent]:
        """One batch for each instance the policy picks. A batch that fails ends its own requests with
        FinishReason.ERROR and the engine serves on; raises EngineFailed only if the device is broken."""
        parts: dict[str, float] = {}  # where a slow step's time went (stalls.py)
        with timed_step(parts):
            return self._step(parts)

    def _step(self, parts: dict[str, float]) -> list[TokenEvent]:
        events, self._outbox = self._outbox, []
        start = time.perf_counter()
        self._manage_memory()
        parts["memory"] = time.perf_counter() - start
        picked = self.policy.pick(self._instances)
        # multiplex "streams": no instance waits for another's batch; each queues its next one as soon as the
        # one before its last is done, so a model with short steps takes more of them
        wait = self.config.multiplex != "streams"
        launches = sum(i.launches for i in self._instances)
        progress = launches + sum(i.collected for i in self._instances)
        for instance in picked:
            start = time.perf_counter()
            with instance.on_stream():
                events += instance.step(wait)
            parts[next(iter(instance.names))] = time.perf_counter() - start
        for instance in self._instances:  # a batch queued by the last step is read back whatever runs now
            if instance not in picked:
                instance.skipped()
                events += instance.read_back(wait)
        if launches != sum(i.launches for i in self._instances):
            self._join_streams()  # the current stream already waits for what was queued before
        if not wait and progress == sum(i.launches + i.collected for i in self._instances):
            time.sleep(STREAMS_POLL_S)  # every batch still on the device: a moment's pause, not a spin
        for ev in events:
            if ev.finished:
                self._by_seq.pop(ev.seq_id, None)
        if self.pages is not None:  # pages given back this step: one event behind the work queued
            self.pages.fence()
            if not any(i.has_work() and i.on_device for i in self._instances) and any(
                i.has_work() for i in self._instances
            ):  # only models whose weights are on their way have work: a moment's pause, not a spin (nor a
                time.sleep(ACTIVATION_POLL_S)  # wait for them: the server takes new requests between steps)
        self._steps += 1
        return events

    def _streams(self) -> list[torch.cuda.Stream]:
        return [i.stream for i in self._instances if i.stream is not None]

    def _join_streams(self) -> None:
        """With multiplex "streams": the device's current stream waits for every instance's work queued so
        far, so what it queues next (the page pool's fence, an eviction's copy, a scoring pass) comes after
        every read of the pages and weights it may hand on to another model."""
        streams = self._streams()
        if streams:
            current = torch.cuda.current_stream(self.device)
            for stream in streams:
                current.wait_stream(stream)

    # ---- weights on and off the device (the page pool) ---------------------------------------------------

    def maintain(self) -> None:
        """Evict the models idle for longer than evict_after; the server calls it while there is no work."""
        self._manage_memory()

    def evict(self, model: str) -> None:
        """Move `model`'s instance's weights off the device now (a one-line error if it has requests in the
        engine, or its weights are not in the page pool)."""
        instance = self._instance(model)
        if instance.weights is None:
            raise MoeshareError(f"{model}: its weights are not in the page pool (serve with --pool)")
        if not instance.weights.resident:
            return
        if not instance.evictable():
            raise MoeshareError(f"{model}: it has requests in the engine; evict it once they are done")
        self._outbox += instance.evict(self._keep_on_host(instance))

    def _keep_on_host(self, instance: Instance) -> bool:
        """Whether an eviction copies the weights to host memory (else they are read again from the
        checkpoint): evict_to, and for "auto" whether host memory has room for them."""
        how = self.config.evict_to
        if how == "host" or instance.weights.host is not None:  # a copy there already costs nothing more
            return True
        if how == "disk":
            return False
        free = host_bytes_available()
        return free is None or free > 1.25 * instance.weights.nbytes + HOST_RESERVE

    def _manage_memory(self) -> None:
        """Once a step: bring back evicted models that have requests (evicting idle ones for the pages),
        evict idle ones for a model whose waiting requests find no KV blocks, and those idle too long."""
        if self.pages is None:
            return
        now = time.perf_counter()
        draining: set[Instance] = set()
        for instance in self._instances:
            w = instance.weights
            if w is None or w.resident or not instance.has_work():
                instance.wants_device_since = None
                continue
            if self._bring_back(instance):
                instance.wants_device_since = None
                continue
            if self._never_fits(instance):
                continue
            since = instance.wants_device_since = instance.wants_device_since or now
            if now - since > self.config.activation_wait:
                draining |= self._drain_for(instance, w.region.owner, w.npages)
        for instance in self._instances:
            waiting = instance.scheduler.waiting
            if instance.on_device and waiting and not waiting[0].pending:
                need = instance.pool.blocks_for(len(waiting[0]) + 1)
                if not instance.pool.can_allocate(need):
                    owner, pages = instance.pool.region.owner, instance.pool.pages_to_hold(need)
                    if not self._evict_for(instance, owner, pages, at_most=1) and pages > self.pages.most(
                        owner
                    ):
                        # a request that fits only once busy models' weights leave (its ceiling counts on
                        # that): they finish what they run and go, as for an activation
                        draining |= self._drain_for(instance, owner, pages)
        for instance in self._instances:
            instance.scheduler.admitting = instance not in draining
        after = self.config.evict_after
        if after is not None:
            for instance in self._instances:
                if instance.evictable() and now - instance.last_busy > after:
                    self._outbox += instance.evict(self._keep_on_host(instance))

    @staticmethod
    def _may_leave(instance: Instance) -> bool:
        """Idle, or drained for another model (its waiting requests then wait off the device)."""
        return instance.evictable() or (not instance.scheduler.admitting and instance.evictable(idle=False))

    def _bring_back(self, instance: Instance) -> bool:
        """Start activating an evicted instance, evicting idle ones for its pages if need be; whether it
        started."""
        w = instance.weights
        return instance.activate() or (
            self._evict_for(instance, w.region.owner, w.npages) and instance.activate()
        )

    def _never_fits(self, instance: Instance) -> bool:
        """Whether `instance`'s weights could not come back even if every other model's left (the others' KV
        minimums and scratch pages hold the rest): then its waiting requests end, one line each."""
        w = instance.weights
        room = self.pages.most(w.region.owner, evictable=self._weight_owners())
        if room >= w.npages:
            return False
        self._outbox += instance.end_waiting(
            f"{instance.models[0]}: its weights need {w.npages} pages of the pool and the other models' KV "
            f"minimums and scratch pages leave {room}: lower --kv-min or grow --pool"
        )
        return True

    def _drain_for(self, instance: Instance, owner: str, pages: int) -> set[Instance]:
        """`instance` needs `pages` pages for `owner` (its weights, or its KV) that busy models' weights hold:
        the busy models that have been on the device longest start no new requests until enough pages could
        come free (their running requests finish, then they leave), so no model keeps another off for good."""
        busy = sorted(
            (
                i
                for i in self._instances
                if i is not instance and i.weights is not None and i.weights.resident
            ),
            key=lambda i: i.became_resident,
        )
        could, drain = self.pages.room(owner), set()
        for other in busy:
            if could >= pages:
                break
            drain.add(other)
            could += other.weights.npages
        return drain

    def _evict_for(
        self, instance: Instance | None, owner: str, pages: int, at_most: int | None = None
    ) -> bool:
        """Evict idle instances other than `instance`, least recently busy first, until `owner` has room for
        `pages` pages of the pool (at most `at_most` of them); whether it has. Evicts nobody if even every
        idle instance leaving would not make the room."""
        pool = self.pages
        idle = [i for i in self._instances if i is not instance and self._may_leave(i)]
        freed = sum(i.weights.npages for i in idle)
        could = min(  # the owner's room if every idle instance left: its cap grows, and the free pages
            pool.most(owner) + freed - pool.in_use(owner),
            pool.available_pages() + freed - pool.kept_for_others(owner),
        )
        if could < pages:
            return False
        for victim in sorted(idle, key=lambda i: i.last_busy)[:at_most]:
            if pool.room(owner) >= pages:
                break
            self._outbox += victim.evict(self._keep_on_host(victim))
        return pool.room(owner) >= pages

    def stats(self) -> EngineStats:
        xs = self._instances
        return EngineStats(
            steps=self._steps,
            running=sum(len(i.scheduler.running) for i in xs),
            waiting=sum(len(i.scheduler.waiting) for i in xs),
            kv_blocks_used=sum(i.pool.used_blocks for i in xs),
            kv_blocks_free=sum(i.pool.held_free_blocks for i in xs),  # the pool's free pages: in `pages`
            resident_variants=[m for i in xs for m in i.residency.resident],
            swap_ins=sum(i.residency.swap_ins for i in xs),
            swap_seconds=sum(i.residency.swap_seconds for i in xs),
            preemptions=sum(i.scheduler.preemptions for i in xs),
            offloaded_layers=sum(i.offloaded_layers for i in xs),
            models=[load for i in xs for load in i.loads()],
            pages=self.pages.stats() if self.pages is not None else None,
        )

    # ---- conveniences ------------------------------------------------------------------------------------

    def generate(
        self, model: str, prompt: str | list[int], params: SamplingParams | None = None
    ) -> tuple[str, list[int]]:
        """Run one request to the end (other queued requests advance too): its text and token ids."""
        seq_id = self.submit(Submit(model, prompt, params or SamplingParams()))
        pieces: list[str] = []
        tokens: list[int] = []
        done = False
        while not done:
            for ev in self.step():
                if ev.seq_id != seq_id:
                    continue
                if ev.finish_reason is FinishReason.ERROR:
                    raise MoeshareError(ev.error)
                pieces.append(ev.text)
                tokens += [ev.token_id] if ev.token_id >= 0 else []
                done = ev.finished
        return "".join(pieces), tokens
