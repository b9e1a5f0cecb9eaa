"""A small Python client of the moeshare gRPC API, sync and async. Used by the CLI and the tests.

with Client("127.0.0.1:50051") as c:
    for piece in c.generate("kjv", "And God said", max_tokens=32):
        print(piece, end="")
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from moeshare.v1 import moeshare_pb2 as pb
from moeshare.v1 import moeshare_pb2_grpc as rpc

FINISH = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_CANCELLED: "cancelled",
    pb.FINISH_REASON_CONTEXT: "context",
}


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    ttft_seconds: float
    total_seconds: float


def _request(
    model: str,
    prompt: str | list[int],
    max_tokens: int = 64,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int = 0,
    seed: int | None = None,
    stop: list[str] | None = None,
    request_id: str = "",
    logprobs: bool = False,
    ignore_eos: bool = False,
    ttft_target: float | None = None,
    tpot_target: float | None = None,
    priority: int = 0,
    refuse_if_late: bool = False,
) -> pb.GenerateRequest:
    """prompt: text, or token ids for a model served without a tokenizer; ttft_target / tpot_target: latency
    targets in seconds (unset: the model's defaults on the server)."""
    ids = not isinstance(prompt, str)
    req = pb.GenerateRequest(
        model=model,
        prompt="" if ids else prompt,
        prompt_token_ids=list(prompt) if ids else [],
        ignore_eos=ignore_eos,
        max_tokens=max_tokens,
        top_k=top_k,
        stop=stop or [],
        request_id=request_id,
        logprobs=logprobs,
        priority=priority,
        refuse_if_late=refuse_if_late,
    )
    if ttft_target is not None:
        req.ttft_target_seconds = ttft_target
    if tpot_target is not None:
        req.tpot_target_seconds = tpot_target
    if temperature is not None:
        req.temperature = temperature
    if top_p is not None:
        req.top_p = top_p
    if seed is not None:
        req.seed = seed
    return req


def _completion(r: pb.CompleteResponse) -> Completion:
    u = r.usage
    return Completion(
        r.text,
        list(r.token_ids),
        FINISH.get(r.finish_reason, "unspecified"),
        u.prompt_tokens,
        u.completion_tokens,
        u.ttft_seconds,
        u.total_seconds,
    )


def _metadata(token: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")] if token else []


def read_token(path: str | Path | None) -> str | None:
    return Path(path).read_text().strip() if path else None


class Client:
    """Blocking client. `token`: the server's bearer token, if it has one; or its admin token, which is good
    for every call and the only one load_store / unload_model accept."""

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        token: str | None = None,
        root_certificates: bytes | None = None,
    ) -> None:
        if root_certificates is not None:
            self.channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates))
        else:
            self.channel = grpc.insecure_channel(address)
        self.stub = rpc.MoeShareStub(self.channel)
        self.metadata = _metadata(token)

    def generate_stream(
        self, model: str, prompt: str | list[int], timeout: float | None = None, **params
    ) -> Iterator[pb.GenerateResponse]:
        """The raw stream of GenerateResponse messages; cancel it with .cancel() on the returned call."""
        return self.stub.Generate(_request(model, prompt, **params), metadata=self.metadata, timeout=timeout)

    def generate(
        self, model: str, prompt: str | list[int], timeout: float | None = None, **params
    ) -> Iterator[str]:
        """Yields the completion's text pieces as they are generated."""
        for r in self.generate_stream(model, prompt, timeout=timeout, **params):
            if r.text:
                yield r.text

    def complete(
        self, model: str, prompt: str | list[int], timeout: float | None = None, **params
    ) -> Completion:
        req = _request(model, prompt, **params)
        return _completion(self.stub.Complete(req, metadata=self.metadata, timeout=timeout))

    def list_models(self, timeout: float | None = None) -> list[pb.ModelInfo]:
        reply = self.stub.ListModels(pb.ListModelsRequest(), metadata=self.metadata, timeout=timeout)
        return list(reply.models)

    def stats(self, timeout: float | None = None) -> pb.StatsResponse:
        return self.stub.GetStats(pb.GetStatsRequest(), metadata=self.metadata, timeout=timeout)

    def load_store(self, path: str) -> list[str]:
        return list(self.stub.LoadStore(pb.LoadStoreRequest(path=path), metadata=self.metadata).models)

    def unload_model(self, name: str) -> list[str]:
        return list(self.stub.UnloadModel(pb.UnloadModelRequest(name=name), metadata=self.metadata).unloaded)

    def set_kv_limits(self, name: str, min_gib: float = 0.0, max_gib: float | None = None) -> None:
        """Admin: keep min_gib of the elastic KV pool for `name`'s store or checkpoint, cap it at max_gib."""
        req = pb.SetKvLimitsRequest(name=name, min_gib=min_gib, max_gib=max_gib)
        self.stub.SetKvLimits(req, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """The same calls on grpc.aio, for asyncio programs (load generators, many concurrent streams)."""

    def __init__(self, address: str = "127.0.0.1:50051", token: str | None = None) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = rpc.MoeShareStub(self.channel)
        self.metadata = _metadata(token)

    async def generate(
        self, model: str, prompt: str | list[int], timeout: float | None = None, **params
    ) -> AsyncIterator[pb.GenerateResponse]:
        call = self.stub.Generate(_request(model, prompt, **params), metadata=self.metadata, timeout=timeout)
        async for r in call:
            yield r

    async def complete(
        self, model: str, prompt: str | list[int], timeout: float | None = None, **params
    ) -> Completion:
        req = _request(model, prompt, **params)
        return _completion(await self.stub.Complete(req, metadata=self.metadata, timeout=timeout))

    async def list_models(self) -> list[pb.ModelInfo]:
        return list((await self.stub.ListModels(pb.ListModelsRequest(), metadata=self.metadata)).models)

    async def stats(self) -> pb.StatsResponse:
        return await self.stub.GetStats(pb.GetStatsRequest(), metadata=self.metadata)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
