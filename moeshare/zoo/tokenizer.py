"""Byte-level tokenizer shared by every zoo model: one token per UTF-8 byte plus T5-style specials."""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK, BOS = 0, 1, 2, 3
BYTE_OFFSET = 4
NUM_SENTINELS = 16
SENTINEL_BASE = BYTE_OFFSET + 256
VOCAB_SIZE = SENTINEL_BASE + NUM_SENTINELS

SPECIALS = ["<pad>", "</s>", "<unk>", "<s>"]
# a small chat template for the causal models, so chat completions over HTTP can be tested: one line per message
# ("role: content"), then "assistant:" for the reply
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
SENTINELS = [f"<extra_id_{i}>" for i in range(NUM_SENTINELS)]


def sentinel_id(i: int) -> int:
    if not 0 <= i < NUM_SENTINELS:
        raise ValueError(f"sentinel index {i} outside 0..{NUM_SENTINELS - 1}")
    return SENTINEL_BASE + i


def _byte_to_char() -> list[str]:
    # The ByteLevel pre-tokenizer shows each byte as a printable character: printable Latin-1 bytes
    # stand for themselves, the rest are shifted past 255 in byte order.
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars: list[str] = []
    shifted = 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


def build_tokenizer(arch: str) -> PreTrainedTokenizerFast:
    """Causal models' tokenizers (mixtral, llama, qwen2) prepend <s>; Switch (T5) ones append </s>."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab |= {ch: BYTE_OFFSET + b for b, ch in enumerate(_byte_to_char())}
    vocab |= {tok: SENTINEL_BASE + i for i, tok in enumerate(SENTINELS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([*SPECIALS, *SENTINELS])
    if arch in ("mixtral", "llama", "qwen2"):
        template = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS)]
        )
    elif arch == "switch":
        template = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", EOS)]
        )
    else:
        raise ValueError(f"unknown arch {arch!r}")
    tok.post_processor = template
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="<s>",
        extra_special_tokens=SENTINELS,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )
    if arch != "switch":  # text-to-text: no chat
        fast.chat_template = CHAT_TEMPLATE
    return fast


def describe_tokenizer() -> dict[str, object]:
    return {
        "vocab_size": VOCAB_SIZE,
        "pad": PAD,
        "eos": EOS,
        "unk": UNK,
        "bos": BOS,
        "first_sentinel": SENTINEL_BASE,
        "sentinels": NUM_SENTINELS,
        "encoding": f"one token per UTF-8 byte b: id {BYTE_OFFSET} + b",
    }


def byte_ids(text: str) -> torch.Tensor:
    """The tokenizer's ids for `text` without specials, straight from its bytes (fast for corpora)."""
    raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    return torch.from_numpy(raw.astype(np.int16) + BYTE_OFFSET)  # [n_bytes] int16
