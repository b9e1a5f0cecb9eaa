"""Weights in the page pool: evicted (to host memory, or dropped and read again from the checkpoint) and
activated at the same addresses, by hand, when idle too long, and when another model needs the pages. On CPU
an unmapped page is filled with NaN bytes, so weights that did not come back would show in the tokens."""

import shutil
import threading

import pytest
import torch
from test_kv_pages import BIG_PAGE, weights_pages

from moeshare.consolidate.pipeline import Options, consolidate
from moeshare.engine.api import Submit
from moeshare.engine.engine import Engine, EngineConfig
from moeshare.engine.request import RequestTooLarge, SamplingParams
from moeshare.errors import MoeshareError

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


def _tokens(engine: Engine, model: str, prompt: str) -> list[int]:
    return engine.generate(model, prompt, GREEDY)[1]


@pytest.fixture(scope="module")
def paths(tiny_zoo, tmp_path_factory):
    store = tmp_path_factory.mktemp("evict") / "mixtral"
    consolidate([tiny_zoo / "mixtral" / v for v in ("kjv", "python")], store, Options(budget="1.0"))
    return {"kjv": tiny_zoo / "llama" / "kjv", "python": tiny_zoo / "qwen2" / "python", "store": store}


@pytest.fixture(scope="module")
def alone(paths):
    return {
        "kjv": _tokens(Engine([paths["kjv"]]), "kjv", "And God said"),
        "python": _tokens(Engine([paths["python"]]), "python", "def f("),
    }


def _pool(*pages: int) -> EngineConfig:
    return EngineConfig(pool_bytes=sum(pages) * BIG_PAGE, pool_page_bytes=BIG_PAGE)


@pytest.mark.parametrize("to", ["host", "disk"])
def test_an_evicted_model_gives_its_pages_back_and_its_next_request_brings_it_back_with_the_same_tokens(
    paths, alone, to
):
    w = weights_pages(paths["kjv"], BIG_PAGE)
    engine = Engine([paths["kjv"]], EngineConfig(**vars(_pool(w, 16)) | {"evict_to": to}))
    assert _tokens(engine, "kjv", "And God said") == alone["kjv"]
    engine.evict("kjv")
    assert engine.stats().pages.mapped["kjv weights"] == 0 and not engine.models()[0].resident
    weights = engine.instance("kjv").weights
    assert (weights.host is not None) == (to == "host")
    engine.pages.reap()  # given-back pages stay mapped until someone needs them: unmap them now
    assert torch.isnan(engine.instance("kjv").model.w["embed"]).all()  # the pages are gone (NaN on CPU)
    assert _tokens(engine, "kjv", "And God said") == alone["kjv"]
    assert engine.stats().pages.mapped["kjv weights"] == w and engine.models()[0].resident
    assert weights.evictions == weights.activations == 1


def test_a_store_goes_to_host_memory_even_when_told_disk_and_comes_back_whole(paths):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    engine = Engine(
        [paths["store"]], EngineConfig(pool_bytes=1 << 26, pool_page_bytes=BIG_PAGE, evict_to="disk")
    )
    before = {m: engine.generate(m, "In the", params)[1] for m in ("kjv", "python")}
    engine.evict("kjv")  # the whole instance: both variants and the bank
    engine.pages.reap()
    assert engine.instance("python").weights.host is not None
    assert [m.resident for m in engine.models()] == [False, False]
    assert {m: engine.generate(m, "In the", params)[1] for m in ("kjv", "python")} == before


def test_two_models_that_do_not_fit_together_take_turns_and_keep_their_tokens(paths, alone):
    wk, wp = weights_pages(paths["kjv"], BIG_PAGE), weights_pages(paths["python"], BIG_PAGE)
    engine = Engine([paths["kjv"], paths["python"]], _pool(max(wk, wp), 24))
    # loading python evicted kjv (idle) to make room for its weights
    assert [m.resident for m in engine.models()] == [False, True]
    for _ in range(2):
        assert _tokens(engine, "kjv", "And God said") == alone["kjv"]
        assert _tokens(engine, "python", "def f(") == alone["python"]
    stats = engine.stats().pages
    assert engine.instance("kjv").weights.activations == 2 and stats.total_pages == max(wk, wp) + 24


def test_requests_for_a_model_that_is_not_on_the_device_wait_while_the_other_model_runs(paths, alone):
    wk, wp = weights_pages(paths["kjv"], BIG_PAGE), weights_pages(paths["python"], BIG_PAGE)
    engine = Engine([paths["kjv"], paths["python"]], _pool(max(wk, wp), 24))
    ids = {m: engine.submit(Submit(m, p, GREEDY)) for m, p in (("python", "def f("), ("kjv", "And God said"))}
    got: dict[int, list[int]] = {i: [] for i in ids.values()}
    while engine.has_work():
        for ev in engine.step():
            got[ev.seq_id] += [ev.token_id] if ev.token_id >= 0 else []
    # python ran first (on the device); kjv waited for it to go idle, then took its pages
    assert {m: got[i] for m, i in ids.items()} == alone
    assert [m.resident for m in engine.models()] == [True, False]


def test_a_model_idle_longer_than_evict_after_leaves_on_the_next_maintain(paths, alone):
    w = weights_pages(paths["kjv"], BIG_PAGE)
    engine = Engine([paths["kjv"]], EngineConfig(**vars(_pool(w, 16)) | {"evict_after": 0.0}))
    assert _tokens(engine, "kjv", "And God said") == alone["kjv"]
    engine.maintain()
    assert not engine.models()[0].resident and engine.stats().pages.mapped["kjv weights"] == 0
    assert _tokens(engine, "kjv", "And God said") == alone["kjv"]


def test_bad_eviction_settings_and_a_model_larger_than_the_pool_are_one_line_and_load_nothing(paths):
    with pytest.raises(MoeshareError, match=r"^evict_after needs the page pool"):
        Engine([paths["kjv"]], EngineConfig(evict_after=5.0))
    with pytest.raises(MoeshareError, match=r"^evict_to must be auto, host or disk, got 'tape'$"):
        Engine([paths["kjv"]], EngineConfig(pool_bytes=1 << 26, evict_to="tape"))
    w = weights_pages(paths["kjv"], BIG_PAGE)
    engine = Engine([], _pool(w - 1))
    with pytest.raises(
        MoeshareError, match=r"kjv: its weights .* exceed the pool's .*could never be on the dev"
    ):
        engine.load(paths["kjv"])
    assert (
        engine.models() == []
        and engine.stats().pages.mapped == {}
        and engine.stats().pages.free_pages == w - 1
    )
    fixed = Engine([paths["kjv"]])
    with pytest.raises(
        MoeshareError, match=r"^kjv: its weights are not in the page pool \(serve with --pool\)$"
    ):
        fixed.evict("kjv")
    busy = Engine([paths["kjv"]], _pool(w, 16))
    busy.submit(Submit("kjv", "And God said", GREEDY))
    with pytest.raises(
        MoeshareError, match=r"^kjv: it has requests in the engine; evict it once they are done$"
    ):
        busy.evict("kjv")
    assert busy.models()[0].resident


def test_a_model_read_again_from_disk_comes_back_on_a_thread_while_the_other_model_runs(paths, alone):
    wk, wp = weights_pages(paths["kjv"], BIG_PAGE), weights_pages(paths["python"], BIG_PAGE)
    engine = Engine(
        [paths["kjv"], paths["python"]], EngineConfig(**vars(_pool(wk, wp, 24)) | {"evict_to": "disk"})
    )
    engine.evict("kjv")
    source = engine.instance("kjv").source
    gate, read = threading.Event(), source.tensor

    def slow_read(*args):
        gate.wait(timeout=30)
        return read(*args)

    source.tensor = slow_read  # the checkpoint is slow to read: kjv's weights take a while to come back
    kjv = engine.submit(Submit("kjv", "And God said", GREEDY))
    python = engine.submit(Submit("python", "def f(", GREEDY))
    got: dict[int, list[int]] = {kjv: [], python: []}
    done = False
    while not done:  # python runs to its end while kjv waits for its weights
        for ev in engine.step():
            got[ev.seq_id] += [ev.token_id] if ev.token_id >= 0 else []
            done = done or (ev.seq_id == python and ev.finished)
    assert got[python] == alone["python"] and got[kjv] == []
    gate.set()
    while engine.has_work():
        for ev in engine.step():
            got[ev.seq_id] += [ev.token_id] if ev.token_id >= 0 else []
    assert got[kjv] == alone["kjv"]


def test_weights_that_cannot_be_read_again_end_the_waiting_requests_in_one_line_and_a_later_one_retries(
    paths, alone, tmp_path
):
    ckpt = shutil.copytree(paths["kjv"], tmp_path / "kjv")
    w = weights_pages(ckpt, BIG_PAGE)
    engine = Engine([ckpt], EngineConfig(**vars(_pool(w, 16)) | {"evict_to": "disk"}))
    engine.evict("kjv")
    shard = next(ckpt.glob("*.safetensors"))
    good = shard.read_bytes()
    shard.write_bytes(good[:100])  # the checkpoint went bad while the model was off the device
    ended = [ev for ev in _events(engine, "kjv", "And God said") if ev.finished]
    assert len(ended) == 1 and ended[0].finish_reason.value == "error"
    assert ended[0].error.startswith("kjv: its weights could not be read again from its checkpoint (")
    assert "\n" not in ended[0].error and engine.stats().pages.mapped["kjv weights"] == 0
    shard.write_bytes(good)
    assert _tokens(engine, "kjv", "And God said") == alone["kjv"]


def _events(engine: Engine, model: str, prompt: str) -> list:
    engine.submit(Submit(model, prompt, GREEDY))
    out = []
    while engine.has_work():
        out += engine.step()
    return out


def test_a_model_kept_busy_does_not_keep_an_evicted_one_off_the_device_for_good(paths, alone):
    wk, wp = weights_pages(paths["kjv"], BIG_PAGE), weights_pages(paths["python"], BIG_PAGE)
    cfg = EngineConfig(**vars(_pool(max(wk, wp), 24)) | {"activation_wait": 0.0})
    engine = Engine([paths["kjv"], paths["python"]], cfg)  # python on the device, kjv evicted
    live = {engine.submit(Submit("python", "def f(", GREEDY))}
    kjv = engine.submit(Submit("kjv", "And God said", GREEDY))
    got: list[int] = []
    for _ in range(2000):  # python always has a request in flight, and new ones keep coming
        if len(live) < 2:
            live.add(engine.submit(Submit("python", "def f(", GREEDY)))
        for ev in engine.step():
            if ev.seq_id == kjv:
                got += [ev.token_id] if ev.token_id >= 0 else []
            elif ev.finished:
                live.discard(ev.seq_id)
        if len(got) == len(alone["kjv"]):
            break
    assert got == alone["kjv"]  # python stopped taking new requests until kjv could come back


def _cfg(pages: int, **kw) -> EngineConfig:
    return EngineConfig(pool_bytes=pages * BIG_PAGE, pool_page_bytes=BIG_PAGE, **kw)


def test_teacher_forced_logits_of_an_evicted_model_bring_it_back_first(paths):
    w = weights_pages(paths["kjv"], BIG_PAGE)
    engine = Engine([paths["kjv"]], _cfg(w + 16))
    ids = engine.tokenizer("kjv")("And God said", add_special_tokens=False)["input_ids"]
    before = engine.teacher_forced("kjv", ids)
    engine.evict("kjv")
    engine.pages.reap()
    assert torch.equal(engine.teacher_forced("kjv", ids), before) and engine.models()[0].resident


def test_an_activation_the_pool_refuses_after_all_waits_instead_of_failing_the_step(paths):
    w = weights_pages(paths["kjv"], BIG_PAGE)
    engine = Engine([paths["kjv"]], _cfg(w + 1 + 16))
    engine.evict("kjv")  # its pages given back, still mapped
    engine.set_kv_limits("kjv", least_bytes=18 * BIG_PAGE)  # its KV minimum leaves its weights no room
    engine.submit(Submit("kjv", "And God said", SamplingParams(max_tokens=4)))
    events = [ev for _ in range(3) for ev in engine.step()]  # no exception out of the step
    (ended,) = [ev for ev in events if ev.finished]
    assert ended.finish_reason.value == "error" and "lower --kv-min or grow --pool" in ended.error
    assert engine.stats().pages.mapped["kjv weights"] == 0


def test_a_model_that_could_never_come_back_ends_its_requests_and_drains_nobody(paths):
    wk, wp = weights_pages(paths["kjv"], BIG_PAGE), weights_pages(paths["python"], BIG_PAGE)
    engine = Engine([paths["kjv"], paths["python"]], _cfg(wk + wp + 2 + 20, activation_wait=0.0))
    engine.evict("kjv")
    engine.pages.reap()
    kjv = engine.submit(Submit("kjv", "And God said", GREEDY))  # taken: kjv could come back then
    engine.set_kv_limits("python", least_bytes=46 * BIG_PAGE)  # leaves kjv's weights no room, ever
    with pytest.raises(RequestTooLarge, match="leave kjv's KV no page of the pool: lower --kv-min"):
        engine.submit(Submit("kjv", "And God said", GREEDY))  # refused at once from now on
    first = engine.submit(Submit("python", "def f(", GREEDY))
    ended: dict[int, object] = {}
    for i in range(200):
        if i == 5:
            second = engine.submit(Submit("python", "def g(", GREEDY))
        ended |= {ev.seq_id: ev for ev in engine.step() if ev.finished}
        if len(ended) == 3:
            break
    assert ended[kjv].finish_reason.value == "error" and "its weights need" in ended[kjv].error
    assert ended[first].finish_reason.value == ended[second].finish_reason.value == "length"


def test_unloading_a_model_whose_weights_are_being_read_again_waits_for_the_reading(paths):
    w = weights_pages(paths["kjv"], BIG_PAGE)
    engine = Engine([paths["kjv"]], _cfg(w + 16, evict_to="disk"))
    engine.evict("kjv")
    instance = engine.instance("kjv")
    gate, read = threading.Event(), instance.source.tensor

    def slow(*args):
        gate.wait(timeout=30)
        return read(*args)

    instance.source.tensor = slow
    engine.submit(Submit("kjv", "And God said", GREEDY))
    engine.step()  # the reading thread starts
    loading = instance.weights.ready
    threading.Timer(0.2, gate.set).start()
    engine.unload("kjv")
    assert not loading.thread.is_alive()


def test_weights_in_chunks_of_several_pages_leave_and_come_back_whole(paths, alone, monkeypatch):
    import moeshare.memory.weights as weights

    monkeypatch.setattr(weights, "CHUNK", 2)  # the tiny model's 27 pages are at least 8 chunks of 2
    w = weights_pages(paths["kjv"], BIG_PAGE)
    engine = Engine([paths["kjv"]], _pool(w + 1, 16))
    arena = engine.instance("kjv").weights
    assert arena.region.chunk == 2 and arena.npages % 2 == 0 and arena.npages >= w
    assert _tokens(engine, "kjv", "And God said") == alone["kjv"]
    engine.evict("kjv")
    engine.pages.reap()
    assert torch.isnan(engine.instance("kjv").model.w["embed"]).all()
    assert engine.stats().pages.mapped["kjv weights"] == 0
    assert _tokens(engine, "kjv", "And God said") == alone["kjv"]
    assert engine.stats().pages.mapped["kjv weights"] == arena.npages


def _too_long_for_the_free_pages(paths) -> tuple[Engine, list[int], list[int]]:
    """kjv and python on a pool with 4 pages free beside both, a 600-token kjv prompt that needs more (but fits
    once python's weights leave), and its tokens alone."""
    wk, wp = weights_pages(paths["kjv"], BIG_PAGE), weights_pages(paths["python"], BIG_PAGE)
    engine = Engine([paths["kjv"], paths["python"]], _pool(wk, wp, 6))
    prompt = torch.randint(10, 200, (600,), generator=torch.Generator().manual_seed(3)).tolist()
    kv = engine.instance("kjv").pool
    assert kv.blocks_for(600 + 16) > 2 * 4 and kv.blocks_for(600 + 16) <= kv.capacity  # python's room counts
    return engine, prompt, Engine([paths["kjv"]]).generate("kjv", prompt, GREEDY)[1]


def test_a_request_that_fits_only_once_an_idle_model_leaves_is_taken_and_runs_with_its_own_tokens(
    paths, alone
):
    engine, prompt, want = _too_long_for_the_free_pages(paths)
    assert engine.generate("kjv", prompt, GREEDY)[1] == want
    assert [m.resident for m in engine.models()] == [True, False]  # python left for it
    assert _tokens(engine, "python", "def f(") == alone["python"]  # and comes back once kjv is idle
    assert engine.stats().kv_blocks_used == 0


def test_a_request_that_fits_only_once_a_busy_model_leaves_drains_it_and_both_keep_their_tokens(paths, alone):
    engine, prompt, want = _too_long_for_the_free_pages(paths)
    python = [engine.submit(Submit("python", "def f(", GREEDY))]
    engine.step()  # python runs: it cannot leave until its request is done
    long = engine.submit(Submit("kjv", prompt, GREEDY))
    out: dict[int, list[int]] = {long: [], python[0]: []}
    for _ in range(300):
        for ev in engine.step():
            out[ev.seq_id] += [ev.token_id] if ev.token_id >= 0 else []
            if ev.finished and ev.seq_id != long and not out[long]:  # python never runs out of requests
                python.append(engine.submit(Submit("python", "def f(", GREEDY)))
                out[python[-1]] = []
        if not engine.has_work():
            break
    assert out[long] == want  # python stopped taking requests, finished its running one and left
    assert all(out[p] == alone["python"] for p in python) and len(python) >= 2  # and came back after
    assert engine.instance("python").weights.evictions >= 1 and engine.stats().kv_blocks_used == 0
