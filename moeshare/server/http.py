"""The OpenAI-compatible HTTP API beside gRPC (`moeshare serve --http-port N`): the same process, the same engine
worker, every served model behind one endpoint.

    GET  /v1/models              the served models
    POST /v1/completions         prompt -> text (stream: server-sent events)
    POST /v1/chat/completions    messages -> the model's reply, through its tokenizer's chat template
    GET  /health                 200 once the models given at start are loaded, else 503

Request bodies are pydantic models; a parameter this server does not implement (n > 1, tools, ...) or does not
know is a 400 naming it, never silently ignored. Errors come in OpenAI's JSON shape: 404 unknown model, 400 a
bad parameter or a prompt too large, 429 a full queue or a request refused as late, 401 a missing or wrong
bearer token (the same --auth-token-file as gRPC), 503 while loading. A client that goes away mid-stream frees
its KV at once. Latency targets and priority ride along as extension fields (ttft_target, tpot_target,
priority, refuse_if_late), as on gRPC. FastAPI and uvicorn are imported only when an HTTP port is asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from moeshare.engine.api import EngineUnavailable, TokenEvent
from moeshare.engine.request import (
    FinishReason,
    InvalidRequest,
    LateRequest,
    RequestTooLarge,
    SamplingParams,
    Targets,
    UnknownModel,
)
from moeshare.errors import MoeshareError
from moeshare.server.messages import ListModels
from moeshare.server.metrics import Metrics
from moeshare.server.servicer import DEFAULT_MAX_TOKENS, LOADING  # the gRPC API's, the same here
from moeshare.server.worker import EngineWorker, QueueFull, request_events

FINISH = {
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.CONTEXT: "length",
    FinishReason.CANCELLED: "stop",
}
# parameters of OpenAI's API this server does not implement: each is refused by name unless it has the value that
# asks for nothing (n=1, no tools, ...)
NEUTRAL: dict[str, Any] = {
    "n": 1,
    "best_of": 1,
    "echo": False,
    "suffix": None,
    "tools": None,
    "tool_choice": None,
    "functions": None,
    "function_call": None,
    "logit_bias": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "response_format": None,
    "parallel_tool_calls": None,
    "user": Ellipsis,  # accepted and ignored: it only labels the caller
    "store": None,
    "metadata": None,
    "service_tier": None,
    "modalities": None,
    "audio": None,
    "prediction": None,
    "reasoning_effort": None,
    "top_logprobs": None,
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def _api_error(e: Exception) -> ApiError:
    """The HTTP status and OpenAI error of an engine or worker exception."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, UnknownModel):
        return ApiError(404, str(e), param="model", code="model_not_found")
    if isinstance(e, (QueueFull, LateRequest)):
        return ApiError(429, str(e), kind="rate_limit_error")
    if isinstance(e, (InvalidRequest, RequestTooLarge)):
        return ApiError(400, str(e))
    if isinstance(e, EngineUnavailable):
        return ApiError(503, str(e), kind="server_error")
    if isinstance(e, MoeshareError):
        return ApiError(500, str(e), kind="server_error")
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error")


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    """What completions and chat completions share; unknown fields are kept to be refused by name."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # extensions: latency targets and priority, as GenerateRequest has them
    ttft_target: float | None = Field(default=None, gt=0)
    tpot_target: float | None = Field(default=None, gt=0)
    priority: int = 0
    refuse_if_late: bool = False

    def check_extra(self) -> None:
        for name, value in (self.model_extra or {}).items():
            if name not in NEUTRAL:
                raise ApiError(400, f"Unrecognized request argument supplied: {name}", param=name)
            neutral = NEUTRAL[name]
            if neutral is not Ellipsis and value != neutral and not (neutral is None and value in ([], {})):
                raise ApiError(400, f"{name}={value!r} is not supported by this server", param=name)

    def sampling(self, max_tokens: int | None, logprobs: bool) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=stop,
            logprobs=logprobs,
        )

    def targets(self, defaults: Targets) -> Targets:
        return Targets(
            self.ttft_target if self.ttft_target is not None else defaults.ttft,
            self.tpot_target if self.tpot_target is not None else defaults.tpot,
            self.priority,
            self.refuse_if_late,
        )


class CompletionRequest(_Common):
    prompt: str | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=1)  # the sampled token's logprob only


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer"]
    content: str
    name: str | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False


def _usage(ev: TokenEvent) -> dict[str, int]:
    u = ev.usage
    prompt, completion = (u.prompt_tokens, u.completion_tokens) if u is not None else (0, 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _logprobs(events: list[TokenEvent], chat: bool) -> dict:
    """The sampled tokens' logprobs in OpenAI's shapes (the text each token added; no alternatives)."""
    if chat:
        return {
            "content": [
                {"token": ev.text, "logprob": ev.logprob, "bytes": list(ev.text.encode()), "top_logprobs": []}
                for ev in events
            ]
        }
    return {"tokens": [ev.text for ev in events], "token_logprobs": [ev.logprob for ev in events]}


def _sse(body: dict | str) -> bytes:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n".encode()


class HttpApi:
    """The FastAPI app over an EngineWorker; `ready` as the gRPC servicer's (set once the models are loaded)."""

    def __init__(
        self,
        worker: EngineWorker,
        token: str | None = None,
        slo: dict[str, Targets] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.worker, self.token, self.slo, self.metrics = worker, token, slo or {}, metrics
        self.ready = False
        app = FastAPI(title="moeshare", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_exception_handler(ApiError, lambda _r, e: e.response())  # type: ignore[arg-type]
        app.add_exception_handler(RequestValidationError, self._invalid)  # type: ignore[arg-type]
        app.middleware("http")(self._auth)
        app.get("/health")(self.health)
        app.get("/v1/models")(self.models)
        app.post("/v1/completions")(self._counted(self.completions))
        app.post("/v1/chat/completions")(self._counted(self.chat))
        self.app = app

    # ---- plumbing ------------------------------------------------------------------------------------------

    def _count(self, model: str, status: int) -> None:
        if self.metrics is not None:  # a client's made-up names must not grow the metrics forever
            self.metrics.count_http(model if self.worker.serves(model) else "unknown", status)

    def _counted(self, endpoint):
        """The endpoint, its answers counted by model and status (a stream as 200 once it started)."""

        @functools.wraps(endpoint)
        async def counted(body, request: Request):
            try:
                reply = await endpoint(body, request)
            except ApiError as e:
                self._count(body.model, e.status)
                raise
            self._count(body.model, getattr(reply, "status_code", 200))
            return reply

        return counted

    async def _auth(self, request: Request, call_next):
        if self.token is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, f"Bearer {self.token}".encode()):
                return ApiError(401, "missing or wrong bearer token", code="invalid_api_key").response()
        return await call_next(request)

    @staticmethod
    async def _invalid(_request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(where) or None
        message = (
            f"{param}: {first.get('msg', 'invalid')}" if param else str(first.get("msg", "invalid body"))
        )
        return ApiError(400, message, param=param).response()

    def _check_ready(self) -> None:
        if not self.ready:
            raise ApiError(503, LOADING, kind="server_error")

    async def _events(
        self, body: _Common, prompt: str | list[int], params: SamplingParams
    ) -> AsyncIterator[TokenEvent]:
        """Submit and yield the request's token events, errors as ApiError; cancels the request if the caller
        goes away (worker.request_events)."""

        def targets() -> Targets:
            t = body.targets(self.slo.get(body.model, Targets()))
            t.validate()
            return t

        events = request_events(self.worker, body.model, prompt, params, "", targets)
        try:
            async with aclosing(events):
                async for ev in events:
                    yield ev
        except Exception as e:
            raise _api_error(e) from None

    async def _first(self, events: AsyncIterator[TokenEvent]) -> TokenEvent:
        """The first event, so that a refusal is an HTTP error before any byte of a stream is sent."""
        try:
            return await anext(events)
        except StopAsyncIteration:
            raise ApiError(500, "the request ended without an event", kind="server_error") from None

    # ---- endpoints -----------------------------------------------------------------------------------------

    async def health(self) -> JSONResponse:
        if not self.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def models(self) -> JSONResponse:
        self._check_ready()
        infos = await asyncio.wrap_future(self.worker.ask(ListModels()))
        data = [{"id": m.name, "object": "model", "created": 0, "owned_by": "moeshare"} for m in infos]
        return JSONResponse({"object": "list", "data": data})

    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        self._check_ready()
        body.check_extra()
        params = body.sampling(body.max_tokens, bool(body.logprobs))
        return await self._respond(body, body.prompt, params, False, request)

    async def chat(self, body: ChatRequest, request: Request) -> Any:
        self._check_ready()
        body.check_extra()
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        try:
            prompt = await asyncio.to_thread(self.worker.chat_prompt, body.model, messages)
        except Exception as e:
            raise _api_error(e) from None
        params = body.sampling(body.max_completion_tokens or body.max_tokens, body.logprobs)
        return await self._respond(body, prompt, params, True, request)

    async def _respond(
        self, body: _Common, prompt: str | list[int], params: SamplingParams, chat: bool, request: Request
    ) -> Any:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        events = self._events(body, prompt, params)
        first = await self._first(events)
        if not body.stream:
            pieces, scored = [], []

            async def collect() -> TokenEvent:
                last = first
                async for ev in _chain(first, events):
                    pieces.append(ev.text)
                    if ev.token_id >= 0:
                        scored.append(ev)
                    last = ev
                return last

            # a client that goes away before the whole reply is ready frees its KV too (the stream's
            # generator cancels the request when the collecting task is cancelled)
            done = asyncio.ensure_future(collect())
            gone = asyncio.ensure_future(_disconnected(request))
            await asyncio.wait([done, gone], return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            if not done.done():
                done.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await done
                await events.aclose()
                return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
            last = done.result()
            text = "".join(pieces)
            choice: dict[str, Any] = {"index": 0, "finish_reason": FINISH.get(last.finish_reason, "stop")}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
                choice["logprobs"] = _logprobs(scored, chat) if params.logprobs else None
            else:
                choice["text"] = text
                choice["logprobs"] = _logprobs(scored, chat) if params.logprobs else None
            reply = {"id": rid, "object": kind, "created": created, "model": body.model, "choices": [choice]}
            return JSONResponse(reply | {"usage": _usage(last)})
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def stream() -> AsyncIterator[bytes]:
            head = {
                "id": rid,
                "object": f"{kind}.chunk" if chat else kind,
                "created": created,
                "model": body.model,
            }
            if chat:
                yield _sse(
                    head | {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
                )
            last = first
            async for ev in _chain(first, events):
                last = ev
                finish = FINISH.get(ev.finish_reason, "stop") if ev.finished else None
                if chat:
                    choice = {
                        "index": 0,
                        "delta": {"content": ev.text} if ev.text else {},
                        "finish_reason": finish,
                    }
                else:
                    choice = {"index": 0, "text": ev.text, "finish_reason": finish}
                if params.logprobs and ev.token_id >= 0:
                    choice["logprobs"] = _logprobs([ev], chat)
                if ev.text or ev.finished:
                    yield _sse(head | {"choices": [choice]} | ({"usage": None} if include_usage else {}))
            if include_usage:
                yield _sse(head | {"choices": [], "usage": _usage(last)})
            yield _sse("[DONE]")

        return StreamingResponse(stream(), media_type="text/event-stream")


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (its request body was read already, so only a disconnect comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _chain(first: TokenEvent, rest: AsyncIterator[TokenEvent]) -> AsyncIterator[TokenEvent]:
    yield first
    async for ev in rest:
        yield ev


class HttpServer:
    """uvicorn serving an HttpApi in the running event loop, beside the gRPC server (the caller handles signals;
    uvicorn's own handlers are never installed)."""

    def __init__(
        self, api: HttpApi, host: str, port: int, cert: str | None, key: str | None, grace: float
    ) -> None:
        import uvicorn

        config = uvicorn.Config(
            api.app,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ssl_certfile=cert,
            ssl_keyfile=key,
            timeout_graceful_shutdown=max(1, math.ceil(grace)),
        )
        self.api, self.server = api, uvicorn.Server(config)
        self._loop: asyncio.Task | None = None

    async def start(self) -> int:
        """Bind and accept; returns the port bound (one line if it cannot listen)."""
        config = self.server.config
        config.load()
        self.server.lifespan = config.lifespan_class(config)
        try:
            await self.server.startup()
        except SystemExit:  # uvicorn exits when it cannot bind
            raise MoeshareError(f"cannot serve HTTP on {config.host}:{config.port}") from None
        self._loop = asyncio.ensure_future(self.server.main_loop())
        return self.server.servers[0].sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop accepting; open streams get the shutdown grace period (the engine's CancelAll ends them)."""
        if self._loop is None:
            return
        self.server.should_exit = True
        await self._loop
        await self.server.shutdown()
