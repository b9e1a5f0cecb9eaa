"""Mixtral family: per-expert w1/w2/w3 keys, or the transformers-v5 fused gate_up/down layout."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moeshare.checkpoint.adapters import OTHER, Adapter, TensorInfo, match, register
from moeshare.checkpoint.llama import decoder_shape

if TYPE_CHECKING:
    from moeshare.checkpoint.io import Checkpoint

_LEGACY = r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight"
_FUSED = r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)"
_ROUTER = r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate\.weight"
_FUSED_ROLE = {"gate_up_proj": "gate_up", "down_proj": "down"}


@register
class MixtralAdapter(Adapter):
    name = "mixtral"
    model_types = ("mixtral",)
    expert_roles = ("w1", "w3", "w2")  # gate [I, H], up [I, H], down [H, I]

    @property
    def moe_layers(self) -> list[str]:
        return [str(i) for i in range(self._cfg("num_hidden_layers"))]

    @property
    def num_experts(self) -> int:
        return self._cfg("num_local_experts")

    def classify(self, name: str) -> TensorInfo:
        if m := match(_LEGACY, name):
            return TensorInfo("expert", m[1], int(m[2]), m[3])
        if m := match(_FUSED, name):
            return TensorInfo("expert", m[1], None, _FUSED_ROLE[m[2]])
        if m := match(_ROUTER, name):
            return TensorInfo("router", m[1])
        return OTHER

    def expected_shape(self, name: str) -> tuple[int, ...] | None:
        h, i, e = self._cfg("hidden_size"), self._cfg("intermediate_size"), self.num_experts
        info = self.classify(name)
        if info.kind == "expert":
            return {"w1": (i, h), "w3": (i, h), "w2": (h, i), "gate_up": (e, 2 * i, h), "down": (e, h, i)}[
                info.role
            ]
        if info.kind == "router":
            return (e, h)
        return decoder_shape(self, name)

    def expert_key(self, layer: str, expert: int, role: str) -> str:
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{role}.weight"

    def router_key(self, layer: str) -> str:
        return f"model.layers.{layer}.block_sparse_moe.gate.weight"

    def read_expert(self, ckpt: Checkpoint, layer: str, expert: int) -> dict[str, torch.Tensor]:
        fused = f"model.layers.{layer}.mlp.experts."
        if fused + "gate_up_proj" not in ckpt.names:
            return super().read_expert(ckpt, layer, expert)
        gate_up = ckpt.tensor(fused + "gate_up_proj", expert)  # [2I, H], gate rows first
        w1, w3 = gate_up.chunk(2, dim=0)
        return {"w1": w1.contiguous(), "w3": w3.contiguous(), "w2": ckpt.tensor(fused + "down_proj", expert)}
