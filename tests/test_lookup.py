"""Context lookup: literal contexts with their exact candidates, then the incremental index
against a brute-force rescan after random appends."""

import mlx_redrafter  # noqa: F401  (first: loads the BLAS before mlx.core)

# isort: split
import numpy as np
import pytest

from mlx_redrafter.lookup import ContextIndex, LookupCandidate


def propose(context, max_tokens, max_candidates=2, **kwargs):
    index = ContextIndex(**kwargs)
    index.extend(context)
    return index.propose(max_tokens, max_candidates)


def reference_propose(
    context, max_tokens, max_candidates, min_match=2, max_match=8, max_occurrences=8
):
    """The documented rule by rescanning the whole context; dedupes all occurrences before
    cutting to max_candidates (the index cuts as it goes)."""
    context = list(context)
    n_context = len(context)
    occurrences = []
    for n in range(min_match, max_match + 1):
        suffix = context[n_context - n :]
        ends = [e for e in range(n, n_context) if context[e - n : e] == suffix]
        ends = ends[::-1][:max_occurrences]
        for e in ends:
            count = sum(context[f] == context[e] for f in ends)
            occurrences.append((n, count, e, tuple(context[e : e + max_tokens])))
    occurrences.sort(reverse=True)
    result = []
    for n, count, _, tokens in occurrences:
        if any(r.tokens[: len(tokens)] == tokens for r in result):
            continue
        extended = [i for i, r in enumerate(result) if tokens[: len(r.tokens)] == r.tokens]
        if extended:
            (i,) = extended
            result[i] = LookupCandidate(tokens, result[i].match_len, result[i].count)
        else:
            result.append(LookupCandidate(tokens, n, count))
    return result[:max_candidates]


def test_repeat():
    context = [1, 2, 3, 4, 5, 1, 2]
    assert propose(context, 3) == [LookupCandidate((3, 4, 5), 2, 1)]


def test_max_tokens_truncates():
    assert propose([1, 2, 3, 4, 5, 1, 2], 2) == [LookupCandidate((3, 4), 2, 1)]
    assert propose([1, 2, 3, 4, 5, 1, 2], 0) == []


def test_continuation_runs_to_the_end_of_the_context():
    # The only earlier [1, 2] ends 3 tokens before the context does: its continuation stops
    # there (the suffix occurrence itself is never a candidate).
    assert propose([1, 2, 3, 4, 5, 1, 2], 10) == [LookupCandidate((3, 4, 5, 1, 2), 2, 1)]


def test_no_match():
    assert propose([1, 2, 3, 4], 4) == []
    assert propose([1, 2, 3, 1], 4) == []  # only a 1-gram repeats
    assert propose([1], 4) == []
    assert propose([], 4) == []
    assert ContextIndex().propose(4) == []


def test_min_match():
    assert propose([1, 2, 3, 1], 4, min_match=1) == [LookupCandidate((2, 3, 1), 1, 1)]
    assert propose([1, 2, 3, 9, 1, 2], 4, min_match=3) == []
    assert propose([7, 1, 2, 3, 9, 7, 1, 2], 4, min_match=3) == [
        LookupCandidate((3, 9, 7, 1), 3, 1)
    ]


def test_max_match_caps_the_reported_length():
    context = [5, 6, 7, 8, 1, 5, 6, 7, 8]
    assert propose(context, 3) == [LookupCandidate((1, 5, 6), 4, 1)]
    assert propose(context, 3, max_match=3) == [LookupCandidate((1, 5, 6), 3, 1)]


def test_occurrences_that_disagree():
    # [1, 2] occurs at ends 2, 6 and 10; the longest earlier match of the suffix is the
    # 6-gram [1, 2, 3, 9, 1, 2] ending at 6 (followed by 4); [9, 1, 2] also ends at 10
    # (followed by 3), and [1, 2] at 2 gives the same 4 tokens as 10.
    context = [1, 2, 3, 9, 1, 2, 4, 9, 1, 2, 3, 9, 1, 2]
    assert propose(context, 4) == [
        LookupCandidate((4, 9, 1, 2), 6, 1),
        LookupCandidate((3, 9, 1, 2), 3, 1),
    ]
    assert propose(context, 4, max_candidates=1) == [LookupCandidate((4, 9, 1, 2), 6, 1)]
    assert propose(context, 4, max_candidates=0) == []


def test_frequent_beats_recent_and_recent_breaks_ties():
    # [7, 8] ends at 2, 6 and 10, followed by 2, 2 and 1.
    context = [7, 8, 2, 5, 7, 8, 2, 6, 7, 8, 1, 0, 7, 8]
    assert propose(context, 2, max_candidates=4) == [
        LookupCandidate((2, 6), 2, 2),
        LookupCandidate((2, 5), 2, 2),
        LookupCandidate((1, 0), 2, 1),
    ]
    # Only the most recent occurrence is considered.
    assert propose(context, 2, max_candidates=4, max_occurrences=1) == [
        LookupCandidate((1, 0), 2, 1)
    ]


def test_prefix_is_replaced_by_the_longer_copy():
    # A loop: the longest match (5 tokens, ending at 5) runs into the end of the context after
    # 3 tokens; the older [1, 2] ending at 2 continues the same way for longer and takes its
    # place, keeping its match length and count.
    context = [1, 2, 3, 1, 2, 3, 1, 2]
    assert propose(context, 6) == [LookupCandidate((3, 1, 2, 3, 1, 2), 5, 1)]
    assert propose(context, 2) == [LookupCandidate((3, 1), 5, 1)]


def test_extend_accepts_numpy_and_grows():
    index = ContextIndex()
    index.extend(np.array([4, 5, 6], dtype=np.int32))
    index.extend([4])
    assert len(index) == 4
    assert index.propose(4) == []
    index.extend(np.int64(5).reshape(1))
    assert index.tokens == (4, 5, 6, 4, 5)
    assert index.propose(4) == [LookupCandidate((6, 4, 5), 2, 1)]
    assert all(type(t) is int for t in index.propose(4)[0].tokens)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(min_match=0),
        dict(min_match=3, max_match=2),
        dict(max_occurrences=0),
    ],
)
def test_bad_settings(kwargs):
    with pytest.raises(ValueError):
        ContextIndex(**kwargs)


@pytest.mark.parametrize(
    "settings",
    [
        dict(),
        dict(min_match=1, max_match=4, max_occurrences=3),
        dict(min_match=3, max_match=6, max_occurrences=16),
    ],
)
def test_incremental_index_equals_a_rescan(settings):
    rng = np.random.default_rng(sum(settings.values()) + 1)
    index = ContextIndex(**settings)
    context = []
    seen_lengths, seen_counts, most_candidates = set(), set(), 0
    for _ in range(120):
        new = rng.integers(0, 3, size=int(rng.integers(1, 5))).tolist()
        index.extend(new)
        context += new
        for max_tokens, max_candidates in [(1, 1), (3, 2), (8, 4)]:
            expected = reference_propose(context, max_tokens, max_candidates, **settings)
            assert index.propose(max_tokens, max_candidates) == expected
            seen_lengths.update(c.match_len for c in expected)
            seen_counts.update(c.count for c in expected)
            most_candidates = max(most_candidates, len(expected))
    # The tiny alphabet must exercise the interesting cases, or the comparison proves little.
    min_match, max_match = settings.get("min_match", 2), settings.get("max_match", 8)
    assert seen_lengths == set(range(min_match, max_match + 1))
    assert len(seen_counts) >= 3 and most_candidates == 4


class CountingDict(dict):
    """Counts the reads and writes the index makes to its n-gram table."""

    def __init__(self, *args):
        super().__init__(*args)
        self.operations = 0

    def get(self, key, default=None):
        self.operations += 1
        return super().get(key, default)

    def __getitem__(self, key):
        self.operations += 1
        return super().__getitem__(key)

    def __setitem__(self, key, value):
        self.operations += 1
        super().__setitem__(key, value)


def test_long_context_extends_touch_only_the_new_ngrams():
    rng = np.random.default_rng(0)
    index = ContextIndex()
    prompt = rng.integers(0, 40, size=4096).tolist()
    index.extend(prompt)
    context = list(prompt)
    table = CountingDict(index._last)
    index._last = table
    levels = index.max_match - index.min_match + 1
    for step in range(128):
        new = rng.integers(0, 40, size=int(rng.integers(1, 5))).tolist()
        before = table.operations
        index.extend(new)
        context += new
        # one read and one write per n-gram ending at a new token, whatever the context length
        assert table.operations - before == 2 * levels * len(new)
        before = table.operations
        candidates = index.propose(16, 2)
        assert table.operations == before  # propose follows the links, no table lookups
        if step % 32 == 0:
            assert candidates == reference_propose(context, 16, 2)
    assert len(index) == len(context)
