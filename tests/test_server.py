"""The OpenAI-compatible server over real HTTP on 127.0.0.1, driven by the official `openai`
client: answers equal plain greedy decoding, streaming, completions, stop strings, seeds, the
prompt cache, 400/503 JSON errors, 32 concurrent streams, and disconnects freeing the model.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from helpers import REPO_ROOT, cli_env, write_tiny_drafter, write_tiny_model
from server_helpers import client, running, user

from mlx_redrafter.cache import KVCache
from mlx_redrafter.drafter import load_drafter
from mlx_redrafter.errors import GenerationError
from mlx_redrafter.generation import stream_generate
from mlx_redrafter.loading import load
from mlx_redrafter.server import Engine, PromptCaches

TINY_CONTEXT = 512
PROMPTS = [
    "hello world",
    "Tell me a story",
    "Write a short poem about the sea.",
    "What is 12 + 30?",
]


def plain_tokens(model, tokenizer, ids, max_tokens, stop=()) -> list[int]:
    """Plain greedy decoding on a fresh cache: what every greedy answer must equal."""
    return [
        r.token
        for r in stream_generate(
            model, tokenizer, ids, None, max_tokens=max_tokens, lookup=False, stop=stop
        )
    ]


def plain_text(model, tokenizer, ids, max_tokens, stop=()) -> str:
    return "".join(
        r.text
        for r in stream_generate(
            model, tokenizer, ids, None, max_tokens=max_tokens, lookup=False, stop=stop
        )
    )


def chat_prompt(tokenizer, messages) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def common_prefix(a, b) -> int:
    cache = KVCache(0)
    cache.tokens = list(a)
    return cache.common_prefix(b)


# ---------------------------------------------------------------------------------------------
# A tiny random model with a random drafter (ReDrafter and lookup on, as by default)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    model_dir = write_tiny_model(root / "tiny", context_length=TINY_CONTEXT)
    drafter_dir = write_tiny_drafter(model_dir, root / "drafter")
    model, tokenizer = load(model_dir)
    return model_dir, model, tokenizer, load_drafter(drafter_dir, base=model)


@pytest.fixture(scope="module")
def tiny_engine(tiny):
    model_dir, model, tokenizer, drafter = tiny
    return Engine(model, tokenizer, drafter, model_name="tiny", aliases=(str(model_dir),))


@pytest.fixture(scope="module")
def url(tiny_engine):
    with running(tiny_engine) as base:
        yield base


def test_models_and_health(url):
    models = client(url).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    health = httpx.get(f"{url}/health", timeout=10)
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["model"] == "tiny"
    missing = httpx.get(f"{url}/v1/nothing", timeout=10)
    assert missing.status_code == 404 and "error" in missing.json()


def test_chat_completion_equals_plain_greedy_decoding(url, tiny):
    _, model, tokenizer, _ = tiny
    ids = chat_prompt(tokenizer, user(PROMPTS[0]))
    expected = plain_tokens(model, tokenizer, ids, 24)
    resp = client(url).chat.completions.create(
        model="tiny", messages=user(PROMPTS[0]), max_tokens=24
    )
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == plain_text(model, tokenizer, ids, 24)
    assert choice.finish_reason == ("stop" if len(expected) < 24 else "length")
    assert resp.usage.prompt_tokens == len(ids)
    assert resp.usage.completion_tokens == len(expected)
    assert resp.usage.total_tokens == len(ids) + len(expected)
    extra = resp.model_extra["redrafter"]
    assert extra["tokens_per_step"] >= 1.0 and extra["steps"] >= 1
    assert isinstance(extra["accepted_from"], dict)


def test_streaming_chunks_concatenate_to_the_non_streamed_text(url):
    api = client(url)
    whole = api.chat.completions.create(messages=user(PROMPTS[1]), max_tokens=20, model="tiny")
    chunks = list(
        api.chat.completions.create(
            messages=user(PROMPTS[1]),
            max_tokens=20,
            model="tiny",
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([piece for piece in content if piece]) >= 2  # really streamed
    assert "".join(content) == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == (
        whole.usage.completion_tokens
    )


def test_completions_plain_and_streamed(url, tiny):
    _, model, tokenizer, _ = tiny
    api = client(url)
    expected = plain_text(model, tokenizer, tokenizer.encode("the quick brown"), 12)
    resp = api.completions.create(model="tiny", prompt="the quick brown", max_tokens=12)
    assert resp.object == "text_completion"
    assert resp.choices[0].text == expected
    assert resp.usage.prompt_tokens == len(tokenizer.encode("the quick brown"))
    streamed = api.completions.create(
        model="tiny", prompt="the quick brown", max_tokens=12, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected
    default_length = api.completions.create(model="tiny", prompt=[5, 6, 7, 8])
    assert default_length.usage.completion_tokens <= 16  # OpenAI's default max_tokens


def test_stop_strings(url, tiny):
    _, model, tokenizer, _ = tiny
    ids = chat_prompt(tokenizer, user(PROMPTS[2]))
    full = plain_text(model, tokenizer, ids, 32)
    assert len(full) > 8
    stop = full[5:7]
    resp = client(url).chat.completions.create(
        model="tiny", messages=user(PROMPTS[2]), max_tokens=32, stop=[stop, "\x00never"]
    )
    assert resp.choices[0].message.content == full[: full.find(stop)]
    assert resp.choices[0].finish_reason == "stop"


def test_seed_reproducibility(url):
    api = client(url)

    def sample(seed: int) -> str:
        resp = api.chat.completions.create(
            model="tiny", messages=user(PROMPTS[3]), max_tokens=16, temperature=1.0, seed=seed
        )
        return resp.choices[0].message.content

    first = sample(7)
    assert sample(7) == first
    others = {sample(s) for s in (8, 9, 10)}
    assert others - {first}, "temperature 1.0 gave the same text for four seeds"


def test_second_turn_prefills_only_the_new_tokens(url, tiny):
    _, model, tokenizer, _ = tiny
    api = client(url)
    turn1 = user("Compose an engaging travel blog post about Hawaii.")
    ids1 = chat_prompt(tokenizer, turn1)
    generated = plain_tokens(model, tokenizer, ids1, 10)
    r1 = api.chat.completions.create(model="tiny", messages=turn1, max_tokens=10)
    answer = r1.choices[0].message.content
    turn2 = turn1 + [{"role": "assistant", "content": answer}] + user("And in one line?")
    ids2 = chat_prompt(tokenizer, turn2)
    r2 = api.chat.completions.create(model="tiny", messages=turn2, max_tokens=6)
    # The cache kept the first prompt and every answer token but the last (never fed back).
    held = ids1 + generated[:-1]
    reused = min(common_prefix(held, ids2), len(ids2) - 1)
    assert reused >= len(ids1)
    assert r2.usage.prompt_tokens == len(ids2)
    assert r2.usage.prompt_tokens_details.cached_tokens == reused
    assert r2.model_extra["redrafter"]["prefilled_tokens"] == len(ids2) - reused
    # And the answer is what a fresh run on the whole conversation gives.
    fresh = plain_tokens(model, tokenizer, ids2, 6)
    assert r2.usage.completion_tokens == len(fresh)


def test_prompt_caches_lend_the_longest_prefix_and_stay_bounded(tiny):
    _, model, _, _ = tiny
    caches = PromptCaches(model, max_entries=2)

    def filled(tokens):
        cache = caches.take(tokens)
        list(stream_generate(model, tiny[2], tokens, None, max_tokens=1, cache=cache))
        caches.give_back(cache)
        return cache

    a = filled([5, 6, 7, 8, 9])
    b = filled([20, 21, 22])
    assert caches.take([5, 6, 7, 30]) is a  # longest common prefix
    caches.give_back(a)
    c = filled([40, 41])  # nothing shared and no room: replaces the least recent (b)
    assert c is b and caches.entries == [a, c]
    assert caches.take([5, 6, 99]) is a
    caches.give_back(a)
    caches.max_bytes = 1  # over the byte bound only the most recent is kept
    caches.give_back(caches.take([77]))
    assert len(caches.entries) == 1


BAD_REQUESTS = [
    ("/v1/chat/completions", b'{"messages": [', None),
    ("/v1/chat/completions", b'["not", "an", "object"]', None),
    ("/v1/chat/completions", {"messages": user("hi"), "model": "gpt-4o"}, "model"),
    ("/v1/chat/completions", {"messages": user("hi"), "max_tokens": -3}, "max_tokens"),
    ("/v1/chat/completions", {"messages": user("hi"), "temperature": 2.5}, "temperature"),
    ("/v1/chat/completions", {"messages": user("hi"), "top_p": 0}, "top_p"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": user("hi"), "stream": "sometimes"}, "stream"),
    ("/v1/chat/completions", {"messages": user("hi"), "n": 2}, "n"),
    ("/v1/chat/completions", {"messages": user("hi"), "seed": -1}, "seed"),
    ("/v1/chat/completions", {"messages": user("the " * 2000)}, "messages"),
    ("/v1/chat/completions", {"messages": user("hi"), "max_tokens": TINY_CONTEXT}, "max_tokens"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": [1, 10**9]}, "prompt"),
    ("/v1/completions", {"prompt": "the " * 2000, "stream": True}, "prompt"),
]


def test_a_generation_error_maps_to_its_param_not_its_message(tiny):
    # The engine reports the field a GenerationError names (its `param`), whatever its text.
    _, model, tokenizer, _ = tiny

    def refuse(model, tokenizer, ids, drafter=None, **options):
        raise GenerationError("a message that names no field", param="top_k")
        yield  # a generator, as stream_generate is

    engine = Engine(model, tokenizer, None, model_name="tiny", generate=refuse)
    with running(engine) as base:
        resp = httpx.post(f"{base}/v1/chat/completions", json={"messages": user("hi")}, timeout=30)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "top_k" and error["message"] == "a message that names no field"


@pytest.mark.parametrize("path, body, param", BAD_REQUESTS)
def test_bad_request_gets_400_json_and_the_next_request_succeeds(url, path, body, param):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = httpx.post(
        f"{url}{path}", content=raw, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert resp.status_code == 400, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    if param == "messages" and "the " in raw.decode():
        assert str(TINY_CONTEXT) in error["message"]  # names the limit
    good = client(url).chat.completions.create(model="tiny", messages=user("hi"), max_tokens=2)
    assert good.choices[0].finish_reason in ("stop", "length")


def test_openai_client_raises_bad_request(url):
    with pytest.raises(openai.BadRequestError) as info:
        client(url).chat.completions.create(model="tiny", messages=user("hi"), temperature=9)
    assert info.value.status_code == 400 and "temperature" in str(info.value)


def test_32_concurrent_streaming_clients_all_finish_correctly(url, tiny):
    _, model, tokenizer, _ = tiny
    expected = {
        p: plain_text(model, tokenizer, chat_prompt(tokenizer, user(p)), 8) for p in PROMPTS
    }

    async def one(api, prompt):
        stream = await api.chat.completions.create(
            model="tiny", messages=user(prompt), max_tokens=8, stream=True
        )
        pieces, finish = [], None
        async for chunk in stream:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        return prompt, "".join(pieces), finish

    async def main():
        api = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        try:
            jobs = [one(api, PROMPTS[i % len(PROMPTS)]) for i in range(32)]
            return await asyncio.wait_for(asyncio.gather(*jobs), timeout=180)
        finally:
            await api.close()

    results = asyncio.run(main())
    assert len(results) == 32
    for prompt, text, finish in results:
        assert text == expected[prompt]
        assert finish in ("stop", "length")


def _post_in_thread(url: str, body: dict, results: list) -> threading.Thread:
    def post():
        try:
            with httpx.Client(timeout=60) as http:
                results.append(http.post(f"{url}/v1/chat/completions", json=body))
        except httpx.HTTPError as e:
            results.append(e)

    thread = threading.Thread(target=post, daemon=True)
    thread.start()
    return thread


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_full_queue_gets_503_and_the_queued_requests_finish(url, tiny_engine):
    results: list = []
    saved = tiny_engine.max_queue
    tiny_engine.max_queue = 2
    try:
        with tiny_engine.paused():
            threads = [
                _post_in_thread(url, {"messages": user(p), "max_tokens": 4, "stream": s}, results)
                for p, s in ((PROMPTS[0], False), (PROMPTS[1], True))
            ]
            _wait_for(lambda: tiny_engine.waiting == 2, 20, "two queued requests")
            with pytest.raises(openai.APIStatusError) as info:
                client(url).chat.completions.create(
                    model="tiny", messages=user("one more"), max_tokens=2
                )
            assert info.value.status_code == 503
            assert "busy" in info.value.body["message"]
            raw = httpx.post(
                f"{url}/v1/completions", json={"prompt": "x", "stream": True}, timeout=10
            )
            assert raw.status_code == 503 and raw.json()["error"]["type"] == "server_busy"
    finally:
        tiny_engine.max_queue = saved
    for thread in threads:
        thread.join(60)
    assert [r.status_code for r in results] == [200, 200]
    assert any(r.text.rstrip().endswith("data: [DONE]") for r in results)


def test_disconnect_mid_stream_frees_the_model(url, tiny_engine):
    done = tiny_engine.finished
    api = client(url)
    stream = api.chat.completions.create(
        model="tiny", messages=user(PROMPTS[2]), max_tokens=400, stream=True
    )
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received == 3:
            break
    stream.close()
    _wait_for(lambda: tiny_engine.finished > done, 20, "the cancelled generation to end")
    outcome = tiny_engine.recent[-1]
    assert outcome.finish_reason == "cancelled"
    assert 3 <= outcome.completion_tokens < 400
    t0 = time.monotonic()
    after = api.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=4)
    assert after.choices[0].finish_reason in ("stop", "length")
    assert time.monotonic() - t0 < 10


def test_disconnect_while_queued_cancels_before_it_runs(url, tiny_engine):
    done = tiny_engine.finished
    with tiny_engine.paused():
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{url}/v1/chat/completions",
                json={"messages": user(PROMPTS[0]), "max_tokens": 50},
                timeout=httpx.Timeout(10, read=0.5),
            )
        # The server notices the closed connection while the request waits in the queue.
        time.sleep(1.0)
    _wait_for(lambda: tiny_engine.finished > done, 20, "the queued request to be dropped")
    outcome = tiny_engine.recent[-1]
    assert outcome.finish_reason == "cancelled" and outcome.completion_tokens == 0


def test_serve_command_startup_line_and_request_log(tiny, tmp_path):
    model_dir = tiny[0]
    env = cli_env(tmp_path / "config")
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "cli.py"), "serve", "-m", str(model_dir), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO_ROOT,
    )
    try:
        line = _read_line(proc.stdout, 120)
        assert line.startswith("mlx-redrafter serve: http://127.0.0.1:"), line
        assert "model tiny" in line and ("cpu" in line or "gpu" in line)
        base = line.split()[2].removesuffix("/v1")
        resp = client(base).chat.completions.create(model="tiny", messages=user("hi"), max_tokens=3)
        assert resp.usage.completion_tokens >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert "tokens/step" in err and "tok/s" in err  # the per-request log line
    assert "Traceback" not in err


def test_serve_command_refuses_a_busy_port_in_one_line():
    from helpers import invoke

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = invoke(["serve", "--port", str(port)])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


def _read_line(stream, seconds: float) -> str:
    """One line from a pipe within `seconds` (the server keeps running after it)."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(seconds)
    assert lines and lines[0], "no start-up line"
    return lines[0].rstrip("\n")


# ---------------------------------------------------------------------------------------------
# The real default model with its shipped drafter


@pytest.fixture(scope="module")
def real(default_model_dir):
    from mlx_redrafter.defaults import default_drafter_dir

    model, tokenizer = load(default_model_dir)
    drafter_dir = default_drafter_dir()
    drafter = load_drafter(drafter_dir, base=model) if drafter_dir.exists() else None
    engine = Engine(model, tokenizer, drafter, model_name=default_model_dir.name)
    with running(engine) as base:
        yield base, model, tokenizer, engine


@pytest.mark.slow
def test_default_model_chat_equals_plain_decoding_and_streams_the_same(real):
    base, model, tokenizer, _ = real
    api = client(base, timeout=300)
    messages = user("What is the capital of France? Answer in one sentence.")
    expected = plain_text(model, tokenizer, chat_prompt(tokenizer, messages), 40)
    whole = api.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=messages, max_tokens=40
    )
    assert whole.choices[0].message.content == expected
    streamed = api.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=messages, max_tokens=40, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected
    assert "Paris" in expected


@pytest.mark.slow
def test_default_model_completion_stop_and_seed(real):
    base, model, tokenizer, _ = real
    api = client(base, timeout=300)
    prompt = "The three primary colors are"
    expected = plain_text(model, tokenizer, tokenizer.encode(prompt), 24)
    resp = api.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=24)
    assert resp.choices[0].text == expected
    words = expected.split()
    stop = " " + words[len(words) // 2]
    cut = api.completions.create(
        model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=24, stop=stop
    )
    assert cut.choices[0].text == expected[: expected.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    sampled = [
        api.completions.create(
            model="SmolLM2-135M-Instruct",
            prompt=prompt,
            max_tokens=12,
            temperature=0.9,
            seed=seed,
        )
        .choices[0]
        .text
        for seed in (3, 3)
    ]
    assert sampled[0] == sampled[1]


@pytest.mark.slow
def test_default_model_second_turn_prefills_only_the_new_turn(real):
    base, model, tokenizer, _ = real
    api = client(base, timeout=300)
    turn1 = user("Name a fruit that is yellow.")
    r1 = api.chat.completions.create(model="SmolLM2-135M-Instruct", messages=turn1, max_tokens=24)
    answer = r1.choices[0].message.content
    ids1 = chat_prompt(tokenizer, turn1)
    turn2 = turn1 + [{"role": "assistant", "content": answer}] + user("And a red one?")
    ids2 = chat_prompt(tokenizer, turn2)
    # The new part of the conversation: the end of the answer's turn and the next user turn.
    new_part = len(ids2) - len(ids1) - len(tokenizer.encode(answer, add_special_tokens=False))
    r2 = api.chat.completions.create(model="SmolLM2-135M-Instruct", messages=turn2, max_tokens=8)
    prefilled = r2.model_extra["redrafter"]["prefilled_tokens"]
    # At most one more: the answer's last token when it stopped at max_tokens (never fed back).
    assert new_part <= prefilled <= new_part + 1, (prefilled, new_part)
    assert r2.usage.prompt_tokens_details.cached_tokens == len(ids2) - prefilled
