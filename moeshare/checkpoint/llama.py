"""Llama-style dense models: served beside the MoE variants, never consolidated (no experts)."""

from __future__ import annotations

from moeshare.checkpoint.adapters import OTHER, Adapter, TensorInfo, match, register


def decoder_shape(a: Adapter, name: str) -> tuple[int, ...] | None:
    """Shapes of the tensors every Llama-style decoder has: embeddings, LM head (absent when
    tie_word_embeddings), norms, attention (with q/k/v biases in Qwen2)."""
    h = a._cfg("hidden_size")
    head_dim = a.config.get("head_dim")
    head_dim = head_dim if isinstance(head_dim, int) else h // a._cfg("num_attention_heads")
    heads = a._cfg("num_attention_heads")
    kv_heads = (
        a._cfg("num_key_value_heads") if "num_key_value_heads" in a.config else heads
    )  # pre-GQA configs
    q, kv = heads * head_dim, kv_heads * head_dim
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (a._cfg("vocab_size"), h)
    if name == "model.norm.weight" or match(
        r"model\.layers\.\d+\.(input|post_attention)_layernorm\.weight", name
    ):
        return (h,)
    if m := match(r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj\.weight", name):
        return {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q)}[m[1]]
    if m := match(r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj\.bias", name):  # Qwen2; attention_bias
        return {"q": (q,), "k": (kv,), "v": (kv,), "o": (h,)}[m[1]]
    return None


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
        if shape := decoder_shape(self, name):
            return shape
        h, i = self._cfg("hidden_size"), self._cfg("intermediate_size")
        if m := match(r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight", name):
            return (h, i) if m[1] == "down" else (i, h)
        return None

    def expert_key(self, layer: str, expert: int, role: str) -> str:
        raise KeyError(f"{self.name} is a dense model: no expert {layer}/{expert}")
