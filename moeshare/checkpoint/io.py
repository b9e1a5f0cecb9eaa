"""HuggingFace checkpoint directories: lazy, validated reading and sharded, all-or-nothing writing."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moeshare.checkpoint.adapters import Adapter, adapter_for
from moeshare.errors import CheckpointError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Tensor name -> {dtype, shape, data_offsets}, after checking the file is whole."""

    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(
            f"{path}: corrupt or truncated safetensors file ({why}); save or copy it again"
        )

    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise corrupt(f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise corrupt(f"header length {n} does not fit in {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise corrupt("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    header.pop("__metadata__", None)
    end = 0
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise corrupt(f"tensor {name} has no data_offsets")
        end = max(end, offsets[1])
    if 8 + n + end != size:
        raise corrupt(f"data should end at byte {8 + n + end}, the file has {size}")
    return header


class Checkpoint:
    """An opened checkpoint directory. Tensors are read one at a time, on request."""

    def __init__(
        self, path: Path, config: dict, adapter: Adapter, where: dict[str, Path], headers: dict[str, dict]
    ):
        self.path = path
        self.config = config
        self.adapter = adapter
        self.files = sorted(set(where.values()))
        self._where = where
        self._headers = headers

    @property
    def names(self) -> dict[str, Path]:
        """Every tensor name, mapped to the file that holds it."""
        return self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._headers[name]["shape"])

    def nbytes(self, name: str) -> int:
        start, end = self._headers[name]["data_offsets"]
        return end - start

    def tensor(self, name: str, index: int | None = None) -> torch.Tensor:
        """The tensor `name`, or only its `index`-th row along dim 0 (one expert of a stacked tensor)."""
        file = self._where.get(name)
        if file is None:
            raise CheckpointError(f"{self.path}: no tensor named {name}")
        # a handle per read: a kept one would keep the whole file mapped, and a 90 GB checkpoint resident
        with safe_open(str(file), framework="pt") as handle:
            if index is None:
                return handle.get_tensor(name)
            return handle.get_slice(name)[index]

    def read_expert(self, layer: str, expert: int) -> dict[str, torch.Tensor]:
        return self.adapter.read_expert(self, layer, expert)

    def close(self) -> None:
        """Nothing stays open between reads; kept so a Checkpoint works as a context manager."""

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _load_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def _weight_files(path: Path) -> list[Path]:
    if (path / INDEX).exists():
        weight_map = _load_json(path / INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{path / INDEX}: has no 'weight_map'")
        files = [path / f for f in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{file}: shard listed in {INDEX} is missing")
        return files
    if (path / WEIGHTS).exists():
        return [path / WEIGHTS]
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{pickles[0]}: pickle weights are refused (loading them can run arbitrary code); convert to safetensors "
            f"with transformers: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT)"
        )
    raise CheckpointError(f"{path}: no {WEIGHTS} or {INDEX}: not a safetensors checkpoint")


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open and validate a checkpoint: config, architecture, shards, file integrity, every tensor's shape."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a HuggingFace checkpoint directory)")
    if not (path / CONFIG).is_file():
        raise CheckpointError(f"{path}: no {CONFIG}, so this is not a HuggingFace checkpoint directory")
    config = _load_json(path / CONFIG)
    adapter = adapter_for(config, path / CONFIG)
    where: dict[str, Path] = {}
    headers: dict[str, dict] = {}
    for file in _weight_files(path):
        for name, entry in read_safetensors_header(file).items():
            where[name], headers[name] = file, entry
    if (path / INDEX).exists():
        for name, file in _load_json(path / INDEX)["weight_map"].items():
            if where.get(name) != path / file:
                raise CheckpointError(f"{path / file}: tensor {name} listed in {INDEX} is not in that file")
    for name, entry in headers.items():
        expected = adapter.expected_shape(name)
        if expected is not None and tuple(entry["shape"]) != expected:
            raise CheckpointError(
                f"{where[name]}: tensor {name} has shape {list(entry['shape'])} but {CONFIG} implies {list(expected)}"
            )
    return Checkpoint(path, config, adapter, where, headers)


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """safetensors refuses tensors that share memory, so views of a larger tensor get their own copy."""
    t = t.detach().contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def write_checkpoint(
    out: str | Path,
    config: dict,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    max_shard_bytes: int | None = None,
    copy_files: Iterable[Path] = (),
    force: bool = False,
) -> Path:
    """Write config + safetensors (sharded past `max_shard_bytes`) to a temporary directory, then rename.

    An error part-way (disk full, a bad tensor, an interrupt) leaves no directory at `out`.
    """
    out = Path(out)
    if out.exists() and not force:
        raise CheckpointError(f"{out}: already exists; choose another path or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        shards: list[list[str]] = []
        batch: dict[str, torch.Tensor] = {}
        batch_bytes = total = 0

        def flush() -> None:
            save_file(batch, str(tmp / f"shard-{len(shards)}.tmp"), metadata={"format": "pt"})
            shards.append(list(batch))
            batch.clear()

        for name, t in tensors:
            t = _own_storage(t)
            n = t.numel() * t.element_size()
            if max_shard_bytes and batch and batch_bytes + n > max_shard_bytes:
                flush()
                batch_bytes = 0
            batch[name] = t
            batch_bytes += n
            total += n
        if batch or not shards:
            flush()
        if len(shards) == 1:
            (tmp / "shard-0.tmp").rename(tmp / WEIGHTS)
        else:
            weight_map = {}
            for k, names in enumerate(shards):
                file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                (tmp / f"shard-{k}.tmp").rename(tmp / file)
                weight_map.update(dict.fromkeys(names, file))
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for file in copy_files:
            shutil.copy2(file, tmp / Path(file).name)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def publish(tmp: Path, out: Path) -> None:
    """Move a finished temporary directory to `out`, replacing what was there only once it is complete."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
