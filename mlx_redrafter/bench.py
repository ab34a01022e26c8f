"""Benchmark harness: ReDrafter against plain decoding (`ar`) and mlx-lm on the same prompts.

One process and one model directory. Every method runs every prompt (first turn, chat
template, greedy) after a warm-up, with the methods interleaved per prompt (in a rotating
order) so that machine noise hits all of them alike, and every method's tokens are timed here
the same way: decode tok/s = (n - 1) / (t_last - t_first), prefill tok/s = prompt tokens /
time to the first token, end-to-end tok/s = n / (t_last - t_start).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .acceptance import reference_batch
from .env import machine, model_dtype, now
from .errors import BenchError
from .generation import stream_generate
from .prompts import Prompt, encode_chat, encode_messages, eos_ids

METHODS = ("mlx-lm", "ar", "redrafter", "lookup", "redrafter+lookup")
DEFAULT_WIDTHS = (1, 2, 3, 4)
DEFAULT_LENGTHS = (2, 3, 4, 5, 6)
WARMUP_TOKENS = 16


# ---------------------------------------------------------------------------------------------
# Prompts and methods


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "mlx-lm", "ar", "redrafter" (drafter, maybe with lookup) or "lookup"
    beam_width: int | None = None
    beam_length: int | None = None
    lookup: bool = False  # context lookup candidates (with the cost-aware tree)

    @property
    def speculative(self) -> bool:
        return self.kind in ("redrafter", "lookup")


def make_methods(
    names: Sequence[str], shapes: Sequence[tuple[int, int]], sweep: bool = False
) -> list[Method]:
    """Methods in the order given; `redrafter` becomes one method per beam shape in a sweep."""
    out = []
    for name in names:
        if name not in METHODS:
            raise BenchError(f"unknown method {name!r} (choose from {', '.join(METHODS)})")
        if name not in ("redrafter", "redrafter+lookup"):
            out.append(Method(name, name, lookup=name == "lookup"))
            continue
        for w, length in shapes:
            if w < 1 or length < 2:
                raise BenchError(f"beam shape W={w}, L={length}: need W >= 1 and L >= 2")
            label = f"{name}-W{w}-L{length}" if sweep else name
            out.append(Method(label, "redrafter", w, length, lookup=name != "redrafter"))
    if len({m.name for m in out}) != len(out):
        raise BenchError(f"a method is listed twice: {', '.join(names)}")
    return out


def _nbytes(module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class BenchResult:
    header: dict
    methods: list[Method]
    prompts: list[dict]  # per prompt: id, category, prompt_tokens, methods: {name: figures}
    summary: dict = field(default_factory=dict)  # name -> aggregate figures
    verify_cost: list[dict] | None = None
    sweep: dict | None = None
    groups: dict = field(default_factory=dict)  # "source" or "source/category" -> summary

    def as_json(self) -> dict:
        out = {"header": self.header, "methods": self.summary, "prompts": self.prompts}
        if self.groups:
            out["groups"] = self.groups
        if self.sweep is not None:
            out["sweep"] = self.sweep
        if self.verify_cost is not None:
            out["verify_cost"] = self.verify_cost
        return out


class Bench:
    """Runs methods on prompts. `mlx_lm_model`/`mlx_lm_tokenizer` are needed for `mlx-lm`,
    `drafter` for `redrafter`."""

    def __init__(
        self,
        model,
        tokenizer,
        drafter=None,
        mlx_lm_model=None,
        mlx_lm_tokenizer=None,
        max_tokens: int = 128,
        profile: bool = False,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.drafter = drafter
        self.lm_model = mlx_lm_model
        self.lm_tokenizer = mlx_lm_tokenizer
        self.max_tokens = max_tokens
        self.profile = profile
        # Every method stops at the first token any of the tokenizers calls an end.
        self.eos = eos_ids(tokenizer) | (eos_ids(mlx_lm_tokenizer) if mlx_lm_tokenizer else set())
        self._weights = {"ours": _nbytes(model)}
        if drafter is not None:
            self._weights["drafter"] = _nbytes(drafter)
        if mlx_lm_model is not None:
            self._weights["mlx-lm"] = _nbytes(mlx_lm_model)

    def check(self, methods: Sequence[Method]) -> None:
        kinds = {m.kind for m in methods}
        if "redrafter" in kinds and self.drafter is None:
            raise BenchError("the redrafter method needs a drafter: pass --drafter")
        if "mlx-lm" in kinds and self.lm_model is None:
            raise BenchError("the mlx-lm method needs mlx-lm's model (mlx_lm.load)")

    def _stream(self, method: Method, ids: list[int], max_tokens: int) -> Iterator[tuple]:
        """(token, stats or None) per generated token."""
        if method.kind == "mlx-lm":
            from mlx_lm.generate import stream_generate as mlx_lm_stream_generate

            for r in mlx_lm_stream_generate(
                self.lm_model, self.lm_tokenizer, ids, max_tokens=max_tokens
            ):
                yield r.token, None
            return
        drafter = self.drafter if method.kind == "redrafter" else None
        for r in stream_generate(
            self.model,
            self.tokenizer,
            ids,
            drafter,
            max_tokens=max_tokens,
            beam_width=method.beam_width,
            beam_length=method.beam_length,
            lookup=method.lookup,
            profile=self.profile,
        ):
            yield r.token, r.stats

    def _weights_of(self, method: Method) -> int:
        if method.kind == "mlx-lm":
            return self._weights["mlx-lm"]
        return self._weights["ours"] + (
            self._weights.get("drafter", 0) if method.kind == "redrafter" else 0
        )

    def run_one(self, method: Method, ids: list[int], max_tokens: int | None = None) -> dict:
        """Generate greedily from `ids`; the figures of this run (and its tokens)."""
        max_tokens = max_tokens or self.max_tokens
        tokens: list[int] = []
        stats = None
        mx.synchronize()
        active = mx.get_active_memory()
        mx.reset_peak_memory()
        stream = self._stream(method, ids, max_tokens)
        t_start = time.perf_counter()
        t_first = t_last = t_start
        try:
            for token, s in stream:
                t_last = time.perf_counter()
                if not tokens:
                    t_first = t_last
                tokens.append(token)
                stats = s
                if token in self.eos or len(tokens) >= max_tokens:
                    break
        finally:
            stream.close()
        peak = mx.get_peak_memory()
        n = len(tokens)
        ttft = t_first - t_start
        decode_time = t_last - t_first
        out = {
            "prompt_tokens": len(ids),
            "num_tokens": n,
            "finish_reason": "stop" if tokens and tokens[-1] in self.eos else "length",
            "ttft_s": ttft,
            "decode_time_s": decode_time,
            "total_time_s": t_last - t_start,
            "prefill_tps": len(ids) / ttft if ttft > 0 else 0.0,
            "decode_tps": (n - 1) / decode_time if n > 1 and decode_time > 0 else None,
            "e2e_tps": n / (t_last - t_start) if t_last > t_start else 0.0,
            # What running this method alone would need: its weights plus the run's peak
            # above what was allocated before it (both models are loaded in this process).
            "peak_memory_gb": (self._weights_of(method) + max(0, peak - active)) / 1e9,
            "tokens": tokens,
        }
        rounds = list(stats.accepted) if stats is not None and method.speculative else []
        out["rounds"] = len(rounds)
        out["accepted"] = rounds
        out["tokens_per_step"] = (sum(rounds) + len(rounds)) / len(rounds) if rounds else 1.0
        if method.speculative:
            out["beam_width"] = method.beam_width
            out["beam_length"] = method.beam_length
            out["accepted_from"] = dict(stats.accepted_from) if stats is not None else {}
            out["drafter_rounds"] = stats.drafter_rounds if stats is not None else 0
            out["accept_by_depth"] = stats.accept_by_depth if stats is not None else []
            out["draft_time_s"] = stats.draft_time if stats is not None else 0.0
            out["verify_time_s"] = stats.verify_time if stats is not None else 0.0
            out["accept_time_s"] = stats.accept_time if stats is not None else 0.0
            out["mean_tree_nodes"] = stats.tree_nodes / max(1, len(rounds)) if stats else 0.0
        return out

    def encode(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """Chat-template ids per prompt; earlier turns are answered first by the model's own
        greedy plain decoding (all prompts in one batched generation per turn)."""
        history = [[] for _ in prompts]  # messages so far
        depth = max((len(p.before) for p in prompts), default=0)
        for turn in range(depth):
            rows = [i for i, p in enumerate(prompts) if len(p.before) > turn]
            asks = []
            for i in rows:
                history[i].append({"role": "user", "content": prompts[i].before[turn]})
                asks.append(encode_messages(self.tokenizer, history[i]))
            for i, (ref, limit, _) in zip(
                rows,
                reference_batch(self.model, self.tokenizer, asks, self.max_tokens, 0),
                strict=True,
            ):
                answer = [t for t in ref[:limit] if t not in self.eos]
                history[i].append({"role": "assistant", "content": self.tokenizer.decode(answer)})
        return [
            encode_messages(self.tokenizer, messages + [{"role": "user", "content": p.text}])
            if messages
            else encode_chat(self.tokenizer, p.text)
            for p, messages in zip(prompts, history, strict=True)
        ]

    def run(
        self,
        prompts: Sequence[Prompt],
        methods: Sequence[Method],
        warmup: bool = True,
        progress: Callable[[str], None] | None = None,
    ) -> list[dict]:
        """Every method on every prompt; per-prompt records (tokens included)."""
        self.check(methods)
        encoded = self.encode(prompts)
        if warmup:
            for method in methods:
                self.run_one(method, encoded[0], min(WARMUP_TOKENS, self.max_tokens))
        records = []
        for i, (prompt, ids) in enumerate(zip(prompts, encoded, strict=True)):
            k = i % len(methods)
            order = list(methods[k:]) + list(methods[:k])
            figures = {}
            for method in order:
                figures[method.name] = self.run_one(method, ids)
                if progress is not None:
                    progress(method.name)
            records.append(
                {
                    "id": prompt.id,
                    "category": prompt.category,
                    "source": prompt.source,
                    "prompt_tokens": len(ids),
                    "methods": {m.name: figures[m.name] for m in methods},
                }
            )
        return records


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


def summarize(records: list[dict], methods: Sequence[Method]) -> dict:
    """Aggregate figures per method, with the key names of the JSON output."""
    ref = check_outputs(records, methods)
    match_key = "matches_" + ref.replace("-", "_")
    summary = {}
    for m in methods:
        runs = [r["methods"][m.name] for r in records]
        decode = [r["decode_tps"] for r in runs if r["decode_tps"] is not None]
        tokens = sum(r["num_tokens"] for r in runs)
        rounds = sum(r["rounds"] for r in runs)
        accepted = [a for r in runs for a in r["accepted"]]
        entry = {
            "decode_tps_mean": statistics.fmean(decode) if decode else None,
            "decode_tps_median": statistics.median(decode) if decode else None,
            "e2e_tps": tokens / sum(r["total_time_s"] for r in runs)
            if sum(r["total_time_s"] for r in runs) > 0
            else None,
            "prefill_tps": sum(r["prompt_tokens"] for r in runs) / sum(r["ttft_s"] for r in runs)
            if sum(r["ttft_s"] for r in runs) > 0
            else None,
            "tokens_per_step": (sum(accepted) + rounds) / rounds if rounds else 1.0,
            "peak_memory_gb": max(r["peak_memory_gb"] for r in runs),
            "speedup_vs_ar": None,
            "speedup_vs_mlx_lm": None,
            "num_prompts": len(runs),
            "generated_tokens": tokens,
            "mismatches_vs_" + ref.replace("-", "_"): sum(not r[match_key] for r in runs),
        }
        if m.speculative:
            L = max(accepted, default=0) + 1 if m.beam_length is None else m.beam_length
            entry["beam_width"] = m.beam_width
            entry["beam_length"] = m.beam_length
            entry["accepted_from"] = {}
            for r in runs:
                for source, n in r.get("accepted_from", {}).items():
                    entry["accepted_from"][source] = entry["accepted_from"].get(source, 0) + n
            entry["drafter_round_fraction"] = (
                sum(r.get("drafter_rounds", 0) for r in runs) / rounds if rounds else 0.0
            )
            entry["accept_by_depth"] = [
                sum(a >= d for a in accepted) / len(accepted) if accepted else 0.0
                for d in range(1, L)
            ]
            entry["mean_tree_nodes"] = (
                sum(r["mean_tree_nodes"] * r["rounds"] for r in runs) / rounds if rounds else 0.0
            )
            for part in ("draft", "verify", "accept"):
                total = sum(r[f"{part}_time_s"] for r in runs)
                entry[f"{part}_ms_per_round"] = 1e3 * total / rounds if rounds else None
        summary[m.name] = entry
    for base, key in (("ar", "speedup_vs_ar"), ("mlx-lm", "speedup_vs_mlx_lm")):
        ref_tps = summary.get(base, {}).get("decode_tps_mean")
        for entry in summary.values():
            if ref_tps and entry["decode_tps_mean"] is not None:
                entry[key] = entry["decode_tps_mean"] / ref_tps
    return summary


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
# Output


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_table(result: BenchResult) -> str:
    """Header lines and a markdown table (paste-able into BENCHMARKS.md)."""
    h = result.header
    lines = [
        f"device: {h['device']} · dtype {h['dtype']} · BLAS {h['blas'].split(' (')[0]} · "
        f"mlx {h['mlx']} · mlx-lm {h['mlx_lm']} · mlx-redrafter {h['mlx_redrafter']}",
        f"model: {h['model']}",
        f"drafter: {h['drafter'] or 'none'}",
        f"prompts: {h['prompts']} ({h['num_prompts']}, first turn, chat template), "
        f"max {h['max_tokens']} new tokens, greedy",
        "",
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
    ref = _reference(result.methods)
    key = "mismatches_vs_" + ref.replace("-", "_")
    others = [m.name for m in result.methods if m.name != ref]
    if others:
        n = len(result.prompts)
        bad = {name: result.summary[name][key] for name in others}
        if not any(bad.values()):
            lines.append(f"\ngreedy outputs identical to {ref} on {n}/{n} prompts: all methods")
        else:
            detail = ", ".join(f"{name} differs on {k}/{n}" for name, k in bad.items() if k)
            lines.append(f"\ngreedy outputs vs {ref}: {detail}")
    profiled = [m for m in result.methods if m.speculative and h.get("profile")]
    if profiled:
        lines += [
            "",
            "| method | draft ms/round | verify ms/round | accept+commit ms/round "
            "| tree nodes | acceptance by depth |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for m in profiled:
            s = result.summary[m.name]
            parts = [s["draft_ms_per_round"], s["verify_ms_per_round"], s["accept_ms_per_round"]]
            total = sum(p for p in parts if p is not None) or 1.0
            cells = " | ".join(
                "-" if p is None else f"{p:.1f} ({100 * p / total:.0f}%)" for p in parts
            )
            depth = " ".join(f"{a:.2f}" for a in s["accept_by_depth"])
            lines.append(f"| {m.name} | {cells} | {s['mean_tree_nodes']:.1f} | {depth} |")
    if result.groups:
        lines += [
            "",
            "per source and category (decode tok/s: mean over prompts)",
            format_groups(result),
        ]
    if result.verify_cost:
        lines += ["", format_verify_cost(result.verify_cost)]
    if result.sweep is not None:
        lines += ["", format_sweep(result.sweep)]
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
    """Speedup vs ar (tokens per step) per beam width (rows) and length (columns)."""
    cells = {(c["beam_width"], c["beam_length"]): c for c in sweep["cells"]}
    lines = [
        "sweep: decode speedup vs ar (tokens/step)",
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
    best = sweep.get("best")
    if best:
        lines.append(
            f"\nbest: W={best['beam_width']}, L={best['beam_length']} "
            f"({_fmt(best['decode_tps_mean'], '.1f')} tok/s, "
            f"{_fmt(best['speedup_vs_ar'], '.2f', 'x')} vs ar)"
        )
    return "\n".join(lines)


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
    import numpy as np

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


def plot_sweep(sweep: dict, path: str | Path, title: str = "") -> Path:
    """A heatmap PNG of the sweep: speedup vs ar per cell, tokens per step written in it."""
    plt = _pyplot()
    import numpy as np

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
    for i in range(len(widths)):
        for j in range(len(lengths)):
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


# ---------------------------------------------------------------------------------------------
# One call for the CLI and for `tune`


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


def benchmark(
    bench: Bench,
    prompts: Sequence[Prompt],
    methods: Sequence[Method],
    header: dict,
    sweep: bool = False,
    progress: Callable[[str], None] | None = None,
    warmup: bool = True,
) -> BenchResult:
    """Run, check outputs, summarize; a result ready for `format_table` and `write_json`."""
    records = bench.run(prompts, methods, warmup=warmup, progress=progress)
    summary = summarize(records, methods)
    result = BenchResult(header, list(methods), strip_tokens(records), summary)
    result.groups = summarize_groups(records, methods)
    if sweep:
        result.sweep = sweep_grid(summary, methods)
    return result
