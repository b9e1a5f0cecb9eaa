"""The bank's fused layout: each slot as transformers v5 stacks an expert, and the canonical roles it holds."""

from __future__ import annotations

import torch

# The roles of one bank slot, per architecture.
BANK_ROLES = {"mixtral": ("w13", "w2"), "switch": ("wi", "wo")}


def to_bank(arch: str, expert: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An expert in its canonical roles -> one slot in the fused layout."""
    if arch == "mixtral":
        return {"w13": torch.cat([expert["w1"], expert["w3"]], dim=0), "w2": expert["w2"]}  # [2I, H], [H, I]
    return {"wi": expert["wi"], "wo": expert["wo"]}  # [F, D], [D, F]


def from_bank(arch: str, slot: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One slot in the fused layout -> the expert in its canonical roles."""
    if arch == "mixtral":
        w1, w3 = slot["w13"].chunk(2, dim=0)
        return {"w1": w1.contiguous(), "w3": w3.contiguous(), "w2": slot["w2"]}
    return {"wi": slot["wi"], "wo": slot["wo"]}
