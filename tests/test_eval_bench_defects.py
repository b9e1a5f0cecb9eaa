"""Issue 12, evaluation and benchmark: `eval --variants` on both architectures, the benchmark's default
output, memory placement under a limit, and a benchmark that keeps going past a failing system."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from moeshare.cli import main
from moeshare.engine.engine import EngineConfig
from moeshare.engine.models.mixtral import MixtralDims, MultiVariantMixtral
from moeshare.engine.models.variants import MIXTRAL
from moeshare.engine.placement import Placement, place
from moeshare.engine.synthetic import from_spec
from moeshare.errors import MoeshareError

FAST = ["--budgets", "0.5", "--merge", "average", "--similarity", "weight", "--baselines", "same-index-pick"]
FAST += ["--max-tokens", "256", "--prompts", "2", "--continuation", "8", "--threads", "1"]


def _variants_args(zoo: Path, arch: str, out: Path) -> list[str]:
    v, held = zoo / arch, zoo / "heldout"
    args = ["eval", "--variants", str(v / "kjv"), str(v / "python"), "--out", str(out)]
    return args + ["--heldout", f"kjv={held / 'kjv.txt'}", "--heldout", f"python={held / 'python.txt'}"]


@pytest.mark.parametrize("arch", ["mixtral", "switch"])
def test_eval_of_variant_checkpoints_scores_either_architecture(
    tiny_zoo: Path, tmp_path: Path, arch: str
) -> None:
    assert main([*_variants_args(tiny_zoo, arch, tmp_path / "r"), *FAST]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["subject"]["arch"] == arch
    assert {r["method"] for r in report["results"]} == {"original", "moeshare", "same-index-pick"}
    assert {(r["variant"], r["domain"]) for r in report["results"]} == {("kjv", "kjv"), ("python", "python")}


def test_eval_of_variants_of_two_architectures_is_one_line_and_writes_nothing(
    tiny_zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _variants_args(tiny_zoo, "mixtral", tmp_path / "r")
    args[3] = str(tiny_zoo / "switch" / "python")
    assert main([*args, *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is switch but" in err and "one architecture" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--threads", "0"], "--threads 0: must be at least 1"),
        (["--base", "{zoo}/switch/base"], "is switch but the variants are mixtral: give their own base"),
        (["--device", "cuda"], "no CUDA device is available here; use cpu"),
        (["--device", "tpu9"], "--device tpu9: name cpu or cuda"),
    ],
)
def test_eval_refuses_what_would_fail_after_the_scoring_in_one_line(
    tiny_zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    extra = [x.format(zoo=tiny_zoo) for x in extra]
    assert main([*_variants_args(tiny_zoo, "mixtral", tmp_path / "r"), *FAST, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "r").exists()


def test_eval_refuses_an_out_under_a_file_before_scoring(
    tiny_zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("mine")
    assert main([*_variants_args(tiny_zoo, "mixtral", tmp_path / "file" / "r"), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"--out {tmp_path / 'file' / 'r'}: {tmp_path / 'file'} is a file; name a directory")
    assert (tmp_path / "file").read_text() == "mine"


# ---- memory placement under --memory-limit ----------------------------------------------------------------

GIB = 2**30
TINY = "layers=2,hidden=64,intermediate=128,experts=4,heads=4,kv_heads=2,vocab=256,context=256"


def _h200_partition_server(kv_blocks: int) -> tuple[Placement, int, int]:
    """One `partition` server of the H200 run (`--synthetic layers=32 --variants 2 --kv-blocks 4096`): variant
    v0 alone at Mixtral-8x7B sizes, half the KV blocks and sequences, half of 90% of 139.8 GiB. Returns its
    placement, its limit, and the device bytes its loading draws at once (meta-device probes only)."""
    source = from_spec("variants=2,own=2,layers=32,only=0", "meta")
    dims = MixtralDims.from_config(source.config)
    limit = int(0.9 * 139.8 / 2 * GIB)
    config = EngineConfig(
        device="cuda", kv_blocks=kv_blocks, max_num_seqs=32, max_batched_tokens=2048, memory_limit_bytes=limit
    )
    probe = MultiVariantMixtral(dims, 1, [], torch.bfloat16, torch.device("meta"))
    slots = [source.bank_slots(x) for x in source.adapter.moe_layers]
    sizes = (probe.row_bytes(), probe.expert_bytes())
    cuda = torch.device("cuda")  # only named: placing is arithmetic
    footprint = MIXTRAL.footprint(source.config)
    placement = place(limit, config, footprint, torch.bfloat16, cuda, 1, slots, kv_blocks, *sizes)
    # the synthetic source draws each tensor in float32 and casts it: an expert (w13 and w2) or the embedding
    expert = sum(t[0].numel() for t in probe.empty_bank(1, host=False).values())
    embed = math.prod(source.adapter.expected_shape("model.embed_tokens.weight"))
    draw = max(expert, embed) * (4 + 2)
    return placement, limit, draw


@pytest.mark.parametrize("kv_blocks", [256, 2048])
def test_placement_reserves_kv_work_and_loading_before_the_weights(kv_blocks: int) -> None:
    placement, limit, draw = _h200_partition_server(kv_blocks)
    kv = kv_blocks * 2 * 32 * 16 * 8 * 128 * 2  # [blocks, layers, K and V, block, kv heads, head dim] bf16
    assert placement.kv > kv  # and the scratch block
    assert placement.work >= draw  # loading's largest draw fits in the space the steps will use
    assert placement.total <= limit
    weights = placement.rows + placement.banks
    assert weights + placement.kv + draw <= limit - 256 * 2**20  # room left for the allocator's slack
    assert placement.offload and max(placement.offload) == 31  # the last layers wait in host memory


def test_a_memory_limit_that_holds_no_layer_is_one_line_before_anything_is_allocated() -> None:
    placement, _, _ = _h200_partition_server(2048)
    source = from_spec("variants=2,own=2,layers=32,only=0", "meta")
    dims = MixtralDims.from_config(source.config)
    config = EngineConfig(device="cuda", kv_blocks=2048, max_num_seqs=32, max_batched_tokens=2048)
    probe = MultiVariantMixtral(dims, 1, [], torch.bfloat16, torch.device("meta"))
    slots, sizes = [8] * 32, (probe.row_bytes(), probe.expert_bytes())
    tight = placement.kv + placement.work + placement.rows  # no room for a staged layer
    with pytest.raises(MoeshareError, match=r"^the memory limit leaves .*GiB in all: raise the limit") as e:
        place(
            tight,
            config,
            MIXTRAL.footprint(source.config),
            torch.bfloat16,
            torch.device("cuda"),
            1,
            slots,
            2048,
            *sizes,
        )
    assert "\n" not in str(e.value) and "2048 KV blocks (4.00 GiB)" in str(e.value)


def test_serve_with_a_memory_limit_too_small_is_one_line_exit_2() -> None:
    cmd = [sys.executable, "-m", "moeshare.cli", "serve", "--synthetic", f"variants=2,{TINY}", "--port", "0"]
    cmd += ["--kv-blocks", "16", "--memory-limit", "0.01"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""  # refused before it listens
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("moeshare: error: the memory limit leaves 0.01 GiB, which cannot hold 2 resident")
    assert "16 KV blocks" in line and "0.02 GiB in all: raise the limit" in line


# ---- the serving benchmark ----------------------------------------------------------------------------------


def _bench_script():
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_serving.py"
    spec = importlib.util.spec_from_file_location("bench_serving", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_benchmark_records_a_failing_system_and_still_runs_and_writes_the_others(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`partition` first: half of 25 MiB per server cannot hold one server's KV and work space, so its
    servers refuse to load; `moeshare` still runs, and both land in the results, written to a scratch
    directory since --out names none (never the committed results)."""
    committed = Path(__file__).resolve().parents[1] / "evals" / "results" / "serving"
    before = {p.name: p.read_bytes() for p in committed.iterdir() if p.is_file()}
    argv = [
        "--synthetic",
        TINY,
        "--variants",
        "2",
        "--systems",
        "partition,moeshare",
        "--memory-gib",
        "0.025",
    ]
    argv += ["--duration", "1", "--warmup", "0", "--input-len", "8", "--output-len", "4", "--fixed-lengths"]
    argv += ["--rates", "4", "--solo-repeats", "1"]
    code = _bench_script().main(argv)
    printed = capsys.readouterr()
    out = Path(printed.out.split("results go to ")[1].split()[0])
    try:
        assert code == 1 and "partition failed" in printed.err
        assert Path(tempfile.gettempdir()) in out.parents
        summary = json.loads((out / "summary.json").read_text())
        [failed] = [r for r in summary if "error" in r]
        assert failed["system"] == "partition" and "the memory limit leaves" in failed["error"]
        ran = [r for r in summary if "error" not in r]
        assert [r["system"] for r in ran] == ["moeshare"] and ran[0]["requests"] > 0 and not ran[0]["failed"]
        solo = json.loads((out / "solo.json").read_text())
        assert "the memory limit leaves" in solo["per_system"]["partition"]["error"]
        assert "error" not in solo["per_system"]["moeshare"]
        assert (
            "- `partition` failed: RuntimeError: server for v0 exited with code 2"
            in (out / "README.md").read_text()
        )
        assert {json.loads(x)["system"] for x in (out / "records.jsonl").read_text().splitlines()} == {
            "moeshare"
        }
    finally:
        shutil.rmtree(out, ignore_errors=True)
    assert {p.name: p.read_bytes() for p in committed.iterdir() if p.is_file()} == before
