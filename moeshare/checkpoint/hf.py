"""A checkpoint loaded with transformers: the reference our runtime is checked against, and what calibration
runs. Imported only where it is needed, as transformers is slow to import."""

from __future__ import annotations

from pathlib import Path

import torch

# Adapters whose checkpoints are encoder-decoders; every other one is a causal LM.
SEQ2SEQ = ("switch",)


def load_model(path: Path, arch: str, device: str = "cpu") -> torch.nn.Module:
    """A checkpoint in transformers, float32, in eval mode: Switch as an encoder-decoder, the rest causal.
    arch: the checkpoint adapter's name."""
    from transformers import AutoModelForCausalLM, SwitchTransformersForConditionalGeneration

    cls = SwitchTransformersForConditionalGeneration if arch in SEQ2SEQ else AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=torch.float32).to(device).eval()
