"""What every command shares: one-line errors, option checks, stdin, the progress bar, the
options that several commands take, and the one loader of model, drafter and beam shape."""

from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import mlx.core as mx
import typer
from tqdm import tqdm

from mlx_redrafter import distributed
from mlx_redrafter.chat import check_text
from mlx_redrafter.defaults import (
    DEFAULT_BEAM,
    DEFAULT_MODEL_NAME,
    check_beam,
    default_drafter_dir,
)
from mlx_redrafter.drafter import load_drafter
from mlx_redrafter.errors import RedrafterError
from mlx_redrafter.fingerprint import model_fingerprint, same_model
from mlx_redrafter.generation import LookupConfig
from mlx_redrafter.loading import load, resolve_model_path
from mlx_redrafter.plan import DecodePlan
from mlx_redrafter.prompts import has_template

# ---------------------------------------------------------------------------------------------
# Errors


def fail(message: str) -> None:
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
        except BrokenPipeError:
            # The reader left (`mlx-redrafter info | head`): stop quietly, as cat does, and
            # keep Python from complaining again when it flushes stdout at exit.
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError):
                pass
            raise typer.Exit(141) from None
        # RedrafterError: every error the package raises on purpose. The others come from
        # below it (a missing file, bad JSON, a value mlx or the tokenizer rejects).
        except (RedrafterError, ValueError, OSError, KeyError) as exc:
            if os.environ.get("MLX_REDRAFTER_DEBUG"):
                raise
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            fail(msg)

    return wrapper


# ---------------------------------------------------------------------------------------------
# Checks and input


def check_options(**options) -> None:
    """Out-of-range numbers as one clear error before anything loads. Keys are option names
    with `_` for `-`; values (value, least allowed); None values are not checked."""
    for name, (value, low) in options.items():
        if value is not None and value < low:
            flag = "--" + name.replace("_", "-")
            raise RedrafterError(f"{flag} must be >= {low}, got {value}")


def check_beam_options(beam_width: int | None, beam_length: int | None) -> None:
    """-W/-L as given (unset ones stand in as valid) before anything loads."""
    check_beam(1 if beam_width is None else beam_width, 2 if beam_length is None else beam_length)


def text_option(value: str | None, flag: str) -> str | None:
    """A command-line string that is UTF-8 text (undecodable bytes arrive as surrogates)."""
    return None if value is None else check_text(value, flag)


def read_stdin() -> str:
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RedrafterError(
            f"stdin is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line})"
        ) from None


def int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise RedrafterError(f"{option} takes comma-separated integers, got {text!r}")
    return values


def progress_bar(total: int, desc: str):
    """A tqdm bar on stderr and the callback that advances it by one run."""
    bar = tqdm(total=total, desc=desc, unit="run", file=sys.stderr, dynamic_ncols=True)

    def advance(method: str = "") -> None:
        bar.set_postfix_str(method, refresh=False)
        bar.update(1)

    return bar, advance


# ---------------------------------------------------------------------------------------------
# Options several commands take (each command keeps its own where the help differs)

Model = Annotated[
    str | None,
    typer.Option(
        "--model", "-m", help=f"Model dir, HF id or GGUF (default: {DEFAULT_MODEL_NAME})."
    ),
]
Drafter = Annotated[
    str | None,
    typer.Option(
        "--drafter",
        "-d",
        help="Drafter directory (default: the shipped drafter, with the default model).",
    ),
]
NoDrafter = Annotated[
    bool,
    typer.Option(
        "--no-drafter",
        help="No drafter: context lookup only (with --no-lookup too: plain decoding).",
    ),
]
BeamWidth = Annotated[
    int | None,
    typer.Option(
        "--beam-width",
        "-W",
        help=f"Drafter beams per round (default: the tuned shape, else {DEFAULT_BEAM[0]}).",
    ),
]
BeamLength = Annotated[
    int | None,
    typer.Option(
        "--beam-length",
        "-L",
        help="Tokens per beam, the root included (default: the tuned shape, else "
        f"{DEFAULT_BEAM[1]}).",
    ),
]
Lookup = Annotated[
    bool,
    typer.Option("--lookup/--no-lookup", help="Also draft from the context (prompt lookup)."),
]
LookupMax = Annotated[
    int | None,
    typer.Option(
        "--lookup-max",
        help=f"Longest continuation copied from the context (default {LookupConfig.max_tokens}).",
    ),
]
Temp = Annotated[float, typer.Option("--temp", help="Sampling temperature (0 = greedy).")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling (1.0 = off).")]
TopK = Annotated[int, typer.Option("--top-k", help="0 = no top-k.")]
Seed = Annotated[
    int | None,
    typer.Option("--seed", help="Random seed for sampling (default: a fresh one each run)."),
]
System = Annotated[str | None, typer.Option("--system", help="System prompt.")]
Dtype = Annotated[str | None, typer.Option("--dtype", help="Cast the model to this dtype.")]


# ---------------------------------------------------------------------------------------------
# The loader


@dataclass
class Loaded:
    """A model ready to decode with: what the loader resolved and loaded."""

    model_path: Path
    base: Any
    tokenizer: Any
    drafter_path: str | None
    draft: Any  # the Drafter, or None
    plan: DecodePlan  # the decoding settings, resolved once (beam shape, lookup, cost curve)

    @property
    def beam_width(self) -> int:
        return self.plan.beam_width

    @property
    def beam_length(self) -> int:
        return self.plan.beam_length

    @property
    def lookup(self) -> LookupConfig | None:  # None: context lookup is off
        return self.plan.lookup


def resolve_drafter(model: str | None, drafter: str | None, no_drafter: bool) -> str | None:
    """The drafter directory to use: explicit, else the shipped one for the default model."""
    if no_drafter:
        return None
    if drafter:
        return drafter
    if model is None:
        path = default_drafter_dir()
        if path is not None and path.exists():
            return str(path)
    return None


def shipped_drafter_note(model: str, base) -> str | None:
    """Why a copy of the default model (given with --model) runs without the shipped drafter,
    and how to use it; None for any other model."""
    path = default_drafter_dir()
    log = None if path is None else path / "training_log.json"
    if log is None or not log.is_file():
        return None
    try:
        made_for = json.loads(log.read_text())["base_model"]
    except (OSError, ValueError, KeyError):
        return None
    if not isinstance(made_for, dict) or not same_model(made_for, model_fingerprint(base)):
        return None
    return (
        f"note: {model} holds the default model, and the shipped drafter is used unasked only "
        f"without --model: add -d {path} to use it"
    )


def warn_plain_text(loaded: Loaded, what: str) -> None:
    """A model without a chat template gets plain text (the library falls back quietly):
    say so once, with `what` happens to the input."""
    if not has_template(loaded.tokenizer):
        typer.secho(
            f"warning: {Path(loaded.model_path).name} has no chat template: {what}",
            fg=typer.colors.YELLOW,
            err=True,
        )


def load_for(
    model: str | None,
    dtype: str | None = None,
    drafter: str | None = None,
    no_drafter: bool = False,
    beam_width: int | None = None,
    beam_length: int | None = None,
    lookup: bool | None = None,
    lookup_max: int | None = None,
) -> Loaded:
    """Resolve and load the model (`--model`, `--dtype`) and its drafter (`--drafter`, else the
    shipped one for the default model; none with `--no-drafter`), then the decode plan: the
    beam shape (each given value, else the tuned shape, else the default), the context lookup
    settings and the verify-cost curve."""
    model_path = resolve_model_path(model)
    group = distributed.group()  # under mlx.launch: each rank keeps its share of the blocks
    if group is not None:
        distributed.share_tuned(model_path, group)
    base, tokenizer = load(str(model_path), dtype=dtype, lazy=group is not None)
    if group is not None:
        mx.eval(distributed.shard_model(base, group).parameters())
    drafter_path = resolve_drafter(model, drafter, no_drafter)
    draft = load_drafter(drafter_path, base=base) if drafter_path else None
    if model is not None and not drafter and not no_drafter:
        note = shipped_drafter_note(model, base)
        if note:
            typer.secho(note, fg=typer.colors.YELLOW, err=True)
    # On every rank the plan reads the same tuned settings: share_tuned stored rank 0's above.
    plan = DecodePlan.resolve(model_path, beam_width, beam_length, lookup, lookup_max)
    return Loaded(model_path, base, tokenizer, drafter_path, draft, plan)
