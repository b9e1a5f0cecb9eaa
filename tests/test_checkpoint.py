"""Checkpoint I/O: bit-exact round trips, the fused v5 layout, and one clear error per bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeshare.checkpoint import open_checkpoint, write_checkpoint
from moeshare.errors import CheckpointError, MoeshareError


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _assert_same_tensors(a: Path, b: Path) -> None:
    with open_checkpoint(a) as ca, open_checkpoint(b) as cb:
        assert set(ca.names) == set(cb.names)
        for name in ca.names:
            ta, tb = ca.tensor(name), cb.tensor(name)
            assert ta.dtype == tb.dtype and ta.shape == tb.shape, name
            assert torch.equal(ta.view(torch.uint8), tb.view(torch.uint8)), name
        assert ca.config == cb.config


@pytest.mark.parametrize("arch", ["mixtral", "switch"])
@pytest.mark.parametrize("shard_bytes", [None, 64 * 1024])
def test_round_trip_is_bit_exact(tiny_zoo, tmp_path, arch, shard_bytes):
    src = tiny_zoo / arch / "base"
    with open_checkpoint(src) as ckpt:
        out = write_checkpoint(
            tmp_path / "out",
            ckpt.config,
            ((n, ckpt.tensor(n)) for n in ckpt.names),
            max_shard_bytes=shard_bytes,
        )
    files = sorted(p.name for p in out.iterdir())
    if shard_bytes is None:
        assert "model.safetensors" in files and "model.safetensors.index.json" not in files
    else:
        shards = [f for f in files if f.startswith("model-")]
        assert len(shards) > 1 and "model.safetensors.index.json" in files
        assert all(f.endswith(f"-of-{len(shards):05d}.safetensors") for f in shards)
    _assert_same_tensors(src, out)
    # and the round trip of the round trip: sharded back to one file
    with open_checkpoint(out) as ckpt:
        again = write_checkpoint(tmp_path / "again", ckpt.config, ((n, ckpt.tensor(n)) for n in ckpt.names))
    _assert_same_tensors(src, again)


def test_adapters_classify_every_tensor(tiny_zoo):
    for arch, roles in [("mixtral", {"w1", "w2", "w3"}), ("switch", {"wi", "wo"})]:
        with open_checkpoint(tiny_zoo / arch / "base") as ckpt:
            a = ckpt.adapter
            infos = [a.classify(n) for n in ckpt.names]
            experts = [i for i in infos if i.kind == "expert"]
            assert {i.role for i in experts} == roles
            assert len(experts) == len(a.moe_layers) * a.num_experts * len(roles)
            assert {i.layer for i in infos if i.kind == "router"} == set(a.moe_layers)
            assert all(a.expected_shape(n) is not None for n in ckpt.names), (
                "a tensor the adapter does not know"
            )
    with open_checkpoint(tiny_zoo / "switch" / "base") as ckpt:
        # Switch keeps dense blocks between sparse ones
        assert any(n.endswith("mlp.wi.weight") for n in ckpt.names)


def _fuse(src: Path, dst: Path) -> None:
    """Rewrite a per-expert Mixtral checkpoint into the transformers-v5 fused layout."""
    with open_checkpoint(src) as ckpt:
        a = ckpt.adapter
        tensors = {n: ckpt.tensor(n) for n in ckpt.names if a.classify(n).kind != "expert"}
        for layer in a.moe_layers:
            experts = [ckpt.read_expert(layer, e) for e in range(a.num_experts)]
            tensors[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([x["w1"], x["w3"]]) for x in experts]
            )
            tensors[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack([x["w2"] for x in experts])
            router = tensors.pop(a.router_key(layer))
            tensors[f"model.layers.{layer}.mlp.gate.weight"] = router
        copy = [p for p in src.iterdir() if p.name.startswith(("tokenizer", "special_tokens"))]
        write_checkpoint(dst, ckpt.config, tensors.items(), copy_files=copy)


def test_fused_v5_layout_reads_the_same_experts(tiny_zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_zoo / "mixtral" / "base"
    _fuse(src, tmp_path / "fused")
    with open_checkpoint(src) as legacy, open_checkpoint(tmp_path / "fused") as fused:
        assert any(n.endswith("gate_up_proj") for n in fused.names)
        assert {fused.adapter.classify(n).kind for n in fused.names} == {"expert", "router", "other"}
        for layer in legacy.adapter.moe_layers:
            for e in range(legacy.adapter.num_experts):
                a, b = legacy.read_expert(layer, e), fused.read_expert(layer, e)
                assert all(torch.equal(a[r], b[r]) for r in ("w1", "w2", "w3"))
    # transformers reads both layouts as the same model
    ids = torch.tensor([[5, 9, 40, 77, 120, 3]])
    with torch.no_grad():
        la = AutoModelForCausalLM.from_pretrained(src).eval()(ids).logits
        lb = AutoModelForCausalLM.from_pretrained(tmp_path / "fused").eval()(ids).logits
    torch.testing.assert_close(la, lb, rtol=0, atol=0)


# ---- bad input: one clear line naming the file, nothing written ----------------------------------------


def _truncate(d: Path) -> str:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    return "corrupt or truncated"


def _garble_header(d: Path) -> str:
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json ..."
    f.write_bytes(bytes(data))
    return "header is not valid JSON"


def _drop_config(d: Path) -> str:
    (d / "config.json").unlink()
    return "no config.json"


def _unsupported(d: Path) -> str:
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    return "architecture 'gpt2' is not supported (supported model_type values: llama, mistral, mixtral"


def _wrong_shape(d: Path) -> str:
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_local_experts"] += 1
    (d / "config.json").write_text(json.dumps(cfg))
    return "but config.json implies"


def _pickle(d: Path) -> str:
    (d / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(2)}, d / "pytorch_model.bin")
    return "pickle weights are refused"


def _missing_shard(d: Path) -> str:
    with open_checkpoint(d) as ckpt:
        tensors = [(n, ckpt.tensor(n)) for n in ckpt.names]
        config = ckpt.config
    shutil.rmtree(d)
    write_checkpoint(d, config, tensors, max_shard_bytes=64 * 1024)
    next(d.glob("model-00002-of-*.safetensors")).unlink()
    return "shard listed in model.safetensors.index.json is missing"


@pytest.mark.parametrize(
    "damage", [_truncate, _garble_header, _drop_config, _unsupported, _wrong_shape, _pickle, _missing_shard]
)
def test_bad_checkpoint_gives_one_clear_line(tiny_zoo, tmp_path, damage):
    d = _copy(tiny_zoo / "mixtral" / "base", tmp_path / "ckpt")
    expected = damage(d)
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(d)
    message = str(err.value)
    assert expected in message and "\n" not in message
    assert str(d) in message
    proc = subprocess.run(
        [sys.executable, "-m", "moeshare.cli", "inspect", str(d)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"moeshare: error: {message}"  # one line, no traceback
    assert _snapshot(tmp_path) == before


def test_write_refuses_existing_dir_and_leaves_it_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MoeshareError, match="already exists; choose another --out or pass --force"):
        write_checkpoint(out, {"model_type": "llama"}, [("x", torch.ones(3))])
    assert _snapshot(tmp_path) == {"out/keep.txt": b"mine"}


def test_failed_write_leaves_nothing(tmp_path):
    def tensors():
        yield "a", torch.ones(1000)
        yield "b", torch.ones(1000)
        raise OSError(28, "No space left on device")

    with pytest.raises(MoeshareError, match="no space left on the device"):
        write_checkpoint(tmp_path / "out", {"model_type": "llama"}, tensors(), max_shard_bytes=4000)
    assert list(tmp_path.iterdir()) == []
