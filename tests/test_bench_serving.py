"""scripts/bench_serving.py end to end on the tiny zoo: every system started, replayed and summarized."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from moeshare.bench.systems import SYSTEMS, ServeLimits, SyntheticWorkspace, Workspace, partition_layout
from moeshare.consolidate.same_index import same_index_pick

ROOT = Path(__file__).resolve().parents[1]
CPU_SYSTEMS = [s for s in SYSTEMS if s not in ("mig-partition", "moeshare-ray")]  # the default on CPU
VARIANTS = 4
OUT_LEN = 8


def _script():
    spec = importlib.util.spec_from_file_location("bench_serving", ROOT / "scripts" / "bench_serving.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tiny_zoo, tmp_path_factory):
    out, work = tmp_path_factory.mktemp("serving"), tmp_path_factory.mktemp("work")
    argv = ["--zoo", "tiny", "--rates", "4", "--duration", "2", "--warmup", "1", "--input-len", "16"]
    argv += ["--output-len"]
    argv += [
        str(OUT_LEN),
        "--fixed-lengths",
        "--solo-repeats",
        "1",
        "--out",
        str(out),
        "--work-dir",
        str(work),
    ]
    assert _script().main(argv) == 0
    return out, work


def test_every_system_has_a_summary_with_finite_metrics(run):
    out, _ = run
    for name in ("records.jsonl", "summary.json", "solo.json", "README.md"):
        assert (out / name).is_file(), name
    for name in ("turnaround_vs_rate.png", "slo_attainment_vs_rate.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG"), name
    summary = json.loads((out / "summary.json").read_text())
    assert [r["system"] for r in summary] == CPU_SYSTEMS
    for r in summary:
        assert r["rate_rps"] == 4.0 and r["requests"] > 0 and r["failed"] == 0, r
        assert r["gpu"] == "cpu" and r["date"]
        for key in ("mean_turnaround_s", "p99_turnaround_s", "p99_ttft_s", "mean_tpot_s", "throughput_rps"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["system"], key)
        assert 0 <= r["slo_attainment_5x"] <= r["slo_attainment_10x"] <= 1
    assert "python scripts/bench_serving.py --zoo tiny" in (out / "README.md").read_text()


def test_every_replayed_request_completes_with_its_tokens(run):
    out, _ = run
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert {r["system"] for r in records} == set(CPU_SYSTEMS)
    for r in records:
        assert r["error"] is None and r["finish_reason"] == "length", r
        assert len(r["token_times_s"]) == OUT_LEN and r["prompt_tokens"] == 16
    solo = json.loads((out / "solo.json").read_text())
    assert set(solo["per_system"]) == set(CPU_SYSTEMS) and len(solo["reference"]) == VARIANTS


def test_reconfig_store_bank_is_the_same_index_pick_bank(run, tiny_zoo, tmp_path):
    _, work = run
    manifest = json.loads((work / "store-same-index-pick-0.5" / "manifest.json").read_text())
    sizes = manifest["bytes"]
    paths = [tiny_zoo / "mixtral" / v for v in json.loads((run[0] / "solo.json").read_text())["reference"]]
    pick = same_index_pick(sorted(paths), tmp_path / "pick", 0.5)
    assert sizes["experts_after"] / sizes["experts_before"] == pytest.approx(pick.fraction)
    assert 0 < pick.fraction <= 0.5


def test_partition_gives_each_variant_an_equal_share(tiny_zoo, tmp_path):
    ckpts = {v: tiny_zoo / "mixtral" / v for v in ("kjv", "python", "fortunes-en", "fortunes-de")}
    specs = partition_layout(Workspace(ckpts, tmp_path), ServeLimits("cpu", 64, 512, 80.0), "0.5")
    assert [s.variants for s in specs] == [(v,) for v in ckpts]
    assert [s.sources for s in specs] == [(str(p),) for p in ckpts.values()]
    for s in specs:
        assert s.options == ("--max-num-seqs", "16", "--kv-blocks", "128", "--memory-limit", "20.000")
        assert s.sm_percent is None
    mig = SYSTEMS["mig-partition"].layout(
        Workspace(ckpts, tmp_path), ServeLimits("cpu", 64, 512, 80.0), "0.5"
    )
    assert [(s.options, s.sm_percent) for s in mig] == [
        (s.options, 25) for s in specs
    ]  # and a quarter of the SMs


def test_mig_partition_on_cpu_fails_in_one_line_and_starts_nothing(tiny_zoo, tmp_path):
    from moeshare.bench.systems import deploy

    ckpts = {v: tiny_zoo / "mixtral" / v for v in ("kjv", "python")}
    specs = SYSTEMS["mig-partition"].layout(Workspace(ckpts, tmp_path), ServeLimits("cpu"), "0.5")
    with pytest.raises(RuntimeError, match="SM shares through CUDA MPS need --device cuda"):
        deploy("mig-partition", specs, "cpu", tmp_path / "logs")
    assert not (tmp_path / "logs").exists()


def test_synthetic_systems_serve_one_family(tmp_path):
    ws = SyntheticWorkspace(4, 2, "layers=8", tmp_path)
    limits = ServeLimits("cuda", 64, 4096, 72.0)
    [moeshare] = SYSTEMS["moeshare"].layout(ws, limits, "0.5")
    assert moeshare.sources == ("--synthetic", "variants=4,own=2,layers=8")
    assert moeshare.variants == ("v0", "v1", "v2", "v3")
    [swap] = SYSTEMS["swap"].layout(ws, limits, "0.5")
    assert swap.options[-3:] == ("--max-resident-variants", "1", "--swap-whole-variants")
    parts = SYSTEMS["partition"].layout(ws, limits, "0.5")
    assert [p.sources[1] for p in parts] == [f"variants=4,own=2,layers=8,only={i}" for i in range(4)]
    assert parts[0].options[-2:] == ("--memory-limit", "18.000")


TINY_FAMILY = "layers=2,hidden=64,intermediate=128,experts=4,heads=4,kv_heads=2,vocab=256,context=256"


def test_synthetic_sweep_split_over_two_runs_with_keep(tmp_path):
    """Synthetic variants on CPU: moeshare alone, then swap and partition with --keep; the second run's
    table holds all three, judged against one reference, and another workload is refused."""
    out = tmp_path / "out"
    common = ["--synthetic", TINY_FAMILY, "--rates", "4", "--duration", "1.5", "--warmup", "0"]
    common += ["--input-len", "16"]
    common += ["--output-len", "4", "--fixed-lengths", "--solo-repeats", "1", "--memory-gib", "1"]
    common += ["--out", str(out)]
    script = _script()
    assert script.main([*common, "--systems", "moeshare"]) == 0
    assert script.main([*common, "--systems", "swap,partition", "--keep"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["system"] for r in summary] == ["moeshare", "swap", "partition"]
    assert all(r["failed"] == 0 and r["requests"] > 0 for r in summary)
    solo = json.loads((out / "solo.json").read_text())
    assert set(solo["per_system"]) == {"moeshare", "swap", "partition"}
    assert set(solo["reference"]) == {"v0", "v1", "v2", "v3"}
    readme = (out / "README.md").read_text()
    assert "--systems moeshare" in readme and "--systems swap,partition --keep" in readme
    before = (out / "summary.json").read_text()
    assert script.main([*common, "--systems", "", "--keep"]) == 0  # re-summarize only
    assert (out / "summary.json").read_text() == before
    assert all(r["mean_turnaround_all_s"] >= r["mean_turnaround_s"] * 0.999 for r in summary)
    with pytest.raises(SystemExit, match="another workload"):
        script.main([*common, "--systems", "swap", "--keep", "--zipf-alpha", "1.2"])


def test_bench_policy_runs_each_configuration_through_a_real_server(tmp_path):
    """scripts/bench_policy.py --quick: a dense model and a 2-variant store in one server, per configuration."""
    spec = importlib.util.spec_from_file_location("bench_policy", ROOT / "scripts" / "bench_policy.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "out"
    configs = "load-order/serial,least-slack/streams"
    assert (
        bench.main(["--device", "cpu", "--quick", "--rates", "3", "--configs", configs, "--out", str(out)])
        == 0
    )
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert [(r["config"], r["models"]) for r in rows] == [
        (c, m) for c in configs.split(",") for m in ("dense", "moe", "all")
    ]
    for r in rows:
        assert r["requests"] > 0 and r["failed"] == 0 and 0 <= r["slo_attainment"] <= 1
    assert all(r["x_floor"] > 0 for r in rows if r["models"] != "all")
    assert (out / "attainment.png").stat().st_size > 0 and "least-slack/streams" in (
        out / "README.md"
    ).read_text()
