"""Many models on one GPU: dense models and a 4-variant MoE store served by moeshare and by the ways people do it
today, under Zipf popularity and a phase where popular models go idle and cold ones burst (issue 17).

    python scripts/bench_multimodel.py --set fits --device cuda --rates 2,4,8,16 --out evals/results/multimodel/fits
    python scripts/bench_multimodel.py --set overflows --device cuda --quick --out /tmp/mm
    python scripts/bench_multimodel.py --set tiny --device cpu --quick        # the CPU smoke run

Model sets (moeshare/bench/multimodel.py, random weights at real sizes): `fits`, four Llama-3-8B-size dense models
and a 4-variant Mixtral-8x7B-size store of 8 layers (about 110 GB); `overflows`, eight dense models and the
store (more than the GPU holds); `tiny`, small ones for CPU. Systems: moeshare, static-partition,
mig-partition (CUDA only), muxserve-style, time-share (see that module). Every request carries TTFT and TPOT
targets at --slo-scale x its model's solo latency, measured on the first system run (each model alone on its
server). For each system and rate: TTFT attainment, attainment of both targets, P99 TTFT, mean turnaround,
throughput, per kind too, and a timeline of each model's device memory and of attainment. A system that
fails is recorded with its one-line error and the others still run; results (summary.json, records.jsonl,
timelines.json, README.md, PNGs) are written after every (system, rate). Exit status 1 if a system failed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import shlex
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import matplotlib
import numpy as np
import torch
from tqdm import tqdm

from moeshare.bench import multimodel as mm
from moeshare.bench.metrics import Solo, latency_targets, request_latency
from moeshare.bench.replay import RequestRecord, replay
from moeshare.bench.systems import Deployment, deploy
from moeshare.bench.workload import Lengths, RequestSpec, around
from moeshare.client import Client
from moeshare.errors import one_line

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

VOCAB = (10, 250)  # prompt token ids: valid for every model set's vocabulary
POLL_S = 0.5  # timeline sampling period


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", default="fits", choices=list(mm.MODEL_SETS))
    p.add_argument("--systems", help=f"comma list of {', '.join(mm.SYSTEMS)} (default: all this device runs)")
    p.add_argument("--rates", default="2,4,8,16", help="request rates, requests/s over all models")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per rate (two phases)")
    p.add_argument("--drain", type=float, default=30.0, help="seconds after the arrivals before cancelling")
    p.add_argument("--zipf-alpha", type=float, default=0.9, help="popularity skew over models")
    p.add_argument("--cv", type=float, default=1.0, help="inter-arrival variation in the first phase")
    p.add_argument("--burst-cv", type=float, default=3.0, help="inter-arrival variation of the cold burst")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--slo-scale", type=float, default=5.0, help="targets = this x solo latency")
    p.add_argument("--memory-gib", type=float, help="device memory the systems share (default 90%% of it)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick", action="store_true", help="20 s per rate, 2 rates (on the tiny set: 4 s, short)"
    )
    p.add_argument("--out", type=Path)
    p.add_argument("--work-dir", type=Path, help="server logs here (default: a temp dir)")
    args = p.parse_args(argv)
    if args.systems is None:
        args.systems = ",".join(s for s in mm.SYSTEMS if args.device == "cuda" or s not in mm.CUDA_ONLY)
    args.systems = [s for s in args.systems.split(",") if s]
    if bad := [s for s in args.systems if s not in mm.SYSTEMS]:
        p.error(f"--systems {bad[0]}: choose from {', '.join(mm.SYSTEMS)}")
    args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    if not args.rates or min(args.rates) <= 0:
        p.error("--rates needs at least one rate > 0")
    if args.quick:
        args.rates = sorted({args.rates[0], args.rates[-1]})
        args.duration, args.drain = min(args.duration, 20.0), min(args.drain, 15.0)
    if args.set == "tiny":
        args.input_len, args.output_len = min(args.input_len, 32), min(args.output_len, 8)
        if args.quick:
            args.duration, args.drain = min(args.duration, 4.0), min(args.drain, 10.0)
    return args


def lengths(args: argparse.Namespace) -> tuple[Lengths, Lengths]:
    return around(args.input_len, args.output_len)


# ---- timelines -----------------------------------------------------------------------------------------------


class Timeline(threading.Thread):
    """Samples every server's GetStats while a rate runs: per store or checkpoint, device bytes in the page
    pool (weights and KV) where there is one, else whether its models are on the device."""

    def __init__(self, d: Deployment, labels: Mapping[str, str]) -> None:
        super().__init__(daemon=True)
        self.d, self.labels, self.samples, self.stop = d, labels, [], threading.Event()
        self.t0 = time.perf_counter()

    def run(self) -> None:
        while not self.stop.wait(POLL_S):
            sample: dict[str, float] = {}
            for s in self.d.servers:
                try:
                    with Client(s.address) as client:
                        st = client.stats(timeout=2.0)
                except grpc.RpcError:
                    continue
                if st.HasField("kv_pages"):
                    for owner, pages in st.kv_pages.in_use.items():
                        label = self.labels.get(owner.removesuffix(" weights"), owner)
                        sample[label] = sample.get(label, 0.0) + pages * st.kv_pages.page_bytes
                else:
                    for m in st.models:
                        label = self.labels.get(m.name, m.name)
                        sample[label] = max(sample.get(label, 0.0), float(m.resident))
            self.samples.append((time.perf_counter() - self.t0, sample))


# ---- one system ------------------------------------------------------------------------------------------


@dataclass
class SystemRun:
    system: str
    layout: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    timelines: dict[str, list] = field(default_factory=dict)  # rate -> samples
    error: str = ""


async def _replay_all(d: Deployment, requests: list[RequestSpec], end_s: float, of) -> list[RequestRecord]:
    routes = d.routes
    by_address: dict[str, list[RequestSpec]] = defaultdict(list)
    dropped = []
    for r in requests:
        if r.variant in routes:
            by_address[routes[r.variant].address].append(r)
        else:
            dropped.append(RequestRecord(r.id, r.variant, r.arrival_s, r.prompt_len, r.max_tokens))
            dropped[-1].error = "DROPPED: no server of this system holds the model"
    parts = await asyncio.gather(
        *(replay(a, reqs, temperature=0.0, end_s=end_s, extra=of) for a, reqs in by_address.items())
    )
    return sorted([r for p in parts for r in p] + dropped, key=lambda r: r.arrival_s)


def solo_latencies(
    d: Deployment, names: list[str], lens: tuple[Lengths, Lengths], seed: int
) -> dict[str, Solo]:
    """Each model alone: one untimed request (it brings the model onto the device), then two timed ones at the
    median prompt and half and twice it, 32 output tokens at most."""
    inp, out = lens
    rng = np.random.default_rng(seed)
    solo = {}
    for name in names:
        address = d.routes[name].address
        sizes = [inp.median, max(inp.lo, inp.median // 2), min(inp.hi, 2 * inp.median)]
        specs = [
            RequestSpec(
                f"solo-{name}-{i}",
                name,
                0.0,
                tuple(rng.integers(*VOCAB, size=n).tolist()),
                min(32, out.median),
            )
            for i, n in enumerate(sizes)
        ]
        records = [asyncio.run(replay(address, [s], temperature=0.0))[0] for s in specs]
        if failed := [r for r in records if not r.ok]:
            raise RuntimeError(f"solo request of {name} failed: {failed[0].error}")
        solo[name] = Solo.fit(records[1:])
    return solo


def summarize(system: str, rate: float, records: Sequence[RequestRecord], of, by_id, kinds) -> dict:
    row: dict = {"system": system, "rate_rps": rate}
    span = max((r.finish_s for r in records), default=0.0) - min((r.sent_s for r in records), default=0.0)
    for which in ("all", "dense", "moe"):
        mine = [r for r in records if which == "all" or kinds[r.variant] == which]
        lat = [request_latency(r) for r in mine]
        t = [of(by_id[r.id]) for r in mine]
        ttft_ok = [
            x.ok and x.ttft_s is not None and x.ttft_s <= y["ttft_target"]
            for x, y in zip(lat, t, strict=True)
        ]
        both = [a and (x.tpot_s or 0.0) <= y["tpot_target"] for a, x, y in zip(ttft_ok, lat, t, strict=True)]
        ttfts = [x.ttft_s for x in lat if x.ttft_s is not None]
        done = [x for x in lat if x.ok]
        prefix = "" if which == "all" else f"{which}_"
        row |= {
            f"{prefix}requests": len(mine),
            f"{prefix}failed": sum(not x.ok for x in lat),
            f"{prefix}ttft_attainment": float(np.mean(ttft_ok)) if mine else float("nan"),
            f"{prefix}slo_attainment": float(np.mean(both)) if mine else float("nan"),
            f"{prefix}p99_ttft_s": float(np.percentile(ttfts, 99)) if ttfts else float("nan"),
            f"{prefix}mean_turnaround_s": float(np.mean([x.turnaround_s for x in done]))
            if done
            else float("nan"),
        }
    row["throughput_rps"] = sum(r.ok for r in records) / span if span > 0 else 0.0
    row["tokens_per_s"] = sum(r.tokens_out for r in records) / span if span > 0 else 0.0
    return row


def run_system(system: str, args, models, popularity, lens, solo, bar, write) -> SystemRun:
    run = SystemRun(system)
    lay = mm.layout(system, models, args.usable, popularity, mm.SLACK if args.device == "cuda" else 64 << 20)
    run.layout = {"dropped": lay.dropped, "fixed_gib": {k: v / mm.GIB for k, v in lay.fixed.items()}}
    run.layout["servers"] = [" ".join([*s.sources, *s.options]) for s in lay.servers]
    kinds = {n: m.kind for m in models for n in m.models}
    labels = {n: m.label for m in models for n in m.models}
    try:
        if not lay.servers:
            raise RuntimeError("no model fits this system's memory")
        bar.set_description(f"{system}: starting {len(lay.servers)} server(s)")
        with deploy(system, lay.servers, args.device, args.logs) as d:
            served = [n for n in popularity if n in d.routes]
            bar.set_description(f"{system}: warm-up")
            warm = [RequestSpec(f"warm-{n}", n, 0.0, tuple(range(10, 10 + lens[0].hi)), 2) for n in served]
            for r in warm:  # one at a time: each may have to come onto the device
                asyncio.run(replay(d.routes[r.variant].address, [r], temperature=0.0))
            if need := [
                n for n in served if n not in solo
            ]:  # the first system that serves them measures them
                bar.set_description(f"{system}: solo latency")
                solo |= solo_latencies(d, need, lens, args.seed)
            missing = [n for n in popularity if n not in solo]
            if missing:
                raise RuntimeError(f"no solo latency for {missing[0]}: run a system that serves it first")
            of = latency_targets(solo, args.slo_scale)
            for rate in args.rates:
                bar.set_description(f"{system}: {rate:g} req/s")
                requests = mm.phased_workload(
                    popularity,
                    rate,
                    args.duration,
                    args.zipf_alpha,
                    args.cv,
                    args.burst_cv,
                    lens,
                    VOCAB,
                    args.seed,
                )
                timeline = Timeline(d, labels)
                timeline.start()
                records = asyncio.run(_replay_all(d, requests, args.duration + args.drain, of))
                timeline.stop.set()
                timeline.join()
                by_id = {r.id: r for r in requests}
                run.rows.append(summarize(system, rate, records, of, by_id, kinds))
                run.timelines[str(rate)] = {
                    "samples": timeline.samples,
                    "requests": [
                        [
                            r.arrival_s,
                            labels[r.variant],
                            request_latency(r).ttft_s,
                            of(by_id[r.id])["ttft_target"],
                        ]
                        for r in records
                    ],
                }
                write(run, records, rate)
                bar.update()
    except KeyboardInterrupt:
        run.error = "interrupted (Ctrl-C)"
    except Exception as e:
        run.error = one_line(e)
        tqdm.write(f"bench_multimodel: {system} failed: {run.error}")
    finally:
        bar.update(len(args.rates) - len(run.rows))
    return run


# ---- results -----------------------------------------------------------------------------------------------

COLUMNS = ("requests", "failed", "ttft_attainment", "slo_attainment", "p99_ttft_s", "mean_turnaround_s")


def best_rate(rows: Sequence[dict], system: str, level: float) -> float:
    ok = [r["rate_rps"] for r in rows if r["system"] == system and r["ttft_attainment"] >= level]
    return max(ok, default=0.0)


def table(runs: Sequence[SystemRun]) -> str:
    head = ["system", "rate_rps", *COLUMNS, "dense_ttft_attainment", "moe_ttft_attainment", "tokens_per_s"]
    cell = lambda x: f"{x:.3g}" if isinstance(x, float) else str(x)  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        lines += ["| " + " | ".join(cell(r[k]) for k in head) + " |" for r in run.rows]
    rows = [r for run in runs for r in run.rows]
    lines.append("")
    for run in runs:
        if run.error:
            lines.append(f"- `{run.system}` failed: {run.error}")
        if run.layout.get("dropped"):
            lines.append(
                f"- `{run.system}` could not place {', '.join(run.layout['dropped'])} (their requests fail)"
            )
    cells = ", ".join(
        f"`{run.system}` {best_rate(rows, run.system, 0.99):g} / {best_rate(rows, run.system, 0.90):g}"
        for run in runs
        if run.rows
    )
    lines.append(
        f"- highest tested rate with >= 99% / >= 90% of requests within their TTFT target (req/s): {cells}"
    )
    return "\n".join(lines)


def plot_attainment(runs: Sequence[SystemRun], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for run in runs:
        if run.rows:
            pts = sorted((r["rate_rps"], r["ttft_attainment"]) for r in run.rows)
            ax.plot(*zip(*pts, strict=True), marker="o", ms=4, label=run.system)
    ax.set_xlabel("request rate, all models (requests/s)")
    ax.set_ylabel("requests within their TTFT target")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_timeline(run: SystemRun, rate: str, fixed: Mapping[str, float], path: Path) -> None:
    """Device memory per store or checkpoint over the run, and the share of requests arriving in each 2 s
    window that got their first token within target."""
    data = run.timelines[rate]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    labels = sorted({k for _, s in data["samples"] for k in s} | set(fixed))
    times = [t for t, _ in data["samples"]]
    for label in labels:
        if label in fixed:  # a fixed share: its models stay where they are
            top.plot(times or [0.0], [fixed[label]] * max(1, len(times)), lw=1.2, label=label)
        else:
            top.plot(times, [s.get(label, 0.0) / mm.GIB for _, s in data["samples"]], lw=1.2, label=label)
    top.set_ylabel("device GiB (pool pages)" if not fixed else "device GiB")
    top.legend(fontsize=7, ncol=3)
    top.grid(alpha=0.3)
    reqs = data["requests"]
    if reqs:
        end = max(r[0] for r in reqs) + 2
        edges = np.arange(0, end + 2, 2.0)
        share = []
        for lo in edges[:-1]:
            window = [r for r in reqs if lo <= r[0] < lo + 2]
            share.append(np.mean([r[2] is not None and r[2] <= r[3] for r in window]) if window else np.nan)
        bottom.step(edges[:-1], share, where="post")
    bottom.set_ylabel("within TTFT target")
    bottom.set_xlabel("seconds since the rate started (the cold burst starts halfway through the arrivals)")
    bottom.set_ylim(-0.05, 1.05)
    bottom.grid(alpha=0.3)
    fig.suptitle(f"{run.system}, {rate} req/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_multimodel: --device cuda but CUDA is not available")
    cuda = args.device == "cuda"
    total = torch.cuda.get_device_properties(0).total_memory if cuda else 4 * mm.GIB  # CPU: the tiny set
    args.usable = int((args.memory_gib * mm.GIB) if args.memory_gib else 0.9 * total)
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    command = f"python scripts/bench_multimodel.py {shlex.join(argv)}"
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-multimodel-out-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "records.jsonl").write_text("")
    models = mm.model_set(args.set, torch.bfloat16 if cuda else torch.float32)
    popularity = mm.popularity_order(models, args.seed)
    lens = lengths(args)
    runs: list[SystemRun] = []
    solo: dict[str, Solo] = {}
    when = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    sizes = ", ".join(f"{m.label} {m.weights / mm.GIB:.1f} GiB" for m in models)

    def write(
        current: SystemRun | None = None, records: Sequence[RequestRecord] = (), rate: float = 0.0
    ) -> None:
        done = runs + ([current] if current is not None and current not in runs else [])
        with (out / "records.jsonl").open("a") as f:
            for r in records:
                f.write(json.dumps({"system": current.system, "rate_rps": rate} | asdict(r)) + "\n")
        record = {
            "gpu": gpu, "date": when, "command": command, "set": args.set, "usable_gib": args.usable / mm.GIB,
            "popularity": popularity, "solo": {n: asdict(s) for n, s in solo.items()},
            "systems": {r.system: {"layout": r.layout, "error": r.error} for r in done},
            "rows": [row for r in done for row in r.rows],
        }  # fmt: skip
        (out / "summary.json").write_text(json.dumps(record, indent=1) + "\n")
        (out / "timelines.json").write_text(json.dumps({r.system: r.timelines for r in done}) + "\n")
        plot_attainment(done, out / "ttft_attainment_vs_rate.png")
        images = []
        for r in done:
            if r.timelines:
                rate_key = max(r.timelines, key=float)
                name = f"timeline_{r.system}.png"
                plot_timeline(r, rate_key, r.layout.get("fixed_gib", {}), out / name)
                images.append(f"![{r.system}]({name})")
        (out / "README.md").write_text(
            f"# Many models on one GPU\n\n{gpu}, {when}.\n\n```bash\n{command}\n```\n\n"
            f"Set `{args.set}`: {sizes}; {args.usable / mm.GIB:.1f} GiB of device memory for each system. "
            f"Popularity (Zipf {args.zipf_alpha}, most requested first): {', '.join(popularity)}; in the "
            f"second half of each rate's {args.duration:g} s the popular half goes idle and the cold half "
            f"takes the whole rate in bursts (CV {args.burst_cv:g}). Targets: {args.slo_scale:g}x each "
            f"model's solo TTFT at the request's prompt length and solo TPOT.\n\n{table(done)}\n\n"
            f"![attainment](ttft_attainment_vs_rate.png)\n\n" + "\n".join(images) + "\n"
        )

    with tempfile.TemporaryDirectory(prefix="bench-multimodel-") as tmp:
        args.logs = (args.work_dir or Path(tmp)) / "logs"
        with tqdm(total=len(args.systems) * len(args.rates), unit="run") as bar:
            for system in args.systems:
                run = run_system(system, args, models, popularity, lens, solo, bar, write)
                runs.append(run)
                write()
                if run.error.startswith("interrupted"):
                    return 130
    print(table(runs))
    print(f"bench_multimodel: wrote {out}")
    return 1 if any(r.error for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
