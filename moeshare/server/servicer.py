"""The MoeShare gRPC service (grpc.aio): turns requests into engine submissions and token events into replies."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any, NoReturn

import grpc

from moeshare.engine.api import EngineFailed, EngineUnavailable, ModelInfo, StepTotals, TokenEvent, Usage
from moeshare.engine.request import (
    FinishReason,
    InvalidRequest,
    LateRequest,
    RequestTooLarge,
    SamplingParams,
    Targets,
    UnknownModel,
    clip,
)
from moeshare.errors import MoeshareError, summary
from moeshare.memory.pages import PageStats
from moeshare.server.auth import LOAD_OFF, PATH_CHARS, confine, outside
from moeshare.server.messages import ListModels, Load, Operation, SetKvLimits, TakeSnapshot, Unload
from moeshare.server.metrics import Metrics
from moeshare.server.snapshot import Snapshot
from moeshare.server.worker import EngineWorker, QueueFull, RequestFailed, request_events
from moeshare.v1 import moeshare_pb2 as pb
from moeshare.v1 import moeshare_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 64
LOADING = "loading, retry shortly"
MAX_REQUEST_ID = 256  # characters; the id is echoed in every streamed message
MAX_MESSAGE = 1024  # characters of an error message (the echoed input is clipped before that)
UNKNOWN = "unknown"  # the metrics label of every name that is not a served model

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
    (LateRequest, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineUnavailable, grpc.StatusCode.UNAVAILABLE),
    (EngineFailed, grpc.StatusCode.INTERNAL),
    (RequestFailed, grpc.StatusCode.INTERNAL),
    (MoeshareError, grpc.StatusCode.FAILED_PRECONDITION),
]


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code, self.message = code, message


def _status(e: Exception) -> tuple[grpc.StatusCode, str]:
    for kind, code in ERRORS:
        if isinstance(e, kind):
            return code, str(e)
    log.error("internal error in a call", exc_info=e)
    return grpc.StatusCode.INTERNAL, f"internal error: {summary(e, 1000)}"


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
    if len(request.request_id) > MAX_REQUEST_ID:
        raise InvalidRequest(
            f"request_id is {len(request.request_id)} characters; at most {MAX_REQUEST_ID} are allowed"
        )
    return list(request.prompt_token_ids) or request.prompt


def _usage(usage: Usage | None) -> pb.Usage:
    if usage is None:  # a request the engine never took (it went down first)
        return pb.Usage()
    return pb.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        ttft_seconds=usage.ttft,
        total_seconds=usage.total,
    )


def _add(reply: pb.GenerateResponse | pb.CompleteResponse, ev: TokenEvent, logprobs: bool) -> None:
    """Append one token event to a reply; the last event also sets finish reason and usage."""
    if ev.token_id >= 0:  # -1: the sequence was cancelled under the request (unload, shutdown)
        reply.token_ids.append(ev.token_id)
        if logprobs:
            reply.logprobs.append(ev.logprob)
    if ev.finished and ev.finish_reason is not None:
        reply.finish_reason = FINISH[ev.finish_reason]
        reply.usage.CopyFrom(_usage(ev.usage))


def _step_totals(t: StepTotals) -> pb.StepTotals:
    return pb.StepTotals(steps=t.steps, seconds=t.seconds, floor_seconds=t.floor_seconds)


def _model_info(m: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=m.name,
        store=m.path,
        architecture=m.architecture,
        context_length=m.context,
        resident=m.resident,
        kind=m.kind,
        max_batched_tokens=m.max_batched_tokens,
        max_num_seqs=m.max_num_seqs,
        text_to_text=m.text_to_text,
    )


class MoeShareServicer(moeshare_pb2_grpc.MoeShareServicer):
    def __init__(
        self,
        worker: EngineWorker,
        metrics: Metrics | None = None,
        load_dirs: tuple[Path, ...] = (),
        slo: dict[str, Targets] | None = None,
    ) -> None:
        self.worker = worker
        self.slo = slo or {}  # per-model default latency targets (--slo)
        self.metrics = metrics
        self.load_dirs = load_dirs  # LoadStore loads only under these (resolved); none: it is off
        self.ready = False  # set once the stores given at start are loaded

    async def _ask(self, operation: Operation) -> Any:
        return await asyncio.wrap_future(self.worker.ask(operation))

    def _count(self, model: str, code: grpc.StatusCode) -> None:
        if self.metrics:  # a client's made-up names must not grow the metrics forever
            self.metrics.count(model if self.worker.serves(model) else UNKNOWN, code.name)

    async def _abort(self, context: grpc.aio.ServicerContext, model: str, e: Exception) -> NoReturn:
        code, message = (e.code, e.message) if isinstance(e, _Aborted) else _status(e)
        self._count(model, code)
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 3] + "..."
        await context.abort(code, message)
        raise AssertionError("unreachable")  # context.abort raises

    def _targets(self, request: pb.GenerateRequest) -> Targets:
        """The request's latency targets, each one it leaves unset from its model's defaults."""
        default = self.slo.get(request.model, Targets())
        targets = Targets(
            request.ttft_target_seconds if request.HasField("ttft_target_seconds") else default.ttft,
            request.tpot_target_seconds if request.HasField("tpot_target_seconds") else default.tpot,
            request.priority,
            request.refuse_if_late,
        )
        targets.validate()
        return targets

    def _check_ready(self) -> None:
        if not self.ready:
            raise _Aborted(grpc.StatusCode.UNAVAILABLE, LOADING)

    # ---- generation --------------------------------------------------------------------------------------

    async def _events(self, request: pb.GenerateRequest) -> AsyncIterator[TokenEvent]:
        """Submit and yield the request's token events; cancels the request if the caller goes away."""
        self._check_ready()
        params = sampling_params(request)
        events = request_events(
            self.worker,
            request.model,
            _prompt(request),
            params,
            request.request_id,
            lambda: self._targets(request),
        )
        async with aclosing(events):
            async for ev in events:
                yield ev

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            async with aclosing(self._events(request)) as events:
                async for ev in events:
                    reply = pb.GenerateResponse(request_id=request.request_id, text=ev.text)
                    _add(reply, ev, request.logprobs)
                    yield reply
        except Exception as e:  # the error's status; INTERNAL with a message for anything unforeseen
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
                async for ev in events:
                    pieces.append(ev.text)
                    _add(reply, ev, request.logprobs)
        except Exception as e:  # the error's status; INTERNAL with a message for anything unforeseen
            await self._abort(context, request.model, e)
        except asyncio.CancelledError:
            self._count(request.model, grpc.StatusCode.CANCELLED)
            raise
        reply.text = "".join(pieces)
        self._count(request.model, grpc.StatusCode.OK)
        return reply

    # ---- models and stats --------------------------------------------------------------------------------

    async def _models(self) -> list[pb.ModelInfo]:
        models: list[ModelInfo] = await self._ask(ListModels())
        return [_model_info(m) for m in models]

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        try:
            self._check_ready()
            models = await self._models()
        except Exception as e:  # the error's status; INTERNAL with a message for anything unforeseen
            await self._abort(context, "", e)
        return pb.ListModelsResponse(models=models)

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        try:
            self._check_ready()
            models = await self._models()
            found = [m for m in models if m.name == request.name]
            if not found:
                served = ", ".join(m.name for m in models) or "none"
                raise UnknownModel(f"unknown model {clip(request.name)}; served models: {served}")
        except Exception as e:  # the error's status; INTERNAL with a message for anything unforeseen
            await self._abort(context, request.name, e)
        return found[0]

    async def GetStats(
        self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatsResponse:
        try:
            self._check_ready()
            snap: Snapshot = await self._ask(TakeSnapshot())
        except Exception as e:  # the error's status; INTERNAL with a message for anything unforeseen
            await self._abort(context, "", e)
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
                    slo_requests=m.slo_requests,
                    slo_met=m.slo_met,
                    decode_steps=_step_totals(m.decode_steps),
                    all_steps=_step_totals(m.all_steps),
                    engines=m.engines,
                )
                for m in snap.models
            ],
            kv_blocks_used=s.kv_blocks_used,
            kv_blocks_free=s.kv_blocks_free,
            resident_variants=s.resident_variants,
            swap_ins=s.swap_ins,
            swap_seconds=s.swap_seconds,
            preemptions=s.preemptions,
            kv_pages=_kv_pages(s.pages) if s.pages is not None else None,
            placement=snap.placement,
        )

    # ---- admin -------------------------------------------------------------------------------------------

    async def SetKvLimits(
        self, request: pb.SetKvLimitsRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetKvLimitsResponse:
        try:
            self._check_ready()
            most = request.max_gib if request.HasField("max_gib") else None
            for what, gib in (("min_gib", request.min_gib), ("max_gib", most)):
                if gib is not None and not (math.isfinite(gib) and gib >= 0):
                    raise InvalidRequest(f"{what} must be a number of GiB >= 0, got {gib}")
            least = int(request.min_gib * 2**30)
            await self._ask(SetKvLimits(request.name, least, None if most is None else int(most * 2**30)))
        except Exception as e:  # the error's status; INTERNAL with a message for anything unforeseen
            await self._abort(context, request.name, e)
        return pb.SetKvLimitsResponse()

    async def LoadStore(
        self, request: pb.LoadStoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadStoreResponse:
        try:
            self._check_ready()
            path = self._load_path(request.path)
            models = await self._ask(Load(paths=(str(path),)))
        except Exception as e:  # the error's status; INTERNAL with a message for anything unforeseen
            await self._abort(context, "", e)
        return pb.LoadStoreResponse(models=models)

    def _load_path(self, given: str) -> Path:
        """The resolved path to load; a path outside the load directories is refused alike whether it
        exists or not."""
        if not given:
            raise InvalidRequest("path is empty: give a store or checkpoint directory on the server")
        if not self.load_dirs:
            raise _Aborted(grpc.StatusCode.PERMISSION_DENIED, LOAD_OFF)
        path = confine(given, self.load_dirs)
        if path is None:
            raise _Aborted(grpc.StatusCode.PERMISSION_DENIED, outside(given, self.load_dirs))
        if not path.exists():
            raise InvalidRequest(
                f"no store or checkpoint at {clip(given, PATH_CHARS)} (a path on the server)"
            )
        return path

    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadModelResponse:
        try:
            self._check_ready()
            unloaded = await self._ask(Unload(request.name))
        except Exception as e:  # the error's status; INTERNAL with a message for anything unforeseen
            await self._abort(context, request.name, e)
        return pb.UnloadModelResponse(unloaded=unloaded)


def _kv_pages(p: PageStats) -> pb.KvPages:
    return pb.KvPages(
        page_bytes=p.page_bytes,
        total=p.total_pages,
        free=p.free_pages,
        idle=p.idle,
        in_use=p.mapped,
        maps=p.maps,
        unmaps=p.unmaps,
        map_seconds=p.map_seconds,
        unmap_seconds=p.unmap_seconds,
    )
