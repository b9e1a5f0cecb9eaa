"""A store opened for reading: its manifest checked, every file checked to be there and whole, tensors read
on request."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from moeshare.checkpoint.adapters import Adapter, adapter_for
from moeshare.checkpoint.safetensors_file import read_safetensors_header
from moeshare.errors import MoeshareError
from moeshare.store.bank import from_bank
from moeshare.store.format import BANK, FORMAT, MANIFEST, bank_key, sha256_file, tokenizer_dir
from moeshare.store.manifest import Manifest, VariantEntry, read_manifest


def is_store(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def is_moeshare_store(path: str | Path) -> bool:
    """A directory whose manifest says it is a store (what `consolidate --force` may replace)."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


class Store:
    """A store opened for reading; tensors are read on request."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not is_store(self.path):
            raise MoeshareError(
                f"{self.path}: not a moeshare store (no {MANIFEST}); make one with moeshare consolidate"
            )
        self.manifest: Manifest = read_manifest(self.path)
        self.architecture: str = self.manifest.architecture
        self.config: dict = self.manifest.config
        self.variants: dict[str, VariantEntry] = self.manifest.variants
        try:
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
        for rel, info in self.manifest.files.items():
            path = self.path / rel
            if not path.is_file():
                raise self._damaged(rel, "is missing")
            if (size := path.stat().st_size) != info.bytes:
                raise self._damaged(rel, f"has {size} bytes, the manifest records {info.bytes}")
        headers: dict[str, dict] = {}

        def header(rel: str) -> dict:
            if rel not in headers:
                if not (self.path / rel).is_file():
                    raise self._damaged(rel, "is missing")
                headers[rel] = read_safetensors_header(self.path / rel)
            return headers[rel]

        for layer in self.manifest.layers.values():
            for role in self.manifest.roles:
                key = bank_key(layer.layer, role)
                entry = header(BANK).get(key)
                if entry is None or entry["shape"][:1] != [layer.slots]:
                    raise self._damaged(BANK, f"has no {layer.slots} slots of {key}")
            for v in self.variants.values():
                if not all(0 <= s < layer.slots for s in v.tables[layer.layer]):
                    raise MoeshareError(
                        f"{self.path / MANIFEST}: variant {v.name} maps an expert to no bank slot"
                    )
        for v in self.variants.values():
            for name, (rel, key) in v.tensors.items():
                if key not in header(rel):
                    raise self._damaged(rel, f"has no tensor {key} (variant {v.name}'s {name})")

    def verify(self) -> int:
        """Compare every file's sha256 with the manifest's; returns how many files were checked."""
        if not self.manifest.files:
            raise MoeshareError(
                f"{self.path / MANIFEST}: records no sha256 of the store's files (an older moeshare made it); "
                "consolidate again to make a store that can be verified"
            )
        for rel, info in sorted(self.manifest.files.items()):
            if sha256_file(self.path / rel) != info.sha256:
                raise self._damaged(rel, "does not match the sha256 the manifest records")
        return len(self.manifest.files)

    @property
    def adapter(self) -> Adapter:
        return adapter_for(self.config, self.path / MANIFEST)

    def variant(self, name: str) -> VariantEntry:
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

    def slots(self, layer: str) -> int:
        """How many bank slots one MoE layer has."""
        return self.manifest.layers[layer].slots

    def bank_slice(self, layer: str, role: str, slot: int) -> torch.Tensor:
        """One slot of one bank tensor, read without the rest of the layer."""
        return self._read(BANK, bank_key(layer, role), slot)

    def bank_slot(self, layer: str, slot: int) -> dict[str, torch.Tensor]:
        """One bank slot in the fused layout. {role: [...]}"""
        return {r: self.bank_slice(layer, r, slot) for r in self.manifest.roles}

    def slot(self, layer: str, slot: int) -> dict[str, torch.Tensor]:
        """One bank slot in the canonical per-expert roles."""
        return from_bank(self.architecture, self.bank_slot(layer, slot))

    def tokenizer_dir(self, variant: str) -> Path:
        return self.path / tokenizer_dir(self.variant(variant).name)
