"""One engine on one GPU, as a Ray actor: the same EngineWorker the single-process server uses (the engine's
own thread, typed messages), its answers plain data, a request's token events streamed back through Ray's
streaming generator. Ray is imported only by `remote_class`, so this module costs nothing without it."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from moeshare.engine.api import Submit
from moeshare.engine.config import EngineConfig
from moeshare.engine.engine import Engine
from moeshare.engine.request import SamplingParams
from moeshare.server.messages import Operation, Ticket
from moeshare.server.worker import EngineWorker


class EngineHost:
    """What each engine actor holds (Ray makes it remote with `remote_class`)."""

    def __init__(self, config: EngineConfig, index: int, max_queue: int) -> None:
        self.index = index
        self.engine = Engine([], config)
        # an engine thread that dies takes the actor with it: the front end sees the actor gone and places
        # its models again, where a live actor with a dead engine would fail every request forever
        self.worker = EngineWorker(self.engine, max_queue, on_fatal=lambda _: os._exit(1))
        self.worker.start()

    def pid(self) -> int:
        return os.getpid()

    def memory(self) -> int:
        """The bytes this engine may place models in: its page pool (--pool), else its memory limit, else its
        device's free memory."""
        if self.engine.config.pool_bytes is not None:
            return self.engine.config.pool_bytes
        limit = self.engine.config.memory_limit_bytes
        if limit is not None:
            return limit
        device = self.engine.config.torch_device
        if device.type == "cuda":
            import torch

            return torch.cuda.mem_get_info(device)[0]
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")

    async def ask(self, operation: Operation) -> Any:
        return await asyncio.wrap_future(self.worker.ask(operation))

    async def prepare(self, model: str, prompt: str | list[int], params: SamplingParams) -> list[int]:
        return await asyncio.to_thread(self.worker.prepare, model, prompt, params)

    async def chat_prompt(self, model: str, messages: list[dict[str, str]]) -> str:
        return await asyncio.to_thread(self.worker.chat_prompt, model, messages)

    async def generate(self, request: Submit):
        """The engine's handle once it took the request (its validation error otherwise), then every token
        event to the final one. A caller that stops reading (Ray cancels this) cancels the request here, so
        its KV goes back at once."""
        ticket = Ticket(request.model, request.request_id, asyncio.get_running_loop(), asyncio.Queue())
        done = False
        try:
            yield await asyncio.wrap_future(self.worker.submit(request, ticket))
            while not done:
                ev = await ticket.events.get()
                done = ev.finished
                yield ev
        finally:
            if not done:
                self.worker.cancel(ticket)

    def stop(self) -> None:
        self.worker.stop()


def remote_class(gpus: float, cpus: float = 1.0):
    """EngineHost as a Ray actor class asking for `gpus` GPUs (1 on CUDA: Ray gives it one of its own)."""
    import ray

    return ray.remote(num_gpus=gpus, num_cpus=cpus, max_restarts=0)(EngineHost)
