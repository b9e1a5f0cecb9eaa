"""Triton greedy pick over LM-head logits: the argmax of each row and its log-probability, in one launch.

torch spends three passes over the [B, V] logits on a greedy step (a float32 copy, log_softmax, argmax) and
writes two [B, V] float32 tensors. Here one program per row reads the row once, in its own dtype, in tiles of
BLOCK_V, the next tile loading while one is reduced. Every lane keeps its running max, the index where it
first saw it and the sum of exp(x - max), rescaled when the max grows (one exp per element); the lanes are
merged at the end. The chosen logit is the row's max, so its log-probability is -log(sum exp(x - max)).
On an H200 (V = 128256, bf16, graph replay) B=128 takes ~24 us against ~175 us for the torch ops, B=1 ~20
against ~65. No host sync, no shape from the data: the kernel can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _greedy_pick_kernel(logits_ptr, chosen_ptr, logprob_ptr, V, stride_b, BLOCK_V: tl.constexpr):
    """chosen[b] = first argmax of row b; logprob[b] = -log(sum_v exp(x_v - max))."""
    b = tl.program_id(0).to(tl.int64)
    row = logits_ptr + b * stride_b
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((BLOCK_V,), float("-inf"), tl.float32)  # each lane's max so far
    s = tl.zeros((BLOCK_V,), tl.float32)  # each lane's sum of exp(x - m)
    idx = tl.zeros((BLOCK_V,), tl.int32)  # where each lane first saw m
    nxt = tl.load(row + offs, mask=offs < V, other=float("-inf"))
    for start in range(0, V, BLOCK_V):
        v = start + offs
        x = nxt.to(tl.float32)
        # the next tile's load is in flight while this one is reduced (1.2-1.5x on an H200)
        nxt = tl.load(row + v + BLOCK_V, mask=v + BLOCK_V < V, other=float("-inf"))
        up = x > m
        # exp(-|x - m|) is the new term, or the factor that rescales the old sum when x is the new max
        e = tl.where(x == float("-inf"), 0.0, tl.exp(-tl.abs(x - m)))
        s = tl.where(up, s * e + 1.0, s + e)
        idx = tl.where(up, v, idx)
        m = tl.maximum(m, x)
    top = tl.max(m, axis=0)
    total = tl.sum(s * tl.exp(m - tl.where(top == float("-inf"), 0.0, top)), axis=0)
    first = tl.min(tl.where(m == top, idx, V), axis=0)  # the lowest index among the lanes holding the max
    tl.store(chosen_ptr + b, first.to(tl.int64))
    tl.store(logprob_ptr + b, -tl.log(total))


def greedy_pick(logits: torch.Tensor, block_v: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] (bf16, fp16 or fp32) -> (chosen [B] int64, logprob [B] float32).

    chosen = argmax (the first index among ties, as torch.argmax), logprob = log_softmax(logits.float())
    at chosen, up to float32 rounding. block_v: the tile (a power of two), for tests.
    """
    B, V = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    chosen = torch.empty(B, dtype=torch.int64, device=logits.device)
    logprob = torch.empty(B, dtype=torch.float32, device=logits.device)
    if B == 0:
        return chosen, logprob
    block_v = block_v or min(8192, triton.next_power_of_2(V))
    _greedy_pick_kernel[(B,)](
        logits, chosen, logprob, V, logits.stride(0),
        BLOCK_V=block_v, num_warps=min(16, max(1, block_v // 512)),
    )  # fmt: skip
    return chosen, logprob
