"""The policy between instances (CPU, trained zoo models): least slack first with a fairness bound, and the
same as load order without latency targets."""

import time

import pytest

from moeshare.engine.api import Submit
from moeshare.engine.engine import Engine, EngineConfig
from moeshare.engine.policy import LeastSlack
from moeshare.engine.request import SamplingParams, Targets

LONG = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_zoo):
    return Engine([tiny_zoo / "llama" / "kjv", tiny_zoo / "qwen2" / "python"], EngineConfig(overlap=False))


def _who_ran(engine: Engine, steps: int) -> list[set[str]]:
    return [{ev.model for ev in engine.step()} for _ in range(steps)]


def _drain(engine: Engine) -> None:
    while engine.has_work():
        engine.step()


def test_without_targets_every_model_with_work_runs_every_step(engine):
    for model, prompt in (("kjv", "And God said"), ("python", "def f(")):
        engine.submit(Submit(model, prompt, LONG))
    assert _who_ran(engine, 10) == [{"kjv", "python"}] * 10
    _drain(engine)


def test_a_model_behind_its_targets_runs_alone_and_the_other_still_runs_every_fifth_step(engine):
    # kjv's requests want a token every microsecond: always behind, always urgent; python has no targets
    engine.submit(Submit("kjv", "And God said", LONG, targets=Targets(ttft=1e-6, tpot=1e-6)))
    engine.submit(Submit("python", "def f(", LONG))
    ran = _who_ran(engine, 20)
    assert all("kjv" in r for r in ran)  # the urgent model runs every step
    python_steps = [i for i, r in enumerate(ran) if "python" in r]
    assert python_steps == [4, 9, 14, 19]  # skipped four steps in a row at most: the fairness bound
    _drain(engine)


def test_the_least_slack_runs_first(engine):
    policy = LeastSlack()
    engine.submit(Submit("kjv", "And God said", LONG, targets=Targets(ttft=30.0)))
    engine.submit(Submit("python", "def f(", LONG, targets=Targets(ttft=1e-6)))
    time.sleep(0.01)
    kjv, python = (engine.instance(m) for m in ("kjv", "python"))
    assert python.slack(time.perf_counter()) < 0 < kjv.slack(time.perf_counter())
    assert policy.pick([kjv, python]) == [python]
    assert LeastSlack(urgent=60.0).pick([kjv, python]) == [python, kjv]  # both urgent: least slack first
    _drain(engine)
