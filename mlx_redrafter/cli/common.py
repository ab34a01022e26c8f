"""What every command shares: one-line errors, option checks, stdin, the progress bar, the
options that several commands take, and the one loader of model, drafter and beam shape."""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from tqdm import tqdm

from mlx_redrafter.chat import check_text
from mlx_redrafter.defaults import check_beam, default_drafter_dir, resolve_beam
from mlx_redrafter.drafter import load_drafter
from mlx_redrafter.errors import RedrafterError
from mlx_redrafter.generation import LookupConfig, resolve_lookup
from mlx_redrafter.loading import load, resolve_model_path

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

Model = Annotated[str | None, typer.Option("--model", "-m", help="Model dir, HF id or GGUF.")]
Drafter = Annotated[str | None, typer.Option("--drafter", "-d", help="Drafter directory.")]
NoDrafter = Annotated[bool, typer.Option("--no-drafter", help="Plain decoding.")]
BeamWidth = Annotated[int | None, typer.Option("--beam-width", "-W")]
BeamLength = Annotated[int | None, typer.Option("--beam-length", "-L")]
Lookup = Annotated[
    bool,
    typer.Option("--lookup/--no-lookup", help="Also draft from the context (prompt lookup)."),
]
LookupMax = Annotated[
    int | None,
    typer.Option("--lookup-max", help="Longest continuation copied from the context (default 32)."),
]
Temp = Annotated[float, typer.Option("--temp", help="Sampling temperature (0 = greedy).")]
TopP = Annotated[float, typer.Option("--top-p")]
TopK = Annotated[int, typer.Option("--top-k", help="0 = no top-k.")]
Seed = Annotated[int | None, typer.Option("--seed")]
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
    beam_width: int
    beam_length: int
    lookup: LookupConfig | None  # None: context lookup is off


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
    shipped one for the default model; none with `--no-drafter`), then the beam shape (each
    given value, else the tuned shape, else the default) and the context lookup settings."""
    model_path = resolve_model_path(model)
    base, tokenizer = load(str(model_path), dtype=dtype)
    drafter_path = resolve_drafter(model, drafter, no_drafter)
    draft = load_drafter(drafter_path, base=base) if drafter_path else None
    width, length = resolve_beam(model_path, beam_width, beam_length)
    return Loaded(
        model_path,
        base,
        tokenizer,
        drafter_path,
        draft,
        width,
        length,
        resolve_lookup(lookup, lookup_max),
    )
