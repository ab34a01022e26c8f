"""Lookup v2: a suffix index over one or more token documents, and the continuations it proposes.

`SuffixIndex` finds where the longest suffix of a query (the context itself, or another
sequence) occurred before, measures how long each of those matches really is (up to
`max_extend` tokens back), and merges the continuations that followed them into a small trie:
the main candidate follows, token by token, the continuation most of the matching occurrences
agree on; branches start where they disagree. Every proposed token carries its support (the
share of the occurrences still in agreement that chose it), and every candidate the length of
its match, so that the tree sizing (`sizing.copy_candidate`) can give long, agreeing copies a
high estimate and short or contested ones a low one: copies are as long as they deserve.

Host-side pure Python. `extend` costs O(new tokens x hashed match lengths); `propose` a few
dozen dictionary reads plus O(occurrences x (max_extend + max_tokens)) list reads.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

SEPARATOR = -1  # between documents: never a token, so no match or copy crosses it


@dataclass(frozen=True)
class SuffixCandidate:
    """One continuation proposed by the index.

    tokens     the tokens that followed the matched occurrences (they continue the query)
    support    per token: the share of the occurrences that agree with the candidate so far
               which continue with this token (1.0 where they all agree)
    match_len  the longest match behind the candidate (tokens of the query's suffix that the
               occurrence repeats, up to the index's `max_extend`)
    count      how many occurrences support its first token
    """

    tokens: tuple[int, ...]
    support: tuple[float, ...]
    match_len: int
    count: int


class SuffixIndex:
    """An incremental index of the n-grams (min_match <= n <= max_match) of a token corpus.

    The corpus is a sequence of documents (`add_document`) or one growing document
    (`extend`). Per n-gram it keeps the end of its most recent occurrence and, per (n, end),
    the end of the previous occurrence: a linked list per n-gram, newest first. Matches longer
    than max_match are found by comparing tokens backwards from a hashed match, so hashing stays
    cheap while matches of any length (up to max_extend) are told apart.
    """

    def __init__(
        self,
        min_match: int = 2,
        max_match: int = 8,
        max_occurrences: int = 16,
        max_extend: int = 64,
    ):
        if min_match < 1:
            raise ValueError(f"min_match must be at least 1, got {min_match}")
        if max_match < min_match:
            raise ValueError(f"max_match ({max_match}) must be at least min_match ({min_match})")
        if max_occurrences < 1:
            raise ValueError(f"max_occurrences must be at least 1, got {max_occurrences}")
        self.min_match = min_match
        self.max_match = max_match
        self.max_occurrences = max_occurrences
        self.max_extend = max(max_extend, max_match)
        self._tokens: list[int] = []
        self._doc_start = 0  # where the current document starts
        self._last: dict[tuple[int, ...], int] = {}
        # _previous[n - min_match][end]: end of the previous occurrence of the n-gram ending at
        # `end` (-1: none); index 0 stands for the empty corpus.
        self._previous: list[list[int]] = [[-1] for _ in range(min_match, max_match + 1)]

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def tokens(self) -> tuple[int, ...]:
        """The corpus indexed so far (documents separated by SEPARATOR)."""
        return tuple(self._tokens)

    def tail(self, n: int) -> list[int]:
        """The last n tokens of the corpus (a query for another index)."""
        return self._tokens[-n:]

    @property
    def num_keys(self) -> int:
        """Distinct n-grams held (what the index's memory grows with, besides the corpus)."""
        return len(self._last)

    # -- building ----------------------------------------------------------------------------

    def add_document(self, tokens: Sequence[int]) -> None:
        """Start a new document (after a separator, unless the corpus is empty) and index it."""
        if self._tokens:
            self._append_separator()
        self.extend(tokens)

    def _append_separator(self) -> None:
        self._tokens.append(SEPARATOR)
        for previous in self._previous:
            previous.append(-1)
        self._doc_start = len(self._tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        """Append tokens to the current document and index the n-grams that end at each."""
        corpus, last, start = self._tokens, self._last, self._doc_start
        for token in tokens:
            corpus.append(int(token))
            end = len(corpus)
            for level, previous in enumerate(self._previous):
                n = self.min_match + level
                if end - n < start:
                    previous.append(-1)
                    continue
                key = tuple(corpus[end - n : end])
                previous.append(last.get(key, -1))
                last[key] = end

    # -- matching ----------------------------------------------------------------------------

    def _ends(self, query: Sequence[int] | None, n: int) -> list[int]:
        """Ends of the earlier occurrences of the query's last n tokens, newest first (the
        corpus's own suffix when query is None, its occurrence at the very end excluded)."""
        previous = self._previous[n - self.min_match]
        if query is None:
            end = previous[len(self._tokens)]
        else:
            end = self._last.get(tuple(query[-n:]), -1)
        ends = []
        while end >= 0 and len(ends) < self.max_occurrences:
            ends.append(end)
            end = previous[end]
        return ends

    def _match_length(self, query: Sequence[int], end: int, n: int) -> int:
        """How many tokens before `end` the corpus repeats the query's suffix (>= n)."""
        corpus = self._tokens
        limit = min(self.max_extend, len(query), end)
        k = n
        while k < limit and corpus[end - k - 1] == query[-k - 1]:
            k += 1
        return k

    def _continuation(self, end: int, max_tokens: int) -> tuple[int, ...]:
        out = self._tokens[end : end + max_tokens]
        if SEPARATOR in out:
            out = out[: out.index(SEPARATOR)]
        return tuple(out)

    def propose(
        self, max_tokens: int, max_candidates: int = 3, query: Sequence[int] | None = None
    ) -> list[SuffixCandidate]:
        """Continuations of `query` (default: the corpus itself) copied from the corpus.

        The longest hashed suffix length with earlier occurrences gives the main group: its
        occurrences whose real match is at least half the longest one's are merged into a
        trie (majority path first, then the branches where they disagree, by probability).
        Shorter suffix lengths add a candidate only if it starts with a token the main group
        never proposed. At most `max_candidates`; [] when nothing of length >= min_match
        occurred before.
        """
        if max_tokens < 1 or max_candidates < 1:
            return []
        own = query is None
        q = self._tokens if own else list(query)
        top = min(self.max_match, len(q) - 1 if own else len(q))
        out: list[SuffixCandidate] = []
        first_tokens: set[int] = set()
        for n in range(top, self.min_match - 1, -1):
            ends = self._ends(None if own else q, n)
            found = [(self._match_length(q, e, n), e) for e in ends]
            found = [(m, self._continuation(e, max_tokens)) for m, e in found]
            found = [(m, c) for m, c in found if c]
            if not found:
                continue
            if not out:
                best = max(m for m, _ in found)
                group = [(m, c) for m, c in found if 2 * m >= best]
                out.extend(_trie_candidates(group, max_candidates))
                first_tokens = {c.tokens[0] for c in out}
            else:
                fresh = [(m, c) for m, c in found if c[0] not in first_tokens]
                if fresh:
                    extra = _trie_candidates(fresh, 1)[0]
                    out.append(extra)
                    first_tokens.add(extra.tokens[0])
            if len(out) >= max_candidates:
                break
        return out[:max_candidates]


def _majority_path(conts: list[tuple[int, tuple[int, ...]]], depth: int, prefix: tuple):
    """Extend `prefix` (shared by every continuation in `conts`, from `depth` on) by the token
    most of them agree on, while any continues; returns (tokens, support, alternatives), the
    alternatives being (probability of the branch's first node, depth, token, its
    continuations)."""
    tokens, support, alternatives = list(prefix), [], []
    p = 1.0
    while True:
        live = [(m, c) for m, c in conts if len(c) > depth]
        if not live:
            break
        counts = Counter(c[depth] for _, c in live)
        # the majority; ties go to the first (longest match, then most recent) occurrence
        order = {}
        for _, c in live:
            order.setdefault(c[depth], len(order))
        ranked = sorted(counts, key=lambda t: (-counts[t], order[t]))
        token = ranked[0]
        for other in ranked[1:]:
            share = counts[other] / len(live)
            alternatives.append(
                (p * share, depth, other, [(m, c) for m, c in live if c[depth] == other])
            )
        share = counts[token] / len(live)
        p *= share
        tokens.append(token)
        support.append(share)
        conts = [(m, c) for m, c in live if c[depth] == token]
        depth += 1
    return tokens, support, alternatives


def _trie_candidates(group: list[tuple[int, tuple[int, ...]]], limit: int) -> list:
    """The majority path through the continuations of `group` ((match length,
    continuation), best first), then up to limit - 1 branches by probability."""
    group = sorted(group, key=lambda mc: -mc[0])  # stable: recency breaks ties
    tokens, support, alternatives = _majority_path(group, 0, ())
    out = [
        SuffixCandidate(tuple(tokens), tuple(support), max(m for m, _ in group),
                        sum(1 for _, c in group if c[0] == tokens[0]))
    ]  # fmt: skip
    alternatives.sort(key=lambda a: -a[0])
    for _, depth, token, conts in alternatives[: limit - 1]:
        head = tuple(tokens[:depth]) + (token,)
        branch, tail_support, _ = _majority_path(conts, depth + 1, head)
        share = len(conts) / max(1, _live_count(group, depth, tokens[:depth]))
        out.append(
            SuffixCandidate(
                tuple(branch),
                tuple(support[:depth]) + (share,) + tuple(tail_support),
                max(m for m, _ in conts),
                len(conts),
            )
        )
    return out


def _live_count(group, depth: int, prefix: Sequence[int]) -> int:
    """Continuations of `group` that follow `prefix` and go on past it."""
    prefix = tuple(prefix)
    return sum(1 for _, c in group if len(c) > depth and c[:depth] == prefix)
