"""Several engines on Ray (issue 20): placement as a pure function, and real local Ray clusters of two CPU engine
actors serving a Mixtral store and two dense zoo models, through a real gRPC server and in-process."""

import asyncio
import time

import pytest

from moeshare.cluster.placement import Demand, PlacementError, moves, place
from moeshare.engine.api import EngineUnavailable
from moeshare.engine.engine import Engine, EngineConfig
from moeshare.engine.request import SamplingParams, Targets
from moeshare.server.messages import ListModels, Load, TakeSnapshot
from moeshare.server.worker import request_events

GIB = 2**30
VARIANTS = ["kjv", "fortunes-en", "fortunes-de", "python"]
PROMPTS = {"kjv": "And God said", "fortunes-en": "A man", "fortunes-de": "Wer", "python": "def main"}
DENSE = {"llama-kjv": ("llama", "kjv"), "qwen-py": ("qwen2", "python")}
RAY_START_S = 400  # a server's wait for its Ray cluster and engines: minutes on 2 busy cores


# ---- placement -----------------------------------------------------------------------------------------------


def test_heaviest_first_onto_the_least_loaded_gpu_and_never_over_memory():
    models = [Demand("a", 30 * GIB, 1.0), Demand("b", 30 * GIB, 5.0), Demand("c", 10 * GIB, 3.0)]
    plan = place(models, [40 * GIB, 40 * GIB])
    assert plan.replicas == {"b": (0,), "c": (1,), "a": (1,)}  # b first; c beside nothing; a where room is
    assert all(u <= 40 * GIB for u in plan.used_bytes) and plan.load == (5.0, 4.0)
    assert plan.decisions[0].startswith("b (30.0 GiB, load 5) -> GPU 0")
    with pytest.raises(PlacementError, match=r"^d needs 35.0 GiB and no GPU has that much left \(GPU 0 10.0"):
        place([*models, Demand("d", 35 * GIB)], [40 * GIB, 40 * GIB])


def test_a_hot_model_gets_replicas_and_a_re_plan_keeps_what_barely_moved():
    plan = place([Demand("hot", 10 * GIB, 9.0), Demand("cold", 10 * GIB, 1.0)], [40 * GIB] * 3, capacity=4.0)
    assert plan.replicas["hot"] == (0, 1, 2) and len(plan.replicas["cold"]) == 1  # ceil(9 / 4) replicas
    # sticky: a model stays where it is unless moving gains more than a quarter of its load
    now = {"x": (1,), "y": (0,)}
    same = place([Demand("x", GIB, 1.0), Demand("y", GIB, 1.0)], [4 * GIB] * 2, current=now)
    assert moves(now, same) == ([], [])
    later = place([Demand("x", GIB, 1.0), Demand("y", GIB, 1.0)], [4 * GIB] * 2, current=now, alive=[0])
    assert later.replicas == {"x": (0,), "y": (0,)} and moves(now, later) == ([("x", 0)], [("x", 1)])
    idle = place([Demand("x", GIB, 0.0), Demand("y", 3 * GIB, 0.0)], [4 * GIB] * 2, current=now)
    assert moves(now, idle) == ([], [])  # no load: nothing moves to even out memory
    with pytest.raises(PlacementError, match="no GPU is left"):
        place([Demand("x", GIB)], [GIB], alive=[])


def test_stats_of_replicas_merge_into_one_model():
    from moeshare.cluster.front import merge_stats
    from moeshare.engine.api import EngineStats, ModelLoad, StepTotals

    a = EngineStats(
        5, 1, 2, 3, 4, ["v0", "v1"], 1, 0.5, 0, 0, [ModelLoad("v0", 1, 1, StepTotals(2, 0.1, 0.05))]
    )
    b = EngineStats(
        7,
        0,
        1,
        1,
        1,
        ["v0"],
        0,
        0.0,
        1,
        0,
        [ModelLoad("v0", 2, 0, StepTotals(3, 0.2, 0.1)), ModelLoad("d0", 0, 0)],
    )
    m = merge_stats([a, b])
    assert (m.steps, m.running, m.kv_blocks_used, m.preemptions, m.pages) == (12, 1, 4, 1, None)
    assert m.resident_variants == ["v0", "v1"] and [x.name for x in m.models] == ["v0", "d0"]
    assert (m.models[0].waiting, m.models[0].decode_steps.steps) == (3, 5)


# ---- real Ray clusters -----------------------------------------------------------------------------------------


async def _tokens(worker, model: str, max_tokens: int = 16) -> list[int]:
    """A greedy request through the front end's request path (as the gRPC and HTTP servers make it)."""
    prompt = PROMPTS[DENSE[model][1]] if model in DENSE else PROMPTS[model]
    p = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=max_tokens > 16)
    return [
        ev.token_id async for ev in request_events(worker, model, prompt, p, "r", Targets) if ev.token_id >= 0
    ]


@pytest.fixture(scope="module")
def store(tiny_zoo, tmp_path_factory):
    from moeshare.consolidate import Options, consolidate

    out = tmp_path_factory.mktemp("cluster") / "mixtral"
    consolidate([tiny_zoo / "mixtral" / v for v in VARIANTS], out, Options(budget="0.5"))
    return out


@pytest.fixture(scope="module")
def alone(store, tiny_zoo):
    """Each model's greedy tokens from one in-process engine (what the single-process server serves)."""
    params = SamplingParams(max_tokens=16, temperature=0)
    out = {v: Engine([store]).generate(v, PROMPTS[v], params)[1] for v in VARIANTS}
    for name, (arch, v) in DENSE.items():
        out[name] = Engine([tiny_zoo / arch / v]).generate(v, PROMPTS[v], params)[1]
    return out


def test_a_server_on_two_engines_serves_every_model_as_one_engine_does(store, tiny_zoo, alone):
    from test_server import Server

    from moeshare.client import Client

    dense = [f"{name}={tiny_zoo / arch / v}" for name, (arch, v) in DENSE.items()]
    s = Server(store, *dense, "--gpus", "2", "--device", "cpu", wait=RAY_START_S)
    try:
        with Client(s.address) as client:
            assert {m.name for m in client.list_models()} == set(VARIANTS) | set(DENSE)
            stats = client.stats()  # where each model is, and why
            assert {m.name: len(m.engines) for m in stats.models} == dict.fromkeys([*VARIANTS, *DENSE], 1)
            assert {m.engines[0] for m in stats.models} == {0, 1} and len(stats.placement) == 3
            for model, tokens in alone.items():
                prompt = PROMPTS[DENSE[model][1]] if model in DENSE else PROMPTS[model]
                out = client.complete(model, prompt, max_tokens=16, temperature=0.0)
                assert out.token_ids == tokens, model
            # a stream cancelled after its first tokens frees its KV on the engine that held it
            call = client.generate_stream(
                "kjv", PROMPTS["kjv"], max_tokens=200, temperature=0.0, ignore_eos=True
            )
            next(call), next(call)
            call.cancel()
            deadline = time.monotonic() + 20
            while client.stats().kv_blocks_used and time.monotonic() < deadline:
                time.sleep(0.1)
            assert client.stats().kv_blocks_used == 0
        placed = [line for line in s.errors if "placement:" in line]
        assert len(placed) == 3 and {line.split("-> GPU ")[-1] for line in placed} == {"0", "1"}, placed
    finally:
        s.stop()


def test_re_placement_drains_and_a_dead_engine_fails_its_requests_as_unavailable(store, tiny_zoo, alone):
    import ray  # a dev dependency: moeshare[ray]

    from moeshare.cluster.front import ClusterWorker

    # 1 GiB per engine: room for every zoo model, not for a Llama-3-8B-size one
    worker = ClusterWorker(EngineConfig(device="cpu", memory_limit_bytes=GIB), 2)

    async def tokens(model: str, max_tokens: int = 16) -> list[int]:
        return await _tokens(worker, model, max_tokens)

    async def run() -> None:
        dense = tuple(f"{n}={tiny_zoo / a / v}" for n, (a, v) in DENSE.items())
        names = await asyncio.wrap_future(worker.ask(Load((str(store), *dense), ())))
        assert set(names) == set(VARIANTS) | set(DENSE)
        where = worker.placement()
        assert {g for gs in where.values() for g in gs} == {0, 1}
        assert {m.name for m in await asyncio.wrap_future(worker.ask(ListModels()))} == set(names)
        with pytest.raises(
            PlacementError, match=r"^big:kind=llama,layers=32 needs \d+\.\d GiB and no GPU has that much left"
        ):
            await asyncio.wrap_future(worker.ask(Load((), ("big:kind=llama,layers=32",))))
        assert worker.placement() == where  # nothing changed
        for model in alone:
            assert await tokens(model) == alone[model], model
        # qwen-py turns hot: a re-plan keeps it where it is and moves llama-kjv to the store's engine, while a
        # llama-kjv request runs on the old one to its last token (drained, then unloaded)
        for _ in range(8):
            await tokens("qwen-py")
        running = asyncio.ensure_future(tokens("llama-kjv", 300))
        await asyncio.sleep(0.3)
        assert await asyncio.to_thread(worker.replan) == ["llama-kjv: +GPU 0", "llama-kjv: -GPU 1"]
        assert running.done() and len(running.result()) == 300
        assert worker.placement()["llama-kjv"] == [0] and worker.placement()["qwen-py"] == [1]
        assert await tokens("llama-kjv") == alone["llama-kjv"]
        victim = where["kjv"][0]
        long = asyncio.ensure_future(tokens("kjv", 400))
        await asyncio.sleep(0.5)
        ray.kill(worker._actors[victim])
        with pytest.raises(EngineUnavailable, match=f"the engine on GPU {victim} went away"):
            await long
        deadline = time.monotonic() + 60
        moved = {m: [1 - victim] for m in where}
        while worker.placement() != moved and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert worker.placement() == moved
        for model in alone:  # every model from the engine left, with the same tokens
            assert await tokens(model) == alone[model], model
        snap = await asyncio.wrap_future(worker.ask(TakeSnapshot()))
        assert snap.engine.kv_blocks_used == 0 and any("went away" in d for d in worker.decisions)

    worker.start()
    try:
        asyncio.run(run())
    finally:
        worker.stop()


def test_an_engine_that_dies_idle_is_noticed_by_the_next_listing_and_its_model_moves(tiny_zoo, alone):
    import ray

    from moeshare.cluster.front import ClusterWorker

    worker = ClusterWorker(EngineConfig(device="cpu"), 2)

    async def run() -> None:
        dense = tuple(f"{n}={tiny_zoo / a / v}" for n, (a, v) in DENSE.items())
        await asyncio.wrap_future(worker.ask(Load(dense, ())))
        where = worker.placement()
        assert sorted(g for gs in where.values() for g in gs) == [0, 1]  # one model each
        victim = where["qwen-py"][0]
        ray.kill(worker._actors[victim])  # nothing in flight on it
        await asyncio.sleep(1.0)
        listed = {m.name for m in await asyncio.wrap_future(worker.ask(ListModels()))}  # no error
        assert "llama-kjv" in listed and any(
            f"GPU {victim}'s engine went away" in d for d in worker.decisions
        )
        deadline = time.monotonic() + 60
        while worker.placement()["qwen-py"] != [1 - victim] and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert worker.placement() == {"llama-kjv": [1 - victim], "qwen-py": [1 - victim]}
        assert await _tokens(worker, "qwen-py") == alone["qwen-py"]

    worker.start()
    try:
        asyncio.run(run())
    finally:
        worker.stop()


def test_each_engine_may_have_a_page_pool_of_its_own(tiny_zoo, alone):
    """--gpus with --pool: every engine makes its own pool of device pages, where its models' weights and KV
    live (as on one GPU); each model serves its tokens and its KV pages go back when its request ends."""
    from test_server import Server

    from moeshare.client import Client

    dense = [f"{name}={tiny_zoo / arch / v}" for name, (arch, v) in DENSE.items()]
    s = Server(*dense, "--gpus", "2", "--device", "cpu", "--pool", "0.05", wait=RAY_START_S)
    try:
        with Client(s.address) as client:
            for model, (_, v) in DENSE.items():
                out = client.complete(model, PROMPTS[v], max_tokens=16, temperature=0.0)
                assert out.token_ids == alone[model], model
            stats = client.stats()  # both engines' pools as one: 25 pages of 2 MiB each
            assert stats.kv_pages.total == 2 * 25 and set(stats.kv_pages.in_use) == {
                f"{m}{part}" for m in DENSE for part in ("", " weights")
            }
            assert all(
                n == 1 for k, n in stats.kv_pages.in_use.items() if k in DENSE
            )  # its scratch page only
            assert sorted(m.engines[0] for m in stats.models) == [0, 1]
    finally:
        s.stop()
