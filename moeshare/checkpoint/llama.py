"""Llama-style dense models: served beside the MoE variants, never consolidated (no experts)."""

from __future__ import annotations

from moeshare.checkpoint.adapters import OTHER, Adapter, TensorInfo, match, register


@register
class LlamaAdapter(Adapter):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2")
    expert_roles = ()

    @property
    def moe_layers(self) -> list[str]:
        return []

    def classify(self, name: str) -> TensorInfo:
        return OTHER

    def expected_shape(self, name: str) -> tuple[int, ...] | None:
        h, i = self._cfg("hidden_size"), self._cfg("intermediate_size")
        head_dim = self.config.get("head_dim")
        head_dim = head_dim if isinstance(head_dim, int) else h // self._cfg("num_attention_heads")
        q, kv = self._cfg("num_attention_heads") * head_dim, self._cfg("num_key_value_heads") * head_dim
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return (self._cfg("vocab_size"), h)
        if name == "model.norm.weight" or match(
            r"model\.layers\.\d+\.(input|post_attention)_layernorm\.weight", name
        ):
            return (h,)
        if m := match(r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj\.weight", name):
            return {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q)}[m[1]]
        if m := match(r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight", name):
            return (h, i) if m[1] == "down" else (i, h)
        return None

    def expert_key(self, layer: str, expert: int, role: str) -> str:
        raise KeyError(f"{self.name} is a dense model: no expert {layer}/{expert}")
