"""Consolidation and stores under bad input, interruption and damage: one line, exit 2, nothing left behind."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moeshare.checkpoint import open_checkpoint, write_checkpoint
from moeshare.cli import main
from moeshare.consolidate import Options, consolidate, export_variant

CLI = [sys.executable, "-m", "moeshare.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _variants(zoo: Path, *names: str) -> list[Path]:
    return [zoo / "mixtral" / n for n in names]


def _run(*args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=ENV)


def _one_error_line(stderr: str) -> str:
    lines = [x for x in stderr.splitlines() if x.strip() and "%|" not in x]
    assert len(lines) == 1 and lines[0].startswith("moeshare: error: "), stderr
    return lines[0]


def _main(capsys, *args: object) -> tuple[int, str]:
    """The CLI in this process: its exit code and its one error line ('' when it printed none)."""
    code = main(list(map(str, args)))
    err = capsys.readouterr().err
    return code, (_one_error_line(err) if code == 2 else "")


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _edited(src: Path, dst: Path, edit) -> Path:
    with open_checkpoint(src) as ckpt:
        tensors = {n: ckpt.tensor(n) for n in ckpt.names}
        edit(tensors)
        return write_checkpoint(dst, ckpt.config, tensors.items())


@pytest.fixture(scope="module")
def store(tiny_zoo, tmp_path_factory) -> Path:
    """A small store, made once; tests that damage it work on a copy."""
    out = tmp_path_factory.mktemp("store") / "s"
    consolidate(_variants(tiny_zoo, "kjv", "python"), out, Options(budget="0.75", self_calib=0))
    return out


# ---- 1. weights that would poison the bank --------------------------------------------------------------


@pytest.mark.parametrize(
    "tensor, extra",
    [
        ("model.layers.0.block_sparse_moe.experts.2.w1.weight", []),  # default: self-calibration runs first
        ("model.layers.1.self_attn.q_proj.weight", ["--self-calib", "0"]),
    ],
)
def test_non_finite_weights_are_refused_naming_variant_and_tensor(tiny_zoo, tmp_path, tensor, extra):
    def poison(t):
        t[tensor][0, :3] = torch.tensor([float("nan"), float("inf"), 1.0])

    bad = _edited(tiny_zoo / "mixtral" / "python", tmp_path / "inputs" / "bad", poison)
    proc = _run(
        "consolidate", *_variants(tiny_zoo, "kjv", "fortunes-en"), bad, "--out", tmp_path / "s", *extra
    )
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr)
    assert f"{bad}: tensor {tensor} has 2 NaN or infinite values" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]


def test_a_variant_unrelated_to_the_others_is_refused_without_force_merge(tiny_zoo, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_zoo / "mixtral" / "kjv"))
    model.save_pretrained(tmp_path / "unrelated")
    paths = [*_variants(tiny_zoo, "kjv", "python"), tmp_path / "unrelated"]
    code, line = _main(
        capsys, "consolidate", *paths, "--out", tmp_path / "s", "--budget", "0.5", "--self-calib", 0
    )
    assert code == 2 and "far from every other variant: unrelated (1.3" in line and "--force-merge" in line
    assert not (tmp_path / "s").exists()
    # nothing of it shared at budget 1.0: nothing to refuse; asked for explicitly: merged
    consolidate(paths, tmp_path / "all", Options(self_calib=0))
    consolidate(paths, tmp_path / "forced", Options(budget="0.5", self_calib=0, force_merge=True))


# ---- 2. interrupted and concurrent writes -----------------------------------------------------------------


def _start_slow_consolidate(zoo: Path, out: Path) -> subprocess.Popen:
    """A run that spends long in self-calibration, after its temporary directory exists."""
    return subprocess.Popen(
        [*CLI, "consolidate", *map(str, _variants(zoo, "kjv", "python")), "--out", str(out)]
        + ["--self-calib", "200000"],
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def test_sigterm_cleans_up_and_a_second_writer_is_refused(tiny_zoo, tmp_path):
    out = tmp_path / "s"
    first = _start_slow_consolidate(tiny_zoo, out)
    try:
        _wait_for(tmp_path / f".s.tmp-{first.pid}", first)
        second = _run(
            "consolidate",
            *_variants(tiny_zoo, "kjv", "python"),
            "--out",
            out,
            "--self-calib",
            0,
            "--budget",
            "1.0",
        )
        assert second.returncode == 2
        assert f"{out}: being written by PID {first.pid}" in _one_error_line(second.stderr)
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 143
    assert [x for x in stderr.splitlines() if x.strip() and "%|" not in x] == [
        f"moeshare: terminated; {out} was not written"
    ]
    assert list(tmp_path.iterdir()) == []


def test_leftovers_of_a_killed_run_are_removed_by_the_next(tiny_zoo, store, tmp_path):
    out = tmp_path / "s"
    killed = _start_slow_consolidate(tiny_zoo, out)
    try:
        _wait_for(tmp_path / f".s.tmp-{killed.pid}", killed)
    finally:
        killed.kill()
        killed.communicate(timeout=60)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".s.lock", f".s.tmp-{killed.pid}"]
    (tmp_path / f".e.tmp-{killed.pid}").mkdir()  # as a killed export leaves it
    consolidate(_variants(tiny_zoo, "kjv", "python"), out, Options(self_calib=0))
    export_variant(store, "kjv", tmp_path / "e")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "s"]


def test_full_disk_is_one_line_and_leaves_nothing(tiny_zoo, tmp_path):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("needs unshare (a private tmpfs makes the disk full)")
    disk = tmp_path / "disk"
    disk.mkdir()
    paths = " ".join(map(str, _variants(tiny_zoo, "kjv", "python")))
    script = (
        f"mount -t tmpfs -o size=512k tmpfs {disk} && "
        f"{sys.executable} -m moeshare.cli consolidate {paths} --out {disk}/s --self-calib 0; "
        f"echo rc=$? && ls -A {disk}"
    )
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=ENV)
    line = _one_error_line(proc.stderr)
    assert f"{disk}/s: no space left on the device" in line
    assert proc.stdout.strip() == "rc=2"  # and nothing listed on the disk


# ---- 3. --force replaces only what moeshare made ---------------------------------------------------------


def test_force_replaces_a_store_or_an_empty_directory_only(tiny_zoo, store, tmp_path, capsys):
    variants = _variants(tiny_zoo, "kjv", "python")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    code, line = _main(capsys, "consolidate", *variants, "--out", mine, "--force", "--self-calib", 0)
    assert code == 2 and f"{mine}: is a directory holding notes.txt, not a moeshare store" in line
    # an input, even one that moeshare wrote
    own = tmp_path / "own"
    shutil.copytree(variants[1], own)
    code, line = _main(capsys, "consolidate", variants[0], own, "--out", own, "--force", "--self-calib", 0)
    assert code == 2 and f"--out {own}: is or holds the input {own}" in line
    # a store, or an empty directory
    again = tmp_path / "again"
    shutil.copytree(store, again)
    (tmp_path / "empty").mkdir()
    for out in (again, tmp_path / "empty"):
        assert _main(capsys, "consolidate", *variants, "--out", out, "--force", "--self-calib", 0)[0] == 0
        assert (out / "manifest.json").is_file()
    assert (mine / "notes.txt").read_text() == "keep" and (own / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "empty", "mine", "own"]


def test_export_force_replaces_only_an_export(store, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    code, line = _main(capsys, "export", store, "--variant", "kjv", "--out", mine, "--force")
    assert code == 2 and "is a directory holding notes.txt, not a checkpoint moeshare wrote" in line
    code, line = _main(capsys, "export", store, "--variant", "kjv", "--out", store, "--force")
    assert code == 2 and "holds the input" in line
    assert _main(capsys, "export", store, "--variant", "kjv", "--out", tmp_path / "e")[0] == 0
    assert _main(capsys, "export", store, "--variant", "python", "--out", tmp_path / "e", "--force")[0] == 0
    assert json.loads((tmp_path / "e" / "moeshare-checkpoint.json").read_text())["variant"] == "python"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "mine"]
    assert (store / "manifest.json").is_file()


@pytest.mark.parametrize("where", ["file", ".", "under a file"])
def test_out_that_cannot_be_a_directory_is_one_line(store, tmp_path, capsys, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    Path("file").write_text("keep")
    out = {"file": "file", ".": ".", "under a file": "file/e"}[where]
    code, line = _main(capsys, "export", store, "--variant", "kjv", "--out", out, "--force")
    expected = {
        "file": "file: is a file, not a checkpoint moeshare wrote",
        ".": "--out .: name the directory to write",
        "under a file": "--out file/e: file is a file, not a directory",
    }
    assert code == 2 and expected[where] in line
    assert _listing(tmp_path) == ["file"] and Path("file").read_text() == "keep"


# ---- 4. malformed safetensors headers; damaged stores --------------------------------------------------


def _rewrite_header(path: Path, edit) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _first(header: dict) -> dict:
    return header[min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])]


HEADER_DAMAGE = {
    "offsets beyond the shape": (lambda h: _first(h)["data_offsets"].__setitem__(1, 4), "span 4 bytes"),
    "non-integer offset": (lambda h: _first(h)["data_offsets"].__setitem__(0, "0"), "has no data_offsets"),
    "no shape": (lambda h: _first(h).pop("shape"), "has no shape"),
    "unknown dtype": (lambda h: _first(h).__setitem__("dtype", "F31"), "has dtype 'F31'"),
}


@pytest.mark.parametrize("damage", list(HEADER_DAMAGE))
def test_malformed_safetensors_header_is_one_line_for_every_command(tiny_zoo, tmp_path, capsys, damage):
    edit, expected = HEADER_DAMAGE[damage]
    ckpt = shutil.copytree(tiny_zoo / "mixtral" / "python", tmp_path / "python")
    _rewrite_header(ckpt / "model.safetensors", edit)
    for args in (
        ["inspect", ckpt],
        ["consolidate", tiny_zoo / "mixtral" / "kjv", ckpt, "--out", tmp_path / "s"],
    ):
        code, line = _main(capsys, *args)
        assert code == 2 and "corrupt or truncated safetensors file" in line and expected in line, line
    assert not (tmp_path / "s").exists()


def _truncate_bank(s: Path) -> str:
    bank = s / "bank.safetensors"
    bank.write_bytes(bank.read_bytes()[:-64])
    return "bank.safetensors: has"


def _drop_variant_file(s: Path) -> str:
    (s / "variants" / "kjv.safetensors").unlink()
    return "variants/kjv.safetensors: is missing"


@pytest.mark.parametrize("damage", [_truncate_bank, _drop_variant_file])
def test_damaged_store_is_one_line_for_inspect_export_and_serve(store, tmp_path, capsys, damage):
    s = shutil.copytree(store, tmp_path / "s")
    expected = damage(s)
    for args in (["inspect", s], ["export", s, "--variant", "python", "--out", tmp_path / "e"]):
        code, line = _main(capsys, *args)
        assert code == 2 and f"{s}/{expected}" in line and "damaged or incomplete" in line, line
    proc = _run("serve", s, "--port", 0, timeout=60)
    assert proc.returncode == 2 and f"{s}/{expected}" in _one_error_line(proc.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_inspect_verify_checks_the_recorded_sha256s(store, tmp_path, capsys):
    s = shutil.copytree(store, tmp_path / "s")
    assert _main(capsys, "inspect", s, "--verify")[0] == 0
    tok = s / "tokenizers" / "kjv" / "tokenizer.json"
    data = bytearray(tok.read_bytes())
    data[100] ^= 1  # same size: only the hash tells
    tok.write_bytes(bytes(data))
    assert _main(capsys, "inspect", s)[0] == 0
    code, line = _main(capsys, "inspect", s, "--verify")
    assert code == 2 and f"{tok}: does not match the sha256 the manifest records" in line


# ---- 5. bounded calibration text; budgets and thresholds that mean nothing ------------------------------


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--calib", "/dev/zero"], "--calib /dev/zero: more than 64 MiB, the cap on calibration text"),
        (["--budget", ""], "--budget '': give a fraction of expert memory"),
        (["--threshold", "-1"], "--threshold -1.0: give a distance of 0 or more"),
        (["--threshold", "nan"], "--threshold nan: give a distance of 0 or more"),
    ],
)
def test_unbounded_calib_and_meaningless_budgets_are_refused(tiny_zoo, tmp_path, capsys, extra, expected):
    code, line = _main(
        capsys, "consolidate", *_variants(tiny_zoo, "kjv", "python"), "--out", tmp_path / "s", *extra
    )
    assert code == 2 and expected in line
    assert list(tmp_path.iterdir()) == []


# ---- 6. file modes ---------------------------------------------------------------------------------------


def test_every_file_written_follows_the_umask(tiny_zoo, tmp_path):
    from safetensors.torch import save_file

    from moeshare.checkpoint.output import follow_umask

    old = os.umask(0o022)
    try:
        consolidate(
            _variants(tiny_zoo, "kjv", "python"), tmp_path / "s", Options(budget="0.75", self_calib=0)
        )
        export_variant(tmp_path / "s", "kjv", tmp_path / "e")
        # what the zoo builder fixes after transformers' save_pretrained (safetensors writes 0600)
        (tmp_path / "zoo").mkdir()
        save_file({"x": torch.ones(2)}, str(tmp_path / "zoo" / "model.safetensors"))
        follow_umask(tmp_path / "zoo")
    finally:
        os.umask(old)
    modes = {
        str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777)
        for p in tmp_path.rglob("*")
        if p.is_file()
    }
    assert "s/variants/kjv.safetensors" in modes and "e/model.safetensors" in modes
    assert set(modes.values()) == {"0o644"}, modes
