"""SwitchTransformers: encoder-decoder, every `sparse_step`-th block's feed-forward is a set of experts."""

from __future__ import annotations

from moeshare.checkpoint.adapters import OTHER, Adapter, TensorInfo, match, register

_EXPERT = r"(encoder|decoder)\.block\.(\d+)\.layer\.\d+\.mlp\.experts\.expert_(\d+)\.(wi|wo)\.weight"
_ROUTER = r"(encoder|decoder)\.block\.(\d+)\.layer\.\d+\.mlp\.router\.classifier\.weight"


@register
class SwitchAdapter(Adapter):
    name = "switch"
    model_types = ("switch_transformers",)
    expert_roles = ("wi", "wo")  # wi [F, D], wo [D, F]

    def _stack_layers(self, stack: str) -> tuple[int, int]:
        if stack == "encoder":
            return self._cfg("num_layers"), self._cfg("encoder_sparse_step")
        return self.config.get("num_decoder_layers") or self._cfg("num_layers"), self._cfg(
            "decoder_sparse_step"
        )

    def is_sparse(self, stack: str, block: int) -> bool:
        _, step = self._stack_layers(stack)
        # transformers' rule: with step s > 0, blocks i with i % s == 1 (every block when s == 1)
        return step > 0 and (step == 1 or block % step == 1)

    @property
    def moe_layers(self) -> list[str]:
        layers = []
        for stack in ("encoder", "decoder"):
            n, _ = self._stack_layers(stack)
            layers += [f"{stack}.{b}" for b in range(n) if self.is_sparse(stack, b)]
        return layers

    @property
    def num_experts(self) -> int:
        return self._cfg("num_experts")

    def classify(self, name: str) -> TensorInfo:
        if m := match(_EXPERT, name):
            return TensorInfo("expert", f"{m[1]}.{m[2]}", int(m[3]), m[4])
        if m := match(_ROUTER, name):
            return TensorInfo("router", f"{m[1]}.{m[2]}")
        return OTHER

    def _ff_index(self, stack: str) -> int:
        return 1 if stack == "encoder" else 2

    def expected_shape(self, name: str) -> tuple[int, ...] | None:
        d, f, e = self._cfg("d_model"), self._cfg("d_ff"), self.num_experts
        inner = self._cfg("num_heads") * self._cfg("d_kv")
        info = self.classify(name)
        if info.kind == "expert":
            return (f, d) if info.role == "wi" else (d, f)
        if info.kind == "router":
            return (e, d)
        if name in (
            "shared.weight",
            "lm_head.weight",
            "encoder.embed_tokens.weight",
            "decoder.embed_tokens.weight",
        ):
            return (self._cfg("vocab_size"), d)
        if match(r"(encoder|decoder)\.(final_layer_norm|block\.\d+\.layer\.\d+\.layer_norm)\.weight", name):
            return (d,)
        if m := match(
            r"(encoder|decoder)\.block\.\d+\.layer\.\d+\.(SelfAttention|EncDecAttention)\.(q|k|v|o)\.weight",
            name,
        ):
            return (d, inner) if m[3] == "o" else (inner, d)
        if match(
            r"(encoder|decoder)\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight", name
        ):
            return (self._cfg("relative_attention_num_buckets"), self._cfg("num_heads"))
        if m := match(r"(encoder|decoder)\.block\.\d+\.layer\.\d+\.mlp\.(wi|wo)\.weight", name):
            return (f, d) if m[2] == "wi" else (d, f)
        return None

    def expert_key(self, layer: str, expert: int, role: str) -> str:
        stack, block = layer.split(".")
        return (
            f"{stack}.block.{block}.layer.{self._ff_index(stack)}.mlp.experts.expert_{expert}.{role}.weight"
        )

    def router_key(self, layer: str) -> str:
        stack, block = layer.split(".")
        return f"{stack}.block.{block}.layer.{self._ff_index(stack)}.mlp.router.classifier.weight"
