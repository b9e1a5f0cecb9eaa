"""A slow engine step is logged with where its time went and the Triton kernels compiled meanwhile."""

import logging
import time

from moeshare.engine import stalls


def test_a_slow_step_names_its_instances_and_the_kernels_compiled_in_it(caplog, monkeypatch):
    monkeypatch.setattr(stalls, "SLOW_STEP_S", 0.05)
    knobs = __import__("triton").knobs
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", None)
    stalls.watch_compiles()
    stalls.watch_compiles()  # once per process: a second call does not wrap the hook again
    hook = knobs.runtime.jit_cache_hook
    assert hook.moeshare and not getattr(hook, "__wrapped__", None)
    with caplog.at_level(logging.WARNING, logger="moeshare.engine"):
        with stalls.timed_step({"fast": 0.001}):
            pass  # quick: nothing logged, and what compiled is forgotten with it
        parts: dict[str, float] = {}
        with stalls.timed_step(parts):
            assert hook(repr="_k[num_warps=4](x: *bf16, n: i32, BLOCK: 64, CAUSAL: True)") is False
            time.sleep(0.06)
            parts |= {"d0": 0.06, "memory": 0.0}
    [record] = caplog.records
    said = record.getMessage()
    assert said.startswith("engine: a step took ") and "d0 60 ms" in said
    assert "compiled 1 Triton kernel(s): _k(BLOCK: 64, CAUSAL: True)" in said
