"""Random-weight models for speed measurements (random weights are fine for speed, and let the benchmarks use
real layer sizes without a hub). Mixtral variants: every variant has its own non-expert tensors, and its expert
table points `own` of its experts at slots of its own and the rest at slots all variants share. Dense: one
Llama-family model (Llama-3-8B shapes by default)."""

from __future__ import annotations

import zlib

import torch

from moeshare.checkpoint.adapters import Adapter
from moeshare.checkpoint.llama import LlamaAdapter
from moeshare.checkpoint.mixtral import MixtralAdapter
from moeshare.checkpoint.switch import SwitchAdapter
from moeshare.errors import MoeshareError


def mixtral_config(
    layers: int = 8,
    hidden: int = 4096,
    intermediate: int = 14336,
    experts: int = 8,
    top_k: int = 2,
    heads: int = 32,
    kv_heads: int = 8,
    vocab: int = 32000,
    context: int = 4096,
) -> dict:
    return {
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "num_local_experts": experts,
        "num_experts_per_tok": top_k,
        "vocab_size": vocab,
        "max_position_embeddings": context,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
        "tie_word_embeddings": False,
        "eos_token_id": 2,
        "bos_token_id": 1,
        "hidden_act": "silu",
        "sliding_window": None,
    }


def llama_config(
    layers: int = 32,
    hidden: int = 4096,
    intermediate: int = 14336,
    heads: int = 32,
    kv_heads: int = 8,
    vocab: int = 128256,
    context: int = 8192,
) -> dict:
    """Llama-3-8B's shapes by default."""
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": context,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
        "tie_word_embeddings": False,
        "eos_token_id": 128001,
        "bos_token_id": 128000,
        "hidden_act": "silu",
    }


def switch_config(
    layers: int = 12,
    d_model: int = 768,
    d_ff: int = 3072,
    d_kv: int = 64,
    heads: int = 12,
    experts: int = 8,
    vocab: int = 32128,
    context: int = 512,
) -> dict:
    """Switch-Base-8's shapes by default: 12 encoder and 12 decoder blocks, every other feed-forward sparse."""
    return {
        "model_type": "switch_transformers",
        "architectures": ["SwitchTransformersForConditionalGeneration"],
        "d_model": d_model,
        "d_ff": d_ff,
        "d_kv": d_kv,
        "num_heads": heads,
        "num_layers": layers,
        "num_decoder_layers": layers,
        "num_sparse_encoder_layers": layers // 2,
        "num_sparse_decoder_layers": layers // 2,
        "encoder_sparse_step": 2,
        "decoder_sparse_step": 2,
        "num_experts": experts,
        "expert_capacity": 64,
        "vocab_size": vocab,
        "n_positions": context,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "layer_norm_epsilon": 1e-6,
        "dense_act_fn": "relu",
        "feed_forward_proj": "relu",
        "router_bias": False,
        "tie_word_embeddings": True,
        "is_encoder_decoder": True,
        "decoder_start_token_id": 0,
        "pad_token_id": 0,
        "eos_token_id": 1,
    }


def family_tables(variants: int, experts: int, own: int) -> tuple[int, int, dict[str, list[int]]]:
    """A random family's bank: (experts each variant keeps of its own, bank slots, variant v<i> -> its expert
    table). Slots [0, shared) are everyone's; then each variant's own block (none with one variant)."""
    own = own if variants > 1 else 0
    shared = experts - own
    tables = {
        f"v{i}": list(range(shared)) + [shared + i * own + j for j in range(own)] for i in range(variants)
    }
    return own, shared + variants * own, tables


class RandomSource:
    """Tensors of the names the adapter knows, drawn on `device` from a seed and the name."""

    adapter: Adapter

    def __init__(self, device: str, dtype: torch.dtype, seed: int) -> None:
        self.path = None
        self.device, self.dtype, self.seed = torch.device(device), dtype, seed

    def _randn(self, shape: tuple[int, ...], key: int, scale: float) -> torch.Tensor:
        g = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + key)
        # scaled in place: loading holds one float32 copy beside the cast one (placement.load_bytes)
        return (
            torch.randn(shape, generator=g, device=self.device, dtype=torch.float32)
            .mul_(scale)
            .to(self.dtype)
        )

    def tensor(self, variant: str, name: str) -> torch.Tensor:
        shape = self.adapter.expected_shape(name)
        if shape is None:
            raise KeyError(name)
        if name.endswith(("layernorm.weight", "layer_norm.weight")) or name == "model.norm.weight":
            return torch.ones(shape, dtype=self.dtype, device=self.device)
        key = zlib.crc32(f"{variant}/{name}".encode()) + 1000
        return self._randn(shape, key, 0.02)

    def tokenizer_dir(self, variant: str):
        return None


class RandomDenseSource(RandomSource):
    """The Source interface over one random Llama-family model, served under the name `name`."""

    def __init__(
        self,
        config: dict,
        device: str = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        seed: int = 0,
        name: str = "llama",
    ) -> None:
        super().__init__(device, dtype, seed)
        self.config = config
        self.adapter = LlamaAdapter(config, source=None)  # type: ignore[arg-type]
        self.architecture = "llama"
        self.variants = [name]

    def bank_slots(self, layer: str) -> int:
        return 0

    def table(self, variant: str, layer: str) -> list[int]:
        return []


class RandomMixtralSource(RandomSource):
    """The Source interface (see source.py) over weights drawn on `device`."""

    def __init__(
        self,
        config: dict,
        variants: int = 1,
        own: int = 2,
        device: str = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        seed: int = 0,
        only: int | None = None,
    ) -> None:
        """`only`: serve variant v<only> of the family alone, as its own checkpoint would (its E experts in
        slots 0..E-1, same weights as in the family)."""
        super().__init__(device, dtype, seed)
        self.config = config
        self.adapter = MixtralAdapter(config, source=None)  # type: ignore[arg-type]
        self.architecture = "mixtral"
        e = config["num_local_experts"]
        self.own, self.slots, self._tables = family_tables(variants, e, own)
        family = list(self._tables)
        self.variants = family
        self._slot_of: list[int] | None = None  # this source's slot -> the family's slot
        if only is not None:
            self.variants = [family[only]]
            self._slot_of, self.slots = self._tables[family[only]], e
            self._tables = {family[only]: list(range(e))}

    def bank_slots(self, layer: str) -> int:
        return self.slots

    def bank_slot(self, layer: str, slot: int) -> dict[str, torch.Tensor]:
        h, i = self.config["hidden_size"], self.config["intermediate_size"]
        if self._slot_of is not None:
            slot = self._slot_of[slot]
        key = (int(layer) * 1024 + slot) * 2
        return {"w13": self._randn((2 * i, h), key, 0.02), "w2": self._randn((h, i), key + 1, 0.02)}

    def table(self, variant: str, layer: str) -> list[int]:
        return self._tables[variant]


class RandomSwitchSource(RandomSource):
    """The Source interface over a family of random Switch Transformers variants: as RandomMixtralSource, each
    variant's table points `own` of its experts at slots of its own and the rest at shared slots."""

    def __init__(
        self,
        config: dict,
        variants: int = 1,
        own: int = 2,
        device: str = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        seed: int = 0,
    ) -> None:
        super().__init__(device, dtype, seed)
        self.config = config
        self.adapter = SwitchAdapter(config, source=None)  # type: ignore[arg-type]
        self.architecture = "switch"
        self.own, self.slots, self._tables = family_tables(variants, config["num_experts"], own)
        self.variants = list(self._tables)

    def bank_slots(self, layer: str) -> int:
        return self.slots

    def bank_slot(self, layer: str, slot: int) -> dict[str, torch.Tensor]:
        d, f = self.config["d_model"], self.config["d_ff"]
        key = (zlib.crc32(layer.encode()) % 100_000 * 1024 + slot) * 2
        return {"wi": self._randn((f, d), key, 0.05), "wo": self._randn((d, f), key + 1, 0.02)}

    def table(self, variant: str, layer: str) -> list[int]:
        return self._tables[variant]


FAMILY_KEYS = ("variants", "own", "seed", "only")
SWITCH_KEYS = ("variants", "own", "seed", "layers", "d_model", "d_ff", "d_kv", "heads", "experts", "vocab")
SPEC_KEYS = ("layers", "hidden", "intermediate", "experts", "top_k", "heads", "kv_heads", "vocab", "context")
DENSE_KEYS = ("seed", "layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "context")
KINDS = ("mixtral", "llama", "switch")


def named_spec(text: str) -> tuple[str | None, str]:
    """`moeshare serve --synthetic [NAME:]SPEC`: the name to serve a single model under (None: its own), and
    the spec. A name is for a spec that makes one model (a dense one, or one variant with only=I)."""
    name, sep, spec = text.rpartition(":")
    if sep and not name:
        raise MoeshareError(f"--synthetic {text}: write NAME:SPEC with a non-empty NAME")
    return (name or None), spec


def from_spec(
    spec: str, device: str, dtype: torch.dtype | None = None
) -> RandomMixtralSource | RandomDenseSource | RandomSwitchSource:
    """`moeshare serve --synthetic`: "variants=4,own=2,layers=8" and any mixtral_config size (Mixtral-8x7B
    layer sizes by default); seed=N picks other weights; only=I serves variant vI of the family alone.
    "kind=llama,layers=8": one dense model, any llama_config size (Llama-3-8B's by default).
    "kind=switch,variants=4": a Switch Transformers family, any switch_config size (Switch-Base-8's by default)."""
    parts = [p.partition("=") for p in spec.split(",") if p]
    kinds = [value for key, _, value in parts if key == "kind"]
    kind = kinds[-1] if kinds else "mixtral"
    if kind not in KINDS:
        raise MoeshareError(f"--synthetic {spec}: kind={kind} is not one of {', '.join(KINDS)}")
    keys = {"llama": DENSE_KEYS, "switch": SWITCH_KEYS}.get(kind, (*FAMILY_KEYS, *SPEC_KEYS))
    values: dict[str, int] = {}
    for key, sep, value in parts:
        if key == "kind":
            continue
        if not sep or key not in keys or not value.isdigit():
            raise MoeshareError(
                f"--synthetic {spec}: write KEY=N pairs separated by commas, KEY one of kind, {', '.join(keys)}"
            )
        values[key] = int(value)
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    seed = values.pop("seed", 0)
    if kind == "llama":
        config = llama_config(**values)
        _check_sizes(spec, config)
        return RandomDenseSource(config, device, dtype, seed)
    if kind == "switch":
        variants, own = values.pop("variants", 1), values.pop("own", 2)
        config = switch_config(**values)
        if zero := [k for k, v in values.items() if v < 1]:
            raise MoeshareError(f"--synthetic {spec}: {zero[0]} must be at least 1")
        if variants < 1 or not 0 <= own <= config["num_experts"]:
            raise MoeshareError(f"--synthetic {spec}: need variants >= 1 and 0 <= own <= experts")
        return RandomSwitchSource(config, variants, own, device, dtype, seed)
    variants, own = values.pop("variants", 1), values.pop("own", 2)
    only = values.pop("only", None)
    config = mixtral_config(**values)
    _check_sizes(spec, config)
    if variants < 1 or not 0 <= own <= config["num_local_experts"]:
        raise MoeshareError(f"--synthetic {spec}: need variants >= 1 and 0 <= own <= experts")
    if only is not None and only >= variants:
        raise MoeshareError(
            f"--synthetic {spec}: only={only} names no variant; variants are 0..{variants - 1}"
        )
    return RandomMixtralSource(config, variants, own, device, dtype, seed, only)


def _check_sizes(spec: str, config: dict) -> None:
    sizes = {k: v for k, v in config.items() if type(v) is int and not k.endswith("token_id")}
    if zero := [k for k, v in sizes.items() if v < 1]:
        raise MoeshareError(f"--synthetic {spec}: {zero[0]} must be at least 1")
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    if config["hidden_size"] % heads or heads % kv_heads:
        raise MoeshareError(
            f"--synthetic {spec}: hidden must be a multiple of heads, and heads a multiple of kv_heads"
        )
