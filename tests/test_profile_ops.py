"""The op profile of the n-token forward (`tune --profile-ops`)."""

from __future__ import annotations

import json

import pytest
from helpers import invoke, write_tiny_model

from mlx_redrafter.bench.profile_ops import CATEGORIES, format_profile, profile_forward
from mlx_redrafter.loading import load_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("profile") / "model")


def test_profile_times_every_category(tiny):
    model = load_model(tiny)
    rows = profile_forward(model, sizes=(1, 3), context=20, repeats=1, clock="cpu")
    assert [r["n"] for r in rows] == [1, 3]
    assert all(r[c] >= 0 for r in rows for c in CATEGORIES)
    assert all(r["forward"] > 0 and r["projections"] > 0 for r in rows)
    table = format_profile(rows)
    assert "| op (ms) | n=1 | n=3 |" in table and "| attention |" in table
    with pytest.raises(ValueError, match="clock"):
        profile_forward(model, sizes=(1,), clock="sundial")


def test_tune_profile_ops_prints_and_stores_nothing(tiny, tmp_path):
    env = {"MLX_REDRAFTER_CONFIG_DIR": str(tmp_path / "config")}
    out = tmp_path / "ops.json"
    proc = invoke(
        ["tune", "--model", str(tiny), "--profile-ops", "--curve-nodes", "2", "--repeats", "1",
         "--json", str(out)],
        env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "| op (ms) | n=1 | n=2 |" in proc.stdout and "| lm_head |" in proc.stdout
    assert [r["n"] for r in json.loads(out.read_text())["profile_ops"]] == [1, 2]
    assert not (tmp_path / "config").exists()
