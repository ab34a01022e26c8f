"""tune: the verify-cost curve, and a stored beam shape that generate, chat and info then use."""

from __future__ import annotations

import json

import pytest
from helpers import invoke, write_tiny_drafter, write_tiny_model

from mlx_redrafter.bench.tune import verify_cost_curve
from mlx_redrafter.loading import load_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    model_dir = write_tiny_model(root / "model")
    return model_dir, write_tiny_drafter(model_dir, root / "drafter")


def test_verify_cost_curve(tiny):
    curve = verify_cost_curve(load_model(tiny[0]), max_nodes=6, context=40, repeats=2)
    assert [c["n"] for c in curve] == [1, 2, 3, 4, 5, 6]
    assert curve[0]["ratio"] == 1.0
    assert all(c["ms"] > 0 and c["ratio"] > 0 for c in curve)


def test_tune_stores_a_shape_that_generate_uses(tiny, tmp_path):
    model_dir, drafter_dir = tiny
    env = {"MLX_REDRAFTER_CONFIG_DIR": str(tmp_path / "config")}
    # The grid leaves out the default shape (1, 3), so generate can only get W, L from tune.
    proc = invoke(
        ["tune", "--model", str(model_dir), "--drafter", str(drafter_dir), "-N", "1",
         "-n", "6", "--widths", "2,3", "--lengths", "2,4", "--curve-nodes", "4",
         "--repeats", "1", "--json", str(tmp_path / "tune.json")],
        env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    stored = json.loads((tmp_path / "config" / "tuned.json").read_text())
    (key, entry), *rest = stored.items()
    assert not rest and key.endswith(f"|{model_dir.resolve()}")
    W, L = entry["beam_width"], entry["beam_length"]
    assert W in (2, 3) and L in (2, 4)
    assert entry["drafter"] == str(drafter_dir) and len(entry["verify_cost"]) == 4
    assert f"best beam shape: W={W}, L={L}" in proc.stdout and "saved to" in proc.stdout
    assert len(json.loads((tmp_path / "tune.json").read_text())["sweep"]["cells"]) == 4

    proc = invoke(
        ["generate", "--model", str(model_dir), "--drafter", str(drafter_dir), "-p", "hello",
         "-n", "5", "--json"],
        env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out["beam_width"], out["beam_length"]) == (W, L)

    # Explicit -W/-L win over the tuned shape.
    proc = invoke(
        ["generate", "--model", str(model_dir), "--drafter", str(drafter_dir), "-p", "hello",
         "-n", "5", "--json", "-W", "4", "-L", "5"],
        env=env,
    )  # fmt: skip
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out["beam_width"], out["beam_length"]) == (4, 5)

    # chat runs with it too (/stats names the shape); info shows the tuned shape of the default model.
    proc = invoke(
        ["chat", "--model", str(model_dir), "--drafter", str(drafter_dir), "-n", "4"],
        env=env,
        input="hello\n/stats\n",
    )
    assert proc.returncode == 0, proc.stderr
    assert f"ReDrafter W={W} L={L}:" in proc.stderr
    env["MLX_REDRAFTER_DEFAULT_MODEL"] = str(model_dir)
    proc = invoke(["info", "--json"], env=env)
    assert json.loads(proc.stdout)["tuned_beam"] == f"W={W}, L={L}"


def test_tune_curve_only_prints_the_ratios(tiny, tmp_path):
    model_dir, _ = tiny
    env = {"MLX_REDRAFTER_CONFIG_DIR": str(tmp_path / "config")}
    proc = invoke(
        ["tune", "--model", str(model_dir), "--curve-only", "--curve-nodes", "3",
         "--repeats", "1"],
        env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "| n | ms | t(n)/t(1) |" in proc.stdout
    assert "| 1 |" in proc.stdout and "| 3 |" in proc.stdout
    assert not (tmp_path / "config").exists()


def test_tune_without_a_drafter_is_one_line(tiny, tmp_path):
    proc = invoke(
        ["tune", "--model", str(tiny[0])], env={"MLX_REDRAFTER_CONFIG_DIR": str(tmp_path)}
    )
    assert proc.returncode == 1 and "needs a drafter" in proc.stderr


def test_tune_with_temp_stores_the_shape_sampled_requests_use(tiny, tmp_path):
    model_dir, drafter_dir = tiny
    env = {"MLX_REDRAFTER_CONFIG_DIR": str(tmp_path / "config")}
    tune = ["tune", "--model", str(model_dir), "--drafter", str(drafter_dir), "-N", "1",
            "-n", "6", "--widths", "2,3", "--lengths", "2,4", "--repeats", "1",
            "--curve-nodes", "4"]  # fmt: skip
    proc = invoke([*tune, "--temp", "0.8", "--top-p", "0.9", "--seed", "1,2"], env=env)
    assert proc.returncode == 0, proc.stderr
    entry = next(iter(json.loads((tmp_path / "config" / "tuned.json").read_text()).values()))
    W, L = entry["sampled_beam_width"], entry["sampled_beam_length"]
    assert W in (2, 3) and L in (2, 4)
    assert "beam_width" not in entry and "verify_cost" not in entry  # greedy: not tuned yet
    assert entry["sampled"]["temperature"] == 0.8 and entry["sampled"]["top_p"] == 0.9
    assert f"best sampled beam shape: W={W}, L={L}" in proc.stdout

    def shape(*extra):
        proc = invoke(
            ["generate", "--model", str(model_dir), "--drafter", str(drafter_dir), "-p", "hi",
             "-n", "5", "--json", *extra],
            env=env,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        return out["beam_width"], out["beam_length"]

    assert shape("--temp", "0.7", "--seed", "3") == (W, L)  # a sampled request: the sampled shape
    assert shape() == (1, 3)  # greedy: not tuned, the built-in default
    assert shape("--temp", "0.7", "-W", "4", "-L", "5") == (4, 5)  # explicit wins

    # A greedy tune afterwards keeps the sampled shape beside its own.
    proc = invoke([*tune, "--widths", "1", "--lengths", "5"], env=env)
    assert proc.returncode == 0, proc.stderr
    entry = next(iter(json.loads((tmp_path / "config" / "tuned.json").read_text()).values()))
    assert (entry["beam_width"], entry["beam_length"]) == (1, 5)
    assert (entry["sampled_beam_width"], entry["sampled_beam_length"]) == (W, L)
    assert shape() == (1, 5) and shape("--temp", "0.7", "--seed", "3") == (W, L)
    env["MLX_REDRAFTER_DEFAULT_MODEL"] = str(model_dir)
    info = json.loads(invoke(["info", "--json"], env=env).stdout)
    assert info["tuned_sampled_beam"] == f"W={W}, L={L}"
