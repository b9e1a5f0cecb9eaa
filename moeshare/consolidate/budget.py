"""`--budget`: a fraction of the unconsolidated expert memory (0.5) or a size in bytes (40GiB, 512MB)."""

from __future__ import annotations

import re

from moeshare.errors import MoeshareError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_budget(text: str, experts_before: int) -> float:
    """The bank size in bytes that `text` allows."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[-+]?\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m[2].lower() not in _UNITS:
        raise MoeshareError(
            f"--budget {text!r}: give a fraction of expert memory (0.5) or a size (40GiB, 512MB)"
        )
    value, unit = float(m[1]), m[2].lower()
    if unit == "" and "." in m[1] or unit == "" and value <= 1:
        if not 0 < value <= 1:
            raise MoeshareError(f"--budget {text}: a fraction must be in (0, 1]; 1.0 merges nothing")
        return value * experts_before
    size = value * _UNITS[unit]
    if size > experts_before:
        raise MoeshareError(
            f"--budget {text} is above the unconsolidated experts ({experts_before} bytes): "
            f"use at most that, or --budget 1.0 to merge nothing"
        )
    return size
