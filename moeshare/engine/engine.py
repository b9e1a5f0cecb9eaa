"""The engine: load stores, add requests, step, stream tokens, cancel, stats. Used by the server and tests."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer

from moeshare.engine.attention import AttnBatch
from moeshare.engine.graphs import DecodeGraphs
from moeshare.engine.models.mixtral import MixtralDims, MultiVariantMixtral, variant_tensor_names
from moeshare.engine.placement import Placement, default_blocks, out_of_memory, place
from moeshare.engine.request import (
    FinishReason,
    InvalidRequest,
    RequestTooLarge,
    SamplingParams,
    Sequence,
    Status,
    UnknownModel,
    clip,
)
from moeshare.engine.residency import LazyTensor, Residency
from moeshare.engine.sampling import SamplingBatch, sample
from moeshare.engine.scheduler import Scheduled, Scheduler
from moeshare.engine.source import Source
from moeshare.errors import MoeshareError
from moeshare.memory.pool import PagePool

log = logging.getLogger(__name__)


class EngineFailed(MoeshareError):
    """The engine cannot go on (a device error that every later step would hit too)."""


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
    kv_memory_fraction: float = 0.5
    block_size: int = 16
    max_num_seqs: int = 64
    max_batched_tokens: int = 2048
    max_tokens_limit: int = 4096
    cuda_graphs: bool = True  # capture decode steps per batch size (CUDA only)

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
        }
        for name, value in at_least_one.items():
            if value is not None and value < 1:
                raise MoeshareError(f"{name} must be at least 1, got {value}")
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise MoeshareError(f"device {self.device}: no CUDA device is available here; use cpu")


@dataclass
class TokenEvent:
    seq_id: int
    request_id: str
    variant: str
    token_id: int
    text: str  # newly decodable text
    logprob: float
    finished: bool
    finish_reason: FinishReason | None
    error: str = ""  # with FinishReason.ERROR: what went wrong


@dataclass
class Group:
    """One store: its model (bank + resident rows), page pool, scheduler and tokenizers."""

    source: Source
    model: MultiVariantMixtral
    pool: PagePool
    residency: Residency
    scheduler: Scheduler
    tokenizers: dict
    eos: set[int]
    context: int
    token_chars: dict[str, int]  # per variant: the most characters one token stands for
    graphs: DecodeGraphs | None = None
    placed_bytes: int = 0  # what the store takes under the memory limit (0 without one)
    texts: dict[int, str] = field(default_factory=dict)


def _tokenizer(directory: Path | None):
    """The variant's tokenizer, or None where it has none (then requests send token ids)."""
    if directory is None or not any(
        (Path(directory) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")
    ):
        return None
    return AutoTokenizer.from_pretrained(directory)


def _token_chars(tokenizer) -> int:
    """An upper bound on the characters one token covers, so a prompt too long for the context is refused
    before it is tokenized."""
    return max((len(t) for t in tokenizer.get_vocab()), default=1) if tokenizer is not None else 1


def _settled(text: str, stops: tuple[str, ...]) -> str:
    """The part of a running request's text that can be streamed: an incomplete UTF-8 character, or a tail
    that may be the start of a stop string, waits for the next token."""
    text = text.rstrip("\ufffd")
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    return text[: len(text) - hold]


class Engine:
    def __init__(self, paths: list[str | Path], config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.config.validate()
        self.device = torch.device(self.config.device)
        self.dtype = self.config.dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.groups: list[Group] = []
        self.variant_group: dict[str, Group] = {}
        self.seqs: dict[int, Sequence] = {}
        self.steps = 0
        limit = self.config.memory_limit_bytes
        if limit is not None and self.device.type == "cuda":  # hold the caching allocator to the limit too
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            total = torch.cuda.get_device_properties(index).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), index)
        for path in paths:
            self.load(path)

    # ---- loading -----------------------------------------------------------------------------------------

    def load(self, path: str | Path | Source) -> list[str]:
        """Serve a store, an HF checkpoint, or any object with Source's interface (e.g. RandomMixtralSource)."""
        source = path if hasattr(path, "bank_slot") else Source(path)
        if source.architecture != "mixtral":
            raise MoeshareError(f"{path}: serving {source.architecture} is not supported yet (mixtral is)")
        if clash := [v for v in source.variants if v in self.variant_group]:
            raise MoeshareError(f"{path}: variant {clash[0]!r} is already served; unload it first")
        c = self.config
        dims = MixtralDims.from_config(source.config)
        layers = source.adapter.moe_layers
        probe = MultiVariantMixtral(dims, 1, [], self.dtype, torch.device("meta"))
        row_bytes = probe.row_bytes() + (
            dims.layers * dims.experts * probe.expert_bytes() if c.swap_whole_variants else 0
        )
        rows = min(c.max_resident_variants or len(source.variants), len(source.variants))
        if c.max_resident_bytes is not None:
            rows = max(1, min(rows, c.max_resident_bytes // row_bytes))
        if c.swap_whole_variants:
            slots = [rows * dims.experts] * len(layers)
        else:
            slots = [source.bank_slots(x) for x in layers]
        left = (
            None
            if c.memory_limit_bytes is None
            else c.memory_limit_bytes - sum(g.placed_bytes for g in self.groups)
        )
        blocks = c.kv_blocks or default_blocks(c, dims, self.dtype, self.device, left)
        sizes = (probe.row_bytes(), probe.expert_bytes())
        placement = place(left, c, dims, self.dtype, self.device, rows, slots, blocks, *sizes)
        oom, graphs = "", None
        try:
            pool, model, residency = self._allocate(source, placement, rows, slots, blocks)
            if self.device.type == "cuda" and c.cuda_graphs and not model.offload:
                graphs = DecodeGraphs(model, pool, c.max_num_seqs, dims.max_positions)
                graphs.capture()
        except torch.OutOfMemoryError as e:  # kept outside the handler, so nothing holds what was allocated
            oom = str(e).split("\n")[0]
        if oom:
            torch.cuda.empty_cache()
            raise MoeshareError(out_of_memory(path, placement, left, oom))
        placed = placement.total if left is not None else 0
        scheduler = Scheduler(pool, residency, c.max_num_seqs, c.max_batched_tokens)
        tokenizers = {v: _tokenizer(source.tokenizer_dir(v)) for v in source.variants}
        eos = source.config.get("eos_token_id")
        eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        group = Group(
            source,
            model,
            pool,
            residency,
            scheduler,
            tokenizers,
            eos,
            dims.max_positions,
            {v: _token_chars(t) for v, t in tokenizers.items()},
            graphs=graphs,
            placed_bytes=placed,
        )
        self.groups.append(group)
        for v in source.variants:
            self.variant_group[v] = group
        return source.variants

    def _allocate(
        self, source: Source, placement: Placement, rows: int, slots: list[int], blocks: int
    ) -> tuple[PagePool, MultiVariantMixtral, Residency]:
        """The KV pool first, then the model, then the weights read into it: in the order `place` reserved
        them, so what its arithmetic misses is weights that do not fit, never a KV pool."""
        c, layers = self.config, source.adapter.moe_layers
        dims = MixtralDims.from_config(source.config)
        names = variant_tensor_names(dims)
        pool = PagePool(
            blocks, c.block_size, dims.layers, dims.kv_heads, dims.head_dim, self.dtype, self.device
        )
        model = MultiVariantMixtral(
            dims, rows, slots, self.dtype, self.device, placement.offload, c.swap_whole_variants
        )
        # the bank: on the device (layers beyond the memory limit in host memory), or with whole-variant
        # swaps all of it in host memory, a variant's experts moving in with the rest of its weights
        private = c.swap_whole_variants
        host = [model.empty_bank(source.bank_slots(x), host=True) for x in layers] if private else []
        for i, layer in enumerate(layers):  # one slot at a time: host memory holds one expert, not the bank
            for slot in range(source.bank_slots(layer)):
                weights = source.bank_slot(layer, slot)
                if private:
                    for role, t in weights.items():
                        host[i][role][slot].copy_(t)
                else:
                    model.load_slot(i, slot, weights)

        def fetch(v: str) -> tuple[dict, torch.Tensor]:
            tensors: dict = {k: LazyTensor(source, v, n) for k, n in names.items()}
            table = torch.tensor([source.table(v, layer) for layer in layers])
            if not private:
                return tensors, table
            for i in range(len(layers)):
                for e, slot in enumerate(table[i].tolist()):
                    tensors |= {f"bank.{i}.{e}.{r}": t[slot] for r, t in host[i].items()}
            return tensors, torch.arange(dims.experts).expand(len(layers), -1).clone()

        return pool, model, Residency(rows, source.variants, fetch, model.load, self.device)

    def unload(self, variant: str) -> list[str]:
        """Stop serving the store that holds `variant`: cancel its sequences (their KV goes back at once) and
        drop its model, pool and tokenizers. Returns the variants that were unloaded."""
        group = self._group(variant)
        for seq in [s for s in self.seqs.values() if self.variant_group.get(s.variant) is group]:
            self._finish(group, seq, FinishReason.CANCELLED)
        self.groups.remove(group)
        names = [v for v, g in self.variant_group.items() if g is group]
        for v in names:
            del self.variant_group[v]
        return names

    @property
    def variants(self) -> list[str]:
        return list(self.variant_group)

    def serves(self, variant: str) -> bool:
        """Whether a loaded store has `variant` (safe from any thread)."""
        return variant in self.variant_group

    def tokenizer(self, variant: str):
        return self._group(variant).tokenizers[variant]

    def _group(self, variant: str) -> Group:
        if variant not in self.variant_group:
            raise UnknownModel(
                f"unknown model {clip(variant)}; served models: {', '.join(self.variant_group) or 'none'}"
            )
        return self.variant_group[variant]

    # ---- requests ----------------------------------------------------------------------------------------

    def prepare(self, variant: str, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Validate a request and tokenize its prompt; returns the prompt's token ids. Touches nothing, so
        any thread may call it (the server tokenizes long prompts off the engine thread)."""
        group = self._group(variant)
        params.validate(self.config.max_tokens_limit)
        if isinstance(prompt, str):
            tokenizer = group.tokenizers[variant]
            if tokenizer is None:
                raise InvalidRequest(f"{variant} has no tokenizer: send token ids")
            most = (group.context - 1) * group.token_chars[variant]
            if len(prompt) > most:
                raise RequestTooLarge(
                    f"prompt is {len(prompt)} characters; {variant} takes at most {group.context - 1} "
                    f"tokens (at most {most} characters)"
                )
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            ids = list(prompt)
        if not ids:
            raise InvalidRequest("prompt is empty")
        if len(ids) >= group.context:
            raise RequestTooLarge(f"prompt is {len(ids)} tokens; {variant} takes at most {group.context - 1}")
        if any(not 0 <= t < group.model.dims.vocab for t in ids):
            raise InvalidRequest(f"prompt has token ids outside [0, {group.model.dims.vocab})")
        total = min(len(ids) + params.max_tokens, group.context)
        if group.pool.blocks_for(total) > group.pool.num_blocks:
            raise RequestTooLarge(
                f"prompt + max_tokens = {total} tokens needs {group.pool.blocks_for(total)} KV blocks; "
                f"the pool has {group.pool.num_blocks}: lower max_tokens or shorten the prompt"
            )
        return ids

    def add_request(
        self,
        variant: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str = "",
    ) -> Sequence:
        """Validate and queue; raises before anything is touched if the request is bad."""
        params = params or SamplingParams()
        ids = self.prepare(variant, prompt, params)
        group = self._group(variant)
        if params.seed is None:
            params = SamplingParams(**{**params.__dict__, "seed": int.from_bytes(os.urandom(6), "little")})
        seq = Sequence(variant, ids, params, request_id=request_id, arrival=time.perf_counter())
        self.seqs[seq.seq_id] = seq
        group.scheduler.add(seq)
        return seq

    def cancel(self, seq_id: int) -> bool:
        seq = self.seqs.get(seq_id)
        if seq is None or seq.finished:
            return False
        self._finish(self._group(seq.variant), seq, FinishReason.CANCELLED)
        return True

    def has_work(self) -> bool:
        return any(g.scheduler.running or g.scheduler.waiting for g in self.groups)

    def _finish(self, group: Group, seq: Sequence, reason: FinishReason) -> None:
        seq.status, seq.finish_reason, seq.finish_time = Status.FINISHED, reason, time.perf_counter()
        group.scheduler.release(seq)
        group.texts.pop(seq.seq_id, None)
        self.seqs.pop(seq.seq_id, None)

    # ---- stepping ----------------------------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        """One batch per store. A batch that fails ends its own sequences with FinishReason.ERROR (their KV
        goes back) and the engine serves on; raises EngineFailed only if the device itself is broken."""
        events: list[TokenEvent] = []
        for group in self.groups:
            batch = group.scheduler.schedule()
            if not batch:
                continue
            try:
                events += self._run(group, batch)
            except Exception as e:
                events += self._fail(group, batch, e)
        self.steps += 1
        return events

    def _fail(self, group: Group, batch: list[Scheduled], error: Exception) -> list[TokenEvent]:
        log.error(
            "a step of %s failed; its %d request(s) end with an error",
            group.source.path,
            len(batch),
            exc_info=error,
        )
        what = (f"{type(error).__name__}: {error}".splitlines() or [""])[0][:200]
        message = f"the engine step running this request failed ({what})"
        events = []
        for s in batch:
            if not s.seq.finished:  # one that finished before the failure lost its last event: tell it too
                self._finish(group, s.seq, FinishReason.ERROR)
            seq = s.seq
            events.append(
                TokenEvent(
                    seq.seq_id, seq.request_id, seq.variant, -1, "", 0.0, True, FinishReason.ERROR, message
                )
            )
        if self.device.type == "cuda":
            try:  # an error on the device itself is sticky: every later step would fail the same way
                torch.cuda.synchronize(self.device)
            except Exception as e:
                raise EngineFailed(f"the device failed: {type(e).__name__}: {e}") from e
        return events

    @torch.inference_mode()
    def _run(self, group: Group, batch: list[Scheduled]) -> list[TokenEvent]:
        ids, positions, rows, last = [], [], [], []
        for s in batch:
            tokens = s.seq.token_ids[s.start : s.start + s.count]
            ids += tokens
            positions += range(s.start, s.start + s.count)
            rows += [s.row] * s.count
            last.append(len(ids) - 1)
        if group.graphs is not None and len(ids) == len(batch) and group.graphs.fits(len(batch)):
            p = [s.seq.params for s in batch]
            sampling = (
                [x.temperature for x in p],
                [x.top_p for x in p],
                [x.top_k for x in p],
                [x.seed for x in p],
                [len(s.seq.output_ids) for s in batch],
            )
            chosen, logprobs = group.graphs.run(
                ids, positions, rows, [s.seq.block_table for s in batch], sampling
            )
            return self._advance(group, batch, chosen, logprobs)
        attn = AttnBatch.build(
            [s.seq.block_table for s in batch],
            [s.start for s in batch],
            [s.count for s in batch],
            group.pool.block_size,
            self.device,
        )
        row_t = self._longs(rows)
        hidden = group.model.forward(self._longs(ids), self._longs(positions), row_t, attn, group.pool.kv)
        last_t = self._longs(last)
        return self._sample(group, batch, hidden[last_t], row_t[last_t])

    def _longs(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    def _sample(
        self, group: Group, batch: list[Scheduled], hidden: torch.Tensor, rows: torch.Tensor
    ) -> list[TokenEvent]:
        """hidden [B, H]: the last position of each scheduled sequence."""
        dev = self.device
        logits = group.model.logits(hidden, rows)  # [B, V]
        params = [s.seq.params for s in batch]
        sb = SamplingBatch(
            temperature=torch.tensor([p.temperature for p in params], device=dev),
            top_p=torch.tensor([p.top_p for p in params], device=dev),
            top_k=torch.tensor([p.top_k for p in params], device=dev),
            seeds=self._longs([p.seed for p in params]),
            steps=self._longs([len(s.seq.output_ids) for s in batch]),
        )
        chosen, logprobs = sample(logits, sb)
        return self._advance(group, batch, chosen, logprobs)

    def _advance(
        self, group: Group, batch: list[Scheduled], chosen: torch.Tensor, logprobs: torch.Tensor
    ) -> list[TokenEvent]:
        chosen, logprobs = chosen.tolist(), logprobs.tolist()
        now = time.perf_counter()
        events = []
        for s, token, lp in zip(batch, chosen, logprobs, strict=True):
            seq = s.seq
            seq.num_cached = s.start + s.count
            seq.output_ids.append(token)
            if seq.params.logprobs:
                seq.logprobs.append(lp)
            seq.first_token_time = seq.first_token_time or now
            events.append(self._emit(group, seq, token, lp))
        return events

    def _emit(self, group: Group, seq: Sequence, token: int, logprob: float) -> TokenEvent:
        p = seq.params
        tokenizer = group.tokenizers[seq.variant]
        old = group.texts.get(seq.seq_id, "")
        text = tokenizer.decode(seq.output_ids, skip_special_tokens=True) if tokenizer else ""
        reason = None
        if (token in group.eos and not p.ignore_eos) or token in p.stop_token_ids:
            reason = FinishReason.STOP
        for stop in p.stop:
            at = text.find(stop, max(0, len(old) - len(stop)))
            if at >= 0:
                text, reason = text[:at], FinishReason.STOP
        if reason is None and len(seq.output_ids) >= p.max_tokens:
            reason = FinishReason.LENGTH
        if reason is None and len(seq) >= group.context:
            reason = FinishReason.CONTEXT
        stable = text if reason else _settled(text, p.stop)
        delta = stable[len(old) :] if stable.startswith(old) else ""
        group.texts[seq.seq_id] = old + delta
        if reason is not None:
            self._finish(group, seq, reason)
        return TokenEvent(
            seq.seq_id, seq.request_id, seq.variant, token, delta, logprob, reason is not None, reason
        )

    # ---- conveniences ------------------------------------------------------------------------------------

    def generate(
        self, variant: str, prompt: str | list[int], params: SamplingParams | None = None
    ) -> tuple[str, list[int]]:
        """Run one request to the end (other queued requests advance too)."""
        seq = self.add_request(variant, prompt, params)
        pieces: list[str] = []
        while not seq.finished:
            for ev in self.step():
                if ev.seq_id == seq.seq_id:
                    pieces.append(ev.text)
                    if ev.error:
                        raise MoeshareError(ev.error)
        return "".join(pieces), list(seq.output_ids)

    @torch.inference_mode()
    def score(self, variant: str, ids: list[int]) -> torch.Tensor:
        """Teacher-forced next-token logits at every position of `ids` [T, V], float32 (one prefill, blocks
        borrowed from the pool and returned)."""
        group = self._group(variant)
        row = group.residency.row(variant, group.scheduler.busy_rows())
        while row is None:  # weights on their way in, or every row busy: let running sequences advance
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if group.scheduler.running:
                self.step()
            row = group.residency.row(variant, group.scheduler.busy_rows())
        blocks = group.pool.allocate(group.pool.blocks_for(len(ids)))
        try:
            attn = AttnBatch.build([blocks], [0], [len(ids)], group.pool.block_size, self.device)
            t = torch.tensor(ids, dtype=torch.int64, device=self.device)
            rows = torch.full_like(t, row)
            hidden = group.model.forward(
                t, torch.arange(len(ids), device=self.device), rows, attn, group.pool.kv
            )
            return group.model.logits(hidden, rows)
        finally:
            group.pool.free(blocks)

    def stats(self) -> dict:
        return {
            "steps": self.steps,
            "running": sum(len(g.scheduler.running) for g in self.groups),
            "waiting": sum(len(g.scheduler.waiting) for g in self.groups),
            "kv_blocks_used": sum(g.pool.used_blocks for g in self.groups),
            "kv_blocks_free": sum(g.pool.free_blocks for g in self.groups),
            "resident_variants": [v for g in self.groups for v in g.residency.resident],
            "swap_ins": sum(g.residency.swap_ins for g in self.groups),
            "swap_seconds": sum(g.residency.swap_seconds for g in self.groups),
            "preemptions": sum(g.scheduler.preemptions for g in self.groups),
            "offloaded_layers": sum(len(g.model.offload) for g in self.groups),
        }
