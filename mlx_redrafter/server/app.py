"""The application and its server: routes of both APIs behind the door, errors as JSON (never
exception text; each logged once), and a uvicorn server whose shutdown first ends every open
stream with an error event and answers every queued request with 503.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import socket
import threading
from collections.abc import Callable

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .anthropic_api import AnthropicRoutes
from .door import Door, DoorSettings, TimedH11Protocol, error_body
from .engine import Engine
from .flow import Gateway
from .openai_api import OpenAIRoutes
from .protocol import APIError, Limits

log = logging.getLogger("mlx_redrafter.server")


def _guarded(endpoint):
    """The endpoint with every error answered as JSON in its API's format: APIError as it
    is (4xx logged as one line), anything else as a bare 500 with its traceback logged once
    (Starlette's own handler would log it a second time and re-raise it)."""

    async def call(request: Request) -> Response:
        try:
            return await endpoint(request)
        except APIError as e:
            return _error(request, e)
        except Exception:
            log.exception(f"{request.method} {request.url.path} failed")
            return _error(request, APIError(500, "internal error; see the server's log"))

    return call


def _error(request: Request, error: APIError) -> Response:
    if error.status < 500:
        log.info(f"{request.method} {request.url.path} · {error.status} · {error.message}")
    return JSONResponse(error_body(request.url.path, error), status_code=error.status)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    error = APIError(exc.status_code, str(exc.detail), kind=kind)
    return JSONResponse(error_body(request.url.path, error), status_code=exc.status_code)


class Info:
    def __init__(self, engine: Engine):
        self.engine = engine

    async def health(self, request: Request) -> Response:
        e = self.engine
        return JSONResponse(
            {
                "status": "stopping" if e.closing else "ok",
                "model": e.model_name,
                "drafter": e.drafter_name,
                "busy": e.busy,
                "waiting": e.waiting,
            }
        )

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._card()]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.engine.aliases:
            raise APIError(404, f"model {name!r} is not served here", "model", "not_found_error")
        return JSONResponse(self._card())

    def _card(self) -> dict:
        return {
            "id": self.engine.model_name,
            "object": "model",
            "created": self.engine.started,
            "owned_by": "mlx-redrafter",
        }


def create_app(
    engine: Engine,
    door: DoorSettings | None = None,
    limits: Limits | None = None,
    bound_host: str | None = None,
):
    """The ASGI application behind its door; starting it starts the engine, stopping it
    stops the engine (the worker is parked, not ended)."""
    door = door or DoorSettings()
    # The door's body limit is the one limit (checked on Content-Length, then while reading).
    limits = dataclasses.replace(limits or Limits(), max_body_bytes=door.max_body_bytes)
    gateway = Gateway(engine, limits)
    info, openai, anthropic = Info(engine), OpenAIRoutes(gateway), AnthropicRoutes(gateway)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        gateway.pool.submit(gateway.formats.warm)  # the JSON grammar compiler, in the background
        try:
            yield
        finally:
            engine.stop()
            gateway.close()

    routes = [
        Route("/health", _guarded(info.health), methods=["GET"]),
        Route("/v1/models", _guarded(info.models), methods=["GET"]),
        Route("/v1/models/{name:path}", _guarded(info.model), methods=["GET"]),
        Route("/v1/chat/completions", _guarded(openai.chat), methods=["POST"]),
        Route("/v1/completions", _guarded(openai.completions), methods=["POST"]),
        Route("/v1/messages", _guarded(anthropic.messages), methods=["POST"]),
        Route("/v1/messages/count_tokens", _guarded(anthropic.count_tokens), methods=["POST"]),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_error}
    )
    return Door(app, door, bound_host)


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


class Server(uvicorn.Server):
    """uvicorn's server, whose shutdown first ends the engine's work: open streams get an
    error event and their end, queued requests a 503, before connections are drained. The
    signal that stopped it is kept in `stopped_by` rather than raised again once it is done
    (uvicorn re-raises it inside the event loop, where asyncio turns a SIGINT into an exit
    status of 0 or 130 by timing)."""

    def __init__(self, config: uvicorn.Config, engine: Engine):
        super().__init__(config)
        self.engine = engine
        self.stopped_by: int | None = None

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach the main thread only
            return
        previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def handle_exit(self, sig: int, frame) -> None:
        self.stopped_by = self.stopped_by or sig
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        self.engine.begin_shutdown()
        await super().shutdown(sockets=sockets)


def make_server(
    engine: Engine,
    door: DoorSettings | None = None,
    limits: Limits | None = None,
    bound_host: str | None = None,
    log_level: str = "warning",
) -> Server:
    """A uvicorn server for the engine's application (run it with `.run(sockets=[sock])`)."""
    door = door or DoorSettings()
    protocol = type("Protocol", (TimedH11Protocol,), {"header_timeout": door.header_timeout})
    config = uvicorn.Config(
        create_app(engine, door, limits, bound_host),
        http=protocol,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=3,
        timeout_keep_alive=max(int(door.idle_timeout), 1),
        limit_concurrency=1024,
        lifespan="on",
    )
    return Server(config, engine)


def serve(
    engine: Engine,
    sock: socket.socket,
    door: DoorSettings | None = None,
    limits: Limits | None = None,
    on_ready: Callable[[], None] | None = None,
) -> int | None:
    """Serve on `sock` until interrupted (Ctrl-C, SIGTERM); the signal that stopped it."""
    host = sock.getsockname()[0]
    server = make_server(engine, door, limits, bound_host=host)
    if on_ready is not None:
        original = server.startup

        async def startup(sockets=None):
            await original(sockets=sockets)
            on_ready()

        server.startup = startup
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop(timeout=60)  # the model idle before the interpreter exits
    return server.stopped_by
