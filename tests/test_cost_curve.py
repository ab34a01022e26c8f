"""The stored verify-cost curve: `tune` keeps t(n)/t(1) per device and model, and the tree
sizing reads it back with `load_cost_curve` (only for the fast-path setting it measured)."""

from __future__ import annotations

import json

import pytest
from helpers import write_tiny_model

from mlx_redrafter.bench.tune import verify_cost_curve
from mlx_redrafter.defaults import load_cost_curve, save_cost_curve, save_tuned_beam, tuned_beam
from mlx_redrafter.loading import load_model


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_REDRAFTER_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("MLX_REDRAFTER_FAST", raising=False)
    return tmp_path / "config"


def test_measured_curve_round_trips(tmp_path, config_dir):
    model_dir = write_tiny_model(tmp_path / "model")
    model = load_model(model_dir)
    assert model.fused  # the curve is the loaded (fast) path's
    assert load_cost_curve(model_dir) is None
    curve = verify_cost_curve(model, max_nodes=5, context=30, repeats=1)
    save_cost_curve(model_dir, curve)
    loaded = load_cost_curve(model_dir)
    assert loaded == pytest.approx([c["ratio"] for c in curve], rel=1e-3)
    assert len(loaded) == 5 and loaded[0] == 1.0
    assert tuned_beam(model_dir) is None  # a curve alone is no beam shape
    assert load_cost_curve(tmp_path / "elsewhere") is None


def test_curve_kept_beside_the_beam_and_per_fast_path(tmp_path, config_dir, monkeypatch):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    save_tuned_beam(model_dir, 2, 4, {"decode_tps": 1.0})
    save_cost_curve(model_dir, [{"n": 1, "ratio": 1.0}, {"n": 2, "ratio": 1.07}])
    assert tuned_beam(model_dir) == (2, 4)
    assert load_cost_curve(model_dir) == [1.0, 1.07]
    entry = next(iter(json.loads((config_dir / "tuned.json").read_text()).values()))
    assert entry["decode_tps"] == 1.0 and entry["fast_path"] is True
    monkeypatch.setenv("MLX_REDRAFTER_FAST", "0")  # measured on the other path: not this cost
    assert load_cost_curve(model_dir) is None


def test_a_curve_with_gaps_is_refused(tmp_path, config_dir):
    with pytest.raises(ValueError, match="without gaps"):
        save_cost_curve(tmp_path, [{"n": 1, "ratio": 1.0}, {"n": 3, "ratio": 1.2}])
