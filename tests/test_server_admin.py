"""The admin calls (LoadStore, UnloadModel) of a real server on 127.0.0.1: off unless the operator turns them
on, behind their own token, and LoadStore confined to the directories the operator allows."""

import shutil

import grpc
import pytest
from test_server import Server

from moeshare.client import Client
from moeshare.server.app import serve

SPEC = "variants=2,own=1,layers=1,hidden=64,intermediate=128,experts=4,heads=4,kv_heads=2,vocab=300"
USER, ADMIN = "user-token", "admin-token"


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


@pytest.fixture(scope="module")
def dirs(tiny_zoo, tmp_path_factory):
    """allowed/: a checkpoint, an empty directory, and symlinks that lead out of it; outside/: a checkpoint."""
    root = tmp_path_factory.mktemp("admin")
    allowed, outside = root / "allowed", root / "outside"
    for d in (allowed, outside):
        shutil.copytree(tiny_zoo / "mixtral" / "python", d / "python")
    (allowed / "empty").mkdir()
    (allowed / "escape").symlink_to(outside / "python")
    (allowed / "dangling").symlink_to(root / "nothing")
    (root / "user").write_text(USER + "\n")
    (root / "admin").write_text(ADMIN + "\n")
    return root


@pytest.fixture(scope="module")
def admin_server(tiny_zoo, dirs):
    s = Server(
        tiny_zoo / "mixtral" / "kjv",
        "--auth-token-file",
        dirs / "user",
        "--admin-token-file",
        dirs / "admin",
        "--allow-load-dir",
        dirs / "allowed",
    )
    yield s
    s.stop()


def test_admin_calls_are_off_by_default(tiny_zoo):
    s = Server("--synthetic", SPEC)
    try:
        with Client(s.address) as client:
            for call in (
                lambda: client.load_store(str(tiny_zoo / "mixtral" / "python")),
                lambda: client.unload_model("v0"),
            ):
                code, message = _code(call)
                assert code == grpc.StatusCode.PERMISSION_DENIED
                assert "start it with --admin-token-file FILE" in message
            assert {m.name for m in client.list_models()} == {"v0", "v1"}
    finally:
        s.stop()


def test_admin_calls_need_the_admin_token_which_is_good_for_every_call(admin_server, dirs):
    with Client(admin_server.address) as anonymous, Client(admin_server.address, token=USER) as user:
        for c in (anonymous, user):
            for call in (
                lambda c=c: c.unload_model("kjv"),
                lambda c=c: c.load_store(str(dirs / "allowed" / "python")),
            ):
                code, message = _code(call)
                assert code == grpc.StatusCode.UNAUTHENTICATED and "admin token" in message
        assert [m.name for m in user.list_models()] == ["kjv"]
    with Client(admin_server.address, token=ADMIN) as admin:
        assert [m.name for m in admin.list_models()] == ["kjv"]
        assert admin.load_store(str(dirs / "allowed" / "python")) == ["python"]
        assert admin.complete("python", "def f(", max_tokens=4, temperature=0.0).completion_tokens == 4
        assert admin.unload_model("python") == ["python"]
        assert [m.name for m in admin.list_models()] == ["kjv"]


def test_load_outside_the_allowed_dirs_is_refused_alike_whether_or_not_the_path_exists(admin_server, dirs):
    refused = {
        str(dirs / "outside" / "python"): True,  # exists
        str(dirs / "outside" / "nope"): False,
        str(dirs / "allowed" / ".." / "outside" / "python"): True,
        str(dirs / "allowed" / ".." / "outside" / "nope"): False,
        str(dirs / "allowed" / "escape"): True,  # a symlink out of allowed/
        str(dirs / "allowed" / "dangling"): False,
        "/etc/passwd": True,
        "/etc/no-such-file": False,
        "python": False,  # relative to the server's working directory, not to allowed/
    }
    with Client(admin_server.address, token=ADMIN) as admin:
        messages = set()
        for path in refused:
            code, message = _code(lambda path=path: admin.load_store(path))
            assert code == grpc.StatusCode.PERMISSION_DENIED, (path, message)
            messages.add(message.replace(repr(path), "PATH"))
        assert messages == {
            f"PATH is not under a directory this server loads from (--allow-load-dir: {dirs / 'allowed'})"
        }
        assert (
            _code(lambda: admin.load_store(str(dirs / "allowed" / "nope")))[0]
            == grpc.StatusCode.INVALID_ARGUMENT
        )
        code, message = _code(lambda: admin.load_store(""))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "path is empty" in message
        code, message = _code(lambda: admin.load_store(str(dirs / "allowed" / "empty")))
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
        assert len(message.splitlines()) == 1 and "Traceback" not in message
        assert [m.name for m in admin.list_models()] == ["kjv"]


def test_load_is_off_without_allowed_dirs_and_loopback_may_skip_the_admin_token(tiny_zoo):
    s = Server("--synthetic", SPEC, "--allow-admin-without-token")
    try:
        with Client(s.address) as client:
            code, message = _code(lambda: client.load_store(str(tiny_zoo / "mixtral" / "python")))
            assert code == grpc.StatusCode.PERMISSION_DENIED and "--allow-load-dir DIR" in message
            assert client.unload_model("v0") == ["v0", "v1"]
            assert client.list_models() == []
    finally:
        s.stop()


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--allow-admin-without-token", "--host", "0.0.0.0"],
            "--allow-admin-without-token needs a loopback",
        ),
        (["--admin-token-file", "TOKEN", "--allow-admin-without-token"], "not both"),
        (["--admin-token-file", "EMPTY"], "--admin-token-file EMPTY is empty"),
        (
            ["--admin-token-file", "TOKEN", "--allow-load-dir", "MISSING"],
            "--allow-load-dir MISSING: not a dir",
        ),
        (["--allow-load-dir", "."], "--allow-load-dir is for LoadStore, an admin call"),
    ],
)
def test_bad_admin_arguments_are_one_line_before_anything_starts(args, message, tmp_path, capsys):
    paths = {"TOKEN": tmp_path / "token", "EMPTY": tmp_path / "empty", "MISSING": tmp_path / "missing"}
    paths["TOKEN"].write_text("t\n")
    paths["EMPTY"].write_text("\n")
    message = message.replace("EMPTY", str(paths["EMPTY"])).replace("MISSING", str(paths["MISSING"]))
    argv = ["--synthetic", SPEC, "--port", "0", *(str(paths.get(a, a)) for a in args)]
    assert serve(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("moeshare: error: ") and message in err and len(err.strip().splitlines()) == 1


def test_who_may_call_what():
    from moeshare.server.auth import Access

    ok, unauth, off = None, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED
    load, models, health = (
        "/moeshare.v1.MoeShare/LoadStore",
        "/moeshare.v1.MoeShare/ListModels",
        "/grpc.health.v1.Health/Check",
    )
    cases = [  # access, bearer, (LoadStore, ListModels)
        (Access(), b"", (off, ok)),
        (Access(token=USER), b"Bearer " + USER.encode(), (off, ok)),
        (Access(token=USER, admin_without_token=True), b"", (unauth, unauth)),
        (Access(token=USER, admin_without_token=True), b"Bearer " + USER.encode(), (ok, ok)),
        (Access(token=USER, admin_token=ADMIN), b"Bearer " + USER.encode(), (unauth, ok)),
        (Access(token=USER, admin_token=ADMIN), b"Bearer " + ADMIN.encode(), (ok, ok)),
        (Access(admin_token=ADMIN), b"Bearer wrong", (unauth, ok)),
    ]
    for access, bearer, expected in cases:
        got = tuple(r and r[0] for r in (access.refusal(load, bearer), access.refusal(models, bearer)))
        assert got == expected, (access, bearer)
        assert access.refusal(health, b"") is None
