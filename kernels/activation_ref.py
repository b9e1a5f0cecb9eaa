"""Pure-torch reference for the gated MLP activation (the CPU engine runs it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] -> silu(gate) * up [T, I], gate and up its two halves."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
