"""How each zoo size is built: model shapes, training schedules, evaluation budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moeshare.zoo.tokenizer import BOS, EOS, PAD, VOCAB_SIZE

# bump with any change to what a zoo holds (weights, tokenizers): cached zoos rebuild
RECIPE_VERSION = "zoo-4"
ARCHS = ("mixtral", "switch", "llama", "qwen2")
CAUSAL_ARCHS = ("mixtral", "llama", "qwen2")  # next-token models; switch is an encoder-decoder


@dataclass(frozen=True)
class Schedule:
    steps: int
    lr: float
    batch: int
    warmup: int


@dataclass(frozen=True)
class ArchRecipe:
    config: dict[str, Any]  # keyword arguments of the transformers config class
    base: Schedule  # on the mixture of all domains
    finetune: Schedule  # per variant, starting from the base


@dataclass(frozen=True)
class Recipe:
    size: str
    seq_len: int
    eval_bytes: int  # held-out bytes scored per domain
    mixtral: ArchRecipe
    switch: ArchRecipe
    llama: ArchRecipe
    qwen2: ArchRecipe  # Qwen2-style: q/k/v biases and tied embeddings
    # CPU threads for training: the tiny models run as fast on one, and one thread never waits at a barrier
    # on a core another process holds (with two, a busy neighbour made the tiny build 20x slower)
    threads: int = 8

    def arch(self, name: str) -> ArchRecipe:
        if name not in ARCHS:
            raise ValueError(f"unknown arch {name!r}; expected one of {ARCHS}")
        return getattr(self, name)


def _decoder_config(
    layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, seq_len: int
) -> dict[str, Any]:
    """What every decoder-only config here shares (Mixtral, Llama, Qwen2)."""
    return {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 8 * seq_len,
        "tie_word_embeddings": False,
        "pad_token_id": PAD,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
    }


def mixtral_config(
    layers: int, hidden: int, intermediate: int, experts: int, heads: int, kv_heads: int, seq_len: int
) -> dict[str, Any]:
    return _decoder_config(layers, hidden, intermediate, heads, kv_heads, seq_len) | {
        "num_local_experts": experts,
        "num_experts_per_tok": 2,
        "router_aux_loss_coef": 0.02,
    }


def dense_config(
    layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, seq_len: int, rope: dict[str, Any]
) -> dict[str, Any]:
    """Llama / Qwen2 config keywords; `rope` the rope_parameters, so the zoo exercises a scaled RoPE."""
    return _decoder_config(layers, hidden, intermediate, heads, kv_heads, seq_len) | {"rope_parameters": rope}


def qwen2_config(**dims: Any) -> dict[str, Any]:
    return dense_config(**dims) | {"tie_word_embeddings": True, "use_sliding_window": False}


def llama3_rope(seq_len: int) -> dict[str, Any]:
    """Llama 3.1's scaling, with the original context at the training length so all three bands occur."""
    return {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": seq_len,
    }


def switch_config(layers: int, d_model: int, d_ff: int, experts: int, heads: int) -> dict[str, Any]:
    # Half the blocks of each stack are sparse: sparse step 2 puts experts in blocks 1, 3, ...
    # A capacity far above any sequence length means no token is ever dropped by the router.
    return {
        "vocab_size": VOCAB_SIZE,
        "d_model": d_model,
        "d_kv": d_model // heads,
        "d_ff": d_ff,
        "num_layers": layers,
        "num_decoder_layers": layers,
        "num_sparse_encoder_layers": layers // 2,
        "num_sparse_decoder_layers": layers // 2,
        "num_heads": heads,
        "num_experts": experts,
        "expert_capacity": 4096,
        "dropout_rate": 0.0,
        "router_jitter_noise": 0.0,
        "router_aux_loss_coef": 0.01,
        "router_z_loss_coef": 0.001,
        "pad_token_id": PAD,
        "eos_token_id": EOS,
        "decoder_start_token_id": PAD,
    }


LINEAR_ROPE = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}

RECIPES: dict[str, Recipe] = {
    "tiny": Recipe(
        size="tiny",
        seq_len=128,
        eval_bytes=8 * 1024,
        mixtral=ArchRecipe(
            config=mixtral_config(
                layers=2, hidden=64, intermediate=128, experts=4, heads=4, kv_heads=2, seq_len=128
            ),
            base=Schedule(steps=240, lr=4e-3, batch=16, warmup=20),
            finetune=Schedule(steps=60, lr=1.5e-3, batch=16, warmup=5),
        ),
        switch=ArchRecipe(
            config=switch_config(layers=2, d_model=64, d_ff=128, experts=4, heads=4),
            base=Schedule(steps=240, lr=4e-3, batch=16, warmup=20),
            finetune=Schedule(steps=60, lr=1.5e-3, batch=16, warmup=5),
        ),
        llama=ArchRecipe(
            config=dense_config(
                layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, seq_len=128, rope=llama3_rope(128)
            ),
            base=Schedule(steps=240, lr=4e-3, batch=16, warmup=20),
            finetune=Schedule(steps=60, lr=1.5e-3, batch=16, warmup=5),
        ),
        qwen2=ArchRecipe(
            config=qwen2_config(
                layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, seq_len=128, rope=LINEAR_ROPE
            ),
            base=Schedule(steps=240, lr=4e-3, batch=16, warmup=20),
            finetune=Schedule(steps=60, lr=1.5e-3, batch=16, warmup=5),
        ),
        threads=1,
    ),
    "small": Recipe(
        size="small",
        seq_len=256,
        eval_bytes=16 * 1024,
        mixtral=ArchRecipe(
            config=mixtral_config(
                layers=4, hidden=256, intermediate=512, experts=8, heads=8, kv_heads=4, seq_len=256
            ),
            base=Schedule(steps=360, lr=2e-3, batch=16, warmup=30),
            finetune=Schedule(steps=50, lr=6e-4, batch=16, warmup=5),
        ),
        switch=ArchRecipe(
            config=switch_config(layers=4, d_model=256, d_ff=512, experts=8, heads=8),
            base=Schedule(steps=360, lr=2e-3, batch=16, warmup=30),
            finetune=Schedule(steps=50, lr=1e-3, batch=16, warmup=5),
        ),
        llama=ArchRecipe(
            config=dense_config(
                layers=4,
                hidden=256,
                intermediate=768,
                heads=8,
                kv_heads=4,
                seq_len=256,
                rope=llama3_rope(256),
            ),
            base=Schedule(steps=360, lr=2e-3, batch=16, warmup=30),
            finetune=Schedule(steps=50, lr=6e-4, batch=16, warmup=5),
        ),
        qwen2=ArchRecipe(
            config=qwen2_config(
                layers=4, hidden=256, intermediate=768, heads=8, kv_heads=4, seq_len=256, rope=LINEAR_ROPE
            ),
            base=Schedule(steps=360, lr=2e-3, batch=16, warmup=30),
            finetune=Schedule(steps=50, lr=6e-4, batch=16, warmup=5),
        ),
    ),
}


def recipe(size: str) -> Recipe:
    if size not in RECIPES:
        raise ValueError(f"unknown zoo size {size!r}; expected one of {sorted(RECIPES)}")
    return RECIPES[size]
