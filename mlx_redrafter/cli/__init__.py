"""mlx-redrafter command line: info, setup, generate, chat, serve, bench, tune, train, convert.

Commands parse arguments and call the library; errors a user can cause become one red line
and a non-zero exit (set MLX_REDRAFTER_DEBUG=1 for the traceback). One module per command
group; `common` holds what they share (errors, option checks, the model loader).
"""

from __future__ import annotations

import signal
import sys

import typer

import mlx_redrafter  # noqa: F401  (loads the BLAS before mlx)
from mlx_redrafter.cli import bench, chat, convert, generate, info, serve, train

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


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in _CLEAN_ON_SIGTERM:
        _terminate_as_interrupt()
    app()
