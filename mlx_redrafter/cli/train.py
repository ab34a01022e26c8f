"""`mlx-redrafter train`: distil a drafter for a base model (resumable), then a summary."""

from __future__ import annotations

from typing import Annotated

import typer

from mlx_redrafter.cli.common import check_options, friendly_errors
from mlx_redrafter.errors import RedrafterError, TrainInterrupted
from mlx_redrafter.train import DataConfig, FitConfig, train_drafter
from mlx_redrafter.train.mix import DEFAULT_COUNTS, build_mix


@friendly_errors
def train(
    prompts: Annotated[
        str,
        typer.Option(
            "--prompts",
            "-p",
            help="Alpaca JSON (instruction/input/output) or JSON Lines with `turns`.",
        ),
    ],
    out: Annotated[str, typer.Option("--out", "-o", help="Output drafter directory.")],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Base model dir, HF id or GGUF (default: the default model).",
        ),
    ] = None,
    num_prompts: Annotated[
        int,
        typer.Option(
            "--num-prompts", "-N", help="Prompts used: a fixed random selection (0 = all)."
        ),
    ] = DataConfig.num_prompts,
    new_tokens: Annotated[
        int, typer.Option("--new-tokens", "-n", help="Response tokens per prompt.")
    ] = DataConfig.new_tokens,
    epochs: Annotated[int, typer.Option("--epochs", "-e")] = FitConfig.epochs,
    learning_rate: Annotated[
        float, typer.Option("--lr", "--learning-rate", help="Peak AdamW rate.")
    ] = FitConfig.learning_rate,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", help="Token positions per step.")
    ] = FitConfig.batch_size,
    num_predict: Annotated[
        int,
        typer.Option(
            "--num-predict", help="Tokens drafted after g0 (useful beam length up to this + 1)."
        ),
    ] = FitConfig.num_predict,
    num_layers: Annotated[
        int, typer.Option("--num-layers", help="ResBlocks in the drafter head.")
    ] = FitConfig.num_layers,
    draft_vocab: Annotated[
        int,
        typer.Option(
            "--draft-vocab", "-K", help="Draft vocabulary: the K most frequent targets (0 = all)."
        ),
    ] = FitConfig.draft_vocab_size,
    exit_dim: Annotated[
        int | None,
        typer.Option(
            "--exit-dim",
            help="Head width (default 2 x hidden, Apple's; other sizes add input_proj).",
        ),
    ] = FitConfig.exit_dim,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the drafter's initial weights and data order.")
    ] = FitConfig.seed,
    target: Annotated[
        str,
        typer.Option(
            "--target",
            help="self: the model's own greedy responses; sample: its sampled responses "
            "(--sample-temp, --sample-top-p), its greedy choice at each position the target; "
            "dataset: the file's answers; relabel: "
            "the file's answers as context, the model's greedy next token at each as the target "
            "(exact targets at prefill speed); auto: relabel where the file has an answer, self "
            "where it has none (the prompt mix of `train-mix`).",
        ),
    ] = DataConfig.target,
    sample_temp: Annotated[
        float,
        typer.Option("--sample-temp", help="Temperature of the answers of --target sample."),
    ] = DataConfig.sample_temp,
    sample_top_p: Annotated[
        float, typer.Option("--sample-top-p", help="Top-p of the answers of --target sample.")
    ] = DataConfig.sample_top_p,
    eval_fraction: Annotated[
        float, typer.Option("--eval-fraction", help="Held-out prompts.")
    ] = FitConfig.eval_fraction,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", help="Steps per checkpoint.")
    ] = FitConfig.checkpoint_every,
    work_dir: Annotated[
        str | None,
        typer.Option("--work-dir", help="Data shards and checkpoints (default: <out>-work)."),
    ] = None,
    no_resume: Annotated[
        bool,
        typer.Option(
            "--no-resume",
            help="Start training over (shards made with the same settings are reused).",
        ),
    ] = False,
    gen_batch_size: Annotated[
        int,
        typer.Option(
            "--gen-batch-size", help="Responses generated together (continuous batching)."
        ),
    ] = DataConfig.gen_batch_size,
    save_dtype: Annotated[
        str | None,
        typer.Option(
            "--save-dtype",
            help="Dtype of the saved drafter: float32 (default), float16, bfloat16.",
        ),
    ] = FitConfig.save_dtype,
    dtype: Annotated[str | None, typer.Option(help="Cast the base model to this dtype.")] = None,
    loss: Annotated[
        str,
        typer.Option(
            "--loss",
            help="ce: cross-entropy to the base's greedy token; kd: to the base's top-k "
            "distribution at that position (needs --top-k data); mix: --kd-weight of kd, "
            "the rest ce.",
        ),
    ] = FitConfig.loss,
    kd_weight: Annotated[
        float, typer.Option("--kd-weight", help="Weight of the distribution in --loss mix.")
    ] = FitConfig.kd_weight,
    top_k: Annotated[
        int | None,
        typer.Option(
            "--top-k",
            help="Base log-probabilities kept per position in the data (default 32 for kd/mix, "
            "else 0).",
        ),
    ] = DataConfig.top_k,
    feature_layers: Annotated[
        str | None,
        typer.Option(
            "--feature-layers",
            help="Base blocks (0-based, comma-separated, or 'auto' = one third and two thirds "
            "deep) whose states the drafter reads besides the last.",
        ),
    ] = None,
    data_feature_layers: Annotated[
        str | None,
        typer.Option(
            "--data-feature-layers",
            help="Blocks whose states the data keeps (default: --feature-layers); a superset "
            "lets drafters with fewer layers share one work dir's data.",
        ),
    ] = None,
    feature_noise: Annotated[
        float,
        typer.Option(
            "--feature-noise", help="Gaussian noise on the drafter's input, times its RMS."
        ),
    ] = FitConfig.feature_noise,
    weight_decay: Annotated[
        float, typer.Option("--weight-decay", help="AdamW's.")
    ] = FitConfig.weight_decay,
    patience: Annotated[
        int | None,
        typer.Option(
            "--patience",
            help="Early stopping: evaluations without better held-out predicted tokens/step "
            "before stopping; the best drafter is kept.",
        ),
    ] = FitConfig.patience,
    eval_every: Annotated[
        int | None,
        typer.Option(
            "--eval-every", help="Steps between held-out evaluations (default: each epoch)."
        ),
    ] = FitConfig.eval_every,
    draft_vocab_coverage: Annotated[
        float | None,
        typer.Option(
            "--draft-vocab-coverage",
            help="Draft vocabulary: the fewest tokens covering this share of training "
            "targets (e.g. 0.97; overrides -K).",
        ),
    ] = FitConfig.draft_vocab_coverage,
    rnn_context: Annotated[
        bool,
        typer.Option(
            "--rnn-context",
            help="Every RNN step also reads the context (drafter v3; not in Apple's layout).",
        ),
    ] = FitConfig.rnn_context,
    rnn_gate: Annotated[
        bool,
        typer.Option(
            "--rnn-gate",
            help="A sigmoid gate mixes each RNN state with the previous one (not in Apple's "
            "layout).",
        ),
    ] = FitConfig.rnn_gate,
    max_steps: Annotated[
        int | None,
        typer.Option("--max-steps", help="Stop after this many steps (with a checkpoint)."),
    ] = FitConfig.max_steps,
    init_from: Annotated[
        str | None,
        typer.Option(
            "--init-from",
            help="Start from this drafter instead of a random one (keeps its architecture "
            "and draft vocabulary): train an existing drafter on more data.",
        ),
    ] = FitConfig.init_from,
    time_budget: Annotated[
        str | None,
        typer.Option(
            "--time-budget",
            help="Stop data generation after this long (e.g. 90m, 2h, 600s) and train on "
            "what was made; a later run goes on from there.",
        ),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            "--workers", help="Data generation processes (2 on a 2-core CPU: ~2x faster)."
        ),
    ] = DataConfig.workers,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
):
    """Distil a ReDrafter drafter for a base model from its own greedy responses to prompts.

    Resumable: Ctrl-C saves a checkpoint, and running the same command again continues.
    """
    check_options(
        num_prompts=(num_prompts, 0),
        epochs=(epochs, 1),
        top_k=(top_k, 0),
        workers=(workers, 1),
        patience=(patience, 1),
        eval_every=(eval_every, 1),
        max_steps=(max_steps, 1),
    )
    layers = parse_layers(feature_layers, "--feature-layers")
    data_layers = parse_layers(data_feature_layers, "--data-feature-layers")
    try:
        log = train_drafter(
            model,
            prompts,
            out,
            data_config=DataConfig(
                num_prompts=num_prompts or None,
                new_tokens=new_tokens,
                target=target,
                gen_batch_size=gen_batch_size,
                top_k=top_k,
                feature_layers=data_layers,
                time_budget=parse_duration(time_budget, "--time-budget"),
                workers=workers,
                sample_temp=sample_temp,
                sample_top_p=sample_top_p,
            ),
            fit_config=FitConfig(
                epochs=epochs,
                learning_rate=learning_rate,
                batch_size=batch_size,
                num_predict=num_predict,
                num_layers=num_layers,
                draft_vocab_size=draft_vocab,
                exit_dim=exit_dim,
                seed=seed,
                eval_fraction=eval_fraction,
                eval_every=eval_every,
                checkpoint_every=checkpoint_every,
                weight_decay=weight_decay,
                save_dtype=save_dtype,
                loss=loss,
                kd_weight=kd_weight,
                feature_layers=layers or (),
                feature_noise=feature_noise,
                patience=patience,
                draft_vocab_coverage=draft_vocab_coverage,
                rnn_context=rnn_context,
                rnn_gate=rnn_gate,
                max_steps=max_steps,
                init_from=init_from,
            ),
            work_dir=work_dir,
            resume=not no_resume,
            progress=not quiet,
            dtype=dtype,
        )
    except TrainInterrupted as exc:
        typer.secho(str(exc), fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130) from None
    typer.echo(_summary(log, out))


def parse_duration(text: str | None, flag: str) -> float | None:
    """'90m', '2h', '600s' or '600' -> seconds."""
    if text is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600}
    t = text.strip().lower()
    scale = units.get(t[-1:], None)
    try:
        value = float(t[:-1] if scale else t) * (scale or 1)
    except ValueError:
        raise RedrafterError(f"{flag}: not a duration: {text!r} (e.g. 90m, 2h, 600s)") from None
    if value <= 0:
        raise RedrafterError(f"{flag} must be > 0, got {text!r}")
    return value


def parse_layers(text: str | None, flag: str) -> tuple[int, ...] | str | None:
    """'9,19' -> (9, 19); 'auto' stays 'auto' (resolved once the model is loaded)."""
    if text is None or text.strip().lower() == "auto":
        return None if text is None else "auto"
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise RedrafterError(f"{flag}: not a comma-separated list of layers: {text!r}") from None


def _summary(log: dict, out: str) -> str:
    """What the training log says, in five lines or fewer."""
    data, vocab, ev = log["data"], log["draft_vocab"], log["final_eval"]
    lines = [
        f"drafter written to {out}: {log['drafter']['description']}",
        f"data: {data['sequences']} sequences, {data['response_tokens']} response tokens "
        f"({data['skipped_prompts']} prompts skipped as too long)",
    ]
    if vocab["size"]:
        lines.append(
            f"draft vocabulary: {vocab['size']} tokens, covering {vocab['coverage_train']:.1%} "
            f"of training targets and {vocab['coverage_eval']:.1%} of held-out ones"
        )
    if ev:
        acc = " ".join(f"{a:.2f}" for a in ev["head_accuracy"])
        lines.append(
            f"held-out: loss {ev['loss']:.3f}, top-1 per head {acc}, "
            f"~{ev['expected_tokens_per_step_w1']:.2f} tokens/step at W=1"
        )
    s = log["seconds"]
    lines.append(
        f"time: generation {s['generation_total']:.0f}s, training {s['train']:.0f}s, "
        f"eval {s['eval']:.0f}s; log in {out}/training_log.json"
    )
    return "\n".join(lines)


@friendly_errors
def train_mix(
    out: Annotated[str, typer.Option("--out", "-o", help="The prompt file to write (JSON Lines).")],
    alpaca: Annotated[
        str | None,
        typer.Option(
            "--alpaca",
            help="Stanford Alpaca's alpaca_data.json (CC BY-NC 4.0, research use): adds open "
            "chat, tasks, second turns and text to translate into English. Without it the mix "
            "is the standard library's kinds and math only.",
        ),
    ] = None,
    scale: Annotated[
        float, typer.Option("--scale", help="Multiply every kind's record count.")
    ] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the draws.")] = 0,
):
    """Write the drafter-training prompt mix: many kinds of prompts from openly licensed text
    that every Python install has (the standard library and its reference topics, templated
    math), plus Alpaca if given. Train on it with `train --prompts <out> --target self`."""
    if scale <= 0:
        raise RedrafterError(f"--scale must be > 0, got {scale}")
    counts = {k: max(1, round(v * scale)) for k, v in DEFAULT_COUNTS.items()}
    manifest = build_mix(out, alpaca=alpaca, counts=counts, seed=seed)
    kinds = ", ".join(f"{k} {v}" for k, v in manifest["kinds"].items())
    typer.echo(f"{manifest['records']} prompts written to {out}: {kinds}")
    for name, what in manifest["sources"].items():
        typer.echo(f"  {name}: {what}")
