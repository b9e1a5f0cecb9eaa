"""Who may call what: an optional bearer token for every MoeShare call, an admin token for the admin calls,
and the directories `LoadStore` may read from. Health checks and reflection stay open."""

from __future__ import annotations

import hmac
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from moeshare.engine.request import clip
from moeshare.errors import MoeshareError

PROTECTED = "/moeshare.v1.MoeShare/"
ADMIN_CALLS = frozenset({PROTECTED + "LoadStore", PROTECTED + "UnloadModel", PROTECTED + "SetKvLimits"})
DENIED = "missing or wrong bearer token (metadata authorization: Bearer ...)"
ADMIN_DENIED = (
    "admin call: missing or wrong admin token (metadata authorization: Bearer <the --admin-token-file token>)"
)
ADMIN_OFF = (
    "admin calls are off on this server: start it with --admin-token-file FILE "
    "(or --allow-admin-without-token on a loopback --host)"
)
LOAD_OFF = "LoadStore is off on this server: start it with --allow-load-dir DIR (repeatable)"
PATH_CHARS = 256  # of a client's path quoted in an error


def read_token(path: str | Path, flag: str = "--auth-token-file") -> str:
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise MoeshareError(f"cannot read {flag} {path}: {getattr(e, 'strerror', None) or e}") from None
    if not token:
        raise MoeshareError(f"{flag} {path} is empty; put the token in it")
    return token


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback one (127.0.0.0/8, ::1); a name that does not
    resolve is not."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def load_dirs(dirs: Sequence[str]) -> tuple[Path, ...]:
    """The --allow-load-dir directories, resolved; each must be an existing directory."""
    out = []
    for d in dirs:
        path = Path(d).expanduser().resolve()
        if not path.is_dir():
            raise MoeshareError(f"--allow-load-dir {d}: not a directory on this machine")
        out.append(path)
    return tuple(out)


def confine(path: str, dirs: Sequence[Path]) -> Path | None:
    """`path` with symlinks and `..` resolved if it lies in one of `dirs`, else None (also for a path
    that cannot be resolved), so a refusal never says whether a path outside exists."""
    try:
        resolved = Path(path).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    return resolved if any(resolved.is_relative_to(d) for d in dirs) else None


def outside(path: str, dirs: Sequence[Path]) -> str:
    allowed = ", ".join(map(str, dirs))
    return f"{clip(path, PATH_CHARS)} is not under a directory this server loads from (--allow-load-dir: {allowed})"


def _same(given: bytes, token: str | None) -> bool:
    return token is not None and hmac.compare_digest(given, f"Bearer {token}".encode())


@dataclass(frozen=True)
class Access:
    """token: every MoeShare call needs it. admin_token: the admin calls need it, and it is good wherever
    `token` is. admin_without_token: admin calls need no admin token (accepted on a loopback address only)."""

    token: str | None = None
    admin_token: str | None = None
    admin_without_token: bool = False

    def refusal(self, method: str, given: bytes) -> tuple[grpc.StatusCode, str] | None:
        """Why a call with this `authorization` metadata is refused, or None if it may go on."""
        if not method.startswith(PROTECTED):
            return None
        admin = _same(given, self.admin_token)
        user = self.token is None or admin or _same(given, self.token)
        if method not in ADMIN_CALLS:
            return None if user else (grpc.StatusCode.UNAUTHENTICATED, DENIED)
        if self.admin_token is not None:
            return None if admin else (grpc.StatusCode.UNAUTHENTICATED, ADMIN_DENIED)
        if not self.admin_without_token:
            return grpc.StatusCode.PERMISSION_DENIED, ADMIN_OFF
        return None if user else (grpc.StatusCode.UNAUTHENTICATED, DENIED)


def _refuse(code: grpc.StatusCode, message: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)
        yield  # an async generator, as a server-streaming handler is

    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream, request_deserializer=handler.request_deserializer)
    return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=handler.request_deserializer)


class BearerAuth(grpc.aio.ServerInterceptor):
    def __init__(self, access: Access) -> None:
        self.access = access

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        given = given.encode() if isinstance(given, str) else given
        refusal = self.access.refusal(handler_call_details.method, given)
        return handler if refusal is None else _refuse(*refusal, handler)
