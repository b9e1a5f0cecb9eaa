"""Per-instance step budgets (engine/budget.py): derived from the model's bytes and FLOPs per token and the GPU's
roofs; explicit settings win; on CPU fixed defaults. Multiplexing settings are checked in one line."""

import pytest
import torch

from moeshare.engine.api import Submit
from moeshare.engine.budget import CPU_SEQS, CPU_TOKENS, Roofs, ridge, step_budgets
from moeshare.engine.engine import Engine, EngineConfig
from moeshare.engine.models.dense import DENSE
from moeshare.engine.models.variants import MIXTRAL
from moeshare.engine.request import SamplingParams
from moeshare.engine.synthetic import from_spec
from moeshare.errors import MoeshareError

H200 = Roofs(bandwidth=4.2e12, flops=750e12)  # about what measure_roofs finds on an H200
BF16 = torch.bfloat16


def _budgets(spec: str, roofs: Roofs = H200):
    src = from_spec(spec, "meta")
    entry = DENSE if src.architecture == "llama" else MIXTRAL
    fp, layout = entry.footprint(src.config), entry.layout(src, EngineConfig(), BF16)
    return step_budgets(fp, layout, BF16, torch.device("cpu"), roofs), fp, layout


def test_a_dense_model_turns_compute_bound_at_flops_over_bandwidth_tokens():
    b, _, _ = _budgets("kind=llama,layers=32")
    # 2 bytes and 2 FLOPs per parameter: the ridge is the GPU's FLOPs per byte whatever the model's size
    assert b.ridge == pytest.approx(H200.flops / H200.bandwidth, rel=0.01)
    assert (b.seqs, b.tokens) == (128, 512)
    assert _budgets("kind=llama,layers=2")[0].ridge == pytest.approx(b.ridge, rel=0.01)


def test_a_moe_reads_four_times_the_bytes_per_flop_so_its_budgets_are_larger():
    b, fp, layout = _budgets("layers=8,variants=4")
    dense = _budgets("kind=llama,layers=8")[0]
    assert 3 < b.ridge / dense.ridge < 4  # 8 experts read, 2 computed; attention and the head are dense
    assert (b.seqs, b.tokens) == (256, 2048)
    # a GPU with twice the bandwidth per FLOP turns compute-bound at half the batch
    faster = Roofs(2 * H200.bandwidth, H200.flops)
    assert ridge(fp, layout, 2, faster) == pytest.approx(b.ridge / 2)


def test_budgets_stay_in_their_ranges():
    slow_memory = _budgets("kind=llama,layers=2", Roofs(1e11, 1e15))[0]  # ridge 10000
    assert (slow_memory.seqs, slow_memory.tokens) == (256, 8192)
    fast_memory = _budgets("kind=llama,layers=2", Roofs(1e13, 1e13))[0]  # ridge 1
    assert (fast_memory.seqs, fast_memory.tokens) == (16, 256)


def test_on_cpu_each_instance_gets_the_fixed_defaults_and_explicit_settings_win(tiny_zoo):
    engine = Engine([tiny_zoo / "llama" / "kjv"])
    (info,) = engine.models()
    assert (info.max_batched_tokens, info.max_num_seqs) == (CPU_TOKENS, CPU_SEQS)
    engine = Engine([tiny_zoo / "llama" / "kjv"], EngineConfig(max_batched_tokens=300, max_num_seqs=8))
    (info,) = engine.models()
    assert (info.max_batched_tokens, info.max_num_seqs) == (300, 8)
    assert engine.instance("kjv").scheduler.max_batched_tokens == 300


def test_a_derived_token_budget_holds_at_least_the_explicit_sequences(tiny_zoo):
    engine = Engine([tiny_zoo / "llama" / "kjv"], EngineConfig(max_num_seqs=3000))
    (info,) = engine.models()
    assert (info.max_batched_tokens, info.max_num_seqs) == (3000, 3000)  # every decode fits in a step


def test_multiplex_is_serial_or_streams():
    with pytest.raises(MoeshareError, match="multiplex must be serial or streams"):
        EngineConfig(multiplex="mps").validate()
    EngineConfig(multiplex="streams").validate()  # on CPU there are no streams: the batches run in turn


# ---- each step's floor (engine/stepcost.py) ----------------------------------------------------------------


def _cost(spec: str):
    from moeshare.engine.stepcost import StepCost

    src = from_spec(spec, "meta")
    entry = DENSE if src.architecture == "llama" else MIXTRAL
    fp, layout = entry.footprint(src.config), entry.layout(src, EngineConfig(), BF16)
    names = {v: v for v in src.variants}
    return StepCost(fp, layout, src, names, 2, Roofs(bandwidth=1e12, flops=1e18)), fp, layout, src


def _decodes(model: str, row: int, contexts: list[int]):
    from moeshare.engine.request import Sequence
    from moeshare.engine.scheduler import Scheduled

    return [Scheduled(Sequence(model, [1] * c, SamplingParams()), row, c - 1, 1) for c in contexts]


SMALL = "hidden=64,intermediate=128,heads=4,kv_heads=2,vocab=300,layers=2"


def test_a_dense_decode_step_reads_its_weights_once_and_each_sequences_kv():
    cost, fp, layout, src = _cost(f"kind=llama,{SMALL}")
    kv_per_token = fp.layers * 2 * fp.kv_heads * fp.head_dim * 2
    batch = _decodes("llama", 0, [10, 30])
    weights = layout.row_bytes - fp.lookup * 2  # of the embedding table, a step reads only its tokens' rows
    assert fp.lookup == 300 * 64 and cost.floor(batch) == pytest.approx((weights + 40 * kv_per_token) / 1e12)


def test_a_moe_step_reads_the_slots_its_tokens_are_expected_to_route_to():
    cost, fp, layout, src = _cost(f"variants=2,own=2,experts=8,top_k=2,{SMALL}")
    kv = fp.layers * 2 * fp.kv_heads * fp.head_dim * 2
    a, b = src.variants

    def slots(batch) -> float:
        rows = len({s.row for s in batch})
        ctx = sum(s.start + s.count for s in batch)
        return (
            (cost.floor(batch) * 1e12 - rows * (layout.row_bytes - fp.lookup * 2) - ctx * kv)
            / layout.slot_bytes
            / 2
        )

    assert slots(_decodes(a, 0, [5])) == pytest.approx(2)  # one token: its top 2, in each of 2 layers
    assert slots(_decodes(a, 0, [5] * 400)) == pytest.approx(8)  # many: all of its 8 experts
    # both variants, many tokens each: the 6 shared slots once, and each one's 2 own slots
    assert slots(_decodes(a, 0, [5] * 400) + _decodes(b, 1, [5] * 400)) == pytest.approx(10)


def test_the_engine_counts_its_steps_against_their_floor(tiny_zoo):
    engine = Engine([tiny_zoo / "llama" / "kjv"], EngineConfig(overlap=False))
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    engine.submit(Submit("kjv", "And God said", params))
    for _ in range(4):
        engine.step()
    engine.submit(Submit("kjv", "In the beginning", params))  # its prompt joins a step of decodes
    while engine.has_work():
        engine.step()
    (load,) = engine.stats().models
    # every step after the first (which starts from idle: nothing before it to time it from) is counted
    assert load.all_steps.steps == load.decode_steps.steps + 1 and load.decode_steps.steps >= 12
    assert 0 < load.decode_steps.floor_seconds < load.decode_steps.seconds


def test_profile_step_prints_each_batch_against_its_floor(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "profile_step.py"
    spec = importlib.util.spec_from_file_location("profile_step", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--model", "dense", "--device", "cpu", "--tiny", "--layers", "1", "--batches", "1,3"]
    assert script.main([*argv, "--context", "16", "--warm", "2", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("## batch") == 2 and "floor" in out and "by group" in out
