"""The MoeShare gRPC service (grpc.aio): turns requests into engine submissions and token events into replies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any, NoReturn

import grpc

from moeshare.engine.engine import TokenEvent
from moeshare.engine.request import (
    FinishReason,
    InvalidRequest,
    RequestTooLarge,
    SamplingParams,
    Sequence,
    UnknownModel,
)
from moeshare.errors import MoeshareError
from moeshare.server.metrics import Metrics
from moeshare.server.worker import EngineWorker, QueueFull, Snapshot, Ticket
from moeshare.v1 import moeshare_pb2 as pb
from moeshare.v1 import moeshare_pb2_grpc

DEFAULT_MAX_TOKENS = 64
LOADING = "loading, retry shortly"

FINISH = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.CONTEXT: pb.FINISH_REASON_CONTEXT,
}
ERRORS: list[tuple[type[Exception], grpc.StatusCode]] = [
    (UnknownModel, grpc.StatusCode.NOT_FOUND),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (RequestTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (MoeshareError, grpc.StatusCode.FAILED_PRECONDITION),
]


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code, self.message = code, message


def _status(e: Exception) -> tuple[grpc.StatusCode, str]:
    for kind, code in ERRORS:
        if isinstance(e, kind):
            return code, str(e)
    raise e


def sampling_params(request: pb.GenerateRequest) -> SamplingParams:
    return SamplingParams(
        max_tokens=request.max_tokens or DEFAULT_MAX_TOKENS,
        temperature=request.temperature if request.HasField("temperature") else 1.0,
        top_p=request.top_p if request.HasField("top_p") else 1.0,
        top_k=request.top_k,
        seed=request.seed if request.HasField("seed") else None,
        stop=tuple(request.stop),
        logprobs=request.logprobs,
        ignore_eos=request.ignore_eos,
    )


def _prompt(request: pb.GenerateRequest) -> str | list[int]:
    """Token ids when given, else the text; the engine rejects an empty prompt either way."""
    if request.prompt_token_ids and request.prompt:
        raise InvalidRequest("give prompt or prompt_token_ids, not both")
    return list(request.prompt_token_ids) or request.prompt


def _usage(seq: Sequence) -> pb.Usage:
    first = seq.first_token_time or seq.finish_time or seq.arrival
    return pb.Usage(
        prompt_tokens=len(seq.prompt_ids),
        completion_tokens=len(seq.output_ids),
        ttft_seconds=first - seq.arrival,
        total_seconds=(seq.finish_time or first) - seq.arrival,
    )


def _add(
    reply: pb.GenerateResponse | pb.CompleteResponse, seq: Sequence, ev: TokenEvent, logprobs: bool
) -> None:
    """Append one token event to a reply; the last event also sets finish reason and usage."""
    if ev.token_id >= 0:  # -1: the sequence was cancelled under the request (unload, shutdown)
        reply.token_ids.append(ev.token_id)
        if logprobs:
            reply.logprobs.append(ev.logprob)
    if ev.finished and ev.finish_reason is not None:
        reply.finish_reason = FINISH[ev.finish_reason]
        reply.usage.CopyFrom(_usage(seq))


class MoeShareServicer(moeshare_pb2_grpc.MoeShareServicer):
    def __init__(self, worker: EngineWorker, metrics: Metrics | None = None) -> None:
        self.worker = worker
        self.metrics = metrics
        self.ready = False  # set once the stores given at start are loaded

    async def _engine(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.wrap_future(self.worker.call(fn))

    def _count(self, model: str, code: grpc.StatusCode) -> None:
        if self.metrics:
            self.metrics.count(model, code.name)

    async def _abort(self, context: grpc.aio.ServicerContext, model: str, e: Exception) -> NoReturn:
        code, message = (e.code, e.message) if isinstance(e, _Aborted) else _status(e)
        self._count(model, code)
        await context.abort(code, message)
        raise AssertionError("unreachable")  # context.abort raises

    def _check_ready(self) -> None:
        if not self.ready:
            raise _Aborted(grpc.StatusCode.UNAVAILABLE, LOADING)

    # ---- generation --------------------------------------------------------------------------------------

    async def _events(self, request: pb.GenerateRequest) -> AsyncIterator[tuple[Sequence, TokenEvent]]:
        """Submit and yield the request's token events; cancels the sequence if the caller goes away."""
        self._check_ready()
        ticket = Ticket(request.model, asyncio.get_running_loop(), asyncio.Queue())
        future = self.worker.submit(
            request.model, _prompt(request), sampling_params(request), request.request_id, ticket
        )
        done = False
        try:
            seq = await asyncio.wrap_future(future)
            while not done:
                ev = await ticket.events.get()
                done = ev.finished
                yield seq, ev
        finally:
            if not done:  # deadline passed, client went away, or server shutting down: free the KV now
                self.worker.cancel(ticket)

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            async with aclosing(self._events(request)) as events:
                async for seq, ev in events:
                    reply = pb.GenerateResponse(request_id=request.request_id, text=ev.text)
                    _add(reply, seq, ev, request.logprobs)
                    yield reply
        except (_Aborted, MoeshareError) as e:
            await self._abort(context, request.model, e)
        except asyncio.CancelledError:
            self._count(request.model, grpc.StatusCode.CANCELLED)
            raise
        self._count(request.model, grpc.StatusCode.OK)

    async def Complete(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.CompleteResponse:
        reply = pb.CompleteResponse(request_id=request.request_id)
        pieces: list[str] = []
        try:
            async with aclosing(self._events(request)) as events:
                async for seq, ev in events:
                    pieces.append(ev.text)
                    _add(reply, seq, ev, request.logprobs)
        except (_Aborted, MoeshareError) as e:
            await self._abort(context, request.model, e)
        except asyncio.CancelledError:
            self._count(request.model, grpc.StatusCode.CANCELLED)
            raise
        reply.text = "".join(pieces)
        self._count(request.model, grpc.StatusCode.OK)
        return reply

    # ---- models and stats --------------------------------------------------------------------------------

    def _models(self) -> list[pb.ModelInfo]:
        engine = self.worker.engine
        out = []
        for group in engine.groups:
            resident = set(group.residency.resident)
            for v in group.source.variants:
                out.append(
                    pb.ModelInfo(
                        name=v,
                        store=str(group.source.path),
                        architecture=group.source.architecture,
                        context_length=group.context,
                        resident=v in resident,
                    )
                )
        return out

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        try:
            self._check_ready()
        except _Aborted as e:
            await self._abort(context, "", e)
        return pb.ListModelsResponse(models=await self._engine(self._models))

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        try:
            self._check_ready()
            models = await self._engine(self._models)
            found = [m for m in models if m.name == request.name]
            if not found:
                served = ", ".join(m.name for m in models) or "none"
                raise UnknownModel(f"unknown model {request.name!r}; served models: {served}")
        except (_Aborted, MoeshareError) as e:
            await self._abort(context, request.name, e)
        return found[0]

    async def GetStats(
        self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatsResponse:
        try:
            self._check_ready()
        except _Aborted as e:
            await self._abort(context, "", e)
        snap: Snapshot = await self._engine(self.worker.snapshot)
        s = snap.engine
        return pb.StatsResponse(
            models=[
                pb.ModelStats(
                    name=m.name,
                    queue_depth=m.queue_depth,
                    running=m.running,
                    tokens_per_second=m.tokens_per_second,
                    ttft_p50_seconds=m.ttft_p50,
                    ttft_p99_seconds=m.ttft_p99,
                    tpot_p50_seconds=m.tpot_p50,
                    tpot_p99_seconds=m.tpot_p99,
                    requests_total=m.requests_total,
                    resident=m.resident,
                )
                for m in snap.models
            ],
            kv_blocks_used=s["kv_blocks_used"],
            kv_blocks_free=s["kv_blocks_free"],
            resident_variants=s["resident_variants"],
            swap_ins=s["swap_ins"],
            swap_seconds=s["swap_seconds"],
            preemptions=s["preemptions"],
        )

    # ---- admin -------------------------------------------------------------------------------------------

    async def LoadStore(
        self, request: pb.LoadStoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadStoreResponse:
        try:
            self._check_ready()
            if not Path(request.path).exists():
                raise InvalidRequest(f"no store or checkpoint at {request.path!r} (a path on the server)")
            models = await self._engine(lambda: self.worker.engine.load(request.path))
        except (_Aborted, MoeshareError) as e:
            await self._abort(context, "", e)
        return pb.LoadStoreResponse(models=models)

    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadModelResponse:
        try:
            self._check_ready()
            unloaded = await self._engine(lambda: self.worker.engine.unload(request.name))
        except (_Aborted, MoeshareError) as e:
            await self._abort(context, request.name, e)
        return pb.UnloadModelResponse(unloaded=unloaded)
