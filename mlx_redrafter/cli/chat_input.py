"""Reading chat messages, from a terminal or a pipe: one line is one message, and so is a
paste of several lines (on a terminal) or a block between `\"\"\"` lines (as in Ollama)."""

from __future__ import annotations

import select
from typing import TextIO

from mlx_redrafter.chat import check_text
from mlx_redrafter.errors import NotTextError

PROMPT = ">>> "
MORE = "... "  # the prompt inside a \"\"\" block
BLOCK = '"""'
PASTE_WAIT = 0.05  # seconds: lines that arrive this soon after one another are one paste


def read_line(interactive: bool, stdin: TextIO, lineno: int, prompt: str = PROMPT) -> str:
    """One line of input; EOFError at the end (Ctrl-D or end of the pipe); NotTextError,
    naming the line, for one that is not UTF-8 (the next read goes on after it)."""
    where = f"input line {lineno}"
    if interactive:
        try:
            line = input(prompt)  # readline gives line editing and history
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


def _waiting(stdin: TextIO) -> bool:
    """Whether more input is already there: the rest of a paste, not a line being typed."""
    try:
        ready, _, _ = select.select([stdin], [], [], PASTE_WAIT)
    except (OSError, ValueError, TypeError):  # no file descriptor (tests) or no select
        return False
    return bool(ready)


def read_message(interactive: bool, stdin: TextIO, lineno: int) -> tuple[str, int]:
    """The next message and the number of input lines it took (EOFError at the end).

    A line that starts with \"\"\" opens a block that ends at a line ending with \"\"\"; the
    lines between, newlines kept, are one message (an unclosed block at the end of the input
    is sent as it is). On a terminal, lines pasted together are one message too.
    """
    first = read_line(interactive, stdin, lineno)
    if first.lstrip().startswith(BLOCK):
        return _read_block(first.lstrip()[len(BLOCK) :], interactive, stdin, lineno)
    lines = [first]
    while interactive and _waiting(stdin):
        lines.append(read_line(interactive, stdin, lineno + len(lines), ""))
    return "\n".join(lines), len(lines)


def _read_block(opening: str, interactive: bool, stdin: TextIO, lineno: int) -> tuple[str, int]:
    if opening.rstrip().endswith(BLOCK):  # """all on one line"""
        return opening.rstrip()[: -len(BLOCK)], 1
    parts, used = ([opening] if opening.strip() else []), 1
    while True:
        try:
            line = read_line(interactive, stdin, lineno + used, MORE)
        except EOFError:
            break
        used += 1
        if line.rstrip().endswith(BLOCK):
            parts.append(line.rstrip()[: -len(BLOCK)])
            break
        parts.append(line)
    return "\n".join(parts).strip("\n"), used
