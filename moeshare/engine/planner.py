"""Builds an instance: finds its architecture in the registry, sizes its KV block pool and places it under
the memory limit (placement.py), allocates the pool, and hands the pool and the placement to the instance.

Allocation follows the order `place` reserved in (the KV pool, then the model, then the weights read into
it), so what its arithmetic misses is weights that do not fit, never a KV pool.
"""

from __future__ import annotations

import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from moeshare.engine.budget import measure_roofs, step_budgets
from moeshare.engine.config import EngineConfig
from moeshare.engine.detokenize import load_tokenizer
from moeshare.engine.graphs import DecodeGraphs, LastTokens
from moeshare.engine.instance import Instance
from moeshare.engine.models import Architecture, Footprint, Layout, architecture
from moeshare.engine.placement import Placement, default_blocks, out_of_memory, place
from moeshare.engine.runner import Runner
from moeshare.engine.source import Source
from moeshare.engine.stepcost import StepCost
from moeshare.errors import MoeshareError
from moeshare.memory.blocks import BlockPool
from moeshare.memory.elastic import ElasticBlockPool, block_stride
from moeshare.memory.pages import PageManager
from moeshare.memory.weights import WeightArena, arena_pages, size


def weights_owner(model: str) -> str:
    """The page pool's owner name of an instance's weights (its KV's owner is the model name itself)."""
    return f"{model} weights"


def open_source(target: str | Path | Any) -> Any:
    """A store or HF checkpoint directory, or any object with Source's interface (e.g. a synthetic one)."""
    return Source(target) if isinstance(target, str | Path) else target


def model_names(source: Any, name: str | None) -> dict[str, str]:
    """Model name -> the source's variant: a store's variants by their names; a checkpoint by `name` if given."""
    if name is None:
        return {v: v for v in source.variants}
    if len(source.variants) != 1:
        raise MoeshareError(
            f"{source.path}: a name ({name}=PATH) is for a single checkpoint; this store has "
            f"{len(source.variants)} variants, served under their own names"
        )
    if not name or "=" in name:
        raise MoeshareError(f"{name!r} is not a model name: give NAME=PATH with a non-empty NAME")
    return {name: source.variants[0]}


class Planned(NamedTuple):
    entry: Architecture
    footprint: Footprint
    layout: Layout
    blocks: int  # KV blocks
    placement: Placement
    config: EngineConfig  # the instance's: the engine's with its own step budgets where that leaves them None


def plan(
    source: Any, config: EngineConfig, left: int | None, target: object, pages: PageManager | None = None
) -> Planned:
    """Where an instance of `source` would go (see Planned). With `pages` (the elastic pool) its KV range
    spans the pool and takes nothing of `left`. Allocates nothing; raises the one-line MoeshareError of a
    source or a memory limit that cannot serve."""
    entry = architecture(source.architecture, target)
    dtype, device = config.torch_dtype, config.torch_device
    fp = entry.footprint(source.config)
    layout = entry.layout(source, config, dtype)
    c = config
    if c.max_num_seqs is None or c.max_batched_tokens is None:
        budgets = step_budgets(fp, layout, dtype, device)
        # an explicit budget bounds the derived one: every decode of a step fits its token budget
        seqs = c.max_num_seqs or min(budgets.seqs, c.max_batched_tokens or budgets.seqs)
        c = replace(
            c, max_num_seqs=seqs, max_batched_tokens=c.max_batched_tokens or max(budgets.tokens, seqs)
        )
    if pages is not None:
        per_block = BlockPool.block_bytes(c.block_size, fp.layers, fp.kv_heads, fp.head_dim, dtype)
        whole = pages.total_bytes // block_stride(per_block, pages.page_bytes) - 1
        blocks = min(c.kv_blocks or whole, whole)
        if blocks < 1:
            raise MoeshareError(
                f"{target}: one KV block ({per_block} bytes) and the scratch block do not fit in the "
                f"{pages.total_bytes} bytes of --pool: raise it"
            )
    else:
        blocks = c.kv_blocks or default_blocks(c, fp, dtype, device, left)
    placement = place(
        None if pages is not None else left,  # with the pool the weights live there: no offloading
        c,
        fp,
        dtype,
        device,
        layout.rows,
        list(layout.slots),
        blocks,
        layout.row_bytes,
        layout.slot_bytes,
        kv_elsewhere=pages is not None,
    )
    if pages is not None:
        weights = placement.rows + placement.banks
        if arena_pages(pages.pages_for(weights)) + 1 > pages.total_pages:  # and its KV scratch block's page
            raise MoeshareError(
                f"{target}: its weights ({size(weights)}) and one KV page exceed the pool's "
                f"{size(pages.total_bytes)}, so it could never be on the device: raise --pool"
            )
        if left is not None and placement.work > left:
            raise MoeshareError(
                f"{target}: the memory limit leaves {left / 2**30:.2f} GiB beside the pool, below its work "
                f"space of {placement.work / 2**30:.2f} GiB: raise --memory-limit or lower --pool"
            )
    return Planned(entry, fp, layout, blocks, placement, c)


def build_instance(
    source: Any,
    names: dict[str, str],
    config: EngineConfig,
    left: int | None,
    target: object = None,
    pages: PageManager | None = None,
) -> Instance:
    """The instance serving `names` of `source` (opened by open_source from `target`), placed in `left`
    bytes (what is left of the memory limit; None: no limit). Raises MoeshareError with one line, holding
    nothing, if it does not fit."""
    target = target if target is not None else source.path
    entry, fp, layout, blocks, placement, c = plan(source, config, left, target, pages)
    dtype, device = c.torch_dtype, c.torch_device
    # tokenizers before any device memory: one that does not load is one line, and nothing was taken
    tokenizers = {m: load_tokenizer(source.tokenizer_dir(v)) for m, v in names.items()}
    # the GPU's roofs (measured once, before this instance holds any memory) for its steps' floors
    cost = StepCost(fp, layout, source, names, dtype.itemsize, measure_roofs(device), c.swap_whole_variants)
    oom = ""
    kv = (blocks, c.block_size, fp.layers, fp.kv_heads, fp.head_dim, dtype)
    pool = ElasticBlockPool(pages, next(iter(names)), *kv) if pages is not None else None
    weights, lent = None, 0
    try:
        pool = pool or BlockPool(*kv, device)
        # with the pool, the model is built in torch's memory (pages the pool does not use now are lent for it,
        # with room for a tensor being read) and then moves into the pool: its weights can leave the device and
        # come back
        lent = pages.lend(placement.rows + placement.banks + (1 << 30)) if pages is not None else 0
        model, residency = entry.build(source, names, layout, placement.offload, c, dtype, device)
        if pages is not None:
            weights = WeightArena(pages, weights_owner(next(iter(names))), model, device)
            if device.type == "cuda":  # what the model was built in goes back to the device, not the cache
                torch.cuda.empty_cache()
            pages.take_back(lent)
            lent = 0
        last = LastTokens(c.max_num_seqs, device)
        graphs = None
        if device.type == "cuda" and c.cuda_graphs and not placement.offload:
            graphs = DecodeGraphs(model, pool, device, c.max_num_seqs, fp.context, last)
            graphs.capture()
        runner = Runner(model, pool, device, last, graphs)
        if device.type == "cuda" and not placement.offload:  # Triton compiles now, not under traffic
            runner.warm_up(c.max_num_seqs, c.max_batched_tokens, fp.context)
    except torch.OutOfMemoryError as e:  # kept outside the handler, so nothing holds what was allocated
        oom = str(e).split("\n")[0]
    except BaseException as e:  # a checkpoint that does not load: its KV range and pages go back too
        if isinstance(pool, ElasticBlockPool):
            pool.release()
        if weights is not None:
            weights.release()
        if (
            lent
        ):  # what the model was built in goes back to the device first, so the lent pages can be made again
            traceback.clear_frames(e.__traceback__)  # the failed build's frames hold its tensors
            model = residency = None  # noqa: F841 (this frame's hold on them)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            pages.take_back(lent)
        raise
    if oom:
        if isinstance(pool, ElasticBlockPool):
            pool.release()
        if weights is not None:
            weights.release()
        torch.cuda.empty_cache()
        if pages is not None:
            pages.take_back(lent)
        raise MoeshareError(out_of_memory(target, placement, left, oom))
    return Instance(
        source,
        source.config.get("model_type") or entry.name,  # what users know it by: qwen2, mistral, ...
        entry.kind,
        names,
        fp,
        model,
        residency,
        pool,
        runner,
        c,
        tokenizers,
        offloaded_layers=len(placement.offload),
        placed_bytes=(placement.work if pages is not None else placement.total) if left is not None else 0,
        weights=weights,
        cost=cost,
    )
