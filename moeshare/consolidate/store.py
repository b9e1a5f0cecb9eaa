"""The store on disk: manifest.json, bank.safetensors, variants/*.safetensors, tokenizers/<variant>/.

A tensor that is bitwise identical in several places (same sha256) is kept once, in variants/shared.safetensors
under its hash; everything else a variant owns is in variants/<name>.safetensors under its checkpoint name.
The manifest records the size and sha256 of every other file of the store ("files"); opening a store checks
that each is there, whole, and holds the tensors the manifest names.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from moeshare.checkpoint.adapters import Adapter, adapter_for
from moeshare.checkpoint.safetensors_file import read_safetensors_header
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


def is_moeshare_store(path: Path) -> bool:
    """A directory whose manifest says it is a store (what `consolidate --force` may replace)."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


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
        if not isinstance(self.manifest, dict) or (
            self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION
        ):
            raise MoeshareError(f"{self.path / MANIFEST}: not a {FORMAT} version {VERSION} manifest")
        try:
            self.architecture: str = self.manifest["architecture"]
            self.variants = {
                v["name"]: Variant(v["name"], v["config"], v["tables"], v["tensors"], v["order"])
                for v in self.manifest["variants"]
            }
            self._check_files()
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise MoeshareError(
                f"{self.path / MANIFEST}: malformed ({type(e).__name__}: {e}); consolidate the store again"
            ) from None

    def _damaged(self, rel: str, why: str) -> MoeshareError:
        return MoeshareError(
            f"{self.path / rel}: {why}; the store is damaged or incomplete: copy it again or consolidate again"
        )

    def _check_files(self) -> None:
        """Each file is there with its recorded size, each tensor file's header is whole and holds the tensors
        the manifest names, each bank tensor has a row per slot: a one-line error names the first that is not."""
        for rel, info in self.manifest.get("files", {}).items():
            path = self.path / rel
            if not path.is_file():
                raise self._damaged(rel, "is missing")
            if (size := path.stat().st_size) != info["bytes"]:
                raise self._damaged(rel, f"has {size} bytes, the manifest records {info['bytes']}")
        headers: dict[str, dict] = {}

        def header(rel: str) -> dict:
            if rel not in headers:
                if not (self.path / rel).is_file():
                    raise self._damaged(rel, "is missing")
                headers[rel] = read_safetensors_header(self.path / rel)
            return headers[rel]

        for layer in self.manifest["bank"]["layers"]:
            for role in self.manifest["bank"]["roles"]:
                entry = header(BANK).get(bank_key(layer["layer"], role))
                if entry is None or entry["shape"][:1] != [layer["slots"]]:
                    raise self._damaged(
                        BANK, f"has no {layer['slots']} slots of {bank_key(layer['layer'], role)}"
                    )
            for v in self.variants.values():
                if not all(0 <= s < layer["slots"] for s in v.tables[layer["layer"]]):
                    raise MoeshareError(
                        f"{self.path / MANIFEST}: variant {v.name} maps an expert to no bank slot"
                    )
        for v in self.variants.values():
            for name, (rel, key) in v.tensors.items():
                if key not in header(rel):
                    raise self._damaged(rel, f"has no tensor {key} (variant {v.name}'s {name})")

    def verify(self) -> int:
        """Compare every file's sha256 with the manifest's; returns how many files were checked."""
        recorded = self.manifest.get("files")
        if not recorded:
            raise MoeshareError(
                f"{self.path / MANIFEST}: records no sha256 of the store's files (an older moeshare made it); "
                "consolidate again to make a store that can be verified"
            )
        for rel, info in sorted(recorded.items()):
            if sha256_file(self.path / rel) != info["sha256"]:
                raise self._damaged(rel, "does not match the sha256 the manifest records")
        return len(recorded)

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
