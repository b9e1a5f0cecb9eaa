"""`make demo`: the main job end to end on whatever device is here.

Builds (or reuses) the tiny zoo, then consolidates its Mixtral and Switch variants into stores at half the
expert memory and prints each consolidation report.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from moeshare.consolidate import Options, consolidate, format_report, summarize
from moeshare.zoo import build_zoo, load_zoo
from moeshare.zoo import format_report as zoo_report

VARIANTS = ["kjv", "fortunes-en", "fortunes-de", "python"]
OUT = Path("build/demo")


def main() -> int:
    t0 = time.perf_counter()
    zoo = build_zoo("tiny", "all")
    print(zoo_report(load_zoo(zoo)))
    for arch in ("mixtral", "switch"):
        store = OUT / f"{arch}-store"
        print(f"\n== moeshare consolidate {arch} variants --budget 0.5 -> {store}", flush=True)
        manifest = consolidate([zoo / arch / v for v in VARIANTS], store, Options(budget="0.5", force=True))
        print(format_report(summarize(manifest)))
    print(f"\ndemo finished in {time.perf_counter() - t0:.1f} s; stores in {OUT}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
