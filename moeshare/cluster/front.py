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
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from typing import Any

from moeshare.cluster.actor import remote_class
from moeshare.cluster.placement import Demand, PlacementError, Plan, moves, place
from moeshare.engine.api import EngineFailed, EngineStats, EngineUnavailable, ModelInfo, Submit
from moeshare.engine.config import EngineConfig
from moeshare.engine.request import SamplingParams, UnknownModel, clip
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
DRAIN_S = 30.0  # how long a moved replica may finish its requests before it is unloaded anyway


@dataclass
class _Source:
    """One store or checkpoint as Load names it: its Load message, size, the models it serves, where it is."""

    load: Load
    bytes: int
    models: tuple[str, ...] = ()
    replicas: list[int] = field(default_factory=list)
    draining: set[int] = field(default_factory=set)  # replicas no longer routed to, waiting to be unloaded

    @property
    def label(self) -> str:
        """How Load named it: PATH, NAME=PATH or a synthetic spec."""
        return (self.load.paths or self.load.synthetic)[0]


def demand_bytes(load: Load, config: EngineConfig) -> int:
    """Device bytes a store or checkpoint is placed with: weights, work space and the expected KV (planned
    on the host, without a device: the front end never touches a GPU)."""
    from moeshare.engine.planner import open_source, plan
    from moeshare.engine.synthetic import from_spec, named_spec

    if load.paths:
        target: Any = named_path(load.paths[0])[1]
    else:
        target = from_spec(named_spec(load.synthetic[0])[1], "meta")
    cpu = replace(
        config, device="cpu", dtype=config.torch_dtype, kv_blocks=config.kv_blocks or EXPECTED_KV_BLOCKS
    )
    return plan(open_source(target), cpu, None, target).placement.total


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
        self.decisions: list[str] = []  # every placement decision, newest last
        self._actors: list[Any] = []
        self._memory: list[int] = []
        self._dead: dict[int, str] = {}
        self._sources: list[_Source] = []
        self._inflight: Counter[int] = Counter()  # requests in flight per engine
        self._by_engine_model: Counter[tuple[int, str]] = Counter()
        self._requests: Counter[str] = Counter()  # requests per model since the last re-plan
        self._tasks: dict[int, asyncio.Task] = {}
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="moeshare-cluster")
        self._stopping = threading.Event()
        self._replanner: threading.Thread | None = None
        self._started_ray = False

    # ---- life ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        import ray

        cuda = self.config.torch_device.type == "cuda"
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, log_to_driver=False)
            else:  # a local cluster: one CPU per engine, the GPUs it finds
                ray.init(num_cpus=self.engines + 1, include_dashboard=False, log_to_driver=False,
                         object_store_memory=256 << 20)  # fmt: skip
            self._started_ray = True
        if cuda and ray.cluster_resources().get("GPU", 0) < self.engines:
            have = int(ray.cluster_resources().get("GPU", 0))
            raise MoeshareError(f"--gpus {self.engines}: the Ray cluster has {have} GPU(s)")
        actor = remote_class(1 if cuda else 0)
        config = replace(self.config, device="cuda" if cuda else self.config.device)
        self._actors = [actor.remote(config, i, self.max_queue) for i in range(self.engines)]
        self._memory = ray.get([a.memory.remote() for a in self._actors])
        if self.replan_s:
            self._replanner = threading.Thread(target=self._replan_loop, name="moeshare-replan", daemon=True)
            self._replanner.start()

    @property
    def alive(self) -> bool:
        return self.failure is None and len(self._dead) < len(self._actors)

    def stop(self) -> None:
        import ray

        self._stopping.set()
        for i, a in enumerate(self._actors):
            if i not in self._dead:
                try:
                    ray.get(a.stop.remote(), timeout=30)
                except Exception:  # it is going away either way
                    pass
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
        live = self._live(model)
        if not live:
            if self.serves(model):
                raise EngineUnavailable(f"no engine holding {clip(model)} is up; retry shortly")
            served = ", ".join(sorted(m for s in self._sources for m in s.models)) or "none"
            raise UnknownModel(f"unknown model {clip(model)}; served models: {served}")
        return min(live, key=lambda g: (self._inflight[g], g))

    def _call(self, model: str, method: str, *args) -> Any:
        import ray

        g = self._pick(model)
        try:
            return ray.get(getattr(self._actors[g], method).remote(*args))
        except ray.exceptions.RayTaskError as e:
            raise e.as_instanceof_cause() from None

    def prepare(self, model: str, prompt: str | list[int], params: SamplingParams) -> list[int]:
        return self._call(model, "prepare", model, prompt, params)

    def chat_prompt(self, model: str, messages: list[dict[str, str]]) -> str:
        return self._call(model, "chat_prompt", model, messages)

    def serves(self, model: str) -> bool:
        with self._lock:
            return any(model in s.models for s in self._sources)

    def submit(self, request: Submit, ticket: Ticket) -> Future[int]:
        if self.failure is not None:
            raise EngineFailed(self.failure)
        g = self._pick(request.model)
        future: Future[int] = Future()
        with self._lock:
            self._inflight[g] += 1
            self._by_engine_model[g, request.model] += 1
            self._requests[request.model] += 1
        task = ticket.loop.create_task(self._stream(g, request, ticket, future))
        self._tasks[id(ticket)] = task
        task.add_done_callback(lambda _: self._tasks.pop(id(ticket), None))
        return future

    def cancel(self, ticket: Ticket) -> None:
        task = self._tasks.pop(id(ticket), None)
        if task is not None:
            task.cancel()

    async def _stream(self, g: int, request: Submit, ticket: Ticket, future: Future[int]) -> None:
        import ray

        stream = self._actors[g].generate.options(num_returns="streaming").remote(request)
        try:
            async for ref in stream:
                item = await ref
                if not future.done():
                    future.set_result(item)
                    continue
                ticket.events.put_nowait(item)
                if item.finished and item.usage is not None and item.usage.first_token is not None:
                    if self.on_finish:
                        u = item.usage
                        self.on_finish(item.model, u.ttft, u.tpot, u.total, u.met_targets)
        except asyncio.CancelledError:
            ray.cancel(stream)  # the remote generator's finally cancels the request: its KV goes back
            raise
        except ray.exceptions.RayTaskError as e:
            cause = e.as_instanceof_cause()
            if not future.done():
                future.set_exception(cause)
            else:
                ticket.events.put_nowait(cause)
        except ray.exceptions.RayActorError as e:
            why = self._lost(g, str(e).splitlines()[0][:200])
            lost = EngineUnavailable(f"the engine on GPU {g} went away ({why}); retry the request")
            if not future.done():
                future.set_exception(lost)
            else:
                ticket.events.put_nowait(lost)
        finally:
            with self._lock:
                self._inflight[g] -= 1
                self._by_engine_model[g, request.model] -= 1

    # ---- operations ---------------------------------------------------------------------------------------

    def ask(self, operation: Operation) -> Future[Any]:
        if self.failure is not None:
            raise EngineFailed(self.failure)
        return self._pool.submit(self._answer, operation)

    def _each(self, method: str, *args, engines: list[int] | None = None) -> list[Any]:
        import ray

        chosen = [
            g for g in (engines if engines is not None else range(len(self._actors))) if g not in self._dead
        ]
        try:
            return ray.get([getattr(self._actors[g], method).remote(*args) for g in chosen])
        except ray.exceptions.RayTaskError as e:
            raise e.as_instanceof_cause() from None

    def _answer(self, op: Operation) -> Any:
        if isinstance(op, Load):
            return self._load(op)
        if isinstance(op, Unload):
            return self._unload(op.model)
        if isinstance(op, ListModels):
            seen: dict[str, ModelInfo] = {}
            for infos in self._each("ask", op):
                for info in infos:
                    seen.setdefault(info.name, info)
            return list(seen.values())
        if isinstance(op, TakeSnapshot):
            snap = merge_snapshots(self._each("ask", op))
            where = self.placement()
            for m in snap.models:
                m.engines = sorted(where.get(m.name, []))
            snap.placement = self.decisions[-MAX_DECISIONS:]
            return snap
        if isinstance(op, CancelAll):
            self._each("ask", op)
            return None
        if isinstance(op, SetKvLimits):
            live = self._live(op.model)
            if not live:
                raise UnknownModel(f"unknown model {clip(op.model)}")
            return self._each("ask", op, engines=live)[0]
        raise TypeError(f"unknown operation {type(op).__name__}")

    def _load(self, op: Load) -> list[str]:
        parts = [Load((p,), ()) for p in op.paths] + [Load((), (s,)) for s in op.synthetic]
        new = [_Source(p, demand_bytes(p, self.config)) for p in parts]
        with self._lock:
            plan = self._plan_new(new)
        names: list[str] = []
        for s in new:
            gpus = plan.replicas[s.label]
            loaded = self._each("ask", s.load, engines=list(gpus))
            s.models, s.replicas = tuple(loaded[0]), list(gpus)
            with self._lock:
                self._sources.append(s)
            names += s.models
        return names

    def _plan_new(self, new: list[_Source]) -> Plan:
        """Place new sources beside what is loaded (which stays where it is)."""
        used = [0] * len(self._memory)
        for s in self._sources:
            for g in s.replicas:
                used[g] += s.bytes
        room = [m - u for m, u in zip(self._memory, used, strict=True)]
        alive = [g for g in range(len(self._actors)) if g not in self._dead]
        plan = place([Demand(s.label, s.bytes) for s in new], room, None, None, alive)
        self._decide(list(plan.decisions))
        return plan

    def _decide(self, lines: list[str]) -> None:
        for line in lines:
            log.warning("placement: %s", line)
            self.decisions.append(line)

    def _unload(self, model: str) -> list[str]:
        with self._lock:
            source = next((s for s in self._sources if model in s.models), None)
        if source is None:
            raise UnknownModel(f"unknown model {clip(model)}")
        self._each("ask", Unload(model), engines=source.replicas)
        with self._lock:
            self._sources.remove(source)
        return list(source.models)

    # ---- faults and re-placement ----------------------------------------------------------------------------

    def _lost(self, g: int, why: str) -> str:
        """Engine g died: its sources are placed again on the engines left (once, in the background)."""
        with self._lock:
            if g in self._dead:
                return self._dead[g]
            self._dead[g] = why
        self._decide([f"GPU {g}'s engine went away ({why})"])
        if len(self._dead) == len(self._actors):
            self.failure = "every engine went away; the server is going down"
            if self.on_fatal:
                self.on_fatal(self.failure)
        else:
            self._pool.submit(self._replace_lost, g)
        return why

    def _replace_lost(self, g: int) -> None:
        with self._lock:
            orphans = [s for s in self._sources if g in s.replicas]
            for s in orphans:
                s.replicas.remove(g)
            homeless = [s for s in orphans if not s.replicas]
            plan = self._plan_new(homeless) if homeless else None
        for s in homeless:
            gpus = list(plan.replicas[s.label])
            self._each("ask", s.load, engines=gpus)
            with self._lock:
                s.replicas = gpus

    def _replan_loop(self) -> None:
        while not self._stopping.wait(self.replan_s):
            try:
                self.replan()
            except Exception as e:  # a re-plan that cannot be made leaves things where they are
                log.warning("placement: no re-plan (%s)", e)

    def replan(self) -> list[str]:
        """Place every source again from the requests each received since the last re-plan and move what
        moved (load on the new engine, route there, drain and unload the old one). Returns what it did."""
        with self._lock:
            counts, self._requests = self._requests, Counter()
            sources = {s.label: s for s in self._sources}
            seconds = self.replan_s or 1.0
            demands = [
                Demand(k, s.bytes, sum(counts[m] for m in s.models) / seconds) for k, s in sources.items()
            ]
            current = {k: list(s.replicas) for k, s in sources.items()}
        alive = [g for g in range(len(self._actors)) if g not in self._dead]
        plan = place(demands, self._memory, self.capacity, current, alive)
        add, remove = moves(current, plan)
        done = []
        for key, g in add:
            s = sources[key]
            self._each("ask", s.load, engines=[g])
            with self._lock:
                s.replicas.append(g)
            done.append(f"{s.models[0]}: +GPU {g}")
        for key, g in remove:
            s = sources[key]
            with self._lock:
                s.draining.add(g)
            deadline = time.monotonic() + DRAIN_S
            while time.monotonic() < deadline and any(self._by_engine_model[g, m] for m in s.models):
                time.sleep(0.05)
            self._each("ask", Unload(s.models[0]), engines=[g])
            with self._lock:
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
    totals: dict[str, Any] = defaultdict(int)
    for s in stats:
        for f in fields(s):
            value = getattr(s, f.name)
            if isinstance(value, bool) or value is None:
                totals.setdefault(f.name, value)
            elif isinstance(value, int | float):
                totals[f.name] += value
            elif isinstance(value, list):
                totals[f.name] = (totals[f.name] or []) + value
            else:
                totals.setdefault(f.name, value)
    return EngineStats(**totals)


__all__ = ["ClusterWorker", "EngineUnavailable", "PlacementError", "demand_bytes", "merge_snapshots"]
