"""`mlx-redrafter train`: distil a drafter for a base model (resumable), then a summary."""

from __future__ import annotations

from typing import Annotated

import typer

from mlx_redrafter.cli.common import check_options, friendly_errors
from mlx_redrafter.errors import TrainInterrupted
from mlx_redrafter.train import train_drafter


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
    ] = 1000,
    new_tokens: Annotated[
        int, typer.Option("--new-tokens", "-n", help="Response tokens per prompt.")
    ] = 128,
    epochs: Annotated[int, typer.Option("--epochs", "-e")] = 1,
    learning_rate: Annotated[
        float, typer.Option("--lr", "--learning-rate", help="Peak AdamW rate.")
    ] = 1e-3,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", help="Token positions per step.")
    ] = 256,
    num_predict: Annotated[
        int,
        typer.Option(
            "--num-predict", help="Tokens drafted after g0 (useful beam length up to this + 1)."
        ),
    ] = 5,
    num_layers: Annotated[
        int, typer.Option("--num-layers", help="ResBlocks in the drafter head.")
    ] = 2,
    draft_vocab: Annotated[
        int,
        typer.Option(
            "--draft-vocab", "-K", help="Draft vocabulary: the K most frequent targets (0 = all)."
        ),
    ] = 0,
    exit_dim: Annotated[
        int | None,
        typer.Option(
            "--exit-dim",
            help="Head width (default 2 x hidden, Apple's; other sizes add input_proj).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    target: Annotated[
        str,
        typer.Option(
            "--target",
            help="self: the model's own greedy responses; dataset: the file's answers; relabel: "
            "the file's answers as context, the model's greedy next token at each as the target "
            "(exact targets at prefill speed).",
        ),
    ] = "self",
    eval_fraction: Annotated[
        float, typer.Option("--eval-fraction", help="Held-out prompts.")
    ] = 0.05,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", help="Steps per checkpoint.")
    ] = 200,
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
    ] = 32,
    save_dtype: Annotated[
        str | None,
        typer.Option(
            "--save-dtype",
            help="Dtype of the saved drafter: float32 (default), float16, bfloat16.",
        ),
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="Cast the base model to this dtype.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
):
    """Distil a ReDrafter drafter for a base model from its own greedy responses to prompts.

    Resumable: Ctrl-C saves a checkpoint, and running the same command again continues.
    """
    check_options(num_prompts=(num_prompts, 0), epochs=(epochs, 1))
    try:
        log = train_drafter(
            model,
            prompts,
            out,
            num_prompts=num_prompts or None,
            new_tokens=new_tokens,
            epochs=epochs,
            learning_rate=learning_rate,
            batch_size=batch_size,
            num_predict=num_predict,
            num_layers=num_layers,
            draft_vocab_size=draft_vocab,
            exit_dim=exit_dim,
            seed=seed,
            target=target,
            eval_fraction=eval_fraction,
            checkpoint_every=checkpoint_every,
            work_dir=work_dir,
            resume=not no_resume,
            progress=not quiet,
            dtype=dtype,
            gen_batch_size=gen_batch_size,
            save_dtype=save_dtype,
        )
    except TrainInterrupted as exc:
        typer.secho(str(exc), fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130) from None
    typer.echo(_summary(log, out))


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
