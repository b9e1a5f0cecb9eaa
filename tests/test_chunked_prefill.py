"""Chunked prefill end to end (CPU, float32, trained zoo models): the same tokens as a whole prefill, and a long
prompt arriving mid-decode does not hold the running sequences back; latency targets on requests, counted in
GetStats."""

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from test_server import Server

from moeshare.client import Client
from moeshare.engine.api import Submit
from moeshare.engine.engine import Engine, EngineConfig
from moeshare.engine.request import SamplingParams

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


def _prompt(tiny_zoo, corpus: str, chars: int) -> str:
    return (tiny_zoo / "heldout" / f"{corpus}.txt").read_text()[:chars]


@pytest.mark.parametrize("arch", ["llama", "mixtral", "qwen2"])
def test_a_prompt_prefilled_in_chunks_gives_the_tokens_of_a_whole_prefill(tiny_zoo, arch):
    corpus = "python" if arch == "qwen2" else "kjv"
    path = tiny_zoo / arch / corpus
    prompt = _prompt(tiny_zoo, corpus, 400)
    whole = Engine([path], EngineConfig(chunked_prefill=False))
    chunked = Engine([path], EngineConfig(max_batched_tokens=16))
    ids = whole.tokenizer(corpus)(prompt, add_special_tokens=False)["input_ids"]
    assert len(ids) > 3 * 16  # several chunks
    assert chunked.generate(corpus, prompt, GREEDY)[1] == whole.generate(corpus, prompt, GREEDY)[1]


@pytest.mark.parametrize("overlap", [False, True])
def test_a_long_prompt_arriving_mid_decode_does_not_stop_the_running_sequences(tiny_zoo, overlap):
    path = tiny_zoo / "llama" / "kjv"
    long_prompt = _prompt(tiny_zoo, "kjv", 600)
    alone = Engine([path]).generate("kjv", long_prompt, GREEDY)[1]
    engine = Engine([path], EngineConfig(max_batched_tokens=16, overlap=overlap))
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    short = [engine.submit(Submit("kjv", p, params)) for p in ("And God said", "In the beginning")]
    engine.step()  # both prefilled
    engine.step()
    long = engine.submit(Submit("kjv", long_prompt, GREEDY))
    got, steps = [], 0
    while not got:
        events = engine.step()
        steps += 1
        # every running sequence draws a token in every step while the long prompt is prefilled in chunks
        assert sorted(ev.seq_id for ev in events if ev.seq_id in short) == sorted(short)
        got = [ev.token_id for ev in events if ev.seq_id == long]
    assert steps > 5  # the prompt took several steps: its chunks shared them with the decodes
    while engine.has_work():
        got += [ev.token_id for ev in engine.step() if ev.seq_id == long and ev.token_id >= 0]
    assert got == alone


def test_a_server_with_a_small_token_budget_serves_long_and_short_prompts_together(tiny_zoo):
    path = tiny_zoo / "llama" / "kjv"
    long_prompt = _prompt(tiny_zoo, "kjv", 600)
    engine = Engine([path])
    alone = {p: engine.generate("kjv", p, GREEDY)[1] for p in (long_prompt, "And God said")}
    server = Server(path, "--max-batched-tokens", "16")
    try:
        with Client(server.address) as client, ThreadPoolExecutor(2) as pool:
            futures = {
                p: pool.submit(client.complete, "kjv", p, max_tokens=16, temperature=0, ignore_eos=True)
                for p in (long_prompt, "And God said")
            }
            assert {p: list(f.result().token_ids) for p, f in futures.items()} == alone
    finally:
        server.stop()


def test_latency_targets_from_the_request_or_the_model_defaults_are_counted_in_get_stats(tiny_zoo):
    path = tiny_zoo / "llama" / "kjv"
    server = Server(path, "--slo", "kjv=1e-9,")  # a default time to first token no request can meet
    try:
        with Client(server.address) as client:
            for _ in range(2):  # the model's default target: missed
                client.complete("kjv", "And God said", max_tokens=4, temperature=0)
            for _ in range(3):  # the request's own, generous: met
                client.complete("kjv", "And God said", max_tokens=4, temperature=0, ttft_target=60.0)
            client.complete("kjv", "And God said", max_tokens=4, ttft_target=60.0, tpot_target=1e-9)  # missed
            (stats,) = client.stats().models
            assert (stats.slo_requests, stats.slo_met) == (6, 3)
            with pytest.raises(grpc.RpcError) as err:
                client.complete("kjv", "And God said", max_tokens=4, ttft_target=-1.0)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details() == "ttft target must be a number of seconds > 0, got -1.0"
    finally:
        server.stop()


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_the_warm_up_of_mixed_steps_touches_only_the_scratch_block(tiny_zoo, arch):
    # on a GPU it runs at load (Triton compiles its kernels then, not under traffic); here it runs on CPU
    path = tiny_zoo / arch / "kjv"
    engine = Engine([path], EngineConfig(max_num_seqs=20, max_batched_tokens=300))
    prompt = _prompt(tiny_zoo, "kjv", 200)
    busy = engine.submit(Submit("kjv", prompt, GREEDY))
    engine.step()  # a sequence with KV in the pool while the warm-up runs
    instance = engine.instance("kjv")
    steps = instance.runner.warm_up(20, 300, instance.context)
    assert steps >= 2 * 7  # one and 17 sequences, several token counts each
    out = []
    while engine.has_work():
        out += [ev.token_id for ev in engine.step() if ev.seq_id == busy and ev.token_id >= 0]
    assert out == Engine([path]).generate("kjv", prompt, GREEDY)[1]
    assert engine.stats().kv_blocks_used == 0
