"""Switch stores served by the engine (issue 18): each prompt encoded once into cross blocks of its own, the
decoder generating over paged self blocks, variants batched over one bank; float32 on CPU, on the zoo's trained
Switch variants, against transformers' generate."""

from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from moeshare.consolidate import Options, consolidate
from moeshare.engine.api import Submit
from moeshare.engine.engine import Engine, EngineConfig
from moeshare.engine.request import FinishReason, RequestTooLarge, SamplingParams

VARIANTS = ["kjv", "fortunes-en", "fortunes-de", "python"]
# span-denoising prompts (what the zoo's Switch variants were trained on): each variant fills them its own way
PROMPTS = {
    "kjv": "And God said, Let there be <extra_id_0>: and there was light.",
    "fortunes-en": "A man who has <extra_id_0> is never alone.",
    "fortunes-de": "Wer nicht <extra_id_0>, der nicht.",
    "python": "def main(<extra_id_0>):\n    return 0",
}
GREEDY = SamplingParams(max_tokens=24, temperature=0)


def _theirs(path, ids: list[int], n: int) -> list[int]:
    """transformers' greedy tokens: up to n, or through its eos."""
    hf = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, 1:].tolist()
    eos = hf.config.eos_token_id
    return out[: out.index(eos) + 1] if eos in out else out


@pytest.fixture(scope="module")
def store(tiny_zoo, tmp_path_factory):
    path = tmp_path_factory.mktemp("switch") / "store"
    consolidate([tiny_zoo / "switch" / v for v in VARIANTS], path, Options(budget="0.5", self_calib=0))
    return path


def _run(engine: Engine, jobs: list[tuple[str, str]], stagger: int = 0) -> list[list[int]]:
    """Submit the jobs (each next one `stagger` steps after the one before), run to the end: their tokens."""
    ids, tokens, reasons = [], {}, {}
    for model, prompt in jobs:
        ids.append(engine.submit(Submit(model, prompt, GREEDY)))
        tokens[ids[-1]] = []
        for _ in range(stagger):
            for ev in engine.step():
                tokens[ev.seq_id] += [ev.token_id] if ev.token_id >= 0 else []
    while engine.has_work():
        for ev in engine.step():
            tokens[ev.seq_id] += [ev.token_id] if ev.token_id >= 0 else []
            if ev.finished:
                reasons[ev.seq_id] = ev.finish_reason
    assert all(reasons[i] in (FinishReason.STOP, FinishReason.LENGTH) for i in ids), reasons
    return [tokens[i] for i in ids]


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_served_switch_checkpoint_and_store_generate_what_transformers_does(
    tiny_zoo, store, tmp_path, variant
):
    """32 greedy tokens (or through eos) of every variant: its checkpoint served against transformers on it,
    and the consolidated store's variant served against transformers on the store's export of it."""
    from moeshare.consolidate.export import export_variant

    path, params = tiny_zoo / "switch" / variant, replace(GREEDY, max_tokens=32)
    engine = Engine([path])
    [info] = engine.models()
    assert info.architecture == "switch_transformers"
    ids = engine.tokenizer(variant)(PROMPTS[variant], add_special_tokens=False)["input_ids"]
    text, tokens = engine.generate(variant, PROMPTS[variant], params)
    assert tokens == _theirs(path, ids, params.max_tokens) and text
    stats = engine.stats()
    assert stats.kv_blocks_used == 0 and stats.running == stats.waiting == 0
    exported = export_variant(store, variant, tmp_path / variant)
    assert Engine([store]).generate(variant, ids, params)[1] == _theirs(exported, ids, params.max_tokens)


@pytest.mark.parametrize("stagger", [0, 3])
def test_variants_of_a_store_batched_together_get_their_tokens_alone(store, stagger):
    alone = [_run(Engine([store]), [(v, PROMPTS[v])])[0] for v in VARIANTS]
    engine = Engine([store])
    assert _run(engine, [(v, PROMPTS[v]) for v in VARIANTS], stagger) == alone
    assert engine.stats().kv_blocks_used == 0
    assert len({tuple(t) for t in alone}) == len(VARIANTS)  # the variants differ: a mix-up would show


def test_usage_counts_the_encoders_prompt_and_a_prompt_too_long_is_refused(store):
    engine = Engine([store], EngineConfig(kv_blocks=24, block_size=4))
    v = VARIANTS[0]
    ids = engine.tokenizer(v)(PROMPTS[v], add_special_tokens=False)["input_ids"]
    seq_id = engine.submit(Submit(v, ids, GREEDY))
    final = None
    while engine.has_work():
        final = next((ev for ev in engine.step() if ev.seq_id == seq_id and ev.finished), final)
    assert final.usage.prompt_tokens == len(ids) and final.usage.completion_tokens >= 1
    with pytest.raises(
        RequestTooLarge, match="KV blocks"
    ):  # its cross blocks and the decoder's: 24 do not do
        engine.submit(Submit(v, ids * 3, GREEDY))
    assert engine.stats().kv_blocks_used == 0 and not engine.has_work()


def test_preempted_switch_requests_encode_again_and_keep_their_tokens(store):
    jobs = [(v, PROMPTS[v]) for v in VARIANTS] * 2
    roomy = _run(Engine([store]), jobs)
    # about two requests' cross and decoder blocks at a time: the newest is preempted as decoders grow
    tight = Engine([store], EngineConfig(kv_blocks=36, block_size=4))
    assert _run(tight, jobs) == roomy
    stats = tight.stats()
    assert stats.preemptions > 0 and stats.kv_blocks_used == 0


def test_a_server_streams_switch_variants_and_lists_them_as_text_to_text(store, tiny_zoo):
    from test_server import Server

    from moeshare.client import Client

    alone = {v: _run(Engine([store]), [(v, PROMPTS[v])])[0] for v in VARIANTS}
    s = Server(store, f"bible={tiny_zoo / 'mixtral' / 'kjv'}")  # beside a decoder-only checkpoint
    try:
        with Client(s.address) as client:
            models = {m.name: m for m in client.list_models()}
            assert {m.text_to_text for n, m in models.items() if n in VARIANTS} == {True}
            assert {models[v].architecture for v in VARIANTS} == {"switch_transformers"}
            assert not models["bible"].text_to_text
            for v in VARIANTS:
                out = client.complete(v, PROMPTS[v], max_tokens=GREEDY.max_tokens, temperature=0.0)
                assert out.token_ids == alone[v], v
    finally:
        s.stop()


def test_random_switch_variants_at_any_size_serve_and_batch_like_the_zoos():
    """`--synthetic kind=switch,...` (what bench_engine's Switch rows serve at Switch-Base-8 sizes): a family
    over one bank whose variants batched together get their tokens alone; bad specs are one line."""
    from moeshare.engine.synthetic import from_spec
    from moeshare.errors import MoeshareError

    tiny = "kind=switch,variants=3,own=1,layers=2,d_model=64,d_ff=128,d_kv=16,heads=4,experts=4,vocab=300"
    source = from_spec(tiny, "cpu")
    assert source.bank_slots("decoder.1") == 3 + 3 * 1 and source.table("v2", "encoder.1") == [0, 1, 2, 5]
    prompts = {v: list(range(5 + i, 40 + 3 * i)) for i, v in enumerate(source.variants)}
    jobs = [(v, prompts[v]) for v in source.variants]
    alone = [_run(Engine([from_spec(tiny, "cpu")]), [job])[0] for job in jobs]
    assert _run(Engine([source]), jobs, stagger=2) == alone and len({tuple(t) for t in alone}) > 1
    for bad in ("kind=switch,hidden=64", "kind=switch,d_model=0", "kind=switch,own=9"):
        with pytest.raises(MoeshareError, match="--synthetic"):
            from_spec(bad, "cpu")


def test_a_preempted_request_recomputes_its_decoder_as_its_tokens_were_generated():
    """Generate routes a decoder token alone, so expert capacity never drops it; recomputing a preempted
    request's decoder tokens together must not either (random variants with a capacity of 2 tokens)."""
    from moeshare.engine.synthetic import RandomSwitchSource, switch_config

    config = switch_config(layers=2, d_model=64, d_ff=128, d_kv=16, heads=4, experts=4, vocab=300)
    config["expert_capacity"] = 2
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, logprobs=True)
    jobs = [(v, list(range(5 + i, 30 + i))) for i, v in enumerate(["v0", "v1"] * 3)]

    def run(**cfg) -> tuple[list[list[tuple[int, float]]], int]:
        source = RandomSwitchSource(config, 2, 1, device="cpu", dtype=torch.float32)
        engine = Engine([source], EngineConfig(device="cpu", block_size=4, **cfg))
        ids = [engine.submit(Submit(m, p, params)) for m, p in jobs]
        tokens: dict[int, list[tuple[int, float]]] = {i: [] for i in ids}
        while engine.has_work():
            for ev in engine.step():
                tokens[ev.seq_id] += [(ev.token_id, ev.logprob)] if ev.token_id >= 0 else []
        return [tokens[i] for i in ids], engine.stats().preemptions

    roomy, none = run()
    tight, preempted = run(kv_blocks=34)
    assert none == 0 and preempted > 0
    for a, b in zip(tight, roomy, strict=True):  # the tokens, and their logprobs to float32 rounding
        assert [t for t, _ in a] == [t for t, _ in b]
        assert max(abs(x - y) for (_, x), (_, y) in zip(a, b, strict=True)) < 1e-4


def test_the_warm_up_of_a_switch_instance_touches_only_the_scratch_block(store):
    """What a GPU instance runs before serving (each prompt length that tiles the kernels differently, through
    the encoder and the eager decoder): every sequence reads and writes the scratch block, so requests served
    after it get the tokens they get without it, and no block is taken."""
    alone = [_run(Engine([store]), [(v, PROMPTS[v])])[0] for v in VARIANTS]
    engine = Engine([store], EngineConfig(block_size=4))
    instance = engine.instance(VARIANTS[0])
    assert instance.runner.warm_up(4, 200, 130) > 4 and engine.stats().kv_blocks_used == 0
    assert _run(engine, [(v, PROMPTS[v]) for v in VARIANTS], 2) == alone


def test_switch_sampling_seeds_stop_strings_and_max_tokens_behave_as_for_mixtral(store):
    """A seed makes a sampled completion repeatable (alone or in a batch), other seeds differ; a stop string
    ends the text before it; max_tokens caps the decoder's output."""
    v, engine = "fortunes-en", Engine([store])
    sampled = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, seed=7, ignore_eos=True)
    first = engine.generate(v, PROMPTS[v], sampled)
    again = _run_with(engine, [(v, PROMPTS[v], sampled), ("kjv", PROMPTS["kjv"], sampled)])[0]
    assert first[1] == again and len(first[1]) == 20
    others = {tuple(engine.generate(v, PROMPTS[v], replace(sampled, seed=s))[1]) for s in range(8, 12)}
    assert len(others | {tuple(first[1])}) > 1
    assert len(engine.generate(v, PROMPTS[v], replace(sampled, max_tokens=5))[1]) == 5
    greedy_text, greedy = engine.generate(v, PROMPTS[v], replace(GREEDY, ignore_eos=True))
    cut = greedy_text[3:6]  # a piece of what greedy decoding writes: the text stops right before it
    stopped, _ = engine.generate(v, PROMPTS[v], replace(GREEDY, ignore_eos=True, stop=(cut,)))
    assert stopped == greedy_text[: greedy_text.index(cut)] and len(greedy) == GREEDY.max_tokens
    assert engine.stats().kv_blocks_used == 0


def _run_with(engine: Engine, jobs: list[tuple[str, str, SamplingParams]]) -> list[list[int]]:
    ids = [engine.submit(Submit(m, p, params)) for m, p, params in jobs]
    tokens = {i: [] for i in ids}
    while engine.has_work():
        for ev in engine.step():
            tokens[ev.seq_id] += [ev.token_id] if ev.token_id >= 0 else []
    return [tokens[i] for i in ids]
