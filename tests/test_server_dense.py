"""Dense checkpoints (Llama, Qwen2 style) served beside a MoE store, in one server and one engine."""

import asyncio

import pytest
import torch
from test_server import PROMPTS, VARIANTS, Server, _wait_kv_free
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeshare.client import AsyncClient, Client
from moeshare.consolidate import Options, consolidate

DENSE = {"llama-kjv": ("llama", "kjv"), "qwen-py": ("qwen2", "python")}  # model name -> zoo arch, variant


@pytest.fixture(scope="module")
def mixed(tiny_zoo, tmp_path_factory):
    store = tmp_path_factory.mktemp("mixed") / "mixtral"
    consolidate([tiny_zoo / "mixtral" / v for v in VARIANTS], store, Options(budget="0.5"))
    named = [f"{name}={tiny_zoo / arch / v}" for name, (arch, v) in DENSE.items()]
    s = Server(store, *named, "--max-num-seqs", "16")
    yield s, tiny_zoo
    s.stop()


def _greedy(client: Client, model: str, prompt: str, n: int = 24) -> list[int]:
    return client.complete(model, prompt, max_tokens=n, temperature=0.0, ignore_eos=True).token_ids


def test_models_show_each_kind_and_architecture(mixed):
    s, _ = mixed
    with Client(s.address) as client:
        models = {m.name: m for m in client.list_models()}
    assert set(models) == set(VARIANTS) | set(DENSE)
    assert {models[v].kind for v in VARIANTS} == {"variant"}
    assert models["llama-kjv"].kind == "dense" and models["llama-kjv"].architecture == "llama"
    assert models["qwen-py"].kind == "dense" and models["qwen-py"].architecture == "qwen2"
    # step budgets: --max-num-seqs for every model, the token budget each one's own (2048 on CPU)
    assert {(m.max_num_seqs, m.max_batched_tokens) for m in models.values()} == {(16, 2048)}


def test_dense_models_stream_transformers_greedy_tokens(mixed):
    s, zoo = mixed
    with Client(s.address) as client:
        for name, (arch, v) in DENSE.items():
            path = zoo / arch / v
            tok = AutoTokenizer.from_pretrained(path)
            ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            ids = tok(PROMPTS[v], add_special_tokens=False)["input_ids"]
            want = ref.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, min_new_tokens=24)
            assert _greedy(client, name, PROMPTS[v]) == want[0, len(ids) :].tolist(), name


def test_concurrent_requests_of_every_kind_match_their_solo_tokens(mixed):
    s, _ = mixed
    jobs = [(v, PROMPTS[v]) for v in VARIANTS] + [(n, PROMPTS[v]) for n, (_, v) in DENSE.items()]
    with Client(s.address) as client:
        alone = [_greedy(client, m, p) for m, p in jobs]

    async def together() -> list[list[int]]:
        async with AsyncClient(s.address) as client:

            async def one(model: str, prompt: str) -> list[int]:
                out: list[int] = []
                async for r in client.generate(
                    model, prompt, max_tokens=24, temperature=0.0, ignore_eos=True
                ):
                    out += r.token_ids
                return out

            return await asyncio.gather(*(one(m, p) for m, p in jobs * 2))

    assert asyncio.run(together()) == alone * 2
    with Client(s.address) as client:
        assert _wait_kv_free(client) == 0


@pytest.mark.parametrize("model", ["kjv", "llama-kjv", "qwen-py"])
def test_cancel_frees_kv_of_any_model_kind(mixed, model):
    s, _ = mixed
    with Client(s.address) as client:
        stream = client.generate_stream(
            model, "And God said", max_tokens=400, temperature=0.0, ignore_eos=True
        )
        next(iter(stream))
        assert client.stats().kv_blocks_used > 0
        stream.cancel()
        assert _wait_kv_free(client) == 0
        assert len(_greedy(client, model, "And", 4)) == 4  # and it serves on


def test_a_dense_config_we_do_not_support_is_one_line_and_nothing_loads(tiny_zoo, tmp_path):
    import json
    import shutil
    import subprocess
    import sys

    ckpt = tmp_path / "windowed"
    shutil.copytree(tiny_zoo / "llama" / "kjv", ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config |= {"model_type": "mistral", "sliding_window": 64}
    (ckpt / "config.json").write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "moeshare.cli", "serve", str(ckpt), "--port", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("moeshare: error:")]
    assert len(errors) == 1 and "sliding-window attention is not supported" in errors[0]
    assert "Traceback" not in done.stderr


def test_synthetic_dense_models_serve_token_id_prompts_under_their_names():
    tiny = "kind=llama,layers=1,hidden=64,intermediate=128,heads=4,kv_heads=2,vocab=300"
    s = Server("--synthetic", tiny, "--synthetic", f"other:{tiny},seed=1")
    try:
        with Client(s.address) as client:
            models = {m.name: m for m in client.list_models()}
            assert {(m.name, m.kind, m.architecture) for m in models.values()} == {
                ("llama", "dense", "llama"),
                ("other", "dense", "llama"),
            }
            got = {}
            for name in models:
                c = client.complete(name, [5, 6, 7, 8], max_tokens=8, temperature=0.0, ignore_eos=True)
                assert c.completion_tokens == 8 and all(0 <= t < 300 for t in c.token_ids)
                got[name] = c.token_ids
            assert got["llama"] != got["other"]  # another seed: other weights
    finally:
        s.stop()


def test_a_tokenizer_that_does_not_load_is_one_line_before_any_memory_is_taken(tiny_zoo, tmp_path):
    import shutil
    import subprocess
    import sys

    ckpt = tmp_path / "broken"
    shutil.copytree(tiny_zoo / "llama" / "kjv", ckpt)
    (ckpt / "tokenizer.json").write_text("{ not json")
    cmd = [sys.executable, "-m", "moeshare.cli", "serve", str(ckpt), "--port", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("moeshare: error:")]
    assert len(errors) == 1 and "the tokenizer does not load" in errors[0] and str(ckpt) in errors[0]
