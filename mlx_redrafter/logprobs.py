"""Log-probabilities of emitted tokens, from the logits that chose them.

Every emitted token has one row of target logits that predicted it: a plain step's logits,
or in a speculative round the verify logits of its parent node (a drafted, copied or sampled
token alike). `LogprobRecorder` turns those rows into the token's log-probability and the
most likely alternatives, lazily on the device, and hands them out in emission order.

The log-probabilities are the model's own: log_softmax of the raw logits, before temperature,
top-k/top-p or a grammar mask (what OpenAI-style APIs report).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .errors import GenerationError

MAX_TOP_LOGPROBS = 20


@dataclass
class TokenLogprob:
    """One emitted token: its log-probability and the `top` most likely tokens (id, logprob),
    most likely first (empty unless top_logprobs was asked for)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


class LogprobRecorder:
    """Queue of emitted tokens' log-probabilities, filled by the decoding loops (`record`)
    and drained by the response stream (`pop`), one entry per emitted token."""

    def __init__(self, top_logprobs: int = 0):
        if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise GenerationError(
                f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs}"
            )
        self.top_logprobs = top_logprobs
        self._pending: deque = deque()  # (batch, row): batch = [tokens, logprobs, top ids, top lps]

    def record(self, logits: mx.array, tokens: Sequence[int] | mx.array) -> None:
        """logits (n, V): row i predicted tokens[i]. Nothing is evaluated here."""
        logits = logits.astype(mx.float32)
        tokens = mx.array(tokens, dtype=mx.int32) if not isinstance(tokens, mx.array) else tokens
        tokens = tokens.reshape(-1)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # (n, V)
        chosen = mx.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]  # (n,)
        k = self.top_logprobs
        if k:
            top_ids = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[:, :k]  # (n, k)
            top_lp = mx.take_along_axis(logprobs, top_ids, axis=-1)
            order = mx.argsort(-top_lp, axis=-1)
            top_ids = mx.take_along_axis(top_ids, order, axis=-1)
            top_lp = mx.take_along_axis(top_lp, order, axis=-1)
        else:
            top_ids = top_lp = None
        batch = [tokens, chosen] + ([top_ids, top_lp] if k else [])
        for i in range(tokens.shape[0]):
            self._pending.append((batch, i))

    def pop(self, token: int) -> TokenLogprob:
        """The entry of the next emitted token, which must be `token`."""
        if not self._pending:
            raise GenerationError(f"no log-probability was recorded for token {token}")
        batch, i = self._pending.popleft()
        if isinstance(batch[0], mx.array):  # first use of this batch: one host copy
            mx.eval(*batch)
            batch[:] = [np.array(a) for a in batch]
        recorded = int(batch[0][i])
        if recorded != int(token):
            raise GenerationError(f"log-probability recorded for {recorded}, emitted {token}")
        top: list[tuple[int, float]] = []
        if len(batch) > 2:
            top = [(int(a), float(b)) for a, b in zip(batch[2][i], batch[3][i], strict=True)]
        return TokenLogprob(int(token), float(batch[1][i]), top)

    def clear(self) -> None:
        self._pending.clear()


def openai_logprob(tokenizer, entry: TokenLogprob) -> dict:
    """One entry of an OpenAI chat `logprobs.content` list: token text, logprob, UTF-8
    bytes and `top_logprobs` in the same shape. A token that is part of a multi-byte
    character decodes to U+FFFD here (its bytes are those of that text)."""

    def one(token: int, logprob: float) -> dict:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {**one(entry.token, entry.logprob), "top_logprobs": [one(t, lp) for t, lp in entry.top]}
