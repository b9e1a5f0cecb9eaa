"""Writing a store into a fresh directory: the bank streamed layer by layer, the variants' own tensors (a tensor
held bitwise-identical more than once kept once, in shared.safetensors under its sha256), their tokenizer
files, and last the manifest, which records every other file's size and sha256."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import torch

from moeshare.checkpoint import Checkpoint
from moeshare.checkpoint.safetensors_file import StreamingSafetensorsWriter, write_safetensors
from moeshare.store.bank import BANK_ROLES, to_bank
from moeshare.store.format import (
    BANK,
    FORMAT,
    SHARED,
    TOKENIZER_FILES,
    VARIANTS,
    VERSION,
    bank_key,
    sha256_file,
    sha256_tensor,
    tokenizer_dir,
    variant_file,
)
from moeshare.store.manifest import write_manifest


class StoreWriter:
    """Writes one store into `root`, an empty directory (the caller renames it into place when all is written).

    bank: per MoE layer in order, (layer, slots, one expert in its canonical roles, for shapes and dtypes)."""

    def __init__(self, root: Path, arch: str, bank: list[tuple[str, int, dict[str, torch.Tensor]]]) -> None:
        self.root, self.arch = Path(root), arch
        self.roles = BANK_ROLES[arch]
        self.files: dict[str, str] = {}  # path in the store -> sha256
        specs = []
        for layer, slots, expert in bank:
            fused = to_bank(arch, expert)
            specs += [(bank_key(layer, r), fused[r].dtype, (slots, *fused[r].shape)) for r in self.roles]
        (self.root / VARIANTS).mkdir(parents=True, exist_ok=True)
        self._bank = StreamingSafetensorsWriter(self.root / BANK, specs)

    def write_layer(self, layer: str, experts: list[dict[str, torch.Tensor]]) -> int:
        """One MoE layer's slots, each an expert in its canonical roles; returns the bytes written."""
        fused = [to_bank(self.arch, e) for e in experts]
        written = 0
        for r in self.roles:
            t = torch.stack([f[r] for f in fused])  # [S, ...]
            self._bank.write(bank_key(layer, r), t)
            written += t.numel() * t.element_size()
        return written

    def write_variants(self, ckpts: list[Checkpoint], tables: dict[str, dict[str, list[int]]]) -> list[dict]:
        """Every variant's non-expert tensors and tokenizer files, after the bank; a variant is named after its
        checkpoint's directory. tables: variant -> MoE layer -> bank slot of each local expert."""
        self.files[BANK] = self._bank.close()
        entries = self._write_tensors(ckpts)
        for ckpt, entry in zip(ckpts, entries, strict=True):
            entry["tables"] = tables[entry["name"]]
            self._copy_tokenizer(entry["name"], ckpt.path)
        return entries

    def _write_tensors(self, ckpts: list[Checkpoint]) -> list[dict]:
        hashes = [
            {n: sha256_tensor(c.tensor(n)) for n in c.names if c.adapter.classify(n).kind != "expert"}
            for c in ckpts
        ]
        seen = Counter(h for per in hashes for h in per.values())
        shared: dict[str, torch.Tensor] = {}
        entries = []
        for ckpt, per in zip(ckpts, hashes, strict=True):
            name, own, tensors = ckpt.path.name, {}, {}
            rel = variant_file(name)
            for key, h in per.items():
                if seen[h] > 1:
                    shared.setdefault(h, ckpt.tensor(key))
                    tensors[key] = [SHARED, h]
                else:
                    own[key] = ckpt.tensor(key)
                    tensors[key] = [rel, key]
            self.files[rel] = write_safetensors(self.root / rel, own)
            entries.append(
                {
                    "name": name,
                    "source": str(ckpt.path.resolve()),
                    "config": ckpt.config,
                    "files": {f.name: sha256_file(f) for f in ckpt.files},
                    "tensor_file": rel,
                    "tensors": tensors,
                    "order": list(ckpt.names),
                }
            )
        if shared:
            self.files[SHARED] = write_safetensors(self.root / SHARED, shared)
        return entries

    def _copy_tokenizer(self, variant: str, source: Path) -> None:
        tok = self.root / tokenizer_dir(variant)
        tok.mkdir(parents=True)
        for f in TOKENIZER_FILES:
            if (source / f).is_file():
                shutil.copyfile(source / f, tok / f)  # content only: the mode follows the umask
                self.files[f"{tokenizer_dir(variant)}/{f}"] = sha256_file(tok / f)

    def tensor_bytes(self) -> int:
        """The size of every tensor file written so far."""
        return sum(p.stat().st_size for p in self.root.rglob("*.safetensors"))

    def finish(self, config: dict, variants: list[dict], bank: dict, **more: object) -> dict:
        """Write manifest.json, the store's last file, and return it. bank: what the consolidator records
        (experts_per_variant, per layer its slots and their members); more: further top-level fields."""
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "architecture": self.arch,
            "config": config,
            "variants": variants,
            "bank": {"roles": list(self.roles), **bank},
            **more,
            "files": {
                rel: {"bytes": (self.root / rel).stat().st_size, "sha256": h}
                for rel, h in sorted(self.files.items())
            },
        }
        write_manifest(self.root, manifest)
        return manifest
