"""The zoo: real checkpoints transformers loads, an honest zoo.json, variants that specialise, determinism."""

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,
    MixtralForCausalLM,
    Qwen2ForCausalLM,
    SwitchTransformersForConditionalGeneration,
)

import moeshare.zoo.build as build
from moeshare.zoo import build_zoo, format_report, load_zoo
from moeshare.zoo import corpora as corpora_mod
from moeshare.zoo.evaluate import perplexity
from moeshare.zoo.recipes import RECIPE_VERSION
from moeshare.zoo.spans import corrupt_batch, span_counts
from moeshare.zoo.tokenizer import BOS, EOS, PAD, SENTINEL_BASE, UNK, byte_ids

ARCHS = ("mixtral", "switch", "llama", "qwen2")
CAUSAL = ("mixtral", "llama", "qwen2")
CLASSES = {"mixtral": MixtralForCausalLM, "llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}
UTF8_SAMPLES = [
    "Grüße aus Köln: Äpfel, Öl und Übermut – süß, heiß, weiß.",
    "def f(x: int) -> dict[str, int]:\n\treturn {'ä': x ** 2}  # ✓ naïve café\n",
    "日本語のテキスト 😀🎉 \x00\x7f ÿ <not special> </p>",
    "  leading and trailing spaces  \n\n",
]


def _names(zoo: dict) -> list[str]:
    return ["base", *zoo["variants"]]


def _load(arch: str, path: Path):
    if arch in CAUSAL:
        return AutoModelForCausalLM.from_pretrained(path)
    return SwitchTransformersForConditionalGeneration.from_pretrained(path)


def test_layout_and_zoo_json_record_how_it_was_built(tiny_zoo):
    zoo = load_zoo(tiny_zoo)
    assert zoo["recipe_version"] == RECIPE_VERSION
    assert zoo["size"] == "tiny" and zoo["seed"] == 0 and zoo["archs"] == list(ARCHS)
    assert len(zoo["variants"]) == 4 and zoo["corpora"] in ("debian", "python-fallback")
    if zoo["corpora"] == "debian":
        assert zoo["variants"] == ["kjv", "fortunes-en", "fortunes-de", "python"]
    for domain in zoo["domains"]:
        text = (tiny_zoo / domain["heldout_file"]).read_text(encoding="utf-8")
        assert 1000 < len(text.encode("utf-8")) <= 64 * 1024
        assert domain["train_bytes"] > 100_000 and domain["source"]
    for arch in ARCHS:
        assert zoo["recipe"][arch]["base"]["steps"] > 0 and zoo["recipe"][arch]["config"]
        for name in _names(zoo):
            entry = zoo["models"][arch][name]
            assert entry["path"] == f"{arch}/{name}"
            assert set(entry["perplexity"]) == set(zoo["variants"])
            assert entry["train"]["steps"] > 0
            files = {p.name for p in (tiny_zoo / entry["path"]).iterdir()}
            assert {"config.json", "model.safetensors", "tokenizer.json"} <= files


def test_tiny_zoo_trains_on_one_thread_so_a_busy_machine_slows_it_little(tiny_zoo):
    # two threads, with one core held by another process, made the tiny build 20x slower (issue 12)
    assert load_zoo(tiny_zoo)["built"]["threads"] == 1


def test_every_checkpoint_loads_with_transformers(tiny_zoo):
    zoo = load_zoo(tiny_zoo)
    for arch in ARCHS:
        for name in _names(zoo):
            path = tiny_zoo / arch / name
            model = _load(arch, path)
            tokenizer = AutoTokenizer.from_pretrained(path)
            ids = tokenizer(["In the beginning"], return_tensors="pt").input_ids
            with torch.no_grad():
                if arch in CAUSAL:
                    assert isinstance(model, CLASSES[arch])
                    logits = model(input_ids=ids).logits
                else:
                    logits = model(input_ids=ids, decoder_input_ids=torch.zeros_like(ids[:, :1])).logits
            assert model.dtype == torch.float32 and torch.isfinite(logits).all()


def test_switch_has_dense_and_sparse_blocks(tiny_zoo):
    model = _load("switch", tiny_zoo / "switch" / "base")
    for stack in (model.encoder, model.decoder):
        sparse = [block.layer[-1].is_sparse for block in stack.block]
        assert any(sparse) and not all(sparse)


def test_tokenizer_round_trips_utf8_text(tiny_zoo):
    for arch in ARCHS:
        tokenizer = AutoTokenizer.from_pretrained(tiny_zoo / arch / "base")
        assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (PAD, EOS, UNK)
        assert tokenizer.bos_token_id == BOS
        assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == SENTINEL_BASE
        assert tokenizer.convert_tokens_to_ids("<extra_id_15>") == SENTINEL_BASE + 15
        for text in UTF8_SAMPLES:
            ids = tokenizer(text).input_ids
            body = ids[1:] if arch in CAUSAL else ids[:-1]
            assert (ids[0] == BOS) if arch in CAUSAL else (ids[-1] == EOS)
            assert body == byte_ids(text).tolist()
            assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_every_variant_beats_the_base_on_its_own_domain(tiny_zoo):
    zoo = load_zoo(tiny_zoo)
    for arch in ARCHS:
        base = zoo["models"][arch]["base"]["perplexity"]
        for variant in zoo["variants"]:
            entry = zoo["models"][arch][variant]
            assert entry["domain"] == variant
            assert entry["perplexity"][variant] < base[variant], (arch, variant)
        assert all(zoo["specialised"][arch].values())
    report = format_report(zoo)
    assert "*" in report and all(arch in report for arch in ARCHS)


@pytest.mark.parametrize(("arch", "variant"), [("mixtral", -1), ("switch", 0), ("llama", 1)])
def test_zoo_json_perplexity_matches_the_checkpoint(tiny_zoo, arch, variant):
    zoo = load_zoo(tiny_zoo)
    name = zoo["variants"][variant]
    model = _load(arch, tiny_zoo / arch / name)
    text = (tiny_zoo / "heldout" / f"{name}.txt").read_text(encoding="utf-8")
    got = perplexity(model, arch, text, zoo["recipe"]["seq_len"], zoo["recipe"]["eval_bytes"])
    assert got == pytest.approx(zoo["models"][arch][name]["perplexity"][name], rel=1e-4)


def test_span_corruption_is_invertible():
    windows = torch.randint(4, 260, (3, 128))
    batch = corrupt_batch(windows, torch.Generator().manual_seed(0))
    noise, spans = span_counts(128)
    assert batch.inputs.shape == (3, 128 - noise + spans + 1)
    assert batch.labels.shape == (3, noise + spans + 1)
    for window, inputs, labels in zip(
        windows.tolist(), batch.inputs.tolist(), batch.labels.tolist(), strict=True
    ):
        fills: dict[int, list[int]] = {}
        for tok in labels[:-1]:
            if tok >= SENTINEL_BASE:
                fills[tok] = current = []
            else:
                current.append(tok)
        rebuilt = [t for tok in inputs[:-1] for t in (fills[tok] if tok >= SENTINEL_BASE else [tok])]
        assert rebuilt == window and inputs[-1] == labels[-1] == EOS


def test_same_seed_builds_bit_identical_weights(tiny_zoo, tmp_path):
    # The fixture's zoo already holds one seed-0 Mixtral build from this machine; a second build is
    # only needed when that one was made elsewhere (another device, thread count or library version).
    # A mismatch against an older cached zoo means a change to training forgot to bump RECIPE_VERSION.
    fresh = build_zoo(size="tiny", arch="mixtral", out=tmp_path / "a")
    reference = tiny_zoo
    if load_zoo(tiny_zoo)["built"] | {"seconds": 0} != load_zoo(fresh)["built"] | {"seconds": 0}:
        reference = build_zoo(size="tiny", arch="mixtral", out=tmp_path / "b")
    for name in _names(load_zoo(fresh)):
        a = load_file(fresh / "mixtral" / name / "model.safetensors")
        b = load_file(reference / "mixtral" / name / "model.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    ppl = {n: e["perplexity"] for n, e in load_zoo(fresh)["models"]["mixtral"].items()}
    assert ppl == {n: e["perplexity"] for n, e in load_zoo(reference)["models"]["mixtral"].items()}


def test_cached_zoo_is_reused_without_training(tiny_zoo, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("a cached zoo must not be retrained")

    monkeypatch.setattr(build, "train", no_training)
    before = {p: p.stat().st_mtime_ns for p in tiny_zoo.rglob("*")}
    start = time.perf_counter()
    assert build_zoo(size="tiny", arch="all", out=tiny_zoo) == tiny_zoo
    assert build_zoo(size="tiny", arch="switch", out=tiny_zoo) == tiny_zoo
    assert time.perf_counter() - start < 2.0
    assert {p: p.stat().st_mtime_ns for p in tiny_zoo.rglob("*")} == before


def test_adding_an_arch_to_a_cached_zoo_trains_only_that_arch(tiny_zoo, tmp_path, monkeypatch):
    out = tmp_path / "tiny"
    shutil.copytree(tiny_zoo, out, ignore=shutil.ignore_patterns("qwen2"))
    zoo = load_zoo(out)
    zoo["archs"].remove("qwen2")
    for section in ("models", "specialised", "recipe"):
        del zoo[section]["qwen2"]
    (out / "zoo.json").write_text(json.dumps(zoo))
    built = []

    def trained_elsewhere(arch, rec, corpora, seed, root, device):  # the fixture's zoo already trained it
        built.append(arch)
        shutil.copytree(tiny_zoo / arch, root / arch)
        return load_zoo(tiny_zoo)["models"][arch]

    monkeypatch.setattr(build, "_build_arch", trained_elsewhere)
    assert build_zoo(size="tiny", arch="all", out=out) == out
    assert built == ["qwen2"] and load_zoo(out)["archs"] == list(ARCHS)
    for arch in ARCHS:
        for file in (tiny_zoo / arch).rglob("*.safetensors"):
            assert file.read_bytes() == (out / file.relative_to(tiny_zoo)).read_bytes()


def test_failed_build_leaves_no_half_zoo(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "train", interrupted)
    (tmp_path / f".zoo.partial-{2**22 + 1}" / "mixtral").mkdir(parents=True)  # a killed build's leftovers
    with pytest.raises(KeyboardInterrupt):
        build_zoo(size="tiny", arch="mixtral", out=tmp_path / "zoo")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_directory_that_is_not_a_zoo(tmp_path):
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    with pytest.raises(FileExistsError):
        build_zoo(size="tiny", arch="mixtral", out=tmp_path)
    assert keep.read_text() == "mine"


def test_python_fallback_gives_four_domains_and_names_the_packages(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(corpora_mod, "FORTUNES_DIR", tmp_path / "missing")
    corpora = corpora_mod.load_corpora()
    assert corpora.kind == "python-fallback" and len(corpora.domains) == 4
    assert corpora.names == ["python", "pydoc-topics", "docstrings", "unicode-names"]
    assert all(len(d.train) > 100_000 and d.heldout for d in corpora.domains)
    notice = capsys.readouterr().err
    assert "bible-kjv bible-kjv-text fortunes fortunes-de" in notice and notice.count("\n") == 1
