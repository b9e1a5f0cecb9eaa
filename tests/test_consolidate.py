"""Consolidation on the zoo's trained variants: what merges, what never merges, the budget, the store."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeshare.checkpoint import open_checkpoint, write_checkpoint
from moeshare.consolidate import Options, Store, consolidate, export_variant, plan
from moeshare.consolidate.align import align, neuron_matrix
from moeshare.consolidate.experts import expert_forward
from moeshare.consolidate.fit import FitData, fit_expert
from moeshare.errors import MoeshareError

VARIANTS = ["kjv", "fortunes-en", "fortunes-de", "python"]


def _variants(zoo: Path, arch: str) -> list[Path]:
    return [zoo / arch / v for v in VARIANTS]


def _edited(src: Path, dst: Path, edit) -> Path:
    """A copy of checkpoint `src` with some tensors replaced: edit(name -> tensor dict) mutates in place."""
    with open_checkpoint(src) as ckpt:
        tensors = {n: ckpt.tensor(n) for n in ckpt.names}
        edit(tensors)
        tok = [p for p in src.iterdir() if p.name.startswith(("tokenizer", "special_tokens", "generation"))]
        return write_checkpoint(dst, ckpt.config, tensors.items(), copy_files=tok)


def _expert_keys(layer: str, e: int) -> dict[str, str]:
    return {r: f"model.layers.{layer}.block_sparse_moe.experts.{e}.{r}.weight" for r in ("w1", "w2", "w3")}


def _slot_of(store: Store, variant: str, layer: str, e: int) -> int:
    return store.variant(variant).tables[layer][e]


def _members(manifest: dict, layer: str) -> list[list]:
    return next(x for x in manifest["bank"]["layers"] if x["layer"] == layer)["members"]


@pytest.fixture(scope="module")
def mixtral_edits(tiny_zoo, tmp_path_factory):
    """kjv and python untouched; `copy` = fortunes-en with python's expert 0 (layer 0) copied in bitwise and
    kjv's expert 1 (layer 0) copied in with its neurons permuted."""
    root = tmp_path_factory.mktemp("edits")
    src = tiny_zoo / "mixtral"
    with open_checkpoint(src / "python") as py, open_checkpoint(src / "kjv") as kjv:
        same = {r: py.tensor(k) for r, k in _expert_keys("0", 0).items()}
        orig = {r: kjv.tensor(k) for r, k in _expert_keys("0", 1).items()}
    perm = torch.randperm(orig["w1"].shape[0], generator=torch.Generator().manual_seed(3))

    def edit(t):
        for r, k in _expert_keys("0", 0).items():
            t[k] = same[r].clone()
        keys = _expert_keys("0", 1)
        t[keys["w1"]], t[keys["w3"]], t[keys["w2"]] = orig["w1"][perm], orig["w3"][perm], orig["w2"][:, perm]

    copy = _edited(src / "fortunes-en", root / "copy", edit)
    return [src / "kjv", src / "python", copy], root


def test_alignment_recovers_a_permutation_exactly(tiny_zoo):
    with open_checkpoint(tiny_zoo / "mixtral" / "kjv") as ckpt:
        x = neuron_matrix(ckpt.read_expert("0", 0), ("w1", "w3", "w2"))
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    a = align(x, x[perm])
    assert a.distance == 0.0 and not a.exact
    assert torch.equal(x[perm][a.perm], x)


@pytest.mark.parametrize("budget", ["1.0", "0.92", "0.5", "0.34"])
def test_identical_and_permuted_experts_share_a_slot_with_zero_error(mixtral_edits, budget):
    paths, root = mixtral_edits
    out = root / f"store-{budget}"
    # average: merge errors are weight distances, so a copy's equals its original's
    manifest = consolidate(paths, out, Options(budget=budget, merge="average"))
    store = Store(out)
    layer0 = next(x for x in manifest["bank"]["layers"] if x["layer"] == "0")

    def errors(variant: str, e: int) -> list[float]:
        slot = _slot_of(store, variant, "0", e)
        members = [tuple(m) for m in layer0["members"][slot]]
        return [layer0["errors"][slot][members.index((v, e))] for v in ("copy", variant)]

    # a bitwise copy shares its original's slot at any budget, even 1.0
    assert _slot_of(store, "copy", "0", 0) == _slot_of(store, "python", "0", 0)
    copy_err, orig_err = errors("python", 0)
    assert copy_err == orig_err
    if budget == "1.0":
        assert layer0["slots"] == 3 * 4 - 1 and copy_err == 0.0
        return
    # a permuted copy is the same function: recognised, and merged first
    assert _slot_of(store, "copy", "0", 1) == _slot_of(store, "kjv", "0", 1)
    perm_err, orig_err = errors("kjv", 1)
    assert abs(perm_err - orig_err) < 1e-6
    if budget == "0.92":  # 22 of 24 slots: exactly the two zero-cost merges, so zero error
        assert layer0["slots"] == 10 and copy_err == 0.0 and perm_err < 1e-6


def test_same_variant_never_shares_a_slot(tiny_zoo, tmp_path):
    paths = _variants(tiny_zoo, "mixtral")
    manifest = consolidate(paths, tmp_path / "s", Options(budget="0.25"))
    store = Store(tmp_path / "s")
    for layer in manifest["bank"]["layers"]:
        assert layer["slots"] == store.adapter.num_experts  # the smallest bank: one slot per local expert
        for members in layer["members"]:
            owners = [v for v, _ in members]
            assert len(owners) == len(set(owners))
        for v in VARIANTS:
            table = store.variant(v).tables[layer["layer"]]
            assert len(set(table)) == len(table)


@pytest.mark.parametrize("arch", ["mixtral", "switch"])
@pytest.mark.parametrize("budget", ["0.75", "0.5", "0.3", "60KiB"])
def test_budget_is_met_exactly_or_under(tiny_zoo, tmp_path, arch, budget):
    paths = _variants(tiny_zoo, arch)
    try:
        manifest = consolidate(paths, tmp_path / "s", Options(budget=budget))
    except MoeshareError as e:
        assert "below one slot per (layer, local expert)" in str(e)
        return
    b, allowed = manifest["bytes"], manifest["made"]["budget_bytes"]
    slots = sum(layer["slots"] for layer in manifest["bank"]["layers"])
    slot_bytes = b["experts_after"] // slots
    assert b["experts_after"] <= allowed
    # and no merge beyond what the budget asked for: one slot more would not have fitted
    assert b["experts_after"] + slot_bytes > allowed


@pytest.mark.parametrize("arch", ["mixtral", "switch"])
def test_budget_one_exports_are_bit_identical(tiny_zoo, tmp_path, arch):
    paths = _variants(tiny_zoo, arch)
    consolidate(paths, tmp_path / "s", Options(budget="1.0"))
    for src in paths:
        out = export_variant(tmp_path / "s", src.name, tmp_path / f"export-{src.name}")
        with open_checkpoint(src) as a, open_checkpoint(out) as b:
            assert list(a.names) == list(b.names) and a.config == b.config
            for n in a.names:
                assert a.tensor(n).dtype == b.tensor(n).dtype
                assert torch.equal(a.tensor(n).view(torch.uint8), b.tensor(n).view(torch.uint8)), n
        assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("arch", ["mixtral", "switch"])
def test_consolidated_exports_load_in_transformers(tiny_zoo, tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer, SwitchTransformersForConditionalGeneration

    cls = AutoModelForCausalLM if arch == "mixtral" else SwitchTransformersForConditionalGeneration
    consolidate(_variants(tiny_zoo, arch), tmp_path / "s", Options(budget="0.5"))
    out = export_variant(tmp_path / "s", "kjv", tmp_path / "e")
    model = cls.from_pretrained(out).eval()
    ids = AutoTokenizer.from_pretrained(out)("In the beginning", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = (
            model(input_ids=ids).logits
            if arch == "mixtral"
            else model(input_ids=ids, decoder_input_ids=ids).logits
        )
    assert torch.isfinite(logits).all()


def test_threshold_merges_only_closer_experts(tiny_zoo, tmp_path):
    paths = _variants(tiny_zoo, "mixtral")
    none = consolidate(paths, tmp_path / "a", Options(threshold=0.0))
    assert all(layer["slots"] == 16 for layer in none["bank"]["layers"])
    some = consolidate(paths, tmp_path / "b", Options(threshold=0.2))
    for layer in some["bank"]["layers"]:
        assert all(cost <= 0.2 for cost in layer["merge_costs"])
    assert some["bytes"]["experts_after"] < none["bytes"]["experts_after"]
    assert consolidate(paths, tmp_path / "c", Options(merge="frequency"))["made"]["merge"] == "average"


def test_output_similarity_and_frequency_merge_with_calibration(tiny_zoo, tmp_path):
    calib = tiny_zoo / "heldout" / "kjv.txt"
    opts = Options(budget="0.5", calib=calib, merge="frequency")
    manifest = consolidate(_variants(tiny_zoo, "mixtral"), tmp_path / "s", opts)
    assert manifest["made"]["similarity"] == "output" and manifest["made"]["merge"] == "frequency"
    assert manifest["made"]["calib_tokens"] > 0
    assert manifest["bytes"]["experts_after"] <= manifest["made"]["budget_bytes"]


def _random_expert(gen: torch.Generator, hidden: int = 16, inner: int = 32) -> dict[str, torch.Tensor]:
    shapes = {"w1": (inner, hidden), "w3": (inner, hidden), "w2": (hidden, inner)}
    return {r: torch.randn(*shape, generator=gen) / hidden**0.5 for r, shape in shapes.items()}


def test_fit_reproduces_the_member_that_the_tokens_reach():
    gen = torch.Generator().manual_seed(0)
    a, b = _random_expert(gen), _random_expert(gen)
    x = torch.randn(400, 16, generator=gen)  # [T, H]
    # one expert per variant; variant 1's router never picks its expert, so only member 0 has tokens
    fit = FitData("mixtral", [x, x], [torch.full((400, 1), 0.5), torch.zeros(400, 1)])
    fitted = fit_expert(fit, [0, 1], [a, b])
    average = {r: (a[r] + b[r]) / 2 for r in a}
    want = expert_forward("mixtral", a, x)

    def error(expert: dict[str, torch.Tensor]) -> float:
        return float((expert_forward("mixtral", expert, x) - want).norm() / want.norm())

    assert error(fitted) < 0.02 and error(average) > 0.3
    # no token reaches either member: nothing to fit, the caller falls back to the average
    assert fit_expert(FitData("mixtral", [x, x], [torch.zeros(400, 1)] * 2), [0, 1], [a, b]) is None


def test_fit_on_self_sampled_text_is_the_default_and_beats_averaging(tiny_zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    from moeshare.zoo.evaluate import perplexity

    def ppl(path: Path, variant: str) -> float:
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        return perplexity(model, "mixtral", (tiny_zoo / "heldout" / f"{variant}.txt").read_text(), 64, 2048)

    paths = _variants(tiny_zoo, "mixtral")
    made = plan(paths)
    fit = consolidate(paths, tmp_path / "fit", Options(budget="0.25"), made)
    assert fit["made"]["merge"] == "fit" and fit["made"]["self_calib_tokens"] == 4096
    consolidate(paths, tmp_path / "avg", Options(budget="0.25", merge="average"), made)
    for src in paths:
        orig = ppl(src, src.name)
        fitted = ppl(export_variant(tmp_path / "fit", src.name, tmp_path / f"fit-{src.name}"), src.name)
        averaged = ppl(export_variant(tmp_path / "avg", src.name, tmp_path / f"avg-{src.name}"), src.name)
        assert fitted < averaged and fitted / orig < 1.02, (src.name, orig, fitted, averaged)


def test_self_calibration_is_reproducible(tiny_zoo):
    from moeshare.consolidate.calibrate import calibrate

    ckpts = [open_checkpoint(p) for p in _variants(tiny_zoo, "mixtral")[:2]]
    first, second = calibrate(ckpts, None, max_tokens=256), calibrate(ckpts, None, max_tokens=256)
    assert first.sampled and first.tokens == 256
    for layer, xs in first.inputs.items():
        assert all(torch.equal(a, b) for a, b in zip(xs, second.inputs[layer], strict=True))
        # each variant samples its own text, so what reaches its MoE layers differs
        assert not torch.equal(xs[0], xs[1])


def test_fit_needs_calibration_where_variants_cannot_sample(tiny_zoo, tmp_path):
    switch = _variants(tiny_zoo, "switch")
    assert consolidate(switch, tmp_path / "a", Options(budget="0.5"))["made"]["merge"] == "average"
    with pytest.raises(MoeshareError, match="--merge fit needs calibration text for switch variants"):
        consolidate(switch, tmp_path / "b", Options(budget="0.5", merge="fit"))
    calib = tiny_zoo / "heldout" / "python.txt"
    made = consolidate(switch, tmp_path / "c", Options(budget="0.5", calib=calib))["made"]
    assert made["merge"] == "fit" and made["calib_tokens"] > 0 and made["self_calib_tokens"] == 0
    mixtral = _variants(tiny_zoo, "mixtral")
    none = consolidate(mixtral, tmp_path / "d", Options(budget="0.5", self_calib=0))["made"]
    assert none["merge"] == "average" and none["self_calib_tokens"] == 0
    with pytest.raises(MoeshareError, match="or a --self-calib above 0"):
        consolidate(mixtral, tmp_path / "e", Options(budget="0.5", merge="fit", self_calib=0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "c", "d"]


def test_cli_consolidate_inspect_export(tiny_zoo, tmp_path):
    run = [sys.executable, "-m", "moeshare.cli"]
    paths = [str(p) for p in _variants(tiny_zoo, "switch")]
    proc = subprocess.run(
        [*run, "consolidate", *paths, "--out", str(tmp_path / "s"), "--budget", "0.5"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "mean err" in proc.stdout and "saves" in proc.stdout
    proc = subprocess.run(
        [*run, "inspect", str(tmp_path / "s"), "--json"], capture_output=True, text=True, timeout=120
    )
    summary = json.loads(proc.stdout)
    assert summary["variants"] == VARIANTS
    assert {"experts_before", "experts_after", "total_before", "total_after"} <= set(summary["bytes"])
    assert summary["bytes"]["experts_after"] <= 0.5 * summary["bytes"]["experts_before"]
    assert all({"slots", "mean_error"} <= set(layer) for layer in summary["layers"])
    proc = subprocess.run(
        [*run, "export", str(tmp_path / "s"), "--variant", "python", "--out", str(tmp_path / "e")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and (tmp_path / "e" / "config.json").is_file()


# ---- bad input: one line, exit 2, nothing written --------------------------------------------------------


def _dense(tmp_path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "dense")
    return tmp_path / "dense"


def _fewer_experts(zoo: Path, tmp_path: Path) -> Path:
    with open_checkpoint(zoo / "mixtral" / "python") as ckpt:
        cfg = dict(ckpt.config)
        e = cfg["num_local_experts"] - 1
        cfg["num_local_experts"] = e
        keep = {}
        for n in ckpt.names:
            info = ckpt.adapter.classify(n)
            if info.kind == "expert" and info.expert == e:
                continue
            keep[n] = ckpt.tensor(n)[:e] if info.kind == "router" else ckpt.tensor(n)
    return write_checkpoint(tmp_path / "python", cfg, keep.items())


BAD = {
    "one variant": (lambda z, t: [z / "mixtral" / "kjv"], [], "at least two variants, got 1"),
    "mixed architectures": (
        lambda z, t: [z / "mixtral" / "kjv", z / "switch" / "python"],
        [],
        "must share one architecture",
    ),
    "different shapes": (
        lambda z, t: [z / "mixtral" / "kjv", _fewer_experts(z, t)],
        [],
        "python: has no tensor",
    ),
    "dense model": (lambda z, t: [z / "mixtral" / "kjv", _dense(t)], [], "dense model with no experts"),
    "budget too small": (
        lambda z, t: _variants(z, "mixtral"),
        ["--budget", "0.1"],
        "below one slot per (layer, local expert)",
    ),
    "budget above 1": (
        lambda z, t: _variants(z, "mixtral"),
        ["--budget", "1.5"],
        "a fraction must be in (0, 1]",
    ),
    "bad budget": (
        lambda z, t: _variants(z, "mixtral"),
        ["--budget", "lots"],
        "give a fraction of expert memory",
    ),
    "fit without calibration": (
        lambda z, t: _variants(z, "switch"),
        ["--merge", "fit"],
        "--merge fit needs calibration text for switch variants",
    ),
    "negative self-calib": (
        lambda z, t: _variants(z, "mixtral"),
        ["--self-calib", "-1"],
        "--self-calib -1: give a number of tokens",
    ),
    "unreadable calib": (
        lambda z, t: _variants(z, "mixtral"),
        ["--calib", "/nonexistent/calib.txt"],
        "--calib /nonexistent/calib.txt: cannot read it",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_writes_nothing(tiny_zoo, tmp_path, case):
    make, extra, expected = BAD[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    paths = make(tiny_zoo, inputs)
    out = tmp_path / "store"
    proc = subprocess.run(
        [sys.executable, "-m", "moeshare.cli", "consolidate", *map(str, paths), "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip() and "%|" not in x]
    assert len(lines) == 1 and lines[0].startswith("moeshare: error:") and expected in lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]


def test_existing_output_is_refused_without_force(tiny_zoo, tmp_path):
    out = tmp_path / "store"
    consolidate(_variants(tiny_zoo, "mixtral"), out, Options(self_calib=0))
    (out / "mine.txt").write_text("keep")
    with pytest.raises(MoeshareError, match="already exists; choose another --out or pass --force"):
        consolidate(_variants(tiny_zoo, "mixtral"), out, Options())
    assert (out / "mine.txt").is_file()
    consolidate(_variants(tiny_zoo, "mixtral"), out, Options(force=True, self_calib=0))
    assert (out / "manifest.json").is_file() and not (out / "mine.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


@pytest.mark.parametrize(
    "error, raised",
    [(KeyboardInterrupt, KeyboardInterrupt), (OSError(28, "No space left on device"), MoeshareError)],
)
def test_interrupted_or_disk_full_run_leaves_no_store(tiny_zoo, tmp_path, monkeypatch, error, raised):
    from moeshare.consolidate import pipeline

    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise error
        return real(*args, **kwargs)

    real = pipeline.merge_slot
    monkeypatch.setattr(pipeline, "merge_slot", failing)
    with pytest.raises(raised):
        consolidate(_variants(tiny_zoo, "mixtral"), tmp_path / "store", Options(budget="0.5"))
    assert list(tmp_path.iterdir()) == []
