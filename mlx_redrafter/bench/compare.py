"""The default against its single sources: per group of prompts, whether the default method
(`redrafter+lookup`, what `generate` runs) is slower than the best single method (`redrafter`
or `lookup` alone) by more than the run's noise, and the same comparison made noise-free with
the cost model the tree sizing uses (tokens per plain step of verify and draft work)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from ..sizing import default_cost_curve
from .methods import DEFAULT_METHOD, SINGLE_METHODS, Method

NOISE_FLOOR = 0.03  # a ratio within 3% of 1 is never flagged, whatever the spread
# two timings of the same work: how far a per-prompt speed ratio strays by noise alone
TWIN_METHODS = ("ar", "mlx-lm")
DRAFT_COST = 0.1  # the drafter's time in plain steps for the model (measured: 0.08-0.10)


def group_records(records: list[dict]) -> dict[str, list[dict]]:
    """Records per source and per source/category (the bench's groups)."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        source = r.get("source") or "prompts"
        groups.setdefault(source, []).append(r)
        groups.setdefault(f"{source}/{r.get('category') or '-'}", []).append(r)
    return groups


def modelled_steps(run: dict, curve: Sequence[float]) -> float:
    """A run's time in plain steps by the cost model: every round c(its nodes), plus the
    drafter's cost where it ran; a run with no rounds (plain decoding) one step a token."""
    nodes = run.get("nodes") or []
    if not nodes:
        return float(run["num_tokens"])
    cost = sum(curve[min(n, len(curve)) - 1] for n in nodes)
    return cost + DRAFT_COST * run.get("drafter_rounds", 0)


def modelled_speed(runs: list[dict], curve: Sequence[float]) -> float:
    """Tokens per plain step of modelled time over the runs (the first token, out of the
    prefill, not counted)."""
    tokens = sum(max(0, r["num_tokens"] - 1) for r in runs)
    steps = sum(modelled_steps(r, curve) for r in runs)
    return tokens / steps if steps > 0 else 0.0


def ratio_noise(records: list[dict]) -> float | None:
    """The spread (standard deviation) of one per-prompt speed ratio due to timing noise
    alone: that of ar / mlx-lm over the run's prompts (two implementations of the same
    computation, whose true ratio is one number), or None without both."""
    ratios = []
    for r in records:
        a, b = (r["methods"].get(n, {}).get("decode_tps") for n in TWIN_METHODS)
        if a and b:
            ratios.append(a / b)
    if len(ratios) < 2:
        return None
    return statistics.stdev(ratios) / statistics.fmean(ratios)


def default_check(records: list[dict], methods: Sequence[Method]) -> list[dict]:
    """Per group: the best single method by mean decode speed, the default's speed relative to
    it (mean of per-prompt ratios) and its noise: twice the standard error of that mean, from
    the group's own spread or, when the run has ar and mlx-lm, from the run's timing noise
    (`ratio_noise`) if that is larger; at least NOISE_FLOOR. Also the same ratio by the cost
    model, and `flag` where the default is below the best single method by more than the
    noise. [] unless the run has the default and a single method."""
    names = {m.name for m in methods}
    singles = [n for n in SINGLE_METHODS if n in names]
    if DEFAULT_METHOD not in names or not singles:
        return []
    curve = default_cost_curve("cpu")
    timing = ratio_noise(records) or 0.0
    out = []
    groups = group_records(records)
    if len(groups) > 2:
        groups = {"all": records, **groups}
    for key, group in groups.items():

        def speed(name, runs=group):
            values = [r["methods"][name]["decode_tps"] or 0.0 for r in runs]
            return statistics.fmean(values)

        best = max(singles, key=speed)
        ratios = []
        for r in group:
            ours, theirs = (
                r["methods"][DEFAULT_METHOD]["decode_tps"],
                r["methods"][best]["decode_tps"],
            )
            if ours and theirs:
                ratios.append(ours / theirs)
        if not ratios:
            continue
        ratio = statistics.fmean(ratios)
        own = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
        noise = max(2 * max(own, timing) / len(ratios) ** 0.5, NOISE_FLOOR)
        runs = {n: [r["methods"][n] for r in group] for n in (DEFAULT_METHOD, *singles)}
        modelled = {n: modelled_speed(v, curve) for n, v in runs.items()}
        best_modelled = max(modelled[n] for n in singles)
        out.append(
            {
                "group": key,
                "prompts": len(group),
                "best_single": best,
                "ratio": ratio,
                "noise": noise,
                "flag": ratio < 1.0 - noise,
                "modelled": modelled,
                "modelled_ratio": modelled[DEFAULT_METHOD] / best_modelled
                if best_modelled
                else None,
            }
        )
    return out


def format_default_check(rows: list[dict]) -> str:
    """A markdown table of `default_check`, flagged groups marked."""
    if not rows:
        return ""
    lines = [
        f"{DEFAULT_METHOD} (the default) against the best single method, per group "
        "(speed: mean of per-prompt ratios ± noise; modelled: by the cost model, noise-free)",
        "| group | prompts | best single | default / best (speed) | default / best (modelled) "
        "| flag |",
        "|---|---:|---|---:|---:|---|",
    ]
    for row in rows:
        modelled = row["modelled_ratio"]
        lines.append(
            f"| {row['group']} | {row['prompts']} | {row['best_single']} | "
            f"{row['ratio']:.2f} ± {row['noise']:.2f} | "
            f"{'-' if modelled is None else f'{modelled:.2f}'} | "
            f"{'**below the best single method**' if row['flag'] else ''} |"
        )
    return "\n".join(lines)
