"""bench when sampling: --temp/--top-p/--top-k/--seed for every method, --draft, and the
sampled acceptance replay (expected tokens per step of beams and RSD drafts)."""

from __future__ import annotations

import json

import numpy as np
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


def test_sampled_acceptance_with_lookup_cli(tiny, tmp_path):
    model_dir, drafter_dir = tiny
    out = tmp_path / "acceptance.json"
    proc = invoke(
        ["bench", "--model", str(model_dir), "--drafter", str(drafter_dir), "--acceptance",
         "-N", "1", "-n", "8", "--widths", "2", "--lengths", "3", "--temp", "1.0",
         "--seed", "3", "--draft", "beam,sbs", "--with-lookup", "--json", str(out)]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "| budget | draft | W x L | lookup | mean nodes |" in proc.stdout
    data = json.loads(out.read_text())
    assert set(data["configs"]) == {
        "beam-W2-L3", "sbs-W2-L3", "beam+lookup-W2-L3", "sbs+lookup-W2-L3", "lookup-L3"
    }  # fmt: skip
    rows = data["configs"]
    assert rows["beam+lookup-W2-L3"]["budget"] == 7 and rows["lookup-L3"]["budget"] == 3
    for row in rows.values():
        assert 1 <= row["mean_nodes"] <= row["budget"]
    # without --temp (greedy) or --acceptance the option is refused in one line
    for extra in (["--acceptance"], ["--temp", "0.7"]):
        proc = invoke(["bench", "--model", str(model_dir), "--drafter", str(drafter_dir),
                       "-N", "1", "-n", "4", "--with-lookup", *extra])  # fmt: skip
        assert proc.returncode != 0 and "--with-lookup needs" in proc.stderr, proc.stderr


def test_lookup_branch_never_lowers_the_expected_tokens(tiny):
    """A point-mass copy added beside deterministic beams can only add acceptance: per
    position, beam+lookup >= beam, and more wherever the copy's first token is new. The
    prompt repeats itself, so lookup matches; the tiny model's sampled text repeats it too."""
    from mlx_redrafter.accept import SamplingConfig
    from mlx_redrafter.bench import DraftConfig
    from mlx_redrafter.bench.rsd_replay import replay_positions
    from mlx_redrafter.drafter import load_drafter
    from mlx_redrafter.loading import load_model

    model_dir, drafter_dir = tiny
    model = load_model(model_dir)
    drafter = load_drafter(drafter_dir, model)
    phrase = [11, 12, 13, 14, 15, 16, 17, 18]
    ids = phrase * 4
    ref = phrase * 2  # the context keeps repeating: every position has a match
    configs = [DraftConfig("beam", 1, 3), DraftConfig("beam", 1, 3, True)]
    sampling = SamplingConfig(1.0, 1.0, 0)
    nodes: dict = {}
    got = replay_positions(model, drafter, ids, ref, configs, sampling, 1, nodes)
    plain, looked = np.array(got["beam-W1-L3"]), np.array(got["beam+lookup-W1-L3"])
    assert len(plain) == len(ref) - 1
    assert np.all(looked >= plain - 1e-6 * np.maximum(1.0, plain))
    assert np.mean(looked) > np.mean(plain)
    assert max(nodes["beam+lookup-W1-L3"]) > max(nodes["beam-W1-L3"])
