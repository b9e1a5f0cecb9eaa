"""The server under bad input and internal failure (issue 12): one request never kills the engine, a failing
step fails only its own requests, a dead engine takes the server down loudly, and every bad flag or field is
one line or one status."""

import asyncio
import dataclasses
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_server import PROMPTS, Server

from moeshare.client import AsyncClient, Client
from moeshare.engine.engine import Engine, EngineConfig
from moeshare.errors import MoeshareError
from moeshare.server.app import check_args, run_server
from moeshare.server.command import build_parser
from moeshare.v1 import moeshare_pb2 as pb

SERVICE = "moeshare.v1.MoeShare"


@pytest.fixture(scope="module")
def ckpts(tiny_zoo):
    """Two checkpoints served as they are: two stores, so two batches per engine step."""
    return [tiny_zoo / "mixtral" / "kjv", tiny_zoo / "mixtral" / "python"]


@pytest.fixture(scope="module")
def server(ckpts):
    s = Server(*ckpts, "--metrics-port", "0")
    yield s
    s.stop()


def _refused(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moeshare.cli", *args], capture_output=True, text=True, timeout=timeout
    )


# ---- one request must not kill the engine -------------------------------------------------------------------


def test_seed_beyond_int64_is_refused_and_the_engine_serves_on(server):
    with Client(server.address) as client:
        for seed in (2**63, 2**64 - 1):
            code, message = _refused(lambda s=seed: client.complete("kjv", "hi", seed=s, timeout=30))
            assert (
                code == grpc.StatusCode.INVALID_ARGUMENT and "seed must be between 0 and 2**63 - 1" in message
            )
        done = client.complete("kjv", PROMPTS["kjv"], max_tokens=4, seed=2**63 - 1, timeout=30)
        assert done.completion_tokens == 4


def _args(*paths, grace: float = 2.0):
    return build_parser().parse_args([*map(str, paths), "--port", "0", "--grace", str(grace)])


async def _started(capsys, task: asyncio.Task) -> str:
    """The address of an in-process server once it serves."""
    out = ""
    while "moeshare: serving" not in out:
        assert not task.done(), task.result()
        await asyncio.sleep(0.05)
        out += capsys.readouterr().out
    return next(line.split()[-1] for line in out.splitlines() if line.startswith("moeshare: listening on"))


async def _health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE)
        )
        return reply.status


async def _running(engine: Engine, model: str, request_id: str):
    """The instance's sequence of a request (the test reaches under the engine's API to break it)."""
    seqs = engine.instance(model).seqs
    while not (found := [s for s in list(seqs.values()) if s.request_id == request_id]):
        await asyncio.sleep(0.01)
    return found[0]


def test_a_failing_step_fails_only_its_requests_with_internal(ckpts, capsys):
    """A sequence given a seed the API refuses (set under it, in-process) makes its store's batch raise for
    real: that request ends INTERNAL with the reason, the other store's stream and later requests go on."""
    engine = Engine([])

    async def scenario() -> None:
        task = asyncio.ensure_future(run_server(_args(*ckpts), engine))
        address = await _started(capsys, task)
        async with AsyncClient(address) as client:
            params = {"max_tokens": 300, "temperature": 0.8, "seed": 1, "ignore_eos": True}
            bad = client.generate("kjv", PROMPTS["kjv"], request_id="bad", **params)
            good = client.generate("python", PROMPTS["python"], request_id="good", **params)
            first = await anext(bad)
            good_tokens = len((await anext(good)).token_ids)
            seq = await _running(engine, "kjv", "bad")
            seq.params = dataclasses.replace(seq.params, seed=2**63)
            with pytest.raises(grpc.RpcError) as err:
                async for _ in bad:
                    pass
            assert err.value.code() == grpc.StatusCode.INTERNAL
            assert "engine step running this request failed" in err.value.details()
            assert "Overflow" in err.value.details() and first.request_id == "bad"
            async for r in good:
                good_tokens += len(r.token_ids)
                last = r
            assert good_tokens == 300 and last.finish_reason == pb.FINISH_REASON_LENGTH
            again = await client.complete("kjv", PROMPTS["kjv"], max_tokens=5, timeout=30)
            assert again.completion_tokens == 5
            assert await _health(address) == health_pb2.HealthCheckResponse.SERVING
            assert (await client.stats()).kv_blocks_used == 0
        assert not task.done()
        os.kill(os.getpid(), signal.SIGTERM)  # caught by the server's own handler: a clean stop
        assert await asyncio.wait_for(task, 30) == 0

    asyncio.run(scenario())


def test_a_dead_engine_thread_takes_the_server_down_loudly(ckpts, capsys):
    """State broken under the scheduler makes the engine thread itself raise: the stream in flight ends
    INTERNAL, health turns NOT_SERVING, and the server returns 1 (the CLI's exit code), not a silent wedge."""
    engine = Engine([])

    async def scenario() -> None:
        task = asyncio.ensure_future(run_server(_args(*ckpts, grace=0.5), engine))
        address = await _started(capsys, task)
        async with grpc.aio.insecure_channel(address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE))
            assert (await anext(aiter(watch))).status == health_pb2.HealthCheckResponse.SERVING
            async with AsyncClient(address) as client:
                stream = client.generate(
                    "kjv", PROMPTS["kjv"], request_id="doomed", max_tokens=500, ignore_eos=True
                )
                await anext(stream)
                await _running(engine, "kjv", "doomed")
                engine.instance(
                    "kjv"
                ).residency.row_of.clear()  # the scheduler can no longer place its sequences
                with pytest.raises(grpc.RpcError) as err:
                    async for _ in stream:
                        pass
                assert err.value.code() == grpc.StatusCode.INTERNAL
                assert "the engine stopped after an internal error (KeyError" in err.value.details()
            assert (await anext(aiter(watch))).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
        assert await asyncio.wait_for(task, 30) == 1
        assert "moeshare: error: the engine stopped" in capsys.readouterr().err

    asyncio.run(scenario())


# ---- flags refused before anything starts -------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--port", "-1"], "--port must be between 0 and 65535"),
        (["--port", "70000"], "--port must be between 0 and 65535"),
        (["--metrics-port", "70000"], "--metrics-port must be between 0 and 65535"),
        (["--max-num-seqs", "0"], "--max-num-seqs must be at least 1"),
        (["--max-batched-tokens", "0"], "--max-batched-tokens must be at least 1"),
        (["--policy", "fifo"], "--policy must be least-slack or load-order, got 'fifo'"),
        (
            ["--slo", "kjv=fast"],
            "--slo 'kjv=fast': give MODEL=TTFT,TPOT in seconds > 0, either may be left",
        ),
        (["--slo", "kjv=,"], "--slo 'kjv=,': give MODEL=TTFT,TPOT in seconds > 0"),
        (["--slo", "kjv=0,1"], "--slo 'kjv=0,1': give MODEL=TTFT,TPOT in seconds > 0"),
        (["--max-resident-variants", "0"], "--max-resident-variants must be at least 1"),
        (["--max-resident-variants", "-1"], "--max-resident-variants must be at least 1"),
        (["--kv-blocks", "0"], "--kv-blocks must be at least 1"),
        (["--kv-blocks", "-1"], "--kv-blocks must be at least 1"),
        (["--max-queue", "0"], "--max-queue must be at least 1"),
        (["--grace", "nan"], "--grace must be a number of seconds >= 0"),
        (["--grace", "-1"], "--grace must be a number of seconds >= 0"),
        (["--memory-limit", "inf"], "--memory-limit must be > 0 GiB"),
        (["--gpus", "0"], "--gpus must be at least 1, got 0"),
        (["--replan-every", "5"], "--replan-every needs --gpus and a number > 0, got 5.0"),
        (["--gpus", "2", "--gpu-capacity", "-1"], "--gpu-capacity needs --gpus and a number > 0, got -1.0"),
    ],
)
def test_serve_refuses_settings_that_could_never_serve(ckpts, flags, message):
    with pytest.raises(MoeshareError, match=message.replace("*", r"\*")):
        check_args(build_parser().parse_args([str(ckpts[0]), *flags]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_serve_on_cuda_without_cuda_is_one_line(ckpts):
    with pytest.raises(MoeshareError, match="--device cuda: no CUDA device is available here"):
        check_args(build_parser().parse_args([str(ckpts[0]), "--device", "cuda"]))
    with pytest.raises(MoeshareError, match="no CUDA device"):
        Engine([], EngineConfig(device="cuda"))


def test_engine_refuses_configs_that_would_spin(ckpts):
    for field in ("max_num_seqs", "max_resident_variants", "kv_blocks"):
        with pytest.raises(MoeshareError, match=f"{field} must be at least 1"):
            Engine([ckpts[0]], EngineConfig(**{field: 0}))


def test_tls_files_that_are_not_pem_are_named(ckpts, tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(MoeshareError, match=f"--tls-cert {junk} is not a PEM certificate"):
        check_args(
            build_parser().parse_args([str(ckpts[0]), "--tls-cert", str(junk), "--tls-key", str(junk)])
        )
    cert = tmp_path / "cert.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    with pytest.raises(MoeshareError, match=f"--tls-key {junk} is not a PEM private key"):
        check_args(
            build_parser().parse_args([str(ckpts[0]), "--tls-cert", str(cert), "--tls-key", str(junk)])
        )


def test_a_port_in_use_is_refused_not_shared(server, ckpts):
    """gRPC's SO_REUSEPORT would let a second server bind and take half of the connections."""
    port = server.address.rsplit(":", 1)[1]
    done = _cli("serve", str(ckpts[0]), "--port", port)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == (
        f"moeshare: error: --port {port} on 127.0.0.1 is already in use (another server?): stop it or pick "
        "another --port (0 picks a free one)"
    )
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        with pytest.raises(MoeshareError, match=f"--metrics-port {taken} on 127.0.0.1 is already in use"):
            check_args(build_parser().parse_args([str(ckpts[0]), "--metrics-port", str(taken)]))


# ---- cheap denial of service --------------------------------------------------------------------------------


def test_huge_fields_are_refused_before_any_work(server):
    with Client(server.address) as client:
        t0 = time.monotonic()
        code, message = _refused(lambda: client.complete("kjv", "x" * 3_000_000, timeout=30))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "prompt is 3000000 characters; kjv takes at most 1023 tokens" in message
        assert time.monotonic() - t0 < 5  # not tokenized
        code, message = _refused(lambda: client.complete("kjv", "hi", request_id="r" * 3_000_000, timeout=30))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert message == "request_id is 3000000 characters; at most 256 are allowed"
        code, message = _refused(lambda: client.complete("kjv", [5] * 1_000_000, timeout=30))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "takes at most 1023" in message
        code, message = _refused(lambda: client.complete("n" * 20_000, "hi", timeout=30))
        assert (
            code == grpc.StatusCode.NOT_FOUND and "(20000 characters); served models: kjv, python" in message
        )
        assert len(message) < 300
        assert (
            client.complete("kjv", "hi", request_id="r" * 256, max_tokens=2, timeout=30).completion_tokens
            == 2
        )


@pytest.mark.parametrize(
    "stop,message",
    [
        ([""], "a stop string must have 1 to 256 characters, got ''"),
        (["s" * 257], "a stop string must have 1 to 256 characters, got 'sssss"),
        (["a"] * 17, "at most 16 stop strings, got 17"),
    ],
)
def test_stop_strings_are_checked(server, stop, message):
    with Client(server.address) as client:
        code, details = _refused(lambda: client.complete("kjv", PROMPTS["kjv"], stop=stop, timeout=30))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(message)


def test_unknown_model_names_do_not_grow_the_metrics(server):
    url = next(x.split()[-1] for x in server.errors if x.startswith("moeshare: metrics on "))
    with Client(server.address) as client:
        for i in range(20):
            _refused(lambda i=i: client.complete(f"made-up-{i}-" + "m" * 500, "hi", timeout=30))
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    unknown = re.search(r'moeshare_requests_total\{code="NOT_FOUND",model="unknown"\} (\d+)', text)
    assert unknown and int(unknown.group(1)) >= 20 and "made-up" not in text


# ---- clients that never hang ---------------------------------------------------------------------------------


def test_models_and_generate_give_up_on_a_wedged_server():
    """A socket that listens but never speaks: both commands end with one DEADLINE_EXCEEDED line."""
    with socket.socket() as wedged:
        wedged.bind(("127.0.0.1", 0))
        wedged.listen()
        address = f"127.0.0.1:{wedged.getsockname()[1]}"
        for args in (["models"], ["generate", "hi", "--model", "kjv"]):
            t0 = time.monotonic()
            done = _cli(*args, "--address", address, "--timeout", "1")
            assert done.returncode == 2 and time.monotonic() - t0 < 30
            assert done.stderr.strip() == (
                f"moeshare: error: DEADLINE_EXCEEDED: no answer from {address} within --timeout 1 s"
            )
    from moeshare.cli import build_parser as cli_parser

    for argv in (["models"], ["generate", "hi", "--model", "kjv"]):
        assert math.isfinite(cli_parser().parse_args(argv).timeout)
