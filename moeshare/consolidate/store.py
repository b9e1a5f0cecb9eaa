"""The store on disk: manifest.json, bank.safetensors, variants/*.safetensors, tokenizers/<variant>/.

A tensor that is bitwise identical in several places (same sha256) is kept once, in variants/shared.safetensors
under its hash; everything else a variant owns is in variants/<name>.safetensors under its checkpoint name.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from moeshare.checkpoint.adapters import Adapter, adapter_for
from moeshare.consolidate.experts import bank_key, from_bank
from moeshare.errors import MoeshareError

FORMAT = "moeshare-store"
VERSION = 1
MANIFEST = "manifest.json"
BANK = "bank.safetensors"
SHARED = "variants/shared.safetensors"
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


def sha256_tensor(t: torch.Tensor) -> str:
    h = hashlib.sha256(f"{t.dtype}{list(t.shape)}".encode())
    h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def is_store(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


@dataclass
class Variant:
    name: str
    config: dict
    tables: dict[str, list[int]]  # MoE layer -> bank slot of each local expert
    tensors: dict[str, list[str]]  # non-expert tensor name -> [file in the store, key in that file]
    order: list[str]  # every tensor name of the source checkpoint, in its order


class Store:
    """A store opened for reading; tensors are read on request."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not is_store(self.path):
            raise MoeshareError(
                f"{self.path}: not a moeshare store (no {MANIFEST}); make one with moeshare consolidate"
            )
        try:
            self.manifest = json.loads((self.path / MANIFEST).read_text())
        except json.JSONDecodeError as e:
            raise MoeshareError(
                f"{self.path / MANIFEST}: not valid JSON (line {e.lineno}: {e.msg})"
            ) from None
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise MoeshareError(f"{self.path / MANIFEST}: not a {FORMAT} version {VERSION} manifest")
        self.architecture: str = self.manifest["architecture"]
        self.variants = {
            v["name"]: Variant(v["name"], v["config"], v["tables"], v["tensors"], v["order"])
            for v in self.manifest["variants"]
        }

    @property
    def adapter(self) -> Adapter:
        return adapter_for(self.manifest["config"], self.path / MANIFEST)

    def variant(self, name: str) -> Variant:
        if name not in self.variants:
            raise MoeshareError(f"{self.path}: no variant {name!r} (variants: {', '.join(self.variants)})")
        return self.variants[name]

    def _read(self, rel: str, key: str, index: int | None = None) -> torch.Tensor:
        # a handle per read, so the files are not left mapped (and resident) after loading
        with safe_open(str(self.path / rel), framework="pt") as f:
            return f.get_tensor(key) if index is None else f.get_slice(key)[index]

    def tensor(self, variant: str, name: str) -> torch.Tensor:
        file, key = self.variant(variant).tensors[name]
        return self._read(file, key)

    def bank_slice(self, layer: str, role: str, slot: int) -> torch.Tensor:
        """One slot of one bank tensor, read without the rest of the layer."""
        return self._read(BANK, bank_key(layer, role), slot)

    def manifest_layer(self, layer: str) -> dict:
        return next(x for x in self.manifest["bank"]["layers"] if x["layer"] == layer)

    def slot(self, layer: str, slot: int) -> dict[str, torch.Tensor]:
        """One bank slot in the canonical per-expert roles."""
        roles = self.manifest["bank"]["roles"]
        return from_bank(self.architecture, {r: self.bank_slice(layer, r, slot) for r in roles})

    def tokenizer_dir(self, variant: str) -> Path:
        return self.path / "tokenizers" / self.variant(variant).name
