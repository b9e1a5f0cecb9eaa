"""The front end over several engines on Ray: the same surface as EngineWorker (prepare, submit, cancel, ask,
alive, stop), so the gRPC and HTTP servers run unchanged over one GPU or many.

Each store or checkpoint is placed on one or more engine actors (placement.py) and loaded there; a request goes
to the replica of its model with the fewest requests in flight and its token events stream back through Ray's
streaming generator; a caller that stops reading cancels the remote request (its KV goes back on that GPU).
Listing and stats gather every engine's. Every `replan_s` seconds the front end places the models again from
the requests each received since, and moves what moved: loaded on the new GPU, routed there, drained and
unloaded from the old one, so no request fails for it. An engine that dies fails its in-flight requests with
EngineUnavailable (UNAVAILABLE); what it held is placed again on the engines left, and serving goes on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from typing import Any

from moeshare.cluster.actor import remote_class
from moeshare.cluster.placement import Demand, PlacementError, Plan, moves, place
from moeshare.engine.api import EngineFailed, EngineStats, EngineUnavailable, ModelInfo, ModelLoad, Submit
from moeshare.engine.config import EngineConfig
from moeshare.engine.request import FinishReason, SamplingParams, UnknownModel, clip
from moeshare.errors import MoeshareError
from moeshare.server.messages import (
    CancelAll,
    ListModels,
    Load,
    Operation,
    SetKvLimits,
    TakeSnapshot,
    Ticket,
    Unload,
)
from moeshare.server.snapshot import ModelSnapshot, Snapshot
from moeshare.server.worker import FatalHook, FinishHook, named_path

log = logging.getLogger(__name__)

EXPECTED_KV_BLOCKS = 2048  # KV a model is placed with when --kv-blocks does not say (32k tokens of 16)
MAX_DECISIONS = 64  # the newest placement decisions GetStats shows
DRAIN_S = 30.0
START_S = 300.0  # how long the engine actors may take to start (each imports torch, then waits for a GPU)  # how long a moved replica may finish its requests before it is unloaded anyway


@dataclass
class _Source:
    """One store or checkpoint as Load names it: its Load message, size, the models it serves, where it is."""

    load: Load
    bytes: int
    models: tuple[str, ...] = ()
    replicas: list[int] = field(default_factory=list)
    draining: set[int] = field(default_factory=set)  # replicas no longer routed to, waiting to be unloaded
    kv_limits: SetKvLimits | None = None  # the last limits set for it, applied to every replica

    @property
    def label(self) -> str:
        """How Load named it: PATH, NAME=PATH or a synthetic spec."""
        return (self.load.paths or self.load.synthetic)[0]


def engine_config(config: EngineConfig) -> EngineConfig:
    """What each engine actor runs with: the server's config, with the KV every model is placed with (with
    --pool, each engine's own page pool, where KV follows the load, as on one GPU)."""
    if config.pool_bytes is not None:
        return config
    return replace(config, kv_blocks=config.kv_blocks or EXPECTED_KV_BLOCKS)


def demand_bytes(load: Load, config: EngineConfig, memory: int) -> int:
    """Device bytes a store or checkpoint is placed with on an engine of `memory` bytes: weights (MoE layers
    that do not fit wait in host memory, as one engine's memory limit has them), work space and its KV.
    Planned on the host without touching a GPU: on CUDA with the largest step budgets an engine derives and
    the caching allocator's slack."""
    from moeshare.engine.budget import SEQS_RANGE, TOKENS_RANGE
    from moeshare.engine.placement import CUDA_ALLOCATOR_SLACK
    from moeshare.engine.planner import open_source, plan
    from moeshare.engine.synthetic import from_spec, named_spec

    if load.paths:
        target: Any = named_path(load.paths[0])[1]
    else:
        target = from_spec(named_spec(load.synthetic[0])[1], "meta")
    c = engine_config(config)
    slack = 0
    if c.torch_device.type == "cuda":
        seqs, tokens = c.max_num_seqs or SEQS_RANGE[1], c.max_batched_tokens or TOKENS_RANGE[1]
        c, slack = replace(c, max_num_seqs=seqs, max_batched_tokens=tokens), CUDA_ALLOCATOR_SLACK
    host, source = replace(c, device="cpu", dtype=c.torch_dtype), open_source(target)
    try:
        return plan(source, host, max(0, memory - slack), target).placement.total + slack
    except MoeshareError:  # too large for any engine even with its MoE layers in host memory: its whole
        return plan(source, host, None, target).placement.total + slack  # size, which placement refuses


class ClusterWorker:
    def __init__(
        self,
        config: EngineConfig,
        engines: int,
        address: str | None = None,
        max_queue: int = 256,
        on_finish: FinishHook | None = None,
        on_fatal: FatalHook | None = None,
        capacity: float | None = None,
        replan_s: float | None = None,
    ) -> None:
        if engines < 1:
            raise MoeshareError(f"--gpus {engines}: give 1 or more")
        self.config, self.engines, self.address = config, engines, address
        self.max_queue, self.on_finish, self.on_fatal = max_queue, on_finish, on_fatal
        self.capacity, self.replan_s = capacity, replan_s
        self.failure: str | None = None
        self.decisions: deque[str] = deque(maxlen=1000)  # placement decisions, newest last
        self._actors: list[Any] = []
        self._memory: list[int] = []
        self._dead: dict[int, str] = {}
        self._sources: list[_Source] = []
        self._inflight: Counter[int] = Counter()  # requests (and prompts being prepared) per engine
        self._by_engine_model: Counter[tuple[int, str]] = Counter()
        self._requests: Counter[str] = Counter()  # requests per model since the last re-plan
        self._tasks: dict[int, asyncio.Task] = {}
        self._lock = threading.RLock()  # the tables above
        self._placing = threading.Lock()  # one load, unload, re-plan or re-placement at a time
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="moeshare-cluster")
        self._stopping = threading.Event()
        self._replanner: threading.Thread | None = None
        self._started_ray = False

    # ---- life ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start (or join) the Ray cluster and an engine actor per GPU; once (a second call does nothing)."""
        import ray

        if self._actors:
            return
        cuda = self.config.torch_device.type == "cuda"
        if not ray.is_initialized():
            # on a small busy machine a new cluster's processes can take more than Ray's 60 s to reach each other
            os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", "300")
            os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
            try:
                if self.address:
                    ray.init(address=self.address, log_to_driver=False)
                else:  # a local cluster: one CPU per engine, the GPUs it finds
                    ray.init(address="local", num_cpus=self.engines + 1, include_dashboard=False,
                             log_to_driver=False, object_store_memory=256 << 20)  # fmt: skip
            except Exception as e:
                where = (
                    f"join the Ray cluster at {self.address}" if self.address else "start a local Ray cluster"
                )
                raise MoeshareError(f"--gpus: could not {where}: {str(e).splitlines()[0][:300]}") from None
            self._started_ray = True
        if cuda and ray.cluster_resources().get("GPU", 0) < self.engines:
            have = int(ray.cluster_resources().get("GPU", 0))
            raise MoeshareError(f"--gpus {self.engines}: the Ray cluster has {have} GPU(s)")
        actor = remote_class(1 if cuda else 0)
        self._actors = [
            actor.remote(engine_config(self.config), i, self.max_queue) for i in range(self.engines)
        ]
        try:
            self._memory = ray.get([a.memory.remote() for a in self._actors], timeout=START_S)
        except ray.exceptions.GetTimeoutError:
            kind = "GPUs" if cuda else "CPUs"
            raise MoeshareError(
                f"--gpus {self.engines}: the engines did not start within {START_S:.0f} s (does the Ray cluster "
                f"have {self.engines} free {kind}?)"
            ) from None
        if self.replan_s:
            self._replanner = threading.Thread(target=self._replan_loop, name="moeshare-replan", daemon=True)
            self._replanner.start()

    @property
    def alive(self) -> bool:
        return self.failure is None and len(self._dead) < len(self._actors)

    def stop(self) -> None:
        import ray

        self._stopping.set()
        live = [a for i, a in enumerate(self._actors) if i not in self._dead]
        try:  # every engine ends its requests and its thread, side by side
            ray.get([a.stop.remote() for a in live], timeout=30)
        except Exception:  # they are going away either way
            pass
        for a in live:
            ray.kill(a)
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._started_ray:
            ray.shutdown()

    # ---- requests (from the asyncio side) -----------------------------------------------------------------

    def _live(self, model: str) -> list[int]:
        with self._lock:
            for s in self._sources:
                if model in s.models:
                    return [g for g in s.replicas if g not in self._dead and g not in s.draining]
        return []

    def _pick(self, model: str) -> int:
        """The engine of `model` with the fewest requests in flight, counted as one more now (in the same hold
        of the lock, so a drain that waits for none cannot miss it); `_done` when it ends."""
        with self._lock:
            live = self._live(model)
            if not live:
                if self.serves(model):
                    raise EngineUnavailable(f"no engine holding {clip(model)} is up; retry shortly")
                served = ", ".join(sorted(m for s in self._sources for m in s.models)) or "none"
                raise UnknownModel(f"unknown model {clip(model)}; served models: {served}")
            g = min(live, key=lambda g: (self._inflight[g], g))
            self._inflight[g] += 1
            self._by_engine_model[g, model] += 1
            return g

    def _done(self, g: int, model: str) -> None:
        with self._lock:
            self._inflight[g] -= 1
            self._by_engine_model[g, model] -= 1

    def _error(self, g: int, e: Exception) -> Exception:
        """What a Ray error from engine g is to the caller: the engine's own exception (its one line, not Ray's
        traceback), or EngineUnavailable when the engine is gone (noted, and its models placed again)."""
        import ray

        if isinstance(e, ray.exceptions.RayTaskError):
            cause = e.cause
            if isinstance(cause, EngineFailed):  # its engine thread died: that engine is of no more use
                return EngineUnavailable(
                    f"the engine on GPU {g} went away ({self._lost(g, str(cause))}); retry"
                )
            return cause if isinstance(cause, Exception) else EngineUnavailable(str(e).splitlines()[-1])
        if isinstance(e, ray.exceptions.RayActorError):
            why = self._lost(g, str(e).splitlines()[0][:200])
            return EngineUnavailable(f"the engine on GPU {g} went away ({why}); retry the request")
        return EngineUnavailable(f"the engine on GPU {g} did not answer ({type(e).__name__}: {e}); retry")

    def _call(self, model: str, method: str, *args) -> Any:
        """`method` on an engine of `model`; once more on another if that one no longer holds it (a replica
        unloaded by a re-plan between the pick and the call)."""
        try:
            return self._call_once(model, method, *args)
        except UnknownModel:
            if not self.serves(model):
                raise
            return self._call_once(model, method, *args)

    def _call_once(self, model: str, method: str, *args) -> Any:
        import ray

        g = self._pick(model)
        try:
            return ray.get(getattr(self._actors[g], method).remote(*args))
        except Exception as e:
            raise self._error(g, e) from None
        finally:
            self._done(g, model)

    def prepare(self, model: str, prompt: str | list[int], params: SamplingParams) -> list[int]:
        return self._call(model, "prepare", model, prompt, params)

    def chat_prompt(self, model: str, messages: list[dict[str, str]]) -> str:
        return self._call(model, "chat_prompt", model, messages)

    def serves(self, model: str) -> bool:
        with self._lock:
            return any(model in s.models for s in self._sources)

    def submit(self, request: Submit, ticket: Ticket) -> Future[int]:
        """Send a request to an engine of its model (call it on the ticket's event loop, as request_events
        does); the future is the engine's handle, or its validation error."""
        if self.failure is not None:
            raise EngineFailed(self.failure)
        g = self._pick(request.model)
        with self._lock:
            self._requests[request.model] += 1
        future: Future[int] = Future()
        task = ticket.loop.create_task(self._stream(g, request, ticket, future))
        self._tasks[id(ticket)] = task

        def ended(_: asyncio.Task) -> None:  # also when it was cancelled before it ran
            self._tasks.pop(id(ticket), None)
            self._done(g, request.model)
            if not future.done():
                future.cancel()

        task.add_done_callback(ended)
        return future

    def cancel(self, ticket: Ticket) -> None:
        task = self._tasks.pop(id(ticket), None)
        if task is not None:
            task.cancel()

    async def _stream(self, g: int, request: Submit, ticket: Ticket, future: Future[int]) -> None:
        import ray

        stream = None
        try:
            stream = self._actors[g].generate.options(num_returns="streaming").remote(request)
            async for ref in stream:
                item = await ref
                if not future.done():
                    future.set_result(item)
                    continue
                ticket.events.put_nowait(item)
                ended = item.finish_reason not in (FinishReason.ERROR, FinishReason.CANCELLED)
                if item.finished and ended and item.usage is not None and item.usage.first_token is not None:
                    if self.on_finish:
                        u = item.usage
                        self.on_finish(item.model, u.ttft, u.tpot, u.total, u.met_targets)
        except asyncio.CancelledError:
            if stream is not None:
                ray.cancel(stream)  # the remote generator's finally cancels the request: its KV goes back
            raise
        except Exception as e:  # the engine's error, or the engine gone: the caller hears of it either way
            error = self._error(g, e)
            if not future.done():
                future.set_exception(error)
            else:
                ticket.events.put_nowait(error)

    # ---- operations ---------------------------------------------------------------------------------------

    def ask(self, operation: Operation) -> Future[Any]:
        if self.failure is not None:
            raise EngineFailed(self.failure)
        return self._pool.submit(self._answer, operation)

    def _each(
        self, method: str, *args, engines: list[int] | None = None, skip_lost: bool = False
    ) -> list[Any]:
        """Call `method` on these engines (default: all up) side by side; their answers in order. An engine
        found gone is noted (and its models placed again); with skip_lost it is left out, else the call
        raises EngineUnavailable."""
        import ray

        chosen = [
            g for g in (engines if engines is not None else range(len(self._actors))) if g not in self._dead
        ]
        refs = [getattr(self._actors[g], method).remote(*args) for g in chosen]
        out, failed = [], None
        for g, ref in zip(chosen, refs, strict=True):
            try:
                out.append(ray.get(ref))
            except Exception as e:
                error = self._error(g, e)
                if not (skip_lost and isinstance(error, EngineUnavailable)):
                    failed = failed or error
        if failed is not None:
            raise failed
        return out

    def _answer(self, op: Operation) -> Any:
        if isinstance(op, Load):
            with self._placing:
                return self._load(op)
        if isinstance(op, Unload):
            with self._placing:
                return self._unload(op.model)
        if isinstance(op, ListModels):
            seen: dict[str, ModelInfo] = {}
            for infos in self._each("ask", op, skip_lost=True):
                for info in infos:
                    seen.setdefault(info.name, info)
            return list(seen.values())
        if isinstance(op, TakeSnapshot):
            snap = merge_snapshots(self._each("ask", op, skip_lost=True))
            where = self.placement()
            for m in snap.models:
                m.engines = sorted(where.get(m.name, []))
            snap.placement = list(self.decisions)[-MAX_DECISIONS:]
            return snap
        if isinstance(op, CancelAll):
            self._each("ask", op, skip_lost=True)
            return None
        if isinstance(op, SetKvLimits):
            live = self._live(op.model)
            if not live:
                raise UnknownModel(f"unknown model {clip(op.model)}")
            answer = self._each("ask", op, engines=live)[0]
            with self._lock:  # and on the replicas made later (a re-plan, an engine lost)
                next(s for s in self._sources if op.model in s.models).kv_limits = op
            return answer
        raise TypeError(f"unknown operation {type(op).__name__}")

    def _load(self, op: Load) -> list[str]:
        """Place and load each store or checkpoint (under _placing); a model name already served is refused
        and what was loaded for it unloaded again."""
        parts = [Load((p,), ()) for p in op.paths] + [Load((), (s,)) for s in op.synthetic]
        most = max(self._memory)
        new = [_Source(p, demand_bytes(p, self.config, most)) for p in parts]
        with self._lock:
            plan = self._plan_new(new)
        names: list[str] = []
        for s in new:
            gpus = list(plan.replicas[s.label])
            loaded = self._each("ask", s.load, engines=gpus)
            models = tuple(loaded[0])
            if clash := [m for m in models if self.serves(m)]:
                self._each("ask", Unload(models[0]), engines=gpus, skip_lost=True)
                raise MoeshareError(
                    f"{clip(clash[0])} is already served: unload it first or load it by another name"
                )
            s.models, s.replicas = models, gpus
            with self._lock:
                self._sources.append(s)
            names += s.models
        return names

    def _load_on(self, s: _Source, engines: list[int]) -> list[Any]:
        """Load a known source on more engines, with the KV limits set for it."""
        loaded = self._each("ask", s.load, engines=engines)
        if s.kv_limits is not None:
            self._each("ask", s.kv_limits, engines=engines)
        return loaded

    def _plan_new(self, new: list[_Source]) -> Plan:
        """Place new sources beside what is loaded (which stays where it is)."""
        room = [m - u for m, u in zip(self._memory, self._used(), strict=True)]
        alive = [g for g in range(len(self._actors)) if g not in self._dead]
        plan = place([Demand(s.label, s.bytes) for s in new], room, None, None, alive)
        self._decide(list(plan.decisions))
        return plan

    def _used(self) -> list[int]:
        """The bytes placed on each engine now."""
        used = [0] * len(self._memory)
        with self._lock:
            for s in self._sources:
                for g in s.replicas:
                    used[g] += s.bytes
        return used

    def _decide(self, lines: list[str]) -> None:
        for line in lines:
            log.warning("placement: %s", line)
            self.decisions.append(line)

    def _unload(self, model: str) -> list[str]:
        with self._lock:
            source = next((s for s in self._sources if model in s.models), None)
        if source is None:
            raise UnknownModel(f"unknown model {clip(model)}")
        self._each("ask", Unload(model), engines=source.replicas, skip_lost=True)
        with self._lock:
            self._sources.remove(source)
        return list(source.models)

    # ---- faults and re-placement ----------------------------------------------------------------------------

    def _lost(self, g: int, why: str) -> str:
        """Engine g is gone: its sources are placed again on the engines left (once, in the background)."""
        import ray

        with self._lock:
            if g in self._dead:
                return self._dead[g]
            self._dead[g] = why
        if self._stopping.is_set():
            return why
        ray.kill(self._actors[g])  # if it is only unreachable, it must not keep its GPU's memory
        self._decide([f"GPU {g}'s engine went away ({why})"])
        if len(self._dead) == len(self._actors):
            self.failure = "every engine went away; the server is going down"
            if self.on_fatal:
                self.on_fatal(self.failure)
        else:
            self._pool.submit(self._replace_lost, g)
        return why

    def _replace_lost(self, g: int) -> None:
        with self._placing:
            try:
                with self._lock:
                    orphans = [s for s in self._sources if g in s.replicas]
                    for s in orphans:
                        s.replicas.remove(g)
                        s.draining.discard(g)
                    homeless = [s for s in orphans if not s.replicas]
                    plan = self._plan_new(homeless) if homeless else None
                for s in homeless:
                    gpus = list(plan.replicas[s.label])
                    self._load_on(s, gpus)
                    with self._lock:
                        s.replicas = gpus
            except Exception as e:  # its models stay without an engine; said where operators look
                self._decide([f"the models of GPU {g}'s engine could not be placed again ({e})"])

    def _replan_loop(self) -> None:
        while not self._stopping.wait(self.replan_s):
            try:
                self.replan()
            except Exception as e:  # a re-plan that cannot be made leaves things where they are
                log.warning("placement: no re-plan (%s)", e)

    def replan(self) -> list[str]:
        """Place every source again from the requests each received since the last re-plan and move what
        moved (load on the new engine, route there, drain and unload the old one). A move whose new copy does
        not fit beside the old one now is left for a later re-plan. Returns what it did."""
        with self._placing:
            with self._lock:
                counts = Counter(self._requests)
                sources = {s.label: s for s in self._sources}
                seconds = self.replan_s or 1.0
                demands = [
                    Demand(k, s.bytes, sum(counts[m] for m in s.models) / seconds) for k, s in sources.items()
                ]
                current = {k: list(s.replicas) for k, s in sources.items()}
            alive = [g for g in range(len(self._actors)) if g not in self._dead]
            plan = place(demands, self._memory, self.capacity, current, alive)
            with self._lock:
                self._requests -= counts
            add, remove = moves(current, plan)
            used = self._used()  # under _placing: the replicas are still those of `current`
            done, skipped = [], set()
            for key, g in add:
                s = sources[key]
                if used[g] + s.bytes > self._memory[g]:
                    skipped.add(key)  # not beside what is there now: left for a later re-plan
                    continue
                self._load_on(s, [g])
                used[g] += s.bytes
                with self._lock:
                    s.replicas.append(g)
                done.append(f"{s.models[0]}: +GPU {g}")
            for key, g in remove:
                s = sources[key]
                if key in skipped:
                    continue  # its new copy was not made: the old one stays
                with self._lock:
                    s.draining.add(g)
                deadline = time.monotonic() + DRAIN_S
                while time.monotonic() < deadline and any(self._by_engine_model[g, m] for m in s.models):
                    time.sleep(0.05)
                self._each("ask", Unload(s.models[0]), engines=[g], skip_lost=True)
                with self._lock:
                    if g in s.replicas:
                        s.replicas.remove(g)
                    s.draining.discard(g)
                done.append(f"{s.models[0]}: -GPU {g}")
            if done:
                self._decide([f"re-plan: {', '.join(done)}"])
            return done

    def placement(self) -> dict[str, list[int]]:
        """Each served model's engines now."""
        with self._lock:
            return {m: list(s.replicas) for s in self._sources for m in s.models}


def merge_snapshots(snaps: list[Snapshot]) -> Snapshot:
    """Every engine's snapshot as one: counts summed per model (replicas included), percentiles the worst."""
    by_name: dict[str, ModelSnapshot] = {}
    for snap in snaps:
        for m in snap.models:
            have = by_name.get(m.name)
            if have is None:
                by_name[m.name] = replace(m)
                continue
            for f in (
                "queue_depth",
                "running",
                "tokens_per_second",
                "requests_total",
                "slo_requests",
                "slo_met",
            ):
                setattr(have, f, getattr(have, f) + getattr(m, f))
            for f in ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99"):
                setattr(have, f, max(getattr(have, f), getattr(m, f)))
            have.resident = have.resident or m.resident
    return Snapshot(list(by_name.values()), merge_stats([s.engine for s in snaps]))


def merge_stats(stats: list[EngineStats]) -> EngineStats:
    """Every engine's stats as one: counts summed, each engine's page pool summed into one, a model held by
    several engines (replicas) once: its requests and steps summed, its resident variants named once."""
    merged = _merged(stats)
    loads: dict[str, list[ModelLoad]] = {}
    for load in merged["models"]:
        loads.setdefault(load.name, []).append(load)
    merged["models"] = [
        ModelLoad(**_merged(group)) if len(group) > 1 else group[0] for group in loads.values()
    ]
    merged["resident_variants"] = list(dict.fromkeys(merged["resident_variants"]))
    return EngineStats(**merged)


def _merged(items: list[Any]) -> dict[str, Any]:
    """Field by field over dataclass instances of one type: numbers summed, lists joined, dicts summed by key,
    dataclasses (an engine's page pool) merged the same way; None where every one is None. page_bytes, the same
    on every engine, is kept."""
    out: dict[str, Any] = {}
    for f in fields(items[0]):
        values = [getattr(x, f.name) for x in items]
        present = [v for v in values if v is not None]
        if not present:
            out[f.name] = None
        elif f.name in ("page_bytes", "name") or isinstance(present[0], bool | str):
            out[f.name] = present[0]
        elif isinstance(present[0], int | float):
            out[f.name] = sum(present)
        elif isinstance(present[0], list):
            out[f.name] = [v for value in present for v in value]
        elif isinstance(present[0], dict):
            summed: Counter = Counter()
            for value in present:
                summed.update(value)
            out[f.name] = dict(summed)
        else:  # a dataclass: the page pools of the engines that have one
            out[f.name] = type(present[0])(**_merged(present))
    return out


__all__ = ["ClusterWorker", "EngineUnavailable", "PlacementError", "demand_bytes", "merge_snapshots"]
