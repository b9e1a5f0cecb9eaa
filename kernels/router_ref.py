"""Pure-torch reference for the MoE routing step (the CPU engine runs it): Mixtral's softmax, top-k and
renormalization, each token's local experts mapped through its variant's table to bank slots."""

from __future__ import annotations

import torch


def route_ref(
    logits: torch.Tensor, rows: torch.Tensor, table: torch.Tensor, top_k: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] (router outputs), rows [T] (each token's variant row), table [R, E] (local expert -> bank
    slot per row) -> (slots [T, k] int64, weights [T, k] in `dtype`: the top-k softmax probabilities over their
    sum)."""
    probs = torch.softmax(logits.float(), dim=-1)
    top, local = probs.topk(top_k, dim=-1)
    top = top / top.sum(dim=-1, keepdim=True)
    return table[rows].gather(1, local), top.to(dtype)
