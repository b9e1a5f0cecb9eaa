"""Pure-torch reference for the greedy pick (the CPU engine runs it): the sampler's former greedy path."""

from __future__ import annotations

import torch


def greedy_pick_ref(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (argmax [B] int64, log_softmax(logits.float()) at the argmax [B] float32)."""
    x = logits.float()
    chosen = x.argmax(dim=-1)
    return chosen, torch.log_softmax(x, dim=-1).gather(1, chosen[:, None]).squeeze(1)
