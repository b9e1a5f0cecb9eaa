"""The store's names: its files, the keys inside them, the format version, and how contents are hashed.

The writer and the reader both import this module, so a name is spelled in one place."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

FORMAT = "moeshare-store"
VERSION = 1
MANIFEST = "manifest.json"
BANK = "bank.safetensors"
VARIANTS = "variants"
SHARED = f"{VARIANTS}/shared.safetensors"
TOKENIZERS = "tokenizers"
# Files beside a checkpoint that a variant needs to be served or exported, copied into the store.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def variant_file(variant: str) -> str:
    """The tensor file of the tensors only this variant has, relative to the store."""
    return f"{VARIANTS}/{variant}.safetensors"


def tokenizer_dir(variant: str) -> str:
    return f"{TOKENIZERS}/{variant}"


def bank_key(layer: str, role: str) -> str:
    """The key of one MoE layer's stacked slots of one role in bank.safetensors."""
    return f"layer.{layer}.{role}"


def sha256_tensor(t: torch.Tensor) -> str:
    """A tensor's identity: dtype, shape and bytes (the key of a shared tensor in shared.safetensors)."""
    h = hashlib.sha256(f"{t.dtype}{list(t.shape)}".encode())
    h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()
