"""Run each variant on calibration text: what hidden states reach each MoE layer, and how each variant's
router weighs its experts there. The text is --calib's, or (causal LMs) text each variant samples itself."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from moeshare.checkpoint import Checkpoint
from moeshare.checkpoint.hf import load_model
from moeshare.errors import MoeshareError

# Without calibration text, a causal variant samples this many tokens from itself, in sequences of SAMPLE_LEN.
SELF_CALIB_TOKENS = 4096
SAMPLE_LEN = 128
CALIB_TOKENS = 4096  # of --calib text, the tokens each variant runs
MAX_CALIB_BYTES = 64 << 20  # --calib is read up to this


@dataclass
class Calibration:
    inputs: dict[str, list[torch.Tensor]]  # layer -> per variant [T, H] hidden states entering the MoE layer
    counts: dict[str, np.ndarray]  # layer -> [N, E] how often each variant's router picked each expert
    tokens: int
    # layer -> per variant [T, E] the gate weight of each expert on each token, 0 where not picked
    gates: dict[str, list[torch.Tensor]]
    sampled: bool = False  # the text was sampled from each variant, not read from --calib


def can_sample(ckpt: Checkpoint) -> bool:
    """Whether a variant can write its own calibration text: a causal LM that knows its start token."""
    return ckpt.adapter.name == "mixtral" and ckpt.config.get("bos_token_id") is not None


def read_calibration_text(path: Path) -> str:
    try:
        with Path(path).open("rb") as f:
            raw = f.read(MAX_CALIB_BYTES + 1)  # bounded: --calib /dev/zero or a pipe must not fill memory
    except OSError as e:
        raise MoeshareError(f"--calib {path}: cannot read it ({e.strerror or e})") from None
    if len(raw) > MAX_CALIB_BYTES:
        raise MoeshareError(
            f"--calib {path}: more than {MAX_CALIB_BYTES >> 20} MiB, the cap on calibration text "
            f"(only its first {CALIB_TOKENS} tokens are used): give a shorter file"
        )
    text = raw.decode("utf-8", errors="replace")
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


def gate_weights(arch: str, logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """The weight each expert's output gets on each token [T, E], from router logits [T, E], as transformers
    routes: softmax, top k, and for Mixtral the top k renormalized."""
    probs = logits.float().softmax(dim=-1)
    top = probs.topk(top_k, dim=-1)
    values = top.values / top.values.sum(dim=-1, keepdim=True) if arch == "mixtral" else top.values
    return torch.zeros_like(probs).scatter(-1, top.indices, values)


def _text_batch(ckpt: Checkpoint, text: str, max_tokens: int, seq_len: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(ckpt.path)
    except (OSError, ValueError) as e:
        raise MoeshareError(f"{ckpt.path}: --calib needs the variant's tokenizer beside it ({e})") from None
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens])
    return ids[: len(ids) // seq_len * seq_len].view(-1, seq_len) if len(ids) >= seq_len else ids[None]


@torch.no_grad()
def _sampled_batch(model: torch.nn.Module, bos: int, max_tokens: int, seed: int) -> torch.Tensor:
    """[max_tokens // SAMPLE_LEN, SAMPLE_LEN] ids sampled at temperature 1 after <s>; seeded: reproducible."""
    rows = max(1, max_tokens // SAMPLE_LEN)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model.generate(
            input_ids=torch.full((rows, 1), bos),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=SAMPLE_LEN - 1,
            min_new_tokens=SAMPLE_LEN - 1,  # no early end of sequence: every row is full length
            # never used, as no row ends early; only not <s>, which generate would warn of as right padding
            pad_token_id=1 if bos == 0 else 0,
        )


def calibrate(
    ckpts: list[Checkpoint], text: str | None, max_tokens: int = CALIB_TOKENS, seq_len: int = 256
) -> Calibration:
    """text None: each variant samples max_tokens of its own (see can_sample)."""
    adapter = ckpts[0].adapter
    layers = adapter.moe_layers
    top_k = int(ckpts[0].config.get("num_experts_per_tok", 1))
    inputs: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    gates: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    counts = {layer: np.zeros((len(ckpts), adapter.num_experts)) for layer in layers}
    n_tokens = 0
    for v, ckpt in enumerate(tqdm(ckpts, desc="calibrating", unit="variant", leave=False)):
        if text is None:
            model = load_model(ckpt.path, ckpt.adapter.name)
            batch = _sampled_batch(model, int(ckpt.config["bos_token_id"]), max_tokens, seed=v)
        else:
            batch = _text_batch(ckpt, text, max_tokens, seq_len)
            model = load_model(ckpt.path, ckpt.adapter.name)
        n_tokens = batch.numel()
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
            router = ckpt.tensor(adapter.router_key(layer)).float()  # [E, H]
            g = gate_weights(adapter.name, x @ router.T, top_k)  # [T, E]
            inputs[layer].append(x)
            gates[layer].append(g)
            counts[layer][v] = (g > 0).sum(dim=0).numpy()
        del model
    return Calibration(inputs, counts, n_tokens, gates, sampled=text is None)
