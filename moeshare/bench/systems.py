"""The serving systems the benchmark compares, each made of real `moeshare serve` processes on loopback.

A `System` lays out the servers for a set of variants (`ServerSpec`: what to serve, with which options);
`deploy` starts them on 127.0.0.1, port 0, waits until health says SERVING, and returns a `Deployment`
that knows which address serves each variant and stops the servers. Every system gets the same
`ServeLimits` (sequences per step, KV blocks, device memory) in total; `partition` splits them among its
servers.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moeshare.consolidate import Options, Plan, consolidate, is_store, plan
from moeshare.consolidate.same_index import same_index_pick
from moeshare.engine.synthetic import from_spec

LISTENING = "moeshare: listening on "
MPS_CONTROL = "nvidia-cuda-mps-control"
START_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ServeLimits:
    """Totals for a whole system, whatever its number of servers."""

    device: str = "cpu"
    max_num_seqs: int = 64
    kv_blocks: int = 512
    memory_gib: float | None = None  # device memory for weights, KV and work space (None: no limit)


@dataclass(frozen=True)
class ServerSpec:
    sources: tuple[str, ...]  # what `moeshare serve` loads: store or checkpoint paths, or --synthetic SPEC
    variants: tuple[str, ...]  # the variants it serves
    options: tuple[str, ...]  # serve options beyond host, port and device
    send_as: str | None = None  # every request goes to this served variant, whatever it names
    # a share of the GPU's SMs through CUDA MPS (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE; deploy starts the daemon)
    sm_percent: int | None = None


@dataclass(frozen=True)
class Route:
    address: str  # host:port
    name: str  # the variant name the server knows


class Workspace:
    """The variants' HF checkpoints and a directory for the stores the systems serve; a store already
    there is reused, so a second run skips consolidation. Each method returns what a server loads."""

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

    def consolidated(self, budget: str) -> tuple[str, ...]:
        """A store of all variants with its bank at `budget`. No calibration: speed does not depend on it."""
        out = self.root / f"store-{budget}"
        if not is_store(out):
            self._plan = self._plan or plan(self._paths(), None, None, 0)
            consolidate(self._paths(), out, Options(budget=budget, self_calib=0), made=self._plan)
        return (str(out),)

    def same_index_pick_store(self, budget: float) -> tuple[str, ...]:
        """A store whose bank is exactly the same-index-pick bank at `budget`: the picked checkpoints
        hold bitwise-identical copies of every shared position, which consolidation always merges (and
        merges nothing else at budget 1.0), while each variant keeps its own non-expert tensors."""
        out = self.root / f"store-same-index-pick-{budget}"
        if not is_store(out):
            picked = self.root / f"same-index-pick-{budget}"
            if not picked.exists():
                same_index_pick(self._paths(), picked, budget)
            consolidate([picked / v for v in self.variants], out, Options(budget="1.0", self_calib=0))
        return (str(out),)

    def single(self, variant: str) -> tuple[str, ...]:
        """One variant on its own: its HF checkpoint."""
        return (str(self.checkpoints[variant]),)

    def alone(self) -> tuple[tuple[str, ...], str]:
        """The most popular variant's checkpoint, and the name it is served under."""
        return self.single(self.variants[0]), self.variants[0]


class SyntheticWorkspace:
    """Random-weight Mixtral variants at real layer sizes (`moeshare serve --synthetic`): a family of
    `variants` in which each keeps `own` experts per layer and shares the rest, the way the stores of real
    fine-tunes come out. Nothing is written; every server draws its weights on the device. A bad spec
    raises MoeshareError here, before any server starts."""

    def __init__(self, variants: int, own: int, sizes: str, root: Path) -> None:
        self.root = Path(root)  # server logs
        self.family = f"variants={variants},own={own}" + (f",{sizes}" if sizes else "")
        self._variants = [f"v{i}" for i in range(variants)]
        self.context: int = from_spec(self.family, "meta").config["max_position_embeddings"]

    @property
    def variants(self) -> list[str]:
        return list(self._variants)

    def consolidated(self, budget: str) -> tuple[str, ...]:
        """The family itself is the consolidated store (shared slots plus each variant's own), whatever the
        budget."""
        return ("--synthetic", self.family)

    def same_index_pick_store(self, budget: float) -> tuple[str, ...]:
        """The same family: at batch size 1 speed depends on the experts each token reads, not on which
        expert a shared slot holds."""
        return ("--synthetic", self.family)

    def single(self, variant: str) -> tuple[str, ...]:
        return ("--synthetic", f"{self.family},only={self._variants.index(variant)}")

    def alone(self) -> tuple[tuple[str, ...], str]:
        return self.single(self._variants[0]), self._variants[0]


def _one_store(sources: tuple[str, ...], variants: list[str], limits: ServeLimits, *extra: str) -> ServerSpec:
    options = ("--max-num-seqs", str(limits.max_num_seqs), "--kv-blocks", str(limits.kv_blocks))
    if limits.memory_gib is not None:
        options += ("--memory-limit", f"{limits.memory_gib:.3f}")
    return ServerSpec(sources, tuple(variants), (*options, *extra))


def moeshare_layout(ws: Workspace, limits: ServeLimits, budget: str) -> list[ServerSpec]:
    """One server on one consolidated store of all variants, every variant resident: requests of all
    variants share each step's batch."""
    return [_one_store(ws.consolidated(budget), ws.variants, limits)]


def moeshare_ray_layout(ws: Workspace, limits: ServeLimits, budget: str) -> list[ServerSpec]:
    """`moeshare` with its engine in a Ray actor (`--gpus 1`): the same store and limits, every request and
    token crossing from the front end to the engine actor and back; what the multi-GPU path costs on one."""
    return [_one_store(ws.consolidated(budget), ws.variants, limits, "--gpus", "1")]


def reconfig_bs1_layout(ws: Workspace, limits: ServeLimits, budget: str) -> list[ServerSpec]:
    """The published system approximated with our parts: the same-index-pick bank at `budget` (every
    expert stays resident; with synthetic variants, the family's bank), one variant's non-expert tensors
    resident (`--max-resident-variants 1`, so a request of another variant swaps them in from pinned host
    memory) and batch size 1 (`--max-num-seqs 1`). The swap runs on our engine's copy path, not theirs,
    and with one sequence at a time the order is FCFS."""
    store = ws.same_index_pick_store(float(budget))
    one = ServeLimits(limits.device, 1, limits.kv_blocks, limits.memory_gib)
    return [_one_store(store, ws.variants, one, "--max-resident-variants", "1")]


def swap_layout(ws: Workspace, limits: ServeLimits, budget: str) -> list[ServerSpec]:
    """Temporal multiplexing: one variant's full weights on the device (`--max-resident-variants 1
    --swap-whole-variants`); switching copies the next variant's non-expert tensors and all its experts
    from pinned host memory. Requests of the resident variant batch together; another variant's request
    waits until the resident one's running sequences drain (FCFS across variants, with a starvation bound
    of 8 steps)."""
    options = ("--max-resident-variants", "1", "--swap-whole-variants")
    return [_one_store(ws.consolidated("1.0"), ws.variants, limits, *options)]


def partition_layout(ws: Workspace, limits: ServeLimits, budget: str) -> list[ServerSpec]:
    """Static spatial partitioning (what MIG gives): one server per variant on its own weights, each with
    an equal share of the device memory (`--memory-limit`; what does not fit waits in pinned host memory
    and is copied in per step), of the KV blocks and of the sequences per step; requests go to their
    variant's server. Unlike MIG, the servers share the device's SMs and copy engines."""
    n = len(ws.variants)
    memory = None if limits.memory_gib is None else limits.memory_gib / n
    share = ServeLimits(
        limits.device, max(1, limits.max_num_seqs // n), max(1, limits.kv_blocks // n), memory
    )
    return [_one_store(ws.single(v), [v], share) for v in ws.variants]


def mig_partition_layout(ws: Workspace, limits: ServeLimits, budget: str) -> list[ServerSpec]:
    """`partition`, and each server also holds an equal share of the SMs through CUDA MPS
    (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE): the closest to MIG that runs without repartitioning the GPU. The
    servers still share the memory system and copy engines, which MIG would split too."""
    specs = partition_layout(ws, limits, budget)
    return [replace(s, sm_percent=max(1, 100 // len(specs))) for s in specs]


def single_layout(ws: Workspace, limits: ServeLimits, budget: str) -> list[ServerSpec]:
    """Not a way to serve many variants: the reference for what they cost. The most popular variant
    alone on one server, and every request of the workload goes to it (same arrivals, same lengths)."""
    sources, name = ws.alone()
    spec = _one_store(sources, ws.variants, limits)
    return [ServerSpec(spec.sources, spec.variants, spec.options, send_as=name)]


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
        System("moeshare-ray", moeshare_ray_layout),
        System("reconfig-bs1", reconfig_bs1_layout),
        System("swap", swap_layout),
        System("partition", partition_layout),
        System("mig-partition", mig_partition_layout),
        System("single", single_layout),
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

    def last_log_line(self) -> str:
        """The server's last word: its one-line error, or the last line of a traceback."""
        try:
            lines = [x.strip() for x in self.log.read_text(errors="replace").splitlines() if x.strip()]
        except OSError:
            return ""
        return lines[-1] if lines else ""

    def fail(self, why: str) -> RuntimeError:
        said = self.last_log_line()
        return RuntimeError(
            f"server for {', '.join(self.spec.variants)} {why}"
            + (f": {said}" if said else "")
            + f" (log: {self.log})"
        )


class MpsDaemon:
    """The CUDA MPS control daemon, started for one deployment in a pipe directory of its own (so it serves
    only the servers given its `env`) and stopped with it."""

    def __init__(self, root: Path) -> None:
        if shutil.which(MPS_CONTROL) is None:
            raise RuntimeError(f"{MPS_CONTROL} is not on PATH: SM shares need the CUDA MPS control daemon")
        # the pipes under /tmp (a socket path must stay short), the daemon's log beside the servers' (kept)
        self.pipes = Path(tempfile.mkdtemp(prefix="mps-"))
        logs = Path(tempfile.mkdtemp(prefix="mps-log-", dir=root))
        self.env = {"CUDA_MPS_PIPE_DIRECTORY": str(self.pipes), "CUDA_MPS_LOG_DIRECTORY": str(logs)}
        done = subprocess.run(
            [MPS_CONTROL, "-d"], env=os.environ | self.env, capture_output=True, text=True, timeout=30
        )
        if done.returncode != 0:
            shutil.rmtree(self.pipes, ignore_errors=True)
            said = (done.stderr or done.stdout).strip().splitlines()
            raise RuntimeError(f"{MPS_CONTROL} -d failed: {said[-1] if said else done.returncode}")

    def stop(self) -> None:
        subprocess.run(
            [MPS_CONTROL],
            input="quit\n",
            env=os.environ | self.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        shutil.rmtree(self.pipes, ignore_errors=True)


def spawn(spec: ServerSpec, device: str, log: Path, env: Mapping[str, str] | None = None) -> ServerProcess:
    cmd = [sys.executable, "-m", "moeshare.cli", "serve", *spec.sources]
    cmd += ["--host", "127.0.0.1", "--port", "0", "--device", device, *spec.options]
    log.parent.mkdir(parents=True, exist_ok=True)
    extra = dict(env or {})
    if spec.sm_percent is not None:
        extra["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(spec.sm_percent)
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=os.environ | extra)
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
    mps: MpsDaemon | None = None

    @property
    def routes(self) -> dict[str, Route]:  # workload variant -> where its requests go
        return {v: Route(s.address, s.spec.send_as or v) for s in self.servers for v in s.spec.variants}

    def stop(self) -> None:
        stop_all(self.servers)
        if self.mps is not None:
            self.mps.stop()

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def deploy(system: str, specs: list[ServerSpec], device: str, logs: Path) -> Deployment:
    """Start every server at once and wait for all (and the MPS daemon first if any server takes a share of
    the SMs: a CUDA-only system); on any failure the started ones are stopped."""
    servers: list[ServerProcess] = []
    mps = None
    try:
        if any(s.sm_percent is not None for s in specs):
            if device != "cuda":
                raise RuntimeError(f"{system}: SM shares through CUDA MPS need --device cuda")
            logs.mkdir(parents=True, exist_ok=True)
            mps = MpsDaemon(logs)
        for i, spec in enumerate(specs):
            servers.append(spawn(spec, device, logs / f"{system}-{i}.log", mps.env if mps else None))
        deadline = time.monotonic() + START_TIMEOUT_S
        for s in servers:
            wait_ready(s, deadline)
    except BaseException:
        stop_all(servers)
        if mps is not None:
            mps.stop()
        raise
    return Deployment(system, servers, mps)
