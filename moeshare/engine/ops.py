"""The engine's kernels: Triton on CUDA tensors, the pure-torch references elsewhere (see moeshare.kernels)."""

from moeshare.kernels import fused_moe, grouped_linear, paged_attention

__all__ = ["fused_moe", "grouped_linear", "paged_attention"]
