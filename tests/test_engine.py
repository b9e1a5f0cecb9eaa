"""The engine on the zoo's trained Mixtral variants, against transformers (CPU, float32)."""

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from moeshare.consolidate import Options, consolidate, export_variant
from moeshare.engine.api import Submit, TokenEvent
from moeshare.engine.engine import Engine, EngineConfig
from moeshare.engine.request import (
    FinishReason,
    InvalidRequest,
    RequestTooLarge,
    SamplingParams,
    UnknownModel,
)
from moeshare.errors import MoeshareError

VARIANTS = ["kjv", "fortunes-en", "fortunes-de", "python"]
PROMPTS = {
    "kjv": "And God said unto Moses,",
    "fortunes-en": "A man who has",
    "fortunes-de": "Wer nicht wagt,",
    "python": "def __init__(self,",
}
GREEDY = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)


def _hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _hf_greedy(model, ids: list[int], n: int = 32) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def store(tiny_zoo, tmp_path_factory):
    """All four variants at budget 1.0: each variant exactly its source."""
    out = tmp_path_factory.mktemp("store") / "mixtral"
    consolidate([tiny_zoo / "mixtral" / v for v in VARIANTS], out, Options(budget="1.0"))
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_and_greedy_tokens_match_transformers(tiny_zoo, variant):
    path = tiny_zoo / "mixtral" / variant
    engine = Engine([path])
    hf = _hf(path)
    text = (tiny_zoo / "heldout" / f"{variant}.txt").read_text()[:200]
    ids = engine.tokenizer(variant)(text, add_special_tokens=False)["input_ids"]
    ours = engine.teacher_forced(variant, ids)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0]
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 1e-4
    prompt = engine.tokenizer(variant)(PROMPTS[variant], add_special_tokens=False)["input_ids"]
    _, tokens = engine.generate(variant, prompt, GREEDY)
    assert tokens == _hf_greedy(hf, prompt)


@dataclass
class Outcome:
    """What a request's events said, gathered through the engine's public API."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    final: TokenEvent | None = None


def _collect(outcomes: dict[int, Outcome], events: list[TokenEvent]) -> None:
    for ev in events:
        got = outcomes.setdefault(ev.seq_id, Outcome())
        if ev.token_id >= 0:
            got.tokens.append(ev.token_id)
            got.logprobs.append(ev.logprob)
        if ev.finished:
            got.final = ev


def _drain(engine: Engine, outcomes: dict[int, Outcome]) -> dict[int, Outcome]:
    while engine.has_work():
        _collect(outcomes, engine.step())
    return outcomes


def _submit(engine: Engine, model: str, prompt, params: SamplingParams) -> int:
    return engine.submit(Submit(model, prompt, params))


def _alone(store: Path, **cfg) -> dict[str, list[int]]:
    engine = Engine([store], EngineConfig(**cfg))
    return {v: engine.generate(v, PROMPTS[v], GREEDY)[1] for v in VARIANTS}


def _together(engine: Engine, stagger: int) -> dict[str, list[int]]:
    """All variants in one batch; with stagger > 0 each next request joins `stagger` steps into the decode."""
    ids, outcomes = {}, {}
    for v in VARIANTS:
        ids[v] = _submit(engine, v, PROMPTS[v], GREEDY)
        for _ in range(stagger):
            _collect(outcomes, engine.step())
    _drain(engine, outcomes)
    return {v: outcomes[i].tokens for v, i in ids.items()}


@pytest.fixture(scope="module")
def alone(store):
    return _alone(store)


@pytest.mark.parametrize("stagger", [0, 3])
def test_mixed_variant_batch_gives_each_request_its_own_tokens(store, alone, stagger):
    engine = Engine([store])
    assert _together(engine, stagger) == alone
    stats = engine.stats()
    assert stats.kv_blocks_used == 0 and stats.running == stats.waiting == 0


def test_store_variants_match_their_sources(tiny_zoo, alone):
    for v in VARIANTS:
        hf = _hf(tiny_zoo / "mixtral" / v)
        ids = Engine([tiny_zoo / "mixtral" / v]).tokenizer(v)(PROMPTS[v], add_special_tokens=False)[
            "input_ids"
        ]
        assert alone[v] == _hf_greedy(hf, ids)


def test_consolidated_store_matches_transformers_on_its_export(tiny_zoo, tmp_path):
    consolidate([tiny_zoo / "mixtral" / v for v in VARIANTS], tmp_path / "s", Options(budget="0.5"))
    engine = Engine([tmp_path / "s"])
    for v in ("kjv", "python"):
        hf = _hf(export_variant(tmp_path / "s", v, tmp_path / f"e-{v}"))
        ids = engine.tokenizer(v)(PROMPTS[v], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            theirs = hf(torch.tensor([ids])).logits[0]
        ours = engine.teacher_forced(v, ids)
        assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 1e-4
        assert engine.generate(v, ids, GREEDY)[1] == _hf_greedy(hf, ids)


def test_partial_reconfiguration_gives_the_same_outputs(store, alone):
    engine = Engine([store], EngineConfig(max_resident_variants=2))
    assert len(engine.stats().resident_variants) == 2
    assert _together(engine, 0) == alone
    assert _together(engine, 2) == alone
    stats = engine.stats()
    assert stats.swap_ins >= 2 and stats.kv_blocks_used == 0


def test_memory_limit_streams_the_last_layers_banks_and_keeps_outputs(store, alone):
    roomy = Engine([store], EngineConfig(memory_limit_bytes=2**40))
    assert roomy.stats().offloaded_layers == 0
    full = roomy.instance("kjv").placed_bytes
    layers = roomy.instance("kjv").footprint.layers
    engine = Engine([store], EngineConfig(memory_limit_bytes=full - 1))
    model = engine.instance("kjv").model
    # the last layers go first (with one staging bank, offloading one layer of equal ones saves nothing)
    assert model.offload and model.offload == frozenset(range(layers - len(model.offload), layers))
    assert engine.instance("kjv").placed_bytes <= full - 1
    assert model.bank[layers - 1]["w13"].device.type == "cpu" and model.staging is not None
    assert _together(engine, 2) == alone
    assert engine.stats().kv_blocks_used == 0


def test_memory_limit_too_small_is_one_line_and_loads_nothing(store):
    engine = Engine([], EngineConfig(memory_limit_bytes=2**20))
    with pytest.raises(MoeshareError, match=r"^the memory limit leaves 0.00 GiB, .*raise the limit") as e:
        engine.load(store)
    assert "\n" not in str(e.value) and engine.models() == []


def test_whole_variant_swaps_copy_experts_and_keep_outputs(store, alone):
    engine = Engine([store], EngineConfig(max_resident_variants=1, swap_whole_variants=True))
    model = engine.instance("kjv").model
    assert model.bank[0]["w13"].shape[0] == model.dims.experts  # one variant's experts on the device
    assert _together(engine, 0) == alone
    assert _together(engine, 3) == alone
    stats = engine.stats()
    assert stats.swap_ins >= 3 and stats.resident_variants != [] and stats.kv_blocks_used == 0


def test_preemption_when_kv_runs_out_keeps_outputs(store, alone):
    # 20 blocks of 4 tokens: any one sequence fits (about 14 blocks), all four at once do not
    engine = Engine([store], EngineConfig(kv_blocks=20, block_size=4))
    assert _together(engine, 0) == alone
    assert engine.stats().preemptions > 0 and engine.stats().kv_blocks_used == 0


def test_seeded_sampling_is_reproducible_whatever_the_batch(store):
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = Engine([store]).generate("kjv", PROMPTS["kjv"], params)[1]
    engine = Engine([store])
    mates = [_submit(engine, v, PROMPTS[v], SamplingParams(max_tokens=10, temperature=1.0)) for v in VARIANTS]
    seq = _submit(engine, "kjv", PROMPTS["kjv"], params)
    out = _drain(engine, {})
    assert out[seq].tokens == alone and all(out[m].final is not None for m in mates)
    other = Engine([store]).generate(
        "kjv", PROMPTS["kjv"], SamplingParams(**{**params.__dict__, "seed": 99})
    )[1]
    assert other != alone


def test_top_k_one_is_greedy_and_logprobs_are_reported(store, alone):
    engine = Engine([store])
    seq = _submit(
        engine,
        "python",
        PROMPTS["python"],
        SamplingParams(max_tokens=32, temperature=1.5, top_k=1, ignore_eos=True, logprobs=True),
    )
    out = _drain(engine, {})[seq]
    assert out.tokens == alone["python"]
    assert len(out.logprobs) == 32 and all(lp <= 0 for lp in out.logprobs)
    usage = out.final.usage
    assert usage.completion_tokens == 32 and usage.prompt_tokens > 0
    assert usage.arrival <= usage.first_token <= usage.finish


def test_queued_steps_give_the_tokens_of_lockstep_steps_and_return_every_block(store, alone):
    """A step queued before the last one is read back (the default) and lockstep steps agree token for token,
    also for requests that stop on a token or a string while their next row is already queued."""
    full, _ = Engine([store]).generate("kjv", PROMPTS["kjv"], GREEDY)
    stop_token = alone["python"][5]
    runs = {}
    for overlap in (True, False):
        engine = Engine([store], EngineConfig(overlap=overlap))
        ids = {v: _submit(engine, v, PROMPTS[v], GREEDY) for v in VARIANTS}
        outcomes = _collect_steps(engine, 2)
        ids["stop-string"] = _submit(
            engine, "kjv", PROMPTS["kjv"], SamplingParams(max_tokens=32, temperature=0, stop=(full[9:13],))
        )
        params = SamplingParams(max_tokens=32, temperature=0, stop_token_ids=(stop_token,))
        ids["stop-token"] = _submit(engine, "python", PROMPTS["python"], params)
        _drain(engine, outcomes)
        runs[overlap] = {k: (outcomes[i].tokens, outcomes[i].final.finish_reason) for k, i in ids.items()}
        stats = engine.stats()
        assert stats.kv_blocks_used == 0 and stats.running == stats.waiting == 0 and not engine.has_work()
    assert runs[True] == runs[False]
    assert {v: runs[True][v][0] for v in VARIANTS} == alone
    tokens, reason = runs[True]["stop-token"]
    assert tokens == alone["python"][: alone["python"].index(stop_token) + 1] and reason is FinishReason.STOP
    assert runs[True]["stop-string"][1] is FinishReason.STOP


def _collect_steps(engine: Engine, n: int) -> dict[int, Outcome]:
    outcomes: dict[int, Outcome] = {}
    for _ in range(n):
        _collect(outcomes, engine.step())
    return outcomes


def test_stop_strings_and_max_tokens(store):
    engine = Engine([store])
    full, _ = engine.generate("kjv", PROMPTS["kjv"], GREEDY)
    stop = full[5:8]
    text, _ = engine.generate(
        "kjv", PROMPTS["kjv"], SamplingParams(max_tokens=32, temperature=0, stop=(stop,))
    )
    assert text == full[: full.index(stop)]
    text, ids = engine.generate(
        "kjv", PROMPTS["kjv"], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    )
    assert len(ids) == 3


def test_cancel_frees_blocks_at_once(store):
    engine = Engine([store])
    seq = _submit(engine, "kjv", PROMPTS["kjv"], GREEDY)
    engine.step()
    engine.step()  # the first token is read back, the second is queued
    assert engine.stats().kv_blocks_used > 0
    final = engine.cancel(seq)
    assert final.finished and final.finish_reason is FinishReason.CANCELLED
    assert final.usage.completion_tokens == 1
    assert engine.stats().kv_blocks_used == 0 and not engine.has_work()
    assert engine.cancel(seq) is None


BAD = [
    ("nope", "hi", SamplingParams(), UnknownModel, "unknown model 'nope'"),
    ("kjv", "", SamplingParams(), InvalidRequest, "prompt is empty"),
    ("kjv", "x" * 5000, SamplingParams(), RequestTooLarge, "takes at most"),
    ("kjv", "hi", SamplingParams(max_tokens=0), InvalidRequest, "max_tokens must be between 1 and"),
    ("kjv", "hi", SamplingParams(max_tokens=10**6), InvalidRequest, "max_tokens must be between 1 and"),
    ("kjv", "hi", SamplingParams(temperature=-1), InvalidRequest, "temperature must be >= 0"),
    ("kjv", "hi", SamplingParams(top_p=0), InvalidRequest, "top_p must be in (0, 1]"),
    ("kjv", "hi", SamplingParams(top_p=1.5), InvalidRequest, "top_p must be in (0, 1]"),
    ("kjv", "hi", SamplingParams(top_k=-1), InvalidRequest, "top_k must be >= 0"),
    ("kjv", "hi", SamplingParams(max_tokens=900), RequestTooLarge, "KV blocks; the pool has"),
]


@pytest.mark.parametrize("variant,prompt,params,error,message", BAD)
def test_bad_requests_are_rejected_before_touching_the_batch(store, variant, prompt, params, error, message):
    engine = Engine([store], EngineConfig(kv_blocks=8, block_size=16))
    running = _submit(engine, "kjv", PROMPTS["kjv"], SamplingParams(max_tokens=8, temperature=0))
    out = {}
    _collect(out, engine.step())
    before = engine.stats()
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        _submit(engine, variant, prompt, params)
    assert engine.stats() == before
    _drain(engine, out)
    assert out[running].final is not None and len(out[running].tokens) == 8


def test_no_variant_starves_behind_a_busy_resident_row(store):
    # one resident row; a steady stream of kjv requests keeps it busy, and one python request waits for it
    engine = Engine([store], EngineConfig(max_resident_variants=1))
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    _submit(engine, "kjv", PROMPTS["kjv"], params)
    engine.step()
    waiting = _submit(engine, "python", PROMPTS["python"], params)
    out: dict[int, Outcome] = {}
    steps = 0
    while waiting not in out and steps < 200:
        _submit(engine, "kjv", PROMPTS["kjv"], params)  # a new arrival every step
        _collect(out, engine.step())
        steps += 1
    # bounded: the starvation threshold (8 steps) + one kjv generation (16 tokens) + the swap
    assert waiting in out and steps <= 8 + 16 + 4
    assert engine.stats().swap_ins >= 1


def test_synthetic_variant_served_alone_matches_its_family():
    from moeshare.engine.synthetic import from_spec

    dims = "layers=2,hidden=64,intermediate=128,experts=4,heads=4,kv_heads=2,vocab=256,context=256"
    family = Engine([from_spec(f"variants=3,own=2,{dims}", "cpu")])
    alone = Engine([from_spec(f"variants=3,own=2,only=1,{dims}", "cpu")])
    assert [m.name for m in alone.models()] == ["v1"]
    assert alone.instance("v1").model.bank[0]["w13"].shape[0] == 4
    prompt = list(range(3, 40))
    assert alone.generate("v1", prompt, GREEDY)[1] == family.generate("v1", prompt, GREEDY)[1]
    assert family.generate("v2", prompt, GREEDY)[1] != family.generate("v1", prompt, GREEDY)[1]
