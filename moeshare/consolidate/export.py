"""`moeshare export`: one variant of a store back as an ordinary HuggingFace checkpoint."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from moeshare.checkpoint import write_checkpoint
from moeshare.store import Store


def variant_tensors(store: Store, name: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The variant's tensors in its source checkpoint's order, experts read from their bank slots."""
    variant = store.variant(name)
    adapter = store.adapter
    for key in variant.order:
        info = adapter.classify(key)
        if info.kind != "expert":
            yield key, store.tensor(name, key)
            continue
        table = variant.tables[info.layer]
        if info.expert is not None:
            yield key, store.slot(info.layer, table[info.expert])[info.role]
            continue
        # a fused source tensor (transformers-v5 layout) stacked over all experts
        slots = [store.slot(info.layer, s) for s in table]
        if info.role == "gate_up":
            yield key, torch.stack([torch.cat([s["w1"], s["w3"]]) for s in slots])
        else:
            yield key, torch.stack([s["w2"] for s in slots])


def export_variant(store_path: str | Path, name: str, out: str | Path, force: bool = False) -> Path:
    store = Store(store_path)
    variant = store.variant(name)
    tokenizer = store.tokenizer_dir(name)
    extra = sorted(tokenizer.iterdir()) if tokenizer.is_dir() else []
    about = {"store": str(store.path.resolve()), "variant": name}
    return write_checkpoint(
        out,
        variant.config,
        variant_tensors(store, name),
        copy_files=extra,
        force=force,
        inputs=[store.path],
        about=about,
    )
