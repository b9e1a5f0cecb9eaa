"""What an eval run scores (methods, budgets, lengths) and what it judges (a Subject): plain data, cheap to
import so the command line can build its parser without loading torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BUDGETS = (1.0, 0.75, 0.5, 0.375, 0.25)
SIMILARITIES = ("weight", "output")
MERGES = ("average", "frequency", "medoid", "fit")
BASELINES = ("same-index-pick", "average", "ties", "base")


@dataclass
class EvalConfig:
    budgets: tuple[float, ...] = BUDGETS
    similarities: tuple[str, ...] = SIMILARITIES
    merges: tuple[str, ...] = MERGES
    baselines: tuple[str, ...] = BASELINES
    seq_len: int = 128
    max_tokens: int = 8192  # held-out tokens scored per domain
    prompts: int = 32
    continuation: int = 64
    check_budget: float = 0.5  # Mixtral stores at this budget are also scored with transformers
    device: str = "cpu"


@dataclass
class Subject:
    """The variants to judge, their held-out text, and what the baselines need."""

    arch: str
    variants: dict[str, Path]
    heldout: dict[str, dict[str, str]]  # variant -> domain -> text
    base: Path | None = None
    calib: Path | None = None  # calibration text: output similarity and frequency merge need it
    label: str = ""
