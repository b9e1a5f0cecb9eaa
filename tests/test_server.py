"""A real server on 127.0.0.1 in a subprocess, called by the Python client, stock gRPC tools and the CLI."""

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from moeshare.client import AsyncClient, Client
from moeshare.consolidate import Options, consolidate
from moeshare.engine.engine import Engine
from moeshare.engine.request import SamplingParams
from moeshare.v1 import moeshare_pb2 as pb

VARIANTS = ["kjv", "fortunes-en", "fortunes-de", "python"]
PROMPTS = {
    "kjv": "And God said unto Moses,",
    "fortunes-en": "A man who has",
    "fortunes-de": "Wer nicht wagt,",
    "python": "def __init__(self,",
}


class Server:
    def __init__(self, *args: str | Path, wait: float = 120) -> None:
        cmd = [sys.executable, "-m", "moeshare.cli", "serve", *map(str, args), "--port", "0"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.errors: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_errors, daemon=True).start()
        self.address = self.http = ""
        deadline = time.monotonic() + wait
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:  # say why: what the server printed on stderr last, and whether it runs
                self.stop()
                said = "\n".join(self.errors[-15:])
                raise AssertionError(
                    f"no 'serving' within {wait} s (exit {self.proc.poll()}):\n{said}"
                ) from None
            if line.startswith("moeshare: listening on "):
                self.address = line.split()[-1]
            if line.startswith("moeshare: HTTP on "):
                self.http = line.split()[-1]  # the OpenAI-compatible API's base URL (.../v1)
            if line.startswith("moeshare: serving"):
                break

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def _read_errors(self) -> None:  # drained, so a chatty server never blocks on a full pipe
        for line in self.proc.stderr:
            self.errors.append(line.strip())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def store(tiny_zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "mixtral"
    consolidate([tiny_zoo / "mixtral" / v for v in VARIANTS], out, Options(budget="0.5"))
    return out


@pytest.fixture(scope="module")
def server(store):
    s = Server(store, "--max-queue", "64")
    yield s
    s.stop()


def _wait_kv_free(client: Client, seconds: float = 10) -> int:
    deadline = time.monotonic() + seconds
    while True:
        used = client.stats().kv_blocks_used
        if used == 0 or time.monotonic() > deadline:
            return used
        time.sleep(0.05)


def test_each_variant_streams_the_engines_tokens(server, store):
    engine = Engine([store])
    with Client(server.address) as client:
        for v in VARIANTS:
            params = {"max_tokens": 24, "temperature": 0.0}
            ids = [
                t
                for r in client.generate_stream(v, PROMPTS[v], request_id=f"r-{v}", **params)
                for t in r.token_ids
            ]
            _, direct = engine.generate(v, PROMPTS[v], SamplingParams(max_tokens=24, temperature=0))
            assert ids == direct
            last = list(client.generate_stream(v, PROMPTS[v], request_id="echo", **params))[-1]
            assert last.request_id == "echo" and last.usage.completion_tokens == len(direct)


def test_complete_and_models(server):
    with Client(server.address) as client:
        c = client.complete("python", PROMPTS["python"], max_tokens=10, temperature=0.0)
        assert c.completion_tokens == 10 and c.finish_reason == "length" and c.text
        models = {m.name: m for m in client.list_models()}
        assert set(models) == set(VARIANTS)
        assert all(m.architecture == "mixtral" and m.context_length > 0 for m in models.values())


def test_token_id_prompts_and_ignore_eos(server):
    """Models served without a tokenizer take token ids; benchmarks run every request to max_tokens."""
    with Client(server.address) as client:
        text = client.complete("kjv", PROMPTS["kjv"], max_tokens=12, temperature=0.0)
        ids = [b + 4 for b in PROMPTS["kjv"].encode()]  # the zoo tokenizer: one token per byte, offset 4
        by_ids = client.complete("kjv", ids, max_tokens=12, temperature=0.0)
        assert by_ids.token_ids == text.token_ids and by_ids.prompt_tokens == len(ids)
        long = client.complete("kjv", ids, max_tokens=200, temperature=1.0, seed=3, ignore_eos=True)
        assert long.completion_tokens == 200 and long.finish_reason == "length"
        for bad, message in (([10**6], "token ids outside"), ([], "prompt is empty")):
            with pytest.raises(grpc.RpcError) as err:
                client.complete("kjv", bad, max_tokens=4)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()


def test_synthetic_variants_serve_token_id_prompts():
    spec = "variants=2,own=1,layers=1,hidden=64,intermediate=128,experts=4,heads=4,kv_heads=2,vocab=300"
    s = Server("--synthetic", spec)
    try:
        with Client(s.address) as client:
            assert {m.name for m in client.list_models()} == {"v0", "v1"}
            for v in ("v0", "v1"):
                c = client.complete(v, [5, 6, 7, 8], max_tokens=8, temperature=0.0, ignore_eos=True)
                assert c.completion_tokens == 8 and all(0 <= t < 300 for t in c.token_ids)
    finally:
        s.stop()


def test_32_concurrent_streams_finish_and_free_every_block(server):
    async def one(client: AsyncClient, i: int) -> int:
        v = VARIANTS[i % 4]
        n = 0
        async for r in client.generate(v, PROMPTS[v], max_tokens=16 + i % 5, temperature=0.8, seed=i):
            n += len(r.token_ids)
        return n

    async def run() -> list[int]:
        async with AsyncClient(server.address) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    counts = asyncio.run(run())
    assert counts == [16 + i % 5 for i in range(32)]
    with Client(server.address) as client:
        assert _wait_kv_free(client) == 0


def test_cancel_and_deadline_free_kv_and_server_stays_healthy(server):
    with Client(server.address) as client:
        call = client.generate_stream("kjv", PROMPTS["kjv"], max_tokens=500, temperature=0.0)
        for i, _ in enumerate(call):
            if i == 3:
                break
        call.cancel()
        assert _wait_kv_free(client) == 0
        with pytest.raises(grpc.RpcError) as err:
            for _ in client.generate_stream(
                "kjv", PROMPTS["kjv"], timeout=0.5, max_tokens=900, temperature=0.0
            ):
                pass
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert _wait_kv_free(client) == 0
        assert client.complete("kjv", PROMPTS["kjv"], max_tokens=4, temperature=0.0).completion_tokens == 4


@pytest.mark.parametrize(
    "model,prompt,params,code,message",
    [
        ("nope", "hi", {}, grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
        ("kjv", "hi", {"top_p": 1.5}, grpc.StatusCode.INVALID_ARGUMENT, "top_p must be in (0, 1]"),
        ("kjv", "hi", {"temperature": -1.0}, grpc.StatusCode.INVALID_ARGUMENT, "temperature must be >= 0"),
        ("kjv", "", {}, grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
        ("kjv", "x" * 5000, {}, grpc.StatusCode.RESOURCE_EXHAUSTED, "takes at most"),
    ],
)
def test_errors_have_their_status_and_leave_other_streams_alone(server, model, prompt, params, code, message):
    with Client(server.address) as client:
        other = client.generate_stream("python", PROMPTS["python"], max_tokens=20, temperature=0.0)
        first = next(iter(other))
        with pytest.raises(grpc.RpcError) as err:
            client.complete(model, prompt, **params)
        assert err.value.code() == code and message in err.value.details()
        rest = list(other)
        assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 20


def test_health_serving_and_reflection_lists_the_service(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in replies for s in r.list_services_response.service}
        assert "moeshare.v1.MoeShare" in names and "grpc.health.v1.Health" in names


def test_cli_generate_streams_text_only_to_stdout(server, store):
    cmd = [
        sys.executable,
        "-m",
        "moeshare.cli",
        "generate",
        "--model",
        "kjv",
        "--max-tokens",
        "16",
        "--temperature",
        "0",
        "--address",
        server.address,
        PROMPTS["kjv"],
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text, _ = Engine([store]).generate("kjv", PROMPTS["kjv"], SamplingParams(max_tokens=16, temperature=0))
    assert proc.stdout == text + "\n"
    assert "16 tokens" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "moeshare.cli", "models", "--address", server.address],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and all(v in proc.stdout for v in VARIANTS)
    proc = subprocess.run([*cmd[:5], "nope", *cmd[6:]], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("moeshare: error: NOT_FOUND: unknown model 'nope'")


def test_token_is_required_and_queue_limit_refuses_at_once(store, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    s = Server(
        store,
        "--auth-token-file",
        str(token),
        "--max-queue",
        "1",
        "--max-num-seqs",
        "1",
        "--metrics-port",
        "0",
    )
    try:
        with Client(s.address) as anonymous, Client(s.address, token="wrong") as wrong:
            for c in (anonymous, wrong):
                with pytest.raises(grpc.RpcError) as err:
                    c.list_models()
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Client(s.address, token="s3cret-token") as client:
            assert len(client.list_models()) == 4
            streams = [
                client.generate_stream("kjv", PROMPTS["kjv"], max_tokens=200, temperature=0.0)
                for _ in range(4)
            ]
            codes = []
            for st in streams:
                try:
                    next(iter(st))
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as e:
                    codes.append(e.code())
            assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes
            for st in streams:
                st.cancel()
            assert _wait_kv_free(client) == 0
        import urllib.request

        url = next(x.split()[-1] for x in s.errors if x.startswith("moeshare: metrics on "))
        assert url.startswith("http://127.0.0.1:")
        metrics = urllib.request.urlopen(url, timeout=10).read().decode()
        for name in (
            "moeshare_requests_total",
            "moeshare_ttft_seconds",
            "moeshare_kv_blocks_used",
            "moeshare_queue_depth",
            "moeshare_swap_ins",
        ):
            assert name in metrics, name
        assert 'code="RESOURCE_EXHAUSTED"' in metrics
    finally:
        s.stop()


def test_sigterm_during_streaming_exits_cleanly(store):
    s = Server(store, "--grace", "1")
    with Client(s.address) as client:
        stream = client.generate_stream(
            "kjv", PROMPTS["kjv"], max_tokens=1000, temperature=0.0, ignore_eos=True
        )
        next(iter(stream))
        t0 = time.monotonic()
        os.kill(s.proc.pid, signal.SIGTERM)
        # a stream the grace period cannot finish is cancelled before it ends: its last message says so
        last = list(stream)[-1]
        assert last.finish_reason == pb.FINISH_REASON_CANCELLED and last.usage.completion_tokens > 0
        assert s.proc.wait(timeout=30) == 0
        assert time.monotonic() - t0 < 1 + 10
        with pytest.raises(grpc.RpcError):
            client.list_models()


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "nothing to serve"),
        (["/no/such/store"], "no store or checkpoint at /no/such/store"),
        (["--synthetic", "layers=two"], "--synthetic layers=two: write KEY=N pairs"),
        (["--synthetic", "variants=0"], "need variants >= 1"),
        (["--synthetic", "variants=2,only=2"], "only=2 names no variant; variants are 0..1"),
        (["--synthetic", "variants=2", "--memory-limit", "0"], "--memory-limit must be > 0 GiB"),
        (["--synthetic", "a:variants=2"], "a NAME is for a spec of one model"),
        (["--synthetic", ":kind=llama"], "write NAME:SPEC with a non-empty NAME"),
    ],
)
def test_serve_bad_arguments_are_one_line_before_anything_starts(args, message):
    cmd = [sys.executable, "-m", "moeshare.cli", "serve", *args, "--port", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
