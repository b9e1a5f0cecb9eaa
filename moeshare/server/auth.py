"""Optional bearer token: every MoeShare call needs it; health checks and reflection stay open."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from moeshare.errors import MoeshareError

PROTECTED = "/moeshare.v1.MoeShare/"
DENIED = "missing or wrong bearer token (metadata authorization: Bearer ...)"


def read_token(path: str | Path) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise MoeshareError(f"cannot read --auth-token-file {path}: {e.strerror or e}") from None
    if not token:
        raise MoeshareError(f"--auth-token-file {path} is empty; put the token in it")
    return token


async def _deny_unary(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)


async def _deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)
    yield  # an async generator, as a server-streaming handler is


class BearerAuth(grpc.aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(PROTECTED):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        given = given.encode() if isinstance(given, str) else given
        if hmac.compare_digest(given, self._expected):
            return handler
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                _deny_stream, request_deserializer=handler.request_deserializer
            )
        return grpc.unary_unary_rpc_method_handler(
            _deny_unary, request_deserializer=handler.request_deserializer
        )
