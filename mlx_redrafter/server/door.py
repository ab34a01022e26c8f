"""The locked door: what every HTTP request passes before a route sees it, and the connection
timeouts. Each check answers a threat (docs/serving.md lists them):

- `Host` allow-list: DNS rebinding (a web page whose name resolves to 127.0.0.1);
- `Origin` allow-list, with CORS answered only for allowed origins: cross-site requests from
  pages the user has open;
- the API key (constant-time), on every route but /health: other local users and programs;
- `application/json` on POSTs (415): browsers send text/plain and form posts cross-site
  without a preflight;
- `Content-Length` over the limit (413) before the body is read: memory exhaustion;
- a header timeout per connection: idle and slow-header connections held open forever.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import APIError

log = logging.getLogger("mlx_redrafter.server")
OWNER = "mlx_redrafter.owner"  # the scope key naming the request's client (its key)
API_KEY_ENV = "MLX_REDRAFTER_API_KEY"
CORS_HEADERS = "authorization, content-type, x-api-key, anthropic-version, anthropic-beta"


@dataclass(frozen=True)
class DoorSettings:
    api_keys: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()  # beyond localhost names and IP literals; "*": any
    allowed_origins: tuple[str, ...] = ()  # beyond loopback origins; "*": any
    max_body_bytes: int = 4 << 20
    header_timeout: float = 10.0  # seconds to send a request's headers
    idle_timeout: float = 5.0  # seconds a kept-alive connection may sit idle


def error_body(path: str, error: APIError) -> dict:
    """An error in the format of the API the path belongs to."""
    if path.startswith("/v1/messages"):
        kind = {400: "invalid_request_error", 503: "overloaded_error", 504: "timeout_error"}
        return {
            "type": "error",
            "error": {"type": kind.get(error.status, error.kind), "message": error.message},
        }
    body = {"message": error.message, "type": error.kind, "param": error.param, "code": None}
    return {"error": body}


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _is_loopback(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "replace")).digest()


class Door:
    """ASGI middleware in front of the application."""

    def __init__(self, app, settings: DoorSettings, bound_host: str | None = None):
        self.app = app
        self.settings = settings
        self.hosts = {h.lower() for h in settings.allowed_hosts}
        if bound_host:
            self.hosts.add(bound_host.lower())
        self.origins = {o.rstrip("/").lower() for o in settings.allowed_origins}
        self.keys = [_digest(k) for k in settings.api_keys]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        origin = headers.get("origin")
        try:
            self._check_host(headers.get("host"))
            if origin is not None and not self._origin_allowed(origin):
                raise APIError(
                    403,
                    "this origin may not use the server (see --allowed-origins)",
                    kind="permission_error",
                )
            if scope["method"] == "OPTIONS" and origin is not None:
                await _preflight(send, origin)
                return
            if path != "/health":
                scope[OWNER] = self._owner(headers)
            if scope["method"] == "POST":
                self._check_body(headers)
        except APIError as error:
            log.info(f"{scope['method']} {path} · {error.status} · {error.message}")
            await _answer(send, error.status, error_body(path, error), origin)
            return
        await self.app(scope, receive, _with_cors(send, origin) if origin else send)

    def _check_host(self, host: str | None) -> None:
        if host is None or "*" in self.hosts:
            return
        name = _host_name(host)
        if _is_loopback(name) or _is_ip(name) or name in self.hosts:
            return
        raise APIError(
            403, f"host {name!r} is not served here (see --allowed-host)", kind="permission_error"
        )

    def _origin_allowed(self, origin: str) -> bool:
        origin = origin.rstrip("/").lower()
        if "*" in self.origins or origin in self.origins:
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and _is_loopback(parts.hostname or "")

    def _owner(self, headers: dict) -> str:
        """The index of the key the request carries ("" without keys); 401 without one."""
        if not self.keys:
            return ""
        given = headers.get("x-api-key")
        auth = headers.get("authorization", "")
        if given is None and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        digest = _digest(given or "")
        found = -1
        for i, key in enumerate(self.keys):  # every key compared, in constant time
            if hmac.compare_digest(digest, key) and given:
                found = i
        if found < 0:
            raise APIError(401, "a valid API key is required (Authorization: Bearer KEY)")
        return f"key{found}"

    def _check_body(self, headers: dict) -> None:
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise APIError(415, "requests must be sent as application/json")
        length = headers.get("content-length")
        limit = self.settings.max_body_bytes
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise APIError(413, f"the request body is larger than {limit} bytes")


async def _answer(send, status: int, body: dict, origin: str | None = None) -> None:
    payload = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def _preflight(send, origin: str) -> None:
    headers = [
        (b"access-control-allow-origin", origin.encode("latin-1")),
        (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
        (b"access-control-allow-headers", CORS_HEADERS.encode()),
        (b"access-control-max-age", b"600"),
        (b"vary", b"Origin"),
        (b"content-length", b"0"),
    ]
    await send({"type": "http.response.start", "status": 204, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


def _with_cors(send, origin: str):
    async def send_with_cors(message) -> None:
        if message["type"] == "http.response.start":
            extra = [
                (b"access-control-allow-origin", origin.encode("latin-1")),
                (b"vary", b"Origin"),
            ]
            message = {**message, "headers": list(message.get("headers", [])) + extra}
        await send(message)

    return send_with_cors


class TimedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a header timeout: a connection that has not sent a
    whole request head within `header_timeout` seconds of opening (or of its last response)
    is closed. uvicorn's own keep-alive timer is cancelled by any byte, so a client sending
    one byte at a time would otherwise hold a connection forever."""

    header_timeout = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._cycle_seen = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timeout)

    def _disarm(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.cycle is None or self.cycle.response_complete:  # no request under way
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and self.cycle is not self._cycle_seen:
            self._cycle_seen = self.cycle  # a new request's head arrived
            self._disarm()

    def on_response_complete(self) -> None:
        self._arm()  # before: the call below may start a pipelined request, which disarms
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)
