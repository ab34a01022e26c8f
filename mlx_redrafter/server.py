"""A local OpenAI-compatible HTTP server with ReDrafter speculative decoding.

`Engine` owns the model: a worker thread runs one generation at a time, fed by a bounded FIFO
queue, and keeps a few recent KV caches so that a request extending an earlier conversation
prefills only its new tokens. `create_app(engine)` is the Starlette application with the
OpenAI routes (`/v1/chat/completions`, `/v1/completions`, `/v1/models`) and `/health`;
`serve` runs it on uvicorn. Errors a client can cause are JSON bodies in OpenAI's format:
400 naming the field, 503 when the queue is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import queue
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .generation import GenerationError, stream_generate
from .prompts import encode_messages

log = logging.getLogger("mlx_redrafter.server")

# Options of `stream_generate` that shape decoding rather than one request (set at start-up).
DECODE_OPTIONS = ("beam_width", "beam_length", "lookup", "lookup_max")
# Context kept free past max_tokens when a request gives none: a speculative round may write
# up to its beam length (and lookup candidates) past the last accepted token.
HEADROOM = 16
DISCONNECT_POLL = 0.2  # seconds between checks for a client gone while its request waits


# ---------------------------------------------------------------------------------------------
# Errors and requests


class APIError(Exception):
    """An error answered as OpenAI's JSON error body."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = ""):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind or {400: "invalid_request_error", 503: "server_busy"}.get(
            status, "server_error"
        )

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param}}
        body["error"]["code"] = None
        return JSONResponse(body, status_code=self.status)


class QueueFullError(APIError):
    def __init__(self, limit: int):
        super().__init__(
            503, f"the server is busy: {limit} requests are already waiting; retry later"
        )


class _Body(BaseModel):
    # Clients send many fields this server does not use; they are ignored, not refused.
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def check_supported(self) -> None:
        if self.n not in (None, 1):
            raise APIError(400, "n: only n=1 is supported", "n")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name}: penalties are not supported", name)
        if self.logit_bias:
            raise APIError(400, "logit_bias: not supported", "logit_bias")
        if isinstance(self.stop, list) and not all(isinstance(s, str) for s in self.stop):
            raise APIError(400, "stop: must be a string or a list of strings", "stop")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs:
            raise APIError(400, "logprobs: not supported", "logprobs")
        if self.tools:
            raise APIError(400, "tools: tool calling is not supported", "tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError(400, "response_format: only text is supported", "response_format")


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        for name in ("echo", "logprobs", "suffix"):
            if getattr(self, name):
                raise APIError(400, f"{name}: not supported", name)
        if self.best_of not in (None, 1):
            raise APIError(400, "best_of: only best_of=1 is supported", "best_of")


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _field_name(loc: tuple) -> str | None:
    """('messages', 0, 'content') -> 'messages[0].content' (pydantic's union tags dropped)."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif not (part in _TYPE_TAGS or "[" in part or part[:1].isupper() or "-" in part):
            name += ("." if name else "") + part
    return name or None


def _parse(model: type[BaseModel], raw: bytes) -> Any:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        request = model.model_validate(data)
    except ValidationError as e:
        error = e.errors()[0]
        param = _field_name(error["loc"])
        if error["type"] == "missing":
            raise APIError(400, f"{param}: required", param) from None
        raise APIError(400, f"{param or 'body'}: {error['msg']}", param) from None
    request.check_supported()
    return request


# ---------------------------------------------------------------------------------------------
# Prompt caches


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _cache_bytes(cache) -> int:
    return sum(a.nbytes for a in cache.state())


class PromptCaches:
    """A few KV caches of recent requests, most recent last, bounded in number and bytes.

    `take(ids)` lends out the one sharing the longest prefix with `ids` (a new one when none
    shares any and there is room); `give_back` returns it. Only the worker thread uses it.
    """

    def __init__(self, model, max_entries: int = 4, max_bytes: int = 2 << 30):
        if max_entries < 1:
            raise ValueError(f"the prompt cache needs at least 1 entry, got {max_entries}")
        self.model = model
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.entries: list = []

    def take(self, ids: list[int]):
        best, best_len = None, 0
        for cache in reversed(self.entries):  # ties go to the most recent
            n = _common_prefix(cache.tokens, ids)
            if n > best_len:
                best, best_len = cache, n
        if best is None:
            if len(self.entries) < self.max_entries:
                best = self.model.make_cache()
                best.tokens = []
                return best
            best = self.entries[0]  # the least recently used
        self.entries.remove(best)
        return best

    def give_back(self, cache) -> None:
        self.entries.append(cache)
        while len(self.entries) > 1 and (
            len(self.entries) > self.max_entries
            or sum(_cache_bytes(c) for c in self.entries) > self.max_bytes
        ):
            self.entries.pop(0)


# ---------------------------------------------------------------------------------------------
# The engine: one generation at a time on a worker thread


@dataclass
class Outcome:
    """What one request did; the last event of its job and the source of its log line."""

    kind: str
    prompt_tokens: int = 0
    prefilled_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    decode_tps: float = 0.0
    prefill_tps: float = 0.0
    tokens_per_step: float = 1.0
    steps: int = 0
    accepted_from: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def extra(self) -> dict:
        """The `redrafter` field of a response (clients ignore it)."""
        return {
            "prefilled_tokens": self.prefilled_tokens,
            "tokens_per_step": round(self.tokens_per_step, 4),
            "steps": self.steps,
            "accepted_from": self.accepted_from,
            "decode_tokens_per_second": round(self.decode_tps, 2),
            "prefill_tokens_per_second": round(self.prefill_tps, 2),
        }

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.prompt_tokens - self.prefilled_tokens},
        }

    def log_line(self) -> str:
        parts = [
            self.kind,
            f"prompt {self.prompt_tokens} tokens ({self.prefilled_tokens} prefilled)",
            f"{self.completion_tokens} tokens",
            f"{self.decode_tps:.1f} tok/s",
            f"{self.tokens_per_step:.2f} tokens/step",
        ]
        if self.accepted_from:
            parts.append("accepted " + ", ".join(f"{k} {v}" for k, v in self.accepted_from.items()))
        parts += [self.finish_reason or "?", f"{self.seconds:.2f} s"]
        return " · ".join(parts)


class Job:
    """One request's generation; events go back to the request's event loop."""

    def __init__(self, kind: str, ids: list[int], options: dict, loop: asyncio.AbstractEventLoop):
        self.kind = kind
        self.ids = ids
        self.options = options
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.created = time.perf_counter()

    def post(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    """The model, the drafter and the worker thread that runs requests one at a time.

    Requests wait in a FIFO queue of at most `max_queue`; `submit` refuses more with
    QueueFullError. `decode_options` are passed to every `stream_generate` call as they are
    (only the options the user set, so the library's defaults apply to the others).
    """

    def __init__(
        self,
        model,
        tokenizer,
        drafter=None,
        *,
        model_name: str,
        aliases: tuple[str, ...] = (),
        drafter_name: str | None = None,
        decode_options: dict | None = None,
        max_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_queue: int = 64,
        cache_entries: int = 4,
        cache_bytes: int = 2 << 30,
    ):
        options = {k: v for k, v in (decode_options or {}).items() if v is not None}
        accepted = inspect.signature(stream_generate).parameters
        for name in options:
            if name not in DECODE_OPTIONS or name not in accepted:
                raise ValueError(f"stream_generate has no decoding option {name!r}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.drafter = drafter
        self.model_name = model_name
        self.aliases = {model_name, *aliases}
        self.drafter_name = drafter_name
        self.decode_options = options
        # Context kept free past the default max_tokens for the longest speculative round.
        self.headroom = max(
            HEADROOM, options.get("beam_length") or 0, (options.get("lookup_max") or 0) + 1
        )
        self.defaults = {
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
        }
        self.max_queue = max_queue
        self.caches = PromptCaches(model, cache_entries, cache_bytes)
        self.recent: deque[Outcome] = deque(maxlen=64)  # newest last
        self.finished = 0  # requests done (answered, failed or cancelled) since the start
        self.started = int(time.time())
        self._jobs: queue.Queue = queue.Queue()
        self._waiting = 0
        self._count_lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._current: Job | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._work, name="mlx-redrafter-engine", daemon=True
            )
            self._stopping = False
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        self._stopping = True  # what is still queued or running ends as cancelled
        self._jobs.put(None)
        current = self._current
        if current is not None:
            current.cancel()
        self._thread.join(timeout)
        self._thread = None

    @contextlib.contextmanager
    def paused(self):
        """Hold the model: requests keep queueing (and count against the queue) but none
        starts until the block ends."""
        with self._model_lock:
            yield

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def busy(self) -> bool:
        return self._current is not None

    def submit(self, job: Job) -> None:
        with self._count_lock:
            if self._waiting >= self.max_queue:
                raise QueueFullError(self.max_queue)
            self._waiting += 1
        self._jobs.put(job)

    # --- the worker ---------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._model_lock:
                with self._count_lock:
                    self._waiting -= 1
                if self._stopping:
                    job.cancel()
                if job.cancelled.is_set():
                    outcome = Outcome(job.kind, len(job.ids), finish_reason="cancelled")
                    outcome.seconds = time.perf_counter() - job.created
                    self._finish(job, outcome)
                    continue
                self._current = job
                try:
                    self._run(job)
                except Exception as e:  # never let a request take the worker down
                    log.exception("generation failed")
                    job.post(("error", APIError(500, f"generation failed: {e}")))
                finally:
                    self._current = None

    def _run(self, job: Job) -> None:
        cache = self.caches.take(job.ids)
        outcome = Outcome(job.kind, prompt_tokens=len(job.ids))
        stream = stream_generate(
            self.model,
            self.tokenizer,
            job.ids,
            self.drafter,
            cache=cache,
            **self.decode_options,
            **job.options,
        )
        last = None
        healthy = True
        try:
            for response in stream:
                if job.cancelled.is_set():
                    outcome.finish_reason = "cancelled"
                    break
                last = response
                job.post(("text", response.text, response.finish_reason))
        except GenerationError as e:  # raised before any token: the request stays a 400
            outcome.finish_reason = "error"
            job.post(("error", APIError(400, str(e), _error_param(str(e)))))
        except Exception:
            healthy = False  # the cache may be half-written: drop it
            raise
        finally:
            stream.close()  # stream_generate's cleanup leaves the cache matching its tokens
            if healthy:
                self.caches.give_back(cache)
        if last is not None:
            _fill_outcome(outcome, last, self.drafter is not None)
            outcome.finish_reason = outcome.finish_reason or last.finish_reason
        outcome.seconds = time.perf_counter() - job.created
        self._finish(job, outcome)

    def _finish(self, job: Job, outcome: Outcome) -> None:
        self.recent.append(outcome)
        self.finished += 1
        log.info(outcome.log_line())
        job.post(("done", outcome))


def _error_param(message: str) -> str | None:
    if "max_tokens" in message:
        return "max_tokens"
    for name in ("temperature", "top_p", "top_k"):
        if name in message:
            return name
    return None


def _fill_outcome(outcome: Outcome, last, with_drafter: bool) -> None:
    stats = last.stats
    outcome.completion_tokens = last.generation_tokens
    if stats is None:
        return
    outcome.prefilled_tokens = stats.prompt_tokens
    outcome.decode_tps = stats.decode_tps
    outcome.prefill_tps = stats.prefill_tps
    outcome.tokens_per_step = stats.tokens_per_step
    outcome.steps = stats.steps
    accepted_from = getattr(stats, "accepted_from", None)
    if accepted_from is None and with_drafter:
        accepted_from = {"drafter": int(sum(stats.accepted))}
    outcome.accepted_from = {k: int(v) for k, v in (accepted_from or {}).items()}


# ---------------------------------------------------------------------------------------------
# Requests -> token ids and generation options


def _message_text(message: ChatMessage) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)


def chat_ids(tokenizer, messages: list[ChatMessage]) -> list[int]:
    """The prompt of a conversation: the chat template with the generation prompt."""
    turns = [
        {
            "role": "system" if m.role == "developer" else m.role,
            "content": _message_text(m),
        }
        for m in messages
    ]
    try:
        return encode_messages(tokenizer, turns)
    except Exception as e:  # templates raise on what they do not accept (e.g. role order)
        raise APIError(400, f"messages: the chat template refused them: {e}", "messages") from None


def completion_ids(tokenizer, prompt, vocab_size: int) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        raise APIError(400, "prompt: only one prompt per request is supported", "prompt")
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "prompt: empty", "prompt")
        return list(tokenizer.encode(prompt))
    if not prompt:
        raise APIError(400, "prompt: empty", "prompt")
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise APIError(400, f"prompt: token id {bad[0]} outside the vocabulary", "prompt")
    return list(prompt)


# ---------------------------------------------------------------------------------------------
# The application


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _sse(data: dict | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n"


class _Handler:
    def __init__(self, engine: Engine):
        self.engine = engine
        embed = getattr(engine.model, "model", None)
        tokens = getattr(embed, "embed_tokens", None)
        self.vocab_size = tokens.weight.shape[0] if tokens is not None else 1 << 31

    # --- routes -------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        e = self.engine
        return JSONResponse(
            {
                "status": "ok",
                "model": e.model_name,
                "drafter": e.drafter_name,
                "busy": e.busy,
                "waiting": e.waiting,
            }
        )

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.engine.aliases:
            raise APIError(404, f"model {name!r} is not served here", "model", "not_found_error")
        return JSONResponse(self._model_card())

    async def chat(self, request: Request) -> Response:
        body = _parse(ChatRequest, await request.body())
        self._check_model(body.model)
        ids = chat_ids(self.engine.tokenizer, body.messages)
        max_tokens = body.max_completion_tokens or body.max_tokens
        options = self._options(body, ids, max_tokens, "messages")
        return await self._respond(request, "chat", ids, options, body)

    async def completions(self, request: Request) -> Response:
        body = _parse(CompletionRequest, await request.body())
        self._check_model(body.model)
        ids = completion_ids(self.engine.tokenizer, body.prompt, self.vocab_size)
        # OpenAI's default for completions is 16 tokens.
        options = self._options(body, ids, body.max_tokens or 16, "prompt", explicit=True)
        return await self._respond(request, "completion", ids, options, body)

    # --- helpers ------------------------------------------------------------------------------

    def _model_card(self) -> dict:
        return {
            "id": self.engine.model_name,
            "object": "model",
            "created": self.engine.started,
            "owned_by": "mlx-redrafter",
        }

    def _check_model(self, name: str | None) -> None:
        if name and name not in self.engine.aliases:
            raise APIError(
                400,
                f"model: {name!r} is not served here; this server serves "
                f"{self.engine.model_name!r}",
                "model",
            )

    def _options(self, body, ids, max_tokens, prompt_field, explicit=None) -> dict:
        """stream_generate's per-request keyword arguments, with the context checked."""
        e = self.engine
        explicit = max_tokens is not None if explicit is None else explicit
        limit = e.model.context_length
        if limit and len(ids) + 1 + e.headroom > limit:
            raise APIError(
                400,
                f"{prompt_field}: the prompt has {len(ids)} tokens; the model's context length "
                f"is {limit} tokens",
                prompt_field,
            )
        if not explicit:
            max_tokens = e.defaults["max_tokens"]
            if limit:
                max_tokens = min(max_tokens, limit - len(ids) - e.headroom)
        elif limit and len(ids) + max_tokens > limit:
            raise APIError(
                400,
                f"max_tokens: the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) "
                f"exceeds the model's context length of {limit} tokens",
                "max_tokens",
            )
        stop = body.stop if isinstance(body.stop, list) else [body.stop] if body.stop else []
        options = {
            "max_tokens": max_tokens,
            "temperature": _pick(body.temperature, e.defaults["temperature"]),
            "top_p": _pick(body.top_p, e.defaults["top_p"]),
            "top_k": _pick(body.top_k, e.defaults["top_k"]),
            "stop": [s for s in stop if s],
        }
        if body.seed is not None:
            options["seed"] = body.seed
        return options

    async def _respond(self, request, kind, ids, options, body) -> Response:
        job = Job(kind, ids, options, asyncio.get_running_loop())
        try:
            self.engine.submit(job)
        except QueueFullError as e:
            log.info(f"{kind} · refused: {e.message}")
            raise
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        try:
            first = await job.events.get()  # the first token, an error, or a disconnect
            if first[0] == "error":
                raise first[1]
            if first[0] == "gone":
                return Response(status_code=499)
            if body.stream:
                watcher.cancel()  # from here the streaming response watches the connection
                stream = _stream_chat if kind == "chat" else _stream_completion
                return _JobStream(
                    job,
                    stream(job, first, self.engine.model_name, body),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            pieces, finish = [first[1]], first[2]
            while True:
                event = await job.events.get()
                if event[0] == "text":
                    pieces.append(event[1])
                    finish = event[2] or finish
                elif event[0] == "done":
                    outcome = event[1]
                    break
                elif event[0] == "gone":
                    return Response(status_code=499)
                elif event[0] == "error":
                    raise event[1]
            return JSONResponse(
                _full_response(kind, self.engine.model_name, "".join(pieces), finish, outcome)
            )
        finally:
            watcher.cancel()
            if not body.stream:
                job.cancel()  # a no-op when it finished


class _JobStream(StreamingResponse):
    """Server-sent events of one job; the job is cancelled however the response ends (a
    client that disconnects mid-stream frees the model at the next round)."""

    def __init__(self, job: Job, content, **kwargs):
        super().__init__(content, **kwargs)
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


def _pick(value, default):
    return default if value is None else value


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Cancel `job` if its client goes away while the answer is still being waited for."""
    while True:
        await asyncio.sleep(DISCONNECT_POLL)
        if await request.is_disconnected():
            job.cancel()
            job.events.put_nowait(("gone",))
            return


def _full_response(kind: str, model_name: str, text: str, finish, outcome: Outcome) -> dict:
    base = {"created": int(time.time()), "model": model_name, "system_fingerprint": None}
    if kind == "chat":
        out = {
            "id": _new_id("chatcmpl"),
            "object": "chat.completion",
            **base,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
        }
    else:
        out = {
            "id": _new_id("cmpl"),
            "object": "text_completion",
            **base,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        }
    out["usage"] = outcome.usage()
    out["redrafter"] = outcome.extra()
    return out


async def _events(job: Job, first: tuple) -> AsyncIterator[tuple]:
    """The job's events from `first` to its outcome; the job is cancelled if the consumer
    stops early (the client went away)."""
    try:
        event = first
        while True:
            yield event
            if event[0] in ("done", "error"):
                return
            event = await job.events.get()
    finally:
        job.cancel()


async def _stream_chat(job: Job, first: tuple, model_name: str, body) -> AsyncIterator[str]:
    base = {
        "id": _new_id("chatcmpl"),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model_name,
        "system_fingerprint": None,
    }

    def chunk(delta: dict, finish=None, **extra) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _sse({**base, "choices": [choice], **extra})

    yield chunk({"role": "assistant", "content": ""})
    finish = None
    async for event in _events(job, first):
        if event[0] == "text":
            finish = event[2] or finish
            if event[1]:
                yield chunk({"content": event[1]})
        elif event[0] == "done":
            outcome = event[1]
            yield chunk({}, finish, redrafter=outcome.extra())
            if body.stream_options and body.stream_options.include_usage:
                yield _sse({**base, "choices": [], "usage": outcome.usage()})
        elif event[0] == "error":
            yield _sse({"error": {"message": event[1].message, "type": event[1].kind}})
    yield _sse("[DONE]")


async def _stream_completion(job: Job, first: tuple, model_name: str, body) -> AsyncIterator[str]:
    base = {
        "id": _new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model_name,
        "system_fingerprint": None,
    }

    def chunk(text: str, finish=None, **extra) -> str:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return _sse({**base, "choices": [choice], **extra})

    finish = None
    async for event in _events(job, first):
        if event[0] == "text":
            finish = event[2] or finish
            if event[1]:
                yield chunk(event[1])
        elif event[0] == "done":
            outcome = event[1]
            yield chunk("", finish, redrafter=outcome.extra())
            if body.stream_options and body.stream_options.include_usage:
                yield _sse({**base, "choices": [], "usage": outcome.usage()})
        elif event[0] == "error":
            yield _sse({"error": {"message": event[1].message, "type": event[1].kind}})
    yield _sse("[DONE]")


async def _api_error(request: Request, exc: APIError) -> Response:
    if exc.status == 400:
        log.info(f"{request.method} {request.url.path} · 400 · {exc.message}")
    return exc.response()


async def _http_error(request: Request, exc: HTTPException) -> Response:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return APIError(exc.status_code, str(exc.detail), kind=kind).response()


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception(f"{request.method} {request.url.path} failed")
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()


def create_app(engine: Engine) -> Starlette:
    """The ASGI application; starting it starts the engine's worker, stopping it stops it."""
    handler = _Handler(engine)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    routes = [
        Route("/health", handler.health, methods=["GET"]),
        Route("/v1/models", handler.models, methods=["GET"]),
        Route("/v1/models/{name:path}", handler.model, methods=["GET"]),
        Route("/v1/chat/completions", handler.chat, methods=["POST"]),
        Route("/v1/completions", handler.completions, methods=["POST"]),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            APIError: _api_error,
            HTTPException: _http_error,
            Exception: _server_error,
        },
    )


# ---------------------------------------------------------------------------------------------
# Running it


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0 picks a free one); raises OSError naming the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def make_server(engine: Engine, log_level: str = "warning"):
    """A uvicorn server for the engine's application (run it with `.run(sockets=[sock])`)."""
    import uvicorn

    config = uvicorn.Config(
        create_app(engine),
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=2,
        lifespan="on",
    )
    return uvicorn.Server(config)


def serve(engine: Engine, sock: socket.socket, on_ready: Callable[[], None] | None = None) -> None:
    """Serve on `sock` until interrupted (Ctrl-C)."""
    server = make_server(engine)
    if on_ready is not None:
        original = server.startup

        async def startup(sockets=None):
            await original(sockets=sockets)
            on_ready()

        server.startup = startup
    server.run(sockets=[sock])
