"""The engine's kernels: Triton on CUDA tensors, the pure-torch references elsewhere."""

from moeshare.kernels.grouped_gemm_ref import fused_moe_ref as fused_moe
from moeshare.kernels.grouped_gemm_ref import grouped_linear_ref as grouped_linear
from moeshare.kernels.paged_attention_ref import paged_attention_ref as paged_attention

__all__ = ["fused_moe", "grouped_linear", "paged_attention"]
