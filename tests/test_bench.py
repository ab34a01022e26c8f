"""bench: the harness's figures and JSON, sweep heatmap, prompt files; on a tiny random model."""

from __future__ import annotations

import json

import pytest
from helpers import invoke, write_tiny_drafter, write_tiny_model

from mlx_redrafter.bench import (
    BenchError,
    Method,
    format_sweep,
    make_methods,
    summarize,
    sweep_grid,
)

SUMMARY_KEYS = {
    "decode_tps_mean",
    "decode_tps_median",
    "e2e_tps",
    "prefill_tps",
    "tokens_per_step",
    "peak_memory_gb",
    "speedup_vs_ar",
    "speedup_vs_mlx_lm",
}
HEADER_KEYS = {"device", "dtype", "blas", "model", "drafter", "mlx", "mlx_lm", "max_tokens"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    model_dir = write_tiny_model(root / "model")
    return model_dir, write_tiny_drafter(model_dir, root / "drafter")


def test_bench_writes_json_with_the_documented_fields(tiny, tmp_path):
    model_dir, drafter_dir = tiny
    out = tmp_path / "bench.json"
    proc = invoke(
        ["bench", "--model", str(model_dir), "--drafter", str(drafter_dir), "-N", "2",
         "-n", "10", "--json", str(out), "--profile"]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert HEADER_KEYS <= set(data["header"])
    assert data["header"]["dtype"] == "float32"
    # by default: what `generate` runs (redrafter+lookup) and its single sources
    defaults = ["mlx-lm", "ar", "redrafter", "lookup", "redrafter+lookup"]
    assert list(data["methods"]) == defaults
    for name, figures in data["methods"].items():
        assert SUMMARY_KEYS <= set(figures), name
        assert figures["decode_tps_mean"] > 0 and figures["peak_memory_gb"] > 0
        # Greedy float32: every method produced the same tokens as plain decoding.
        assert figures["mismatches_vs_ar"] == 0, name
    assert data["methods"]["ar"]["speedup_vs_ar"] == pytest.approx(1.0)
    assert data["methods"]["mlx-lm"]["speedup_vs_mlx_lm"] == pytest.approx(1.0)
    assert data["methods"]["redrafter"]["tokens_per_step"] >= 1.0
    assert data["methods"]["redrafter"]["verify_ms_per_round"] > 0
    assert len(data["prompts"]) == 2
    for prompt in data["prompts"]:
        assert set(prompt["methods"]) == set(defaults)
        for run in prompt["methods"].values():
            assert run["num_tokens"] == 10 or run["finish_reason"] == "stop"
            assert run["matches_ar"] and run["prompt_tokens"] == prompt["prompt_tokens"]
    assert [c["n"] for c in data["verify_cost"]] == list(range(1, 33))
    # The printed table can be pasted into markdown.
    assert "| method | decode tok/s (mean)" in proc.stdout
    from mlx_redrafter.defaults import DEFAULT_BEAM

    assert "redrafter (W={}, L={})".format(*DEFAULT_BEAM) in proc.stdout
    assert "greedy outputs identical to ar on 2/2 prompts" in proc.stdout
    assert "draft ms/round" in proc.stdout and "t(n)/t(1)" in proc.stdout
    checks = data["default_check"]  # the source and its one category
    assert [c["group"] for c in checks] == ["mt-bench", "mt-bench/writing"]
    assert all(c["best_single"] in ("redrafter", "lookup") for c in checks)
    assert "against the best single method" in proc.stdout


def test_sweep_writes_heatmap(tiny, tmp_path):
    model_dir, drafter_dir = tiny
    out, png = tmp_path / "sweep.json", tmp_path / "plots" / "sweep.png"
    proc = invoke(
        ["bench", "--model", str(model_dir), "--drafter", str(drafter_dir), "-N", "1",
         "-n", "6", "--methods", "ar,redrafter", "--sweep", "--widths", "1,2",
         "--lengths", "2,3", "--json", str(out), "--plot", str(png)]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(out.read_text())
    names = ["redrafter-W1-L2", "redrafter-W1-L3", "redrafter-W2-L2", "redrafter-W2-L3"]
    assert list(data["methods"]) == ["ar", *names]
    assert data["methods"]["ar"]["speedup_vs_mlx_lm"] is None  # mlx-lm not run
    grid = data["sweep"]
    assert grid["widths"] == [1, 2] and grid["lengths"] == [2, 3] and len(grid["cells"]) == 4
    assert all(c["speedup_vs_ar"] > 0 and c["tokens_per_step"] >= 1 for c in grid["cells"])
    assert "sweep: decode speedup vs ar" in proc.stdout and "best: W=" in proc.stdout


def test_bench_errors_are_one_line(tiny, tmp_path):
    model_dir, _ = tiny
    bad = tmp_path / "bad.jsonl"
    bad.write_text('\n{"nothing": 1}\n')
    cases = [
        (["--prompts", str(bad)], "bad.jsonl: line 2 has none of"),
        (["--methods", "ar,fast"], "unknown method 'fast'"),
        (["--methods", "ar,redrafter"], "needs a drafter"),
        (["--plot", str(tmp_path / "x.png")], "--sweep"),
        (["--category", "writing,nosuch"], "no prompts of category 'nosuch'"),
    ]
    for args, message in cases:
        proc = invoke(["bench", "--model", str(model_dir), "-N", "1", "-n", "4", *args])
        assert proc.returncode == 1, args
        assert message in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr


def test_make_methods():
    methods = make_methods(["ar", "redrafter"], [(1, 2), (2, 4)], sweep=True)
    assert [m.name for m in methods] == ["ar", "redrafter-W1-L2", "redrafter-W2-L4"]
    assert make_methods(["redrafter"], [(2, 4)])[0] == Method("redrafter", "redrafter", 2, 4)
    with pytest.raises(BenchError, match="L >= 2"):
        make_methods(["redrafter"], [(2, 1)])
    with pytest.raises(BenchError, match="twice"):
        make_methods(["ar", "ar"], [])


def _run(tps, tokens, accepted=(), total=1.0, ttft=0.1):
    return {
        "decode_tps": tps,
        "num_tokens": len(tokens),
        "tokens": tokens,
        "total_time_s": total,
        "ttft_s": ttft,
        "prompt_tokens": 10,
        "peak_memory_gb": 0.5,
        "rounds": len(accepted),
        "accepted": list(accepted),
        "mean_tree_nodes": 5.0,
        "draft_time_s": 0.1,
        "verify_time_s": 0.2,
        "accept_time_s": 0.05,
    }


def test_summarize_speedups_and_mismatches():
    methods = make_methods(["mlx-lm", "ar", "redrafter"], [(2, 3)])
    records = [
        {"methods": {"mlx-lm": _run(50, [1, 2, 3]), "ar": _run(40, [1, 2, 3]),
                     "redrafter": _run(80, [1, 2, 3], accepted=[2, 0])}},
        {"methods": {"mlx-lm": _run(70, [4, 5]), "ar": _run(60, [4, 5]),
                     "redrafter": _run(100, [4, 6], accepted=[1])}},
    ]  # fmt: skip
    summary = summarize(records, methods)
    assert summary["ar"]["decode_tps_mean"] == 50 and summary["ar"]["speedup_vs_ar"] == 1
    assert summary["redrafter"]["speedup_vs_ar"] == pytest.approx(90 / 50)
    assert summary["redrafter"]["speedup_vs_mlx_lm"] == pytest.approx(90 / 60)
    assert summary["redrafter"]["tokens_per_step"] == pytest.approx((3 + 3) / 3)
    assert summary["redrafter"]["accept_by_depth"] == pytest.approx([2 / 3, 1 / 3])
    assert summary["redrafter"]["mismatches_vs_ar"] == 1
    assert summary["mlx-lm"]["mismatches_vs_ar"] == 0
    assert records[1]["methods"]["redrafter"]["first_mismatch"] == 1
    assert summary["redrafter"]["verify_ms_per_round"] == pytest.approx(1e3 * 0.4 / 3)
    grid = sweep_grid(summary, methods)
    assert grid["best"]["method"] == "redrafter" and grid["widths"] == [2]


def test_a_sweep_of_several_draft_methods_prints_a_grid_each():
    methods = make_methods(["ar", "redrafter"], [(1, 3)], sweep=True, drafts=["beam", "sbs"])
    runs = {"ar": _run(40, [1, 2, 3])}
    runs["redrafter-W1-L3/beam"] = _run(60, [1, 2, 3], accepted=[1, 0])
    runs["redrafter-W1-L3/sbs"] = _run(50, [1, 2, 3], accepted=[1, 1])
    summary = summarize([{"methods": runs}], methods)
    grid = sweep_grid(summary, methods)
    assert [c["draft"] for c in grid["cells"]] == ["beam", "sbs"]
    text = format_sweep(grid)
    assert "draft beam" in text and "draft sbs" in text
    assert "| 1 | 1.50x (1.50) |" in text and "| 1 | 1.25x (2.00) |" in text
    assert "best: W=1, L=3, draft beam" in text


def test_bench_acceptance_prints_a_grid_and_writes_json(tiny, tmp_path):
    model_dir, drafter_dir = tiny
    out = tmp_path / "acceptance.json"
    proc = invoke(
        ["bench", "--model", str(model_dir), "--drafter", str(drafter_dir), "--acceptance",
         "-N", "2", "-n", "12", "--widths", "1,2", "--lengths", "3,4", "--json", str(out)]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "| W \\ L | 3 | 4 |" in proc.stdout
    data = json.loads(out.read_text())
    assert set(data["shapes"]) == {"1x3", "1x4", "2x3", "2x4"}
    assert all(v["tokens_per_step"] >= 1.0 for v in data["shapes"].values())
    assert len(data["prompts"]) == 2


def test_bench_acceptance_prints_a_table_per_kind(tiny, tmp_path):
    model_dir, drafter_dir = tiny
    prompts = tmp_path / "kinds.jsonl"
    records = [("math", "add two and two"), ("code", "write a loop"), ("math", "halve ten")]
    prompts.write_text("".join(json.dumps({"category": c, "prompt": t}) + "\n" for c, t in records))
    out = tmp_path / "acceptance.json"
    proc = invoke(
        ["bench", "--model", str(model_dir), "--drafter", str(drafter_dir), "--acceptance",
         "--prompts", str(prompts), "-n", "6", "--widths", "1", "--lengths", "3",
         "--compare", str(drafter_dir), "--json", str(out)]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    for drafter in data["drafters"]:
        assert list(drafter["by_kind"]) == ["math", "code"]
    assert proc.stdout.count("| **all** |") == 2 and "| math |" in proc.stdout


def test_lookup_methods_second_turns_and_groups(tiny, tmp_path):
    model_dir, drafter_dir = tiny
    out = tmp_path / "bench.json"
    proc = invoke(
        ["bench", "--model", str(model_dir), "--drafter", str(drafter_dir),
         "--prompts", "mt-bench-2,doc-prompts", "-N", "2", "-n", "12", "--json", str(out),
         "--methods", "ar,redrafter,lookup,redrafter+lookup", "--plot", str(tmp_path / "g.png")]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert list(data["methods"]) == ["ar", "redrafter", "lookup", "redrafter+lookup"]
    for name, figures in data["methods"].items():
        assert figures["mismatches_vs_ar"] == 0, name
    assert data["methods"]["lookup"]["drafter_round_fraction"] == 0.0
    assert set(data["methods"]["redrafter"]["accepted_from"]) <= {"drafter"}
    # a second turn carries the model's own first answer: longer than the turn alone
    second = [p for p in data["prompts"] if p["source"] == "mt-bench-2"]
    assert len(second) == 2 and all(p["prompt_tokens"] > 20 for p in second)
    assert {"mt-bench-2", "doc-prompts"} <= set(data["groups"])
    assert "per source and category" in proc.stdout
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_lookup_and_memory_methods():
    methods = make_methods(
        ["lookup", "lookup-v1", "redrafter+lookup-v1", "redrafter+lookup+memory"], [(1, 3)]
    )
    assert [(m.kind, m.lookup, m.lookup_version, m.memory) for m in methods] == [
        ("lookup", True, 2, False),
        ("lookup", True, 1, False),
        ("redrafter", True, 1, False),
        ("redrafter", True, 2, True),
    ]


def _spec_run(tps, tokens, nodes, drafter_rounds=0):
    return {"decode_tps": tps, "num_tokens": tokens, "nodes": nodes,
            "drafter_rounds": drafter_rounds}  # fmt: skip


def test_default_check_flags_a_group_where_the_default_loses_beyond_noise():
    from mlx_redrafter.bench.compare import default_check, modelled_steps
    from mlx_redrafter.sizing import default_cost_curve

    methods = make_methods(["ar", "redrafter", "lookup", "redrafter+lookup"], [(1, 3)])

    def record(category, default_tps, drafter_tps):
        return {
            "source": "s",
            "category": category,
            "methods": {
                "ar": _spec_run(10, 9, []),
                "redrafter": _spec_run(drafter_tps, 9, [3, 3, 3, 3], 4),
                "lookup": _spec_run(8, 9, [2] * 8),
                "redrafter+lookup": _spec_run(default_tps, 9, [3, 3, 3, 3], 2),
            },
        }

    records = [record("a", 10, 12), record("a", 10.5, 12), record("b", 12, 12),
               record("b", 11.9, 12), record("c", 9, 12), record("c", 14, 12)]  # fmt: skip
    rows = {r["group"]: r for r in default_check(records, methods)}
    assert set(rows) == {"all", "s", "s/a", "s/b", "s/c"}
    assert rows["s/a"]["flag"] and rows["s/a"]["best_single"] == "redrafter"
    assert not rows["s/b"]["flag"]  # within 3%
    assert not rows["s/c"]["flag"]  # below on average, but within its (large) noise
    # noise-free: the default did the same rounds with the drafter in half of them
    assert rows["s/a"]["modelled_ratio"] > 1.0
    curve = default_cost_curve("cpu")
    assert modelled_steps(records[0]["methods"]["ar"], curve) == 9
    assert modelled_steps(records[0]["methods"]["redrafter"], curve) == pytest.approx(
        4 * curve[2] + 0.4
    )
    assert default_check(records, make_methods(["ar", "redrafter"], [(1, 3)])) == []


def test_timing_noise_of_the_run_widens_the_noise():
    """ar and mlx-lm do the same work: their per-prompt ratio's spread is the run's timing
    noise, and a one-prompt group is not flagged within it."""
    from mlx_redrafter.bench.compare import default_check, ratio_noise

    methods = make_methods(["mlx-lm", "ar", "redrafter", "redrafter+lookup"], [(1, 3)])

    def record(category, ar, lm, default, drafter):
        return {"source": "s", "category": category, "methods": {
            "mlx-lm": _spec_run(lm, 9, []), "ar": _spec_run(ar, 9, []),
            "redrafter": _spec_run(drafter, 9, [3] * 4, 4),
            "redrafter+lookup": _spec_run(default, 9, [3] * 4, 4)}}  # fmt: skip

    quiet = [record("a", 10, 10, 9, 10), record("b", 10, 10, 10, 10)]
    assert ratio_noise(quiet) == 0.0
    assert {r["group"]: r["flag"] for r in default_check(quiet, methods)}["s/a"]
    noisy = [record("a", 10, 5, 9, 10), record("b", 10, 15, 10, 10)]
    assert ratio_noise(noisy) > 0.5
    assert not {r["group"]: r["flag"] for r in default_check(noisy, methods)}["s/a"]
