"""The measurements behind `mlx-redrafter tune`: the verify-cost curve and a short W x L sweep
(what they find is stored by `defaults`)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..accept import SamplingConfig
from ..defaults import save_cost_curve, save_tuned_beam
from ..env import fast_path, now
from ..generation import verify_tree
from ..tree import pack_beams
from .harness import Bench, benchmark
from .methods import beam_shapes, make_methods
from .profile_ops import prefilled_cache
from .report import make_header


def verify_cost_curve(
    model,
    max_nodes: int = 32,
    context: int = 256,
    repeats: int = 5,
    seed: int = 0,
) -> list[dict]:
    """Time one base forward over n tokens after `context` committed ones, n = 1..max_nodes.

    n = 1 is a plain decode step (no mask); n > 1 is `generation.verify_tree` over a chain of n
    nodes (explicit positions and a boolean mask, logits for every node). Each n is timed
    `repeats` times, the sizes interleaved so that drift hits them alike. Returns
    [{"n", "ms", "ratio"}] with the median time and ratio = t(n) / t(1): ReDrafter pays off
    when tokens per step beats the ratio at its tree size (plus the drafter's share).
    """
    if max_nodes < 1 or repeats < 1:
        raise ValueError(f"max_nodes and repeats must be >= 1, got {max_nodes} and {repeats}")
    limit = model.context_length
    if limit:
        context = max(1, min(context, limit - max_nodes))
    rng = np.random.default_rng(seed)
    vocab = model.args.vocab_size
    cache = prefilled_cache(model, context, rng)

    # n = 1: a plain decode step. n > 1: a chain of n draft nodes verified as generation.py does.
    trees = {n: pack_beams(rng.integers(0, vocab, (1, n))) for n in range(2, max_nodes + 1)}
    token = mx.array([[int(rng.integers(0, vocab))]], dtype=mx.int32)  # (1, 1)

    def forward(n: int) -> float:
        start = time.perf_counter()
        if n == 1:
            mx.eval(model(token, cache))
        else:
            mx.eval(verify_tree(model, cache, trees[n]))
        elapsed = time.perf_counter() - start
        cache.trim(0)  # drop the n pending entries
        return elapsed

    sizes = list(range(1, max_nodes + 1))
    for n in sizes:  # warm-up: allocations and first-call costs
        forward(n)
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for r in range(repeats):
        for n in sizes if r % 2 == 0 else reversed(sizes):
            times[n].append(forward(n))
    t1 = statistics.median(times[1])
    return [
        {"n": n, "ms": 1e3 * statistics.median(times[n]), "ratio": statistics.median(times[n]) / t1}
        for n in sizes
    ]


def _tuned_record(best: dict, curve: list[dict], drafter_path, num_prompts: int, max_tokens: int):
    """What is stored beside a tuned shape: its figures and what they were measured with."""
    out = {
        "decode_tps": best["decode_tps_mean"],
        "speedup_vs_ar": best["speedup_vs_ar"],
        "tokens_per_step": best["tokens_per_step"],
        "drafter": str(drafter_path) if drafter_path else None,
        "num_prompts": num_prompts,
        "max_tokens": max_tokens,
        "verify_cost": [round(c["ratio"], 4) for c in curve],
        "fast_path": fast_path(),
        "mlx": mx.__version__,
        "tuned_at": now(),
    }
    if not curve:
        del out["verify_cost"]  # a sampled sweep measures no curve
    return out


@dataclass(frozen=True)
class TuneSettings:
    """What `tune` measures: the W x L grid, tokens per prompt, the curve's largest node
    count (0: no curve) and timing repeats, and whether the result is stored. With a sampling
    rule that is not greedy the sweep samples (once per seed) and finds the shape for sampled
    requests: stored beside the greedy one, with no curve (the curve does not depend on it)."""

    widths: tuple[int, ...] = (1, 2, 3, 4)
    lengths: tuple[int, ...] = (3, 4, 5, 6)
    max_tokens: int = 64
    curve_nodes: int = 32
    repeats: int = 5
    save: bool = True
    sampling: SamplingConfig = SamplingConfig()
    seeds: tuple[int, ...] = (0,)

    @property
    def sampled(self) -> bool:
        return not self.sampling.greedy


def run_tune(
    model,
    tokenizer,
    drafter,
    prompts,
    model_path,
    drafter_path=None,
    settings: TuneSettings = TuneSettings(),
    progress=None,
) -> dict:
    """Measure the verify-cost curve and sweep W x L (with `ar` as the baseline) on `prompts`;
    store the shape with the best decode tok/s for this device and model (unless
    settings.save is False).

    Returns {"verify_cost", "result" (a BenchResult), "best", "saved_to"}.
    """
    widths, lengths, max_tokens = settings.widths, settings.lengths, settings.max_tokens
    curve_nodes, repeats, save = settings.curve_nodes, settings.repeats, settings.save
    if settings.sampled:
        curve_nodes = 0
    curve = verify_cost_curve(model, max_nodes=curve_nodes, repeats=repeats) if curve_nodes else []
    methods = make_methods(["ar", "redrafter"], beam_shapes(widths, lengths), sweep=True)
    runner = Bench(
        model, tokenizer, drafter, max_tokens=max_tokens,
        sampling=settings.sampling, seeds=settings.seeds,
    )  # fmt: skip
    header = make_header(
        model,
        model_path,
        drafter_path,
        prompts="tune",
        num_prompts=len(prompts),
        max_tokens=max_tokens,
        methods=methods,
    )
    result = benchmark(runner, prompts, methods, header, sweep=True, progress=progress)
    result.verify_cost = curve or None
    best = result.sweep["best"]
    saved_to = None
    if save and best is not None:
        extra = _tuned_record(best, curve, drafter_path, len(prompts), max_tokens)
        if settings.sampled:
            s = settings.sampling
            extra.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
        shape = (best["beam_width"], best["beam_length"])
        saved_to = save_tuned_beam(model_path, *shape, extra, sampled=settings.sampled)
    elif save and curve:
        saved_to = save_cost_curve(model_path, curve)
    return {
        "verify_cost": curve,
        "result": result,
        "best": best,
        "saved_to": saved_to,
        "sampled": settings.sampled,
    }
