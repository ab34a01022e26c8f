"""The locked door, probed over real HTTP on 127.0.0.1 as an attacker would: API keys (both
header forms, constant-time check, /health open), DNS rebinding (foreign Host), cross-site
requests (foreign Origin, non-JSON content types, CORS), body limits before reading, JSON
that breaks parsers, per-client prompt caches, deadlines and connection timeouts. Each
refusal is JSON with the right status, comes before any model work, and the server keeps
serving.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import anthropic
import httpx
import openai
import pytest
from helpers import write_tiny_model
from server_helpers import client, running, user

from mlx_redrafter.loading import load
from mlx_redrafter.server import DoorSettings, Engine, Limits

KEYS = ("key-alpha-123", "key-beta-456")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_dir = write_tiny_model(tmp_path_factory.mktemp("door") / "tiny", context_length=512)
    model, tokenizer = load(model_dir)
    return model, tokenizer


@pytest.fixture(scope="module")
def engine(tiny):
    model, tokenizer = tiny
    return Engine(model, tokenizer, None, model_name="tiny")


@pytest.fixture(scope="module")
def url(engine):
    door = DoorSettings(
        api_keys=KEYS,
        allowed_hosts=("models.internal",),
        allowed_origins=("https://app.example",),
        max_body_bytes=64 << 10,
        header_timeout=1.0,
        idle_timeout=1.0,
    )
    with running(engine, door, Limits(request_timeout=20)) as base:
        yield base


def post(url, path="/v1/chat/completions", body=None, key=KEYS[0], headers=None, raw=None):
    sent = {"Content-Type": "application/json"}
    if key:
        sent["Authorization"] = f"Bearer {key}"
    sent.update(headers or {})
    content = (
        raw
        if raw is not None
        else json.dumps(body or {"messages": user("hi"), "max_tokens": 2}).encode()
    )
    return httpx.post(f"{url}{path}", content=content, headers=sent, timeout=30)


def assert_error(resp, status: int, words: str = "") -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    message = body["error"]["message"]
    assert words in message, message
    assert "Traceback" not in resp.text and "Error:" not in message


def assert_serving(url) -> None:
    good = post(url)
    assert good.status_code == 200, good.text
    assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"


# ---------------------------------------------------------------------------------------------
# The key


def test_a_request_without_the_key_is_refused_and_health_stays_open(url, engine):
    done = engine.finished
    assert_error(post(url, key=None), 401, "API key")
    assert_error(post(url, key="key-alpha-12"), 401)  # a prefix of a key
    assert_error(post(url, key="wrong"), 401)
    assert_error(post(url, "/v1/messages", key=None), 401)
    assert post(url, "/v1/messages", key=None).json()["type"] == "error"  # Anthropic's format
    assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
    assert engine.finished == done  # no model work
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    assert_serving(url)


def test_both_key_headers_and_both_clients_are_accepted(url):
    resp = post(url, key=None, headers={"x-api-key": KEYS[1]})
    assert resp.status_code == 200
    answer = client(url, key=KEYS[0]).chat.completions.create(
        model="tiny", messages=user("hi"), max_tokens=2
    )
    assert answer.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.AuthenticationError):
        client(url, key="nope").models.list()
    api = anthropic.Anthropic(base_url=url, api_key=KEYS[1], max_retries=0, timeout=30)
    message = api.messages.create(model="tiny", max_tokens=2, messages=user("hi"))
    assert message.role == "assistant"
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=url, api_key="nope", max_retries=0).messages.create(
            model="tiny", max_tokens=2, messages=user("hi")
        )


# ---------------------------------------------------------------------------------------------
# Hosts and origins


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8080", "localhost.evil"])
def test_a_foreign_host_is_refused(url, host, engine):
    done = engine.finished
    assert_error(post(url, headers={"Host": host}), 403, "host")
    assert engine.finished == done


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:1234", "127.0.0.1", "[::1]:80", "10.0.0.7", "models.internal"]
)
def test_local_names_addresses_and_allowed_hosts_are_answered(url, host):
    assert post(url, headers={"Host": host}).status_code == 200


def test_a_foreign_origin_is_refused_and_allowed_ones_get_cors(url, engine):
    done = engine.finished
    assert_error(post(url, headers={"Origin": "https://evil.example"}), 403, "origin")
    assert_error(post(url, headers={"Origin": "null"}), 403)
    assert engine.finished == done
    for origin in ("https://app.example", "http://localhost:3000"):
        resp = post(url, headers={"Origin": origin})
        assert resp.status_code == 200
        assert resp.headers["access-control-allow-origin"] == origin
    preflight = httpx.options(
        f"{url}/v1/chat/completions",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        timeout=10,
    )
    assert preflight.status_code == 204
    assert "authorization" in preflight.headers["access-control-allow-headers"]
    refused = httpx.options(
        f"{url}/v1/chat/completions", headers={"Origin": "https://evil.example"}, timeout=10
    )
    assert refused.status_code == 403


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""],
)
def test_posts_that_are_not_json_get_415(url, content_type, engine):
    done = engine.finished
    headers = {"Content-Type": content_type} if content_type else {}
    raw = json.dumps({"messages": user("hi"), "max_tokens": 2}).encode()
    resp = httpx.post(
        f"{url}/v1/chat/completions",
        content=raw,
        headers={"Authorization": f"Bearer {KEYS[0]}", **headers},
        timeout=10,
    )
    if not content_type:  # httpx sends none: still refused
        assert resp.status_code == 415
    else:
        assert_error(resp, 415, "application/json")
    assert engine.finished == done
    assert post(url, headers={"Content-Type": "application/json; charset=utf-8"}).status_code == 200


# ---------------------------------------------------------------------------------------------
# Sizes and malformed JSON


def _raw_request(url: str, head: str, body: bytes = b"", read: bool = True) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode() + body)
        if not read:
            return b""
        data = b""
        while b"\r\n\r\n" not in data or len(data) < 20:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_an_oversized_body_is_refused_before_it_is_read(url, engine):
    done = engine.finished
    # A 1 GB Content-Length with no body behind it: the answer comes without waiting for it.
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {KEYS[0]}\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000000000\r\n\r\n"
    )
    t0 = time.monotonic()
    answer = _raw_request(url, head)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    assert time.monotonic() - t0 < 5
    # A chunked body (no Content-Length) is cut off once it passes the limit.
    big = json.dumps({"messages": user("x" * (100 << 10))}).encode()
    resp = httpx.post(
        f"{url}/v1/chat/completions",
        content=iter([big[i : i + 8192] for i in range(0, len(big), 8192)]),
        headers={"Authorization": f"Bearer {KEYS[0]}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert_error(resp, 413, "larger than")
    assert engine.finished == done
    assert_serving(url)


@pytest.mark.parametrize(
    "raw, words",
    [
        (
            b'{"messages": [{"role": "user", "content": "hi"}], "x": '
            + b"[" * 10000
            + b"]" * 10000
            + b"}",
            "nest",
        ),
        (
            b'{"messages": [{"role": "user", "content": "hi"}], "x": '
            + b"[" * 200
            + b"]" * 200
            + b"}",
            "nest",
        ),
        (
            b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": '
            + b"7" * 5001
            + b"}",
            "JSON",
        ),
        (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "Unicode"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\udfff"]}', "Unicode"),
        (b"\xff\xfe{}", "JSON"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', ""),
    ],
)
def test_json_that_breaks_parsers_is_a_400(url, raw, words):
    resp = post(url, raw=raw)
    assert_error(resp, 400, words)
    assert_serving(url)


def test_per_request_limits(url):
    many = [{"role": "user", "content": "hi"}] * 513
    assert_error(post(url, body={"messages": many}), 400, "at most 512")
    stops = {"messages": user("hi"), "stop": [f"s{i}" for i in range(17)]}
    assert_error(post(url, body=stops), 400, "at most 16")
    tools = [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]
    assert_error(post(url, body={"messages": user("hi"), "tools": tools}), 400, "at most 128")


def test_a_prompt_too_long_is_refused_before_tokenising_while_health_answers(url, tiny):
    # ~60 KB of text (under the 64 KB body limit) for a 512-token context.
    body = {"messages": user("the quick brown fox " * 3000)}
    results = []
    thread = threading.Thread(target=lambda: results.append(post(url, body=body)))
    thread.start()
    healths = [httpx.get(f"{url}/health", timeout=2).status_code for _ in range(5)]
    thread.join(30)
    assert healths == [200] * 5
    assert_error(results[0], 400, "context length of 512")
    assert "bytes" in results[0].json()["error"]["message"]  # refused by size, not by tokens


# ---------------------------------------------------------------------------------------------
# Clients do not see each other


def test_prompt_caches_are_separate_per_key(url, tiny):
    tokenizer = tiny[1]
    secret = user("Zephyrine Labs makes travel blog posts about Hawaii.")
    other = user("Quentin writes poems about the sea.")
    ids = [tokenizer.apply_chat_template(m, add_generation_prompt=True) for m in (secret, other)]
    shared = next(i for i, (a, b) in enumerate(zip(*ids, strict=False)) if a != b)  # template
    alpha, beta = client(url, key=KEYS[0]), client(url, key=KEYS[1])
    beta.chat.completions.create(model="tiny", messages=other, max_tokens=3)
    alpha.chat.completions.create(model="tiny", messages=secret, max_tokens=3)
    # Beta's guess reuses only what beta itself sent before (the template's opening).
    guess = beta.chat.completions.create(model="tiny", messages=secret, max_tokens=3)
    assert guess.usage.prompt_tokens_details.cached_tokens <= shared
    again = alpha.chat.completions.create(model="tiny", messages=secret, max_tokens=3)
    assert again.usage.prompt_tokens_details.cached_tokens > shared


# ---------------------------------------------------------------------------------------------
# Time limits


def test_idle_and_slow_header_connections_are_closed(url):
    host, port = url.removeprefix("http://").split(":")
    idle = socket.create_connection((host, int(port)), timeout=10)
    slow = socket.create_connection((host, int(port)), timeout=10)
    t0 = time.monotonic()
    for byte in b"GET /health HTTP/1.1\r\nHo":  # one byte every 0.1 s, never finished
        try:
            slow.sendall(bytes([byte]))
        except OSError:
            break
        time.sleep(0.1)
    assert idle.recv(10) == b""  # closed by the server
    assert time.monotonic() - t0 < 5
    try:
        closed = slow.recv(10) == b""
    except ConnectionResetError:
        closed = True
    assert closed
    idle.close()
    slow.close()
    assert_serving(url)


def test_a_request_past_its_deadline_gets_504(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, None, model_name="tiny")
    with running(engine, limits=Limits(request_timeout=1.0)) as base:
        with engine.paused():
            resp = httpx.post(
                f"{base}/v1/chat/completions", json={"messages": user("hi")}, timeout=30
            )
        assert_error(resp, 504, "longer than")
        assert (
            httpx.post(
                f"{base}/v1/chat/completions",
                json={"messages": user("hi"), "max_tokens": 2},
                timeout=30,
            ).status_code
            == 200
        )


class _SlowTemplate:
    """The tokenizer with a chat template that takes 1.5 s (a huge prompt's templating)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def apply_chat_template(self, *args, **kwargs):
        time.sleep(1.5)
        return self._tokenizer.apply_chat_template(*args, **kwargs)


def test_templating_runs_off_the_event_loop(tiny):
    model, tokenizer = tiny
    engine = Engine(model, _SlowTemplate(tokenizer), None, model_name="tiny")
    with running(engine) as base:
        results = []
        body = {"messages": user("hi"), "max_tokens": 2}
        thread = threading.Thread(
            target=lambda: results.append(
                httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30)
            )
        )
        thread.start()
        time.sleep(0.2)
        for _ in range(5):
            t0 = time.monotonic()
            assert httpx.get(f"{base}/health", timeout=5).status_code == 200
            assert time.monotonic() - t0 < 0.5
        thread.join(30)
        assert results[0].status_code == 200
