"""`mlx-redrafter bench` (decode speed per method, sweeps, acceptance grids) and `tune` (the
best beam shape for this device and model, stored for chat and generate)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from mlx_redrafter import bench as bench_lib
from mlx_redrafter.cli.common import (
    BeamLength,
    BeamWidth,
    Drafter,
    Loaded,
    Model,
    check_beam_options,
    check_options,
    friendly_errors,
    int_list,
    load_for,
    progress_bar,
)
from mlx_redrafter.distributed import is_leader
from mlx_redrafter.drafter import load_drafter
from mlx_redrafter.env import model_dtype
from mlx_redrafter.errors import RedrafterError
from mlx_redrafter.prompts import encode_chat, load_prompts, select_categories

Json = Annotated[str | None, typer.Option("--json", help="Write every figure to this file.")]
MaxTokens = Annotated[int, typer.Option("--max-tokens", "-n", help="New tokens per prompt.")]


@friendly_errors
def bench(
    model: Model = None,
    drafter: Drafter = None,
    prompts: Annotated[
        str,
        typer.Option(
            "--prompts",
            help="Comma-separated sources: mt-bench (first turns), mt-bench-2 (second turns "
            "after the model's own first answer), doc-prompts (prompts carrying a document), "
            "edit (a function + an edit instruction), agent (the last turn of an agent loop), "
            "or a .jsonl file (first of `turns`, or `prompt`).",
        ),
    ] = "mt-bench",
    num_prompts: Annotated[
        int | None, typer.Option("--num-prompts", "-N", help="First N only.")
    ] = None,
    per_category: Annotated[
        int | None,
        typer.Option("--per-category", help="The first K prompts of each category only."),
    ] = None,
    categories: Annotated[
        str | None,
        typer.Option(
            "--category",
            help="Comma-separated categories: only their prompts (e.g. humanities,translate), "
            "after --num-prompts and --per-category.",
        ),
    ] = None,
    max_tokens: MaxTokens = 128,
    methods: Annotated[
        str,
        typer.Option(
            "--methods",
            help="Comma-separated: mlx-lm, ar, redrafter (drafter alone), lookup (context lookup "
            "alone), redrafter+lookup (both, cost-aware tree: the default, what generate runs); "
            "lookup-v1 and redrafter+lookup-v1 (lookup v1), lookup+memory and "
            "redrafter+lookup+memory (also copying from the run's earlier prompts and answers). "
            "With redrafter+lookup and a single method, groups where the default is slower are "
            "flagged.",
        ),
    ] = "mlx-lm,ar,redrafter,lookup,redrafter+lookup",
    beam_width: BeamWidth = None,
    beam_length: BeamLength = None,
    sweep: Annotated[bool, typer.Option("--sweep", help="Run redrafter for every W x L.")] = False,
    widths: Annotated[str, typer.Option("--widths", help="Beam widths of the sweep.")] = "1,2,3,4",
    lengths: Annotated[
        str, typer.Option("--lengths", help="Beam lengths of the sweep.")
    ] = "2,3,4,5,6",
    json_out: Json = None,
    plot: Annotated[
        str | None,
        typer.Option(
            "--plot",
            help="PNG: the heatmap of a sweep (default with --sweep: bench-sweep.png), else "
            "speedups per source/category.",
        ),
    ] = None,
    profile: Annotated[
        bool,
        typer.Option(
            "--profile", help="Time draft/verify/accept per round; add the verify-cost curve."
        ),
    ] = False,
    acceptance: Annotated[
        bool,
        typer.Option(
            "--acceptance",
            help="Only tokens per step, for every --widths x --lengths shape, replayed from one "
            "greedy decode per prompt (no timing).",
        ),
    ] = False,
    compare: Annotated[
        list[str] | None,
        typer.Option(
            "--compare",
            help="With --acceptance: more drafter directories replayed over the same "
            "references (repeat the option).",
        ),
    ] = None,
    with_lookup: Annotated[
        bool,
        typer.Option(
            "--with-lookup",
            help="With --acceptance --temp: every draft also with a context-lookup branch, "
            "and lookup alone, at each shape.",
        ),
    ] = False,
    dtype: Annotated[str | None, typer.Option(help="Cast the models to this dtype.")] = None,
    temp: Annotated[
        float, typer.Option("--temp", help="Sampling temperature for every method (0: greedy).")
    ] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling (1.0: off).")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", help="Top-k sampling (0: off).")] = 0,
    seeds: Annotated[
        str,
        typer.Option(
            "--seed",
            help="Comma-separated seeds; when sampling, every prompt runs once per seed and "
            "the tables give the mean (and the spread over seeds).",
        ),
    ] = "0",
    draft_methods: Annotated[
        str | None,
        typer.Option(
            "--draft",
            help="When sampling, how the drafter drafts: beam (deterministic beams), sbs "
            "(stochastic beam search) or gumbel-topk (sampled without replacement); comma-"
            "separated to compare (default: the engine's choice; with --acceptance all three).",
        ),
    ] = None,
):
    """Decode speed of ReDrafter against plain decoding and mlx-lm, on the same prompts."""
    names = [m.strip() for m in methods.split(",") if m.strip()]
    check_options(num_prompts=(num_prompts, 1), max_tokens=(max_tokens, 1))
    check_beam_options(beam_width, beam_length)
    sampling, seed_list, drafts = _sampling_options(temp, top_p, top_k, seeds, draft_methods)
    prompt_list = select_categories(load_prompts(prompts, num_prompts, per_category), categories)
    bench_lib.check_request(names, prompt_list, sweep, beam_width, beam_length, plot)
    if with_lookup and (not acceptance or sampling.greedy):
        raise RedrafterError("--with-lookup needs --acceptance and --temp above 0")
    no_drafter = not bench_lib.needs_drafter(names)
    loaded = load_for(model, dtype, drafter, no_drafter, beam_width, beam_length)
    if acceptance:
        if loaded.draft is None:
            raise RedrafterError("--acceptance needs a drafter: pass --drafter")
        if not sampling.greedy:
            if compare:
                raise RedrafterError("--compare replays greedy decoding; drop --temp")
            configs = _draft_configs(_shapes(widths, lengths), drafts, with_lookup)
            return _sampled_acceptance(
                loaded, prompt_list, configs, sampling, seed_list, max_tokens, json_out
            )
        others = [load_drafter(path, base=loaded.base) for path in compare or []]
        shapes = _shapes(widths, lengths)
        return _acceptance(loaded, others, compare or [], prompt_list, shapes, max_tokens, json_out)
    if compare:
        raise RedrafterError("--compare needs --acceptance")
    shapes = _shapes(widths, lengths) if sweep else [(loaded.beam_width, loaded.beam_length)]
    method_list = bench_lib.make_methods(names, shapes, sweep=sweep, drafts=drafts)
    lm_model, lm_tokenizer = (
        bench_lib.load_mlx_lm(loaded.model_path, dtype) if "mlx-lm" in names else (None, None)
    )
    runner = bench_lib.Bench(
        loaded.base,
        loaded.tokenizer,
        loaded.draft,
        lm_model,
        lm_tokenizer,
        max_tokens=max_tokens,
        profile=profile,
        sampling=sampling,
        seeds=seed_list,
    )
    runner.check(method_list)
    header = bench_lib.make_header(
        loaded.base,
        loaded.model_path,
        loaded.drafter_path,
        prompts=prompts,
        num_prompts=len(prompt_list),
        max_tokens=max_tokens,
        methods=method_list,
        profile=profile,
        command="mlx-redrafter " + " ".join(sys.argv[1:]),
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        seeds=seed_list if not sampling.greedy else [],
    )
    runs = len(prompt_list) * (1 if sampling.greedy else len(seed_list))
    bar, advance = progress_bar(runs * len(method_list), "bench")
    with bar:
        result = bench_lib.benchmark(
            runner, prompt_list, method_list, header, sweep=sweep, progress=advance
        )
    if profile:
        result.verify_cost = bench_lib.verify_cost_curve(loaded.base)
    typer.echo(bench_lib.format_table(result))
    if json_out and is_leader():
        typer.echo(f"\nwrote {bench_lib.write_json(result, json_out)}")
    _plot(
        result,
        method_list,
        sweep,
        plot,
        f"{loaded.model_path.name} · {header['device']} · {header['dtype']}",
    )


def _plot(result, method_list, sweep: bool, plot: str | None, title: str) -> None:
    """The sweep's heatmap (always with --sweep), else the speedups per group with --plot."""
    if not is_leader():  # under mlx.launch, rank 0 writes the files
        return
    if sweep:
        png = bench_lib.plot_sweep(result.sweep, plot or "bench-sweep.png", title=title)
        typer.echo(f"wrote {png}")
    elif plot:
        if not result.groups:
            raise RedrafterError(
                "--plot needs a --sweep, or prompts from several sources/categories"
            )
        png = bench_lib.plot_groups(result.groups, [m.name for m in method_list], plot, title)
        typer.echo(f"wrote {png}")


def _sampling_options(temp: float, top_p: float, top_k: int, seeds: str, drafts: str | None):
    """(SamplingConfig, seeds, draft methods or None) from the options, checked."""
    sampling = bench_lib.SamplingConfig(temp, top_p, top_k)
    sampling.validate()
    seed_list = int_list(seeds, "--seed")
    draft_list = None
    if drafts is not None:
        draft_list = [d.strip() for d in drafts.split(",") if d.strip()]
        bad = [d for d in draft_list if d not in bench_lib.DRAFT_CHOICES]
        if bad or not draft_list:
            raise RedrafterError(
                f"--draft takes {', '.join(bench_lib.DRAFT_CHOICES)}, got {drafts!r}"
            )
    return sampling, seed_list, draft_list


def _draft_configs(shapes, drafts, with_lookup: bool) -> list:
    """The sampled replay's configurations: every shape x draft method, and with lookup each
    of them with a lookup branch too, plus lookup alone once per beam length."""
    configs = [
        bench_lib.DraftConfig(d, w, length, lookup)
        for w, length in shapes
        for lookup in ((False, True) if with_lookup else (False,))
        for d in drafts or bench_lib.DRAFT_CHOICES
    ]
    if with_lookup:
        lengths = sorted({length for _, length in shapes})
        configs += [bench_lib.DraftConfig(bench_lib.LOOKUP_ONLY, 1, n, True) for n in lengths]
    return configs


def _sampled_acceptance(loaded, prompt_list, configs, sampling, seeds, max_tokens, json_out):
    """bench --acceptance --temp: expected tokens per step of every draft configuration."""
    ids = [encode_chat(loaded.tokenizer, p.text) for p in prompt_list]
    bar, advance = progress_bar(len(ids) * len(seeds), "acceptance")
    with bar:
        result = bench_lib.sampled_acceptance(
            loaded.base, loaded.tokenizer, loaded.draft, ids, configs, sampling, seeds,
            max_tokens, on_prompt=advance,
        )  # fmt: skip
    result["command"] = "mlx-redrafter " + " ".join(sys.argv[1:])
    result["prompts"] = [p.id for p in prompt_list]
    typer.echo(bench_lib.format_sampled_acceptance(result))
    if json_out:
        _write_json(json_out, result)


def _shapes(widths: str, lengths: str) -> list[tuple[int, int]]:
    """Every (W, L) of --widths x --lengths."""
    return bench_lib.beam_shapes(int_list(widths, "--widths"), int_list(lengths, "--lengths"))


def _acceptance(
    loaded: Loaded, others, other_paths, prompt_list, shapes, max_tokens: int, json_out
) -> None:
    """bench --acceptance: tokens per step of every shape, replayed, as a W x L table (one per
    drafter with --compare, all over the same references)."""
    ids = [encode_chat(loaded.tokenizer, p.text) for p in prompt_list]
    bar, advance = progress_bar(len(ids), "acceptance")
    drafters = [loaded.draft, *others]
    with bar:
        grids = bench_lib.acceptance_grids(
            loaded.base, loaded.tokenizer, drafters, ids, shapes, max_tokens, on_prompt=advance
        )
    kinds = [p.category or p.source or "-" for p in prompt_list]
    names = [str(loaded.drafter_path), *other_paths]
    for name, grid in zip(names, grids, strict=True):
        if others:
            typer.echo(f"\n{name}")
        typer.echo(bench_lib.format_acceptance(grid, max_tokens))
        if len(set(kinds)) > 1:
            grid["by_kind"] = bench_lib.by_kind(grid, kinds)
            typer.echo("\nper kind\n\n" + bench_lib.format_by_kind(grid["by_kind"], grid))
    if json_out and not others:
        _write_json(json_out, grids[0])
    elif json_out:
        _write_json(
            json_out, {"drafters": [{"path": n, **g} for n, g in zip(names, grids, strict=True)]}
        )


def _write_json(path: str, data: dict) -> None:
    if not is_leader():
        return
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
    typer.echo(f"\nwrote {path}")


@friendly_errors
def tune(
    model: Model = None,
    drafter: Drafter = None,
    num_prompts: Annotated[
        int, typer.Option("--num-prompts", "-N", help="MT-Bench prompts to run.")
    ] = 3,
    prompts: Annotated[
        str, typer.Option("--prompts", help="A .jsonl file or mt-bench.")
    ] = "mt-bench",
    max_tokens: MaxTokens = 64,
    widths: Annotated[str, typer.Option("--widths", help="Beam widths to try.")] = "1,2,3,4",
    lengths: Annotated[str, typer.Option("--lengths", help="Beam lengths to try.")] = "3,4,5,6",
    curve_nodes: Annotated[
        int, typer.Option("--curve-nodes", help="Verify-cost curve up to n.")
    ] = 32,
    repeats: Annotated[int, typer.Option("--repeats", help="Timings per point of the curve.")] = 5,
    curve_only: Annotated[
        bool, typer.Option("--curve-only", help="Only print the verify-cost curve t(n)/t(1).")
    ] = False,
    profile_ops: Annotated[
        bool,
        typer.Option(
            "--profile-ops", help="Only print the forward's time by kind of op, n = 1..32."
        ),
    ] = False,
    no_save: Annotated[bool, typer.Option("--no-save", help="Measure, but store nothing.")] = False,
    json_out: Json = None,
    dtype: Annotated[str | None, typer.Option(help="Cast the model to this dtype.")] = None,
    temp: Annotated[
        float,
        typer.Option(
            "--temp",
            help="Above 0: sweep sampled decoding and store the shape for sampled requests "
            "(beside the greedy one; no curve).",
        ),
    ] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="With --temp: nucleus sampling.")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", help="With --temp: top-k (0: off).")] = 0,
    seeds: Annotated[
        str, typer.Option("--seed", help="With --temp: comma-separated seeds, one run each.")
    ] = "1,2",
):
    """Find the best beam shape (W, L) for this device and model, and store it for chat and
    generate (shown by `info`); with --temp, the best shape for sampled requests."""
    sampling, seed_list, _ = _sampling_options(temp, top_p, top_k, seeds, None)
    check_options(
        num_prompts=(num_prompts, 1),
        max_tokens=(max_tokens, 1),
        curve_nodes=(curve_nodes, 1),
        repeats=(repeats, 1),
    )
    # Only the full tune needs the drafter.
    loaded = load_for(model, dtype, drafter, no_drafter=profile_ops or curve_only)
    base = loaded.base
    if profile_ops:
        sizes = [n for n in (1, 2, 4, 8, 16, 32) if n <= curve_nodes]
        rows = bench_lib.profile_forward(base, sizes=sizes, repeats=repeats)
        typer.echo(f"model: {loaded.model_path} · {model_dtype(base)} · best of {repeats}")
        typer.echo(bench_lib.format_profile(rows))
        if json_out:
            _write_json(json_out, {"profile_ops": rows})
        return
    if curve_only:
        curve = bench_lib.verify_cost_curve(base, max_nodes=curve_nodes, repeats=repeats)
        typer.echo(f"model: {loaded.model_path} · {model_dtype(base)}")
        typer.echo(bench_lib.format_verify_cost(curve))
        if json_out:
            _write_json(json_out, {"verify_cost": curve})
        return
    if loaded.draft is None:
        raise RedrafterError("tune needs a drafter: pass --drafter")
    prompt_list = load_prompts(prompts, num_prompts)
    w_list, l_list = int_list(widths, "--widths"), int_list(lengths, "--lengths")
    runs = len(prompt_list) * (1 + len(w_list) * len(l_list))
    if sampling.greedy:
        typer.echo(f"measuring the verify-cost curve (n = 1..{curve_nodes}) ...", err=True)
    else:
        runs *= len(seed_list)
    bar, advance = progress_bar(runs, "tune")
    with bar:
        out = bench_lib.run_tune(
            base,
            loaded.tokenizer,
            loaded.draft,
            prompt_list,
            loaded.model_path,
            loaded.drafter_path,
            bench_lib.TuneSettings(
                tuple(w_list),
                tuple(l_list),
                max_tokens,
                curve_nodes,
                repeats,
                not no_save,
                sampling,
                tuple(seed_list),
            ),  # fmt: skip
            progress=advance,
        )
    typer.echo(bench_lib.format_table(out["result"]))
    if json_out and is_leader():
        typer.echo(f"\nwrote {bench_lib.write_json(out['result'], json_out)}")
    _report_best(out)


def _report_best(out: dict) -> None:
    """The shape tune found, a warning when no shape beat plain decoding, where it went."""
    best = out["best"]
    speedup = best["speedup_vs_ar"]
    which = "sampled " if out.get("sampled") else ""
    typer.echo(
        f"\nbest {which}beam shape: W={best['beam_width']}, L={best['beam_length']} "
        f"({speedup:.2f}x plain decoding, {best['tokens_per_step']:.2f} tokens/step)"
    )
    if speedup < 1.0:
        typer.secho(
            "ReDrafter was slower than plain decoding here for every shape tried; "
            "chat --no-drafter will be faster with this drafter",
            fg=typer.colors.YELLOW,
            err=True,
        )
    if out["saved_to"]:
        requests = "sampled requests" if out.get("sampled") else "chat and generate"
        typer.echo(f"saved to {out['saved_to']}; {requests} use it unless -W/-L are given")
