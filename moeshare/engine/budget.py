"""Each instance's step budgets — tokens a step computes and sequences it decodes — from its model and the GPU.

A decode step reads the model's weights whatever its batch, and computes 2 FLOPs per active parameter per
token. Below the ridge batch T* = (bytes read / bandwidth) / (FLOPs per token / matmul throughput) a step
costs the same whatever its size; above it, each token adds compute time. So:

- sequences per step: T* rounded down to a power of two, within [16, 256]. More decodes than T* per step each
  add compute time, and a step's time is every running request's time per output token;
- tokens per step (chunked prefill): 4 T* rounded down to a power of two, within [256, 8192]. A step with a
  full prompt chunk then takes about four decode steps' time, so the running decodes slow by at most that
  while a long prompt is prefilled, and the chunk itself runs near the matmul roof.

An 8B-size dense model on an H200 gets 128 sequences and 512 tokens; an 8x7B-size MoE (2 of 8 experts per
token: four times the bytes per FLOP) 256 and 2048. The GPU's bandwidth and bf16 matmul throughput are
measured once per process and device (about 50 ms). On CPU no roof is measured: 64 sequences and 2048 tokens.
EngineConfig.max_num_seqs / max_batched_tokens, when set, apply to every instance instead.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from moeshare.engine.models import Footprint, Layout

CPU_SEQS, CPU_TOKENS = 64, 2048
SEQS_RANGE, TOKENS_RANGE = (16, 256), (256, 8192)
CHUNK_STEPS = 4  # a step with a full prompt chunk costs about this many decode steps


@dataclass(frozen=True)
class Roofs:
    bandwidth: float  # bytes/s a device-to-device copy reads and writes
    flops: float  # bf16 matmul FLOP/s


@dataclass(frozen=True)
class Budgets:
    tokens: int  # computed in one step at most (decodes and prompt chunks together)
    seqs: int  # running sequences at most
    ridge: float | None  # T*, the batch where a decode step turns compute-bound (None: not measured, CPU)


def _timed(fn, reps: int, device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


@functools.cache
def measure_roofs(device: torch.device) -> Roofs:
    """The device's copy bandwidth and matmul throughput (bf16 on CUDA, 0.4 GB of buffers; float32 on CPU)."""
    roofs = _measure(device)
    if (
        device.type == "cuda"
    ):  # the buffers back to the device, not the cache: KV pools are sized from what is free
        torch.cuda.empty_cache()
    return roofs


def _measure(device: torch.device) -> Roofs:
    cuda = device.type == "cuda"
    dtype, (m, k, n), nbytes = (torch.bfloat16, (4096, 8192, 4096), 128 << 20) if cuda else (
        torch.float32, (256, 512, 256), 16 << 20
    )  # fmt: skip
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy = _timed(lambda: dst.copy_(src), 10, device)
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    mm = _timed(lambda: a @ b, 10, device)
    return Roofs(2 * nbytes / copy, 2 * m * k * n / mm)


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(x).bit_length() - 1)


def row_read_bytes(fp: Footprint, layout: Layout, itemsize: int) -> int:
    """What a step reads of one row's weights: all of them but the embedding table, of which it looks up a few."""
    return layout.row_bytes - fp.lookup * itemsize


def flops_per_token(fp: Footprint, layout: Layout, itemsize: int) -> float:
    """2 FLOPs per parameter a token goes through: its row's, and top_k experts per MoE layer."""
    routed = len(layout.slots) * fp.experts_per_token * layout.slot_bytes
    return 2 * (row_read_bytes(fp, layout, itemsize) + routed) / itemsize


def ridge(fp: Footprint, layout: Layout, itemsize: int, roofs: Roofs) -> float:
    """T*: the decode batch at which one variant's step turns from reading weights to computing."""
    read = (
        row_read_bytes(fp, layout, itemsize) + len(layout.slots) * fp.experts * layout.slot_bytes
    )  # all experts
    return (read / roofs.bandwidth) / (flops_per_token(fp, layout, itemsize) / roofs.flops)


def step_budgets(
    fp: Footprint, layout: Layout, dtype: torch.dtype, device: torch.device, roofs: Roofs | None = None
) -> Budgets:
    """The default budgets of one instance (see the module's note); `roofs` measured when not given."""
    if device.type != "cuda" and roofs is None:
        return Budgets(CPU_TOKENS, CPU_SEQS, None)
    t = ridge(fp, layout, dtype.itemsize, roofs or measure_roofs(device))
    seqs = min(max(_pow2_floor(t), SEQS_RANGE[0]), SEQS_RANGE[1])
    tokens = min(max(_pow2_floor(CHUNK_STEPS * t), TOKENS_RANGE[0]), TOKENS_RANGE[1])
    return Budgets(max(tokens, seqs), seqs, t)
