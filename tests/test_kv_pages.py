"""The elastic KV pool on its own (CPU backend: the same manager, ordinary memory) and in the engine."""

import pytest
import torch

from moeshare.engine.api import Submit
from moeshare.engine.engine import Engine, EngineConfig
from moeshare.engine.request import RequestTooLarge, SamplingParams
from moeshare.errors import MoeshareError
from moeshare.memory.blocks import OutOfBlocks
from moeshare.memory.elastic import ElasticBlockPool, block_stride
from moeshare.memory.pages import HostBackend, PageManager

PAGE = 4096
BIG_PAGE = 1 << 14  # two blocks of the tiny zoo models


def _pool(pages: PageManager, owner: str, blocks: int = 30, head_dim: int = 16) -> ElasticBlockPool:
    # one block: K and V of 1 layer, 4 tokens, 1 head of head_dim floats (512 bytes at 16: 8 blocks a page)
    return ElasticBlockPool(pages, owner, blocks, 4, 1, 1, head_dim, torch.float32)


def test_blocks_fill_partly_used_pages_first_and_a_page_goes_back_with_its_last_block():
    pages = PageManager(8, HostBackend(PAGE))
    pool = _pool(pages, "a")  # the scratch block (0) maps page 0, which also holds blocks 1-7
    assert pages.stats().mapped == {"a": 1}
    first = pool.allocate(6)
    assert sorted(first) == list(range(1, 7)) and pages.stats().mapped == {"a": 1}
    more = pool.allocate(10)  # block 7, page 1 whole, then one block of page 2
    assert sorted(more) == list(range(7, 17)) and pages.stats().mapped == {"a": 3}
    pool.free([b for b in more if 8 <= b < 16])  # page 1's blocks: its page goes back
    assert pages.stats().mapped == {"a": 2} and pages.stats().idle == 1
    again = pool.allocate(2)  # page 2 is partly used: filled before page 1 is taken again
    assert all(17 <= b < 24 for b in again) and pool.used_blocks == 10


def test_pages_one_model_gives_back_are_the_others_at_once_and_a_short_budget_hands_out_nothing():
    pages = PageManager(5, HostBackend(PAGE))
    a, b = _pool(pages, "a"), _pool(pages, "b")
    held = a.allocate(24)  # page 0 (beside the scratch block), 1, 2 and one block of 3
    assert pages.free_pages == 0
    with pytest.raises(OutOfBlocks):
        b.allocate(8)  # b has 7 free blocks beside its scratch block and no page to map
    assert b.used_blocks == 0 and pages.stats().mapped == {"a": 4, "b": 1}
    a.free(held)
    assert pages.stats().mapped == {"a": 1, "b": 1} and b.free_blocks == 7 + 8 + 8 + 7
    got = b.allocate(30)
    assert len(set(got)) == 30 and pages.stats().mapped == {"a": 1, "b": 4}
    assert pages.stats().unmaps == 3 and pages.stats().maps == 2 + 3 + 3


def test_a_block_that_does_not_tile_pages_is_padded_and_the_view_keeps_the_pool_layout():
    assert block_stride(512, PAGE) == 512 and block_stride(3 * 512, PAGE) == 2048
    assert block_stride(3 * PAGE, PAGE) == 3 * PAGE and block_stride(PAGE + 1, PAGE) == 2 * PAGE
    pages = PageManager(16, HostBackend(PAGE))
    pool = _pool(pages, "a", blocks=10, head_dim=48)  # 1536-byte blocks, padded to 2048: 2 a page
    assert pool.kv.shape == (11, 1, 2, 4, 1, 48) and pool.kv.stride()[0] == 2048 // 4
    blocks = pool.allocate(3)
    pool.kv[blocks[0]] = 1.0
    pool.kv[blocks[1]] = 2.0
    assert pool.kv[blocks[0]].sum().item() == 2 * 4 * 48 and pool.kv[blocks[1]].max().item() == 2.0
    big = PageManager(16, HostBackend(PAGE))
    wide = _pool(big, "w", blocks=3, head_dim=400)  # 12800-byte blocks: 4 pages each
    assert wide.pages_per_unit == 4 and big.stats().mapped == {"w": 4}
    wide.allocate(1)
    assert big.stats().mapped == {"w": 8} and wide.capacity == 3


def test_a_budget_without_room_for_the_scratch_block_is_one_line():
    pages = PageManager(1, HostBackend(PAGE))
    _pool(pages, "a")
    with pytest.raises(MoeshareError, match="no free page for the KV pool's scratch block"):
        _pool(pages, "b")
    assert [r.owner for r in pages.regions] == ["a"]


def weights_pages(path, page: int) -> int:
    """Pages of `page` bytes a checkpoint's weights take in the pool (they live there beside the KV)."""
    engine = Engine([path], EngineConfig(pool_bytes=1 << 26, pool_page_bytes=page))
    return engine.instance(engine.models()[0].name).weights.npages


def _tokens(engine: Engine, model: str, prompt: str, n: int = 24) -> list[int]:
    return engine.generate(model, prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[1]


def test_two_models_on_one_elastic_pool_give_their_tokens_alone_and_pages_follow_the_load(tiny_zoo):
    llama, qwen = tiny_zoo / "llama" / "kjv", tiny_zoo / "qwen2" / "python"
    alone = {
        "kjv": _tokens(Engine([llama]), "kjv", "And God said"),
        "python": _tokens(Engine([qwen]), "python", "def f("),
    }
    w = {"kjv weights": weights_pages(llama, BIG_PAGE), "python weights": weights_pages(qwen, BIG_PAGE)}
    total = 64 + sum(w.values())
    cfg = EngineConfig(pool_bytes=total * BIG_PAGE, pool_page_bytes=BIG_PAGE)  # pages of several blocks
    engine = Engine([llama, qwen], cfg)
    start = engine.stats().pages
    assert (
        start.total_pages == total and start.mapped == {"kjv": 1, "python": 1} | w
    )  # weights, scratch blocks
    ids = {
        m: engine.submit(Submit(m, p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)))
        for m, p in (("kjv", "And God said"), ("python", "def f("))
    }
    got: dict[int, list[int]] = {i: [] for i in ids.values()}
    peak: dict[str, int] = {}
    while engine.has_work():
        for ev in engine.step():
            got[ev.seq_id] += [ev.token_id] if ev.token_id >= 0 else []
        for m, n in engine.stats().pages.mapped.items():
            peak[m] = max(peak.get(m, 0), n)
    assert {m: got[i] for m, i in ids.items()} == alone
    end = engine.stats().pages
    assert peak["kjv"] > 1 and peak["python"] > 1 and end.mapped == start.mapped and end.maps > start.maps
    # free KV blocks count what each model holds (the block beside its scratch block), the pool's free pages once
    assert engine.stats().kv_blocks_free == 2 and end.free_pages + end.idle == 64 - 2
    # the model that goes on alone can take every page the other gave back
    hungry = engine.instance("kjv").pool
    assert hungry.free_blocks >= (64 - 2) * (BIG_PAGE // block_stride(hungry.kv[0].nbytes, BIG_PAGE))
    engine.unload("python")
    assert engine.stats().pages.mapped == {"kjv": 1, "kjv weights": w["kjv weights"]}


def test_a_request_larger_than_the_whole_pool_is_refused_before_it_runs(tiny_zoo):
    total = 4 + weights_pages(tiny_zoo / "llama" / "kjv", PAGE)
    engine = Engine([tiny_zoo / "llama" / "kjv"], EngineConfig(pool_bytes=total * PAGE, pool_page_bytes=PAGE))
    cap = engine.instance("kjv").pool.capacity
    with pytest.raises(RequestTooLarge, match=f"KV blocks; the pool has {cap}"):
        engine.submit(Submit("kjv", [5] * 20, SamplingParams(max_tokens=4000)))
    assert engine.stats().running == engine.stats().waiting == 0


def test_two_models_short_of_pages_preempt_and_both_finish_with_their_tokens(tiny_zoo):
    llama, qwen = tiny_zoo / "llama" / "kjv", tiny_zoo / "qwen2" / "python"
    prompts = {
        "kjv": ["And God said", "In the beginning", "And the LORD"],
        "python": ["def f(", "class A:", "import os"],
    }
    alone = {
        (m, p): _tokens(Engine([path]), m, p, 40)
        for m, path in (("kjv", llama), ("python", qwen))
        for p in prompts[m]
    }
    # 8 KV pages of 2 blocks (2 of them the scratch blocks): the six requests need 18 blocks at their longest
    w = weights_pages(llama, BIG_PAGE) + weights_pages(qwen, BIG_PAGE)
    engine = Engine([llama, qwen], EngineConfig(pool_bytes=(8 + w) * BIG_PAGE, pool_page_bytes=BIG_PAGE))
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    ids = {engine.submit(Submit(m, p, params)): (m, p) for m in prompts for p in prompts[m]}
    got: dict[int, list[int]] = {i: [] for i in ids}
    steps = 0
    while engine.has_work() and steps < 2000:
        for ev in engine.step():
            got[ev.seq_id] += [ev.token_id] if ev.token_id >= 0 else []
        steps += 1
    assert {ids[i]: t for i, t in got.items()} == alone
    stats = engine.stats()
    assert (
        stats.preemptions > 0
        and stats.kv_blocks_used == 0
        and {m: n for m, n in stats.pages.mapped.items() if "weights" not in m} == {"kjv": 1, "python": 1}
    )


def test_a_minimum_keeps_pages_for_its_model_and_a_maximum_caps_one():
    pages = PageManager(6, HostBackend(PAGE))
    a, b = _pool(pages, "a"), _pool(pages, "b")
    pages.set_limits("b", least=3)
    with pytest.raises(OutOfBlocks):
        a.allocate(7 + 2 * 8 + 1)  # its scratch page and two more: the other two free pages are b's
    assert a.used_blocks == 0 and a.free_blocks == 7 + 2 * 8 and a.capacity == 3 * 8 - 1
    held = a.allocate(7 + 2 * 8)
    assert pages.stats().mapped == {"a": 3, "b": 1} and b.free_blocks == 7 + 2 * 8
    b.allocate(7 + 2 * 8)  # b's kept pages are there for it
    a.free(held)
    pages.set_limits("a", most=2)
    assert a.capacity == 2 * 8 - 1
    with pytest.raises(OutOfBlocks):
        a.allocate(2 * 8)
    assert len(a.allocate(2 * 8 - 1)) == 15 and pages.stats().mapped == {"a": 2, "b": 3}


def test_page_limits_that_contradict_each_other_or_the_pool_are_one_line_and_change_nothing():
    pages = PageManager(6, HostBackend(PAGE))
    pages.set_limits("a", least=4)
    with pytest.raises(
        MoeshareError, match=r"^b: 3 pages kept for it and 4 for the others exceed the pool's 6"
    ):
        pages.set_limits("b", least=3)
    with pytest.raises(MoeshareError, match=r"least <= most and most >= 1, got least 2, most 1$"):
        pages.set_limits("b", least=2, most=1)
    assert set(pages.limits) == {"a"}


def test_capacity_leaves_out_the_pages_other_models_never_give_back_and_a_shrunk_share_ends_a_waiting_request(
    tiny_zoo,
):
    pages = PageManager(4, HostBackend(PAGE))
    a = _pool(pages, "a", blocks=100)
    _pool(pages, "b", blocks=100)
    assert a.capacity == 3 * 8 - 1  # b's scratch page is b's for good
    assert len(a.allocate(a.capacity)) == 23
    llama, qwen = tiny_zoo / "llama" / "kjv", tiny_zoo / "qwen2" / "python"
    kjv_w, python_w = weights_pages(llama, BIG_PAGE), weights_pages(qwen, BIG_PAGE)
    total = 8 + kjv_w + python_w
    engine = Engine([llama, qwen], EngineConfig(pool_bytes=total * BIG_PAGE, pool_page_bytes=BIG_PAGE))
    busy = engine.submit(Submit("python", [5] * 4, SamplingParams(max_tokens=40, ignore_eos=True)))
    engine.step()  # python runs: its weights cannot leave to make room for kjv
    waiting = engine.submit(Submit("kjv", [5] * 20, SamplingParams(max_tokens=40, ignore_eos=True)))
    # kjv's share shrinks to its scratch page, even were python's weights to leave
    engine.set_kv_limits("python", least_bytes=(total - kjv_w - 1) * BIG_PAGE)
    (ended,) = [ev for ev in engine.step() if ev.seq_id == waiting]
    assert ended.finish_reason.value == "error" and "share of the pool now holds 1" in ended.error
    engine.cancel(busy)
    engine.step()
    assert not engine.has_work() and engine.stats().kv_blocks_used == 0
    assert [m.resident for m in engine.models()] == [True, True]


def test_a_run_of_pages_maps_all_or_nothing_and_takes_back_its_own_given_back_pages():
    pages = PageManager(8, HostBackend(PAGE))
    region = pages.reserve("w", 6 * PAGE)
    assert pages.map(region, 2)
    pages.give_back(region, 2)
    assert pages.map_run(region, 0, 6) and pages.maps == 1 + 5  # page 2 was still mapped: taken back
    assert pages.stats().mapped == {"w": 6} and pages.stats().idle == 0
    short = PageManager(4, HostBackend(PAGE))
    other = short.reserve("w", 6 * PAGE)
    assert not short.map_run(other, 0, 6) and short.stats().mapped == {"w": 0} and short.maps == 0


def test_a_region_of_larger_chunks_maps_them_whole_and_unmaps_a_chunk_only_once_all_of_it_is_given_back():
    pages = PageManager(12, HostBackend(PAGE))
    region = pages.reserve("w", 5 * PAGE, chunk=4)  # rounded up to whole chunks: 8 pages
    assert region.nbytes == 8 * PAGE
    view = pages.backend.tensor(region.base, region.nbytes)
    assert pages.map_run(region, 0, 8) and pages.stats().mapped == {"w": 8}
    view.fill_(7)
    for p in range(3):  # three pages of the first chunk: it stays mapped
        pages.give_back(region, p)
    pages.reap(wait=True)
    assert pages.unmaps == 0 and (view == 7).all()
    pages.give_back(region, 3)
    pages.reap(wait=True)  # now the whole first chunk goes, the second stays
    assert pages.unmaps == 4 and pages.free_pages == 8 and pages.stats().mapped == {"w": 4}
    assert (view[: 4 * PAGE] == 0xFF).all() and (view[4 * PAGE :] == 7).all()
    assert pages.map_run(region, 0, 4) and pages.stats().mapped == {"w": 8}
    pages.release(region)
    assert pages.free_pages == 12 and pages.unmaps == 12
