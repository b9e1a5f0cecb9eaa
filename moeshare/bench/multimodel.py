"""The multi-model benchmark's parts: model sets of dense models and a MoE store at real sizes (random weights,
`moeshare serve --synthetic`), the systems that serve them on one GPU, and a workload whose popular models go
idle halfway while cold ones burst (scripts/bench_multimodel.py runs them).

Systems, each a set of `moeshare serve` processes on loopback (`layouts`):
- `moeshare`: one server, one page pool for every model's weights and KV (weights evicted to host memory, or
  dropped when it has no room, and activated on demand), the least-slack policy, batches on a stream per model.
- `static-partition`: one server per store or checkpoint, each with an equal share of the device memory
  (`--memory-limit`): its weights and a fixed KV pool in it. A store larger than its share keeps the MoE layers
  that do not fit in host memory and copies the routed slots in per step; a dense model larger than its
  share cannot be served and is dropped (its requests fail).
- `mig-partition`: `static-partition`, and each server also holds an equal share of the SMs (CUDA MPS).
- `muxserve-style`: one server, our engine with static placement (every model's weights on the device, no
  eviction), a fixed KV quota per model (`--kv-blocks`), load-order scheduling, batches on a stream per model;
  models that do not fit, least popular first, are dropped.
- `time-share`: one server whose page pool holds the largest model's weights and its KV room, so models take
  turns on the device (a switch to the largest evicts every other; smaller ones may share the pool) and a switch
  copies the next one's weights in from pinned host memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moeshare.bench.systems import ServerSpec
from moeshare.bench.workload import Lengths, RequestSpec, WorkloadSpec, generate
from moeshare.engine.budget import SEQS_RANGE, TOKENS_RANGE
from moeshare.engine.config import EngineConfig
from moeshare.engine.models import architecture
from moeshare.engine.placement import CUDA_ALLOCATOR_SLACK, load_bytes, work_bytes
from moeshare.engine.synthetic import from_spec

GIB = 2**30
SYSTEMS = ("moeshare", "static-partition", "mig-partition", "muxserve-style", "time-share")
CUDA_ONLY = ("mig-partition",)
SLACK = 1 * GIB  # per server on a GPU: work space, the allocator's rounding, the CUDA context's own
# evicted weights go to pinned host memory while it has room, else are dropped and drawn again (a random-weight
# model's stand-in for reading its checkpoint, faster than a disk: it favours time-share, which evicts most)
EVICT_TO = "auto"
TINY = "hidden=64,intermediate=128,heads=4,kv_heads=2,vocab=300,layers=2"
DENSE_8B = "kind=llama,layers=32"  # Llama-3-8B shapes
STORE = "layers=8,variants=4,own=2"  # Mixtral-8x7B layer sizes, 8 layers, 4 variants
# name -> (dense models, store spec, dense spec)
MODEL_SETS = {
    "fits": (4, STORE, DENSE_8B),  # about 110 GB of weights: every system can hold every model
    "overflows": (8, STORE, DENSE_8B),  # more than the GPU holds: models must take turns
    "tiny": (3, f"variants=2,own=1,experts=4,{TINY}", f"kind=llama,{TINY}"),  # the CPU smoke run
}


@dataclass(frozen=True)
class Model:
    """One store or checkpoint of a set: what a server loads, the models it serves, its sizes."""

    source: str  # the --synthetic argument: NAME:SPEC for a dense model, SPEC for the store
    models: tuple[str, ...]  # the names it serves (a store: its variants)
    kind: str  # "dense" or "moe"
    weights: int  # bytes on the device with every row resident
    block: int  # bytes of one KV block of 16 tokens
    work: int  # what the engine reserves beside weights and KV: a step's work space or loading's largest draw

    @property
    def label(self) -> str:
        return self.models[0] if self.kind == "dense" else "store"


def describe(source: str, kind: str, dtype: torch.dtype = torch.bfloat16) -> Model:
    """Sizes in `dtype` (what the servers use: bfloat16 on CUDA, float32 on CPU)."""
    name, _, spec = source.rpartition(":")
    src = from_spec(spec, "meta")
    entry = architecture(src.architecture, source)
    layout = entry.layout(src, EngineConfig(), dtype)
    fp = entry.footprint(src.config)
    weights = layout.rows * layout.row_bytes + sum(layout.slots) * layout.slot_bytes
    block = 16 * fp.layers * 2 * fp.kv_heads * fp.head_dim * dtype.itemsize
    models = (name,) if name else tuple(src.variants)
    # the engine's own reservation (placement.py) at 2048 tokens and 256 sequences a step: the most it derives
    # for these sets on an H200 (the MoE store's budgets; a dense model gets 512 and 128)
    most = EngineConfig(max_batched_tokens=TOKENS_RANGE[1] // 4, max_num_seqs=SEQS_RANGE[1])
    work = max(work_bytes(most, fp, dtype), load_bytes(fp, dtype)) + CUDA_ALLOCATOR_SLACK
    return Model(source, models, kind, weights, block, work)


def model_set(name: str, dtype: torch.dtype = torch.bfloat16) -> list[Model]:
    dense, store, spec = MODEL_SETS[name]
    out = [describe(f"d{i}:{spec},seed={i + 1}", "dense", dtype) for i in range(dense)]
    return out + [describe(store, "moe", dtype)]


@dataclass(frozen=True)
class Layout:
    servers: list[ServerSpec]
    dropped: list[str]  # models no server holds (their requests fail)
    fixed: dict[str, int]  # device bytes each store or checkpoint holds for good (empty: they move)


def _gib(n: float) -> str:
    return f"{n / GIB:.3f}"


def _sources(models: list[Model]) -> tuple[str, ...]:
    return tuple(x for m in models for x in ("--synthetic", m.source))


def _names(models: list[Model]) -> tuple[str, ...]:
    return tuple(n for m in models for n in m.models)


def _share_blocks(m: Model, share: int, slack: int) -> int:
    """KV blocks of a server with `share` bytes for `m`: what its weights, work space and slack leave; a model
    whose weights do not fit (its MoE layers wait in host memory) gets a quarter of the share."""
    left = share - m.weights - m.work - slack
    return max(64, (left if left >= 64 * m.block else share // 4) // m.block)


def layout(
    system: str, models: list[Model], usable: int, popularity: list[str], slack: int = SLACK
) -> Layout:
    """The servers of `system` for `models` in `usable` bytes of device memory, `slack` bytes of it per server
    beside weights and KV; `popularity`: model names, most requested first (muxserve-style drops the least
    popular that do not fit)."""
    # into one pool the largest model loads first: each is built in device memory the pool lends while its
    # weights move into pages, which needs the pool's unused pages to hold them twice over (memory/pages.py)
    largest_first = sorted(models, key=lambda m: -m.weights)
    if system == "moeshare":
        spec = ServerSpec(
            _sources(largest_first),
            _names(largest_first),
            ("--pool", _gib(usable - slack), "--evict-to", EVICT_TO),
        )
        return Layout([spec], [], {})
    if system in ("static-partition", "mig-partition"):
        share = usable // len(models)
        kept = [m for m in models if m.kind == "moe" or m.weights + m.work + slack + 64 * m.block <= share]
        sm = max(1, 100 // len(kept)) if system == "mig-partition" else None
        servers = [
            ServerSpec(
                _sources([m]),
                m.models,
                ("--memory-limit", _gib(share), "--kv-blocks", str(_share_blocks(m, share, slack))),
                sm_percent=sm,
            )
            for m in kept
        ]
        dropped = [n for m in models if m not in kept for n in m.models]
        return Layout(servers, dropped, {m.label: share for m in kept})
    if system == "muxserve-style":
        rank = {n: i for i, n in enumerate(popularity)}
        order = sorted(models, key=lambda m: min(rank[n] for n in m.models))
        kept: list[Model] = []
        for m in order:  # each kept model needs its weights, its work space and at least 256 KV blocks beside
            trial = [*kept, m]
            if sum(x.weights + x.work + 256 * x.block for x in trial) + slack <= usable:
                kept = trial
        left = usable - sum(m.weights + m.work for m in kept) - slack
        blocks = max(16, left // max(m.block for m in kept) // len(kept) - 1)  # one quota for every model
        options = ("--memory-limit", _gib(usable), "--kv-blocks", str(blocks), "--policy", "load-order")
        spec = ServerSpec(_sources(kept), _names(kept), options)
        dropped = [n for m in models if m not in kept for n in m.models]
        return Layout([spec], dropped, {m.label: m.weights + blocks * m.block for m in kept})
    if system == "time-share":
        largest = max(m.weights for m in models)
        # the largest model's weights and room for its KV: a switch to it evicts the others (smaller models
        # may share the pool: three 8B-size dense ones fit where the 41 GiB store does)
        pool = largest + max(2 * GIB, largest // 8)
        spec = ServerSpec(
            _sources(largest_first), _names(largest_first), ("--pool", _gib(pool), "--evict-to", EVICT_TO)
        )
        return Layout([spec], [], {})
    raise ValueError(f"unknown system {system!r}; choose from {', '.join(SYSTEMS)}")


def phased_workload(
    popularity: list[str],
    rate: float,
    duration: float,
    alpha: float,
    cv: float,
    burst_cv: float,
    lengths: tuple[Lengths, Lengths],
    vocab: tuple[int, int],
    seed: int,
) -> list[RequestSpec]:
    """Two halves: Zipf(alpha) over `popularity` with gaps of coefficient of variation `cv`; then the popular
    half goes idle and the cold half takes the whole rate, least popular first, in bursts (`burst_cv`)."""
    half = duration / 2
    cold = popularity[len(popularity) // 2 :][::-1]
    first = generate(WorkloadSpec(popularity, rate, half, alpha, cv, *lengths, vocab=vocab, seed=seed))
    second = generate(WorkloadSpec(cold, rate, half, alpha, burst_cv, *lengths, vocab=vocab, seed=seed + 1))
    out = [RequestSpec(f"a{r.id}", r.variant, r.arrival_s, r.prompt_ids, r.max_tokens) for r in first]
    out += [
        RequestSpec(f"b{r.id}", r.variant, half + r.arrival_s, r.prompt_ids, r.max_tokens) for r in second
    ]
    return sorted(out, key=lambda r: r.arrival_s)


def popularity_order(models: list[Model], seed: int) -> list[str]:
    """Every served model name, most popular first: a seeded shuffle, so both kinds are among the popular."""
    names = list(_names(models))
    return [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
