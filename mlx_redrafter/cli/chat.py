"""`mlx-redrafter chat`: the command, and the terminal loop on a `ChatSession`.

`run_chat` is the terminal loop: commands, Ctrl-C (stop the answer) and Ctrl-D (exit), piped
stdin (every line one message; answers alone on stdout, notes and stats on stderr). Reading a
message (a line, a paste, a \"\"\" block) is chat_input.py's.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, TextIO

import mlx.core as mx
import typer

from mlx_redrafter.chat import ChatSession, TurnRecord
from mlx_redrafter.cli.chat_input import read_message
from mlx_redrafter.cli.common import (
    BeamLength,
    BeamWidth,
    Drafter,
    Dtype,
    Loaded,
    Lookup,
    LookupMax,
    Model,
    NoDrafter,
    Seed,
    System,
    Temp,
    TopK,
    TopP,
    check_beam_options,
    check_options,
    friendly_errors,
    load_for,
    text_option,
    warn_plain_text,
)
from mlx_redrafter.defaults import home_dir
from mlx_redrafter.distributed import is_leader, world_size
from mlx_redrafter.env import device_name
from mlx_redrafter.errors import ContextFullError, GenerationError, NotTextError
from mlx_redrafter.generation import OPTION_DEFAULTS
from mlx_redrafter.lookup_memory import DEFAULT_MEMORY_TOKENS, LookupMemory
from mlx_redrafter.plan import DEFAULT_LOOKUP


@friendly_errors
def chat(
    model: Model = None,
    drafter: Drafter = None,
    no_drafter: NoDrafter = False,
    beam_width: BeamWidth = None,
    beam_length: BeamLength = None,
    lookup: Lookup = DEFAULT_LOOKUP,
    lookup_max: LookupMax = None,
    temp: Temp = OPTION_DEFAULTS.temperature,
    top_p: TopP = OPTION_DEFAULTS.top_p,
    top_k: TopK = OPTION_DEFAULTS.top_k,
    seed: Seed = None,
    system: System = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", "-n", help="Most tokens per answer.")
    ] = OPTION_DEFAULTS.max_tokens,
    dtype: Dtype = None,
    lookup_history: Annotated[
        bool,
        typer.Option(
            "--lookup-history/--no-lookup-history",
            help="Also copy draft candidates from earlier conversations, kept (token ids only, "
            f"at most {DEFAULT_MEMORY_TOKENS:,} tokens) in a file under the data home.",
        ),
    ] = False,
):
    """Chat in the terminal; the conversation stays in the KV cache (/help lists commands)."""
    system = text_option(system, "--system")
    check_options(max_tokens=(max_tokens, 1), top_k=(top_k, 0))
    check_beam_options(beam_width, beam_length)
    loaded = load_for(
        model, dtype, drafter, no_drafter, beam_width, beam_length, lookup, lookup_max
    )
    warn_plain_text(loaded, "each message is sent as a plain line of text")
    session = ChatSession(
        loaded.base,
        loaded.tokenizer,
        loaded.draft,
        system=system,
        max_tokens=max_tokens,
        temperature=temp,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        plan=loaded.plan,
    )
    history = None
    if lookup_history and lookup:
        session.lookup_memory = LookupMemory(max_clients=1)
        history = history_path(loaded.model_path)
        session.lookup_memory.load(history, None, str(Path(loaded.model_path).resolve()))
    try:
        code = run_chat(session, title=_title(loaded, lookup))
    finally:
        if history is not None:
            session.lookup_memory.save(history, None, str(Path(loaded.model_path).resolve()))
    if code:
        raise typer.Exit(code)


def history_path(model_path) -> Path:
    """The lookup history file of a model: `<home>/lookup-history/<model dir name>.json`."""
    return home_dir() / "lookup-history" / f"{Path(model_path).name}.json"


def _title(loaded: Loaded, lookup: bool) -> str:
    """The first line of an interactive chat: model, how it decodes, device."""
    draft = loaded.draft is not None
    how = "plain decoding"
    if draft:
        how = f"ReDrafter W={loaded.beam_width} L={loaded.beam_length}"
        how += f" ({Path(loaded.drafter_path).name})"
    if lookup:
        how = ("context lookup + " + how) if draft else "context lookup"
    return f"mlx-redrafter chat · {Path(loaded.model_path).name} · {how} · {device_name()}"


# ---------------------------------------------------------------------------------------------
# Terminal UI

HELP = """\
  /help, h     show this help
  /reset, r    start a new conversation (the system prompt stays)
  /stats       statistics of the last answer and of the conversation
  /quit, q     exit (Ctrl-D exits too)
Ctrl-C stops the answer being written and returns to the prompt. The partial answer stays in
the conversation as it was shown, so the next message follows on from it (/reset drops it).
A paste of several lines is one message, and so is a block between \"\"\" lines.
With piped input every line is one message (or a \"\"\" block)."""

QUIT = ("/quit", "/exit", "q")
RESET = ("/reset", "r")
HELP_COMMANDS = ("/help", "/?", "h")


class _Terminal:
    """Where the chat writes: answers to stdout, notes and stats dimmed when on a terminal."""

    def __init__(self, stdout: TextIO, stderr: TextIO, interactive: bool):
        self.out = stdout
        self.err = stderr
        self.interactive = interactive
        # Piped runs keep stdout to the answers alone; notes and stats go to stderr.
        self.notes = stdout if interactive or not is_leader() else stderr  # rank 0's only
        self.color = self.notes.isatty()

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def note(self, text: str, dim: bool = True) -> None:
        if self.color and dim:
            text = f"\033[2m{text}\033[0m"
        self.notes.write(text + "\n")
        self.notes.flush()

    def error(self, text: str) -> None:
        if self.err.isatty():
            text = f"\033[31m{text}\033[0m"
        self.err.write(text + "\n")
        self.err.flush()


def stats_line(record: TurnRecord, with_drafter: bool) -> str:
    """The one-line summary printed after each answer."""
    stats = record.stats
    if stats is None:
        return "no tokens generated"
    parts = [f"{record.num_tokens} tokens", f"{stats.decode_tps:.1f} tok/s"]
    if with_drafter:
        parts.append(f"{stats.tokens_per_step:.2f} tokens/step")
    parts.append(f"prompt {record.prompt_tokens} tokens at {stats.prefill_tps:.0f} tok/s")
    if record.finish_reason == "length" and not record.capped:
        parts.append("stopped at --max-tokens")
    return " · ".join(parts)


def stats_report(session: ChatSession) -> str:
    """The /stats text: the last answer in detail, then the conversation."""
    lines = []
    last = session.turns[-1] if session.turns else None
    if last is None or last.stats is None:
        lines.append("last answer: none yet")
    else:
        s = last.stats
        lines.append(
            f"last answer: {last.num_tokens} tokens ({last.finish_reason}), "
            f"{s.decode_tps:.1f} tok/s decode; {last.prompt_tokens} prompt tokens prefilled "
            f"at {s.prefill_tps:.0f} tok/s"
        )
        looked = session.plan.lookup is not None
        if session.drafter is not None or looked:
            how = ["context lookup"] if looked else []
            if session.drafter is not None:
                how.append(f"ReDrafter W={session.beam_width} L={session.beam_length}")
            depth = " ".join(f"{a:.2f}" for a in s.accept_by_depth) or "-"
            sources = ", ".join(f"{k} {v}" for k, v in sorted(s.accepted_from.items()))
            lines.append(
                f"  {' + '.join(how)}: {s.tokens_per_step:.2f} tokens/step over {s.steps} "
                f"rounds, acceptance by depth {depth}; accepted by source: {sources or 'none'}"
            )
    limit = session.context_length
    used = f"{session.context_used} of {limit}" if limit else f"{session.context_used}"
    total = sum(t.num_tokens for t in session.turns)
    lines.append(
        f"conversation: {len(session.turns)} turn{'' if len(session.turns) == 1 else 's'}, "
        f"{total} tokens generated, "
        f"{used} context tokens used, peak memory {mx.get_peak_memory() / 1e9:.2f} GB"
    )
    return "\n".join(lines)


def run_chat(
    session: ChatSession,
    title: str | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """The chat loop; returns the process exit code."""
    stdin = stdin or sys.stdin
    interactive = stdin is sys.stdin and stdin.isatty()
    term = _Terminal(stdout or sys.stdout, stderr or sys.stderr, interactive)
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        if title:
            term.note(title, dim=False)
        term.note("/help for commands · Ctrl-C stops an answer · Ctrl-D or /quit exits")

    lineno = 0
    while True:
        lineno += 1
        try:
            line, used = read_message(interactive, stdin, lineno)
            lineno += used - 1
        except NotTextError as e:
            term.error(f"error: {e}; skipped")
            continue
        except EOFError:
            if interactive:
                term.write("\n")
            return 0
        except KeyboardInterrupt:
            term.write("\n")
            term.note("(Ctrl-D or /quit exits)")
            continue
        text = line.strip()
        if not text:
            continue
        command = text.lower()
        if command in QUIT:
            return 0
        if command in RESET:
            session.reset()
            term.note("new conversation")
            continue
        if command in HELP_COMMANDS:
            term.note(HELP, dim=False)
            continue
        if command == "/stats":
            term.note(stats_report(session), dim=False)
            continue
        if text.startswith("/") and " " not in text:
            term.note(f"unknown command {text}; /help lists the commands")
            continue
        _answer(session, text, term)


def _answer(session: ChatSession, text: str, term: _Terminal) -> None:
    """Stream one answer; Ctrl-C stops it (the session keeps what was shown)."""
    last_piece = ""
    stream = None
    try:
        stream = session.send(text)
        for response in stream:
            if response.text:
                term.write(response.text)
                last_piece = response.text
    except KeyboardInterrupt:
        if world_size() > 1:
            # Under mlx.launch every rank gets the signal at a different point of the answer:
            # going on would leave them out of step, so Ctrl-C ends the chat there.
            raise
        if stream is not None:
            stream.close()
        term.write("\n")
        term.note("[stopped; the partial answer stays in the conversation]")
        return
    except ContextFullError as e:
        term.error(f"context full: {e}")
        return
    except GenerationError as e:
        term.error(f"error: {e}")
        return
    finally:
        if stream is not None:
            stream.close()
    if not last_piece.endswith("\n"):
        term.write("\n")
    record = session.turns[-1]
    term.note(stats_line(record, session.drafter is not None))
    if record.capped and record.finish_reason == "length":
        term.note("the context is full: /reset starts a new conversation")
