"""Held-out perplexity of a zoo model on one domain's text.

Mixtral, Llama, Qwen2: next-token perplexity over consecutive windows, each starting with <s>.
Switch: exp of the mean per-token loss of denoising span-corrupted windows (corruption seeded, so fixed).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from moeshare.zoo.recipes import CAUSAL_ARCHS
from moeshare.zoo.spans import corrupt_batch
from moeshare.zoo.tokenizer import PAD, byte_ids
from moeshare.zoo.train import causal_batch

EVAL_SEED = 20240607
EVAL_BATCH = 32
IGNORE = -100


@torch.no_grad()
def perplexity(model: PreTrainedModel, arch: str, text: str, seq_len: int, max_bytes: int) -> float:
    ids = byte_ids(text)[:max_bytes].long()  # [N]
    if len(ids) < 2:
        raise ValueError("held-out text too short to score")
    was_training = model.training
    model.eval()
    try:
        if arch in CAUSAL_ARCHS:
            nll, count = _causal_nll(model, ids, seq_len)
        elif arch == "switch":
            nll, count = _denoising_nll(model, ids, seq_len)
        else:
            raise ValueError(f"unknown arch {arch!r}")
    finally:
        model.train(was_training)
    return math.exp(nll / count)


def _causal_nll(model: PreTrainedModel, ids: torch.Tensor, seq_len: int) -> tuple[float, int]:
    width = seq_len - 1
    rows = math.ceil(len(ids) / width)
    windows = torch.full((rows * width,), PAD, dtype=torch.long)
    windows[: len(ids)] = ids
    inputs = causal_batch(windows.view(rows, width))  # [R, seq_len]
    labels = inputs.clone()
    labels[:, 1:].masked_fill_(_padding_mask(rows, width, len(ids)), IGNORE)
    total, count = 0.0, 0
    for start in range(0, rows, EVAL_BATCH):
        batch_in = inputs[start : start + EVAL_BATCH].to(model.device)
        batch_labels = labels[start : start + EVAL_BATCH, 1:].to(model.device)
        logits = model(input_ids=batch_in).logits[:, :-1]  # [b, seq_len - 1, V]
        total += F.cross_entropy(
            logits.flatten(0, 1).float(), batch_labels.flatten(), ignore_index=IGNORE, reduction="sum"
        ).item()
        count += int((batch_labels != IGNORE).sum())
    return total, count


def _padding_mask(rows: int, width: int, real: int) -> torch.Tensor:
    return (torch.arange(rows * width) >= real).view(rows, width)  # [R, width]


def _denoising_nll(model: PreTrainedModel, ids: torch.Tensor, seq_len: int) -> tuple[float, int]:
    rows = max(1, len(ids) // seq_len)
    width = min(seq_len, len(ids))
    windows = ids[: rows * width].view(rows, width)  # [R, width]
    denoising = corrupt_batch(windows, torch.Generator().manual_seed(EVAL_SEED))
    total, count = 0.0, 0
    for start in range(0, rows, EVAL_BATCH):
        batch_in = denoising.inputs[start : start + EVAL_BATCH].to(model.device)
        batch_labels = denoising.labels[start : start + EVAL_BATCH].to(model.device)
        logits = model(input_ids=batch_in, labels=batch_labels).logits  # [b, Ld, V]
        total += F.cross_entropy(logits.flatten(0, 1).float(), batch_labels.flatten(), reduction="sum").item()
        count += batch_labels.numel()
    return total, count
