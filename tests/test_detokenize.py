"""Streamed text: the pieces a request's events carry add up to the tokenizer's decode of its tokens."""

import random

import pytest

from moeshare.engine.detokenize import Detokenizer, load_tokenizer
from moeshare.engine.request import FinishReason, SamplingParams, Sequence


def _stream(detok: Detokenizer, ids: list[int], params: SamplingParams) -> tuple[str, FinishReason | None]:
    seq = Sequence("m", [1], params)
    pieces, reason = [], None
    for token in ids:
        seq.output_ids.append(token)
        piece, reason = detok.advance(seq, token)
        pieces.append(piece)
        if reason is not None:
            break
    detok.forget(seq.seq_id)
    return "".join(pieces), reason


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mixtral"])
def test_streamed_pieces_add_up_to_the_whole_decode(tiny_zoo, arch):
    tokenizer = load_tokenizer(tiny_zoo / arch / "kjv")
    detok = Detokenizer({"m": tokenizer}, set(), context=10**6)
    assert detok.backends["m"] is not None  # the zoo's tokenizers stream
    rng = random.Random(0)
    vocab = len(tokenizer)
    text = (tiny_zoo / "heldout" / "fortunes-de.txt").read_text()[:400]  # umlauts: characters over tokens
    real = tokenizer(text, add_special_tokens=False)["input_ids"]
    for ids in [real, [rng.randrange(vocab) for _ in range(200)]]:
        for n in (len(ids), 7, 1):  # whole, and cut where a character may be incomplete
            params = SamplingParams(max_tokens=n, ignore_eos=True)
            got, reason = _stream(detok, ids, params)
            assert (
                got == tokenizer.decode(ids[:n], skip_special_tokens=True) and reason is FinishReason.LENGTH
            )


def test_a_stop_string_cuts_the_streamed_text(tiny_zoo):
    tokenizer = load_tokenizer(tiny_zoo / "llama" / "kjv")
    detok = Detokenizer({"m": tokenizer}, set(), context=10**6)
    ids = tokenizer("In the beginning God created the heaven and the earth.", add_special_tokens=False)[
        "input_ids"
    ]
    got, reason = _stream(detok, ids, SamplingParams(max_tokens=100, stop=("heaven",)))
    assert got == "In the beginning God created the " and reason is FinishReason.STOP
