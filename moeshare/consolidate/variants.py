"""Variant checkpoints side by side: opened and checked to be one model shape, and checkpoints written like
them. What the checkpoint-level methods (same-index pick, the eval baselines) share."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from moeshare.checkpoint import Checkpoint, open_checkpoint, write_checkpoint
from moeshare.errors import MoeshareError
from moeshare.store.format import TOKENIZER_FILES

MAX_SHARD_BYTES = 5 * 2**30  # what write_checkpoint holds in memory before it writes a shard


def open_variants(paths: list[Path], method: str) -> list[Checkpoint]:
    if len(paths) < 2:
        raise MoeshareError(f"{method} needs at least two variants, got {len(paths)}")
    ckpts = [open_checkpoint(p) for p in paths]
    for ckpt in ckpts[1:]:
        check_same_model(ckpts[0], ckpt)
    return ckpts


def check_same_model(ref: Checkpoint, ckpt: Checkpoint) -> None:
    """`ckpt` has `ref`'s architecture, tensor names and tensor shapes."""
    if ckpt.adapter.name != ref.adapter.name:
        raise MoeshareError(
            f"{ckpt.path} is {ckpt.adapter.name} but {ref.path} is {ref.adapter.name}: merge checkpoints of one architecture"
        )
    if missing := sorted(set(ref.names) ^ set(ckpt.names)):
        where, other = (ckpt, ref) if missing[0] in ref.names else (ref, ckpt)
        raise MoeshareError(
            f"{where.path}: has no tensor {missing[0]}, which {other.path} has: not the same model shape"
        )
    for name in ref.names:
        if ckpt.shape(name) != ref.shape(name):
            raise MoeshareError(
                f"{ckpt.path}: tensor {name} is {list(ckpt.shape(name))} but {list(ref.shape(name))} in {ref.path}"
            )


def new_output(out: Path) -> Path:
    """Refuse an output path that exists: methods never replace what is there."""
    out = Path(out)
    if out.exists():
        raise MoeshareError(f"{out}: already exists; choose another output path or remove it")
    return out


def write_like(out: Path, like: Checkpoint, tensors: Iterable[tuple[str, torch.Tensor]]) -> Path:
    """A checkpoint with `like`'s config and tokenizer files, written all or nothing."""
    files = [like.path / f for f in TOKENIZER_FILES if (like.path / f).is_file()]
    return write_checkpoint(out, like.config, tensors, max_shard_bytes=MAX_SHARD_BYTES, copy_files=files)
