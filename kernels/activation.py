"""Triton gated MLP activation: silu(gate) * up of a fused gate/up projection's output, in one launch.

torch's `F.silu(gate) * up` is two launches and a [T, I] round trip through memory. The rounding here is
torch's: silu in fp32 as x / (1 + exp(-x)) with an IEEE exp and division (libdevice exp, div_rn; Triton's
own exp and `/` are approximate), rounded to the activation dtype, then the product in fp32, rounded again.
Programs over (token, block of BLOCK_I columns); the grid depends only on T, so it can be captured in a CUDA
graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .grouped_gemm import INTERPRET


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, inter, stride_x, stride_o, PRECISE: tl.constexpr, BLOCK_I: tl.constexpr):
    """out[t, i] = silu(x[t, i]) * x[t, inter + i], each product rounded as torch rounds it."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    ok = offs < inter
    gate = tl.load(x_ptr + t * stride_x + offs, mask=ok, other=0.0)
    up = tl.load(x_ptr + t * stride_x + inter + offs, mask=ok, other=0.0)
    g = gate.to(tl.float32)
    if PRECISE:
        e = libdevice.exp(-g)
    else:  # the interpreter has no libdevice
        e = tl.exp(-g)
    silu = tl.math.div_rn(g, 1.0 + e).to(gate.dtype)
    out = silu.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + t * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate columns then up columns) -> silu(gate) * up [T, I], contiguous."""
    T, two_i = gate_up.shape
    inter = two_i // 2
    assert two_i == 2 * inter, gate_up.shape
    if gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    out = torch.empty(T, inter, dtype=gate_up.dtype, device=gate_up.device)
    if T == 0:
        return out
    block_i = min(1024, triton.next_power_of_2(inter))
    _silu_mul_kernel[(T, triton.cdiv(inter, block_i))](
        gate_up, out, inter, gate_up.stride(0), out.stride(0),
        PRECISE=not INTERPRET, BLOCK_I=block_i, num_warps=4,
    )  # fmt: skip
    return out
