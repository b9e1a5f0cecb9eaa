"""Open-loop replay of a workload through the real gRPC API: each request starts at its arrival time,
whatever happened to the earlier ones, and streams; every token's arrival is timed on the client."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc

from moeshare.bench.workload import RequestSpec
from moeshare.client import FINISH, AsyncClient

MAX_REQUESTS = 10_000


@dataclass
class RequestRecord:
    """One replayed request. Times are seconds since the replay started (client clock)."""

    id: str
    variant: str
    arrival_s: float  # when the schedule wanted it sent
    prompt_len: int  # tokens in the workload's prompt
    max_tokens: int
    sent_s: float = 0.0
    first_token_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)  # one per output token
    finish_s: float = 0.0  # the stream ended, completed or failed
    prompt_tokens: int = 0  # as the server counted them: differs from prompt_len under a non-byte tokenizer
    finish_reason: str = ""  # "length", "stop", ...; "" when the call failed
    error: str | None = None  # "CODE: details" of a failed call

    @property
    def tokens_out(self) -> int:
        return len(self.token_times_s)

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_reason != ""


def is_loopback(address: str) -> bool:
    """True for host:port on 127.0.0.0/8, [::1] or localhost, and for unix sockets."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.rsplit(":", 1)[0] if ":" in address else address
    host = host.removeprefix("[").removesuffix("]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _one(
    client: AsyncClient,
    req: RequestSpec,
    prompt: str | list[int],
    seed: int,
    record: RequestRecord,
    clock: Callable[[], float],
    params: dict[str, object],
    timeout_s: float | None,
    end_s: float | None,
) -> None:
    record.sent_s = clock()
    if end_s is not None:  # the run's end cancels whatever is still running then
        left = max(1e-3, end_s - record.sent_s)
        timeout_s = left if timeout_s is None else min(timeout_s, left)
    try:
        async for r in client.generate(
            req.variant,
            prompt,
            max_tokens=req.max_tokens,
            request_id=req.id,
            seed=seed,
            timeout=timeout_s,
            **params,
        ):
            now = clock()
            if r.token_ids and record.first_token_s is None:
                record.first_token_s = now
            record.token_times_s.extend([now] * len(r.token_ids))
            if r.finish_reason:
                record.finish_reason = FINISH.get(r.finish_reason, "unspecified")
                record.prompt_tokens = r.usage.prompt_tokens
    except grpc.aio.AioRpcError as e:
        record.error = f"{e.code().name}: {e.details()}"
    record.finish_s = clock()


async def replay(
    address: str,
    requests: Sequence[RequestSpec],
    token: str | None = None,
    *,
    temperature: float | None = None,
    timeout_s: float | None = None,
    end_s: float | None = None,
    render: Callable[[Sequence[int]], str] | None = None,
    ignore_eos: bool = True,
    max_requests: int = MAX_REQUESTS,
    allow_remote: bool = False,
    extra: Callable[[RequestSpec], Mapping[str, object]] | None = None,
) -> list[RequestRecord]:
    """Send every request at its arrival_s (open loop) and stream it; returns one record per request,
    in arrival order. `temperature` None: the server's default. Request i gets sampling seed i, so a
    replay is reproducible. Prompts go as token ids unless `render` turns them into text; `ignore_eos`
    runs every request to its max_tokens, so output lengths are the workload's. A request fails
    (DEADLINE_EXCEEDED) after `timeout_s`, or at `end_s` seconds after the replay started, whichever is
    first. `extra`: more generate() arguments per request (e.g. its latency targets)."""
    if len(requests) > max_requests:
        raise ValueError(
            f"refusing to replay {len(requests)} requests: more than max_requests={max_requests}"
        )
    if not allow_remote and not is_loopback(address):
        raise ValueError(f"refusing non-loopback address {address!r}; pass allow_remote=True to send there")
    ordered = sorted(requests, key=lambda r: r.arrival_s)
    prompts = [list(r.prompt_ids) if render is None else render(r.prompt_ids) for r in ordered]
    records = [RequestRecord(r.id, r.variant, r.arrival_s, r.prompt_len, r.max_tokens) for r in ordered]
    params: dict[str, object] = {"ignore_eos": ignore_eos}
    if temperature is not None:
        params["temperature"] = temperature

    async with AsyncClient(address, token=token) as client:
        t0 = time.perf_counter()

        def clock() -> float:
            return time.perf_counter() - t0

        tasks = []
        for i, (req, prompt, record) in enumerate(zip(ordered, prompts, records, strict=True)):
            delay = req.arrival_s - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            mine = params | dict(extra(req)) if extra is not None else params
            tasks.append(
                asyncio.create_task(_one(client, req, prompt, i, record, clock, mine, timeout_s, end_s))
            )
        await asyncio.gather(*tasks)
    return records
