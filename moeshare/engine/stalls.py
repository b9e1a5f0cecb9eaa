"""Why a step was slow: an engine step that takes longer than SLOW_STEP_S is logged with each instance's share
of it and the Triton kernels compiled meanwhile (a kernel specialization the warm-up did not reach stalls every
running request while it compiles: the warm-up's list of shapes is what to extend then)."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("moeshare.engine")

SLOW_STEP_S = 0.25
_RUNTIME = re.compile(
    r"^(\*|[iu](1|8|16|32|64)$|fp(8|16|32|64)|bf16$|constexpr$)"
)  # not a compile-time value
_compiled: list[str] = []  # kernels compiled since the last look (the hook below appends)


def _signature(repr_: str) -> str:
    """`name[options](arg: type, ...)` -> name and the arguments that are compile-time values."""
    name, _, rest = repr_.partition("[")
    args = rest.partition("(")[2].rstrip(")")
    fixed = [
        a.strip() for a in args.split(",") if ":" in a and not _RUNTIME.match(a.split(":", 1)[1].strip())
    ]
    return f"{name}({', '.join(fixed)})"


def watch_compiles() -> None:
    """Count Triton's compiles of a kernel not yet in its in-memory cache (once per process; nothing where the
    installed Triton has no such hook)."""
    try:
        from triton import knobs
    except ImportError:
        return
    runtime = getattr(knobs, "runtime", None)
    before = getattr(runtime, "jit_cache_hook", None)
    if runtime is None or getattr(before, "moeshare", False):
        return

    def hook(*args, **kwargs):
        _compiled.append(_signature(str(kwargs.get("repr", "?"))))
        return before(*args, **kwargs) if before is not None else False

    hook.moeshare = True
    runtime.jit_cache_hook = hook


@contextmanager
def timed_step(parts: dict[str, float]) -> Iterator[None]:
    """Time one engine step; `parts` (name -> seconds, filled by the caller) say where it went."""
    start, seen = time.perf_counter(), len(_compiled)
    yield
    took = time.perf_counter() - start
    compiled = _compiled[seen:]
    del _compiled[:]
    if took < SLOW_STEP_S:
        return
    where = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in sorted(parts.items(), key=lambda x: -x[1])[:4])
    what = f"; compiled {len(compiled)} Triton kernel(s): {'; '.join(compiled[:6])}" if compiled else ""
    log.warning("engine: a step took %.0f ms (%s)%s", took * 1e3, where or "no instance stepped", what)
