"""Context lookup: draft candidates copied from earlier in the context, with no model at all.

Owns the n-gram index over the context (prompt + every emitted token) and the proposer that
turns the longest suffix seen before into the continuations that followed it. Host-side pure
Python: an `extend` costs O(new tokens x match lengths) and a `propose` a few dozen dictionary
and list reads, whatever the length of the context.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LookupCandidate:
    """One continuation copied from the context.

    tokens     the tokens that followed an earlier occurrence of the matched suffix; they
               continue the context (the context's last token is not repeated)
    match_len  length of the matched suffix (n-gram) that produced them
    count      how many of the considered earlier occurrences of that suffix were followed
               by tokens[0] (>= 1)
    """

    tokens: tuple[int, ...]
    match_len: int
    count: int


class ContextIndex:
    """An incremental index of the context's n-grams, min_match <= n <= max_match.

    For every n-gram it keeps the end of its most recent occurrence, and for every
    (n, end) the end of the previous occurrence of the same n-gram: a linked list per n-gram
    through the context, newest first, so that growing the context never rescans it.
    `propose` walks at most `max_occurrences` links per match length.
    """

    def __init__(self, min_match: int = 2, max_match: int = 8, max_occurrences: int = 8):
        if min_match < 1:
            raise ValueError(f"min_match must be at least 1, got {min_match}")
        if max_match < min_match:
            raise ValueError(f"max_match ({max_match}) must be at least min_match ({min_match})")
        if max_occurrences < 1:
            raise ValueError(f"max_occurrences must be at least 1, got {max_occurrences}")
        self.min_match = min_match
        self.max_match = max_match
        self.max_occurrences = max_occurrences
        self._tokens: list[int] = []
        # n-gram -> end (exclusive) of its most recent occurrence
        self._last: dict[tuple[int, ...], int] = {}
        # _previous[n - min_match][end]: end of the previous occurrence of the n-gram that
        # ends at `end`, -1 if none (or if end < n); index 0 stands for the empty context.
        self._previous: list[list[int]] = [[-1] for _ in range(min_match, max_match + 1)]

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def tokens(self) -> tuple[int, ...]:
        """The context indexed so far."""
        return tuple(self._tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        """Append tokens to the context and index the n-grams that end at each of them."""
        context = self._tokens
        last = self._last
        for token in tokens:
            context.append(int(token))
            end = len(context)
            for level, previous in enumerate(self._previous):
                n = self.min_match + level
                if end < n:
                    previous.append(-1)
                    continue
                key = tuple(context[end - n : end])
                previous.append(last.get(key, -1))
                last[key] = end

    def propose(self, max_tokens: int, max_candidates: int = 2) -> list[LookupCandidate]:
        """Continuations of the context copied from after earlier occurrences of its suffix.

        Every suffix length from max_match down to min_match is looked up; each of its
        `max_occurrences` most recent earlier occurrences gives the up to `max_tokens` tokens
        that followed it (fewer where the context ends first). Candidates are ranked by match
        length, then by how many occurrences agree on their first token, then by recency;
        identical continuations count once, and one that is a prefix of another is replaced
        by the longer one in its place. Returns [] when no suffix of length >= min_match
        occurred before.
        """
        if max_tokens < 1 or max_candidates < 1:
            return []
        context = self._tokens
        n_context = len(context)
        occurrences = []  # (match_len, count, end, continuation)
        for n in range(min(self.max_match, n_context - 1), self.min_match - 1, -1):
            previous = self._previous[n - self.min_match]
            ends = []  # most recent first
            end = previous[n_context]
            while end >= 0 and len(ends) < self.max_occurrences:
                ends.append(end)
                end = previous[end]
            if not ends:
                continue
            first_tokens = Counter(context[e] for e in ends)
            for e in ends:
                continuation = tuple(context[e : e + max_tokens])
                occurrences.append((n, first_tokens[continuation[0]], e, continuation))
        occurrences.sort(key=lambda o: (o[0], o[1], o[2]), reverse=True)

        kept: list[LookupCandidate] = []
        for match_len, count, _, continuation in occurrences:
            for i, candidate in enumerate(kept):
                if candidate.tokens[: len(continuation)] == continuation:
                    break  # identical to or a prefix of a better-ranked candidate
                if continuation[: len(candidate.tokens)] == candidate.tokens:
                    # extends a better-ranked candidate: the longer copy takes its place
                    kept[i] = LookupCandidate(continuation, candidate.match_len, candidate.count)
                    break
            else:
                if len(kept) < max_candidates:
                    kept.append(LookupCandidate(continuation, match_len, count))
        return kept
