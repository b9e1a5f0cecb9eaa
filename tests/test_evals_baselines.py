"""Merging baselines: averaging, TIES and same-index expert picking, on the zoo's checkpoints."""

import math
import shutil
from itertools import combinations
from pathlib import Path

import pytest
import torch

from moeshare.checkpoint import open_checkpoint, write_checkpoint
from moeshare.consolidate.align import neuron_matrix, relative_distance
from moeshare.consolidate.same_index import same_index_pick
from moeshare.errors import MoeshareError
from moeshare.evals.baselines import average, ties

VARIANTS = ["kjv", "fortunes-en", "fortunes-de", "python"]
SIDE_FILES = ("tokenizer", "special_tokens", "generation")


def _variants(zoo: Path, arch: str) -> list[Path]:
    return [zoo / arch / v for v in VARIANTS]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ckpt:
        return {n: ckpt.tensor(n) for n in ckpt.names}


def _bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert list(ta) == list(tb)
    assert all(_bitwise(ta[n], tb[n]) for n in ta), [n for n in ta if not _bitwise(ta[n], tb[n])]
    assert open_checkpoint(a).config == open_checkpoint(b).config


def _write_like(src: Path, dst: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    side = [p for p in src.iterdir() if p.name.startswith(SIDE_FILES)]
    return write_checkpoint(dst, config or open_checkpoint(src).config, tensors.items(), copy_files=side)


def _fuse(src: Path, dst: Path) -> Path:
    """The same Mixtral checkpoint in the transformers-v5 fused expert layout."""
    with open_checkpoint(src) as ckpt:
        a = ckpt.adapter
        tensors = {n: ckpt.tensor(n) for n in ckpt.names if a.classify(n).kind == "other"}
        for layer in a.moe_layers:
            experts = [ckpt.read_expert(layer, e) for e in range(a.num_experts)]
            fused = f"model.layers.{layer}.mlp."
            tensors[fused + "experts.gate_up_proj"] = torch.stack(
                [torch.cat([x["w1"], x["w3"]]) for x in experts]
            )
            tensors[fused + "experts.down_proj"] = torch.stack([x["w2"] for x in experts])
            tensors[fused + "gate.weight"] = ckpt.tensor(a.router_key(layer))
    return _write_like(src, dst, tensors)


def _canonical(path: Path) -> dict[str, torch.Tensor]:
    """Tensors keyed independent of the expert layout: experts by (layer, expert, role), routers by layer."""
    out = {}
    with open_checkpoint(path) as ckpt:
        a = ckpt.adapter
        for n in ckpt.names:
            info = a.classify(n)
            if info.kind == "other":
                out[n] = ckpt.tensor(n)
            elif info.kind == "router":
                out[f"router.{info.layer}"] = ckpt.tensor(n)
        for layer in a.moe_layers:
            for e in range(a.num_experts):
                for role, t in ckpt.read_expert(layer, e).items():
                    out[f"expert:{layer}.{e}.{role}"] = t
    return out


def _forward(arch: str, path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer, SwitchTransformersForConditionalGeneration

    cls = AutoModelForCausalLM if arch == "mixtral" else SwitchTransformersForConditionalGeneration
    model = cls.from_pretrained(path).eval()
    ids = AutoTokenizer.from_pretrained(path)("In the beginning", return_tensors="pt").input_ids
    with torch.no_grad():
        if arch == "mixtral":
            return model(input_ids=ids).logits
        return model(input_ids=ids, decoder_input_ids=ids).logits


# ---- average ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mixtral", "switch"])
def test_average_of_identical_copies_is_bitwise_the_input(tiny_zoo, tmp_path, arch):
    src = tiny_zoo / arch / "kjv"
    copies = [shutil.copytree(src, tmp_path / name) for name in ("a", "b", "c")]
    out = average(copies, tmp_path / "avg")
    _assert_same_checkpoint(src, out)
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("arch", ["mixtral", "switch"])
def test_average_is_the_elementwise_mean(tiny_zoo, tmp_path, arch):
    paths = _variants(tiny_zoo, arch)
    got = _tensors(average(paths, tmp_path / "avg"))
    inputs = [_tensors(p) for p in paths]
    assert list(got) == list(inputs[0])
    for name, t in got.items():
        expected = torch.stack([x[name] for x in inputs]).mean(0)
        torch.testing.assert_close(t, expected, rtol=1e-6, atol=1e-7)


# ---- TIES -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mixtral", "switch"])
def test_ties_of_equal_variants_is_the_variant(tiny_zoo, tmp_path, arch):
    src = tiny_zoo / arch / "python"
    copy = shutil.copytree(src, tmp_path / "copy")
    out = ties([src, copy], tiny_zoo / arch / "base", tmp_path / "ties")
    _assert_same_checkpoint(src, out)


def test_ties_trims_elects_signs_and_takes_the_disjoint_mean(tiny_zoo, tmp_path):
    # three variants differ from the base only in the first four entries of model.norm.weight [64]
    src = tiny_zoo / "mixtral" / "base"
    tensors = _tensors(src)
    key = "model.norm.weight"
    tensors[key] = torch.ones(64)
    base = _write_like(src, tmp_path / "base", tensors)
    deltas = [[3.0, -1.0, 2.0, 0.5], [-1.0, -2.0, 4.0, 0.25], [2.0, 1.5, -1.0, 0.0]]
    paths = []
    for i, d in enumerate(deltas):
        tensors[key] = torch.ones(64)
        tensors[key][:4] += torch.tensor(d)
        paths.append(_write_like(src, tmp_path / f"v{i}", tensors))
    # density 2/64 keeps each delta's two largest entries: [3, 0, 2, 0], [0, -2, 4, 0], [2, 1.5, 0, 0];
    # elected signs [+, -, +, 0]; the disjoint means [(3 + 2) / 2, -2, (2 + 4) / 2, 0]
    out = ties(paths, base, tmp_path / "ties", density=2 / 64, scale=0.5)
    got = _tensors(out)
    expected = torch.ones(64)
    expected[:4] += 0.5 * torch.tensor([2.5, -2.0, 3.0, 0.0])
    assert torch.equal(got[key], expected)
    untouched = _tensors(base)
    assert all(_bitwise(got[n], untouched[n]) for n in got if n != key)


def test_merges_do_not_depend_on_the_expert_layout(tiny_zoo, tmp_path):
    zoo = tiny_zoo / "mixtral"
    legacy = [zoo / "kjv", zoo / "python"]
    fused = [_fuse(p, tmp_path / "fused" / p.name) for p in [*legacy, zoo / "base"]]
    pairs = [
        (average(legacy, tmp_path / "avg-l"), average(fused[:2], tmp_path / "avg-f")),
        (ties(legacy, zoo / "base", tmp_path / "ties-l"), ties(fused[:2], fused[2], tmp_path / "ties-f")),
    ]
    pick_l = same_index_pick(legacy, tmp_path / "pick-l", 0.5)
    pick_f = same_index_pick(fused[:2], tmp_path / "pick-f", 0.5)
    assert pick_l.shared == pick_f.shared and pick_l.fraction == pick_f.fraction
    pairs += [(pick_l.checkpoints[v], pick_f.checkpoints[v]) for v in ("kjv", "python")]
    for a, b in pairs:
        ta, tb = _canonical(a), _canonical(b)
        assert ta.keys() == tb.keys()
        assert all(_bitwise(ta[n], tb[n]) for n in ta), (a, [n for n in ta if not _bitwise(ta[n], tb[n])])
    assert any(n.endswith("gate_up_proj") for n in open_checkpoint(pick_f.checkpoints["kjv"]).names)


# ---- same-index pick --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mixtral", "switch"])
def test_same_index_pick_at_budget_one_reproduces_each_variant(tiny_zoo, tmp_path, arch):
    paths = _variants(tiny_zoo, arch)
    pick = same_index_pick(paths, tmp_path / "pick", 1.0)
    assert pick.shared == [] and pick.fraction == 1.0
    assert list(pick.checkpoints) == VARIANTS
    for p in paths:
        _assert_same_checkpoint(p, pick.checkpoints[p.name])
        assert (pick.checkpoints[p.name] / "tokenizer.json").is_file()


@pytest.mark.parametrize("arch", ["mixtral", "switch"])
def test_same_index_pick_at_one_over_n_shares_every_expert(tiny_zoo, tmp_path, arch):
    paths = _variants(tiny_zoo, arch)
    pick = same_index_pick(paths, tmp_path / "pick", 1 / len(paths))
    assert pick.fraction == pytest.approx(1 / len(paths))
    outs = [_canonical(pick.checkpoints[v]) for v in VARIANTS]
    ins = [_canonical(p) for p in paths]
    for name in outs[0]:
        if name.startswith("expert:"):
            assert all(_bitwise(o[name], outs[0][name]) for o in outs), name
        else:  # routers and every other tensor stay each variant's own
            assert all(_bitwise(o[name], i[name]) for o, i in zip(outs, ins, strict=True)), name


def _distances(paths: list[Path]) -> dict[tuple[str, int], float]:
    ckpts = [open_checkpoint(p) for p in paths]
    a = ckpts[0].adapter
    out = {}
    for layer in a.moe_layers:
        for e in range(a.num_experts):
            mats = [neuron_matrix(c.read_expert(layer, e), a.expert_roles) for c in ckpts]
            pairs = [relative_distance(x, y) for x, y in combinations(mats, 2)]
            out[layer, e] = sum(pairs) / len(pairs)
    return out


@pytest.mark.parametrize("arch", ["mixtral", "switch"])
def test_same_index_pick_shares_most_similar_first_round_robin(tiny_zoo, tmp_path, arch):
    paths = _variants(tiny_zoo, arch)
    n = len(paths)
    pick = same_index_pick(paths, tmp_path / "pick", 0.5)
    dist = _distances(paths)
    # the fewest positions that bring the bank to half: (n*P - (n-1)*s) / (n*P) <= 0.5
    assert len(pick.shared) == math.ceil(n * len(dist) * 0.5 / (n - 1))
    assert pick.fraction <= 0.5
    assert pick.fraction == pytest.approx(1 - (n - 1) * len(pick.shared) / (n * len(dist)))
    ranked = sorted(dist, key=dist.get)
    assert [(s.layer, s.expert) for s in pick.shared] == ranked[: len(pick.shared)]
    assert [s.owner for s in pick.shared] == [VARIANTS[k % n] for k in range(len(pick.shared))]
    for s in pick.shared:
        assert s.distance == pytest.approx(dist[s.layer, s.expert])
    owner = {(s.layer, s.expert): s.owner for s in pick.shared}
    originals = {p.name: open_checkpoint(p) for p in paths}
    for v in VARIANTS:
        with open_checkpoint(pick.checkpoints[v]) as out:
            for layer, e in dist:
                got = out.read_expert(layer, e)
                want = originals[owner.get((layer, e), v)].read_expert(layer, e)
                assert all(_bitwise(got[r], want[r]) for r in got), (v, layer, e)


# ---- loading ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mixtral", "switch"])
def test_every_baseline_loads_in_transformers_and_runs(tiny_zoo, tmp_path, arch):
    paths = _variants(tiny_zoo, arch)
    outs = [
        average(paths, tmp_path / "avg"),
        ties(paths, tiny_zoo / arch / "base", tmp_path / "ties"),
        *same_index_pick(paths, tmp_path / "pick", 0.5).checkpoints.values(),
    ]
    for out in outs:
        logits = _forward(arch, out)
        assert logits.shape[-1] == open_checkpoint(out).config["vocab_size"]
        assert torch.isfinite(logits).all(), out


# ---- bad input: one line, nothing written -----------------------------------------------------------------


def _fewer_experts(zoo: Path, dst: Path) -> Path:
    src = zoo / "mixtral" / "python"
    with open_checkpoint(src) as ckpt:
        config = dict(ckpt.config, num_local_experts=ckpt.config["num_local_experts"] - 1)
        keep = {}
        for n in ckpt.names:
            info = ckpt.adapter.classify(n)
            if info.kind == "expert" and info.expert == config["num_local_experts"]:
                continue
            keep[n] = ckpt.tensor(n)[:-1] if info.kind == "router" else ckpt.tensor(n)
    return _write_like(src, dst / "python", keep, config)


def _dense(dst: Path) -> list[Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    for name in ("a", "b"):
        LlamaForCausalLM(cfg).save_pretrained(dst / name)
    return [dst / "a", dst / "b"]


def _mx(z: Path) -> list[Path]:
    return _variants(z, "mixtral")


BAD = {
    "one variant": (lambda z, t, o: average([z / "mixtral" / "kjv"], o), "at least two variants, got 1"),
    "mixed architectures": (
        lambda z, t, o: average([z / "mixtral" / "kjv", z / "switch" / "kjv"], o),
        "merge checkpoints of one architecture",
    ),
    "different shapes": (
        lambda z, t, o: same_index_pick([z / "mixtral" / "kjv", _fewer_experts(z, t)], o, 1.0),
        "has no tensor model.layers.0.block_sparse_moe.experts.3.w1.weight",
    ),
    "base of another architecture": (
        lambda z, t, o: ties(_mx(z), z / "switch" / "base", o),
        "merge checkpoints of one architecture",
    ),
    "base of another shape": (lambda z, t, o: ties(_mx(z), _fewer_experts(z, t), o), "has no tensor"),
    "density zero": (lambda z, t, o: ties(_mx(z), z / "mixtral" / "base", o, density=0.0), "(0, 1]"),
    "budget below 1/N": (lambda z, t, o: same_index_pick(_mx(z), o, 0.2), "must be in [1/4, 1]"),
    "budget above 1": (lambda z, t, o: same_index_pick(_mx(z), o, 1.5), "must be in [1/4, 1]"),
    "duplicate names": (
        lambda z, t, o: same_index_pick([z / "mixtral" / "kjv"] * 2, o, 1.0),
        "two variants are named 'kjv'",
    ),
    "dense variants": (lambda z, t, o: same_index_pick(_dense(t), o, 1.0), "dense model with no experts"),
    "not a checkpoint": (lambda z, t, o: average([z / "mixtral" / "kjv", t], o), "no config.json"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_writes_nothing(tiny_zoo, tmp_path, case):
    call, expected = BAD[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    with pytest.raises(MoeshareError) as err:
        call(tiny_zoo, inputs, tmp_path / "out")
    message = str(err.value)
    assert expected in message and "\n" not in message, message
    assert [p.name for p in tmp_path.iterdir()] == ["inputs"]


@pytest.mark.parametrize("method", ["average", "ties", "same_index_pick"])
def test_existing_output_is_refused_and_left_alone(tiny_zoo, tmp_path, method):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    paths = _variants(tiny_zoo, "mixtral")
    call = {
        "average": lambda: average(paths, out),
        "ties": lambda: ties(paths, tiny_zoo / "mixtral" / "base", out),
        "same_index_pick": lambda: same_index_pick(paths, out, 0.5),
    }[method]
    with pytest.raises(MoeshareError, match="already exists"):
        call()
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "keep.txt").read_text() == "mine"
