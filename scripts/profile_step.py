"""Where a decode step's time goes: per-kernel device time of steady decode steps against the step's floor.

    python scripts/profile_step.py --model dense --batches 8,128              # Llama-3-8B sizes, 8 layers
    python scripts/profile_step.py --model moe --variants 4 --batches 1,32    # Mixtral-8x7B sizes, 8 layers
    python scripts/profile_step.py --model dense --device cpu --tiny          # a smoke run

Random weights at real sizes (`--layers` layers). For each batch: prompts of --context tokens, --warm decode
steps untimed, then --steps timed ones (wall time per step) and the same number under torch.profiler. The
table lists each kernel's device time per step, grouped by what it does, and the step's floor as the engine
counts it (engine/stepcost.py: the bytes the step reads over the copy bandwidth, or its FLOPs over the matmul
throughput, both measured in this process): how far each part is from what the memory system allows is the
place to start (issue 15).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from moeshare.engine.api import Submit
from moeshare.engine.engine import Engine, EngineConfig
from moeshare.engine.request import SamplingParams
from moeshare.engine.synthetic import from_spec

TINY = "hidden=64,intermediate=128,heads=4,kv_heads=2,vocab=300"
# kernel name pattern -> what it does (first match wins)
GROUPS = [
    (r"paged_attention|merge_splits", "attention"),
    (r"fused_moe|grouped_gemm|align", "MoE / grouped GEMM"),
    (r"gemm|nvjet|cutlass|splitK|sm90_xmma|ampere", "dense GEMM (cuBLAS)"),
    (r"rms_norm", "add + RMSNorm"),
    (r"rotary", "RoPE + KV store"),
    (r"silu", "SiLU x up"),
    (r"greedy|argmax|softmax|topk|sort", "sampling"),
    (r"Memcpy|memcpy|Memset", "copies"),
]


def group(name: str) -> str:
    return next((g for pattern, g in GROUPS if re.search(pattern, name)), "other")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["dense", "moe"], default="dense")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--variants", type=int, default=1, help="MoE variants over one bank (moe only)")
    p.add_argument("--batches", default="8,128")
    p.add_argument("--context", type=int, default=512, help="prompt tokens of every sequence")
    p.add_argument("--warm", type=int, default=20, help="decode steps before timing")
    p.add_argument("--steps", type=int, default=20, help="decode steps timed, and as many profiled")
    p.add_argument("--top", type=int, default=12, help="kernels listed per batch")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--multiplex", choices=["streams", "serial"], default="streams")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke run)")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b]
    return args


def spec(args: argparse.Namespace) -> str:
    sizes = f",{TINY}" if args.tiny else ""
    if args.model == "dense":
        return f"kind=llama,layers={args.layers}{sizes}"
    return f"variants={args.variants},own=2,layers={args.layers}{sizes}"


def run_decode_steps(engine: Engine, b: int, steps: int) -> tuple[float, float]:
    """Step the engine until `steps` decode steps of all `b` sequences are back (b token events each) ->
    (host seconds in the engine's steps that brought tokens back, queueing the next batch; poll steps that
    only found the device busy are not counted). Counts tokens, not engine steps: with multiplex "streams" a
    step that finds the device still busy queues nothing."""
    want, got, busy = steps * b, 0, 0.0
    while got < want:
        t0 = time.perf_counter()
        n = len(engine.step())
        if n:
            busy += time.perf_counter() - t0
        got += n
    return busy, got / b


def profile_batch(engine: Engine, names: list[str], b: int, args: argparse.Namespace) -> None:
    gen = args.warm + 2 * args.steps + 4
    g = torch.Generator().manual_seed(b)
    for j in range(b):
        ids = torch.randint(10, 250, (args.context,), generator=g).tolist()
        engine.submit(
            Submit(names[j % len(names)], ids, SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True))
        )
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    run_decode_steps(engine, b, args.warm)
    before = engine.stats().models[0].decode_steps
    sync()
    t0 = time.perf_counter()
    busy, done = run_decode_steps(engine, b, args.steps)
    sync()
    wall = (time.perf_counter() - t0) / done
    host = busy / done
    after = engine.stats().models[0].decode_steps
    floor = (after.floor_seconds - before.floor_seconds) / max(1, after.steps - before.steps)
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        _, done = run_decode_steps(engine, b, args.steps)
        sync()
    while engine.has_work():
        engine.step()
    kernels: dict[str, tuple[float, float]] = {}
    for ev in prof.key_averages():
        t = (ev.self_device_time_total if cuda else ev.self_cpu_time_total) / done
        if t > 0:
            kernels[ev.key] = (t, ev.count / done)
    total = sum(t for t, _ in kernels.values())
    by_group: dict[str, float] = defaultdict(float)
    for name, (t, _) in kernels.items():
        by_group[group(name)] += t
    print(
        f"\n## batch {b}: {wall * 1e3:.3f} ms per decode step (wall), floor {floor * 1e3:.3f} ms -> "
        f"{floor / wall:.0%}; host {host * 1e3:.3f} ms per step queueing and reading back"
    )
    print(f"{'device' if cuda else 'CPU'} time per step {total:.0f} us; by group:")
    for name, t in sorted(by_group.items(), key=lambda x: -x[1]):
        print(f"  {t:9.1f} us  {t / total:5.1%}  {name}")
    print(f"top {args.top} kernels:")
    for name, (t, n) in sorted(kernels.items(), key=lambda x: -x[1][0])[: args.top]:
        print(f"  {t:9.1f} us  x{n:5.1f}  {name[:100]}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("profile_step: --device cuda but CUDA is not available")
    most = max(args.batches)
    blocks = most * (args.context + args.warm + 2 * args.steps + 8) // 16 + 64
    config = EngineConfig(
        device=args.device,
        kv_blocks=blocks,
        multiplex=args.multiplex,
        max_num_seqs=most,
        max_batched_tokens=most * args.context,
    )
    engine = Engine([from_spec(spec(args), args.device)], config)
    names = [m.name for m in engine.models()]
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"# profile_step {spec(args)} on {gpu}: context {args.context}, {args.steps} steps")
    for b in args.batches:
        profile_batch(engine, names, b, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
