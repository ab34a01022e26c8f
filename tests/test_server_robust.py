"""The server under arbitrary and sustained input: property-based bad requests (hypothesis),
each answered with a 4xx JSON error while the server stays healthy, and a soak of a few
hundred mixed requests (both APIs, streamed and not, several keys) with bounded memory."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import httpx
import pytest
from helpers import write_tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_helpers import running, user

from mlx_redrafter.loading import load
from mlx_redrafter.server import DoorSettings, Engine

ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/messages"]
KEYS = ("soak-key-1", "soak-key-2")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = write_tiny_model(tmp_path_factory.mktemp("robust") / "tiny", context_length=512)
    model, tokenizer = load(model_dir)
    engine = Engine(model, tokenizer, None, model_name="tiny", max_queue=8)
    with running(engine, DoorSettings(api_keys=KEYS, max_body_bytes=256 << 10)) as url:
        with httpx.Client(base_url=url, timeout=60) as http:
            yield http, engine


def _post(http, path, content: bytes, key=KEYS[0]):
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    return http.post(path, content=content, headers=headers)


def _assert_client_error(resp) -> None:
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:300])
    body = resp.json()
    message = body["error"]["message"]
    assert isinstance(message, str) and message
    assert "Traceback" not in resp.text


def _assert_healthy(http) -> None:
    assert http.get("/health").json()["status"] == "ok"


# Text that no lax conversion turns into a number or a boolean.
words = st.text(alphabet="qwzQWZ!?", min_size=1, max_size=8)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
# Values each field refuses (beside whatever else the request carries).
BAD_FIELDS = {
    "messages": st.one_of(
        st.integers(),
        st.text(),
        st.just([]),
        st.lists(st.integers(), min_size=1, max_size=3),
        st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["robot", "", "root"]), "content": st.text(max_size=10)}
            ),
            min_size=1,
        ),
        st.lists(
            st.fixed_dictionaries(
                {"role": st.just("user"), "content": st.integers() | st.booleans()}
            ),
            min_size=1,
        ),
    ),
    "max_tokens": st.integers(max_value=0) | words | st.integers(min_value=10**6),
    "temperature": st.floats(min_value=2.01, max_value=1e300) | st.floats(max_value=-0.01) | words,
    "top_p": st.floats(max_value=0.0) | st.floats(min_value=1.01, max_value=1e9),
    "stream": words | st.integers(min_value=2) | st.lists(st.booleans(), min_size=1),
    "stop": st.integers()
    | st.lists(st.integers(), min_size=1)
    | st.lists(st.text(max_size=3), min_size=17, max_size=20),
    "model": st.text(min_size=1, max_size=20).filter(lambda s: s != "tiny"),
    "seed": st.integers(max_value=-1) | words,
}


@st.composite
def bad_requests(draw):
    route = draw(st.sampled_from(ROUTES))
    body = {"messages": user("hi"), "max_tokens": 2}
    if route == "/v1/completions":
        body = {"prompt": "hi", "max_tokens": 2}
    extra = draw(
        st.dictionaries(
            st.text(min_size=1, max_size=6).map(lambda s: "x_" + s), json_values, max_size=3
        )
    )
    body.update(extra)  # unknown fields are ignored, whatever they hold
    name = draw(st.sampled_from(sorted(BAD_FIELDS)))
    if route == "/v1/completions" and name == "messages":
        name, value = "prompt", draw(st.just("") | st.integers() | st.just([[1], [2]]))
    elif route == "/v1/messages" and name == "seed":  # no seed there
        name, value = "top_k", draw(st.integers(max_value=-1) | words)
    elif route == "/v1/messages" and name == "stop":
        name, value = "stop_sequences", draw(BAD_FIELDS["stop"])
    else:
        value = draw(BAD_FIELDS[name])
    if route == "/v1/messages" and name == "temperature":
        value = draw(st.floats(min_value=1.01, max_value=1e9) | words)
    body[name] = value
    return route, body


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=bad_requests())
def test_bad_requests_are_4xx_json_and_the_server_stays_healthy(served, case):
    http, _ = served
    route, body = case
    _assert_client_error(_post(http, route, json.dumps(body).encode()))
    _assert_healthy(http)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=st.binary(max_size=300) | st.text(max_size=200).map(str.encode),
    route=st.sampled_from(ROUTES),
)
def test_arbitrary_bytes_are_4xx_json(served, raw, route):
    http, _ = served
    _assert_client_error(_post(http, route, raw))
    _assert_healthy(http)


def _rss_mb() -> float:
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _one(http, i: int) -> None:
    key = KEYS[i % 2]
    stream = i % 3 == 0
    text = f"Tell me a story number {i % 17}"
    if i % 4 == 0:
        body = {"prompt": text, "max_tokens": 3, "stream": stream}
        path = "/v1/completions"
    elif i % 4 == 1:
        body = {"messages": user(text), "max_tokens": 3, "stream": stream}
        path = "/v1/messages"
    else:
        body = {"messages": user(text), "max_tokens": 3, "stream": stream}
        path = "/v1/chat/completions"
    resp = _post(http, path, json.dumps(body).encode(), key)
    assert resp.status_code == 200, resp.text
    if stream:
        assert resp.text.rstrip().endswith("[DONE]") or "message_stop" in resp.text


def test_soak_of_300_requests_keeps_memory_bounded(served):
    http, engine = served
    for i in range(60):  # warm up: caches fill, allocator settles
        _one(http, i)
    before = _rss_mb()
    done = engine.finished
    for i in range(60, 300):
        _one(http, i)
        if i % 40 == 0:
            _post(http, "/v1/chat/completions", b"{broken")  # errors mixed in
    after = _rss_mb()
    assert engine.finished - done == 240
    assert len(engine.caches.entries) <= engine.caches.max_entries
    assert after - before < 64, f"RSS grew {after - before:.0f} MB over 240 requests"
    _assert_healthy(http)
