"""mlx-redrafter command line: info, setup, generate, chat, serve, bench, tune, train, convert.

Commands parse arguments and call the library; errors a user can cause become one red line
and a non-zero exit (set MLX_REDRAFTER_DEBUG=1 for the traceback). One module per command
group; `common` holds what they share (errors, option checks, the model loader).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Annotated

import typer
import typer.core

import mlx_redrafter  # noqa: F401  (loads the BLAS before mlx)
from mlx_redrafter import distributed
from mlx_redrafter.cli import bench, chat, convert, generate, info, serve, train
from mlx_redrafter.errors import RedrafterError


class _OneLineErrors(typer.core.TyperGroup):
    """Usage errors (`--max-tokens abc`, an unknown option) as one red line, like every other
    error of the CLI, instead of click's usage box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except typer.TyperException as exc:  # click's ClickException and its usage errors
            message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            if message.strip():  # (no arguments: the help was shown, and that is all)
                typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
            sys.exit(getattr(exc, "exit_code", 2))
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _no_flag_types() -> None:
    """Flags take no value, so their help shows no type (this typer shows `<bool>`)."""
    option = typer.core.TyperOption
    shown = getattr(option, "display_type_rich", None)
    if shown is None:
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag else shown(self, ctx)

    option.display_type_rich = display_type_rich


_no_flag_types()

app = typer.Typer(
    cls=_OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    help="ReDrafter speculative decoding for local LLMs, native to MLX.",
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"mlx-redrafter {mlx_redrafter.__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    """ReDrafter speculative decoding for local LLMs, native to MLX."""


app.command()(info.info)
app.command()(info.setup)
app.command()(generate.generate)
app.command()(chat.chat)
app.command()(serve.serve)
app.command()(bench.bench)
app.command()(bench.tune)
app.command()(train.train)
app.command("train-mix")(train.train_mix)
app.add_typer(convert.app, name="convert")

# Commands that write outputs: SIGTERM runs the same clean-up as Ctrl-C (temporary outputs
# removed, training checkpointed) instead of killing the process where it stands.
_CLEAN_ON_SIGTERM = ("setup", "convert", "train", "train-mix")


def _terminate_as_interrupt() -> None:
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


# Commands that run with the base model split over the ranks when started by `mlx.launch`.
_DISTRIBUTED = ("generate", "chat", "serve", "bench", "tune")


def _join_group(command: str) -> None:
    """Under `mlx.launch`: join the group (the model loader then shards the base model) and
    keep stdout to rank 0; other ranks keep stderr for their own errors."""
    if distributed.launch_backend() is None:
        return
    if command not in _DISTRIBUTED:
        raise RedrafterError(
            f"{command!r} does not run under mlx.launch (those that do: {', '.join(_DISTRIBUTED)})"
        )
    distributed.init_from_env()
    if not distributed.is_leader():
        os.environ["TQDM_DISABLE"] = "1"
        sys.stdout.flush()
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command in _CLEAN_ON_SIGTERM:
        _terminate_as_interrupt()
    try:
        if command and not command.startswith("-"):
            _join_group(command)
        app()
    except (RedrafterError, RuntimeError) as e:
        # A rank that stopped (its own output says why) shows up on the others as a backend
        # error at their next exchange: one line, not a traceback.
        msg = str(e) if isinstance(e, RedrafterError) else distributed.peer_lost(e)
        if msg is None or os.environ.get("MLX_REDRAFTER_DEBUG"):
            raise
        typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
        sys.exit(1)
