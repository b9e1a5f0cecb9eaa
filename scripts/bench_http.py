"""Requests per second through the OpenAI-compatible HTTP API against the gRPC API, same server, same engine.

    python scripts/bench_http.py                         # the tiny zoo's kjv variant, CPU
    python scripts/bench_http.py --requests 400 --concurrency 32 --max-tokens 8

Starts `moeshare serve` on loopback with --http-port, then for each API sends --requests short completions
(--max-tokens greedy tokens each, --concurrency in flight at once; `stream` as the API streams them) and
reports completed requests per second and the median latency. The difference is the front end's cost per
request (JSON and HTTP against protobuf and HTTP/2), the engine's work being the same.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

from moeshare.client import AsyncClient


def start(model_dir: Path) -> tuple[subprocess.Popen, str, str]:
    cmd = [sys.executable, "-m", "moeshare.cli", "serve", str(model_dir), "--port", "0", "--http-port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    grpc_address = http = ""
    for line in proc.stdout:
        if line.startswith("moeshare: listening on "):
            grpc_address = line.split()[-1]
        if line.startswith("moeshare: HTTP on "):
            http = line.split()[-1]
        if line.startswith("moeshare: serving"):
            return proc, grpc_address, http
    raise SystemExit("bench_http: the server did not start")


async def run(send, requests: int, concurrency: int) -> tuple[float, float]:
    """(requests per second, median latency in seconds) of `requests` calls of `send`, `concurrency` at once."""
    latencies: list[float] = []
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            t0 = time.perf_counter()
            await send(i)
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    return requests / (time.perf_counter() - t0), statistics.median(latencies)


async def main_async(
    args: argparse.Namespace, grpc_address: str, http: str
) -> list[tuple[str, float, float]]:
    from openai import AsyncOpenAI

    prompt = "And God said unto Moses,"
    grpc_client = AsyncClient(grpc_address)
    openai_client = AsyncOpenAI(base_url=http, api_key="none", max_retries=0)

    async def grpc_call(i: int) -> None:
        await grpc_client.complete(args.model, prompt, max_tokens=args.max_tokens, temperature=0.0, seed=i)

    async def http_call(i: int) -> None:
        await openai_client.completions.create(
            model=args.model, prompt=prompt, max_tokens=args.max_tokens, temperature=0, seed=i
        )

    async def http_stream(i: int) -> None:
        stream = await openai_client.completions.create(
            model=args.model, prompt=prompt, max_tokens=args.max_tokens, temperature=0, seed=i, stream=True
        )
        async for _ in stream:
            pass

    rows = []
    for name, send in (
        ("grpc Complete", grpc_call),
        ("http completions", http_call),
        ("http stream", http_stream),
    ):
        await run(send, args.concurrency, args.concurrency)  # warm-up
        rps, median = await run(send, args.requests, args.concurrency)
        rows.append((name, rps, median))
        print(f"  {name:<18} {rps:7.1f} req/s  median {median * 1e3:7.1f} ms", flush=True)
    await grpc_client.close()
    await openai_client.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", type=Path, help="the tiny zoo (default: build or reuse the cached one)")
    p.add_argument("--model", default="kjv", help="a Mixtral variant of the zoo, served alone")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=8)
    args = p.parse_args(argv)
    if args.zoo is None:
        from moeshare.zoo import build_zoo

        args.zoo = build_zoo(size="tiny", arch="mixtral")
    proc, grpc_address, http = start(args.zoo / "mixtral" / args.model)
    try:
        print(
            f"bench_http: {args.requests} requests of {args.max_tokens} tokens, {args.concurrency} in flight",
            flush=True,
        )
        rows = asyncio.run(main_async(args, grpc_address, http))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print("| API | req/s | median latency (ms) |\n|---|---|---|")
    for name, rps, median in rows:
        print(f"| {name} | {rps:.1f} | {median * 1e3:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
