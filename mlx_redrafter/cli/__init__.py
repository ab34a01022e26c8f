"""mlx-redrafter command line: info, setup, generate, chat, serve, bench, tune, train, convert.

Commands parse arguments and call the library; errors a user can cause become one red line
and a non-zero exit (set MLX_REDRAFTER_DEBUG=1 for the traceback). One module per command
group; `common` holds what they share (errors, option checks, the model loader).
"""

from __future__ import annotations

import os
import signal
import sys

import typer

import mlx_redrafter  # noqa: F401  (loads the BLAS before mlx)
from mlx_redrafter import distributed
from mlx_redrafter.cli import bench, chat, convert, generate, info, serve, train
from mlx_redrafter.errors import RedrafterError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="ReDrafter speculative decoding for local LLMs, native to MLX.",
)
app.command()(info.info)
app.command()(info.setup)
app.command()(generate.generate)
app.command()(chat.chat)
app.command()(serve.serve)
app.command()(bench.bench)
app.command()(bench.tune)
app.command()(train.train)
app.add_typer(convert.app, name="convert")

# Commands that write outputs: SIGTERM runs the same clean-up as Ctrl-C (temporary outputs
# removed, training checkpointed) instead of killing the process where it stands.
_CLEAN_ON_SIGTERM = ("setup", "convert", "train")


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
