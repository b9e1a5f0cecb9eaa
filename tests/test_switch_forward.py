"""The Switch Transformers reference forward over resident variants and one bank (engine/models/switch.py), on
the zoo's trained Switch variants, float32, against transformers: encoder outputs, teacher-forced decoder logits
and 32 greedy tokens, for a checkpoint and for every variant of a consolidated store against its export."""

import pytest
import torch
from moeshare.kernels import relative_buckets
from transformers import AutoModelForSeq2SeqLM

from moeshare.consolidate import Options, consolidate
from moeshare.consolidate.export import export_variant
from moeshare.engine.models.switch import MultiVariantSwitch
from moeshare.engine.source import Source

VARIANTS = ["kjv", "fortunes-en", "fortunes-de", "python"]
PROMPTS = {
    "kjv": "And God said",
    "fortunes-en": "A man who has",
    "fortunes-de": "Wer nicht",
    "python": "def f(",
}


def _build(path) -> tuple[MultiVariantSwitch, Source]:
    source = Source(path)
    return MultiVariantSwitch.from_source(source, torch.float32, torch.device("cpu")), source


def _ids(path, text: str) -> list[int]:
    from moeshare.engine.detokenize import load_tokenizer

    return load_tokenizer(path)(text)["input_ids"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _greedy(
    model: MultiVariantSwitch, ids: list[int], row: int, start: int, eos: int, n: int = 32
) -> list[int]:
    """n greedy tokens, end-of-sequence never chosen (what generate's min_new_tokens does)."""
    encoded = model.encode(ids, row)
    out = [start]
    for _ in range(n):
        logits = model.decode(encoded, out, row)[-1]
        logits[eos] = float("-inf")
        out.append(int(logits.argmax()))
    return out[1:]


def _against_transformers(model, row, hf_path, text) -> None:
    hf = AutoModelForSeq2SeqLM.from_pretrained(hf_path, dtype=torch.float32).eval()
    ids = _ids(hf_path, text)
    start = hf.config.decoder_start_token_id
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)[
            0, 1:
        ]
        dec = torch.cat([torch.tensor([start]), theirs[:-1]])
        out = hf(input_ids=torch.tensor([ids]), decoder_input_ids=dec[None])
    encoded = model.encode(ids, row)
    assert _rel(encoded, out.encoder_last_hidden_state[0]) < 1e-4
    assert _rel(model.decode(encoded, dec.tolist(), row), out.logits[0]) < 1e-4
    assert _greedy(model, ids, row, start, hf.config.eos_token_id) == theirs.tolist()


def test_relative_buckets_match_t5s_rule():
    rel = torch.arange(-300, 301)[None, :]
    both = relative_buckets(rel, True, 32, 128)[0]
    assert both[300] == 0 and both[301] == 17 and both[299] == 1  # the sign takes half of the buckets
    assert both.max() == 31 and both.min() == 0 and both[0] == 15  # far left: the last bucket of its half
    causal = relative_buckets(rel, False, 32, 128)[0]
    assert (causal[300:] == 0).all() and causal[299] == 1 and causal[0] == 31  # future keys: bucket 0


@pytest.mark.parametrize("variant", ["kjv", "python"])
def test_a_switch_checkpoint_matches_transformers(tiny_zoo, variant):
    path = tiny_zoo / "switch" / variant
    model, _ = _build(path)
    _against_transformers(model, 0, path, PROMPTS[variant])


def test_every_variant_of_a_switch_store_matches_transformers_on_its_export(tiny_zoo, tmp_path):
    store = tmp_path / "store"
    consolidate([tiny_zoo / "switch" / v for v in VARIANTS], store, Options(budget="0.5", self_calib=0))
    model, source = _build(store)
    assert model.rows == 4 and all(b["wi"].shape[0] < 4 * 4 for b in model.bank.values())  # one shared bank
    for row, v in enumerate(source.variants):
        export = export_variant(store, v, tmp_path / f"export-{v}")
        _against_transformers(model, row, export, PROMPTS[v])


def test_tokens_past_their_experts_capacity_get_no_feed_forward_as_in_transformers(tiny_zoo):
    from dataclasses import replace

    path = tiny_zoo / "switch" / "kjv"
    model, _ = _build(path)
    hf = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch.float32).eval()
    for m in hf.modules():
        if hasattr(m, "expert_capacity"):
            m.expert_capacity = 2  # a 30-token prompt over 4 experts: most tokens overflow
    model.dims = replace(model.dims, capacity=2)
    ids = _ids(path, "In the beginning God created the heaven and the earth.")
    with torch.no_grad():
        theirs = hf.get_encoder()(input_ids=torch.tensor([ids])).last_hidden_state[0]
    ours = model.encode(ids, 0)
    assert _rel(ours, theirs) < 1e-4
    model.dims = replace(model.dims, capacity=4096)
    assert _rel(model.encode(ids, 0), theirs) > 1e-2  # the capacity changed the outputs: it was binding


def test_paged_batched_encode_and_decode_give_each_sequence_its_reference_tokens(tiny_zoo, tmp_path):
    """Prompts of three variants encoded in one pass into paged cross blocks, then 12 greedy decode steps of all
    three together over paged self blocks: each sequence's logits and tokens as the reference gives it alone."""
    from moeshare.engine.attention import AttnBatch

    store = tmp_path / "store"
    consolidate([tiny_zoo / "switch" / v for v in VARIANTS], store, Options(budget="0.5", self_calib=0))
    model, source = _build(store)
    d, block = model.dims, 4
    jobs = [("python", "def f(x):"), ("kjv", "And God said, Let there be light"), ("fortunes-en", "A man")]
    rows = [source.variants.index(v) for v, _ in jobs]
    prompts = [_ids(tiny_zoo / "switch" / v, p) for v, p in jobs]
    steps = 12
    kv_enc = torch.zeros(32, d.encoder_layers, 2, block, d.heads, d.d_kv)  # the encoder's K/V, for now
    kv = torch.zeros(64, d.decoder_layers, 2, block, d.heads, d.d_kv)  # cross and self blocks, shuffled
    free = iter(torch.randperm(64, generator=torch.Generator().manual_seed(0)).tolist())
    cross = [[next(free) for _ in range(-(-len(p) // block))] for p in prompts]
    own = [[next(free) for _ in range(-(-(steps + 1) // block))] for _ in prompts]
    seq_rows = torch.tensor(rows)
    token_rows = torch.tensor([r for r, p in zip(rows, prompts, strict=True) for _ in p])
    lengths = [len(p) for p in prompts]
    enc_free = iter(range(32))
    enc_tables = [[next(enc_free) for _ in range(-(-n // block))] for n in lengths]
    enc = AttnBatch.build(enc_tables, [0] * 3, lengths, block, torch.device("cpu"))
    store = AttnBatch.build(cross, [0] * 3, lengths, block, torch.device("cpu"))
    ids = torch.tensor([t for p in prompts for t in p])
    model.encode_paged(ids, token_rows, seq_rows, enc, kv_enc, store, kv)
    start = source.config.get("decoder_start_token_id", 0)
    outs = [[start] for _ in prompts]
    for step in range(steps):
        attn = AttnBatch.build(own, [step] * 3, [1] * 3, block, torch.device("cpu"))
        cross_step = AttnBatch.build(
            cross, [len(p) - 1 for p in prompts], [1] * 3, block, torch.device("cpu")
        )
        logits = model.decode_paged(
            torch.tensor([o[-1] for o in outs]), seq_rows, seq_rows, attn, cross_step, kv
        )
        for i, (o, p, r) in enumerate(zip(outs, prompts, rows, strict=True)):
            alone = model.decode(model.encode(p, r), o, r)[-1]
            assert _rel(logits[i], alone) < 1e-4, (jobs[i][0], step)
            o.append(int(logits[i].argmax()))


def test_our_switch_scorer_gives_transformers_logits_and_greedy_reconstructions(tiny_zoo):
    """What `moeshare eval` scores Switch variants with: our forward against transformers on span denoising."""
    from moeshare.engine.detokenize import load_tokenizer
    from moeshare.evals.data import denoising_set
    from moeshare.evals.scorers import SwitchScorer, TransformersScorer

    path = tiny_zoo / "switch" / "python"
    text = (tiny_zoo / "heldout" / "python.txt").read_text()
    data = denoising_set("python", text, load_tokenizer(path), 128, 1024, 4)
    model, source = _build(path)
    ours, theirs = SwitchScorer(model, 0, source.config), TransformersScorer(path, "switch")
    assert _rel(ours.logits(data.inputs, data.labels), theirs.logits(data.inputs, data.labels)) < 1e-4
    assert ours.greedy(data.prompts, 24) == theirs.greedy(data.prompts, 24)
