"""Mixtral forward over R resident variants at once: per-variant weights stacked [R, ...], experts in the bank.

Every op takes the whole step's tokens; which variant a token belongs to is data (`rows`), never shape, so a
decode step is the same graph whatever variants are in it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from moeshare.engine import ops
from moeshare.engine.attention import AttnBatch


@dataclass(frozen=True)
class MixtralDims:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    experts: int
    top_k: int
    eps: float
    rope_theta: float
    max_positions: int
    tied: bool

    @classmethod
    def from_config(cls, c: dict) -> MixtralDims:
        rope = c.get("rope_parameters") or {}
        return cls(
            hidden=c["hidden_size"],
            intermediate=c["intermediate_size"],
            layers=c["num_hidden_layers"],
            heads=c["num_attention_heads"],
            kv_heads=c["num_key_value_heads"],
            head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
            vocab=c["vocab_size"],
            experts=c["num_local_experts"],
            top_k=c["num_experts_per_tok"],
            eps=c.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 1e6))),
            max_positions=c.get("max_position_embeddings", 4096),
            tied=bool(c.get("tie_word_embeddings", False)),
        )


def _layer_names(layer: int) -> dict[str, str]:
    p = f"model.layers.{layer}."
    return {
        "ln_in": p + "input_layernorm.weight",
        "q": p + "self_attn.q_proj.weight",
        "k": p + "self_attn.k_proj.weight",
        "v": p + "self_attn.v_proj.weight",
        "o": p + "self_attn.o_proj.weight",
        "ln_post": p + "post_attention_layernorm.weight",
        "router": p + "block_sparse_moe.gate.weight",
    }


def variant_tensor_names(dims: MixtralDims) -> dict[str, str]:
    """Our stacked-weight name -> the checkpoint key it is loaded from."""
    names = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight"}
    names["lm_head"] = names["embed"] if dims.tied else "lm_head.weight"
    for layer in range(dims.layers):
        names.update({f"{layer}.{k}": v for k, v in _layer_names(layer).items()})
    return names


class MultiVariantMixtral:
    def __init__(
        self,
        dims: MixtralDims,
        resident: int,
        slots: list[int],
        dtype: torch.dtype,
        device: torch.device,
        offload: frozenset[int] = frozenset(),
        private_experts: bool = False,
    ) -> None:
        """`offload`: MoE layers whose bank waits in (pinned) host memory; each step copies in the slots it
        routes to. `private_experts`: no sharing on the device; row r owns slots [r*E, (r+1)*E) of every
        layer, and loading a variant copies its experts in with the rest of its weights (whole-model swap)."""
        self.dims, self.dtype, self.device = dims, dtype, device
        self.offload, self.private_experts = frozenset(offload), private_experts
        d = dims
        shapes = {"embed": (d.vocab, d.hidden), "norm": (d.hidden,), "lm_head": (d.vocab, d.hidden)}
        q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
        for layer in range(d.layers):
            shapes |= {
                f"{layer}.ln_in": (d.hidden,),
                f"{layer}.qkv": (q + 2 * kv, d.hidden),
                f"{layer}.o": (d.hidden, q),
                f"{layer}.ln_post": (d.hidden,),
                f"{layer}.router": (d.experts, d.hidden),
            }
        self.shapes = shapes
        # per-variant weights, one row per resident slot [R, ...]
        self.w = {k: torch.zeros(resident, *s, dtype=dtype, device=device) for k, s in shapes.items()}
        # q, k and v are one projection (one weight read, one launch); the checkpoint's three load into views
        for layer in range(d.layers):
            qkv = self.w[f"{layer}.qkv"]
            self.w[f"{layer}.q"], self.w[f"{layer}.k"], self.w[f"{layer}.v"] = qkv.split([q, kv, kv], dim=1)
        self.tables = torch.zeros(
            resident, d.layers, d.experts, dtype=torch.int64, device=device
        )  # -> bank slot
        # the shared expert bank, per MoE layer: w13 [S, 2I, H], w2 [S, H, I]
        self.bank = [self.empty_bank(s, i in self.offload) for i, s in enumerate(slots)]
        # where an offloaded layer's slots are copied for the step that routes to them
        held = [slots[i] for i in self.offload]
        self.staging = self.empty_bank(max(held), False) if held else None
        inv_freq = 1.0 / (d.rope_theta ** (torch.arange(0, d.head_dim, 2, dtype=torch.float32) / d.head_dim))
        self.inv_freq = inv_freq.to(device)

    def empty_bank(self, slots: int, host: bool) -> dict[str, torch.Tensor]:
        """Uninitialised w13/w2 for `slots` experts: on the device, or in (pinned, on CUDA) host memory."""
        d = self.dims
        where = (
            {"device": "cpu", "pin_memory": self.device.type == "cuda"} if host else {"device": self.device}
        )
        return {
            "w13": torch.empty(slots, 2 * d.intermediate, d.hidden, dtype=self.dtype, **where),
            "w2": torch.empty(slots, d.hidden, d.intermediate, dtype=self.dtype, **where),
        }

    def row_bytes(self) -> int:
        """One variant's non-expert weights."""
        return sum(
            t[0].numel() * t.element_size() for k, t in self.w.items() if not k.endswith((".q", ".k", ".v"))
        )

    def expert_bytes(self) -> int:
        """One expert (bank slot) of one layer."""
        d = self.dims
        return 3 * d.intermediate * d.hidden * self.dtype.itemsize

    def load_slot(self, layer: int, slot: int, weights: dict[str, torch.Tensor]) -> None:
        for role, t in weights.items():
            self.bank[layer][role][slot].copy_(t)

    def load(
        self,
        row: int,
        tensors: Iterable[tuple[str, torch.Tensor]],
        tables: torch.Tensor,
        non_blocking: bool = False,
    ) -> None:
        """Copy one variant's weights into resident row `row`, one tensor at a time. tables [L, E]. With
        private experts, "bank.<layer>.<expert>.<role>" tensors go to the row's own slots, and `tables` is
        local (0..E-1), offset here to those slots."""
        for k, t in tensors:
            if k.startswith("bank."):
                _, layer, expert, role = k.split(".")
                slot = row * self.dims.experts + int(expert)
                self.bank[int(layer)][role][slot].copy_(t, non_blocking=non_blocking)
            else:
                self.w[k][row].copy_(t, non_blocking=non_blocking)
        if self.private_experts:
            tables = tables + row * self.dims.experts
        self.tables[row].copy_(tables, non_blocking=non_blocking)

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        rows: torch.Tensor,
        attn: AttnBatch,
        kv: torch.Tensor,
    ) -> torch.Tensor:
        """ids, positions, rows [T] -> final hidden states [T, H]. kv: the KV block pool [N, L, 2, B, Hkv, D]."""
        d, w = self.dims, self.w
        h = w["embed"][rows, ids]  # [T, H]
        # each norm also adds the residual branch that precedes it: one kernel instead of a dozen
        h, x = ops.add_rms_norm(h, None, w["0.ln_in"], rows, d.eps)
        for layer in range(d.layers):
            p = f"{layer}."
            qkv = ops.grouped_linear(x, w[p + "qkv"], rows)  # [T, q + 2kv]
            o = attn.self_attention(qkv, positions, self.inv_freq, kv, layer, d.heads, d.kv_heads, d.head_dim)
            o = ops.grouped_linear(o, w[p + "o"], rows)
            h, x = ops.add_rms_norm(h, o, w[p + "ln_post"], rows, d.eps)
            nxt = w[f"{layer + 1}.ln_in"] if layer + 1 < d.layers else w["norm"]
            h, x = ops.add_rms_norm(h, self._moe(layer, x, rows), nxt, rows, d.eps)
        return x

    def _moe(self, layer: int, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        d = self.dims
        logits = ops.grouped_linear(x, self.w[f"{layer}.router"], rows)  # [T, E]
        # softmax, top-k renormalized, each variant's local expert -> its bank slot: [T, k] each
        slots, top = ops.route(logits, rows, self.tables[:, layer], d.top_k, x.dtype)
        bank = self.bank[layer]
        if layer in self.offload:  # copy in the slots this step routes to, into the same places
            assert self.staging is not None
            for s in torch.unique(slots).tolist():
                for role, t in bank.items():
                    self.staging[role][s].copy_(t[s], non_blocking=True)
            bank = self.staging
        return ops.fused_moe(x, bank["w13"], bank["w2"], slots, top)

    def head(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """hidden [B, H] (the last position of each sequence) -> [B, V] in the model's dtype (for sampling)."""
        return ops.grouped_linear(hidden, self.w["lm_head"], rows)

    def logits(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """`head` in float32 (for scoring)."""
        return self.head(hidden, rows).float()
