"""The `moeshare serve` subcommand: its arguments, registered on the CLI's subparsers."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "paths",
        nargs="*",
        metavar="STORE_OR_CHECKPOINT",
        help="stores (their variants are served under their own names) or HF checkpoint directories (Mixtral, "
        "or dense Llama / Mistral / Qwen2), each served as its directory's name, or as NAME with NAME=PATH",
    )
    p.add_argument(
        "--synthetic",
        action="append",
        default=[],
        metavar="[NAME:]SPEC",
        help="also serve random-weight Mixtral variants v0, v1, ... for speed tests, e.g. "
        "variants=4,own=2,layers=8 (Mixtral-8x7B layer sizes unless given: hidden, intermediate, ...), or a "
        "dense model: kind=llama,layers=8 (Llama-3-8B sizes unless given); NAME: serve a single model as NAME",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (default 50051; 0 picks a free one)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--max-resident-variants", type=int, help="variants per store whose weights stay on the device"
    )
    p.add_argument(
        "--max-queue", type=int, default=256, help="waiting requests before RESOURCE_EXHAUSTED (default 256)"
    )
    p.add_argument("--auth-token-file", help="file holding a bearer token every MoeShare call must send")
    p.add_argument(
        "--admin-token-file",
        help="file holding the token the admin calls (LoadStore, UnloadModel) must send; it is good for every "
        "other call too. Without it (or --allow-admin-without-token) the admin calls are off",
    )
    p.add_argument(
        "--allow-admin-without-token",
        action="store_true",
        help="admin calls need no admin token (only with a loopback --host)",
    )
    p.add_argument(
        "--allow-load-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="LoadStore may load stores and checkpoints under DIR (repeatable; default: none, LoadStore is off)",
    )
    p.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key) to serve TLS")
    p.add_argument("--tls-key", help="PEM private key (with --tls-cert)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics over HTTP on this port")
    p.add_argument(
        "--http-port",
        type=int,
        help="also serve the OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions) on "
        "this port, from the same engine (0 picks a free one; the same --auth-token-file and TLS files)",
    )
    p.add_argument(
        "--grace", type=float, default=5.0, help="seconds in-flight streams get at shutdown (default 5)"
    )
    p.add_argument(
        "--gpus",
        type=int,
        help="run one engine per GPU (with --device cpu: per CPU worker) as Ray actors, the models placed "
        "across them; starts a local Ray cluster unless --ray-address is given (needs moeshare[ray])",
    )
    p.add_argument("--ray-address", help="join this Ray cluster for --gpus (e.g. ray://HOST:10001 or auto)")
    p.add_argument(
        "--replan-every",
        type=float,
        metavar="S",
        help="with --gpus: place the models again every S seconds from the load each received, moving "
        "what moved without failing requests (default: never)",
    )
    p.add_argument(
        "--gpu-capacity",
        type=float,
        metavar="RPS",
        help="with --gpus: requests/s of one model one GPU carries; a model with more gets more replicas at "
        "the next re-plan (default: one replica each)",
    )
    p.add_argument("--kv-blocks", type=int, help="KV blocks per store (default: from free device memory)")
    p.add_argument(
        "--pool",
        type=float,
        metavar="GIB",
        help="one pool of GIB of device memory in pages for every served model's weights and KV: KV pages are "
        "mapped as a model's KV blocks grow and given back as they shrink, and a model's weights can leave "
        "the device for another's (see --evict-after), so memory follows the load (default: weights where "
        "torch puts them and a fixed KV pool per store or checkpoint)",
    )
    p.add_argument(
        "--evict-after",
        type=float,
        metavar="SECONDS",
        help="with --pool: move a model's weights off the device after SECONDS without a request (default: "
        "only when another model needs the pages); its next request brings them back",
    )
    p.add_argument(
        "--evict-to",
        metavar="{auto,host,disk}",
        default="auto",
        help="where evicted weights go: host (pinned) memory, or dropped and read again from the checkpoint "
        "(disk; stores always go to host memory); auto: host memory while it has room (default)",
    )
    p.add_argument(
        "--kv-min",
        action="append",
        default=[],
        metavar="MODEL=GIB",
        help="keep GIB of the elastic KV pool for MODEL's store or checkpoint even when idle (repeatable)",
    )
    p.add_argument(
        "--kv-max",
        action="append",
        default=[],
        metavar="MODEL=GIB",
        help="hold MODEL's store or checkpoint to GIB of the elastic KV pool (repeatable)",
    )
    p.add_argument(
        "--max-num-seqs",
        type=int,
        help="sequences one step of a store or checkpoint decodes at most (default: each its own, from its "
        "model and the GPU; 64 on CPU)",
    )
    p.add_argument(
        "--policy",
        default="least-slack",
        metavar="{least-slack,load-order}",
        help="which models' work runs each step: least-slack (requests nearest their latency targets first, "
        "every model with work at least every 5 steps; the default) or load-order (every model, every step)",
    )
    p.add_argument(
        "--slo",
        action="append",
        default=[],
        metavar="MODEL=TTFT,TPOT",
        help="default latency targets in seconds for MODEL's requests that bring none (time to first token, "
        "time per output token; either may be empty; repeatable); GetStats counts the requests that met them",
    )
    p.add_argument(
        "--max-batched-tokens",
        type=int,
        help="tokens one step of a store or checkpoint computes at most: decodes first, then chunks of "
        "prompts (default: each its own, from its model and the GPU; 2048 on CPU)",
    )
    p.add_argument(
        "--multiplex",
        default="streams",
        choices=["serial", "streams"],
        help="how the models picked for a step share the GPU: streams (each model's batches on a CUDA stream "
        "of its own, beside the others' and not waiting for them; the default) or serial (their batches one "
        "after another, each step waiting for all)",
    )
    p.add_argument(
        "--no-chunked-prefill",
        dest="chunked_prefill",
        action="store_false",
        help="prefill each prompt whole (one longer than --max-batched-tokens alone in its step) instead of in "
        "chunks beside the running decodes",
    )
    p.add_argument(
        "--memory-limit",
        type=float,
        metavar="GIB",
        help="device memory the server may use for weights, KV and work space; MoE layers beyond it wait "
        "in pinned host memory and are copied in per step (on CUDA the allocator is held to it too)",
    )
    p.add_argument(
        "--swap-whole-variants",
        action="store_true",
        help="no expert sharing on the device: each resident variant holds its own experts, and a swap "
        "copies the whole variant from pinned host memory (the temporal-multiplexing baseline)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moeshare serve", description="serve stores over gRPC")
    add_serve_arguments(p)
    return p


def _run(args: argparse.Namespace) -> int:
    from moeshare.server.app import run_server

    return asyncio.run(run_server(args))


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve stores and checkpoints over gRPC")
    add_serve_arguments(p)
    p.set_defaults(run=_run)
    return p
