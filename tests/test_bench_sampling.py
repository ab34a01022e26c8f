"""bench when sampling: --temp/--top-p/--top-k/--seed for every method, --draft, and the
sampled acceptance replay (expected tokens per step of beams and RSD drafts)."""

from __future__ import annotations

import json

import pytest
from helpers import invoke, write_tiny_drafter, write_tiny_model

from mlx_redrafter.bench import make_methods


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-sampling")
    model_dir = write_tiny_model(root / "model")
    return model_dir, write_tiny_drafter(model_dir, root / "drafter")


def test_make_methods_one_per_draft():
    methods = make_methods(["ar", "redrafter"], [(2, 3)], drafts=["beam", "sbs"])
    assert [m.name for m in methods] == ["ar", "redrafter/beam", "redrafter/sbs"]
    assert [m.draft for m in methods] == [None, "beam", "sbs"]
    assert make_methods(["redrafter"], [(2, 3)], drafts=["sbs"])[0].name == "redrafter"


def test_sampled_bench_runs_every_seed_and_reports_the_spread(tiny, tmp_path):
    model_dir, drafter_dir = tiny
    out = tmp_path / "bench.json"
    proc = invoke(
        ["bench", "--model", str(model_dir), "--drafter", str(drafter_dir), "-N", "2",
         "-n", "8", "--json", str(out), "--temp", "0.8", "--top-p", "0.9", "--top-k", "20",
         "--seed", "1,2", "--methods", "mlx-lm,ar,redrafter", "--draft", "beam,sbs"]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "temperature 0.8, top-p 0.9, top-k 20, seeds 1,2" in proc.stdout
    assert "spread over seeds" in proc.stdout
    data = json.loads(out.read_text())
    assert data["header"]["temperature"] == 0.8 and data["header"]["seeds"] == [1, 2]
    assert list(data["methods"]) == ["mlx-lm", "ar", "redrafter/beam", "redrafter/sbs"]
    assert len(data["prompts"]) == 4  # 2 prompts x 2 seeds
    assert {p["seed"] for p in data["prompts"]} == {1, 2}


def test_sampled_acceptance_replay(tiny, tmp_path):
    model_dir, drafter_dir = tiny
    out = tmp_path / "acceptance.json"
    proc = invoke(
        ["bench", "--model", str(model_dir), "--drafter", str(drafter_dir), "--acceptance",
         "-N", "1", "-n", "8", "--widths", "2", "--lengths", "3", "--temp", "1.0",
         "--seed", "3,4", "--json", str(out)]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "| budget | draft | W x L |" in proc.stdout
    data = json.loads(out.read_text())
    assert set(data["configs"]) == {"beam-W2-L3", "sbs-W2-L3", "gumbel-topk-W2-L3"}
    for row in data["configs"].values():
        assert row["budget"] == 5 and row["tokens_per_step"] >= 1.0 and row["positions"] > 0


def test_bad_sampling_options_are_one_line(tiny):
    model_dir, drafter_dir = tiny
    for extra, message in [
        (["--draft", "greedy"], "--draft takes"),
        (["--top-p", "0"], "top_p"),
        (["--seed", "x"], "--seed"),
    ]:
        proc = invoke(["bench", "--model", str(model_dir), "--drafter", str(drafter_dir),
                       "-N", "1", "-n", "4", "--temp", "0.5", *extra])  # fmt: skip
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
