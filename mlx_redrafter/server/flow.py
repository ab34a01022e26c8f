"""One request's way through the server, shared by the API adapters: the body read within its
limit, parsing and tokenising off the event loop, the job submitted and its first event
awaited within the request's deadline, then its events collected or streamed; a client that
goes away cancels its job.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from .door import OWNER
from .engine import DeadlineError, Done, Engine, Failed, Gone, Job, Text
from .formats import ResponseFormats
from .prompting import ModelFacts
from .protocol import APIError, Limits, parse_body

log = logging.getLogger("mlx_redrafter.server")
DISCONNECT_POLL = 0.2  # seconds between checks for a client gone while its request waits


class Gateway:
    """What the adapters share: the engine, the model's facts, the limits, and the threads
    that parse and tokenise requests (never the model's thread, never the event loop)."""

    def __init__(self, engine: Engine, limits: Limits):
        self.engine = engine
        self.limits = limits
        self.facts = ModelFacts.of(engine.model, engine.tokenizer)
        self.formats = ResponseFormats(engine.model, engine.tokenizer)
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="mlx-redrafter-prepare")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def off_loop(self, fn: Callable, *args) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def read(self, request: Request, model) -> Any:
        """The body as a `model` (413 past the size limit, 400 for anything malformed)."""
        limit = self.limits.max_body_bytes
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"the request body is larger than {limit} bytes")
                chunks.append(chunk)
        except ClientDisconnect:
            raise APIError(400, "the client closed the connection") from None
        return await self.off_loop(parse_body, model, b"".join(chunks), self.limits)

    def check_model(self, name: str | None) -> None:
        engine = self.engine
        if name and name not in engine.aliases:
            raise APIError(
                400,
                f"model: {name!r} is not served here; this server serves {engine.model_name!r}",
                "model",
            )

    async def constraint(self, response_format, param: str = "response_format") -> Any:
        """A new grammar constraint for one request's response_format (an OpenAI-style dict,
        its pydantic model, or None), compiled off the event loop; None for free text."""
        if response_format is None:
            return None
        if not isinstance(response_format, dict):
            response_format = response_format.model_dump(exclude_none=True)
        reason = self.engine.no_constraints
        if reason is not None and response_format.get("type", "text") != "text":
            raise APIError(400, f"{param}: {reason}", param)
        return await self.off_loop(self.formats.constraint, response_format, param)

    async def start(
        self,
        request: Request,
        kind: str,
        ids: list[int],
        options: dict,
        constraint: Any = None,
        top_logprobs: int | None = None,
    ):
        """Submit a job and wait for its first event: (job, first Text or Done), or None when
        the client went away; APIError when it failed before its first token."""
        job = Job(
            kind,
            ids,
            options,
            asyncio.get_running_loop(),
            owner=request.scope.get(OWNER, ""),
            timeout=self.limits.request_timeout,
            constraint=constraint,
            top_logprobs=top_logprobs,
        )
        try:
            self.engine.submit(job)
        except APIError as e:
            log.info(f"{kind} · refused: {e.message}")
            raise
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        try:
            first = await self.next_event(job)
        finally:
            watcher.cancel()
        if isinstance(first, Gone):
            return None
        if isinstance(first, Failed):
            raise first.error
        return job, first

    async def next_event(self, job: Job):
        remaining = job.deadline - time.monotonic()
        timeout = max(remaining, 0.0) if math.isfinite(remaining) else None
        try:
            return await asyncio.wait_for(job.events.get(), timeout=timeout)
        except TimeoutError:
            job.cancel(DeadlineError(job.timeout))
            return Failed(job.abort)

    async def events(self, job: Job, first) -> AsyncIterator[Text | Done | Failed]:
        """The job's events from `first` to its last (Done or Failed); the job is cancelled if
        the consumer stops early (the client went away)."""
        try:
            event = first
            while True:
                if not isinstance(event, Gone):
                    yield event
                if isinstance(event, Done | Failed):
                    return
                event = await self.next_event(job)
        finally:
            job.cancel()

    async def collect(self, request: Request, job: Job, first) -> tuple[list[Text], Any]:
        """All of a job's Text events and its outcome (for a response that is not streamed)."""
        texts = []
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        try:
            async for event in self.events(job, first):
                if isinstance(event, Text):
                    texts.append(event)
                elif isinstance(event, Failed):
                    raise event.error
                else:
                    return texts, event.outcome
        finally:
            watcher.cancel()
        raise APIError(500, "the generation ended without an outcome")


class JobStream(StreamingResponse):
    """Server-sent events of one job; the job is cancelled however the response ends (a
    client that disconnects mid-stream frees the model at the next round)."""

    def __init__(self, job: Job, content):
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


def gone() -> Response:
    return Response(status_code=499)


def sse(data: dict | str, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n"


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Cancel `job` if its client goes away while the answer is still being waited for."""
    while True:
        await asyncio.sleep(DISCONNECT_POLL)
        if await request.is_disconnected():
            job.cancel()
            job.events.put_nowait(Gone())
            return
