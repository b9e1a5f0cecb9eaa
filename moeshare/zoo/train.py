"""Training loops: a base model on the mixture of all domains, then one full fine-tune per domain."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    SwitchTransformersConfig,
    SwitchTransformersForConditionalGeneration,
)
from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersTop1Router

from moeshare.zoo.recipes import Schedule
from moeshare.zoo.spans import corrupt_batch
from moeshare.zoo.tokenizer import BOS

FINAL_LOSS_WINDOW = 0.1  # final_loss is the mean over this last fraction of steps


@dataclass(frozen=True)
class TrainResult:
    steps: int
    lr: float
    batch: int
    final_loss: float
    seconds: float


def new_model(arch: str, config: dict[str, Any], seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)
    if arch == "mixtral":
        return MixtralForCausalLM(MixtralConfig(**config)).float()
    if arch == "switch":
        return SwitchTransformersForConditionalGeneration(SwitchTransformersConfig(**config)).float()
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**config)).float()
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**config)).float()
    raise ValueError(f"unknown arch {arch!r}")


def sample_windows(
    streams: list[torch.Tensor], batch: int, length: int, gen: torch.Generator
) -> torch.Tensor:
    """`batch` windows of `length` tokens, each from a uniformly chosen stream at a uniform offset."""
    picks = torch.randint(len(streams), (batch,), generator=gen).tolist()
    rows = []
    for pick in picks:
        stream = streams[pick]
        start = int(torch.randint(len(stream) - length + 1, (1,), generator=gen))
        rows.append(stream[start : start + length])
    return torch.stack(rows).long()  # [B, length]


def causal_batch(windows: torch.Tensor) -> torch.Tensor:
    """windows [B, L-1] → input ids [B, L] starting with <s>, as the Mixtral tokenizer encodes text."""
    bos = torch.full((windows.shape[0], 1), BOS, dtype=torch.long)
    return torch.cat([bos, windows], dim=1)


def training_loss(
    model: PreTrainedModel,
    arch: str,
    streams: list[torch.Tensor],
    batch: int,
    seq_len: int,
    gen: torch.Generator,
) -> torch.Tensor:
    """Language-model loss plus the router losses, so that every expert gets used."""
    device = model.device
    if arch != "switch":
        ids = causal_batch(sample_windows(streams, batch, seq_len - 1, gen)).to(device)
        if arch == "mixtral":
            return model(input_ids=ids, labels=ids, output_router_logits=True).loss
        return model(input_ids=ids, labels=ids).loss
    denoising = corrupt_batch(sample_windows(streams, batch, seq_len, gen), gen)
    with captured_router_logits(model) as logits:
        loss = model(input_ids=denoising.inputs.to(device), labels=denoising.labels.to(device)).loss
    return loss + switch_router_loss(logits, model.config)


@contextmanager
def captured_router_logits(model: PreTrainedModel) -> Iterator[list[torch.Tensor]]:
    """The logits of every Switch router run inside the block. Taken by hooks because some transformers
    5.x releases return no router logits from Switch's forward(output_router_logits=True)."""
    logits: list[torch.Tensor] = []
    hooks = [
        module.register_forward_hook(lambda _m, _args, out: logits.append(out[-1]))  # out[-1]: [B, S, E]
        for module in model.modules()
        if isinstance(module, SwitchTransformersTop1Router)
    ]
    try:
        yield logits
    finally:
        for hook in hooks:
            hook.remove()


def switch_router_loss(logits: list[torch.Tensor], config: SwitchTransformersConfig) -> torch.Tensor:
    """Switch Transformer's router z-loss and load-balancing loss, averaged over the sparse blocks."""
    z_loss = torch.stack([torch.logsumexp(lg, dim=-1).pow(2).mean() for lg in logits]).mean()
    balance = []
    for lg in logits:
        probs = lg.float().softmax(dim=-1)  # [B, S, E]
        routed = F.one_hot(probs.argmax(dim=-1), config.num_experts).float()  # [B, S, E]
        balance.append(config.num_experts * (routed.mean(dim=(0, 1)) * probs.mean(dim=(0, 1))).sum())
    return config.router_z_loss_coef * z_loss + config.router_aux_loss_coef * torch.stack(balance).mean()


def lr_factor(step: int, schedule: Schedule) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < schedule.warmup:
        return (step + 1) / schedule.warmup
    progress = (step - schedule.warmup) / max(1, schedule.steps - schedule.warmup)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))


def train(
    model: PreTrainedModel,
    arch: str,
    streams: list[torch.Tensor],
    schedule: Schedule,
    seq_len: int,
    seed: int,
    desc: str,
) -> TrainResult:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=schedule.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, schedule))
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(schedule.steps), desc=desc, file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
    for step in bar:
        loss = training_loss(model, arch, streams, schedule.batch, seq_len, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == schedule.steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{sched.get_last_lr()[0]:.1e}", refresh=False)
    bar.close()
    model.eval()
    tail = losses[-max(1, int(len(losses) * FINAL_LOSS_WINDOW)) :]
    return TrainResult(
        steps=schedule.steps,
        lr=schedule.lr,
        batch=schedule.batch,
        final_loss=sum(tail) / len(tail),
        seconds=time.perf_counter() - start,
    )
