"""Structured output and logprobs for the API adapters: a response format (OpenAI's
`response_format`, Anthropic's `output_config.format` in the same shape) compiled into a
grammar constraint, one per request; the per-token logprobs of the generation stream in the
OpenAI shapes of chat (`logprobs.content`) and completions (`tokens`, `token_logprobs`,
`top_logprobs`, `text_offset`), whole or a chunk at a time.
"""

from __future__ import annotations

import threading

from ..constrain import GrammarConstraint, JsonGrammar
from ..errors import ConstraintError
from ..logprobs import TokenLogprob, openai_logprob
from .protocol import APIError


class ResponseFormats:
    """The model's JSON grammar compiler, built once (`warm`, at start-up, or on the first
    request that needs it), and the constraint of each request compiled from it."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self._grammar: JsonGrammar | None = None
        self._lock = threading.Lock()

    def grammar(self) -> JsonGrammar:
        with self._lock:
            if self._grammar is None:
                self._grammar = JsonGrammar.for_model(self.model, self.tokenizer)
            return self._grammar

    def warm(self) -> None:
        """Build the compiler now; a model it cannot serve is told per request instead."""
        try:
            self.grammar()
        except ConstraintError:
            pass

    def constraint(
        self, response_format: dict | None, param: str = "response_format"
    ) -> GrammarConstraint | None:
        """A new constraint for one request's OpenAI-style `response_format` (None: free
        text); a 400 naming `param` (the request's field) when it cannot be served. Runs off
        the event loop."""
        if response_format is None or response_format.get("type", "text") == "text":
            return None
        try:
            return self.grammar().response_format(response_format)
        except ConstraintError as e:
            raise APIError(400, f"{param}: {e}", param) from None


# ---------------------------------------------------------------------------------------------
# logprobs


def chat_logprobs(tokenizer, entries: list[TokenLogprob]) -> dict:
    """A chat choice's (or chunk's) `logprobs` object for these tokens."""
    return {"content": [openai_logprob(tokenizer, e) for e in entries], "refusal": None}


class CompletionLogprobs:
    """The completions `logprobs` object, built token by token: `add` each emitted token with
    the text emitted before it (text_offset counts characters of the completion)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.offset = 0  # characters of completion text so far
        self.clear()

    def clear(self) -> None:
        self.tokens: list[str] = []
        self.token_logprobs: list[float] = []
        self.top_logprobs: list[dict[str, float]] = []
        self.text_offset: list[int] = []

    def add(self, entry: TokenLogprob, text: str) -> None:
        """One token; `text` is the completion text its event added (maybe empty)."""
        decode = self.tokenizer.decode
        self.tokens.append(decode([entry.token]))
        self.token_logprobs.append(entry.logprob)
        top: dict[str, float] = {}
        for token, logprob in entry.top:  # most likely first: a repeated text keeps its best
            top.setdefault(decode([token]), logprob)
        self.top_logprobs.append(top)
        self.text_offset.append(self.offset)
        self.offset += len(text)

    def take(self) -> dict | None:
        """The tokens added since the last `take` (None if none), then forgets them."""
        if not self.tokens:
            return None
        out = {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }
        self.clear()
        return out
