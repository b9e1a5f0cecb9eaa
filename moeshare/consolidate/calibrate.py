"""Run each variant on the owner's calibration text: what hidden states reach each MoE layer, and how often
each variant's router picks each of its experts there."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from moeshare.checkpoint import Checkpoint
from moeshare.errors import MoeshareError


@dataclass
class Calibration:
    inputs: dict[str, list[torch.Tensor]]  # layer -> per variant [T, H] hidden states entering the MoE layer
    counts: dict[str, np.ndarray]  # layer -> [N, E] how often each variant's router picked each expert
    tokens: int


def read_calibration_text(path: Path) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise MoeshareError(f"--calib {path}: cannot read it ({e.strerror or e})") from None
    if not text.strip():
        raise MoeshareError(f"--calib {path}: the file is empty; give some text in the variants' domains")
    return text


def _moe_modules(model: torch.nn.Module, arch: str, layers: list[str]) -> dict[str, torch.nn.Module]:
    if arch == "mixtral":
        return {layer: model.model.layers[int(layer)].mlp for layer in layers}
    out = {}
    for layer in layers:
        stack, block = layer.split(".")
        out[layer] = getattr(model, stack).block[int(block)].layer[-1].mlp
    return out


def _load_model(ckpt: Checkpoint) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, SwitchTransformersForConditionalGeneration

    cls = (
        AutoModelForCausalLM if ckpt.adapter.name == "mixtral" else SwitchTransformersForConditionalGeneration
    )
    return cls.from_pretrained(ckpt.path, dtype=torch.float32).eval()


def calibrate(ckpts: list[Checkpoint], text: str, max_tokens: int = 4096, seq_len: int = 256) -> Calibration:
    from transformers import AutoTokenizer

    adapter = ckpts[0].adapter
    layers = adapter.moe_layers
    top_k = int(ckpts[0].config.get("num_experts_per_tok", 1))
    inputs: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    counts = {layer: np.zeros((len(ckpts), adapter.num_experts)) for layer in layers}
    n_tokens = 0
    for v, ckpt in enumerate(tqdm(ckpts, desc="calibrating", unit="variant", leave=False)):
        try:
            tokenizer = AutoTokenizer.from_pretrained(ckpt.path)
        except (OSError, ValueError) as e:
            raise MoeshareError(
                f"{ckpt.path}: --calib needs the variant's tokenizer beside it ({e})"
            ) from None
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens])
        n_tokens = len(ids)
        batch = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len) if len(ids) >= seq_len else ids[None]
        model = _load_model(ckpt)
        captured: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
        hooks = [
            module.register_forward_pre_hook(
                lambda _m, args, sink=captured[layer]: sink.append(args[0].detach())
            )
            for layer, module in _moe_modules(model, adapter.name, layers).items()
        ]
        with torch.no_grad():
            if adapter.name == "mixtral":
                model(input_ids=batch)
            else:
                model(input_ids=batch, decoder_input_ids=batch)
        for h in hooks:
            h.remove()
        for layer in layers:
            x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured[layer]]).float()  # [T, H]
            inputs[layer].append(x)
            router = ckpt.tensor(adapter.router_key(layer)).float()  # [E, H]
            picked = (x @ router.T).topk(top_k, dim=-1).indices.flatten()
            counts[layer][v] = np.bincount(picked.numpy(), minlength=adapter.num_experts)
        del model
    return Calibration(inputs, counts, n_tokens)
