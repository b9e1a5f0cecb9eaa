"""Triton MoE routing: softmax over each token's router logits, its top-k experts, their renormalized weights and
the bank slots its variant's table maps them to, in one launch.

torch spends five or more kernels on this per MoE layer and step (a float copy, softmax, a sort-based top-k,
the sum and division, the table gather); at batch 1 on an H200 they were ~100 us of a 2.3 ms Mixtral step. Here
BLOCK_T tokens per program hold their E logits in registers (E is small: 8 for Mixtral), pick the top k by
k passes of argmax (the lowest expert among ties), and write slots and weights. No host sync, no shape from the
data: it can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _route_kernel(
    logits_ptr, rows_ptr, table_ptr, slots_ptr, weights_ptr, T, stride_lt, stride_tr,
    E: tl.constexpr, BLOCK_E: tl.constexpr, K: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    t_ok, e_ok = t < T, e < E
    x = tl.load(logits_ptr + t[:, None].to(tl.int64) * stride_lt + e[None, :], mask=t_ok[:, None] & e_ok[None, :],
                other=0.0).to(tl.float32)  # fmt: skip
    x = tl.where(e_ok[None, :], x, float("-inf"))  # padding experts: no probability (rows past T: zeros)
    m = tl.max(x, axis=1)
    p = tl.where(e_ok[None, :], tl.exp(x - m[:, None]), 0.0)
    p = p / tl.sum(p, axis=1)[:, None]  # the softmax, as the reference computes it
    p = tl.where(e_ok[None, :], p, -1.0)  # padding never picked
    row = tl.load(rows_ptr + t, mask=t_ok, other=0).to(tl.int64)
    # first pass: the sum of the top k; second: each pick's weight and slot
    left, total = p, tl.zeros((BLOCK_T,), tl.float32)
    for _ in tl.static_range(K):
        best = tl.max(left, axis=1)
        idx = tl.min(tl.where(left == best[:, None], e[None, :], BLOCK_E), axis=1)
        total += best
        left = tl.where(e[None, :] == idx[:, None], -1.0, left)
    left = p
    for j in tl.static_range(K):
        best = tl.max(left, axis=1)
        idx = tl.min(tl.where(left == best[:, None], e[None, :], BLOCK_E), axis=1)
        slot = tl.load(table_ptr + row * stride_tr + idx, mask=t_ok, other=0)
        tl.store(slots_ptr + t * K + j, slot.to(tl.int64), mask=t_ok)
        tl.store(weights_ptr + t * K + j, (best / total).to(weights_ptr.dtype.element_ty), mask=t_ok)
        left = tl.where(e[None, :] == idx[:, None], -1.0, left)


def route(
    logits: torch.Tensor, rows: torch.Tensor, table: torch.Tensor, top_k: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """See router_ref.route_ref: logits [T, E], rows [T], table [R, E] (its last dim contiguous) ->
    (slots [T, k] int64, weights [T, k] in `dtype`)."""
    T, E = logits.shape
    if table.stride(-1) != 1:
        table = table.contiguous()
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    slots = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(T, top_k, dtype=dtype, device=logits.device)
    if T == 0:
        return slots, weights
    block_t = 16
    _route_kernel[(triton.cdiv(T, block_t),)](
        logits, rows, table, slots, weights, T, logits.stride(0), table.stride(0),
        E=E, BLOCK_E=max(2, triton.next_power_of_2(E)), K=top_k, BLOCK_T=block_t, num_warps=1,
    )  # fmt: skip
    return slots, weights
