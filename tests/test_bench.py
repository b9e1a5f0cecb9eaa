"""The benchmark's reusable part: seeded workloads, open-loop replay against a real server, run metrics."""

import asyncio
import math
import time

import numpy as np
import pytest

from moeshare.bench.metrics import Solo, request_latency, summarize
from moeshare.bench.replay import RequestRecord, is_loopback, replay
from moeshare.bench.systems import ServerSpec, spawn, stop_all, wait_ready
from moeshare.bench.workload import (
    ZOO_PRINTABLE,
    Lengths,
    RequestSpec,
    WorkloadSpec,
    byte_text,
    generate,
    zipf_shares,
)

VARIANTS = ["kjv", "fortunes-en", "python"]
ONE_TOKEN = {"input_len": Lengths.fixed(1), "output_len": Lengths.fixed(1)}  # the statistics need no prompts


def _spec(**kw) -> WorkloadSpec:
    base = {"variants": VARIANTS, "rate_rps": 20.0, "duration_s": 5.0, "seed": 7}
    return WorkloadSpec(**(base | kw))


def _gaps_cv(times: list[float]) -> tuple[float, float]:
    gaps = np.diff([0.0, *times])
    return float(gaps.mean()), float(gaps.std() / gaps.mean())


# ---- workload ---------------------------------------------------------------------------------------------


def test_same_seed_same_workload_other_seed_differs():
    a, b, c = generate(_spec()), generate(_spec()), generate(_spec(seed=8))
    assert a == b and len(a) > 50
    assert [r.arrival_s for r in a] != [r.arrival_s for r in c[: len(a)]]
    assert a[0].prompt_ids != c[0].prompt_ids
    assert [r.arrival_s for r in a] == sorted(r.arrival_s for r in a)
    assert len({r.id for r in a}) == len(a)
    lo, hi = ZOO_PRINTABLE
    assert all(lo <= t < hi for r in a for t in r.prompt_ids)


def test_variant_shares_follow_zipf_on_20000_arrivals():
    spec = _spec(variants=["a", "b", "c", "d"], rate_rps=200.0, duration_s=100.0, zipf_alpha=0.9, **ONE_TOKEN)
    reqs = generate(spec)
    assert abs(len(reqs) - 20_000) < 0.03 * 20_000
    shares = np.array([sum(r.variant == v for r in reqs) for v in spec.variants]) / len(reqs)
    expected = zipf_shares(4, 0.9)  # 1/r^0.9: about .40, .21, .15, .12
    assert np.allclose(shares, expected, atol=0.015), (shares, expected)


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0])
def test_inter_arrival_times_are_gamma_with_the_asked_cv(cv):
    spec = _spec(variants=["only"], rate_rps=100.0, duration_s=200.0, cv=cv, **ONE_TOKEN)
    mean_gap, got_cv = _gaps_cv([r.arrival_s for r in generate(spec)])
    assert mean_gap == pytest.approx(1 / 100.0, rel=0.05)
    assert got_cv == pytest.approx(cv, rel=0.05)


def test_cv_zero_spaces_arrivals_evenly():
    reqs = generate(_spec(variants=["only"], rate_rps=4.0, duration_s=2.0, cv=0.0))
    assert [r.arrival_s for r in reqs] == pytest.approx([0.25 * i for i in range(1, 8)])


def test_lengths_are_lognormal_around_the_median_and_clipped():
    lengths = Lengths(512, sigma=1.0, lo=100, hi=1000)
    spec = _spec(rate_rps=1000.0, duration_s=5.0, input_len=lengths, output_len=Lengths(128, lo=64, hi=160))
    reqs = generate(spec)
    ins = np.array([r.prompt_len for r in reqs])
    outs = np.array([r.max_tokens for r in reqs])
    assert ins.min() == 100 and ins.max() == 1000 and outs.min() == 64 and outs.max() == 160
    assert np.median(ins) == pytest.approx(512, rel=0.05)
    fixed = generate(_spec(input_len=Lengths.fixed(16), output_len=Lengths.fixed(8)))
    assert {r.prompt_len for r in fixed} == {16} and {r.max_tokens for r in fixed} == {8}


def test_byte_text_is_one_ascii_character_per_id():
    assert byte_text([4 + ord(c) for c in "Hi there~"]) == "Hi there~"
    with pytest.raises(ValueError):
        byte_text([4 + 0xC3])


def test_bad_specs_are_refused():
    for kw in ({"variants": []}, {"variants": ["a", "a"]}, {"rate_rps": 0}, {"cv": -1}):
        with pytest.raises(ValueError):
            generate(_spec(**kw))
    with pytest.raises(ValueError, match="input_len"):
        generate(_spec(input_len=Lengths(10, lo=20, hi=5)))


# ---- replay guards ----------------------------------------------------------------------------------------


def test_loopback_addresses():
    for a in ("127.0.0.1:50051", "127.8.0.1:1", "[::1]:50051", "localhost:50051", "unix:/tmp/s"):
        assert is_loopback(a), a
    for a in ("10.0.0.5:50051", "example.com:50051", "[2001:db8::1]:50051", "0.0.0.0:50051"):
        assert not is_loopback(a), a


def test_replay_refuses_remote_addresses_and_too_many_requests():
    one = RequestSpec("r", "kjv", 0.0, (100,), 1)
    with pytest.raises(ValueError, match="non-loopback"):
        asyncio.run(replay("10.0.0.5:50051", [one]))
    with pytest.raises(ValueError, match="max_requests=3"):
        asyncio.run(replay("127.0.0.1:1", [one] * 4, max_requests=3))


# ---- metrics ----------------------------------------------------------------------------------------------


def _record(variant, arrival, sent, tokens, finish, error=None) -> RequestRecord:
    r = RequestRecord(f"{variant}-{arrival}", variant, arrival, 4, 3, sent_s=sent, finish_s=finish)
    r.token_times_s = list(tokens)
    r.first_token_s = tokens[0] if tokens else None
    r.finish_reason, r.error = ("", error) if error else ("length", None)
    return r


def test_metrics_of_hand_made_records():
    records = [
        _record("a", 0.0, 0.0, [0.5, 0.7, 0.9], 1.0),  # ttft .5, tpot .2, turnaround 1.0
        _record("b", 1.0, 1.1, [1.4, 1.5], 1.5),  # ttft .3, tpot .1, turnaround .4, sent .1 late
        _record("a", 2.0, 2.0, [], 2.2, error="UNAVAILABLE: down"),
        _record("b", 3.0, 3.0, [3.2], 4.0),  # ttft .2, no tpot, turnaround 1.0
    ]
    assert request_latency(records[0]).tpot_s == pytest.approx(0.2)
    assert request_latency(records[3]).tpot_s is None
    # every record asks 3 tokens of a 4-token prompt: solo latency .25 for a, .125 for b
    solo = {"a": Solo(0.05, 0.025, 0.05), "b": Solo(0.025, 0.0, 0.05)}
    m = summarize(records, solo, system="moeshare", rate_rps=1.0)
    assert (m.requests, m.failed, m.span_s) == (4, 1, 4.0)
    assert m.throughput_rps == pytest.approx(3 / 4) and m.tokens_per_s == pytest.approx(6 / 4)
    assert (m.turnaround.mean, m.turnaround.p50, m.turnaround.p99) == pytest.approx((0.8, 1.0, 1.0))
    assert (m.ttft.mean, m.ttft.p50, m.ttft.p99) == pytest.approx((1 / 3, 0.3, 0.496))
    assert (m.tpot.mean, m.tpot.p50, m.tpot.p99) == pytest.approx((0.15, 0.15, 0.199))
    # 5x: a within 1.25 s, b within .625 s -> the first two; 10x adds the last; the failure misses both
    assert (m.slo_attainment_5x, m.slo_attainment_10x) == (0.5, 0.75)
    assert m.max_send_lag_s == pytest.approx(0.1)
    rec = m.to_record()
    for key in (
        "system",
        "rate_rps",
        "throughput_rps",
        "tokens_per_s",
        "mean_turnaround_s",
        "p50_turnaround_s",
        "p99_turnaround_s",
        "p50_ttft_s",
        "p99_ttft_s",
        "mean_tpot_s",
        "p50_tpot_s",
        "slo_attainment_5x",
        "slo_attainment_10x",
    ):
        assert key in rec, key
    assert rec["p99_ttft_s"] == pytest.approx(0.496) and rec["system"] == "moeshare"
    with pytest.raises(ValueError, match="no solo latency"):
        summarize(records, {"a": solo["a"]}, system="x", rate_rps=1.0)


def _solo_record(prompt_len: int, ttft: float, tpot: float, n: int = 4) -> RequestRecord:
    r = RequestRecord("s", "a", 0.0, prompt_len, n, sent_s=0.0, finish_s=ttft + (n - 1) * tpot)
    r.token_times_s = [ttft + i * tpot for i in range(n)]
    r.first_token_s, r.finish_reason = ttft, "length"
    return r


def test_solo_fit_is_linear_in_prompt_length_and_never_falls():
    fit = Solo.fit([_solo_record(100, 0.2, 0.01), _solo_record(300, 0.4, 0.01), _solo_record(300, 0.5, 0.03)])
    # medians: .2 at 100 and .45 at 300 -> .0725 + .00125 per token; tpot median .01
    assert (fit.ttft0_s, fit.ttft_per_token_s, fit.tpot_s) == pytest.approx((0.075, 0.00125, 0.01))
    assert fit.latency(200, 11) == pytest.approx(0.075 + 0.25 + 0.1)
    flat = Solo.fit([_solo_record(100, 0.3, 0.01), _solo_record(300, 0.2, 0.01)])
    assert flat.ttft_per_token_s == 0.0 and flat.latency(0, 1) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="no completed solo request"):
        Solo.fit([RequestRecord("x", "a", 0.0, 4, 4, error="UNAVAILABLE: down")])


# ---- end to end against a real server ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_zoo, tmp_path_factory):
    from moeshare.consolidate import Options, consolidate

    store = tmp_path_factory.mktemp("bench") / "mixtral"
    consolidate([tiny_zoo / "mixtral" / v for v in VARIANTS], store, Options(budget="0.5", self_calib=0))
    s = spawn(
        ServerSpec((str(store),), tuple(VARIANTS), ()), "cpu", tmp_path_factory.mktemp("log") / "serve.log"
    )
    try:
        wait_ready(s, time.monotonic() + 120)
        yield s
    finally:
        stop_all([s])


def test_replay_of_12_requests_completes_each_with_its_token_count(server):
    short = {"input_len": Lengths.fixed(16), "output_len": Lengths.fixed(8)}
    reqs = generate(_spec(rate_rps=4.0, duration_s=10.0, **short))[:12]
    assert len(reqs) == 12 and len({r.variant for r in reqs}) >= 2
    solo = {}
    for v in VARIANTS:  # each variant alone on the server, one request
        alone = RequestSpec(f"solo-{v}", v, 0.0, reqs[0].prompt_ids, 8)
        solo[v] = Solo.fit(asyncio.run(replay(server.address, [alone], temperature=0.0)))

    records = asyncio.run(replay(server.address, reqs, temperature=0.0, timeout_s=60))
    assert [r.id for r in records] == [r.id for r in reqs]
    for r in records:
        assert r.ok, r.error
        assert r.tokens_out == 8 and r.finish_reason == "length"
        assert r.prompt_tokens == 16  # one token per character, no specials added
        assert r.sent_s <= r.first_token_s <= r.token_times_s[-1] <= r.finish_s
    assert records[-1].sent_s >= reqs[-1].arrival_s  # open loop: sent on schedule, not all at once
    m = summarize(records, solo, system="moeshare", rate_rps=4.0)
    assert m.failed == 0 and m.max_send_lag_s < 0.5
    for stat in (m.turnaround, m.ttft, m.tpot):
        assert all(math.isfinite(x) and x > 0 for x in (stat.mean, stat.p50, stat.p99))
        assert stat.p50 <= stat.p99
    assert m.ttft.p99 <= m.turnaround.p99
    assert 0 <= m.slo_attainment_5x <= m.slo_attainment_10x <= 1
    assert m.throughput_rps > 0 and m.tokens_per_s == pytest.approx(8 * m.throughput_rps)
