"""Tool calls in a model's own words: which format a chat template speaks, and parsers that
turn generated text into calls, whole or as it streams.

Two formats: Hermes-style (Qwen2.5/Qwen3 and many others), one JSON object per
`<tool_call>...</tool_call>` block after optional text; and Llama 3.x JSON, where the whole
answer is `{"name": ..., "parameters": {...}}` (optionally after `<|python_tag|>`). Text that
looks like a call but is not valid JSON, or names no declared tool, stays text: a model's
mistake never becomes a server error.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

HERMES = "hermes"
LLAMA3 = "llama3"
START, END = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON object, as text
    id: str

    def as_dict(self) -> dict:
        """The JSON object form (for templates and the Anthropic API)."""
        return json.loads(self.arguments)


def new_call_id(prefix: str = "call") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def tool_format(template: str | None) -> str | None:
    """The tool-call format a chat template renders, None when it renders no tools, "" when
    it takes tools in a format this server cannot parse."""
    if not isinstance(template, str) or "tools" not in template:
        return None
    if START in template:
        return HERMES
    if PYTHON_TAG in template or "ipython" in template or '"parameters"' in template:
        return LLAMA3
    return ""


def _call(obj, names: set[str]) -> ParsedCall | None:
    """A ParsedCall from a decoded JSON value, or None when it is not a call of a declared
    tool."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict) or (names and obj["name"] not in names):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False), new_call_id())


def _loads(text: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def parse_hermes_block(block: str, names: set[str]) -> ParsedCall | None:
    return _call(_loads(block.strip()), names)


def parse_llama3(text: str, names: set[str]) -> list[ParsedCall] | None:
    """The calls of a whole Llama 3.x answer, or None when it is not (only) calls."""
    body = text.strip().removeprefix(PYTHON_TAG).strip()
    if not body.startswith(("{", "[")):
        return None
    value = _loads(body)
    if value is None and ";" in body:  # several calls separated by semicolons
        value = [_loads(part) for part in body.split(";") if part.strip()]
    items = value if isinstance(value, list) else [value]
    calls = [_call(item, names) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return calls


def parse_output(text: str, fmt: str, names: set[str]) -> tuple[str | None, list[ParsedCall]]:
    """(content, calls) of a whole answer; content is None when the answer is only calls."""
    stream = ToolStream(fmt, names)
    pieces = stream.feed(text) + stream.finish()
    content = "".join(p for p in pieces if isinstance(p, str))
    calls = [p for p in pieces if isinstance(p, ParsedCall)]
    return (content or None) if calls else content, calls


class ToolStream:
    """Splits streamed text into text pieces (str) and calls (ParsedCall), in order. Text
    that may be the start of a call is held back until it is known not to be."""

    def __init__(self, fmt: str, names: set[str]):
        self.fmt = fmt
        self.names = names
        self.buffer = ""
        self.in_call = False
        self.pending_space = ""  # whitespace held back: dropped next to calls
        self.calls = 0
        self.mode = None if fmt == LLAMA3 else "text"  # llama3: decided by the first chars

    def feed(self, piece: str) -> list[str | ParsedCall]:
        self.buffer += piece
        return self._llama3_feed() if self.fmt == LLAMA3 else self._hermes_feed()

    def finish(self) -> list[str | ParsedCall]:
        out: list[str | ParsedCall] = []
        if self.fmt == LLAMA3 and self.mode != "text":
            calls = parse_llama3(self.buffer, self.names)
            if calls:
                self.calls += len(calls)
                return calls
            out += self._text(self.buffer)
        elif self.in_call:
            call = parse_hermes_block(self.buffer, self.names)  # cut off at its end: try it
            out += [self._called(call)] if call else self._text(START + self.buffer)
        else:
            out += self._text(self.buffer)
        self.buffer = ""
        if self.pending_space and not self.calls:
            out.append(self.pending_space)
        self.pending_space = ""
        return out

    # --- helpers ------------------------------------------------------------------------------

    def _text(self, text: str) -> list[str | ParsedCall]:
        if not text:
            return []
        self.pending_space += text
        body = self.pending_space.rstrip()
        if not body:
            return []
        self.pending_space = self.pending_space[len(body) :]  # trailing space waits
        return [body]

    def _called(self, call: ParsedCall) -> ParsedCall:
        self.calls += 1
        self.pending_space = ""
        return call

    def _hermes_feed(self) -> list[str | ParsedCall]:
        out: list[str | ParsedCall] = []
        while True:
            if not self.in_call:
                i = self.buffer.find(START)
                if i < 0:
                    keep = _partial_suffix(self.buffer, START)
                    out += self._text(self.buffer[: len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep :]
                    return out
                out += self._text(self.buffer[:i])
                self.buffer = self.buffer[i + len(START) :]
                self.in_call = True
            else:
                j = self.buffer.find(END)
                if j < 0:
                    return out
                block, self.buffer = self.buffer[:j], self.buffer[j + len(END) :]
                self.in_call = False
                call = parse_hermes_block(block, self.names)
                out += [self._called(call)] if call else self._text(START + block + END)

    def _llama3_feed(self) -> list[str | ParsedCall]:
        if self.mode is None:
            head = self.buffer.lstrip()
            if not head:
                return []
            if head.startswith(("{", "[")) or head.startswith(PYTHON_TAG):
                self.mode = "call"
            elif PYTHON_TAG.startswith(head):
                return []  # maybe the tag, still arriving
            else:
                self.mode = "text"
        if self.mode == "call":
            return []  # decided at the end
        out, self.buffer = self.buffer, ""
        return [out] if out else []


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
