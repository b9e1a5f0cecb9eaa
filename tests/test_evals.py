"""The quality harness end to end on the tiny zoo: every method, every output file, and a regression it
must catch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeshare.cli import main
from moeshare.consolidate import Options, consolidate
from moeshare.evals.command import zoo_subject
from moeshare.evals.harness import EvalConfig, Harness, Method
from moeshare.evals.metrics import rouge
from moeshare.store import Store
from moeshare.store.format import BANK

FIELDS = {"variant", "domain", "method", "budget", "similarity", "merge", "metric", "value"}
SMALL = ["--max-tokens", "512", "--prompts", "4", "--continuation", "16", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny_report(tiny_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval")
    assert main(["eval", "--zoo", "tiny", "--budgets", "1,0.5", "--out", str(out), *SMALL]) == 0
    return out


@pytest.mark.parametrize("arch", ["mixtral", "switch"])
def test_eval_smoke_runs_every_method_and_writes_every_file(tiny_report: Path, arch: str) -> None:
    out = tiny_report / arch
    for name in ("report.json", "report.md", "quality_vs_memory.png", "merge_error.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    assert report["skipped"] == []
    assert all(set(r) == FIELDS for r in report["results"])
    methods = {(r["method"], r["similarity"], r["merge"]) for r in report["results"]}
    assert {m[0] for m in methods} == {"original", "moeshare", "same-index-pick", "average", "ties", "base"}
    assert {(s, m) for k, s, m in methods if k == "moeshare"} == {
        (s, m) for s in ("weight", "output") for m in ("average", "frequency", "medoid", "fit")
    }
    metrics = {r["metric"] for r in report["results"]}
    expected = {"perplexity", "kl", "top1_agreement", "greedy_match"}
    assert metrics == (expected | {"rouge1", "rouge2", "rougeL"} if arch == "switch" else expected)
    original = [r for r in report["results"] if r["method"] == "original"]
    assert any(r["variant"] == "kjv" for r in original)
    identity = {"kl": 0.0, "top1_agreement": 1.0, "greedy_match": 1.0}  # the original against itself
    for r in original:
        if r["metric"] in identity:
            assert r["value"] == pytest.approx(identity[r["metric"]], abs=1e-6), r
    memory = {(m["method"], m["budget"]): m["bank_fraction"] for m in report["memory"]}
    assert memory[("original", 1.0)] == 1.0 and memory[("average", None)] == pytest.approx(0.25)
    assert memory[("moeshare", 0.5)] <= 0.5 and memory[("same-index-pick", 0.5)] <= 0.5
    assert report["summary"]["smallest_budget"] and "budget" in report["summary"]["targets"]
    md = (out / "report.md").read_text()
    assert "## Smallest budget within 1% / 3% perplexity" in md and "same-index-pick" in md
    if arch == "mixtral":  # the engine's numbers agree with transformers on the exported store
        assert report["checks"] and max(c["relative_difference"] for c in report["checks"]) < 1e-4


def _zero_slot(store: Path, out: Path, layer: str, slot: int) -> Path:
    shutil.copytree(store, out)
    bank = load_file(str(out / BANK))
    for role in Store(out).manifest.roles:
        bank[f"layer.{layer}.{role}"][slot].zero_()
    save_file(bank, str(out / BANK), metadata={"format": "pt"})
    return out


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is as fast, and never waits on a busy core
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_eval_catches_a_store_with_one_bank_slot_zeroed(tiny_zoo: Path, tmp_path: Path) -> None:
    subject = zoo_subject("tiny", "mixtral", tmp_path / "work")
    store = tmp_path / "store"
    consolidate(list(subject.variants.values()), store, Options(budget="1.0"))
    layer = Store(store).adapter.moe_layers[0]
    slot = Store(store).variant("kjv").tables[layer][0]
    damaged = _zero_slot(store, tmp_path / "damaged", layer, slot)
    harness = Harness(subject, EvalConfig(max_tokens=1024, prompts=4, continuation=16), tmp_path / "work")
    harness.originals()
    with harness.store_scorers(store) as scorers:
        good = harness.score(Method("moeshare", 1.0, "weight", "average"), scorers)
    with harness.store_scorers(damaged) as scorers:
        bad = harness.score(Method("damaged", 1.0), scorers)
    ok, hurt = good[("kjv", "kjv")], bad[("kjv", "kjv")]
    assert ok["kl"] < 1e-6 and ok["top1_agreement"] == 1.0
    assert hurt["perplexity"] > 1.01 * ok["perplexity"]
    assert hurt["kl"] > 1e-3 and hurt["top1_agreement"] < 1.0
    assert bad[("python", "python")]["kl"] < 1e-6  # python routes through its own slots: untouched


def test_eval_of_owner_variants_skips_what_needs_a_base_or_calibration(
    tiny_zoo: Path, tmp_path: Path
) -> None:
    v = tiny_zoo / "mixtral"
    held = tiny_zoo / "heldout"
    args = ["eval", "--variants", str(v / "kjv"), str(v / "python"), "--out", str(tmp_path / "r")]
    args += ["--heldout", f"kjv={held / 'kjv.txt'}", "--heldout", f"python={held / 'python.txt'}"]
    args += ["--budgets", "1,0.5", "--merge", "average", "--similarity", "weight", *SMALL]
    assert main(args) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert any("ties" in s for s in report["skipped"]) and any("base" in s for s in report["skipped"])
    assert {r["method"] for r in report["results"]} == {"original", "moeshare", "same-index-pick", "average"}
    assert {(r["variant"], r["domain"]) for r in report["results"]} == {("kjv", "kjv"), ("python", "python")}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--budgets", "0.1"], "outside [1/2, 1]"),
        (["--budgets", "half"], "give fractions separated by commas"),
        (["--merge", "mean"], "choose from average,frequency,medoid,fit"),
        (["--heldout", "kjv"], "write it as VARIANT=FILE"),
        (["--heldout", "nope=x.txt"], "no variant 'nope'"),
        (["--heldout", "kjv=/no/such/file"], "cannot read /no/such/file"),
        (["--prompts", "0"], "--prompts 0: must be at least 1"),
    ],
)
def test_eval_bad_input_is_one_line_and_writes_nothing(
    tiny_zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    v = tiny_zoo / "mixtral"
    args = ["eval", "--variants", str(v / "kjv"), str(v / "python"), "--out", str(tmp_path / "r")]
    held = [
        "--heldout",
        f"kjv={tiny_zoo / 'heldout' / 'kjv.txt'}",
        "--heldout",
        f"python={tiny_zoo / 'heldout' / 'python.txt'}",
    ]
    assert main(args + held + extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_rouge_counts_overlap_and_order() -> None:
    assert rouge([1, 2, 3], [1, 2, 3]) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    r = rouge([1, 3, 2, 4], [1, 2, 3, 4])
    assert r["rouge1"] == 1.0 and r["rouge2"] == 0.0 and r["rougeL"] == pytest.approx(0.75)
    assert rouge([], [1, 2])["rouge1"] == 0.0
