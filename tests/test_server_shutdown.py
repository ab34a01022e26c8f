"""Stopping `serve` (Ctrl-C or SIGTERM) while it works: every open stream ends with an error
event and `[DONE]`, queued requests get a JSON 503, and the process exits 130 (SIGINT) or 0
(SIGTERM) with no abort ("terminate called without an active exception" came from joining
the thread that had run MLX) and no traceback."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from helpers import REPO_ROOT, cli_env, write_tiny_model
from server_helpers import client, running, user

from mlx_redrafter.loading import load
from mlx_redrafter.server import Engine


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("shutdown") / "tiny", context_length=8192)


def _start(model_dir, tmp_path, *extra: str, env=None) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO_ROOT / "cli.py"),
            "serve",
            "-m",
            str(model_dir),
            "--port",
            "0",
            "--no-lookup",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**cli_env(tmp_path / "config"), **(env or {})},
        cwd=REPO_ROOT,
    )
    line = proc.stdout.readline()
    assert line.startswith("mlx-redrafter serve: http://127.0.0.1:"), line
    return proc, line.split()[2].removesuffix("/v1")


def _stop(proc: subprocess.Popen, sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"serve did not stop within 60 s of signal {sig}")
    return proc.returncode, err


def _stream_lines(base: str, lines: list, started: threading.Event) -> None:
    body = {"messages": user("Tell me a story"), "max_tokens": 8000, "stream": True}
    try:
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as resp:
            for line in resp.iter_lines():
                if line:
                    lines.append(line)
                if len(lines) >= 5:
                    started.set()
    except httpx.HTTPError as e:
        lines.append(f"client error: {e!r}")
    started.set()


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_stopping_while_streaming_ends_streams_and_answers_the_queue(
    model_dir, tmp_path, sig, code
):
    proc, base = _start(model_dir, tmp_path)
    try:
        lines: list[str] = []
        started = threading.Event()
        streamer = threading.Thread(target=_stream_lines, args=(base, lines, started))
        streamer.start()
        assert started.wait(60), "the stream did not start"
        queued: list = []
        waiters = [
            threading.Thread(
                target=lambda: queued.append(
                    httpx.post(
                        f"{base}/v1/chat/completions", json={"messages": user("hi")}, timeout=60
                    )
                )
            )
            for _ in range(2)
        ]
        for w in waiters:
            w.start()
        deadline = time.monotonic() + 20
        while httpx.get(f"{base}/health", timeout=5).json()["waiting"] < 2:
            assert time.monotonic() < deadline, "the requests did not queue"
            time.sleep(0.05)
    except BaseException:
        proc.kill()
        raise
    returncode, err = _stop(proc, sig)
    streamer.join(30)
    for w in waiters:
        w.join(30)
    assert returncode == code, err
    assert "terminate called" not in err and "Traceback" not in err, err
    assert lines[-1] == "data: [DONE]", lines[-3:]
    error = json.loads(lines[-2].removeprefix("data: "))
    assert "shutting down" in error["error"]["message"]
    assert [r.status_code for r in queued] == [503, 503]
    assert all("shutting down" in r.json()["error"]["message"] for r in queued)


def _serve_once_and_stop(model_dir, tmp_path, sig) -> tuple[int, str]:
    proc, base = _start(model_dir, tmp_path)
    try:
        resp = httpx.post(
            f"{base}/v1/completions", json={"prompt": "the", "max_tokens": 4}, timeout=60
        )
        assert resp.status_code == 200
    except BaseException:
        proc.kill()
        raise
    return _stop(proc, sig)


def _repeat(model_dir, tmp_path, tries: int) -> None:
    codes = []
    for i in range(tries):
        sig = signal.SIGINT if i % 2 == 0 else signal.SIGTERM
        code, err = _serve_once_and_stop(model_dir, tmp_path, sig)
        assert "terminate called" not in err and "Traceback" not in err, err
        codes.append(code)
    expected = [130 if i % 2 == 0 else 0 for i in range(tries)]  # SIGINT, SIGTERM, ...
    assert codes == expected


def test_stopping_after_a_request_exits_cleanly_every_time(model_dir, tmp_path):
    _repeat(model_dir, tmp_path, 4)


@pytest.mark.slow
def test_stopping_exits_cleanly_20_times_of_20(model_dir, tmp_path):
    _repeat(model_dir, tmp_path, 20)


def test_the_model_thread_is_parked_at_shutdown_not_joined(model_dir):

    model, tokenizer = load(model_dir)
    engine = Engine(model, tokenizer, None, model_name="tiny")
    with running(engine) as url:
        client(url).completions.create(model="tiny", prompt="the", max_tokens=2)
        thread = engine._thread
    # Joining a thread that ran MLX aborts the process at exit about half the time.
    assert thread.is_alive() and not engine.busy and engine.closing
    with running(engine) as url:  # and it serves again after a restart
        assert client(url).completions.create(model="tiny", prompt="the", max_tokens=2).choices
    assert engine._thread is thread


def test_the_serve_command_takes_keys_from_options_and_the_environment(model_dir, tmp_path):
    proc, base = _start(
        model_dir,
        tmp_path,
        "--api-key",
        "opt-key",
        "--allowed-origins",
        "https://a.example,https://b.example",
        env={"MLX_REDRAFTER_API_KEY": "env-1 env-2"},
    )
    try:
        body = {"prompt": "the", "max_tokens": 2}
        assert httpx.post(f"{base}/v1/completions", json=body, timeout=30).status_code == 401
        ok = {"Authorization": "Bearer opt-key", "Origin": "https://b.example"}
        assert (
            httpx.post(f"{base}/v1/completions", json=body, headers=ok, timeout=30).status_code
            == 200
        )
        # An option given on the command line replaces the environment's keys (click's rule).
        env_key = {"Authorization": "Bearer env-1"}
        assert (
            httpx.post(f"{base}/v1/completions", json=body, headers=env_key, timeout=30).status_code
            == 401
        )
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200
    finally:
        code, err = _stop(proc, signal.SIGTERM)
    assert code == 0, err
    proc, base = _start(model_dir, tmp_path, env={"MLX_REDRAFTER_API_KEY": "env-1 env-2"})
    try:
        env_key = {"Authorization": "Bearer env-2"}
        assert (
            httpx.post(
                f"{base}/v1/completions",
                json={"prompt": "the", "max_tokens": 2},
                headers=env_key,
                timeout=30,
            ).status_code
            == 200
        )
    finally:
        _stop(proc, signal.SIGTERM)
