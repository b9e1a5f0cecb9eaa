"""HuggingFace checkpoint directories: lazy, validated reading and sharded, all-or-nothing writing."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from moeshare.checkpoint.adapters import Adapter, adapter_for
from moeshare.checkpoint.output import publish as publish  # re-exported: writers of other directories use it
from moeshare.checkpoint.output import writing
from moeshare.checkpoint.safetensors_file import read_safetensors_header, write_safetensors
from moeshare.errors import CheckpointError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Beside every checkpoint moeshare writes: what made it, and what `--force` may replace.
MARKER = "moeshare-checkpoint.json"
MARKER_FORMAT = "moeshare-checkpoint"


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


def written_by_moeshare(path: Path) -> bool:
    """Whether `path` is a checkpoint directory that write_checkpoint made (its marker file says so)."""
    try:
        return json.loads((Path(path) / MARKER).read_text()).get("format") == MARKER_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def write_checkpoint(
    out: str | Path,
    config: dict,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    max_shard_bytes: int | None = None,
    copy_files: Iterable[Path] = (),
    force: bool = False,
    inputs: Iterable[Path] = (),
    about: dict | None = None,
) -> Path:
    """Write config + safetensors (sharded past `max_shard_bytes`) to a temporary directory, then rename.

    An error part-way (disk full, a bad tensor, an interrupt) leaves no directory at `out`. `force` replaces only
    a checkpoint this function wrote, or an empty directory, and never one of `inputs`. `about` goes into the
    marker file (e.g. the store and variant it was exported from).
    """
    with writing(
        out, force=force, ours=written_by_moeshare, what="a checkpoint moeshare wrote", inputs=inputs
    ) as tmp:
        shards: list[list[str]] = []
        batch: dict[str, torch.Tensor] = {}
        batch_bytes = total = 0

        def flush() -> None:
            write_safetensors(tmp / f"shard-{len(shards)}.tmp", batch)
            shards.append(list(batch))
            batch.clear()

        for name, t in tensors:
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
            shutil.copyfile(file, tmp / Path(file).name)  # content only: the mode follows the umask
        (tmp / MARKER).write_text(json.dumps({"format": MARKER_FORMAT, **(about or {})}, indent=1) + "\n")
    return Path(out)
