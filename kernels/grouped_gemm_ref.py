"""Pure-torch references for the grouped GEMM and the fused MoE over the bank (the CPU engine runs these)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_linear_ref(x: torch.Tensor, w: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """y[t] = x[t] @ w[group[t]].T  —  x [T, K], w [G, N, K], group [T] -> [T, N].

    The per-variant projections: each token multiplies by its own variant's weight.
    """
    out = x.new_empty(x.shape[0], w.shape[1])
    for g in group.unique().tolist():
        rows = group == g
        out[rows] = x[rows] @ w[g].T
    return out


def _over_bank(x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, expert) -> torch.Tensor:
    """sum_k weights[t, k] * expert(s, x[t]) over the slots s = slots[t, k] each token routes to."""
    out = torch.zeros_like(x, dtype=torch.float32)
    flat = slots.reshape(-1)
    token = torch.arange(x.shape[0], device=x.device).repeat_interleave(slots.shape[1])
    for s in flat.unique().tolist():
        pick = flat == s
        t = token[pick]
        out.index_add_(0, t, (expert(s, x[t]) * weights.reshape(-1)[pick, None]).float())
    return out.to(x.dtype)


def fused_moe_ref(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Mixtral experts over the bank: sum_k weights[t, k] * w2[s] (silu(w1[s] x) * w3[s] x), s = slots[t, k].

    x [T, H], w13 [S, 2I, H] (gate rows then up rows), w2 [S, H, I], slots [T, k], weights [T, k] -> [T, H].
    """

    def expert(s: int, xs: torch.Tensor) -> torch.Tensor:
        gate, up = (xs @ w13[s].T).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ w2[s].T

    return _over_bank(x, slots, weights, expert)


def fused_moe_relu_ref(
    x: torch.Tensor, wi: torch.Tensor, wo: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Switch experts over the bank: sum_k weights[t, k] * wo[s] relu(wi[s] x), s = slots[t, k].

    x [T, D], wi [S, F, D], wo [S, D, F], slots [T, k], weights [T, k] -> [T, D].
    """
    return _over_bank(x, slots, weights, lambda s, xs: torch.relu(xs @ wi[s].T) @ wo[s].T)
