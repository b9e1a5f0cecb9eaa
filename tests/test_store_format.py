"""The store format on its own (moeshare.store), and which room imports which: the engine reads stores through
moeshare.store and never imports the consolidator; code lives in the room that owns its concern."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

import moeshare
from moeshare.checkpoint import open_checkpoint
from moeshare.cli import main
from moeshare.errors import MoeshareError
from moeshare.store import Store, StoreWriter, to_bank
from moeshare.store.format import MANIFEST

PACKAGE = Path(moeshare.__file__).parent


def _imports(path: Path) -> set[str]:
    """Every module a file imports (relative imports resolved), and each `from M import x` also as M.x."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(x for x in (base, node.module or "") if x)
            found |= {module} | {f"{module}.{a.name}" for a in node.names}
    return found


def _room_imports(room: str) -> dict[str, set[str]]:
    return {str(p.relative_to(PACKAGE)): _imports(p) for p in sorted((PACKAGE / room).rglob("*.py"))}


def _offending(room: str, forbidden: str) -> list[str]:
    return [
        f"{file} imports {m}"
        for file, mods in _room_imports(room).items()
        for m in sorted(mods)
        if m == forbidden or m.startswith(forbidden + ".")
    ]


@pytest.fixture(scope="module")
def written(tiny_zoo, tmp_path_factory) -> tuple[Path, list]:
    """A store written by StoreWriter alone: kjv's experts as the bank, both variants mapping onto it."""
    ckpts = [open_checkpoint(tiny_zoo / "mixtral" / v) for v in ("kjv", "python")]
    root = tmp_path_factory.mktemp("store") / "s"
    adapter = ckpts[0].adapter
    n = adapter.num_experts
    writer = StoreWriter(root, "mixtral", [(x, n, ckpts[0].read_expert(x, 0)) for x in adapter.moe_layers])
    for layer in adapter.moe_layers:
        writer.write_layer(layer, [ckpts[0].read_expert(layer, e) for e in range(n)])
    tables = {c.path.name: {x: list(range(n)) for x in adapter.moe_layers} for c in ckpts}
    variants = writer.write_variants(ckpts, tables)
    bank = {"experts_per_variant": n, "layers": [{"layer": x, "slots": n} for x in adapter.moe_layers]}
    writer.finish(ckpts[0].config, variants, bank, bytes={})
    return root, ckpts


def test_store_written_by_store_writer_reads_back_through_store(written):
    root, ckpts = written
    store = Store(root)
    assert store.architecture == "mixtral" and list(store.variants) == ["kjv", "python"]
    assert store.verify() == len(store.manifest.files) > 3
    for ckpt in ckpts:
        name = ckpt.path.name
        for key in ckpt.names:
            if ckpt.adapter.classify(key).kind != "expert":
                assert torch.equal(store.tensor(name, key), ckpt.tensor(key)), (name, key)
        assert (store.tokenizer_dir(name) / "tokenizer.json").read_bytes() == (
            ckpt.path / "tokenizer.json"
        ).read_bytes()
    layer = ckpts[0].adapter.moe_layers[-1]
    expert = ckpts[0].read_expert(layer, 1)
    assert store.slots(layer) == ckpts[0].adapter.num_experts
    assert all(torch.equal(store.slot(layer, 1)[r], t) for r, t in expert.items())
    fused = to_bank("mixtral", expert)
    assert all(torch.equal(store.bank_slot(layer, 1)[r], t) for r, t in fused.items())
    assert store.variant("python").tables[layer] == list(range(ckpts[0].adapter.num_experts))


@pytest.mark.parametrize(
    ("version", "message"),
    [
        (2, "store format version 2 is newer than this moeshare reads (1): upgrade moeshare"),
        ("1", "unknown store format version '1' (this moeshare reads 1); consolidate the store again"),
        (None, "unknown store format version None (this moeshare reads 1)"),
    ],
)
def test_unknown_store_format_version_is_refused_in_one_line(written, tmp_path, capsys, version, message):
    copy = tmp_path / "s"
    shutil.copytree(written[0], copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["version"] = version
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(MoeshareError, match="store format version") as e:
        Store(copy)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert main(["inspect", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"moeshare: error: {copy / MANIFEST}: {str(e.value).split(': ', 1)[1]}"


def test_engine_never_imports_the_consolidator():
    assert _offending("engine", "moeshare.consolidate") == []
    for other in ("moeshare.consolidate", "moeshare.engine", "moeshare.evals", "moeshare.server"):
        assert _offending("store", other) == []


def test_same_index_pick_is_a_consolidation_method_the_bench_imports_from_there():
    assert _offending("bench", "moeshare.evals") == []
    bench = set().union(*_room_imports("bench").values())
    assert "moeshare.consolidate.same_index.same_index_pick" in bench


def test_transformers_loader_lives_with_checkpoints(tiny_zoo):
    for room in ("consolidate", "evals", "bench", "engine"):
        assert _offending(room, "moeshare.consolidate.calibrate.load_model") == []
    from moeshare.checkpoint.hf import load_model

    model = load_model(tiny_zoo / "mixtral" / "kjv", "mixtral")
    logits = model(input_ids=torch.tensor([[3, 80, 81]])).logits  # [1, 3, V]
    assert logits.dtype == torch.float32 and logits.shape[:2] == (1, 3) and not model.training
