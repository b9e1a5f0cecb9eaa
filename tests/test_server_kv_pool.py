"""A real server on 127.0.0.1 with one elastic KV pool for two dense checkpoints: the serve flags, GetStats'
pages, the admin call that shares the pool out, and one-line refusals."""

import subprocess
import sys
import time

import grpc
import pytest
from test_server import Server

from moeshare.client import Client

MIB = 1 / 1024  # GiB


@pytest.fixture(scope="module")
def pool_server(tiny_zoo):
    s = Server(
        tiny_zoo / "llama" / "kjv",
        tiny_zoo / "qwen2" / "python",
        "--pool",
        str(14 * MIB),  # seven pages of 2 MiB: one for each model's weights, five for KV
        "--kv-min",
        f"kjv={4 * MIB}",
        "--kv-max",
        f"python={4 * MIB}",
        "--allow-admin-without-token",
    )
    yield s
    s.stop()


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def test_two_models_share_one_pool_and_get_stats_shows_its_pages(pool_server):
    with Client(pool_server.address) as client:
        for model, prompt in (("kjv", "And God said"), ("python", "def f(")):
            assert client.complete(model, prompt, max_tokens=8, temperature=0).token_ids
        pages = client.stats().kv_pages
    assert pages.total == 7 and pages.page_bytes == 2 << 20 and pages.maps >= 4
    # the weights' pages and the scratch blocks' pages; the rest given back
    assert dict(pages.in_use) == {"kjv": 1, "python": 1, "kjv weights": 1, "python weights": 1}
    assert pages.free + pages.idle == 3


def test_the_admin_call_shares_the_pool_out_and_refuses_what_cannot_be(pool_server):
    with Client(pool_server.address) as client:
        client.set_kv_limits("python", min_gib=2 * MIB, max_gib=2 * MIB)
        code, message = _code(lambda: client.set_kv_limits("python", min_gib=12 * MIB))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and message == (
            "python: 6 pages kept for it and 2 for the others exceed the pool's 7: lower the minimums or grow "
            "the pool"
        )
        code, message = _code(lambda: client.set_kv_limits("python", max_gib=MIB / 4))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "cannot hold one request" in message
        code, _ = _code(lambda: client.set_kv_limits("nope", min_gib=MIB))
        assert code == grpc.StatusCode.NOT_FOUND
        code, message = _code(lambda: client.set_kv_limits("kjv", min_gib=-1))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "min_gib must be a number of GiB >= 0" in message
        assert client.complete("python", "def f(", max_tokens=4, temperature=0).token_ids


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--kv-min", "kjv=0.1"],
            "--kv-min and --kv-max share out the elastic KV pool: give --pool GIB too",
        ),
        (
            ["--pool", "0.01", "--kv-max", "kjv=lots"],
            "--kv-max 'kjv=lots': give MODEL=GIB with a number of GiB >= 0",
        ),
        (["--pool", "-1"], "--pool must be > 0 GiB, got -1.0"),
        (
            ["--pool", "0.01", "--kv-min", "kjv=0.01"],
            "kjv: 6 pages kept for it and 0 for the others exceed the pool's 5",
        ),
        (["--evict-after", "5"], "--evict-after moves weights out of the page pool: give --pool GIB too"),
        (["--pool", "0.01", "--evict-to", "tape"], "--evict-to must be auto, host or disk, got 'tape'"),
        (["--pool", "0.01", "--evict-after", "-1"], "--evict-after must be >= 0 seconds, got -1.0"),
        (
            ["--pool", "0.001"],
            "and one KV page exceed the pool's 2.0 MiB, so it could never be on the device: raise --pool",
        ),
    ],
)
def test_bad_pool_flags_are_one_line(tiny_zoo, flags, message):
    cmd = [
        sys.executable,
        "-m",
        "moeshare.cli",
        "serve",
        str(tiny_zoo / "llama" / "kjv"),
        "--port",
        "0",
        *flags,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr


@pytest.fixture(scope="module")
def turns_server(tiny_zoo):
    """Two models whose weights do not fit the pool together (one page each of three), idle ones leaving after
    half a second."""
    s = Server(
        tiny_zoo / "llama" / "kjv",
        tiny_zoo / "qwen2" / "python",
        "--pool",
        str(6 * MIB),
        "--evict-after",
        "0.5",
    )
    yield s
    s.stop()


def test_models_take_turns_on_the_device_and_an_idle_one_leaves_on_its_own(turns_server):
    with Client(turns_server.address) as client:
        for _ in range(2):
            for model, prompt in (("kjv", "And God said"), ("python", "def f(")):
                alone = client.complete(model, prompt, max_tokens=8, temperature=0).token_ids
                assert alone and len(alone) == 8
        resident = {m.name: m.resident for m in client.list_models()}
        assert resident == {"kjv": False, "python": True}  # python came last and took kjv's pages
        deadline = time.monotonic() + 10
        while any(m.resident for m in client.list_models()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(m.resident for m in client.list_models())  # idle for 0.5 s: gone
        pages = client.stats().kv_pages
        assert pages.in_use["kjv weights"] == pages.in_use["python weights"] == 0
        assert client.complete("kjv", "And God said", max_tokens=8, temperature=0).token_ids
