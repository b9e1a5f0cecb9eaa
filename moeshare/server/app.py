"""Start the server: bind first (health NOT_SERVING), load the stores, then SERVING; stop cleanly on a signal."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from moeshare.engine.engine import Engine, EngineConfig
from moeshare.engine.synthetic import from_spec
from moeshare.errors import MoeshareError
from moeshare.server.auth import BearerAuth, read_token
from moeshare.server.command import build_parser
from moeshare.server.metrics import Metrics
from moeshare.server.servicer import MoeShareServicer
from moeshare.server.worker import EngineWorker
from moeshare.v1 import moeshare_pb2, moeshare_pb2_grpc

SERVICE = moeshare_pb2.DESCRIPTOR.services_by_name["MoeShare"].full_name
METRICS_REFRESH_S = 1.0


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise MoeshareError(f"cannot read {flag} {path}: {e.strerror or e}") from None


def check_args(args: argparse.Namespace) -> tuple[str | None, grpc.ServerCredentials | None]:
    """Refuse bad input before anything starts; returns the bearer token and TLS credentials, if any."""
    if not args.paths and not args.synthetic:
        raise MoeshareError("nothing to serve: give a store or checkpoint directory (or --synthetic SPEC)")
    for p in args.paths:
        if not Path(p).exists():
            raise MoeshareError(f"no store or checkpoint at {p}")
    for spec in args.synthetic:
        from_spec(spec, "meta")  # the spec's errors now, before anything starts
    if args.memory_limit is not None and not args.memory_limit > 0:
        raise MoeshareError(f"--memory-limit must be > 0 GiB, got {args.memory_limit}")
    if args.max_queue < 1:
        raise MoeshareError(f"--max-queue must be at least 1, got {args.max_queue}")
    if args.grace < 0:
        raise MoeshareError(f"--grace must be >= 0 seconds, got {args.grace}")
    token = read_token(args.auth_token_file) if args.auth_token_file else None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise MoeshareError("--tls-cert and --tls-key go together: give both or neither")
    creds = None
    if args.tls_cert:
        pair = (_read(args.tls_key, "--tls-key"), _read(args.tls_cert, "--tls-cert"))
        creds = grpc.ssl_server_credentials([pair])
    return token, creds


def _sources(args: argparse.Namespace) -> list:
    """What to load: the paths, then each synthetic spec's random variants (drawn on the device)."""
    return [*args.paths, *(from_spec(spec, args.device) for spec in args.synthetic)]


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        device=args.device,
        max_resident_variants=args.max_resident_variants,
        kv_blocks=args.kv_blocks,
        max_num_seqs=args.max_num_seqs,
        memory_limit_bytes=None if args.memory_limit is None else int(args.memory_limit * 2**30),
        swap_whole_variants=args.swap_whole_variants,
    )


async def _refresh_metrics(worker: EngineWorker, metrics: Metrics) -> None:
    while True:
        snap = await asyncio.wrap_future(worker.call(worker.snapshot))
        metrics.update(snap.engine, sum(m.queue_depth for m in snap.models))
        await asyncio.sleep(METRICS_REFRESH_S)


async def run_server(args: argparse.Namespace) -> int:
    token, creds = check_args(args)
    metrics = Metrics() if args.metrics_port is not None else None
    worker = EngineWorker(
        Engine([], _engine_config(args)), args.max_queue, metrics.observe if metrics else None
    )
    servicer = MoeShareServicer(worker, metrics)
    server = grpc.aio.server(interceptors=[BearerAuth(token)] if token else [])
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

    loop = asyncio.get_running_loop()
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
        engine = worker.engine
        loading = asyncio.ensure_future(
            asyncio.wrap_future(worker.call(lambda: [v for p in _sources(args) for v in engine.load(p)]))
        )
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait([loading, stopping], return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():
            models = loading.result()  # raises the load's error
            servicer.ready = True
            await set_health(health_pb2.HealthCheckResponse.SERVING)
            print(f"moeshare: serving {', '.join(models)}", flush=True)
            if metrics:
                tasks.append(asyncio.ensure_future(_refresh_metrics(worker, metrics)))
            await stopping
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
        await server.stop(args.grace)  # stop accepting; in-flight streams get `grace` seconds, then cancelled
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
