"""The serving systems the benchmark compares, each made of real `moeshare serve` processes on loopback.

A `System` lays out the servers for a set of variants (`ServerSpec`: what to serve, with which options);
`deploy` starts them on 127.0.0.1, port 0, waits until health says SERVING, and returns a `Deployment`
that knows which address serves each variant and stops the servers. Every system gets the same
`ServeLimits` (sequences per step, KV blocks) in total; `partition` splits them among its servers.
"""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moeshare.consolidate import Options, Plan, consolidate, is_store, plan
from moeshare.evals.baselines import same_index_pick

LISTENING = "moeshare: listening on "
START_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ServeLimits:
    """Totals for a whole system, whatever its number of servers."""

    device: str = "cpu"
    max_num_seqs: int = 64
    kv_blocks: int = 512


@dataclass(frozen=True)
class ServerSpec:
    paths: tuple[Path, ...]  # stores or HF checkpoints
    variants: tuple[str, ...]  # the variants it serves
    options: tuple[str, ...]  # serve options beyond host, port and device


class Workspace:
    """The variants' HF checkpoints and a directory for the stores the systems serve; a store already
    there is reused, so a second run skips consolidation."""

    def __init__(self, checkpoints: Mapping[str, Path], root: Path) -> None:
        names = {v: Path(p).name for v, p in checkpoints.items()}
        if bad := [v for v, n in names.items() if v != n]:
            raise ValueError(f"a variant is named after its checkpoint directory; {bad[0]!r} is not")
        self.checkpoints = dict(checkpoints)  # variant -> checkpoint, most popular first
        self.root = Path(root)
        self._plan: Plan | None = None

    @property
    def variants(self) -> list[str]:
        return list(self.checkpoints)

    def _paths(self) -> list[Path]:
        return list(self.checkpoints.values())

    def consolidated(self, budget: str) -> Path:
        """A store of all variants with its bank at `budget`. No calibration: speed does not depend on it."""
        out = self.root / f"store-{budget}"
        if not is_store(out):
            self._plan = self._plan or plan(self._paths(), None, None, 0)
            consolidate(self._paths(), out, Options(budget=budget, self_calib=0), made=self._plan)
        return out

    def same_index_pick_store(self, budget: float) -> Path:
        """A store whose bank is exactly the same-index-pick bank at `budget`: the picked checkpoints
        hold bitwise-identical copies of every shared position, which consolidation always merges (and
        merges nothing else at budget 1.0), while each variant keeps its own non-expert tensors."""
        out = self.root / f"store-same-index-pick-{budget}"
        if not is_store(out):
            picked = self.root / f"same-index-pick-{budget}"
            if not picked.exists():
                same_index_pick(self._paths(), picked, budget)
            consolidate([picked / v for v in self.variants], out, Options(budget="1.0", self_calib=0))
        return out


def _one_store(paths: tuple[Path, ...], variants: list[str], limits: ServeLimits, *extra: str) -> ServerSpec:
    options = ("--max-num-seqs", str(limits.max_num_seqs), "--kv-blocks", str(limits.kv_blocks), *extra)
    return ServerSpec(paths, tuple(variants), options)


def moeshare_layout(ws: Workspace, limits: ServeLimits, budget: str) -> list[ServerSpec]:
    """One server on one consolidated store of all variants, every variant resident: requests of all
    variants share each step's batch."""
    return [_one_store((ws.consolidated(budget),), ws.variants, limits)]


def reconfig_bs1_layout(ws: Workspace, limits: ServeLimits, budget: str) -> list[ServerSpec]:
    """The published system approximated with our parts: the same-index-pick bank at `budget` (every
    expert stays resident), one variant's non-expert tensors resident (`--max-resident-variants 1`, so a
    request of another variant swaps them in from pinned host memory) and batch size 1
    (`--max-num-seqs 1`). The swap runs on our engine's copy path, not theirs, and the order of requests
    is our scheduler's (FCFS, a resident variant's request admitted first until another has waited 8
    steps); with one sequence at a time that is close to plain FCFS."""
    store = ws.same_index_pick_store(float(budget))
    one = ServeLimits(limits.device, 1, limits.kv_blocks)
    return [_one_store((store,), ws.variants, one, "--max-resident-variants", "1")]


def swap_layout(ws: Workspace, limits: ServeLimits, budget: str) -> list[ServerSpec]:
    """Temporal multiplexing, approximated: a store at budget 1.0 (no expert shared) with one variant
    resident (`--max-resident-variants 1`); requests of the resident variant batch together, and another
    variant's request waits until the resident row drains. The gap: the engine swaps only non-expert
    tensors; the bank of every variant's experts stays on the device. So a switch here copies far fewer
    bytes than loading a whole variant from host memory, and the memory used is that of all variants'
    experts; at sizes where they do not fit together (Mixtral-8x7B, 4 variants on one H100) this system
    cannot start until the engine can offload bank slots to host memory."""
    return [_one_store((ws.consolidated("1.0"),), ws.variants, limits, "--max-resident-variants", "1")]


def partition_layout(ws: Workspace, limits: ServeLimits, budget: str) -> list[ServerSpec]:
    """Static spatial partitioning: one server per variant on its own HF checkpoint, each with an equal
    share of the sequences per step and of the KV blocks; requests go to their variant's server. The
    gaps against MIG: the servers share the device's compute (MIG gives each its own SMs) and memory is
    split only for KV (weights are not bounded per share), and nothing is offloaded to host memory when a
    variant does not fit its share: at Mixtral-8x7B sizes a server that does not fit fails to start."""
    n = len(ws.variants)
    share = ServeLimits(limits.device, max(1, limits.max_num_seqs // n), max(1, limits.kv_blocks // n))
    return [_one_store((ws.checkpoints[v],), [v], share) for v in ws.variants]


@dataclass(frozen=True)
class System:
    name: str
    layout: Callable[[Workspace, ServeLimits, str], list[ServerSpec]]

    @property
    def about(self) -> str:
        return " ".join((self.layout.__doc__ or "").split())


SYSTEMS = {
    s.name: s
    for s in (
        System("moeshare", moeshare_layout),
        System("reconfig-bs1", reconfig_bs1_layout),
        System("swap", swap_layout),
        System("partition", partition_layout),
    )
}


@dataclass
class ServerProcess:
    """A `moeshare serve` subprocess; its stderr goes to `log`."""

    spec: ServerSpec
    proc: subprocess.Popen
    log: Path
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    address: str = ""

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def fail(self, why: str) -> RuntimeError:
        return RuntimeError(f"server for {', '.join(self.spec.variants)} {why}; its log:\n{self.log_tail()}")


def spawn(spec: ServerSpec, device: str, log: Path) -> ServerProcess:
    cmd = [sys.executable, "-m", "moeshare.cli", "serve", *map(str, spec.paths)]
    cmd += ["--host", "127.0.0.1", "--port", "0", "--device", device, *spec.options]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    server = ServerProcess(spec, proc, log)
    stdout = proc.stdout
    assert stdout is not None
    threading.Thread(target=lambda: [server.lines.put(x.strip()) for x in stdout], daemon=True).start()
    return server


def _healthy(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2.0)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def wait_ready(server: ServerProcess, deadline: float) -> None:
    """Until the server has printed its address and health says SERVING."""
    while not server.address:
        if server.proc.poll() is not None:
            raise server.fail(f"exited with code {server.proc.returncode} before listening")
        try:
            line = server.lines.get(timeout=0.2)
        except queue.Empty:
            line = ""
        if line.startswith(LISTENING):
            server.address = line.removeprefix(LISTENING).strip()
        if time.monotonic() > deadline:
            raise server.fail("did not listen in time")
    while not _healthy(server.address):
        if server.proc.poll() is not None:
            raise server.fail(f"exited with code {server.proc.returncode} while loading")
        if time.monotonic() > deadline:
            raise server.fail("did not become SERVING in time")
        time.sleep(0.1)


def stop_all(servers: list[ServerProcess]) -> None:
    """SIGTERM to all at once (in-flight streams get the server's grace), then wait; kill a laggard."""
    for s in servers:
        if s.proc.poll() is None:
            s.proc.send_signal(signal.SIGTERM)
    for s in servers:
        try:
            s.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            s.proc.kill()
            s.proc.wait()


@dataclass
class Deployment:
    """A started system: where each variant's requests go, and its servers to stop."""

    system: str
    servers: list[ServerProcess]

    @property
    def routes(self) -> dict[str, str]:  # variant -> host:port
        return {v: s.address for s in self.servers for v in s.spec.variants}

    def stop(self) -> None:
        stop_all(self.servers)

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def deploy(system: str, specs: list[ServerSpec], device: str, logs: Path) -> Deployment:
    """Start every server at once and wait for all; on any failure the started ones are stopped."""
    servers: list[ServerProcess] = []
    try:
        for i, spec in enumerate(specs):
            servers.append(spawn(spec, device, logs / f"{system}-{i}.log"))
        deadline = time.monotonic() + START_TIMEOUT_S
        for s in servers:
            wait_ready(s, deadline)
    except BaseException:
        stop_all(servers)
        raise
    return Deployment(system, servers)
