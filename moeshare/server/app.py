"""Start the server: bind first (health NOT_SERVING), load the stores, then SERVING; stop cleanly on a signal."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import signal
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from moeshare.engine.api import EngineFailed
from moeshare.engine.engine import Engine, EngineConfig
from moeshare.engine.request import Targets
from moeshare.engine.synthetic import from_spec, named_spec
from moeshare.errors import MoeshareError
from moeshare.server.auth import Access, BearerAuth, is_loopback, load_dirs, read_token
from moeshare.server.bind import SERVER_OPTIONS, check_port, probe, tls_credentials
from moeshare.server.command import build_parser
from moeshare.server.messages import CancelAll, Load, SetKvLimits, TakeSnapshot
from moeshare.server.metrics import Metrics
from moeshare.server.servicer import MoeShareServicer
from moeshare.server.worker import EngineWorker, named_path
from moeshare.v1 import moeshare_pb2, moeshare_pb2_grpc

SERVICE = moeshare_pb2.DESCRIPTOR.services_by_name["MoeShare"].full_name
METRICS_REFRESH_S = 1.0
CLOSE_MARGIN_S = 1.0  # at shutdown, streams are cancelled this long before the grace period ends


def _check_numbers(args: argparse.Namespace) -> None:
    """Settings under which the server would start but never answer (or not start with a traceback)."""
    if args.memory_limit is not None and not (math.isfinite(args.memory_limit) and args.memory_limit > 0):
        raise MoeshareError(f"--memory-limit must be > 0 GiB, got {args.memory_limit}")
    if args.pool is not None and not (math.isfinite(args.pool) and args.pool > 0):
        raise MoeshareError(f"--pool must be > 0 GiB, got {args.pool}")
    if args.policy not in ("least-slack", "load-order"):
        raise MoeshareError(f"--policy must be least-slack or load-order, got {args.policy!r}")
    if args.evict_to not in ("auto", "host", "disk"):
        raise MoeshareError(f"--evict-to must be auto, host or disk, got {args.evict_to!r}")
    if args.evict_after is not None and not (math.isfinite(args.evict_after) and args.evict_after >= 0):
        raise MoeshareError(f"--evict-after must be >= 0 seconds, got {args.evict_after}")
    if args.evict_after is not None and args.pool is None:
        raise MoeshareError("--evict-after moves weights out of the page pool: give --pool GIB too")
    if (args.kv_min or args.kv_max) and args.pool is None:
        raise MoeshareError("--kv-min and --kv-max share out the elastic KV pool: give --pool GIB too")
    kv_limits(args)
    slo_defaults(args)
    for flag, value in (
        ("--max-queue", args.max_queue),
        ("--max-num-seqs", args.max_num_seqs),
        ("--max-batched-tokens", args.max_batched_tokens),
        ("--max-resident-variants", args.max_resident_variants),
        ("--kv-blocks", args.kv_blocks),
    ):
        if value is not None and value < 1:
            raise MoeshareError(f"{flag} must be at least 1, got {value}")
    if not (math.isfinite(args.grace) and args.grace >= 0):
        raise MoeshareError(f"--grace must be a number of seconds >= 0, got {args.grace}")
    check_port("--port", args.port)
    if args.metrics_port is not None:
        check_port("--metrics-port", args.metrics_port)
        if args.metrics_port == args.port != 0:
            raise MoeshareError(f"--metrics-port and --port are both {args.port}: give them different ports")
    if args.http_port is not None:
        check_port("--http-port", args.http_port)
        taken = {"--port": args.port, "--metrics-port": args.metrics_port}
        if clash := [flag for flag, port in taken.items() if port == args.http_port != 0]:
            raise MoeshareError(
                f"--http-port and {clash[0]} are both {args.http_port}: give them different ports"
            )
        try:
            import fastapi  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError:
            raise MoeshareError(
                "--http-port needs fastapi and uvicorn: pip install fastapi uvicorn"
            ) from None
    cluster = args.gpus is not None or args.ray_address is not None
    if args.gpus is not None and args.gpus < 1:
        raise MoeshareError(f"--gpus must be at least 1, got {args.gpus}")
    for flag, value in (("--replan-every", args.replan_every), ("--gpu-capacity", args.gpu_capacity)):
        if value is not None and not (cluster and math.isfinite(value) and value > 0):
            raise MoeshareError(f"{flag} needs --gpus and a number > 0, got {value}")
    if cluster:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise MoeshareError("--gpus needs Ray: pip install 'moeshare[ray]'") from None
    if args.device == "cuda" and args.ray_address is None:  # joining a cluster: its GPUs, not this machine's
        import torch

        if not torch.cuda.is_available():
            raise MoeshareError("--device cuda: no CUDA device is available here; use --device cpu")


def check_args(args: argparse.Namespace) -> tuple[str | None, grpc.ServerCredentials | None]:
    """Refuse bad input before anything starts; returns the bearer token and TLS credentials, if any."""
    if not args.paths and not args.synthetic:
        raise MoeshareError("nothing to serve: give a store or checkpoint directory (or --synthetic SPEC)")
    for p in args.paths:
        if not Path(named_path(p)[1]).exists():
            raise MoeshareError(f"no store or checkpoint at {p}")
    for text in args.synthetic:
        name, spec = named_spec(text)  # the spec's errors now, before anything starts
        if len(from_spec(spec, "meta").variants) != 1 and name is not None:
            raise MoeshareError(
                f"--synthetic {text}: a NAME is for a spec of one model (kind=llama, or only=I)"
            )
    _check_numbers(args)
    token = read_token(args.auth_token_file) if args.auth_token_file else None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise MoeshareError("--tls-cert and --tls-key go together: give both or neither")
    creds = tls_credentials(args.tls_cert, args.tls_key) if args.tls_cert else None
    probe(args.host, args.port, "--port")
    if args.metrics_port is not None:
        probe(args.host, args.metrics_port, "--metrics-port")
    if args.http_port is not None:
        probe(args.host, args.http_port, "--http-port")
    return token, creds


def check_admin_args(args: argparse.Namespace, token: str | None) -> tuple[Access, tuple[Path, ...]]:
    """Who may make the admin calls, and the directories LoadStore may load from."""
    if args.admin_token_file and args.allow_admin_without_token:
        raise MoeshareError("give --admin-token-file or --allow-admin-without-token, not both")
    if args.allow_admin_without_token and not is_loopback(args.host):
        raise MoeshareError(
            f"--allow-admin-without-token needs a loopback --host (127.0.0.1, ::1, localhost), not "
            f"{args.host}; give --admin-token-file FILE instead"
        )
    if args.allow_load_dir and not (args.admin_token_file or args.allow_admin_without_token):
        raise MoeshareError(
            "--allow-load-dir is for LoadStore, an admin call: give --admin-token-file FILE too "
            "(or --allow-admin-without-token on a loopback --host)"
        )
    admin_token = read_token(args.admin_token_file, "--admin-token-file") if args.admin_token_file else None
    access = Access(token, admin_token, args.allow_admin_without_token)
    return access, load_dirs(args.allow_load_dir)


def kv_limits(args: argparse.Namespace) -> dict[str, tuple[int, int | None]]:
    """--kv-min / --kv-max as model -> (least bytes, most bytes or None)."""
    limits: dict[str, tuple[int, int | None]] = {}
    for flag, specs in (("--kv-min", args.kv_min), ("--kv-max", args.kv_max)):
        for spec in specs:
            model, _, value = spec.partition("=")
            try:
                gib = float(value)
            except ValueError:
                gib = math.nan
            if not model or not (math.isfinite(gib) and gib >= 0):
                raise MoeshareError(f"{flag} {spec!r}: give MODEL=GIB with a number of GiB >= 0")
            least, most = limits.get(model, (0, None))
            nbytes = int(gib * 2**30)
            limits[model] = (nbytes, most) if flag == "--kv-min" else (least, nbytes)
    return limits


def slo_defaults(args: argparse.Namespace) -> dict[str, Targets]:
    """--slo MODEL=TTFT,TPOT (seconds; either may be empty) as model -> its requests' default targets."""
    out: dict[str, Targets] = {}
    for spec in args.slo:
        model, _, value = spec.partition("=")
        parts = value.split(",")
        try:
            ttft, tpot = (float(x) if x.strip() else None for x in parts) if len(parts) == 2 else (0.0, 0.0)
            targets = Targets(ttft, tpot)
            targets.validate()
        except (ValueError, MoeshareError):
            targets = None
        if not model or targets is None or not targets.any:
            raise MoeshareError(
                f"--slo {spec!r}: give MODEL=TTFT,TPOT in seconds > 0, either may be left empty (not both)"
            )
        out[model] = targets
    return out


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        device=args.device,
        max_resident_variants=args.max_resident_variants,
        kv_blocks=args.kv_blocks,
        max_num_seqs=args.max_num_seqs,
        max_batched_tokens=args.max_batched_tokens,
        chunked_prefill=args.chunked_prefill,
        policy=args.policy,
        multiplex=args.multiplex,
        memory_limit_bytes=None if args.memory_limit is None else int(args.memory_limit * 2**30),
        swap_whole_variants=args.swap_whole_variants,
        pool_bytes=None if args.pool is None else int(args.pool * 2**30),
        evict_after=args.evict_after,
        evict_to=args.evict_to,
    )


async def _refresh_metrics(worker: EngineWorker, metrics: Metrics) -> None:
    while True:
        try:
            snap = await asyncio.wrap_future(worker.ask(TakeSnapshot()))
        except EngineFailed:
            return  # the server is going down
        metrics.update(snap.engine, sum(m.queue_depth for m in snap.models))
        await asyncio.sleep(METRICS_REFRESH_S)


async def _shutdown(server: grpc.aio.Server, worker: EngineWorker, grace: float) -> None:
    """Stop accepting calls; streams still running near the end of the grace period are cancelled, so each
    gets a final message marked CANCELLED instead of being cut off."""
    stopped = asyncio.ensure_future(server.stop(grace))
    done, _ = await asyncio.wait([stopped], timeout=max(0.0, grace - min(CLOSE_MARGIN_S, grace / 2)))
    if not done and worker.alive:
        with contextlib.suppress(EngineFailed):
            await asyncio.wrap_future(worker.ask(CancelAll()))
    await stopped


async def run_server(args: argparse.Namespace, engine: Engine | None = None) -> int:
    """Serve until SIGINT/SIGTERM (returns 0) or until the engine thread dies (returns 1). `engine`: load
    `args`' stores into this one instead of a new one (tests in-process reach its state)."""
    token, creds = check_args(args)
    access, allowed_load_dirs = check_admin_args(args, token)
    metrics = Metrics() if args.metrics_port is not None else None
    loop = asyncio.get_running_loop()
    failed: asyncio.Future[str] = loop.create_future()

    def on_fatal(message: str) -> None:  # on the engine thread
        loop.call_soon_threadsafe(lambda: failed.done() or failed.set_result(message))

    observe = metrics.observe if metrics else None
    if args.gpus is not None or args.ray_address is not None:  # engines in Ray actors, one per GPU
        from moeshare.cluster.front import ClusterWorker

        engines = args.gpus or 1
        config = _engine_config(args)
        worker: EngineWorker | ClusterWorker = ClusterWorker(
            config, engines, args.ray_address, args.max_queue, observe, on_fatal, args.gpu_capacity,
            args.replan_every,
        )  # fmt: skip
        # Ray starts its processes before this process runs any gRPC threads (forking beside them is what
        # gRPC warns of, and a local cluster then at times never came up)
        worker.start()
    else:
        engine = engine or Engine([], _engine_config(args))
        if args.memory_limit is not None:  # a limit that cannot hold what is asked for is one line first
            targets = [(path, name) for name, path in map(named_path, args.paths)]
            synthetic = [named_spec(text) for text in args.synthetic]
            engine.check_fits(targets + [(from_spec(spec, "meta"), name) for name, spec in synthetic])
        worker = EngineWorker(engine, args.max_queue, observe, on_fatal)
    servicer = MoeShareServicer(worker, metrics, allowed_load_dirs, slo_defaults(args))
    server = grpc.aio.server(interceptors=[BearerAuth(access)], options=SERVER_OPTIONS)
    moeshare_pb2_grpc.add_MoeShareServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )

    async def set_health(status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for name in ("", SERVICE):
            await health_servicer.set(name, status)

    await set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
    address = f"{args.host}:{args.port}"
    try:
        port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    except RuntimeError as e:
        raise MoeshareError(f"cannot listen on {address}: {e}") from None
    await server.start()
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"moeshare: listening on {host}:{port}", flush=True)
    http = None
    if args.http_port is not None:  # fastapi and uvicorn only where asked for (the GPU image has neither)
        from moeshare.server.http import HttpApi, HttpServer

        api = HttpApi(worker, token, slo_defaults(args), metrics)
        http = HttpServer(api, args.host, args.http_port, args.tls_cert, args.tls_key, args.grace)
        try:
            http_port = await http.start()
        except MoeshareError:
            await server.stop(0)
            raise
        scheme = "https" if args.tls_cert else "http"
        print(f"moeshare: HTTP on {scheme}://{host}:{http_port}/v1", flush=True)

    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks: list[asyncio.Task] = []
    loading: asyncio.Future | None = None
    try:
        if metrics:
            try:
                metrics_port = metrics.serve(args.host, args.metrics_port)
            except OSError as e:
                raise MoeshareError(f"cannot serve metrics on {args.host}:{args.metrics_port}: {e}") from None
            print(f"moeshare: metrics on http://{host}:{metrics_port}/metrics", file=sys.stderr, flush=True)
        worker.start()
        # the paths, then each synthetic spec's random variants (drawn on the device)
        load = Load(tuple(args.paths), tuple(args.synthetic))
        loading = asyncio.ensure_future(asyncio.wrap_future(worker.ask(load)))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait([loading, stopping, failed], return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set() and not failed.done():
            models = loading.result()  # raises the load's error
            for model, (least, most) in kv_limits(args).items():  # an unknown model or a bad limit: one line
                await asyncio.wrap_future(worker.ask(SetKvLimits(model, least, most)))
            servicer.ready = True
            if http is not None:
                http.api.ready = True
            await set_health(health_pb2.HealthCheckResponse.SERVING)
            print(f"moeshare: serving {', '.join(models)}", flush=True)
            if metrics:
                tasks.append(asyncio.ensure_future(_refresh_metrics(worker, metrics)))
            await asyncio.wait([stopping, failed], return_when=asyncio.FIRST_COMPLETED)
        if failed.done():
            await set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            print(f"moeshare: error: {failed.result()}", file=sys.stderr, flush=True)
            return 1
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if loading is not None:
            loading.cancel()
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(_shutdown(server, worker, args.grace), http.stop() if http else asyncio.sleep(0))
        await asyncio.to_thread(worker.stop)
        if metrics:
            metrics.close()


def serve(argv: list[str] | argparse.Namespace | None = None) -> int:
    """Run the server until SIGINT/SIGTERM; bad input prints one line and returns 2."""
    args = argv if isinstance(argv, argparse.Namespace) else build_parser().parse_args(argv)
    try:
        return asyncio.run(run_server(args))
    except MoeshareError as e:
        print(f"moeshare: error: {e}", file=sys.stderr)
        return 2
