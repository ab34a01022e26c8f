"""Tensor parallelism over two local ranks (ring backend, CPU): the same tokens as one rank.

Each 2-rank test starts its ranks as subprocesses the way `mlx.launch` does (MLX_RANK and a
ring hostfile in MLX_HOSTFILE), with a bounded timeout, so that a hang fails instead of
blocking the suite; one test goes through `mlx.launch` itself. This file is also the program
the ranks run (`python tests/test_distributed.py MODE ...`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from helpers import (  # noqa: E402
    REPO_ROOT,
    TINY_ARGS,
    TINY_FAMILIES,
    FakeTokenizer,
    cli_env,
    random_model,
    write_tiny_drafter,
    write_tiny_model,
)

from mlx_redrafter import distributed, generation, rounds  # noqa: E402
from mlx_redrafter.defaults import save_cost_curve, save_tuned_beam  # noqa: E402
from mlx_redrafter.drafter import init_drafter  # noqa: E402
from mlx_redrafter.errors import DistributedError, RedrafterError  # noqa: E402
from mlx_redrafter.generation import stream_generate  # noqa: E402

RANK_TIMEOUT = 150  # seconds a 2-rank run may take before it counts as a hang

# Every family, plus a quantized model (left unfused) and one whose heads do not split evenly
# over two ranks (3 KV heads, as SmolLM2-135M has).
VARIANTS = {
    **TINY_FAMILIES,
    "llama-4bit": dict(model_type="llama", tie_word_embeddings=False),
    "uneven-heads": dict(
        model_type="llama",
        tie_word_embeddings=True,
        num_attention_heads=6,
        num_key_value_heads=3,
        head_dim=16,
    ),
}
PROMPT = [5, 9, 14, 5, 9, 14, 22, 5, 9, 31, 40, 5, 9, 14]  # repeats, so lookup proposes


def variant_model(name: str):
    """The same random model on every rank (seeded), sharper logits than the default init."""
    model = random_model({**TINY_ARGS, **VARIANTS[name]}, seed=3)
    model.model.norm.weight = model.model.norm.weight * 4.0
    if name.endswith("4bit"):
        nn.quantize(model, group_size=32, bits=4)
        model.args.quantization = {"group_size": 32, "bits": 4}
    else:
        model.optimize()
    mx.eval(model.parameters())
    return model


def decode_all() -> dict:
    """Plain, speculative (drafter + lookup) and sampled tokens of every variant, on this
    process's group (sharded under a launcher, whole otherwise)."""
    group = distributed.init_from_env()
    out = {}
    for name in VARIANTS:
        model = variant_model(name)
        drafter = init_drafter(model, seed=1)
        distributed.shard_model(model, group)
        mx.eval(model.parameters())

        def run(draft, model=model, **kw):
            tok = FakeTokenizer()
            return [r.token for r in stream_generate(model, tok, PROMPT, draft, **kw)]

        out[name] = {
            "plain": run(None, max_tokens=14, lookup=False),
            "speculative": run(drafter, max_tokens=14, beam_width=2, beam_length=3),
            "sampled": run(drafter, max_tokens=14, temperature=0.9, seed=11, beam_width=2),
            "sampled-plain": run(None, max_tokens=14, temperature=0.9, seed=11, lookup=False),
        }
    return out


# ---------------------------------------------------------------------------------------------
# Starting ranks


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_ranks(
    commands: list[list[str]], tmp_path: Path, env: dict | None = None, stdin: bool = False
) -> list:
    """One process per command, rank i running commands[i], joined in a ring on loopback."""
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(len(commands))]))
    procs = []
    for rank, command in enumerate(commands):
        rank_env = {**(env or cli_env()), "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}
        rank_env["PYTHONPATH"] = str(REPO_ROOT)
        rank_env.setdefault("OPENBLAS_NUM_THREADS", "1")
        procs.append(
            subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=rank_env,
                stdin=subprocess.PIPE if stdin else None,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def finish(
    procs: list, timeout: float = RANK_TIMEOUT, input: str | None = None
) -> list[tuple[int, str, str]]:
    """(returncode, stdout, stderr) of each process (`input` on each one's stdin, as
    mlx.launch gives every rank the terminal's input); all are killed past `timeout`."""
    deadline = time.monotonic() + timeout
    results = []
    try:
        if input is not None:
            for p in procs:
                p.stdin.write(input)
                p.stdin.close()
                p.stdin = None  # communicate() would flush it
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, out, err))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the ranks did not finish within {timeout} s (a hang)")
    finally:
        for p in procs:  # never leave a rank behind, whatever failed
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mlx_redrafter.cli", *args]


# ---------------------------------------------------------------------------------------------
# Tests


def test_share_splits_whole_blocks_evenly():
    assert [distributed.share(9, 2, r) for r in range(2)] == [(0, 5), (5, 9)]
    assert [distributed.share(96, 2, r, 32) for r in range(2)] == [(0, 64), (64, 96)]
    assert [distributed.share(8, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]


def test_not_launched_is_one_process(monkeypatch):
    for name in ("MLX_RANK", "MLX_HOSTFILE", "MLX_WORLD_SIZE", "MLX_JACCL_COORDINATOR"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.launch_backend() is None
    assert distributed.init_from_env() is None
    assert distributed.is_leader() and distributed.world_size() == 1
    model = random_model(TINY_ARGS, seed=0)
    assert distributed.shard_model(model, None) is model
    assert distributed.launch_backend({"MLX_HOSTFILE": "x", "MLX_RANK": "0"}) == "ring"
    assert distributed.launch_backend({"MLX_JACCL_COORDINATOR": "h:1"}) == "jaccl"


def test_one_rank_under_mlx_launch_is_one_process(monkeypatch, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("\n")  # what `mlx.launch -n 1 --backend ring` writes
    monkeypatch.setenv("MLX_HOSTFILE", str(hostfile))
    monkeypatch.setenv("MLX_RANK", "0")
    assert distributed.launch_backend() == "ring"
    assert distributed.init_from_env() is None and distributed.world_size() == 1


def test_too_few_kv_heads_is_refused():
    class Four:
        def size(self):
            return 4

    model = random_model(TINY_ARGS, seed=0)  # 2 KV heads
    with pytest.raises(DistributedError, match="2 KV heads"):
        distributed.shard_model(model, Four())


def test_two_ranks_decode_like_one(tmp_path):
    """Every family (fused and unfused, quantized, uneven heads): greedy plain and speculative
    decoding and seeded sampling give one rank's tokens on both ranks."""
    worker = [sys.executable, __file__, "decode", str(tmp_path / "rank{}.json")]
    results = finish(start_ranks([worker, worker], tmp_path))
    for rc, _, err in results:
        assert rc == 0, err[-2000:]
    files = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [f["shards"] for f in files] == [[0, 2], [1, 2]]  # it really was split
    ranks = [f["tokens"] for f in files]
    single = decode_all()
    assert ranks[0] == ranks[1]
    for name in VARIANTS:
        for how in ("plain", "speculative", "sampled", "sampled-plain"):
            assert ranks[0][name][how] == single[name][how], (name, how)
        assert single[name]["speculative"] == single[name]["plain"], name


def test_dead_rank_is_an_error_not_a_hang(tmp_path):
    """Rank 1 dies in its third round; rank 0 stops with one clear line, well in time."""
    model_dir = write_tiny_model(tmp_path / "model", layers=2)
    args = ["generate", "-m", str(model_dir), "--raw", "-p", "the the", "-n", "200", "--no-drafter"]
    args.append("--no-lookup")
    dying = [sys.executable, __file__, "die-in-round", "3", *args]
    t0 = time.monotonic()
    (rc0, out0, err0), (rc1, _, _) = finish(start_ranks([_cli(*args), dying], tmp_path), 90)
    assert rc1 == 3
    assert rc0 == 1, err0[-2000:]
    errors = [line for line in err0.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "another rank stopped" in errors[0], err0[-2000:]
    assert "Traceback" not in err0
    assert time.monotonic() - t0 < 90


def test_chat_answers_once(tmp_path):
    """Every rank reads the same lines; rank 0 alone writes answers and notes."""
    model_dir = write_tiny_model(tmp_path / "model", layers=2)
    drafter_dir = write_tiny_drafter(model_dir, tmp_path / "drafter")
    chat = _cli("chat", "-m", str(model_dir), "-d", str(drafter_dir), "-n", "10", "--temp", "0")
    lines = "the he\nhe the t\n/quit\n"
    procs = start_ranks([chat, chat], tmp_path, stdin=True)
    (rc0, out0, err0), (rc1, out1, err1) = finish(procs, input=lines)
    assert (rc0, rc1) == (0, 0), (err0[-1500:], err1[-1500:])
    assert out1 == "" and "tokens/step" in err0 and "tokens/step" not in err1
    env = {**cli_env(), "PYTHONPATH": str(REPO_ROOT)}
    single = subprocess.run(
        chat, cwd=REPO_ROOT, env=env, input=lines, capture_output=True, text=True, timeout=120
    )
    assert single.returncode == 0 and out0 == single.stdout


def test_commands_that_do_not_split_are_refused(monkeypatch):
    from mlx_redrafter import cli

    monkeypatch.setenv("MLX_HOSTFILE", "hosts.json")
    with pytest.raises(RedrafterError, match="does not run under mlx.launch"):
        cli._join_group("convert")


def test_ranks_use_rank_zeros_tuned_shape(tmp_path, monkeypatch):
    """Each machine has its own store of tuned shapes and cost curves; rank 1 has none here.
    Rank 0's must be used everywhere, or the ranks would build different trees."""
    model_dir = write_tiny_model(tmp_path / "model", layers=2)
    drafter_dir = write_tiny_drafter(model_dir, tmp_path / "drafter")
    stores = [tmp_path / "cfg0", tmp_path / "cfg1"]
    monkeypatch.setenv("MLX_REDRAFTER_CONFIG_DIR", str(stores[0]))
    save_tuned_beam(model_dir, 3, 4)
    save_cost_curve(model_dir, [{"n": n, "ratio": 1 + 0.01 * n} for n in range(1, 33)])
    args = ["generate", "-m", str(model_dir), "-d", str(drafter_dir), "--raw", "-p", "the he"]
    args += ["--temp", "0", "-n", "24", "--json"]
    procs = [({**cli_env(store), "PYTHONPATH": str(REPO_ROOT)}, _cli(*args)) for store in stores]
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(2)]))
    running = [
        subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env={**env, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank, (env, cmd) in enumerate(procs)
    ]
    (rc0, out0, err0), (rc1, _, err1) = finish(running)
    assert (rc0, rc1) == (0, 0), (err0[-1500:], err1[-1500:])
    got = json.loads(out0)
    assert (got["beam_width"], got["beam_length"]) == (3, 4)
    single = subprocess.run(
        _cli(*args), cwd=REPO_ROOT, env={**procs[0][0]}, capture_output=True, text=True, timeout=120
    )
    assert json.loads(single.stdout)["tokens"] == got["tokens"]


@pytest.mark.slow
def test_mlx_launch_generate_prints_once_like_one_rank(default_model_dir, tmp_path):
    """The issue's command: the default model with its drafter and lookup, under mlx.launch."""
    args = ["generate", "-p", "Name three colours.", "--temp", "0", "--json", "-n", "16"]
    env = {**cli_env(tmp_path / "cfg"), "PYTHONPATH": str(REPO_ROOT), "OPENBLAS_NUM_THREADS": "1"}
    single = subprocess.run(
        _cli(*args), cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=RANK_TIMEOUT
    )
    assert single.returncode == 0, single.stderr[-2000:]
    launch = Path(sys.executable).with_name("mlx.launch")
    if not launch.exists():
        pytest.skip("mlx.launch is not installed beside this Python")
    command = [str(launch), "-n", "2", "--backend", "ring", "-p", str(_free_ports(1)[0]), "--"]
    # A session of its own, so that a timeout ends mlx.launch's ranks too.
    launched = subprocess.Popen(
        command + _cli(*args),
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = launched.communicate(timeout=2 * RANK_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(launched.pid, signal.SIGKILL)
        launched.wait()
        pytest.fail("mlx.launch did not finish in time (a hang)")
    two = subprocess.CompletedProcess(command, launched.returncode, out, err)
    assert two.returncode == 0, two.stderr[-2000:]
    lines = two.stdout.strip().splitlines()
    assert len(lines) == 1, two.stdout  # only rank 0 prints
    got, expected = json.loads(lines[0]), json.loads(single.stdout)
    assert got["tokens"] == expected["tokens"]
    assert got["drafter"] and got["lookup"] and got["steps"] < got["num_tokens"]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_serve_answers_through_rank_zero(tmp_path):
    """Rank 0 serves, rank 1 follows: two requests answer as `generate` does on one rank, and
    Ctrl-C on rank 0 ends both."""
    model_dir = write_tiny_model(tmp_path / "model", layers=2)
    drafter_dir = write_tiny_drafter(model_dir, tmp_path / "drafter")
    common = ["-m", str(model_dir), "-d", str(drafter_dir), "-W", "2", "-L", "3"]
    serve = _cli("serve", *common, "--port", "0")
    procs = start_ranks([serve, serve], tmp_path)
    try:
        line = ""
        deadline = time.monotonic() + RANK_TIMEOUT
        while "http://" not in line and time.monotonic() < deadline:
            line = procs[0].stdout.readline()
            if not line and procs[0].poll() is not None:
                break
        assert "http://" in line, procs[0].stderr.read()[-2000:] if procs[0].poll() else line
        url = line.split()[2]
        answers = []
        for prompt in ("the the he", "he the t"):
            body = {"prompt": prompt, "max_tokens": 12, "temperature": 0}
            answers.append(_post(f"{url}/completions", body)["choices"][0]["text"])
    finally:
        procs[0].send_signal(signal.SIGINT)
        results = finish(procs, 60)
    # Rank 0 ends as Ctrl-C ends the server (130); rank 1 returns when rank 0 lets it go.
    assert [rc for rc, _, _ in results] == [130, 0], [err[-1500:] for _, _, err in results]
    assert results[1][1] == ""  # rank 1 printed nothing
    for prompt, answer in zip(("the the he", "he the t"), answers, strict=True):
        single = subprocess.run(
            _cli("generate", *common, "--raw", "-p", prompt, "--temp", "0", "-n", "12", "--json"),
            cwd=REPO_ROOT,
            env={**cli_env(), "PYTHONPATH": str(REPO_ROOT)},
            capture_output=True,
            text=True,
            timeout=RANK_TIMEOUT,
        )
        assert single.returncode == 0, single.stderr[-2000:]
        assert answer == json.loads(single.stdout)["text"]


# ---------------------------------------------------------------------------------------------
# The ranks' program


def _die_in_round(n: int) -> None:
    """Make this process exit (code 3) in its n-th decoding step, as a crashed rank would."""
    calls = {"n": 0}
    plain = generation.plain_steps

    def dying_plain_steps(*args, **kwargs):
        for run in plain(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] >= n:
                os._exit(3)
            yield run

    generation.plain_steps = dying_plain_steps


def _slow_drafts() -> None:
    """Make this rank's drafting slower than rank 0's (as another machine, or a busy core,
    would): the sizing policy learns the drafter's cost from round timings, so unless the
    ranks share rank 0's timings they size different trees (wrong sums, or a hang)."""
    draft = rounds.draft_beams

    def slow_draft_beams(*args, **kwargs):
        time.sleep(0.02)
        return draft(*args, **kwargs)

    rounds.draft_beams = slow_draft_beams


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "decode":
        if distributed.rank() == 1:
            _slow_drafts()
        result = {"tokens": decode_all(), "shards": [distributed.rank(), distributed.world_size()]}
        Path(sys.argv[2].format(distributed.rank())).write_text(json.dumps(result))
    elif mode == "die-in-round":
        _die_in_round(int(sys.argv[2]))
        from mlx_redrafter.cli import main

        sys.argv = ["mlx-redrafter", *sys.argv[3:]]
        main()
