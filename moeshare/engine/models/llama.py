"""Dense Llama-family forward (Llama, Mistral, Qwen2): the same interface as MultiVariantMixtral.

A dense checkpoint is served as one row (every token's row is 0), so the projections are plain cuBLAS GEMMs
on that row's weights; q/k/v are one fused weight, as are gate/up, with the checkpoint's tensors loaded into
views of them. More than one row (several fine-tunes of one dense base) falls back to the grouped kernel.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeshare.engine import ops
from moeshare.engine.attention import AttnBatch
from moeshare.errors import MoeshareError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclass(frozen=True)
class Rope:
    """What the config's RoPE section asks for; `inv_freq` turns it into the rotary frequencies."""

    theta: float
    kind: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0
    original_context: int = 8192

    def inv_freq(self, head_dim: int) -> torch.Tensor:
        """[head_dim / 2] float32."""
        inv = 1.0 / (self.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        if self.kind == "linear":  # positions divided by the factor is frequencies divided by it
            return inv / self.factor
        if self.kind != "llama3":
            return inv
        low_wavelen = self.original_context / self.low_freq_factor
        high_wavelen = self.original_context / self.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / self.factor, inv)
        smooth = (self.original_context / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)


@dataclass(frozen=True)
class LlamaDims:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    rope: Rope
    max_positions: int
    tied: bool
    qkv_bias: bool  # Qwen2, or Llama's attention_bias
    o_bias: bool  # Llama's attention_bias only

    @classmethod
    def from_config(cls, c: dict) -> LlamaDims:
        """Llama, Mistral and Qwen2 configs; a feature this forward does not implement is a MoeshareError."""
        model_type = c.get("model_type", "llama")
        max_positions = int(c.get("max_position_embeddings", 4096))
        _check_window(c, model_type, max_positions)
        if c.get("hidden_act", "silu") != "silu":
            raise MoeshareError(f"{model_type}: hidden_act {c['hidden_act']!r} is not supported (silu is)")
        if c.get("mlp_bias"):
            raise MoeshareError(f"{model_type}: mlp_bias is not supported")
        attention_bias = bool(c.get("attention_bias", False))
        return cls(
            hidden=c["hidden_size"],
            intermediate=c["intermediate_size"],
            layers=c["num_hidden_layers"],
            heads=c["num_attention_heads"],
            kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
            head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
            vocab=c["vocab_size"],
            eps=float(c.get("rms_norm_eps", 1e-6)),
            rope=_rope(c, model_type, max_positions),
            max_positions=max_positions,
            tied=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
        )


def _check_window(c: dict, model_type: str, max_positions: int) -> None:
    """Sliding-window attention is not implemented: refuse any window that would cut the context."""
    window = c.get("sliding_window")
    if model_type == "qwen2" and not c.get("use_sliding_window", False):
        window = None
    if "sliding_attention" not in (c.get("layer_types") or ["sliding_attention"]):
        window = None
    if isinstance(window, int) and window < max_positions:
        raise MoeshareError(
            f"{model_type}: sliding-window attention is not supported (sliding_window {window} is smaller "
            f"than max_position_embeddings {max_positions})"
        )


def _rope(c: dict, model_type: str, max_positions: int) -> Rope:
    # transformers v5 writes rope_parameters; older configs say rope_theta and rope_scaling
    scaling = dict(c.get("rope_scaling") or {})
    if "type" in scaling:
        scaling.setdefault("rope_type", scaling.pop("type"))
    params = (c.get("rope_parameters") or {}) | scaling
    kind = params.get("rope_type", "default")
    theta = float(params.get("rope_theta", c.get("rope_theta", 10000.0)))
    if kind not in ROPE_TYPES:
        raise MoeshareError(
            f"{model_type}: RoPE type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
        )
    partial = params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise MoeshareError(f"{model_type}: partial_rotary_factor {partial} is not supported (1.0 is)")
    if kind == "default":
        return Rope(theta)
    factor = params.get("factor")
    if not isinstance(factor, int | float) or factor < 1:
        raise MoeshareError(f"{model_type}: RoPE type {kind!r} needs a 'factor' >= 1, got {factor!r}")
    if kind == "dynamic":  # NTK scaling starts beyond the trained context, which we never serve past
        return Rope(theta)
    if kind == "linear":
        return Rope(theta, kind, float(factor))
    return Rope(
        theta,
        kind,
        float(factor),
        float(params.get("low_freq_factor", 1.0)),
        float(params.get("high_freq_factor", 4.0)),
        int(params.get("original_max_position_embeddings", max_positions)),
    )


def tensor_names(dims: LlamaDims) -> dict[str, str]:
    """Our weight name -> the checkpoint key it is loaded from (no lm_head when the embeddings are tied)."""
    names = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight"}
    if not dims.tied:
        names["lm_head"] = "lm_head.weight"
    for layer in range(dims.layers):
        p, key = f"{layer}.", f"model.layers.{layer}."
        names |= {
            p + "ln_in": key + "input_layernorm.weight",
            p + "ln_post": key + "post_attention_layernorm.weight",
            p + "o": key + "self_attn.o_proj.weight",
            p + "down": key + "mlp.down_proj.weight",
        }
        names |= {p + x: key + f"self_attn.{x}_proj.weight" for x in "qkv"}
        names |= {p + x: key + f"mlp.{x}_proj.weight" for x in ("gate", "up")}
        if dims.qkv_bias:
            names |= {p + f"{x}_bias": key + f"self_attn.{x}_proj.bias" for x in "qkv"}
        if dims.o_bias:
            names[p + "o_bias"] = key + "self_attn.o_proj.bias"
    return names


class DenseLlama:
    reloadable = True  # every weight is a row its residency reads from the checkpoint again

    def __init__(self, dims: LlamaDims, rows: int, dtype: torch.dtype, device: torch.device) -> None:
        self.dims, self.rows, self.dtype, self.device = dims, rows, dtype, device
        self.offload: frozenset[int] = frozenset()  # no experts: nothing waits in host memory
        d = dims
        q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
        shapes: dict[str, tuple[int, ...]] = {"embed": (d.vocab, d.hidden), "norm": (d.hidden,)}
        if not d.tied:
            shapes["lm_head"] = (d.vocab, d.hidden)
        for layer in range(d.layers):
            p = f"{layer}."
            shapes |= {
                p + "ln_in": (d.hidden,),
                p + "qkv": (q + 2 * kv, d.hidden),
                p + "o": (d.hidden, q),
                p + "ln_post": (d.hidden,),
                p + "gate_up": (2 * d.intermediate, d.hidden),
                p + "down": (d.hidden, d.intermediate),
            }
            if d.qkv_bias:
                shapes[p + "qkv_bias"] = (q + 2 * kv,)
            if d.o_bias:
                shapes[p + "o_bias"] = (d.hidden,)
        self.shapes = shapes
        # one row per resident checkpoint [R, ...]; the checkpoint's separate tensors load into views
        self.w = {k: torch.zeros(rows, *s, dtype=dtype, device=device) for k, s in shapes.items()}
        self._views: set[str] = set()
        for layer in range(d.layers):
            p = f"{layer}."
            self._split(p + "qkv", [p + "q", p + "k", p + "v"], [q, kv, kv])
            self._split(p + "gate_up", [p + "gate", p + "up"], [d.intermediate] * 2)
            if d.qkv_bias:
                self._split(p + "qkv_bias", [p + "q_bias", p + "k_bias", p + "v_bias"], [q, kv, kv])
        if d.tied:
            self.w["lm_head"] = self.w["embed"]
            self._views.add("lm_head")
        self.inv_freq = d.rope.inv_freq(d.head_dim).to(device)  # [D / 2] float32

    def reload_constants(self) -> None:
        """Recompute what the model holds beside its weights (after its memory was given up)."""
        self.inv_freq.copy_(self.dims.rope.inv_freq(self.dims.head_dim))

    def _split(self, fused: str, parts: list[str], sizes: list[int]) -> None:
        for name, view in zip(parts, self.w[fused].split(sizes, dim=1), strict=True):
            self.w[name] = view
            self._views.add(name)

    def row_bytes(self) -> int:
        """One checkpoint's weights."""
        return sum(t[0].numel() * t.element_size() for k, t in self.w.items() if k not in self._views)

    def load(
        self,
        row: int,
        tensors: Iterable[tuple[str, torch.Tensor]],
        tables: torch.Tensor | None = None,
        non_blocking: bool = False,
    ) -> None:
        """Copy one checkpoint's weights into row `row`, one tensor at a time; `tables` is unused (no experts)."""
        for k, t in tensors:
            self.w[k][row].copy_(t, non_blocking=non_blocking)

    def _linear(
        self, x: torch.Tensor, name: str, rows: torch.Tensor, bias: str | None = None
    ) -> torch.Tensor:
        w = self.w[name]
        if self.rows == 1:
            return F.linear(x, w[0], self.w[bias][0] if bias else None)
        y = ops.grouped_linear(x, w, rows)
        return y + self.w[bias][rows] if bias else y

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
        # each norm also adds the residual branch that precedes it
        h, x = ops.add_rms_norm(h, None, w["0.ln_in"], rows, d.eps)
        for layer in range(d.layers):
            p = f"{layer}."
            qkv = self._linear(x, p + "qkv", rows, p + "qkv_bias" if d.qkv_bias else None)  # [T, q + 2kv]
            o = attn.self_attention(qkv, positions, self.inv_freq, kv, layer, d.heads, d.kv_heads, d.head_dim)
            o = self._linear(o, p + "o", rows, p + "o_bias" if d.o_bias else None)
            h, x = ops.add_rms_norm(h, o, w[p + "ln_post"], rows, d.eps)
            gate_up = self._linear(x, p + "gate_up", rows)  # [T, 2I]
            mlp = self._linear(ops.silu_mul(gate_up), p + "down", rows)
            nxt = w[f"{layer + 1}.ln_in"] if layer + 1 < d.layers else w["norm"]
            h, x = ops.add_rms_norm(h, mlp, nxt, rows, d.eps)
        return x

    def head(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """hidden [B, H] (the last position of each sequence) -> [B, V] in the model's dtype (for sampling)."""
        return self._linear(hidden, "lm_head", rows)

    def logits(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """`head` in float32 (for scoring)."""
        return self.head(hidden, rows).float()
