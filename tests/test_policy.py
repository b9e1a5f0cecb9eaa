"""The policy between instances (CPU, trained zoo models): least slack first with a fairness bound, and the
same as load order without latency targets; admission control for requests that ask to be refused if late."""

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from test_server import Server

from moeshare.client import Client
from moeshare.engine.api import Submit
from moeshare.engine.engine import Engine, EngineConfig
from moeshare.engine.policy import LeastSlack
from moeshare.engine.request import LateRequest, SamplingParams, Targets

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


def test_a_request_that_asks_to_be_refused_if_late_is_refused_at_once_behind_a_long_queue(tiny_zoo):
    engine = Engine([tiny_zoo / "llama" / "kjv"], EngineConfig(max_batched_tokens=32))
    text = (tiny_zoo / "heldout" / "kjv.txt").read_text()
    for i in range(12):  # a long queue of long prompts
        engine.submit(Submit("kjv", text[i * 300 : i * 300 + 600], LONG))
    for _ in range(3):
        engine.step()  # the step time is measured
    estimate = engine.instance("kjv").ttft_estimate(8)
    assert estimate is not None and estimate > 0
    late = Targets(ttft=estimate / 10, refuse_if_late=True)
    with pytest.raises(
        LateRequest, match=r"^the work queued ahead of this request would take about .* s before"
    ):
        engine.submit(Submit("kjv", "And God said", LONG, targets=late))
    waiting = engine.stats().waiting
    engine.submit(Submit("kjv", "And God said", LONG, targets=Targets(ttft=estimate / 10)))  # not asked
    engine.submit(
        Submit("kjv", "And God said", LONG, targets=Targets(ttft=estimate * 10, refuse_if_late=True))
    )
    assert engine.stats().waiting == waiting + 2
    _drain(engine)


def test_the_server_refuses_a_late_request_with_resource_exhausted(tiny_zoo):
    server = Server(tiny_zoo / "llama" / "kjv", "--max-batched-tokens", "16")
    text = (tiny_zoo / "heldout" / "kjv.txt").read_text()
    try:
        with Client(server.address) as client, ThreadPoolExecutor(8) as pool:
            busy = [
                pool.submit(
                    client.complete, "kjv", text[i * 300 : i * 300 + 600], max_tokens=32, ignore_eos=True
                )
                for i in range(8)
            ]
            time.sleep(1.0)  # the queue forms and the step time is measured
            with pytest.raises(grpc.RpcError) as err:
                client.complete("kjv", "And God said", max_tokens=4, ttft_target=1e-6, refuse_if_late=True)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "above its TTFT target of 0.000 s: retry later or raise the target" in err.value.details()
            assert all(f.result().token_ids for f in busy)
    finally:
        server.stop()
