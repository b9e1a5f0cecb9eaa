"""Dense Llama-family models on our runtime: the zoo's trained llama and qwen2 checkpoints against transformers."""

import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from moeshare.checkpoint import open_checkpoint
from moeshare.engine.attention import AttnBatch
from moeshare.engine.models.llama import DenseLlama, LlamaDims, tensor_names
from moeshare.engine.synthetic import from_spec
from moeshare.errors import MoeshareError
from moeshare.memory.blocks import BlockPool

BLOCK = 16
NEW_TOKENS = 32
CPU = torch.device("cpu")


def _ours(path):
    ckpt = open_checkpoint(path)
    dims = LlamaDims.from_config(ckpt.config)
    model = DenseLlama(dims, 1, torch.float32, CPU)
    model.load(0, ((k, ckpt.tensor(key)) for k, key in tensor_names(dims).items()))
    return model


class Sequence:
    """One sequence's blocks in a real pool, handed out out of order so the paging is exercised."""

    def __init__(self, model: DenseLlama, blocks: int) -> None:
        d = model.dims
        self.model, self.length, self.table = model, 0, []
        self.pool = BlockPool(blocks, BLOCK, d.layers, d.kv_heads, d.head_dim, torch.float32, CPU)
        self.pool.allocate(1)  # block 0 stays taken: the sequence's blocks start elsewhere

    def step(self, ids: list[int]) -> torch.Tensor:
        """Run `ids` as the sequence's next tokens; logits of each of them [n, V]."""
        need = self.pool.blocks_for(self.length + len(ids)) - len(self.table)
        self.table += reversed(self.pool.allocate(need)) if need > 0 else []
        attn = AttnBatch.build([self.table], [self.length], [len(ids)], BLOCK, CPU)
        positions = torch.arange(self.length, self.length + len(ids))
        rows = torch.zeros(len(ids), dtype=torch.long)
        hidden = self.model.forward(torch.tensor(ids), positions, rows, attn, self.pool.kv)
        self.length += len(ids)
        return self.model.logits(hidden, rows)


def _prompt(zoo, path, domain: str) -> list[int]:
    text = (zoo / "heldout" / f"{domain}.txt").read_text(encoding="utf-8")[:150]
    return AutoTokenizer.from_pretrained(path)(text).input_ids


@pytest.mark.parametrize(
    ("arch", "name", "domain"),
    [("llama", "base", "kjv"), ("llama", "python", "python"), ("qwen2", "base", "fortunes-en")],
)
def test_dense_zoo_model_matches_transformers_logits_and_greedy_tokens(tiny_zoo, arch, name, domain):
    path = tiny_zoo / arch / name
    ids = _prompt(tiny_zoo, path, domain)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]  # [T, V]
        reference.generation_config.eos_token_id = None  # 32 tokens, whatever they are
        greedy = reference.generate(
            torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
        )[0, len(ids) :].tolist()

    seq = Sequence(_ours(path), 32)
    with torch.no_grad():
        logits = seq.step(ids)
        assert logits.dtype == torch.float32 and logits.shape == expected.shape
        assert ((logits - expected).abs().max() / expected.abs().max()).item() < 1e-4
        tokens = [int(logits[-1].argmax())]
        while len(tokens) < NEW_TOKENS:
            tokens.append(int(seq.step(tokens[-1:])[-1].argmax()))
    assert tokens == greedy
    assert len(set(greedy)) > 3  # a trained model says something, not one token over and over


def test_qwen2_zoo_model_has_qkv_biases_and_tied_embeddings(tiny_zoo):
    ckpt = open_checkpoint(tiny_zoo / "qwen2" / "base")
    assert "lm_head.weight" not in ckpt.names and "model.layers.0.self_attn.q_proj.bias" in ckpt.names
    dims = LlamaDims.from_config(ckpt.config)
    assert dims.tied and dims.qkv_bias and not dims.o_bias and dims.rope.kind == "linear"
    model = _ours(tiny_zoo / "qwen2" / "base")
    assert model.w["lm_head"] is model.w["embed"]
    assert model.row_bytes() == sum(ckpt.nbytes(n) for n in ckpt.names)


def test_a_mistral_checkpoint_serves_like_a_llama_one(tiny_zoo, tmp_path):
    path = tmp_path / "mistral"
    shutil.copytree(tiny_zoo / "llama" / "base", path)
    config = AutoConfig.from_pretrained(path).to_dict()
    config |= {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": None}
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    AutoConfig.for_model(**config).save_pretrained(path)
    ids = _prompt(tiny_zoo, path, "kjv")
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(path).eval()(torch.tensor([ids])).logits[0]
        logits = Sequence(_ours(path), 32).step(ids)
    assert ((logits - expected).abs().max() / expected.abs().max()).item() < 1e-4


LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@pytest.mark.parametrize(
    "rope", [LLAMA3, {"rope_type": "linear", "rope_theta": 1e6, "factor": 4.0}, {"rope_theta": 10000.0}]
)
def test_rope_frequencies_match_transformers(rope):
    config = from_spec("kind=llama,layers=1", "meta").config | {"rope_parameters": rope}
    kind = rope.get("rope_type", "default")
    hf = AutoConfig.for_model("llama", **{k: v for k, v in config.items() if k != "model_type"})
    if kind == "default":
        expected = 1.0 / (rope["rope_theta"] ** (torch.arange(0, 128, 2).float() / 128))
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
    got = LlamaDims.from_config(config).rope.inv_freq(128)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


def _config(**changes) -> dict:
    return from_spec("kind=llama,layers=1", "meta").config | changes


@pytest.mark.parametrize(
    ("config", "named"),
    [
        (_config(model_type="mistral", sliding_window=4096, max_position_embeddings=32768), "sliding-window"),
        (_config(model_type="qwen2", use_sliding_window=True, sliding_window=128), "sliding-window"),
        (_config(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "'yarn'"),
        (_config(rope_scaling={"type": "su", "factor": 2.0}), "'su'"),
        (_config(rope_parameters={"rope_type": "linear"}), "'factor'"),
        (_config(hidden_act="gelu"), "hidden_act"),
        (_config(mlp_bias=True), "mlp_bias"),
    ],
)
def test_unsupported_config_features_are_one_line_errors_naming_them(config, named):
    with pytest.raises(MoeshareError) as e:
        LlamaDims.from_config(config)
    assert named in str(e.value) and "\n" not in str(e.value)


def test_windows_that_cover_the_context_are_served():
    assert LlamaDims.from_config(_config(model_type="mistral", sliding_window=None))
    assert LlamaDims.from_config(_config(model_type="mistral", sliding_window=8192))
    assert LlamaDims.from_config(_config(model_type="qwen2", use_sliding_window=False, sliding_window=128))


def test_synthetic_dense_model_has_llama_3_8b_shapes_on_the_meta_device():
    source = from_spec("kind=llama", "meta")
    dims = LlamaDims.from_config(source.config)
    assert (dims.hidden, dims.layers, dims.intermediate, dims.heads, dims.kv_heads, dims.vocab) == (
        4096, 32, 14336, 32, 8, 128256,
    )  # fmt: skip
    model = DenseLlama(dims, 1, torch.bfloat16, torch.device("meta"))
    assert model.row_bytes() == 2 * 8_030_261_248  # Llama-3-8B's parameters in bf16
    for name, key in tensor_names(dims).items():
        assert tuple(model.w[name].shape[1:]) == source.adapter.expected_shape(key), name
    assert source.variants == ["llama"] and source.architecture == "llama"
    assert LlamaDims.from_config(from_spec("kind=llama,layers=8", "meta").config).layers == 8


@pytest.mark.parametrize(
    ("spec", "named"),
    [("kind=gpt", "kind=gpt"), ("kind=llama,experts=8", "KEY one of"), ("kind=llama,heads=5", "multiple")],
)
def test_bad_synthetic_dense_specs_are_one_line_errors(spec, named):
    with pytest.raises(MoeshareError) as e:
        from_spec(spec, "meta")
    assert named in str(e.value) and "\n" not in str(e.value)
