"""The multi-model benchmark (scripts/bench_multimodel.py): the layouts of each system at real sizes, and the
whole pipeline on CPU with tiny models through real servers."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from moeshare.bench import multimodel as mm

ROOT = Path(__file__).resolve().parents[1]
H200 = int(0.9 * 139.8 * mm.GIB)


@pytest.fixture(scope="module")
def sets():
    return {name: mm.model_set(name) for name in ("fits", "overflows")}


def test_the_fits_set_is_about_110_gb_and_every_system_places_every_model(sets):
    models = sets["fits"]
    assert 100e9 < sum(m.weights for m in models) < 115e9
    pop = mm.popularity_order(models, 0)
    assert sorted(pop) == sorted(n for m in models for n in m.models) and len(pop) == 8
    for system in mm.SYSTEMS:
        lay = mm.layout(system, models, H200, pop)
        assert lay.dropped == [], system
    static = mm.layout("static-partition", models, H200, pop)
    assert len(static.servers) == 5 and {s.options[:2] for s in static.servers} == {
        ("--memory-limit", "25.164")
    }
    for m, server in zip(models, static.servers, strict=True):  # KV: what the share leaves beside the weights
        blocks = int(server.options[server.options.index("--kv-blocks") + 1])
        if m.kind == "dense":
            assert (
                m.weights + m.work + blocks * m.block + mm.SLACK
                <= H200 // 5
                < m.weights + m.work + (blocks + 1) * m.block + mm.SLACK
            )
        else:  # the store does not fit its share: its MoE layers wait in host memory, KV takes a quarter
            assert m.weights > H200 // 5 and blocks == H200 // 5 // 4 // m.block
    mig = mm.layout("mig-partition", models, H200, pop)
    assert {s.sm_percent for s in mig.servers} == {20}
    [one] = mm.layout("moeshare", models, H200, pop).servers
    assert one.options[:2] == ("--pool", "124.820") and len(one.variants) == 8
    assert list(one.variants[:4]) == ["v0", "v1", "v2", "v3"]  # the store (the largest) loads first


def test_on_the_overflows_set_fixed_splits_drop_models_and_moeshare_keeps_all(sets):
    models = sets["overflows"]
    pop = mm.popularity_order(models, 0)
    assert sum(m.weights for m in models) > H200
    assert mm.layout("moeshare", models, H200, pop).dropped == []
    assert mm.layout("time-share", models, H200, pop).dropped == []
    static = mm.layout("static-partition", models, H200, pop)
    assert len(static.dropped) == 8  # an eighth-and-a-bit of the GPU holds no 8B-size model
    mux = mm.layout("muxserve-style", models, H200, pop)
    kept = mux.servers[0].variants  # filled most popular first: what did not fit beside them is dropped
    assert mux.dropped and pop[0] in kept and set(kept) | set(mux.dropped) == set(pop)


def test_the_cold_burst_goes_to_the_least_popular_half():
    from moeshare.bench.workload import Lengths

    pop = [f"m{i}" for i in range(6)]
    reqs = mm.phased_workload(pop, 20.0, 10.0, 1.0, 1.0, 3.0, (Lengths(8), Lengths(4)), (10, 250), 0)
    first = {r.variant for r in reqs if r.arrival_s < 5.0}
    second = {r.variant for r in reqs if r.arrival_s >= 5.0}
    assert "m0" in first and second <= {"m3", "m4", "m5"} and len({r.id for r in reqs}) == len(reqs)


def test_the_benchmark_runs_every_cpu_system_through_real_servers(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "bench_multimodel", ROOT / "scripts" / "bench_multimodel.py"
    )
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    out = tmp_path / "out"
    systems = "moeshare,static-partition,muxserve-style,time-share"
    argv = [
        "--set",
        "tiny",
        "--device",
        "cpu",
        "--quick",
        "--rates",
        "3",
        "--systems",
        systems,
        "--out",
        str(out),
    ]
    assert bench.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["system"] for r in summary["rows"]] == systems.split(",")
    for r in summary["rows"]:
        assert r["requests"] > 0 and r["failed"] == 0 and 0 <= r["ttft_attainment"] <= 1, r
        assert r["dense_requests"] + r["moe_requests"] == r["requests"]
    assert set(summary["solo"]) == set(summary["popularity"])
    records = (out / "records.jsonl").read_text().splitlines()
    assert len(records) == sum(r["requests"] for r in summary["rows"])
    for name in ("ttft_attainment_vs_rate.png", "timeline_moeshare.png", "timeline_static-partition.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG"), name
    assert "python scripts/bench_multimodel.py --set tiny" in (out / "README.md").read_text()
