"""The engine's kernels: Triton on CUDA tensors, the pure-torch references elsewhere (see moeshare.kernels)."""

from moeshare.kernels import (
    add_rms_norm,
    fused_moe,
    fused_moe_relu,
    greedy_pick,
    grouped_linear,
    paged_attention,
    rotary,
    rotary_store,
    route,
    silu_mul,
    warm_up_attention,
)

__all__ = [
    "add_rms_norm",
    "fused_moe",
    "fused_moe_relu",
    "greedy_pick",
    "grouped_linear",
    "paged_attention",
    "rotary",
    "route",
    "rotary_store",
    "silu_mul",
    "warm_up_attention",
]
