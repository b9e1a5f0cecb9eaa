"""Two models of different kinds on one GPU: a dense model and a 4-variant MoE store in one server, under a
mixed Zipf workload, with each request's latency targets at k x its model's solo latency. Per-model SLO
attainment for each scheduling policy between models (least-slack against load-order) and each way their
batches share the GPU (multiplex serial: one after another; streams: side by side on CUDA streams).

    python scripts/bench_policy.py --device cuda --rates 8,24 --out evals/results/serving/policy-h200
    python scripts/bench_policy.py --device cpu --quick        # tiny random models: a smoke run

Every configuration is a real `moeshare serve` process on loopback with both models drawn at random
(`--synthetic`), warmed up, then fed the same seeded workload through the gRPC API at each rate. Solo
latencies (each model alone on the first configuration's server: TTFT by prompt length, TPOT) set the targets:
TTFT target = k x solo TTFT at the request's prompt length, TPOT target = k x solo TPOT, sent with every
request. A request meets them when it completes with its TTFT and TPOT within them (as the server counts
it). Writes summary.json, README.md (command, table) and attainment.png into --out.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import shlex
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import matplotlib
import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import decode_totals, solo_latencies, step_record  # noqa: E402

from moeshare.bench.metrics import Solo, latency_targets, request_latency  # noqa: E402
from moeshare.bench.replay import RequestRecord, replay  # noqa: E402
from moeshare.bench.systems import Route, ServerSpec, deploy  # noqa: E402
from moeshare.bench.workload import Lengths, RequestSpec, WorkloadSpec, around, generate  # noqa: E402
from moeshare.engine.synthetic import from_spec  # noqa: E402
from moeshare.errors import MoeshareError  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CONFIGS = ("load-order/serial", "least-slack/serial", "load-order/streams", "least-slack/streams")
TINY = "hidden=64,intermediate=128,heads=4,kv_heads=2,vocab=300,layers=2"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", default="kind=llama,layers=8", help="--synthetic spec of the dense model")
    p.add_argument("--store", default="layers=8,variants=4,own=2", help="--synthetic spec of the MoE store")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--rates", default="8,24", help="request rates, requests/s over all models")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per rate")
    p.add_argument("--drain", type=float, default=20.0, help="seconds after the arrivals before cancelling")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of untimed workload first")
    p.add_argument("--zipf-alpha", type=float, default=0.9)
    p.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of inter-arrival gaps")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--slo-scale", type=float, default=5.0, help="targets = this x solo latency")
    p.add_argument("--kv-blocks", type=int, default=4096, help="KV blocks per model's store or checkpoint")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny models, short prompts, 4 s per rate")
    p.add_argument("--out", type=Path)
    p.add_argument("--work-dir", type=Path, help="server logs here (default: a temp dir)")
    args = p.parse_args(argv)
    args.configs = [c for c in args.configs.split(",") if c]
    if bad := [c for c in args.configs if c not in CONFIGS]:
        p.error(f"--configs {bad[0]}: choose from {', '.join(CONFIGS)}")
    args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    if not args.rates or min(args.rates) <= 0:
        p.error("--rates needs at least one rate > 0")
    if args.quick:
        args.dense, args.store = f"kind=llama,{TINY}", f"variants=2,own=1,experts=4,{TINY}"
        args.input_len, args.output_len, args.kv_blocks = 32, 8, 256
        args.duration, args.drain, args.warmup = 4.0, 10.0, 1.0
    try:
        args.models = {
            "dense": from_spec(args.dense, "meta").variants,
            "moe": from_spec(args.store, "meta").variants,
        }
    except MoeshareError as e:
        p.error(str(e))
    return args


def lengths(args: argparse.Namespace) -> tuple[Lengths, Lengths]:
    return around(args.input_len, args.output_len)


def met(r: RequestRecord, t: Mapping[str, float]) -> bool:
    x = request_latency(r)
    return (
        x.ok
        and x.ttft_s is not None
        and x.ttft_s <= t["ttft_target"]
        and (x.tpot_s or 0.0) <= t["tpot_target"]
    )


def summarize(
    config: str,
    rate: float,
    requests: Sequence[RequestSpec],
    records: Sequence[RequestRecord],
    args,
    of,
    steps,
) -> list[dict]:
    """A row per model kind and one for all: attainment, P99 TTFT, mean TPOT, failures."""
    by_id = {r.id: r for r in requests}
    kind = {m: k for k, ms in args.models.items() for m in ms}
    rows = []
    for which in ("dense", "moe", "all"):
        mine = [r for r in records if which == "all" or kind[r.variant] == which]
        lat = [request_latency(r) for r in mine]
        ttft = [x.ttft_s for x in lat if x.ttft_s is not None]
        tpot = [x.tpot_s for x in lat if x.tpot_s is not None]
        rows.append(
            {
                "config": config,
                "rate_rps": rate,
                "models": which,
                "requests": len(mine),
                "failed": sum(not r.ok for r in mine),
                "slo_attainment": float(np.mean([met(r, of(by_id[r.id])) for r in mine]))
                if mine
                else float("nan"),
                "p99_ttft_s": float(np.percentile(ttft, 99)) if ttft else float("nan"),
                "mean_tpot_ms": 1e3 * float(np.mean(tpot)) if tpot else float("nan"),
            }
            | ({"x_floor": steps[which]["x_floor"]} if which in steps and steps[which] else {})
        )
    return rows


def kinds_step_totals(address: str, args) -> dict[str, tuple[int, float, float]]:
    """Decode-step totals of the dense model's instance and the store's (one model of each)."""
    totals = decode_totals(address)
    return {k: totals[ms[0]] for k, ms in args.models.items()}


def run_config(config: str, args, lens, solo: dict[str, Solo], bar: tqdm) -> list[dict]:
    policy, multiplex = config.split("/")
    names = [m for ms in args.models.values() for m in ms]  # the dense model first: Zipf rank 1
    options = ("--policy", policy, "--multiplex", multiplex, "--kv-blocks", str(args.kv_blocks))
    spec = ServerSpec(("--synthetic", args.dense, "--synthetic", args.store), tuple(names), options)
    rows = []
    bar.set_description(f"{config}: starting")
    with deploy(config.replace("/", "-"), [spec], args.device, args.logs) as d:
        address = d.servers[0].address
        routes = {m: Route(address, m) for m in names}
        bar.set_description(f"{config}: warm-up")
        warm = [
            RequestSpec(f"warm-{m}-{n}", m, 0.0, tuple(10 + i % 240 for i in range(n)), 4)
            for m in names
            for n in (lens[0].lo, lens[0].hi)
        ]
        asyncio.run(replay(address, warm, temperature=0.0))
        spec_w = WorkloadSpec(
            names,
            max(args.rates),
            args.warmup,
            args.zipf_alpha,
            args.cv,
            *lens,
            vocab=(10, 250),
            seed=args.seed + 1,
        )
        asyncio.run(replay(address, generate(spec_w), temperature=0.0, end_s=2 * args.warmup + 5))
        if not solo:
            bar.set_description(f"{config}: solo latency")
            solo |= solo_latencies(routes, lens, 2, args.seed, quick=True)
        of = latency_targets(solo, args.slo_scale)
        for rate in args.rates:
            bar.set_description(f"{config}: {rate:g} req/s")
            w = WorkloadSpec(
                names, rate, args.duration, args.zipf_alpha, args.cv, *lens, vocab=(10, 250), seed=args.seed
            )
            requests = generate(w)
            before = kinds_step_totals(address, args)
            records = asyncio.run(
                replay(address, requests, temperature=0.0, end_s=args.duration + args.drain, extra=of)
            )
            after = kinds_step_totals(address, args)
            steps = {k: step_record([before[k]], [after[k]]) for k in before}
            rows += summarize(config, rate, requests, records, args, of, steps)
            bar.update()
    return rows


def plot(rows: Sequence[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, which in zip(axes, ("dense", "moe"), strict=True):
        for config in dict.fromkeys(r["config"] for r in rows):
            pts = sorted(
                (r["rate_rps"], r["slo_attainment"])
                for r in rows
                if r["config"] == config and r["models"] == which
            )
            ax.plot(*zip(*pts, strict=True), marker="o", ms=4, label=config)
        ax.set_title({"dense": "dense model", "moe": "MoE store's 4 variants"}[which])
        ax.set_xlabel("request rate, all models (requests/s)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("SLO attainment")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(rows: Sequence[dict]) -> str:
    head = [
        "config",
        "rate_rps",
        "models",
        "requests",
        "failed",
        "slo_attainment",
        "p99_ttft_s",
        "mean_tpot_ms",
        "x_floor",
    ]
    cell = lambda x: f"{x:.3g}" if isinstance(x, float) else str(x)  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k in head) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_policy: --device cuda but CUDA is not available")
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    command = f"python scripts/bench_policy.py {shlex.join(argv)}"
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-policy-out-"))
    lens = lengths(args)
    rows: list[dict] = []
    solo: dict[str, Solo] = {}
    with tempfile.TemporaryDirectory(prefix="bench-policy-") as tmp:
        args.logs = (args.work_dir or Path(tmp)) / "logs"
        with tqdm(total=len(args.configs) * len(args.rates), unit="run") as bar:
            for config in args.configs:
                rows += run_config(config, args, lens, solo, bar)
    out.mkdir(parents=True, exist_ok=True)
    when = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    (out / "summary.json").write_text(
        json.dumps(
            {
                "gpu": gpu,
                "date": when,
                "command": command,
                "solo": {m: asdict(s) for m, s in solo.items()},
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )
    plot(rows, out / "attainment.png")
    solo_lines = "\n".join(
        f"- `{m}`: TTFT {1e3 * (s.ttft0_s + s.ttft_per_token_s * args.input_len):.1f} ms at {args.input_len} tokens, TPOT {1e3 * s.tpot_s:.2f} ms"
        for m, s in solo.items()
    )
    (out / "README.md").write_text(
        f"# Two model kinds on one GPU: policy and multiplexing\n\n{gpu}, {when}.\n\n```bash\n{command}\n```\n\n"
        f"Dense `{args.dense}` and store `{args.store}` in one server; Zipf {args.zipf_alpha} over "
        f"{', '.join(m for ms in args.models.values() for m in ms)} (in that order), prompts ~{args.input_len}, "
        f"outputs ~{args.output_len} tokens; targets {args.slo_scale:g}x solo (TTFT at the request's prompt "
        f"length, TPOT). x_floor: decode steps' time over their floor (engine/stepcost.py).\n\n"
        f"{table(rows)}\n\n![attainment](attainment.png)\n\nSolo latencies:\n{solo_lines}\n"
    )
    print(table(rows))
    print(f"bench_policy: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
