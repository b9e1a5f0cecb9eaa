"""Serving benchmark: several systems serve the same variants under the same workload, through the real
gRPC API on loopback (issue 7).

    python scripts/bench_serving.py --zoo tiny --device cpu --quick
    python scripts/bench_serving.py --synthetic layers=8 --device cuda --rates 1,2,4,8,16
    python scripts/bench_serving.py --store-dir CHECKPOINTS --device cuda --rates 0.5,1,2,4

Systems (moeshare.bench.systems): `moeshare` (one consolidated store, cross-variant batching),
`reconfig-bs1` (same-index-pick bank, one variant's non-expert tensors resident, batch size 1), `swap`
(one variant's whole weights resident at a time), `partition` (one server per variant, equal shares of
memory, KV and batch), `mig-partition` (`partition` with equal shares of the SMs through CUDA MPS; CUDA only). For each system: start its servers, warm them up, time each variant's request
alone at two prompt lengths, then for each rate replay the seeded workload open loop and keep every
request's timings. A request meets its SLO when its turnaround is within k times its solo latency at its
own lengths, on the system where that variant's solo latency is lowest in this run, so every system is
judged against one reference. Writes records.jsonl, summary.json, solo.json, two PNG plots and a
README.md with the command and the table into --out (default: a new scratch directory, printed); with
--keep, the systems not run this time keep their earlier results there (a sweep can be split over several
runs). A system that fails (a server that does not start, a failed warm-up or solo request) is recorded
with its error and the others still run; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import shlex
import sys
import tempfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import matplotlib
import numpy as np
import torch
from tqdm import tqdm

from moeshare.bench.metrics import Solo, summarize
from moeshare.bench.replay import RequestRecord, replay
from moeshare.bench.systems import (
    SYSTEMS,
    Deployment,
    Route,
    ServeLimits,
    SyntheticWorkspace,
    Workspace,
    deploy,
)
from moeshare.bench.workload import ZOO_PRINTABLE, Lengths, RequestSpec, WorkloadSpec, generate
from moeshare.client import Client
from moeshare.errors import MoeshareError, one_line
from moeshare.zoo import build_zoo

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

INTERRUPTED = "interrupted (Ctrl-C)"
CUDA_ONLY = ("mig-partition",)  # SM shares through CUDA MPS
ASKED_ONLY = ("moeshare-ray",)  # runs only when named: it needs Ray (moeshare[ray]) and starts a Ray cluster
# decode steps under load against their floor (the bytes they read over the copy bandwidth; engine/stepcost.py)
STEP_KEYS = ("decode_steps", "decode_step_ms", "decode_floor_ms", "x_floor")
TABLE_KEYS = (
    "mean_turnaround_s",
    "mean_turnaround_all_s",
    "p99_turnaround_s",
    "p99_ttft_s",
    "mean_tpot_s",
    "slo_attainment_5x",
    "slo_attainment_10x",
    "throughput_rps",
    "tokens_per_s",
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--zoo", choices=["tiny", "small"], default="tiny", help="the trained zoo's Mixtral variants"
    )
    src.add_argument(
        "--store-dir", type=Path, help="a directory of variant HF checkpoints, one per subdirectory"
    )
    src.add_argument(
        "--synthetic",
        metavar="SIZES",
        help="random-weight Mixtral variants at Mixtral-8x7B layer sizes unless SIZES says otherwise, e.g. "
        "layers=8 (see `moeshare serve --synthetic`)",
    )
    p.add_argument(
        "--own", type=int, default=2, help="with --synthetic: experts per layer each variant keeps"
    )
    p.add_argument(
        "--variants", type=int, default=4, help="how many variants (default 4), most popular first"
    )
    p.add_argument(
        "--systems",
        help=f"comma list of {', '.join(SYSTEMS)} (default: all but {', '.join(ASKED_ONLY)}; "
        f"{', '.join(CUDA_ONLY)} only with --device cuda)",
    )
    p.add_argument("--rates", default="0.5,1,2,4", help="comma list of request rates, requests/s in all")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per rate (default 60)")
    p.add_argument("--input-len", type=int, default=512, help="median prompt tokens (default 512)")
    p.add_argument("--output-len", type=int, default=128, help="median output tokens (default 128)")
    p.add_argument("--fixed-lengths", action="store_true", help="every request exactly the medians")
    p.add_argument("--zipf-alpha", type=float, default=0.9)
    p.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of inter-arrival gaps")
    p.add_argument("--budget", default="0.5", help="bank budget of the moeshare and reconfig-bs1 stores")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences per step, per system in all")
    p.add_argument("--kv-blocks", type=int, default=512, help="KV blocks per system in all (default 512)")
    p.add_argument(
        "--memory-gib",
        type=float,
        help="device memory per system in all (partition splits it); default on CUDA: 90%% of the device",
    )
    p.add_argument(
        "--warmup", type=float, default=10.0, help="untimed seconds of load before each system's solo runs"
    )
    p.add_argument("--solo-repeats", type=int, default=3, help="timed solo requests per variant (median)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request fails")
    p.add_argument(
        "--drain",
        type=float,
        default=60.0,
        help="seconds after the last arrival before unfinished requests are cancelled and count as failed "
        "(default 60)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="first and last rate only, at most 15 s of arrivals and 15 s of drain each, 5 s of warm-up "
        "load, solo at one prompt length and at most 32 output tokens",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep --out's results of the systems not run now (with --systems '' only re-summarize them)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="directory for the results (default: a new scratch directory, printed); the committed results "
        "are in evals/results/serving",
    )
    p.add_argument("--work-dir", type=Path, help="keep stores and server logs here (default: a temp dir)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.systems is None:
        args.systems = ",".join(
            s for s in SYSTEMS if s not in ASKED_ONLY and (args.device == "cuda" or s not in CUDA_ONLY)
        )
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not args.systems and not args.keep:
        p.error("--systems is empty: name at least one (an empty list only re-summarizes --out with --keep)")
    if args.keep and args.out is None:
        p.error("--keep adds to the results of earlier runs: name their directory with --out")
    if unknown := [s for s in args.systems if s not in SYSTEMS]:
        p.error(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    if not args.rates or min(args.rates) <= 0:
        p.error("--rates needs at least one rate > 0")
    if args.quick:
        args.duration, args.drain = min(args.duration, 15.0), min(args.drain, 15.0)
        args.warmup = min(args.warmup, 5.0)
        args.rates = sorted({args.rates[0], args.rates[-1]})
        args.solo_repeats = 1
    if args.synthetic is not None:
        try:
            SyntheticWorkspace(args.variants, args.own, args.synthetic, Path())
        except MoeshareError as e:
            p.error(str(e))
    return args


def variant_checkpoints(directory: Path, n: int) -> dict[str, Path]:
    found = sorted(p for p in directory.iterdir() if (p / "config.json").is_file() and p.name != "base")
    if len(found) < n:
        raise SystemExit(f"bench_serving: {directory} has {len(found)} variant checkpoints, {n} asked for")
    return {p.name: p for p in found[:n]}


def lengths(args: argparse.Namespace, context: int) -> tuple[Lengths, Lengths]:
    """Prompt and output lengths; lognormal ones are clipped so every request fits the context."""
    if args.fixed_lengths:
        return Lengths.fixed(args.input_len), Lengths.fixed(args.output_len)
    out = Lengths(args.output_len, lo=max(1, args.output_len // 4), hi=2 * args.output_len)
    hi = min(4 * args.input_len, context - out.hi)
    return Lengths(args.input_len, lo=max(1, min(args.input_len // 4, hi)), hi=hi), out


async def replay_routed(
    routes: Mapping[str, Route], requests: Sequence[RequestSpec], timeout_s: float, end_s: float | None = None
) -> list[RequestRecord]:
    """One open-loop replay per server, started together; records in arrival order, under the workload's
    variant names. Each replay keeps its own clock, started within the time it takes to open a channel, so
    only `span_s` mixes clocks."""
    by_address: dict[str, list[RequestSpec]] = defaultdict(list)
    for r in requests:
        route = routes[r.variant]
        by_address[route.address].append(replace(r, variant=route.name))
    parts = await asyncio.gather(
        *(
            replay(a, reqs, temperature=0.0, timeout_s=timeout_s, end_s=end_s)
            for a, reqs in by_address.items()
        )
    )
    named = {r.id: r.variant for r in requests}
    records = [replace(r, variant=named[r.id]) for part in parts for r in part]
    return sorted(records, key=lambda r: r.arrival_s)


def _prompt(n: int, seed: int) -> tuple[int, ...]:
    return tuple(np.random.default_rng(seed).integers(*ZOO_PRINTABLE, size=n).tolist())


def warm_up(routes: Mapping[str, Route], args: argparse.Namespace, lens: tuple[Lengths, Lengths]) -> None:
    """Untimed: every variant at the shortest and the longest prompt, all at once, then `--warmup` seconds
    of the workload (another seed) at the highest rate, so kernels compile for the prefill and batch sizes
    the measured runs will see before anything is timed."""
    requests = [
        RequestSpec(f"warm-{v}-{n}", v, 0.0, _prompt(n, args.seed), 4)
        for v in routes
        for n in (lens[0].lo, lens[0].hi)
    ]
    records = asyncio.run(replay_routed(routes, requests, timeout_s=600.0))
    if failed := [r for r in records if not r.ok]:
        raise RuntimeError(f"warm-up request of {failed[0].variant} failed: {failed[0].error}")
    if args.warmup > 0:
        spec = WorkloadSpec(
            list(routes), max(args.rates), args.warmup, args.zipf_alpha, args.cv, *lens, seed=args.seed + 1
        )
        asyncio.run(replay_routed(routes, generate(spec), args.request_timeout, end_s=2 * args.warmup))


def solo_latencies(
    routes: Mapping[str, Route], lens: tuple[Lengths, Lengths], repeats: int, seed: int, quick: bool = False
) -> dict[str, Solo]:
    """Each variant with nothing else on its server: one untimed one-token request first (it makes the
    variant resident), then `repeats` of the median output length at two prompt lengths (half and twice
    the median, within the clipping), fitted to `Solo`. quick: the median prompt only, and at most 32
    output tokens (TPOT needs no more)."""
    inp, out = lens
    both, tokens = not quick, min(out.median, 32) if quick else out.median
    short, long = max(inp.lo, inp.median // 2), min(inp.hi, inp.median * 2)
    solo = {}
    for v, route in routes.items():
        name = route.name
        specs = [RequestSpec(f"solo-{v}-first", name, 0.0, _prompt(inp.median, seed), 1)]
        specs += [
            RequestSpec(f"solo-{v}-{n}-{i}", name, 0.0, _prompt(n, seed + i), tokens)
            for i in range(repeats)
            for n in (sorted({short, long}) if both else [inp.median])
        ]
        records = []
        for spec in specs:  # one at a time
            [rec] = asyncio.run(replay(route.address, [spec], temperature=0.0))
            if not rec.ok:
                raise RuntimeError(f"solo request of {v} failed: {rec.error}")
            records.append(rec)
        solo[v] = Solo.fit(records[1:])
    return solo


def gpu_used_bytes(device: str) -> int | None:
    if device != "cuda":
        return None
    free, total = torch.cuda.mem_get_info()
    return total - free


@dataclass
class RateRun:
    rate_rps: float
    records: list[RequestRecord]
    gpu_mem_used_gib: float | None  # the whole device while the system ran, less what was used before
    steps: dict = field(
        default_factory=dict
    )  # decode steps during the rate, against their floor (step_record)


def decode_totals(address: str) -> dict[str, tuple[int, float, float]]:
    """Per model, its store's or checkpoint's decode-step totals so far (steps, seconds, floor seconds)."""
    with Client(address) as client:
        models = client.stats(timeout=10.0).models
    return {
        m.name: (m.decode_steps.steps, m.decode_steps.seconds, m.decode_steps.floor_seconds) for m in models
    }


def step_totals(d: Deployment) -> list[tuple[int, float, float]]:
    """Each server's decode-step totals: every server here serves one store or checkpoint, so any of its
    models carries its instance's totals."""
    return [next(iter(decode_totals(s.address).values())) for s in d.servers]


def step_record(before: list[tuple[int, float, float]], after: list[tuple[int, float, float]]) -> dict:
    """The decode steps between two step_totals, over all servers: mean step time, mean floor, their ratio."""
    steps, seconds, floor = (sum(a[i] - b[i] for a, b in zip(after, before, strict=True)) for i in range(3))
    if steps == 0:
        return {}
    return {
        "decode_steps": steps,
        "decode_step_ms": 1e3 * seconds / steps,
        "decode_floor_ms": 1e3 * floor / steps,
        "x_floor": seconds / floor,
    }


@dataclass
class SystemRun:
    system: str
    solo: dict[str, Solo]
    rates: list[RateRun] = field(default_factory=list)
    gpu: str = ""
    date: str = ""
    command: str = ""
    error: str = ""  # why the system stopped short: its rates so far are kept


def workload(
    args: argparse.Namespace, variants: list[str], rate: float, lens: tuple[Lengths, Lengths]
) -> list[RequestSpec]:
    spec = WorkloadSpec(
        variants, rate, args.duration, args.zipf_alpha, args.cv, lens[0], lens[1], seed=args.seed
    )
    return generate(spec)


def run_system(
    name: str,
    ws: Workspace | SyntheticWorkspace,
    args: argparse.Namespace,
    lens: tuple[Lengths, Lengths],
    bar: tqdm,
) -> SystemRun:
    """One system's run; an error (its store, a server, a request the solo runs need) ends it early and is
    recorded in `error`, so the systems after it still run and the results are still written."""
    run = SystemRun(name, {}, [], args.gpu, args.date, args.command)
    try:
        _measure(run, ws, args, lens, bar)
    except KeyboardInterrupt:  # the caller stops here, and writes what ran
        run.error = INTERRUPTED
    except Exception as e:
        run.error = one_line(e)
        tqdm.write(f"bench_serving: {name} failed: {run.error}")
    finally:
        bar.update(len(args.rates) - len(run.rates))
    return run


def _measure(
    run: SystemRun,
    ws: Workspace | SyntheticWorkspace,
    args: argparse.Namespace,
    lens: tuple[Lengths, Lengths],
    bar: tqdm,
) -> None:
    name = run.system
    limits = ServeLimits(args.device, args.max_num_seqs, args.kv_blocks, args.memory_gib)
    specs = SYSTEMS[name].layout(ws, limits, args.budget)
    bar.set_description(f"{name}: starting {len(specs)} server(s)")
    baseline = gpu_used_bytes(args.device)
    with deploy(name, specs, args.device, ws.root / "logs") as d:
        _check_served(d, ws.variants)
        bar.set_description(f"{name}: warm-up")
        warm_up(d.routes, args, lens)
        bar.set_description(f"{name}: solo latency")
        run.solo = solo_latencies(d.routes, lens, args.solo_repeats, args.seed, quick=args.quick)
        for rate in args.rates:
            bar.set_description(f"{name}: {rate:g} req/s")
            requests = workload(args, ws.variants, rate, lens)
            end = args.duration + args.drain
            before = step_totals(d)
            records = asyncio.run(replay_routed(d.routes, requests, args.request_timeout, end))
            steps = step_record(before, step_totals(d))
            used = gpu_used_bytes(args.device)
            mem = None if used is None or baseline is None else (used - baseline) / 2**30
            run.rates.append(RateRun(rate, records, mem, steps))
            bar.update()


def _check_served(d: Deployment, variants: list[str]) -> None:
    if missing := sorted(set(variants) - set(d.routes)):
        raise RuntimeError(f"{d.system} serves no {missing}")


def typical(solo: Solo, lens: tuple[Lengths, Lengths]) -> float:
    """Solo latency of a request of median lengths."""
    return solo.latency(lens[0].median, lens[1].median)


def reference_solo(runs: Sequence[SystemRun], lens: tuple[Lengths, Lengths]) -> dict[str, Solo]:
    """Per variant, the solo latency of the system where it is lowest (at median lengths): one SLO for all.
    `single` serves one variant in place of all, so it sets no reference unless it ran alone; a system that
    failed before its solo runs sets none."""
    timed = [r for r in runs if r.solo]
    serving = [r for r in timed if r.system != "single"] or timed
    if not serving:
        return {}
    return {v: min((r.solo[v] for r in serving), key=lambda x: typical(x, lens)) for v in serving[0].solo}


def measured(summary: Sequence[dict]) -> list[dict]:
    """The summary's rows of measured rates, without the rows that record a system's failure."""
    return [r for r in summary if "error" not in r]


def _at(summary: Sequence[dict], system: str) -> dict[float, dict]:
    return {r["rate_rps"]: r for r in summary if r["system"] == system}


def targets(summary: Sequence[dict]) -> str:
    """The issue's targets, read off the table: turnaround against partition and swap, the highest tested
    rate each system serves at 90% SLO attainment (5x), decode throughput against `single`."""
    summary = measured(summary)
    ours = _at(summary, "moeshare")
    lines = []
    key = "mean_turnaround_all_s"  # failed requests counted until they failed: a bound where they were cut
    for other in ("partition", "mig-partition", "swap"):
        theirs = _at(summary, other)
        cells = [
            f"{rate:g} rps: {1 - ours[rate][key] / theirs[rate][key]:.0%}"
            + (" (at least)" if theirs[rate]["failed"] else "")
            for rate in sorted(set(ours) & set(theirs))
        ]
        if cells:
            lines.append(
                f"- mean turnaround (every request; a cancelled one counted until cancelled) lower than "
                f"`{other}` by: {', '.join(cells)}"
            )
    best = {}
    for system in dict.fromkeys(r["system"] for r in summary):
        ok = [rate for rate, r in _at(summary, system).items() if r["slo_attainment_5x"] >= 0.9]
        best[system] = max(ok, default=0.0)
    if best:
        cells = ", ".join(f"`{k}` {v:g}" for k, v in best.items())
        lines.append(f"- highest tested rate at >= 90% SLO attainment (5x), requests/s: {cells}")
    single = _at(summary, "single")
    cells = [
        f"{rate:g} rps: {ours[rate]['tokens_per_s'] / single[rate]['tokens_per_s']:.2f}x tokens/s, "
        f"{ours[rate]['mean_tpot_s'] / single[rate]['mean_tpot_s']:.2f}x TPOT"
        for rate in sorted(set(ours) & set(single))
    ]
    if cells:
        lines.append(f"- 4 variants (`moeshare`) against one variant alone (`single`): {'; '.join(cells)}")
    cells = [
        f"{rate:g} rps: turnaround {ours[rate]['mean_turnaround_s'] / single[rate]['mean_turnaround_s']:.2f}x, "
        f"decode-step floor {ours[rate]['decode_floor_ms'] / single[rate]['decode_floor_ms']:.2f}x"
        for rate in sorted(set(ours) & set(single))
    ]
    if cells:
        lines.append(
            "- `moeshare` against `single`, turnaround next to the ratio of their decode steps' floors (the "
            f"expert slots and rows four variants read beyond one): {'; '.join(cells)}"
        )
    for system in dict.fromkeys(r["system"] for r in summary):
        at = _at(summary, system)
        cells = [
            f"{rate:g} rps {r['x_floor']:.2f}x"
            for rate, r in sorted(at.items())
            if r["x_floor"] == r["x_floor"]
        ]
        if cells:
            lines.append(f"- `{system}` decode step time under load over its floor: {', '.join(cells)}")
    return "\n".join(lines)


def summary_records(runs: Sequence[SystemRun], solo: Mapping[str, Solo]) -> list[dict]:
    """A row per system and measured rate, and a row {system, error, gpu, date} per system that failed."""
    out = []
    for run in runs:
        for rr in run.rates:
            rec = summarize(rr.records, solo, run.system, rr.rate_rps).to_record()
            steps = {k: rr.steps.get(k, math.nan) for k in STEP_KEYS}
            out.append(
                rec | steps | {"gpu_mem_used_gib": rr.gpu_mem_used_gib, "gpu": run.gpu, "date": run.date}
            )
        if run.error:
            out.append({"system": run.system, "error": run.error, "gpu": run.gpu, "date": run.date})
    return out


def plot(summary: Sequence[dict], key: str, ylabel: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    summary = measured(summary)
    for system in dict.fromkeys(r["system"] for r in summary):
        pts = sorted((r["rate_rps"], r[key]) for r in summary if r["system"] == system)
        x, y = zip(*pts, strict=True)
        ax.plot(x, y, marker="o", ms=4, lw=1.5, label=system)
    ax.set_xlabel("request rate (requests/s)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _cell(x: object) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.3g}"
    return str(x)


def table(summary: Sequence[dict]) -> str:
    head = ["system", "rate_rps", "requests", "failed", *TABLE_KEYS, "decode_step_ms", "x_floor"]
    rows = [head, ["---"] * len(head)] + [[_cell(r[k]) for k in head] for r in measured(summary)]
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    failed = [f"- `{r['system']}` failed: {r['error']}" for r in summary if "error" in r]
    return "\n".join(lines + ([""] + failed if failed else []))


def workload_key(args: argparse.Namespace) -> dict:
    """What must match for results of separate runs to share one table."""
    keys = ("zoo", "store_dir", "synthetic", "own", "variants", "input_len", "output_len", "fixed_lengths")
    keys += ("zipf_alpha", "cv", "duration", "drain", "seed", "device")
    return {k: str(getattr(args, k)) for k in keys}


def load_kept(out: Path, skip: Sequence[str], key: dict) -> list[SystemRun]:
    """The earlier runs in `out` of systems not in `skip`, if their workload matches `key`."""
    if not (out / "solo.json").is_file():
        return []
    saved = json.loads((out / "solo.json").read_text())
    if saved.get("workload") != key:
        raise SystemExit(f"bench_serving: --keep: {out} holds results of another workload; use another --out")
    runs = {
        name: SystemRun(
            name,
            {v: Solo(**x) for v, x in meta["solo"].items()},
            [],
            meta["gpu"],
            meta["date"],
            meta["command"],
            meta.get("error", ""),
        )
        for name, meta in saved["per_system"].items()
        if name not in skip
    }
    by_rate: dict[tuple[str, float], list[RequestRecord]] = defaultdict(list)
    for line in (out / "records.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["system"] in runs:
            by_rate[r.pop("system"), r.pop("rate_rps")].append(RequestRecord(**r))
    for (name, rate), records in by_rate.items():
        mem = saved["per_system"][name]["gpu_mem_used_gib"].get(str(rate))
        steps = saved["per_system"][name].get("steps", {}).get(str(rate), {})
        runs[name].rates.append(RateRun(rate, records, mem, steps))
    return list(runs.values())


def write_results(
    out: Path,
    runs: Sequence[SystemRun],
    summary: list[dict],
    solo: dict[str, Solo],
    key: dict,
    about: str,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "records.jsonl").open("w") as f:
        for run in runs:
            for rr in run.rates:
                for r in rr.records:
                    f.write(json.dumps({"system": run.system, "rate_rps": rr.rate_rps} | asdict(r)) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    per_system = {
        r.system: {
            "solo": {v: asdict(x) for v, x in r.solo.items()},
            "gpu": r.gpu,
            "date": r.date,
            "command": r.command,
            "gpu_mem_used_gib": {str(rr.rate_rps): rr.gpu_mem_used_gib for rr in r.rates},
            "steps": {str(rr.rate_rps): rr.steps for rr in r.rates},
        }
        | ({"error": r.error} if r.error else {})
        for r in runs
    }
    reference = {v: asdict(x) for v, x in solo.items()}
    record = {"workload": key, "reference": reference, "per_system": per_system}
    (out / "solo.json").write_text(json.dumps(record, indent=1) + "\n")
    plot(summary, "mean_turnaround_s", "mean turnaround (s)", out / "turnaround_vs_rate.png")
    plot(summary, "slo_attainment_5x", "SLO attainment (5x solo)", out / "slo_attainment_vs_rate.png")
    commands = "\n".join(dict.fromkeys(r.command for r in runs))
    when = ", ".join(dict.fromkeys(f"{r.gpu}, {r.date}" for r in runs))
    (out / "README.md").write_text(
        f"# Serving benchmark\n\n{when}.\n\n```bash\n{commands}\n```\n\n"
        f"{table(summary)}\n\n![turnaround](turnaround_vs_rate.png)\n![SLO](slo_attainment_vs_rate.png)\n\n"
        "SLO: a request meets it when its turnaround is within k x its solo latency at its own prompt and "
        "output lengths, on the system where its variant's solo latency is lowest (`solo.json`: TTFT linear "
        f"in prompt tokens, then a fixed time per output token).\n\n{targets(summary)}\n\n{about}\n"
    )


def workspace(args: argparse.Namespace, root: Path) -> tuple[Workspace | SyntheticWorkspace, int]:
    """The variants to serve and their context length."""
    if args.synthetic is not None:
        ws = SyntheticWorkspace(args.variants, args.own, args.synthetic, root)
        return ws, ws.context
    source = args.store_dir or build_zoo(args.zoo, "mixtral") / "mixtral"
    checkpoints = variant_checkpoints(Path(source), args.variants)
    config = json.loads((next(iter(checkpoints.values())) / "config.json").read_text())
    return Workspace(checkpoints, root), config["max_position_embeddings"]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.device == "cuda" and args.systems and not torch.cuda.is_available():
        raise SystemExit("bench_serving: --device cuda but CUDA is not available")
    if args.device == "cuda" and args.systems and args.memory_gib is None:
        args.memory_gib = 0.9 * torch.cuda.get_device_properties(0).total_memory / 2**30
    args.gpu = torch.cuda.get_device_name() if args.device == "cuda" and args.systems else "cpu"
    args.date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    args.command = f"python scripts/bench_serving.py {shlex.join(argv)}"
    if args.out is None:  # never the committed results unless named
        args.out = Path(tempfile.mkdtemp(prefix="bench-serving-out-"))
        print(f"bench_serving: results go to {args.out} (--out names another directory)", flush=True)
    key = workload_key(args)
    kept = load_kept(args.out, args.systems, key) if args.keep else []

    runs: list[SystemRun] = []
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        ws, context = workspace(args, args.work_dir or Path(tmp))
        lens = lengths(args, context)
        with tqdm(total=len(args.systems) * len(args.rates), unit="run") as bar:
            for name in args.systems:
                runs.append(run_system(name, ws, args, lens, bar))
                if interrupted := runs[-1].error == INTERRUPTED:
                    break
    order = {name: i for i, name in enumerate(SYSTEMS)}
    runs = sorted(kept + runs, key=lambda r: order[r.system])
    solo = reference_solo(runs, lens)
    summary = summary_records(runs, solo)
    about = "\n".join(f"- `{s.system}`: {SYSTEMS[s.system].about}" for s in runs)
    write_results(args.out, runs, summary, solo, key, about)
    print(table(summary))
    print(f"bench_serving: wrote {args.out}")
    if interrupted:
        return 130
    if failed := [r.system for r in runs if r.error]:
        print(f"bench_serving: {', '.join(failed)} failed (see {args.out / 'summary.json'})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
