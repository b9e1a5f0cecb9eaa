"""The engine's settings (one EngineConfig for every instance it serves)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeshare.errors import MoeshareError


@dataclass
class EngineConfig:
    device: str = "cpu"
    dtype: torch.dtype | None = None  # default: float32 on CPU, bfloat16 on CUDA
    max_resident_variants: int | None = None  # default: all variants of a store
    max_resident_bytes: int | None = None
    # device memory this engine may use (weights, KV, work space); MoE layers' banks beyond it wait in host
    # memory and stream in per step. On CUDA the caching allocator is also held to it.
    memory_limit_bytes: int | None = None
    # temporal multiplexing: each resident variant holds its own copy of its experts, and a swap copies the
    # whole variant (experts included) from pinned host memory; nothing is shared on the device
    swap_whole_variants: bool = False
    kv_blocks: int | None = None  # default: from kv_memory_fraction of free GPU memory, 512 on CPU
    # one elastic KV pool of this many bytes for every instance (pages mapped on demand, given back when
    # their blocks are): an instance's KV range then spans the whole pool unless kv_blocks caps it
    pool_bytes: int | None = None
    pool_page_bytes: int = 2 << 20  # the elastic pool's page on CPU (CUDA uses the driver's granularity)
    # with the pool, every instance's weights live there too and can leave the device: after this many
    # seconds without a request (None: only when another model needs the pages), to host memory ("host"),
    # dropped to be read again from the checkpoint ("disk"; stores always go to host memory), or "auto":
    # host memory while it has room
    evict_after: float | None = None
    evict_to: str = "auto"
    # an evicted model with requests that has waited this long for pages busy models hold: they start no new
    # requests until it can come back
    activation_wait: float = 1.0
    kv_memory_fraction: float = 0.5
    block_size: int = 16
    # sequences one step of one instance decodes at most, and tokens it computes at most; None: each
    # instance's own, from its model and the GPU (engine/budget.py; on CPU 64 and 2048)
    max_num_seqs: int | None = None
    max_batched_tokens: int | None = None
    # prefill long prompts in chunks beside the running decodes, within max_batched_tokens (off: whole prompts,
    # a prompt longer than the budget alone in its step)
    chunked_prefill: bool = True
    # how the instances picked for a step share the GPU: "streams" (each on a CUDA stream of its own, one
    # model's batch beside another's, and none waits for another's: a model with short steps takes more of
    # them; measured better, scripts/bench_policy.py) or "serial" (one stream: their batches run one after
    # another, each step waits for all)
    multiplex: str = "streams"
    # which instances run each step: "least-slack" (requests' latency targets first, every instance with work
    # at least once every 5 steps; without targets the same as "load-order": every instance with work, every step)
    policy: str = "least-slack"
    max_tokens_limit: int = 4096
    cuda_graphs: bool = True  # capture decode steps per batch size (CUDA only)
    # queue each step before reading back the last one's tokens (host work hides behind the GPU's); off:
    # every step's events come out of that step
    overlap: bool = True

    def validate(self) -> None:
        """Refuse settings under which requests could never run (the scheduler would spin forever)."""
        at_least_one = {
            "max_num_seqs": self.max_num_seqs,
            "max_batched_tokens": self.max_batched_tokens,
            "max_tokens_limit": self.max_tokens_limit,
            "block_size": self.block_size,
            "max_resident_variants": self.max_resident_variants,
            "max_resident_bytes": self.max_resident_bytes,
            "kv_blocks": self.kv_blocks,
            "pool_bytes": self.pool_bytes,
            "pool_page_bytes": self.pool_page_bytes,
        }
        for name, value in at_least_one.items():
            if value is not None and value < 1:
                raise MoeshareError(f"{name} must be at least 1, got {value}")
        if self.policy not in ("least-slack", "load-order"):
            raise MoeshareError(f"policy must be least-slack or load-order, got {self.policy!r}")
        if self.multiplex not in ("serial", "streams"):
            raise MoeshareError(f"multiplex must be serial or streams, got {self.multiplex!r}")
        if self.evict_to not in ("auto", "host", "disk"):
            raise MoeshareError(f"evict_to must be auto, host or disk, got {self.evict_to!r}")
        if self.evict_after is not None and self.evict_after < 0:
            raise MoeshareError(f"evict_after must be at least 0 seconds, got {self.evict_after}")
        if self.evict_after is not None and self.pool_bytes is None:
            raise MoeshareError(
                "evict_after needs the page pool (pool_bytes / --pool): weights outside it stay"
            )
        page = self.pool_page_bytes
        if page < 4096 or page & (page - 1):
            raise MoeshareError(f"pool_page_bytes must be a power of two of at least 4096, got {page}")
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise MoeshareError(f"device {self.device}: no CUDA device is available here; use cpu")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return self.dtype or (torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32)
