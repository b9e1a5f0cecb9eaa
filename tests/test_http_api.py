"""The OpenAI-compatible HTTP API (`serve --http-port`), through the official `openai` client on loopback: the
same engine and tokens as the gRPC API, streaming and not, chat through the tokenizer's template, OpenAI-style
errors, the bearer token, and a client that goes away freeing its KV."""

import http.client
import json
import time
from urllib.parse import urlsplit

import openai
import pytest
from test_server import PROMPTS, VARIANTS, Server, _wait_kv_free

from moeshare.client import Client
from moeshare.consolidate import Options, consolidate

CHAT = [{"role": "system", "content": "Answer in verse."}, {"role": "user", "content": "And God said"}]


@pytest.fixture(scope="module")
def served(tiny_zoo, tmp_path_factory):
    store = tmp_path_factory.mktemp("http") / "mixtral"
    consolidate([tiny_zoo / "mixtral" / v for v in VARIANTS], store, Options(budget="0.5"))
    s = Server(store, f"llama-kjv={tiny_zoo / 'llama' / 'kjv'}", f"t5-py={tiny_zoo / 'switch' / 'python'}",
               "--http-port", "0")  # fmt: skip
    assert s.http.startswith("http://127.0.0.1:") and s.http.endswith("/v1")
    yield s, tiny_zoo
    s.stop()


def _raw(s: Server, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    """One plain HTTP request (no client library): its status and JSON body."""
    url = urlsplit(s.http)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"content-type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def _openai(s: Server, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=s.http, api_key=key, max_retries=0, timeout=60)


def test_models_are_every_served_name(served):
    s, _ = served
    ids = {m.id for m in _openai(s).models.list()}
    assert ids == set(VARIANTS) | {"llama-kjv", "t5-py"}
    assert _raw(s, "GET", "/health") == (200, {"status": "ok"})


def test_completions_give_the_grpc_apis_tokens_streamed_or_not(served):
    s, _ = served
    client = _openai(s)
    with Client(s.address) as grpc_client:
        for model, prompt in [
            ("kjv", PROMPTS["kjv"]),
            ("python", PROMPTS["python"]),
            ("llama-kjv", "And God"),
        ]:
            want = grpc_client.complete(model, prompt, max_tokens=16, temperature=0.0)
            got = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0)
            assert got.choices[0].text == want.text and got.choices[0].finish_reason == "length", model
            assert got.usage.completion_tokens == 16 and got.usage.prompt_tokens == want.prompt_tokens
            chunks = list(
                client.completions.create(
                    model=model,
                    prompt=prompt,
                    max_tokens=16,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )  # fmt: skip
            )
            assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    # a stop string ends the text before it, as on gRPC
    full = client.completions.create(
        model="kjv", prompt=PROMPTS["kjv"], max_tokens=16, temperature=0
    ).choices[0]
    stop = full.text[4:6]
    cut = client.completions.create(
        model="kjv", prompt=PROMPTS["kjv"], max_tokens=16, temperature=0, stop=[stop]
    )
    assert len(stop) == 2 and cut.choices[0].text == full.text[: full.text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    # token ids as the prompt, and the sampled tokens' logprobs
    got = client.completions.create(model="kjv", prompt=[40, 41, 42], max_tokens=4, temperature=0, logprobs=1)
    assert len(got.choices[0].logprobs.token_logprobs) == 4
    assert all(x <= 0 for x in got.choices[0].logprobs.token_logprobs)


def test_chat_goes_through_the_template_streamed_or_not(served):
    s, zoo = served
    from moeshare.engine.detokenize import load_tokenizer

    client = _openai(s)
    prompt = load_tokenizer(zoo / "llama" / "kjv").apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("assistant:")
    want = client.completions.create(model="llama-kjv", prompt=prompt, max_tokens=12, temperature=0)
    got = client.chat.completions.create(
        model="llama-kjv", messages=CHAT, max_completion_tokens=12, temperature=0
    )
    assert (
        got.choices[0].message.content == want.choices[0].text and got.choices[0].message.role == "assistant"
    )
    assert got.object == "chat.completion" and got.usage.total_tokens == want.usage.total_tokens
    stream = client.chat.completions.create(
        model="llama-kjv", messages=CHAT, max_tokens=12, temperature=0, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream]
    assert "".join(pieces) == want.choices[0].text
    scored = client.chat.completions.create(
        model="llama-kjv", messages=CHAT, max_tokens=4, temperature=0, logprobs=True
    )
    tokens = scored.choices[0].logprobs.content
    assert len(tokens) == 4 and "".join(t.token for t in tokens) == scored.choices[0].message.content
    assert all(t.logprob <= 0 for t in tokens)


def test_a_switch_model_is_text_to_text_over_http_and_has_no_chat(served):
    s, _ = served
    client = _openai(s)
    done = client.completions.create(
        model="t5-py", prompt="def main(<extra_id_0>):", max_tokens=8, temperature=0
    )
    assert done.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError, match="t5-py has no chat template"):
        client.chat.completions.create(model="t5-py", messages=CHAT)


def test_errors_have_openais_shape_and_status(served):
    s, _ = served
    client = _openai(s)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x")
    assert e.value.body["code"] == "model_not_found" and "served models" in e.value.body["message"]
    for extra, param in (
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"best": 1}, "best"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="kjv", messages=CHAT, extra_body=extra)
        assert e.value.body["param"] == param, extra
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="kjv", prompt="x", max_tokens=0)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:  # the extensions are checked as the rest
        client.completions.create(model="kjv", prompt="x", extra_body={"ttft_target": -1})
    assert e.value.body["param"] == "ttft_target"
    targets = {
        "ttft_target": 30.0,
        "tpot_target": 5.0,
        "priority": 2,
    }  # latency targets and priority, as gRPC's
    assert (
        client.completions.create(
            model="kjv", prompt="x", max_tokens=2, extra_body=targets
        ).usage.completion_tokens
        == 2
    )
    with pytest.raises(openai.BadRequestError, match="tokens"):  # a prompt longer than the context
        client.completions.create(model="kjv", prompt="a" * 5000, max_tokens=4)
    status, body = _raw(s, "POST", "/v1/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    with Client(s.address) as grpc_client:
        assert grpc_client.stats().kv_blocks_used == 0  # nothing refused took any KV


def test_a_client_that_goes_away_mid_stream_frees_its_kv(served):
    s, _ = served
    body = {"model": "kjv", "prompt": PROMPTS["kjv"], "max_tokens": 2000, "temperature": 0, "stream": True}
    url = urlsplit(s.http)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request(
        "POST", "/v1/completions", body=json.dumps(body), headers={"content-type": "application/json"}
    )
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    first = r.readline().decode()
    assert first.startswith("data: ") and json.loads(first[6:])["choices"][0]["finish_reason"] is None
    with Client(s.address) as grpc_client:
        assert grpc_client.stats().kv_blocks_used > 0
        conn.close()  # gone, with about a thousand tokens to come (over a second of decoding here)
        assert _wait_kv_free(grpc_client, seconds=0.5) == 0


def test_a_client_that_goes_away_before_a_whole_reply_frees_its_kv_too(served):
    s, _ = served
    body = {"model": "kjv", "prompt": PROMPTS["kjv"], "max_tokens": 2000, "temperature": 0}
    url = urlsplit(s.http)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request(
        "POST", "/v1/completions", body=json.dumps(body), headers={"content-type": "application/json"}
    )
    with Client(s.address) as grpc_client:
        deadline = time.monotonic() + 10
        while grpc_client.stats().kv_blocks_used == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert grpc_client.stats().kv_blocks_used > 0  # it runs
        conn.close()  # gone before its reply, with about a thousand tokens to come
        assert _wait_kv_free(grpc_client, seconds=0.5) == 0


def test_the_bearer_token_guards_the_api(tiny_zoo, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    s = Server(tiny_zoo / "mixtral" / "kjv", "--http-port", "0", "--auth-token-file", token)
    try:
        with pytest.raises(openai.AuthenticationError):
            _openai(s, "wrong").models.list()
        assert [m.id for m in _openai(s, "s3cret").models.list()] == ["kjv"]
        assert _raw(s, "GET", "/health")[0] == 200  # health stays open
        t0 = time.monotonic()
        _openai(s, "s3cret").completions.create(model="kjv", prompt="And", max_tokens=2)
        assert time.monotonic() - t0 < 30
    finally:
        s.stop()


def test_concurrent_streams_of_several_models_get_their_solo_text(served):
    import asyncio

    s, _ = served
    jobs = [
        ("kjv", PROMPTS["kjv"]),
        ("python", PROMPTS["python"]),
        ("llama-kjv", "And God"),
        ("t5-py", "x <extra_id_0> y"),
    ]
    client = _openai(s)
    alone = [
        client.completions.create(model=m, prompt=p, max_tokens=12, temperature=0).choices[0].text
        for m, p in jobs
    ]

    async def together() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=s.http, api_key="none", max_retries=0, timeout=60)

        async def one(model: str, prompt: str) -> str:
            stream = await aclient.completions.create(
                model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True
            )
            return "".join([c.choices[0].text async for c in stream if c.choices])

        try:
            return await asyncio.gather(*(one(m, p) for m, p in jobs * 2))
        finally:
            await aclient.close()

    assert asyncio.run(together()) == alone * 2


def test_a_full_queue_is_429_at_once_and_the_rest_are_served(tiny_zoo):
    import asyncio
    import urllib.request

    s = Server(
        tiny_zoo / "mixtral" / "kjv",
        "--http-port",
        "0",
        "--max-num-seqs",
        "1",
        "--max-queue",
        "1",
        "--metrics-port",
        "0",
    )

    async def burst() -> list:
        aclient = openai.AsyncOpenAI(base_url=s.http, api_key="none", max_retries=0, timeout=60)
        try:
            calls = [
                aclient.completions.create(model="kjv", prompt="And", max_tokens=100, temperature=0)
                for _ in range(6)
            ]
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await aclient.close()

    try:
        results = asyncio.run(burst())  # six at once: one runs, one may wait, the rest find the queue full
        refused = [r for r in results if isinstance(r, openai.RateLimitError)]
        served = [r for r in results if not isinstance(r, Exception)]
        assert refused and served and len(refused) + len(served) == 6, results
        assert all("queue is full" in str(r) for r in refused)
        assert all(r.usage.completion_tokens == 100 for r in served)
        with pytest.raises(openai.NotFoundError):
            _openai(s).completions.create(model="made-up", prompt="And", max_tokens=2)
        url = next(x.split()[-1] for x in s.errors if x.startswith("moeshare: metrics on "))
        metrics = urllib.request.urlopen(url, timeout=10).read().decode()
        for line in (
            f'moeshare_http_requests_total{{model="kjv",status="200"}} {float(len(served))}',
            f'moeshare_http_requests_total{{model="kjv",status="429"}} {float(len(refused))}',
            'moeshare_http_requests_total{model="unknown",status="404"} 1.0',
        ):
            assert line in metrics, line
    finally:
        s.stop()


def test_tls_files_serve_https_too(tiny_zoo, tmp_path):
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a certificate with")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    s = Server(tiny_zoo / "mixtral" / "kjv", "--http-port", "0", "--tls-cert", cert, "--tls-key", key)
    try:
        assert s.http.startswith("https://127.0.0.1:")
        url = urlsplit(s.http)
        conn = http.client.HTTPSConnection(
            url.hostname, url.port, context=ssl.create_default_context(cafile=cert)
        )
        conn.request("GET", "/v1/models")
        r = conn.getresponse()
        assert r.status == 200 and [m["id"] for m in json.loads(r.read())["data"]] == ["kjv"]
        conn.close()
    finally:
        s.stop()
