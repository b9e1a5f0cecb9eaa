"""Switch Transformers (encoder-decoder, top-1 experts) over R resident variants and one bank: the reference forward.

The first piece of serving Switch stores (issue 18): every weight that differs between variants is stacked [R, ...]
as in MultiVariantMixtral, each sequence carries its row, and a sparse block's router (the variant's own) picks one
local expert per token, mapped through the variant's table to a bank slot. Written in plain torch over whole
sequences (no KV cache yet): `encode` runs the encoder once per prompt, `decode` the decoder over the tokens so
far; the paged decoder with cross-attention K/V blocks and its kernels build on it.

T5 details kept: RMS norm without mean or bias; no 1/sqrt(d) in attention; a learned relative position bias in
each stack's first block, shared by its other blocks (bidirectional buckets in the encoder, causal ones in the
decoder's self-attention, none in cross-attention); with tied embeddings the decoder's output is scaled by
d_model ** -0.5 before the LM head. Expert capacity is counted per sequence, in token order, as transformers
does: a token past its expert's capacity gets no feed-forward output (only the residual). `decode` recomputes the
decoder's tokens together, so capacity counts over them all, as a teacher-forced transformers forward does;
generate with a cache routes one token at a time, where capacity never binds (the engine's decoder does that:
`decode_paged(..., capped=False)`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from moeshare.engine import ops
from moeshare.engine.attention import AttnBatch
from moeshare.errors import MoeshareError
from moeshare.kernels import PositionBias, relative_buckets


@dataclass(frozen=True)
class SwitchDims:
    d_model: int
    d_ff: int
    d_kv: int
    heads: int
    encoder_layers: int
    decoder_layers: int
    experts: int
    vocab: int
    eps: float
    buckets: int
    max_distance: int
    capacity: int
    tied: bool
    encoder_sparse: frozenset[int]
    decoder_sparse: frozenset[int]
    decoder_start: int = 0  # the decoder's first input token

    @classmethod
    def from_config(cls, c: dict) -> SwitchDims:
        if c.get("router_bias"):
            raise MoeshareError("switch_transformers: router_bias is not supported")
        act = c.get("dense_act_fn", "relu")
        if act != "relu" or str(c.get("feed_forward_proj", "relu")).startswith("gated"):
            raise MoeshareError(f"switch_transformers: feed-forward {act!r} is not supported (relu is)")
        enc, dec = c["num_layers"], c.get("num_decoder_layers") or c["num_layers"]
        return cls(
            d_model=c["d_model"],
            d_ff=c["d_ff"],
            d_kv=c["d_kv"],
            heads=c["num_heads"],
            encoder_layers=enc,
            decoder_layers=dec,
            experts=c["num_experts"],
            vocab=c["vocab_size"],
            eps=float(c.get("layer_norm_epsilon", 1e-6)),
            buckets=c.get("relative_attention_num_buckets", 32),
            max_distance=c.get("relative_attention_max_distance", 128),
            capacity=c.get("expert_capacity", 64),
            tied=bool(c.get("tie_word_embeddings", True)),
            decoder_start=c.get("decoder_start_token_id") or 0,
            encoder_sparse=_sparse(enc, c.get("encoder_sparse_step", 1)),
            decoder_sparse=_sparse(dec, c.get("decoder_sparse_step", 1)),
        )


def _sparse(layers: int, step: int) -> frozenset[int]:
    """transformers' rule: with step s > 0, blocks i with i % s == 1 are sparse (every block when s == 1)."""
    return frozenset(i for i in range(layers) if step > 0 and (step == 1 or i % step == 1))


def tensor_names(dims: SwitchDims) -> dict[str, str]:
    """Our stacked weight name -> the checkpoint key it is loaded from (experts and routers' tables aside)."""
    names = {"shared": "shared.weight", "enc.final": "encoder.final_layer_norm.weight"}
    names["dec.final"] = "decoder.final_layer_norm.weight"
    if not dims.tied:
        names["lm_head"] = "lm_head.weight"
    for stack, n, sparse in (("enc", dims.encoder_layers, dims.encoder_sparse), ("dec", dims.decoder_layers, dims.decoder_sparse)):  # fmt: skip
        key = "encoder" if stack == "enc" else "decoder"
        names[f"{stack}.bias"] = f"{key}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        for b in range(n):
            p, k = f"{stack}.{b}.", f"{key}.block.{b}.layer."
            names[p + "ln_self"] = k + "0.layer_norm.weight"
            names |= {p + x: k + f"0.SelfAttention.{x}.weight" for x in "qkvo"}
            ff = 1
            if stack == "dec":
                names[p + "ln_cross"] = k + "1.layer_norm.weight"
                names |= {p + "c" + x: k + f"1.EncDecAttention.{x}.weight" for x in "qkvo"}
                ff = 2
            names[p + "ln_ff"] = k + f"{ff}.layer_norm.weight"
            if b in sparse:
                names[p + "router"] = k + f"{ff}.mlp.router.classifier.weight"
            else:
                names |= {p + "wi": k + f"{ff}.mlp.wi.weight", p + "wo": k + f"{ff}.mlp.wo.weight"}
    return names


def moe_layer(stack: str, block: int) -> str:
    """The adapter's name of a sparse block's MoE layer (its bank and tables)."""
    return f"{'encoder' if stack == 'enc' else 'decoder'}.{block}"


class MultiVariantSwitch:
    encoder_decoder = True  # the runner encodes each prompt once, then decodes (engine/runner.py)

    def __init__(
        self, dims: SwitchDims, rows: int, slots: dict[str, int], dtype: torch.dtype, device: torch.device
    ) -> None:
        """`slots`: bank slots per MoE layer (moe_layer names)."""
        self.dims, self.rows, self.dtype, self.device = dims, rows, dtype, device
        d, inner = dims, dims.heads * dims.d_kv
        shapes: dict[str, tuple[int, ...]] = {"shared": (d.vocab, d.d_model)}
        shapes |= {"enc.final": (d.d_model,), "dec.final": (d.d_model,)}
        if not d.tied:
            shapes["lm_head"] = (d.vocab, d.d_model)
        for name in tensor_names(d):
            if name in shapes:
                continue
            last = name.rsplit(".", 1)[-1]
            if name.endswith(".bias"):
                shapes[name] = (d.buckets, d.heads)
            elif last.startswith("ln"):
                shapes[name] = (d.d_model,)
            elif last in ("q", "k", "v", "cq", "ck", "cv"):
                shapes[name] = (inner, d.d_model)
            elif last in ("o", "co"):
                shapes[name] = (d.d_model, inner)
            elif last == "router":
                shapes[name] = (d.experts, d.d_model)
            elif last == "wi":
                shapes[name] = (d.d_ff, d.d_model)
            else:  # wo
                shapes[name] = (d.d_model, d.d_ff)
        self.w = {k: torch.zeros(rows, *s, dtype=dtype, device=device) for k, s in shapes.items()}
        # each block's self-attention q, k and v: views of one fused weight, read by one GEMM a step
        for stack, n in (("enc", d.encoder_layers), ("dec", d.decoder_layers)):
            for b in range(n):
                p = f"{stack}.{b}."
                qkv = torch.zeros(rows, 3 * inner, d.d_model, dtype=dtype, device=device)
                self.w[p + "qkv"] = qkv
                self.w[p + "q"], self.w[p + "k"], self.w[p + "v"] = qkv.split(inner, dim=1)
        self.bank = {
            layer: {
                "wi": torch.zeros(n, d.d_ff, d.d_model, dtype=dtype, device=device),
                "wo": torch.zeros(n, d.d_model, d.d_ff, dtype=dtype, device=device),
            }
            for layer, n in slots.items()
        }
        self.tables = {
            layer: torch.zeros(rows, d.experts, dtype=torch.long, device=device) for layer in slots
        }
        self.decoder_start = d.decoder_start

    def row_bytes(self) -> int:
        """One variant's non-expert weights."""
        return sum(
            t[0].numel() * t.element_size() for k, t in self.w.items() if not k.endswith((".q", ".k", ".v"))
        )

    def expert_bytes(self) -> int:
        """One expert (bank slot) of one layer."""
        return 2 * self.dims.d_ff * self.dims.d_model * self.dtype.itemsize

    def kv_blocks(self, lengths: list[int], block: int, layers: int) -> tuple[torch.Tensor, list[list[int]]]:
        """A KV pool of its own, [N, layers, 2, block, H, d_kv] (zeros, one block to spare), and consecutive
        blocks in it for sequences of `lengths` tokens: the encoder's own K/V while prompts are encoded, or a
        scorer's whole cache."""
        d = self.dims
        counts = [-(-n // block) for n in lengths]
        shape = (sum(counts) + 1, layers, 2, block, d.heads, d.d_kv)
        kv = torch.zeros(shape, dtype=self.dtype, device=self.device)
        firsts = [sum(counts[:i]) for i in range(len(counts))]
        return kv, [list(range(f, f + c)) for f, c in zip(firsts, counts, strict=True)]

    @classmethod
    def from_source(cls, source, dtype: torch.dtype, device: torch.device) -> MultiVariantSwitch:
        """Every variant of a store (or a checkpoint, one variant) resident, row i = source.variants[i], and
        the bank read slot by slot (a Source's interface: tensor, table, bank_slots, bank_slot)."""
        dims = SwitchDims.from_config(source.config)
        layers = list(source.adapter.moe_layers)
        slots = {x: source.bank_slots(x) for x in layers}
        model = cls(dims, len(source.variants), slots, dtype, device)
        names = tensor_names(dims)
        for row, v in enumerate(source.variants):
            tensors = ((ours, source.tensor(v, key)) for ours, key in names.items())
            model.load(row, tensors, torch.tensor([source.table(v, x) for x in layers]))
        for x in layers:
            for s in range(slots[x]):
                model.load_slot(x, s, source.bank_slot(x, s))
        return model

    def load(
        self,
        row: int,
        tensors: Iterable[tuple[str, torch.Tensor]],
        tables: torch.Tensor,
        non_blocking: bool = False,
    ) -> None:
        """One variant's non-expert weights into row `row`, and its expert -> slot tables [MoE layers, experts]
        (in the adapter's order of MoE layers)."""
        for k, t in tensors:
            self.w[k][row].copy_(t, non_blocking=non_blocking)
        for layer, table in zip(self.tables.values(), tables, strict=True):
            layer[row].copy_(table, non_blocking=non_blocking)

    def load_slot(self, layer: str, slot: int, expert: dict[str, torch.Tensor]) -> None:
        for role, t in expert.items():
            self.bank[layer][role][slot].copy_(t)

    # ---- pieces --------------------------------------------------------------------------------------------

    def _norm(self, h: torch.Tensor, name: str, row: int) -> torch.Tensor:
        variance = h.float().pow(2).mean(-1, keepdim=True)
        return self.w[name][row] * (h * torch.rsqrt(variance + self.dims.eps)).to(self.dtype)

    def _bias(self, stack: str, row: int, q_len: int, k_len: int, bidirectional: bool) -> torch.Tensor:
        """[heads, q_len, k_len] relative position bias (the query at position q_len - 1 is the last)."""
        q_pos = torch.arange(k_len - q_len, k_len, device=self.device)[:, None]
        rel = torch.arange(k_len, device=self.device)[None, :] - q_pos
        b = relative_buckets(rel, bidirectional, self.dims.buckets, self.dims.max_distance)
        return self.w[f"{stack}.bias"][row][b].permute(2, 0, 1)

    def _attend(
        self, x, kv, p: str, row: int, bias: torch.Tensor | None, cross: bool = False
    ) -> torch.Tensor:
        """x [Tq, D] attends to kv [Tk, D] with the block's (cross-)attention weights; bias [H, Tq, Tk]."""
        d, c = self.dims, "c" if cross else ""
        q = (x @ self.w[p + c + "q"][row].T).view(-1, d.heads, d.d_kv).transpose(0, 1)
        k = (kv @ self.w[p + c + "k"][row].T).view(-1, d.heads, d.d_kv).transpose(0, 1)
        v = (kv @ self.w[p + c + "v"][row].T).view(-1, d.heads, d.d_kv).transpose(0, 1)
        scores = (q @ k.transpose(1, 2)).float()  # no 1 / sqrt(d_kv): T5 folds it into the weights
        if bias is not None:
            scores = scores + bias
        out = (scores.softmax(-1).to(self.dtype) @ v).transpose(0, 1).reshape(-1, d.heads * d.d_kv)
        return out @ self.w[p + c + "o"][row].T

    def _ff(self, x: torch.Tensor, stack: str, block: int, row: int) -> torch.Tensor:
        """The block's feed-forward of one sequence's tokens x [T, D] (normed): dense, or top-1 over the bank."""
        p = f"{stack}.{block}."
        sparse = block in (self.dims.encoder_sparse if stack == "enc" else self.dims.decoder_sparse)
        if not sparse:
            return torch.relu(x @ self.w[p + "wi"][row].T) @ self.w[p + "wo"][row].T
        layer = moe_layer(stack, block)
        probs = (x.float() @ self.w[p + "router"][row].float().T).softmax(-1)
        top, local = probs.max(-1)
        onehot = torch.nn.functional.one_hot(local, self.dims.experts)
        kept = (onehot.cumsum(0) * onehot).sum(-1) <= self.dims.capacity  # capacity per sequence, in order
        slots = self.tables[layer][row][local]  # [T] bank slots
        weights = (top * kept).to(self.dtype)  # a token past capacity: weight 0, no output
        bank = self.bank[layer]
        return ops.fused_moe_relu(x, bank["wi"], bank["wo"], slots[:, None], weights[:, None])

    # ---- stacks --------------------------------------------------------------------------------------------

    def encode(self, ids: list[int], row: int) -> torch.Tensor:
        """One prompt through the encoder: its final hidden states [T, D]."""
        h = self.w["shared"][row][torch.tensor(ids, device=self.device)]
        bias = self._bias("enc", row, len(ids), len(ids), bidirectional=True)
        for b in range(self.dims.encoder_layers):
            p = f"enc.{b}."
            x = self._norm(h, p + "ln_self", row)
            h = h + self._attend(x, x, p, row, bias)
            h = h + self._ff(self._norm(h, p + "ln_ff", row), "enc", b, row)
        return self._norm(h, "enc.final", row)

    def decode(self, encoded: torch.Tensor, ids: list[int], row: int) -> torch.Tensor:
        """The decoder over `ids` (its start token first) beside one prompt's encoder output: logits [T, V],
        float32, each position's next-token distribution."""
        h = self.w["shared"][row][torch.tensor(ids, device=self.device)]
        n = len(ids)
        causal = torch.full((n, n), float("-inf"), device=self.device).triu(1)
        bias = self._bias("dec", row, n, n, bidirectional=False) + causal
        for b in range(self.dims.decoder_layers):
            p = f"dec.{b}."
            x = self._norm(h, p + "ln_self", row)
            h = h + self._attend(x, x, p, row, bias)
            h = h + self._attend(self._norm(h, p + "ln_cross", row), encoded, p, row, None, cross=True)
            h = h + self._ff(self._norm(h, p + "ln_ff", row), "dec", b, row)
        h = self._norm(h, "dec.final", row)
        if self.dims.tied:
            h = h * self.dims.d_model**-0.5
        head = self.w["shared" if self.dims.tied else "lm_head"][row]
        return (h @ head.T).float()

    # ---- paged and batched: many sequences of any variants in one pass ----------------------------------------
    # Two KV pools: `kv_x` [N, encoder_layers + decoder_layers, 2, B, H, d_kv] holds each prompt's encoder
    # self-attention K/V (layers 0..) and every decoder block's cross-attention K/V (after them), written once
    # by encode_paged; `kv_s` [N, decoder_layers, 2, B, H, d_kv] the decoder's own K/V, growing a token a step.

    def _linear(self, x: torch.Tensor, name: str, rows: torch.Tensor) -> torch.Tensor:
        return ops.grouped_linear(x, self.w[name], rows)

    def _add_norm(
        self, h: torch.Tensor, delta: torch.Tensor | None, name: str, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + delta, the norm `name` of it) in one launch."""
        return ops.add_rms_norm(h, delta, self.w[name], rows, self.dims.eps)

    def _store(self, kv: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, attn: AttnBatch) -> None:
        kv[attn.block_of, layer, 0, attn.offset_of] = k
        kv[attn.block_of, layer, 1, attn.offset_of] = v

    def _paged_attend(self, x, kv, layer, p, rows, attn, store: AttnBatch | None, **how) -> torch.Tensor:
        """x [T, D] (normed) -> the block's attention output [T, D]: q from x, and with `store` k and v too,
        written into `layer` of kv before the paged attention over each sequence's blocks (attn)."""
        d, c = self.dims, "c" if store is None else ""
        if store is not None:  # self-attention: q, k and v from one GEMM
            q, k, v = self._linear(x, p + "qkv", rows).view(-1, 3, d.heads, d.d_kv).unbind(1)
            self._store(kv, layer, k, v, store)
        else:
            q = self._linear(x, p + "cq", rows).view(-1, d.heads, d.d_kv)
        o = attn.attend(q, kv[:, layer, 0], kv[:, layer, 1], 1.0, **how)  # no 1 / sqrt(d_kv) in T5
        return self._linear(o.reshape(-1, d.heads * d.d_kv), p + c + "o", rows)

    def _ff_batch(
        self, x: torch.Tensor, stack: str, block: int, rows: torch.Tensor, seq_of: torch.Tensor | None
    ) -> torch.Tensor:
        """The block's feed-forward of a batch's tokens (normed x [T, D]); seq_of [T]: each token's sequence,
        over which capacity is counted in token order (None: no capacity, every token keeps its expert)."""
        p = f"{stack}.{block}."
        if block not in (self.dims.encoder_sparse if stack == "enc" else self.dims.decoder_sparse):
            return self._linear(torch.relu(self._linear(x, p + "wi", rows)), p + "wo", rows)
        layer = moe_layer(stack, block)
        probs = ops.grouped_linear(x.float(), self.w[p + "router"].float(), rows).softmax(-1)
        top, local = probs.max(-1)
        if seq_of is not None:
            onehot = torch.nn.functional.one_hot(local, self.dims.experts)
            count = onehot.cumsum(0)
            first = torch.searchsorted(
                seq_of, seq_of
            )  # each token's sequence's first token (seq_of ascending)
            before = torch.where((first > 0)[:, None], count[(first - 1).clamp(min=0)], 0)
            top = top * (((count - before) * onehot).sum(-1) <= self.dims.capacity)  # past capacity: weight 0
        slots = self.tables[layer][rows, local]
        bank = self.bank[layer]
        return ops.fused_moe_relu(x, bank["wi"], bank["wo"], slots[:, None], top.to(self.dtype)[:, None])

    def _paged_bias(self, seq_rows: torch.Tensor, stack: str) -> PositionBias:
        """The stack's position bias with each sequence's variant's table."""
        bidirectional = stack == "enc"  # the decoder's self-attention: past keys only
        table = self.w[f"{stack}.bias"]
        return PositionBias(table, bidirectional, self.dims.max_distance, rows=seq_rows)

    @staticmethod
    def _seq_of(attn: AttnBatch) -> torch.Tensor:
        """Each new token's sequence [T]."""
        counts = attn.query_start.diff().long()
        return torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)

    def encode_paged(
        self,
        ids: torch.Tensor,
        rows: torch.Tensor,
        seq_rows: torch.Tensor,
        attn: AttnBatch,
        kv_enc: torch.Tensor,
        store: AttnBatch,
        kv: torch.Tensor,
    ) -> None:
        """Whole prompts through the encoder: attn, each sequence's blocks in kv_enc (its tokens all new; the
        encoder's own K/V, [N, encoder layers, 2, B, H, d_kv], needed only now); every decoder block's cross K/V
        land in its layer of kv at the blocks `store` names (the sequence's cross blocks). ids, rows [T];
        seq_rows [nseq]."""
        d = self.dims
        seq_of, bias = self._seq_of(attn), self._paged_bias(seq_rows, "enc")
        h = self.w["shared"][rows, ids]
        h, x = self._add_norm(h, None, "enc.0.ln_self", rows)
        for b in range(d.encoder_layers):  # each residual add fused with the norm after it
            p = f"enc.{b}."
            a = self._paged_attend(x, kv_enc, b, p, rows, attn, attn, causal=False, bias=bias)
            h, x = self._add_norm(h, a, p + "ln_ff", rows)
            nxt = f"enc.{b + 1}.ln_self" if b + 1 < d.encoder_layers else "enc.final"
            h, x = self._add_norm(h, self._ff_batch(x, "enc", b, rows, seq_of), nxt, rows)
        encoded = x
        for j in range(d.decoder_layers):  # the cross-attention K/V of every decoder block, once
            k = self._linear(encoded, f"dec.{j}.ck", rows).view(-1, d.heads, d.d_kv)
            v = self._linear(encoded, f"dec.{j}.cv", rows).view(-1, d.heads, d.d_kv)
            self._store(kv, j, k, v, store)

    def decode_paged(
        self,
        ids: torch.Tensor,
        rows: torch.Tensor,
        seq_rows: torch.Tensor,
        attn: AttnBatch,
        cross: AttnBatch,
        kv: torch.Tensor,
        last: torch.Tensor | None = None,
        capped: bool = True,
    ) -> torch.Tensor:
        """New decoder tokens of each sequence -> float32 logits [T, V] (of the tokens `last` picks, if given).
        attn: their own blocks of kv (self-attention K/V, written here); cross: their prompt's cross blocks of
        kv (context the prompt's length, query_start as attn's). Decoder block j keeps both in layer j.
        `capped`: expert capacity counts over each sequence's new tokens, as a teacher-forced forward does;
        without, no decoder token is dropped, as generate routes them one at a time (the engine: a sequence's
        tokens recomputed together after a preemption then route as they did one by one)."""
        d = self.dims
        seq_of, bias = self._seq_of(attn) if capped else None, self._paged_bias(seq_rows, "dec")
        h = self.w["shared"][rows, ids]
        h, x = self._add_norm(h, None, "dec.0.ln_self", rows)
        for j in range(d.decoder_layers):  # each residual add fused with the norm after it
            p = f"dec.{j}."
            a = self._paged_attend(x, kv, j, p, rows, attn, attn, causal=True, bias=bias)
            h, x = self._add_norm(h, a, p + "ln_cross", rows)
            a = self._paged_attend(x, kv, j, p, rows, cross, None, causal=False)
            h, x = self._add_norm(h, a, p + "ln_ff", rows)
            nxt = f"dec.{j + 1}.ln_self" if j + 1 < d.decoder_layers else "dec.final"
            h, x = self._add_norm(h, self._ff_batch(x, "dec", j, rows, seq_of), nxt, rows)
        h = x  # the final norm's output, every token's
        if last is not None:
            h, rows = h[last], rows[last]
        if d.tied:
            h = h * d.d_model**-0.5
        return self._linear(h, "shared" if d.tied else "lm_head", rows).float()
