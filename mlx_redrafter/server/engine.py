"""The engine: one model, one worker thread running one generation at a time, fed by a bounded
FIFO queue; the prompt caches; jobs and the events they send back, as small typed records.

The worker thread is started once and lives as long as the process: a thread that has run
MLX must not exit before the process does (MLX's per-thread state is torn down at thread exit
and then races the process's own teardown: "terminate called without an active exception",
or a segfault, in about half of the runs where the thread was joined). `stop()` therefore
drains and parks the worker instead of ending it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..generation import OPTION_DEFAULTS, GenerateOptions, GenerationError, stream_generate
from ..plan import DecodePlan
from .caches import PromptCaches
from .protocol import APIError, QueueFullError, ShuttingDownError

log = logging.getLogger("mlx_redrafter.server")

# Options of `stream_generate` that shape decoding rather than one request (set at start-up):
# all but lookup_memory become the engine's DecodePlan.
DECODE_OPTIONS = ("beam_width", "beam_length", "lookup", "lookup_max", "lookup_memory")
PLAN_OPTIONS = ("beam_width", "beam_length", "lookup", "lookup_max")


# ---------------------------------------------------------------------------------------------
# Events: what a job sends back to its request


@dataclass(frozen=True)
class Text:
    text: str  # new text since the previous event (may be empty)
    finish: str | None  # "stop" or "length" on the last token
    token: int
    # The token's logprobs.TokenLogprob when its job asked for them (`Job.top_logprobs`).
    logprobs: Any = None


@dataclass(frozen=True)
class Done:
    outcome: Outcome


@dataclass(frozen=True)
class Failed:
    error: APIError


@dataclass(frozen=True)
class Gone:
    """The client went away while its request waited."""


Event = Text | Done | Failed | Gone


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

    @property
    def cached_tokens(self) -> int:
        return self.prompt_tokens - self.prefilled_tokens

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


# ---------------------------------------------------------------------------------------------
# Jobs


@dataclass
class Job:
    """One request's generation; its events go back to the request's event loop."""

    kind: str  # "chat", "completion", "messages": for the log
    ids: list[int]
    options: dict  # stream_generate's per-request keyword arguments
    loop: asyncio.AbstractEventLoop
    owner: str = ""  # the client (API key) whose prompt caches it may use
    timeout: float = float("inf")  # seconds from its creation to its last token
    # This request's own grammar constraint (from `response_format`; never shared: it holds
    # the grammar state of one generation), and the number of top logprobs wanted per token
    # (None: no logprobs).
    constraint: Any = None
    top_logprobs: int | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.perf_counter)
    arrived: float = field(default_factory=time.monotonic)
    # Set with the cancellation when the job is ended for a reason its client must hear.
    abort: APIError | None = None

    @property
    def deadline(self) -> float:
        return self.arrived + self.timeout

    def post(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled.set()

    def cancel(self, reason: APIError | None = None) -> None:
        if reason is not None and self.abort is None:
            self.abort = reason
        self.cancelled.set()


class DeadlineError(APIError):
    def __init__(self, seconds: float):
        super().__init__(504, f"the request took longer than the server's limit of {seconds:g} s")


# ---------------------------------------------------------------------------------------------
# The engine


class Engine:
    """The model, the drafter and the worker thread that runs requests one at a time.

    Requests wait in a FIFO queue of at most `max_queue`; `submit` refuses more with
    QueueFullError. `decode_options` (only the options the user set, so the library's defaults
    apply to the others) are resolved once into the engine's `plan`, which every generation
    call gets; a lookup memory is passed as it is. `generate` is
    the generation function (`stream_generate`; tests pass a scripted one).
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
        defaults: dict | None = None,
        max_queue: int = 64,
        cache_entries: int = 4,
        cache_bytes: int = 2 << 30,
        generate: Callable = stream_generate,
    ):
        options = {k: v for k, v in (decode_options or {}).items() if v is not None}
        accepted = {f.name for f in dataclasses.fields(GenerateOptions)}
        for name in options:
            if name not in DECODE_OPTIONS or name not in accepted:
                raise ValueError(f"stream_generate has no decoding option {name!r}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.defaults = {  # the library's defaults, the same objects
            name: getattr(OPTION_DEFAULTS, name)
            for name in ("max_tokens", "temperature", "top_p", "top_k")
        }
        self.defaults.update(defaults or {})
        if self.defaults["max_tokens"] < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.defaults['max_tokens']}")
        self.model = model
        self.tokenizer = tokenizer
        self.drafter = drafter
        self.model_name = model_name
        self.aliases = {model_name, *aliases}
        self.drafter_name = drafter_name
        # The decoding settings, resolved once: every request decodes with this plan.
        self.plan = DecodePlan.resolve(model, **{k: options.pop(k, None) for k in PLAN_OPTIONS})
        self.decode_options = options  # what is left: lookup_memory
        self.generate = generate
        # Context kept free past max_tokens: the deepest tree a round may verify at the end
        # of the context (a speculative round writes past the last accepted token).
        self.headroom = self.plan.headroom(drafter is not None)
        self.max_queue = max_queue
        # Why grammar-constrained output cannot be served here (None: it can); for a set-up
        # whose other workers could not follow a constraint (a model split over ranks).
        self.no_constraints: str | None = None
        self.caches = PromptCaches(model, cache_entries, cache_bytes)
        self.recent: deque[Outcome] = deque(maxlen=64)  # newest last
        self.finished = 0  # requests done (answered, failed or cancelled) since the start
        self.started = int(time.time())
        self._jobs: queue.Queue = queue.Queue()
        self._waiting = 0
        self._count_lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._current: Job | None = None
        self._closing = True  # until start()
        self._thread: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._closing = False
        if self._thread is None:
            # A daemon that is never joined (see the module's docstring).
            self._thread = threading.Thread(
                target=self._work, name="mlx-redrafter-engine", daemon=True
            )
            self._thread.start()

    def begin_shutdown(self) -> None:
        """Refuse new requests, answer the queued ones with 503 and end the running one with
        an error its client sees (a stream gets an error event, then its end)."""
        self._closing = True
        current = self._current
        if current is not None:
            current.cancel(ShuttingDownError())
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            with self._count_lock:
                self._waiting -= 1
            self._refuse(job, ShuttingDownError())

    def stop(self, timeout: float = 10.0) -> bool:
        """begin_shutdown, then wait (up to `timeout` s) until the model is idle; the worker
        stays parked. Whether it became idle."""
        self.begin_shutdown()
        deadline = time.monotonic() + timeout
        while self._current is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        return self._current is None

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

    @property
    def closing(self) -> bool:
        return self._closing

    def submit(self, job: Job) -> None:
        if self._closing:
            raise ShuttingDownError()
        with self._count_lock:
            if self._waiting >= self.max_queue:
                raise QueueFullError(self.max_queue)
            self._waiting += 1
        self._jobs.put(job)

    # --- the worker ---------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            with self._model_lock:
                with self._count_lock:
                    self._waiting -= 1
                if self._closing:
                    job.cancel(ShuttingDownError())
                elif time.monotonic() > job.deadline:
                    job.cancel(DeadlineError(job.timeout))
                if job.cancelled.is_set():
                    self._refuse(job, job.abort)
                    continue
                self._current = job
                try:
                    self._run(job)
                except Exception:  # never let a request take the worker down
                    log.exception(f"{job.kind} · generation failed")
                    job.post(Failed(APIError(500, "generation failed; see the server's log")))
                finally:
                    self._current = None

    def _refuse(self, job: Job, error: APIError | None) -> None:
        """End a job that never ran: its client hears `error`, or nothing if it left."""
        outcome = Outcome(job.kind, len(job.ids), finish_reason="cancelled")
        outcome.seconds = time.perf_counter() - job.created
        self._record(outcome)
        job.post(Failed(error) if error is not None else Done(outcome))

    def _run(self, job: Job) -> None:
        cache = self.caches.take(job.ids, job.owner)
        outcome = Outcome(job.kind, prompt_tokens=len(job.ids))
        # The KV cache depends on the token ids alone, so a constrained request shares prompt
        # caches with any other of its client: the constraint only chooses which tokens come.
        extra = {}
        if job.constraint is not None:
            extra["constraint"] = job.constraint
        if job.top_logprobs is not None:
            extra["logprobs"] = job.top_logprobs
        if "lookup_memory" in self.decode_options:
            # Earlier requests' text, one bounded corpus per client (API key): a request's
            # drafts may copy from its own client's earlier requests only.
            extra["lookup_client"] = job.owner
        stream = self.generate(
            self.model, self.tokenizer, job.ids, self.drafter, cache=cache, plan=self.plan,
            **self.decode_options, **job.options, **extra,
        )  # fmt: skip
        last = None
        healthy = True
        try:
            for response in stream:
                if self._closing:  # also a job that started as the shutdown began
                    job.cancel(ShuttingDownError())
                if job.cancelled.is_set() or time.monotonic() > job.deadline:
                    break
                last = response
                logprobs = getattr(response, "logprobs", None)
                job.post(Text(response.text, response.finish_reason, response.token, logprobs))
        except GenerationError as e:  # raised before any token: the request stays a 400
            outcome.finish_reason = "error"
            job.post(Failed(APIError(400, str(e), e.param)))
        except Exception:
            healthy = False  # the cache may be half-written: drop it
            raise
        finally:
            stream.close()  # stream_generate's cleanup leaves the cache matching its tokens
            if healthy:
                self.caches.give_back(cache)
        if last is not None:
            fill_outcome(outcome, last)
        if not job.cancelled.is_set() and time.monotonic() > job.deadline:
            job.cancel(DeadlineError(job.timeout))
        if job.cancelled.is_set():
            outcome.finish_reason = "cancelled"
        elif last is not None:
            outcome.finish_reason = outcome.finish_reason or last.finish_reason
        outcome.seconds = time.perf_counter() - job.created
        self._record(outcome)
        job.post(Failed(job.abort) if job.abort is not None else Done(outcome))

    def _record(self, outcome: Outcome) -> None:
        self.recent.append(outcome)
        self.finished += 1
        log.info(outcome.log_line())


def fill_outcome(outcome: Outcome, last) -> None:
    """The outcome's figures from the last response (a scripted generation may bring no
    stats)."""
    stats = last.stats
    outcome.completion_tokens = last.generation_tokens
    if stats is None:
        return
    outcome.prefilled_tokens = stats.prompt_tokens
    outcome.decode_tps = stats.decode_tps
    outcome.prefill_tps = stats.prefill_tps
    outcome.tokens_per_step = stats.tokens_per_step
    outcome.steps = stats.steps
    outcome.accepted_from = {k: int(v) for k, v in stats.accepted_from.items()}
