"""`python scripts/build_zoo.py`: build (or reuse) a zoo and print its perplexity report."""

from __future__ import annotations

import argparse
import sys

from moeshare.zoo.build import build_zoo, load_zoo
from moeshare.zoo.recipes import ARCHS, RECIPES
from moeshare.zoo.report import format_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="build_zoo",
        description="Train the zoo of small MoE and dense models (base + one variant per domain).",
    )
    parser.add_argument("--size", choices=sorted(RECIPES), default="tiny")
    parser.add_argument("--arch", choices=[*ARCHS, "all"], default="all")
    parser.add_argument("--out", default=None, help="zoo directory (default: $MOESHARE_ZOO_DIR/<size>)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--force", action="store_true", help="rebuild even if a matching zoo is cached")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_zoo(
        size=args.size, arch=args.arch, out=args.out, device=args.device, force=args.force, seed=args.seed
    )
    print(f"zoo: {path}")
    print(format_report(load_zoo(path)), end="")
    sys.stdout.flush()
    return 0
