"""Benchmarks: how fast ReDrafter decodes against plain decoding and mlx-lm, and what `tune`
measures. The pipeline, one module per step:

- `methods`: what is compared (`Method`, `make_methods`, `METHODS`) and the checks a request
  must pass before a model loads (`check_request`, `needs_drafter`).
- `harness`: running them (`Bench`: every method on every prompt, interleaved, timed alike;
  `benchmark`: run and summarize in one call; `load_mlx_lm` for the `mlx-lm` method).
- `report`: the `BenchResult` and what is made of it: summaries, markdown tables, PNG plots,
  JSON, the header naming the machine.
- `replay`: plain greedy references and tokens per step for many beam shapes replayed from
  them, without timing (`bench --acceptance`).
- `rsd_replay`: the same for sampled decoding (`bench --acceptance --temp`): deterministic
  beams against drafts sampled without replacement, expected tokens per step per budget.
- `tune`: the verify-cost curve and the W x L sweep behind `mlx-redrafter tune`.
- `profile_ops`: the verify forward's time by kind of op (`tune --profile-ops`).

Prompts come from `mlx_redrafter.prompts` (re-exported here: `Prompt`, `load_prompts`). Nothing
else in the package imports this one; the command line does.
"""

from __future__ import annotations

from ..accept import SamplingConfig
from ..errors import BenchError
from ..prompts import Prompt, load_prompts
from ..rsd import DRAFT_CHOICES
from .harness import WARMUP_TOKENS, Bench, benchmark, load_mlx_lm
from .methods import (
    DEFAULT_LENGTHS,
    DEFAULT_WIDTHS,
    DRAFTER_METHODS,
    METHODS,
    Method,
    beam_shapes,
    check_request,
    make_methods,
    needs_drafter,
)
from .profile_ops import CATEGORIES, format_profile, profile_forward
from .replay import (
    acceptance_grid,
    acceptance_grids,
    by_kind,
    reference_batch,
    reference_decode,
    replay_rounds,
)
from .report import (
    BenchResult,
    check_outputs,
    format_acceptance,
    format_by_kind,
    format_groups,
    format_sweep,
    format_table,
    format_verify_cost,
    make_header,
    plot_groups,
    plot_sweep,
    strip_tokens,
    summarize,
    summarize_groups,
    sweep_grid,
    write_json,
)
from .rsd_replay import LOOKUP_ONLY, DraftConfig, format_sampled_acceptance, sampled_acceptance
from .tune import TuneSettings, run_tune, verify_cost_curve

__all__ = [
    "CATEGORIES",
    "DRAFT_CHOICES",
    "DraftConfig",
    "LOOKUP_ONLY",
    "SamplingConfig",
    "format_sampled_acceptance",
    "sampled_acceptance",
    "DEFAULT_LENGTHS",
    "DEFAULT_WIDTHS",
    "DRAFTER_METHODS",
    "METHODS",
    "WARMUP_TOKENS",
    "Bench",
    "BenchError",
    "BenchResult",
    "Method",
    "Prompt",
    "acceptance_grid",
    "acceptance_grids",
    "by_kind",
    "beam_shapes",
    "benchmark",
    "check_outputs",
    "check_request",
    "format_acceptance",
    "format_by_kind",
    "format_groups",
    "format_profile",
    "format_sweep",
    "format_table",
    "format_verify_cost",
    "load_mlx_lm",
    "load_prompts",
    "make_header",
    "make_methods",
    "needs_drafter",
    "plot_groups",
    "plot_sweep",
    "profile_forward",
    "reference_batch",
    "reference_decode",
    "replay_rounds",
    "TuneSettings",
    "run_tune",
    "strip_tokens",
    "summarize",
    "summarize_groups",
    "sweep_grid",
    "verify_cost_curve",
    "write_json",
]
