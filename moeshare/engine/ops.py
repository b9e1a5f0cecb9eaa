"""The engine's kernels: Triton on CUDA tensors, the pure-torch references elsewhere (see moeshare.kernels)."""

from moeshare.kernels import add_rms_norm, fused_moe, grouped_linear, paged_attention, rotary

__all__ = ["add_rms_norm", "fused_moe", "grouped_linear", "paged_attention", "rotary"]
