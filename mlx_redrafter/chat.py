"""Terminal chat: a session that keeps the conversation in the KV cache, and the line UI on it.

`ChatSession` owns the conversation (messages, the token ids the model has seen, the KV
cache) and streams one answer per user turn, prefilling only the new turn. `run_chat` is the
terminal loop: commands, Ctrl-C (stop the answer) and Ctrl-D (exit), piped stdin.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TextIO

from .errors import ContextFullError, NotTextError
from .generation import (
    DecodeStats,
    GenerationError,
    GenerationResponse,
    SamplingConfig,
    lookahead_tokens,
    resolve_beam,
    resolve_lookup,
    stream_generate,
)
from .prompts import encode_messages, eos_ids

_PROBE = "\x00mlx-redrafter-probe\x00"


def check_text(text: str, what: str) -> str:
    """`text` if it is valid Unicode; NotTextError naming `what` if it holds undecodable bytes
    (Python keeps those as lone surrogates, which the tokenizer rejects)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise NotTextError(
            f"{what} is not UTF-8 text (an undecodable byte at character {e.start + 1})"
        ) from None
    return text


@dataclass
class TurnRecord:
    """What one turn did, for the stats line and /stats."""

    prompt_tokens: int  # tokens prefilled for this turn (the rest came from the cache)
    num_tokens: int
    finish_reason: str  # "stop", "length" or "interrupted"
    stats: DecodeStats | None
    capped: bool = False  # max_tokens was lowered to what the context had left


@dataclass
class ChatSession:
    """A multi-turn conversation with one model (and optionally a drafter).

    The conversation lives in `ids` (every token the model has seen, answers as generated,
    never re-tokenized) and in the KV cache, which holds all of them but the last. A new turn
    appends the template's end of the previous answer and the new user turn, so only those
    tokens are prefilled.
    """

    model: object
    tokenizer: object
    drafter: object = None
    system: str | None = None
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    beam_width: int | None = None  # None: the tuned shape, else the default (as the CLI)
    beam_length: int | None = None
    lookup: bool | None = None  # context lookup candidates (None: the default, on)
    lookup_max: int | None = None
    messages: list[dict] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    turns: list[TurnRecord] = field(default_factory=list)

    def __post_init__(self):
        SamplingConfig(self.temperature, self.top_p, self.top_k).validate()
        if self.max_tokens < 1:
            raise GenerationError(f"max_tokens must be >= 1, got {self.max_tokens}")
        self.beam_width, self.beam_length = resolve_beam(
            self.model, self.beam_width, self.beam_length
        )
        resolve_lookup(self.lookup, self.lookup_max)  # validates
        self.cache = self.model.make_cache()
        self.cache.tokens = []
        self._templated = getattr(self.tokenizer, "chat_template", None) is not None
        self._close_ids = self._assistant_close_ids() if self._templated else None
        self._seeded = False
        self.reset()

    # --- conversation state -----------------------------------------------------------------

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.ids = []
        self.turns = []
        self.cache.reset()
        self.cache.tokens = []

    @property
    def context_length(self) -> int | None:
        return self.model.context_length

    @property
    def context_used(self) -> int:
        return len(self.ids)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _assistant_close_ids(self) -> list[int] | None:
        """The tokens the template puts after an assistant message (ChatML: `<|im_end|>\\n`)."""
        try:
            text = self._render(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}],
                add_generation_prompt=False,
            )
        except Exception:  # templates may reject anything; then every turn is re-rendered
            return None
        if text.count(_PROBE) != 1:
            return None
        tail = text.split(_PROBE, 1)[1]
        return self._encode(tail) if tail else None

    def turn_ids(self, text: str) -> list[int]:
        """All token ids of the conversation plus a new user turn and the generation prompt."""
        user = {"role": "user", "content": text}
        if not self._templated:  # a base model: turns are plain lines of text
            if not self.ids:
                return list(self.tokenizer.encode(text + "\n"))
            return self.ids + self._encode("\n" + text + "\n")
        if self.ids and self._close_ids:
            before = self._render(self.messages, add_generation_prompt=False)
            after = self._render(self.messages + [user], add_generation_prompt=True)
            close = self.tokenizer.decode(self._close_ids, skip_special_tokens=False)
            if after.startswith(before) and before.endswith(close):
                return self.ids + self._close_ids + self._encode(after[len(before) :])
        # First turn, or a template that rewrites earlier turns: render everything.
        # stream_generate still reuses the cache up to the first token that differs.
        return encode_messages(self.tokenizer, self.messages + [user])

    def _extra_tokens(self) -> int:
        return lookahead_tokens(
            self.drafter is not None, self.beam_length, resolve_lookup(self.lookup, self.lookup_max)
        )

    def room(self, ids: list[int]) -> int | None:
        """How many tokens an answer to `ids` may have; None = unlimited."""
        if not self.context_length:
            return None
        return self.context_length - len(ids) - self._extra_tokens()

    # --- one turn ---------------------------------------------------------------------------

    def send(self, text: str) -> Iterator[GenerationResponse]:
        """Stream the answer to `text`. The turn is recorded however the stream ends:
        completed, closed early, or interrupted (Ctrl-C): the partial answer stays in the
        conversation, as it was shown.

        Raises ContextFullError (before anything changes) if the turn does not fit.
        """
        check_text(text, "the message")
        ids = self.turn_ids(text)
        room = self.room(ids)
        if room is not None and room < 1:
            raise ContextFullError(
                f"this turn needs {len(ids)} tokens of context but the model has "
                f"{self.context_length}; /reset starts a new conversation"
            )
        max_tokens = self.max_tokens if room is None else min(self.max_tokens, room)
        if self.seed is not None and not self._seeded:
            self._seeded = True
            seed = self.seed
        else:
            seed = None
        return self._stream(text, ids, max_tokens, seed)

    def _stream(self, text, ids, max_tokens, seed) -> Iterator[GenerationResponse]:
        stream = stream_generate(
            self.model,
            self.tokenizer,
            ids,
            self.drafter,
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=seed,
            beam_width=self.beam_width,
            beam_length=self.beam_length,
            lookup=self.lookup,
            lookup_max=self.lookup_max,
            cache=self.cache,
        )
        tokens: list[int] = []
        pieces: list[str] = []
        last: GenerationResponse | None = None
        failed = False
        try:
            for response in stream:
                tokens.append(response.token)
                pieces.append(response.text)
                last = response
                yield response
        except GenerationError:
            failed = True  # a rejected request leaves the conversation as it was
            raise
        finally:
            stream.close()  # runs stream_generate's cleanup: the cache then matches `tokens`
            if not failed:
                self._record(text, ids, tokens, pieces, last, max_tokens)

    def _record(self, text, ids, tokens, pieces, last, max_tokens) -> None:
        finish = last.finish_reason if last is not None else None
        if finish == "stop" and tokens and tokens[-1] in eos_ids(self.tokenizer):
            tokens = tokens[:-1]  # the template's own end of turn is appended next turn
        self.messages.append({"role": "user", "content": text})
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
        self.ids = list(ids) + tokens
        stats = last.stats if last is not None else None
        self.turns.append(
            TurnRecord(
                prompt_tokens=stats.prompt_tokens if stats else 0,
                num_tokens=last.generation_tokens if last is not None else 0,
                finish_reason=finish or "interrupted",
                stats=stats,
                capped=max_tokens < self.max_tokens,
            )
        )


# ---------------------------------------------------------------------------------------------
# Terminal UI

HELP = """\
  /help, h     show this help
  /reset, r    start a new conversation (the system prompt stays)
  /stats       statistics of the last answer and of the conversation
  /quit, q     exit (Ctrl-D exits too)
Ctrl-C stops the answer being written and returns to the prompt. The partial answer stays in
the conversation as it was shown, so the next message follows on from it (/reset drops it).
With piped input every line is one message."""

PROMPT = ">>> "

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
        self.notes = stdout if interactive else stderr
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
    import mlx.core as mx

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
        if session.drafter is not None:
            depth = " ".join(f"{a:.2f}" for a in s.accept_by_depth) or "-"
            lines.append(
                f"  ReDrafter W={session.beam_width} L={session.beam_length}: "
                f"{s.tokens_per_step:.2f} tokens/step over {s.steps} rounds, "
                f"acceptance by depth {depth}"
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


def _read_line(interactive: bool, stdin: TextIO, lineno: int) -> str:
    """One line of input; EOFError at the end (Ctrl-D or end of the pipe); NotTextError,
    naming the line, for one that is not UTF-8 (the next read goes on after it)."""
    where = f"input line {lineno}"
    if interactive:
        try:
            line = input(PROMPT)  # readline gives line editing and history
        except UnicodeDecodeError as e:
            raise NotTextError(f"{where} is not UTF-8 text ({e.reason})") from None
        return check_text(line, where)
    buffer = getattr(stdin, "buffer", None)
    if buffer is None:  # a text stream without bytes underneath (tests, StringIO)
        line = stdin.readline()
    else:  # bytes, so one bad line cannot break the decoding of the next ones
        raw = buffer.readline()
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise NotTextError(
                f"{where} is not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
            ) from None
    if not line:
        raise EOFError
    return check_text(line, where).rstrip("\r\n")


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
            line = _read_line(interactive, stdin, lineno)
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
