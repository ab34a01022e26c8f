"""The CLI's info and generate: output fields, and bad input as one red line, never a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli_env, invoke, run_cli, write_tiny_drafter, write_tiny_model

from mlx_redrafter import __version__

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model_dir = write_tiny_model(root / "model")
    return model_dir, write_tiny_drafter(model_dir, root / "drafter")


def test_info_json_names_the_blas_and_default_model():
    proc = invoke(["info", "--json"])
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    for key in ("mlx", "device", "default_dtype", "blas", "default_model"):
        assert key in data
    if sys.platform.startswith("linux"):
        assert data["default_dtype"] == "float32"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS loader is Linux-only")
def test_blas_is_openblas_and_can_be_turned_off():
    from mlx_redrafter.blas import _find_openblas

    # Whatever the environment running the tests chose, the default is OpenBLAS if present.
    env = cli_env()
    env.pop("MLX_REDRAFTER_BLAS", None)
    proc = run_cli(["info", "--json"], env=env)
    blas = json.loads(proc.stdout)["blas"]
    if _find_openblas() is None:
        assert "bundled" in blas
    else:
        assert blas.startswith("OpenBLAS")
    env = dict(cli_env(), MLX_REDRAFTER_BLAS="bundled")
    proc = run_cli(["info", "--json"], env=env)
    assert "bundled" in json.loads(proc.stdout)["blas"]


@pytest.mark.parametrize("drafter", [False, True])
def test_generate_json_fields(tiny, drafter):
    model_dir, drafter_dir = tiny
    args = ["generate", "-m", str(model_dir), "-p", "Hello world", "-n", "12", "--json"]
    if drafter:
        args += ["-d", str(drafter_dir), "-W", "2", "-L", "3"]
    proc = invoke(args)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("text", "tokens", "num_tokens", "prompt_tokens", "prefill_tps", "decode_tps",
                "tokens_per_step", "peak_memory_gb", "device", "dtype"):  # fmt: skip
        assert key in out, key
    assert out["num_tokens"] == len(out["tokens"]) <= 12
    assert out["dtype"] == "float32"
    if drafter:
        assert out["tokens_per_step"] >= 1.0 and len(out["accept_by_depth"]) == 2
    else:
        assert out["tokens_per_step"] == 1.0


def test_generate_with_drafter_equals_plain(tiny):
    model_dir, drafter_dir = tiny
    base = ["generate", "-m", str(model_dir), "-p", "Tell me a story", "-n", "20", "--json"]
    plain = json.loads(invoke(base).stdout.strip().splitlines()[-1])
    spec = json.loads(invoke(base + ["-d", str(drafter_dir)]).stdout.strip().splitlines()[-1])
    assert spec["tokens"] == plain["tokens"]


def _one_red_line(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_a_closed_pipe_is_not_an_error(tmp_path):
    # What `mlx-redrafter info | head -1` meets once head has gone: no error line, exit 141.
    code = (
        "from mlx_redrafter.cli import common\n"
        "def closed():\n"
        "    raise BrokenPipeError(32, 'Broken pipe')\n"
        "try:\n"
        "    common.friendly_errors(closed)()\n"
        "except common.typer.Exit as exc:\n"  # what typer's app does with it
        "    raise SystemExit(exc.exit_code)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


def test_missing_model_path(tmp_path):
    missing = tmp_path / "nope"
    _one_red_line(run_cli(["generate", "-m", str(missing), "-p", "hi"]), str(missing))


def test_unsupported_model_type(tiny, tmp_path):
    import shutil

    model_dir, _ = tiny
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (bad / "config.json").write_text(json.dumps(cfg))
    _one_red_line(run_cli(["generate", "-m", str(bad), "-p", "hi"]), "gpt_neox", "config.json")


def test_truncated_safetensors(tiny, tmp_path):
    import shutil

    model_dir, _ = tiny
    bad = tmp_path / "trunc"
    shutil.copytree(model_dir, bad)
    weights = next(bad.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _one_red_line(run_cli(["generate", "-m", str(bad), "-p", "hi"]), weights.name)


def test_empty_prompt(tiny):
    model_dir, _ = tiny
    _one_red_line(run_cli(["generate", "-m", str(model_dir), "-p", "  "]), "empty")


def test_prompt_beyond_context_length(tiny):
    model_dir, _ = tiny
    cfg = json.loads((model_dir / "config.json").read_text())
    proc = run_cli(
        ["generate", "-m", str(model_dir), "-p", "hi", "-n", str(cfg["max_position_embeddings"])]
    )
    _one_red_line(proc, "context length")


def test_drafter_for_another_base(tiny, tmp_path):
    model_dir, _ = tiny
    other = write_tiny_model(tmp_path / "other", hidden=48)
    other_drafter = write_tiny_drafter(other, tmp_path / "other-drafter")
    proc = run_cli(["generate", "-m", str(model_dir), "-d", str(other_drafter), "-p", "hi"])
    _one_red_line(proc, "hidden_size")


def test_info_matmul_times_each_blas():
    proc = invoke(["info", "--json", "--matmul"])
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    times = {k: v for k, v in data.items() if k.startswith("matmul_1024_ms")}
    assert "matmul_1024_ms (bundled)" in times and len(times) == 2
    assert all(v > 0 for v in times.values())


def test_train_bad_prompt_files(tiny, tmp_path):
    model_dir, _ = tiny
    missing = tmp_path / "missing.json"
    base = ["train", "-m", str(model_dir), "-o", str(tmp_path / "out")]
    _one_red_line(run_cli([*base, "--prompts", str(missing)]), "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    _one_red_line(run_cli([*base, "--prompts", str(bad)]), "bad.json")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# A newcomer's first hour: notes and warnings, help, --version, usage errors


def _without_template(model_dir: Path, dst: Path) -> Path:
    shutil.copytree(model_dir, dst)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


def test_a_model_without_a_chat_template_warns_once(tiny, tmp_path):
    model_dir = _without_template(tiny[0], tmp_path / "base")
    proc = invoke(["generate", "-m", str(model_dir), "-p", "Hello", "-n", "4", "--system", "x"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("has no chat template") == 1
    assert "without --system" in proc.stderr
    proc = invoke(["chat", "-m", str(model_dir), "-n", "4"], input="Hello\nAgain\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("has no chat template") == 1
    proc = invoke(["generate", "-m", str(tiny[0]), "-p", "Hello", "-n", "4"])
    assert "chat template" not in proc.stderr
    proc = invoke(["generate", "-m", str(model_dir), "-p", "Hello", "-n", "4", "--raw"])
    assert "chat template" not in proc.stderr


def test_a_copy_of_the_default_model_says_how_to_use_the_shipped_drafter(tiny, tmp_path):
    from mlx_redrafter.defaults import DEFAULT_DRAFTER_NAME
    from mlx_redrafter.fingerprint import model_fingerprint
    from mlx_redrafter.loading import load_model

    model_dir, drafter_dir = tiny
    home = tmp_path / "home"  # a drafter here stands in for the shipped one
    shipped = home / DEFAULT_DRAFTER_NAME
    shutil.copytree(drafter_dir, shipped)
    log = {"base_model": model_fingerprint(load_model(model_dir))}
    (shipped / "training_log.json").write_text(json.dumps(log))
    env = {"MLX_REDRAFTER_HOME": str(home)}
    proc = invoke(["generate", "-m", str(model_dir), "-p", "Hello", "-n", "4"], env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"add -d {shipped}" in proc.stderr
    for extra in (["-d", str(drafter_dir)], ["--no-drafter"]):
        proc = invoke(["generate", "-m", str(model_dir), "-p", "Hello", "-n", "4", *extra], env=env)
        assert "add -d" not in proc.stderr
    other = write_tiny_model(tmp_path / "other", seed=7)
    proc = invoke(["generate", "-m", str(other), "-p", "Hello", "-n", "4"], env=env)
    assert proc.returncode == 0, proc.stderr
    assert "add -d" not in proc.stderr


def test_help_version_and_usage_errors():
    proc = invoke(["--version"])
    assert proc.returncode == 0 and proc.stdout.strip() == f"mlx-redrafter {__version__}"
    proc = invoke(["generate", "-p", "hi", "--max-tokens", "abc"])
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert "--max-tokens" in proc.stderr
    proc = invoke(["generate", "-p", "hi", "--no-such-option"])
    assert proc.returncode == 2 and proc.stderr.strip() == "error: No such option: --no-such-option"
    help_text = invoke(["generate", "--help"], env={"COLUMNS": "200"}).stdout
    assert "<bool>" not in help_text
    assert "Plain decoding" not in help_text and "context lookup only" in help_text
    for option in ("--beam-width", "--beam-length", "--seed", "--model", "--drafter"):
        (line,) = [row for row in help_text.splitlines() if f" {option} " in row]
        assert "default" in line, line


def test_one_max_tokens_default_everywhere():
    import dataclasses
    import inspect

    from mlx_redrafter.chat import ChatSession
    from mlx_redrafter.cli.chat import chat
    from mlx_redrafter.cli.generate import generate
    from mlx_redrafter.cli.serve import serve
    from mlx_redrafter.defaults import DEFAULT_MAX_TOKENS
    from mlx_redrafter.generation import GenerateOptions
    from mlx_redrafter.server import Engine

    defaults = [
        inspect.signature(f).parameters["max_tokens"].default
        for f in (ChatSession, generate, chat, serve)
    ]
    # stream_generate's keyword arguments are GenerateOptions' fields.
    fields = {f.name: f.default for f in dataclasses.fields(GenerateOptions)}
    defaults.append(fields["max_tokens"])
    # The server's default when a request gives none (no model needed to read it).
    defaults.append(Engine(None, None, model_name="m").defaults["max_tokens"])
    assert all(d is DEFAULT_MAX_TOKENS for d in defaults), defaults


def test_json_times_verify_apart_from_acceptance(tiny):
    # The verify forward runs lazily; --json evaluates it on its own, so verify_time is the
    # forward and accept_time the acceptance (before, the forward's time sat in accept_time).
    model_dir, drafter_dir = tiny
    args = ["generate", "-m", str(model_dir), "-d", str(drafter_dir), "-p", "Hello", "-n", "12"]
    out = json.loads(invoke([*args, "--json"]).stdout.strip().splitlines()[-1])
    assert out["verify_time"] > 0 and out["accept_time"] > 0

    from mlx_redrafter.drafter import load_drafter
    from mlx_redrafter.generation import stream_generate
    from mlx_redrafter.loading import load

    model, tokenizer = load(model_dir)
    drafter = load_drafter(drafter_dir, base=model)
    for profile in (False, True):
        *_, last = stream_generate(
            model, tokenizer, "Hello", drafter, max_tokens=12, profile=profile
        )
        assert last.stats.verify_time > 0
        assert (last.stats.accept_time > 0) == profile  # lazily, the sync is verify time
