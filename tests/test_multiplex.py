"""Multiplex "streams": no instance waits for another's batch. A batch the device has not finished is read back by
a later step, which queues nothing for that instance until then; the tokens are those of serial stepping. On
CPU every batch is done at once (and there are no streams), so a device that is still busy is played by a
readiness check that says "not yet" every other time it is asked."""

import itertools

from moeshare.engine.api import Submit
from moeshare.engine.engine import Engine, EngineConfig
from moeshare.engine.request import SamplingParams
from moeshare.engine.runner import Launched

PARAMS = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
JOBS = [("kjv", "And God said"), ("python", "def f("), ("kjv", "In the beginning")]


def _run(engine: Engine) -> tuple[list[list[int]], int]:
    handles = [engine.submit(Submit(m, p, PARAMS)) for m, p in JOBS]
    tokens: dict[int, list[int]] = {h: [] for h in handles}
    steps = 0
    while engine.has_work():
        steps += 1
        for ev in engine.step():
            tokens[ev.seq_id] += [ev.token_id] if ev.token_id >= 0 else []
    return [tokens[h] for h in handles], steps


def test_streams_steps_give_the_tokens_of_serial_steps_whatever_the_device_has_finished(
    tiny_zoo, monkeypatch
):
    paths = [tiny_zoo / "llama" / "kjv", tiny_zoo / "qwen2" / "python"]
    serial, serial_steps = _run(Engine(paths, EngineConfig(multiplex="serial")))
    busy = itertools.cycle([False, True])  # the device: "not yet", then done
    monkeypatch.setattr(Launched, "ready", lambda self: next(busy))
    engine = Engine(paths, EngineConfig(multiplex="streams"))
    got, steps = _run(engine)
    assert got == serial and all(len(t) == 20 for t in got)
    assert steps > serial_steps  # steps that found a batch still running queued nothing for its model
    for m in ("kjv", "python"):
        i = engine.instance(m)
        assert i.launches == i.collected and i.pool.used_blocks == 0  # every batch read back, KV returned
