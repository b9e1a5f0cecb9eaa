"""The eval harness scores a checkpoint with its own tokenizer's special tokens, never the zoo's ids."""

from __future__ import annotations

import ast
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import moeshare
from moeshare.evals.data import denoising_set
from moeshare.evals.metrics import _spans

TEXT = "In the beginning God created the heaven and the earth. " * 40
SENTINELS = [f"<extra_id_{i}>" for i in range(20)]


def _t5_like_tokenizer() -> PreTrainedTokenizerFast:
    """Bytes first, then </s>, <pad>, <unk>, and the sentinels last in reverse, as T5 places them: no id
    where the zoo's tokenizer has it."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for tok in ("</s>", "<pad>", "<unk>", *reversed(SENTINELS)):
        vocab[tok] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["</s>", "<pad>", "<unk>", *SENTINELS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=SENTINELS,
    )


def test_denoising_eval_uses_the_checkpoints_own_sentinels_and_eos():
    tokenizer = _t5_like_tokenizer()
    eos, first = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<extra_id_0>")
    data = denoising_set("kjv", TEXT, tokenizer, 128, 1024, 4)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    for row, (inputs, labels) in enumerate(zip(data.inputs.tolist(), data.labels.tolist(), strict=True)):
        assert inputs[-1] == eos and labels[-1] == eos and labels[0] == first == inputs[inputs.index(first)]
        window = ids[row * 128 : (row + 1) * 128]
        # the kept text and the dropped spans, specials removed, are the window's tokens and no others
        kept, dropped = _spans(inputs, data.specials), _spans(labels, data.specials)
        assert sorted(kept + dropped) == sorted(window) and len(dropped) == 128 - len(kept)
    assert data.specials.eos == eos and data.specials.sentinels[:2] == (first, first - 1)
    assert torch.all(data.inputs < len(tokenizer))


def test_evals_take_no_token_ids_from_the_zoo_tokenizer():
    evals = Path(moeshare.__file__).parent / "evals"
    for path in sorted(evals.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "moeshare.zoo.tokenizer", f"{path.name} imports the zoo's token ids"
