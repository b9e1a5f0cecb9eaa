"""Random-weight Mixtral variants for speed measurements (random weights are fine for speed, and let the
benchmarks use real layer sizes without a hub): every variant has its own non-expert tensors, and its expert
table points `own` of its experts at slots of its own and the rest at slots all variants share."""

from __future__ import annotations

import zlib

import torch

from moeshare.checkpoint.mixtral import MixtralAdapter


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


class RandomMixtralSource:
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
        self.config = config
        self.adapter = MixtralAdapter(config, source=None)  # type: ignore[arg-type]
        self.architecture = "mixtral"
        family = [f"v{i}" for i in range(variants)]
        self.path = None
        self.device, self.dtype, self.seed = torch.device(device), dtype, seed
        e = config["num_local_experts"]
        self.own = own if variants > 1 else 0
        shared = e - self.own
        # slots [0, shared) are everyone's; then each variant's own block
        self.slots = shared + variants * self.own
        self._tables = {
            v: list(range(shared)) + [shared + i * self.own + j for j in range(self.own)]
            for i, v in enumerate(family)
        }
        self.variants = family
        self._slot_of: list[int] | None = None  # this source's slot -> the family's slot
        if only is not None:
            self.variants = [family[only]]
            self._slot_of, self.slots = self._tables[family[only]], e
            self._tables = {family[only]: list(range(e))}

    def _randn(self, shape: tuple[int, ...], key: int, scale: float) -> torch.Tensor:
        g = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + key)
        # scaled in place: loading holds one float32 copy beside the cast one (placement.load_bytes)
        return (
            torch.randn(shape, generator=g, device=self.device, dtype=torch.float32)
            .mul_(scale)
            .to(self.dtype)
        )

    def variant_config(self, variant: str) -> dict:
        return self.config

    def tensor(self, variant: str, name: str) -> torch.Tensor:
        shape = self.adapter.expected_shape(name)
        if shape is None:
            raise KeyError(name)
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            return torch.ones(shape, dtype=self.dtype, device=self.device)
        key = zlib.crc32(f"{variant}/{name}".encode()) + 1000
        return self._randn(shape, key, 0.02)

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

    def tokenizer_dir(self, variant: str):
        return None


FAMILY_KEYS = ("variants", "own", "seed", "only")
SPEC_KEYS = ("layers", "hidden", "intermediate", "experts", "top_k", "heads", "kv_heads", "vocab", "context")


def from_spec(spec: str, device: str, dtype: torch.dtype | None = None) -> RandomMixtralSource:
    """`moeshare serve --synthetic`: "variants=4,own=2,layers=8" and any mixtral_config size (Mixtral-8x7B
    layer sizes by default); seed=N picks other weights; only=I serves variant vI of the family alone."""
    from moeshare.errors import MoeshareError

    values: dict[str, int] = {}
    for part in filter(None, spec.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in (*SPEC_KEYS, *FAMILY_KEYS) or not value.isdigit():
            raise MoeshareError(
                f"--synthetic {spec}: write KEY=N pairs separated by commas, KEY one of "
                f"{', '.join(FAMILY_KEYS)}, {', '.join(SPEC_KEYS)}"
            )
        values[key] = int(value)
    variants, own, seed = values.pop("variants", 1), values.pop("own", 2), values.pop("seed", 0)
    only = values.pop("only", None)
    config = mixtral_config(**values)
    if variants < 1 or not 0 <= own <= config["num_local_experts"]:
        raise MoeshareError(f"--synthetic {spec}: need variants >= 1 and 0 <= own <= experts")
    if only is not None and only >= variants:
        raise MoeshareError(
            f"--synthetic {spec}: only={only} names no variant; variants are 0..{variants - 1}"
        )
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return RandomMixtralSource(config, variants, own, device, dtype, seed, only)
