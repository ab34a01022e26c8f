"""What a benchmark run yields and how it is shown: the `BenchResult`, the summaries (per method,
per source/category, the W x L grid of a sweep, greedy agreement with the reference method),
markdown tables, PNG plots (matplotlib, optional, imported when a plot is drawn), the JSON file
and the header that says what the numbers were measured on."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..env import machine, model_dtype, now
from ..errors import BenchError
from .compare import format_default_check
from .methods import Method


@dataclass
class BenchResult:
    header: dict
    methods: list[Method]
    prompts: list[dict]  # per prompt: id, category, prompt_tokens, methods: {name: figures}
    summary: dict = field(default_factory=dict)  # name -> aggregate figures
    verify_cost: list[dict] | None = None
    sweep: dict | None = None
    groups: dict = field(default_factory=dict)  # "source" or "source/category" -> summary
    default_check: list[dict] = field(default_factory=list)  # compare.default_check

    def as_json(self) -> dict:
        out = {"header": self.header, "methods": self.summary, "prompts": self.prompts}
        if self.groups:
            out["groups"] = self.groups
        if self.default_check:
            out["default_check"] = self.default_check
        if self.sweep is not None:
            out["sweep"] = self.sweep
        if self.verify_cost is not None:
            out["verify_cost"] = self.verify_cost
        return out


def make_header(
    model,
    model_path,
    drafter_path,
    prompts: str,
    num_prompts: int,
    max_tokens: int,
    methods: Sequence[Method],
    profile: bool = False,
    **extra,
) -> dict:
    """What the numbers were measured on, for the table and the JSON."""
    return {
        **machine(),
        "dtype": model_dtype(model),
        "model": str(model_path),
        "drafter": str(drafter_path) if drafter_path else None,
        "prompts": prompts,
        "num_prompts": num_prompts,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "methods": [m.name for m in methods],
        "beam_shapes": [[m.beam_width, m.beam_length] for m in methods if m.kind == "redrafter"],
        "profile": profile,
        "date": now(),
        **extra,
    }


# ---------------------------------------------------------------------------------------------
# Summaries


def _reference(methods: Sequence[Method]) -> str:
    names = [m.name for m in methods]
    return "ar" if "ar" in names else ("mlx-lm" if "mlx-lm" in names else names[0])


def check_outputs(records: list[dict], methods: Sequence[Method]) -> str:
    """Mark every run with whether its greedy tokens equal the reference method's (`ar`,
    else `mlx-lm`), and where they first differ; returns the reference's name."""
    ref = _reference(methods)
    for record in records:
        expected = record["methods"][ref]["tokens"]
        for m in methods:
            run = record["methods"][m.name]
            got = run["tokens"]
            run["matches_" + ref.replace("-", "_")] = got == expected
            first = next(
                (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
                None if len(got) == len(expected) else min(len(got), len(expected)),
            )
            run["first_mismatch"] = first
    return ref


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def _method_summary(runs: list[dict], ref: str) -> dict:
    """The figures every method has: speeds, tokens per step, memory, mismatches."""
    decode = [r["decode_tps"] for r in runs if r["decode_tps"] is not None]
    tokens = sum(r["num_tokens"] for r in runs)
    rounds = sum(r["rounds"] for r in runs)
    accepted = sum(a for r in runs for a in r["accepted"])
    key = ref.replace("-", "_")
    return {
        "decode_tps_mean": statistics.fmean(decode) if decode else None,
        "decode_tps_median": statistics.median(decode) if decode else None,
        "e2e_tps": _ratio(tokens, sum(r["total_time_s"] for r in runs)),
        "prefill_tps": _ratio(
            sum(r["prompt_tokens"] for r in runs), sum(r["ttft_s"] for r in runs)
        ),
        "tokens_per_step": (accepted + rounds) / rounds if rounds else 1.0,
        "peak_memory_gb": max(r["peak_memory_gb"] for r in runs),
        "speedup_vs_ar": None,
        "speedup_vs_mlx_lm": None,
        "num_prompts": len(runs),
        "generated_tokens": tokens,
        "mismatches_vs_" + key: sum(not r["matches_" + key] for r in runs),
    }


def _speculative_summary(m: Method, runs: list[dict]) -> dict:
    """What speculative methods add: where accepted tokens came from, acceptance by depth,
    tree size and (with --profile) milliseconds per round by phase."""
    rounds = sum(r["rounds"] for r in runs)
    accepted = [a for r in runs for a in r["accepted"]]
    L = max(accepted, default=0) + 1 if m.beam_length is None else m.beam_length
    sources: dict[str, int] = {}
    for r in runs:
        for source, n in r.get("accepted_from", {}).items():
            sources[source] = sources.get(source, 0) + n
    entry = {
        "beam_width": m.beam_width,
        "beam_length": m.beam_length,
        "accepted_from": sources,
        "drafter_round_fraction": (
            sum(r.get("drafter_rounds", 0) for r in runs) / rounds if rounds else 0.0
        ),
        "accept_by_depth": [
            sum(a >= d for a in accepted) / len(accepted) if accepted else 0.0 for d in range(1, L)
        ],
        "mean_tree_nodes": (
            sum(r["mean_tree_nodes"] * r["rounds"] for r in runs) / rounds if rounds else 0.0
        ),
    }
    for part in ("draft", "verify", "accept"):
        total = sum(r[f"{part}_time_s"] for r in runs)
        entry[f"{part}_ms_per_round"] = 1e3 * total / rounds if rounds else None
    return entry


def summarize(records: list[dict], methods: Sequence[Method]) -> dict:
    """Aggregate figures per method, with the key names of the JSON output."""
    ref = check_outputs(records, methods)
    summary = {}
    for m in methods:
        runs = [r["methods"][m.name] for r in records]
        summary[m.name] = _method_summary(runs, ref)
        summary[m.name]["decode_tps_seed_spread"] = _seed_spread(records, m.name)
        if m.speculative:
            summary[m.name].update(_speculative_summary(m, runs))
    for base, key in (("ar", "speedup_vs_ar"), ("mlx-lm", "speedup_vs_mlx_lm")):
        ref_tps = summary.get(base, {}).get("decode_tps_mean")
        for entry in summary.values():
            if ref_tps and entry["decode_tps_mean"] is not None:
                entry[key] = entry["decode_tps_mean"] / ref_tps
    return summary


def _seed_spread(records: list[dict], name: str) -> float | None:
    """Standard deviation over seeds of the per-seed mean decode tok/s (None: one seed)."""
    by_seed: dict = {}
    for r in records:
        if "seed" in r and r["methods"][name]["decode_tps"] is not None:
            by_seed.setdefault(r["seed"], []).append(r["methods"][name]["decode_tps"])
    if len(by_seed) < 2:
        return None
    return statistics.pstdev(statistics.fmean(v) for v in by_seed.values())


def summarize_groups(records: list[dict], methods: Sequence[Method]) -> dict:
    """`summarize` per source and per source/category, when the prompts have more than one."""
    keys = {}
    for r in records:
        source = r.get("source") or "prompts"
        keys.setdefault(source, []).append(r)
        keys.setdefault(f"{source}/{r.get('category') or '-'}", []).append(r)
    if len(keys) <= 2:  # one source with one category: the overall table says it all
        return {}
    return {key: summarize(group, methods) for key, group in keys.items()}


def sweep_grid(summary: dict, methods: Sequence[Method]) -> dict:
    """The W x L grid of a sweep: speedup vs ar (None without ar) and tokens per step."""
    shapes = [m for m in methods if m.kind == "redrafter"]
    widths = sorted({m.beam_width for m in shapes})
    lengths = sorted({m.beam_length for m in shapes})
    cells = []
    for m in shapes:
        s = summary[m.name]
        cells.append(
            {
                "beam_width": m.beam_width,
                "beam_length": m.beam_length,
                "method": m.name,
                "draft": m.draft,
                "decode_tps_mean": s["decode_tps_mean"],
                "speedup_vs_ar": s["speedup_vs_ar"],
                "speedup_vs_mlx_lm": s["speedup_vs_mlx_lm"],
                "tokens_per_step": s["tokens_per_step"],
            }
        )
    best = max(
        (c for c in cells if c["decode_tps_mean"] is not None),
        key=lambda c: c["decode_tps_mean"],
        default=None,
    )
    return {"widths": widths, "lengths": lengths, "cells": cells, "best": best}


# ---------------------------------------------------------------------------------------------
# Tables


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _header_lines(h: dict) -> list[str]:
    return [
        f"device: {h['device']} · dtype {h['dtype']} · BLAS {h['blas'].split(' (')[0]} · "
        f"mlx {h['mlx']} · mlx-lm {h['mlx_lm']} · mlx-redrafter {h['mlx_redrafter']}",
        f"model: {h['model']}",
        f"drafter: {h['drafter'] or 'none'}",
        f"prompts: {h['prompts']} ({h['num_prompts']}, first turn, chat template), "
        f"max {h['max_tokens']} new tokens, {_sampling_text(h)}",
    ]


def _sampling_text(h: dict) -> str:
    if not h.get("temperature"):
        return "greedy"
    seeds = h.get("seeds") or []
    return (
        f"sampled: temperature {h['temperature']}, top-p {h.get('top_p', 1.0)}, "
        f"top-k {h.get('top_k', 0)}, seeds {','.join(map(str, seeds))} (mean over seeds)"
    )


def _method_rows(result: BenchResult) -> list[str]:
    lines = [
        "| method | decode tok/s (mean) | decode tok/s (median) | e2e tok/s | prefill tok/s "
        "| tokens/step | peak mem (GB) | vs ar | vs mlx-lm |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in result.methods:
        s = result.summary[m.name]
        name = m.name
        if m.kind == "redrafter" and m.name in ("redrafter", "redrafter+lookup"):
            name = f"{m.name} (W={m.beam_width}, L={m.beam_length})"
        lines.append(
            f"| {name} | {_fmt(s['decode_tps_mean'], '.1f')} | "
            f"{_fmt(s['decode_tps_median'], '.1f')} | {_fmt(s['e2e_tps'], '.1f')} | "
            f"{_fmt(s['prefill_tps'], '.1f')} | {s['tokens_per_step']:.2f} | "
            f"{s['peak_memory_gb']:.2f} | {_fmt(s['speedup_vs_ar'], '.2f', 'x')} | "
            f"{_fmt(s['speedup_vs_mlx_lm'], '.2f', 'x')} |"
        )
    return lines


def _agreement_lines(result: BenchResult) -> list[str]:
    """Whether every method's greedy tokens equal the reference method's; when sampling, the
    spread of each method's decode speed over seeds instead."""
    if result.header.get("temperature"):
        spread = {
            m.name: result.summary[m.name].get("decode_tps_seed_spread") for m in result.methods
        }
        cells = ", ".join(f"{k} {v:.1f}" for k, v in spread.items() if v is not None)
        return (
            [f"\nspread over seeds (std of per-seed mean decode tok/s): {cells}"] if cells else []
        )
    ref = _reference(result.methods)
    key = "mismatches_vs_" + ref.replace("-", "_")
    others = [m.name for m in result.methods if m.name != ref]
    if not others:
        return []
    n = len(result.prompts)
    bad = {name: result.summary[name][key] for name in others}
    if not any(bad.values()):
        return [f"\ngreedy outputs identical to {ref} on {n}/{n} prompts: all methods"]
    detail = ", ".join(f"{name} differs on {k}/{n}" for name, k in bad.items() if k)
    return [f"\ngreedy outputs vs {ref}: {detail}"]


def _profile_lines(result: BenchResult) -> list[str]:
    """Per speculative method (with --profile): time per round by phase, tree size, depth."""
    profiled = [m for m in result.methods if m.speculative and result.header.get("profile")]
    if not profiled:
        return []
    lines = [
        "",
        "| method | draft ms/round | verify ms/round | accept+commit ms/round "
        "| tree nodes | acceptance by depth |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for m in profiled:
        s = result.summary[m.name]
        parts = [s["draft_ms_per_round"], s["verify_ms_per_round"], s["accept_ms_per_round"]]
        total = sum(p for p in parts if p is not None) or 1.0
        cells = " | ".join("-" if p is None else f"{p:.1f} ({100 * p / total:.0f}%)" for p in parts)
        depth = " ".join(f"{a:.2f}" for a in s["accept_by_depth"])
        lines.append(f"| {m.name} | {cells} | {s['mean_tree_nodes']:.1f} | {depth} |")
    return lines


def format_table(result: BenchResult) -> str:
    """Header lines and a markdown table (paste-able into BENCHMARKS.md)."""
    lines = [*_header_lines(result.header), "", *_method_rows(result)]
    lines += _agreement_lines(result)
    lines += _profile_lines(result)
    if result.groups:
        lines += [
            "",
            "per source and category (decode tok/s: mean over prompts)",
            format_groups(result),
        ]
    if result.default_check:
        lines += ["", format_default_check(result.default_check)]
    if result.verify_cost:
        lines += ["", format_verify_cost(result.verify_cost)]
    if result.sweep is not None:
        lines += ["", format_sweep(result.sweep)]
    return "\n".join(lines)


def format_groups(result: BenchResult) -> str:
    """One line per group: decode tok/s, tokens/step and speedups of every method."""
    if not result.groups:
        return ""
    names = [m.name for m in result.methods]
    speculative = [m.name for m in result.methods if m.speculative]
    head = ["group", "prompts"] + [f"{n} tok/s" for n in names]
    head += [f"{n} tokens/step" for n in speculative]
    head += [f"{n} nodes/round" for n in speculative]
    head += [f"{n} vs ar" for n in speculative if "ar" in names]
    head += [f"{n} vs mlx-lm" for n in speculative if "mlx-lm" in names]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for key, summary in result.groups.items():
        first = summary[names[0]]
        cells = [key, str(first["num_prompts"])]
        cells += [_fmt(summary[n]["decode_tps_mean"], ".1f") for n in names]
        cells += [f"{summary[n]['tokens_per_step']:.2f}" for n in speculative]
        cells += [f"{summary[n]['mean_tree_nodes']:.1f}" for n in speculative]
        if "ar" in names:
            cells += [_fmt(summary[n]["speedup_vs_ar"], ".2f", "x") for n in speculative]
        if "mlx-lm" in names:
            cells += [_fmt(summary[n]["speedup_vs_mlx_lm"], ".2f", "x") for n in speculative]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_verify_cost(curve: list[dict]) -> str:
    lines = [
        "verify cost: one base forward over n tokens, relative to n = 1",
        "| n | ms | t(n)/t(1) |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {c['n']} | {c['ms']:.2f} | {c['ratio']:.2f} |" for c in curve]
    return "\n".join(lines)


def format_sweep(sweep: dict) -> str:
    """Speedup vs ar (tokens per step) per beam width (rows) and length (columns); one grid
    per draft method when a sampled sweep compares several (`--draft beam,sbs`)."""
    drafts = list(dict.fromkeys(c.get("draft") for c in sweep["cells"]))
    lines = []
    for draft in drafts:
        cells = {
            (c["beam_width"], c["beam_length"]): c
            for c in sweep["cells"]
            if c.get("draft") == draft
        }
        title = "sweep: decode speedup vs ar (tokens/step)"
        lines += _sweep_grid_lines(
            sweep, cells, title + (f", draft {draft}" if len(drafts) > 1 else "")
        )
    best = sweep.get("best")
    if best:
        how = f", draft {best['draft']}" if len(drafts) > 1 and best.get("draft") else ""
        lines.append(
            f"\nbest: W={best['beam_width']}, L={best['beam_length']}{how} "
            f"({_fmt(best['decode_tps_mean'], '.1f')} tok/s, "
            f"{_fmt(best['speedup_vs_ar'], '.2f', 'x')} vs ar)"
        )
    return "\n".join(lines)


def _sweep_grid_lines(sweep: dict, cells: dict, title: str) -> list[str]:
    lines = [
        title,
        "| W \\ L | " + " | ".join(str(length) for length in sweep["lengths"]) + " |",
        "|---|" + "---:|" * len(sweep["lengths"]),
    ]
    for w in sweep["widths"]:
        row = []
        for length in sweep["lengths"]:
            c = cells.get((w, length))
            if c is None:
                row.append("")
                continue
            speed = _fmt(c["speedup_vs_ar"], ".2f", "x")
            if c["speedup_vs_ar"] is None:
                speed = _fmt(c["decode_tps_mean"], ".1f", " tok/s")
            row.append(f"{speed} ({c['tokens_per_step']:.2f})")
        lines.append(f"| {w} | " + " | ".join(row) + " |")
    return lines


def format_acceptance(grid: dict, max_tokens: int) -> str:
    """Tokens per step per beam width (rows) and length (columns) of a `replay.acceptance_grid`,
    under a line saying how it was measured."""
    shapes = grid["shapes"].values()
    widths = list(dict.fromkeys(s["beam_width"] for s in shapes))
    lengths = list(dict.fromkeys(s["beam_length"] for s in shapes))
    lines = [
        f"tokens per step ({len(grid['prompts'])} prompts, {max_tokens} new tokens, greedy)",
        "",
        "| W \\ L | " + " | ".join(str(length) for length in lengths) + " |",
        "|---|" + "---:|" * len(lengths),
    ]
    for w in widths:
        cells = [f"{grid['shapes'][f'{w}x{length}']['tokens_per_step']:.2f}" for length in lengths]
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_by_kind(table: dict, overall: dict) -> str:
    """`replay.by_kind`'s table: a row per kind and one for all prompts, a column per shape."""
    shapes = list(overall["shapes"])
    lines = ["| kind | " + " | ".join(shapes) + " |", "|---|" + "---:|" * len(shapes)]
    for kind, row in table.items():
        lines.append(f"| {kind} | " + " | ".join(f"{row[s]:.2f}" for s in shapes) + " |")
    cells = [f"{overall['shapes'][s]['tokens_per_step']:.2f}" for s in shapes]
    lines.append("| **all** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchError(
            "--plot needs matplotlib: pip install 'mlx-redrafter[plot]' (or pip install matplotlib)"
        ) from None
    return plt


def plot_groups(groups: dict, methods: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Bars per source/category: each method's decode speedup against `ar` (from a result's
    or a JSON file's `groups`), tokens per step written above the speculative ones."""
    plt = _pyplot()
    keys = [k for k in groups if "/" in k] or list(groups)
    shown = [m for m in methods if m != "ar"]
    x = np.arange(len(keys))
    width = 0.8 / max(1, len(shown))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(keys) + 2), 4.2))
    for i, name in enumerate(shown):
        values = [groups[k][name]["speedup_vs_ar"] or 0.0 for k in keys]
        bars = ax.bar(x + (i - (len(shown) - 1) / 2) * width, values, width, label=name)
        if name != "mlx-lm":
            labels = [f"{groups[k][name]['tokens_per_step']:.1f}" for k in keys]
            ax.bar_label(bars, labels=labels, fontsize=6, padding=1)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(x, keys, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("decode speedup vs plain decoding (ar)")
    ax.set_title(title or "speedup per source/category (numbers: tokens per step)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _sweep_arrays(sweep: dict) -> tuple[np.ndarray, np.ndarray, str]:
    """(values, tokens per step, value key) as W x L arrays: speedup vs ar, or decode tok/s
    when a cell has no speedup (no ar in the run); NaN where a cell has no value."""
    widths, lengths = sweep["widths"], sweep["lengths"]
    value_key = "speedup_vs_ar"
    if any(c["speedup_vs_ar"] is None for c in sweep["cells"]):
        value_key = "decode_tps_mean"
    grid = np.full((len(widths), len(lengths)), np.nan)
    tps = np.full_like(grid, np.nan)
    for c in sweep["cells"]:
        i, j = widths.index(c["beam_width"]), lengths.index(c["beam_length"])
        if c[value_key] is not None:
            grid[i, j] = c[value_key]
        tps[i, j] = c["tokens_per_step"]
    return grid, tps, value_key


def _label_cells(ax, image, grid: np.ndarray, tps: np.ndarray, value_key: str) -> None:
    """Write each cell's value and tokens per step in it, in ink that reads on its colour."""
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if np.isnan(tps[i, j]):
                continue
            value = (
                "-"
                if np.isnan(grid[i, j])
                else (f"{grid[i, j]:.2f}x" if value_key == "speedup_vs_ar" else f"{grid[i, j]:.0f}")
            )
            r, g, b, _ = (
                image.cmap(image.norm(grid[i, j])) if np.isfinite(grid[i, j]) else (1, 1, 1, 1)
            )
            ink = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"
            ax.text(
                j,
                i,
                f"{value}\n{tps[i, j]:.2f} tok/step",
                ha="center",
                va="center",
                fontsize=8,
                color=ink,
            )


def plot_sweep(sweep: dict, path: str | Path, title: str = "") -> Path:
    """A heatmap PNG of the sweep: speedup vs ar per cell, tokens per step written in it."""
    plt = _pyplot()
    widths, lengths = sweep["widths"], sweep["lengths"]
    grid, tps, value_key = _sweep_arrays(sweep)
    fig, ax = plt.subplots(figsize=(1.3 * len(lengths) + 2.5, 0.9 * len(widths) + 1.8))
    if value_key == "speedup_vs_ar":
        # Centre the colours on 1x: red is slower than plain decoding, blue faster.
        span = max(np.nanmax(np.abs(grid - 1.0)) if np.isfinite(grid).any() else 0.1, 0.05)
        image = ax.imshow(grid, cmap="RdBu", vmin=1 - span, vmax=1 + span, origin="lower")
        label = "decode speedup vs ar"
    else:
        image = ax.imshow(grid, cmap="viridis", origin="lower")
        label = "decode tok/s"
    fig.colorbar(image, ax=ax, label=label)
    _label_cells(ax, image, grid, tps, value_key)
    ax.set_xticks(range(len(lengths)), [str(v) for v in lengths])
    ax.set_yticks(range(len(widths)), [str(v) for v in widths])
    ax.set_xlabel("beam length L (incl. the root token)")
    ax.set_ylabel("beam width W")
    what = "speedup vs ar" if value_key == "speedup_vs_ar" else "decode tok/s"
    ax.set_title(
        (title + "\n" if title else "") + f"ReDrafter sweep: {what} and tokens per step",
        fontsize=9,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# JSON


def strip_tokens(records: list[dict]) -> list[dict]:
    """Per-prompt records for JSON: token lists dropped (mismatches are already marked)."""
    return [
        {
            **r,
            "methods": {
                name: {k: v for k, v in run.items() if k not in ("tokens", "accepted")}
                for name, run in r["methods"].items()
            },
        }
        for r in records
    ]


def write_json(result: BenchResult, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.as_json(), indent=2) + "\n")
    return path
