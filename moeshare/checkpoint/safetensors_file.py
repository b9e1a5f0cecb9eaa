"""The safetensors format as we read and write it: one header check for every reader, and a writer that streams.

The writer fixes the header up front and appends tensors one at a time (hashing them as they go), so a bank
larger than RAM is written layer by layer, a full disk is an ordinary OSError, and every file follows the umask.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from moeshare.errors import CheckpointError

MAX_HEADER = 100 * 1024 * 1024
DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
ITEM_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def _sizes(value: object, count: int | None = None) -> bool:
    """A JSON list of non-negative integers (of `count` items when given)."""
    return (
        isinstance(value, list)
        and (count is None or len(value) == count)
        and all(type(x) is int and x >= 0 for x in value)
    )


def _check_entry(name: str, entry: object, corrupt: Callable[[str], CheckpointError]) -> tuple[int, int]:
    """A tensor's [begin, end) in the data section, after checking its dtype, shape and offsets agree."""
    if not isinstance(entry, dict):
        raise corrupt(f"tensor {name} is not described by a JSON object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEM_BYTES:
        raise corrupt(f"tensor {name} has dtype {dtype!r}, not one of {', '.join(ITEM_BYTES)}")
    if not _sizes(shape):
        raise corrupt(f"tensor {name} has no shape (a list of sizes)")
    if not _sizes(offsets, 2):
        raise corrupt(f"tensor {name} has no data_offsets (two byte offsets)")
    begin, end = offsets
    need = math.prod(shape) * ITEM_BYTES[dtype]
    if end - begin != need:
        raise corrupt(
            f"tensor {name}: data_offsets {offsets} span {end - begin} bytes, {dtype} {shape} needs {need}"
        )
    return begin, end


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Tensor name -> {dtype, shape, data_offsets}, after checking the file is whole and the header consistent."""

    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(
            f"{path}: corrupt or truncated safetensors file ({why}); save or copy it again"
        )

    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise corrupt(f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_HEADER):
                raise corrupt(f"header length {n} does not fit in {size} bytes")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise corrupt("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise corrupt("__metadata__ is not a map of strings")
    spans = sorted((*_check_entry(name, entry, corrupt), name) for name, entry in header.items())
    end = 0
    for begin, stop, name in spans:
        if begin != end:
            raise corrupt(f"tensor {name} starts at data byte {begin}, expected {end} (a gap or an overlap)")
        end = stop
    if 8 + n + end != size:
        raise corrupt(f"data should end at byte {8 + n + end}, the file has {size}")
    return header


class StreamingSafetensorsWriter:
    """Writes `specs` (name, dtype, shape) in order; `close()` returns the file's sha256."""

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> None:
        header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
        offset = 0
        self._order = []
        for name, dtype, shape in specs:
            n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + n],
            }
            self._order.append((name, dtype, tuple(shape)))
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned
        self._sha = hashlib.sha256()
        self._file = path.open("wb")
        self._put(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def _put(self, data: bytes) -> None:
        self._file.write(data)
        self._sha.update(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want, dtype, shape = self._order[self._next]
        if name != want or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"expected {want} {dtype} {list(shape)}, got {name} {tensor.dtype} {list(tensor.shape)}"
            )
        self._put(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        self._next += 1

    def discard(self) -> None:
        """Close the file after a failed write (the caller removes what was written)."""
        self._file.close()

    def close(self) -> str:
        self._file.close()
        if self._next != len(self._order):
            raise ValueError(f"only {self._next} of {len(self._order)} tensors were written")
        return self._sha.hexdigest()


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """All of `tensors` in one file; returns its sha256."""
    writer = StreamingSafetensorsWriter(path, [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()])
    try:
        for name, t in tensors.items():
            writer.write(name, t)
    except BaseException:
        writer.discard()
        raise
    return writer.close()
