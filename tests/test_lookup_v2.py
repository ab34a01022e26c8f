"""Lookup v2: the suffix index (longest matches, agreement-weighted continuations, documents,
queries from another sequence) and the copy candidates the tree sizing makes of them."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_redrafter.sizing import (
    COPY_PRIOR,
    COPY_RUN_PRIOR,
    LOOKUP,
    MEMORY,
    TreePolicy,
    copy_candidate,
    match_bucket,
)
from mlx_redrafter.suffix_index import SEPARATOR, SuffixIndex


def index_of(tokens, **kw) -> SuffixIndex:
    index = SuffixIndex(**kw)
    index.extend(tokens)
    return index


def test_repeat_is_copied_with_full_support():
    index = index_of([1, 2, 3, 4, 1, 2])
    (cand,) = index.propose(8)
    assert cand.tokens == (3, 4, 1, 2)  # runs to the end of the context
    assert cand.support == (1.0, 1.0, 1.0, 1.0)
    assert cand.match_len == 2 and cand.count == 1


def test_match_length_is_measured_past_the_hashed_lengths():
    block = list(range(10, 40))  # 30 distinct tokens
    index = index_of(block + [99] + block[:20], max_match=4)
    (cand,) = index.propose(5)
    assert cand.tokens == tuple(block[20:25])
    assert cand.match_len == 20  # the whole repeated run, though only 4-grams are hashed
    capped = index_of(block + [99] + block[:20], max_match=4, max_extend=12)
    assert capped.propose(5)[0].match_len == 12


def test_no_match_and_bad_settings():
    assert index_of([1, 2, 3, 4, 5]).propose(4) == []
    assert index_of([1, 2, 3, 1, 2]).propose(0) == []
    assert SuffixIndex().propose(4) == []
    for kw in ({"min_match": 0}, {"min_match": 3, "max_match": 2}, {"max_occurrences": 0}):
        with pytest.raises(ValueError):
            SuffixIndex(**kw)


def test_majority_leads_and_disagreement_branches():
    # "5 6" was followed by 7 twice and by 8 once; the context ends with "5 6" again.
    tokens = [5, 6, 7, 0, 5, 6, 8, 1, 5, 6, 7, 2, 5, 6]
    (main, branch) = index_of(tokens, max_occurrences=8).propose(3, max_candidates=2)
    # main: the majority first token 7 (2 of 3), then the most recent of its runs (7 2 ...)
    assert main.tokens[0] == 7
    assert main.support[0] == pytest.approx(2 / 3)
    assert main.support[1] == pytest.approx(1 / 2)  # the two 7-runs go on with 2 and 0
    assert main.count == 2
    assert branch.tokens == (8, 1, 5)
    assert branch.support[0] == pytest.approx(1 / 3)
    assert branch.support[1:] == (1.0, 1.0)


def test_longer_matches_outrank_shorter_ones():
    # "3 5 6" occurred once, followed by 9; "5 6" alone more often, followed by 7.
    tokens = [5, 6, 7, 0, 5, 6, 7, 0, 3, 5, 6, 9, 0, 3, 5, 6]
    cands = index_of(tokens).propose(2, max_candidates=3)
    assert cands[0].tokens == (9, 0) and cands[0].match_len == 4  # "0 3 5 6"
    # a shorter match with another first token comes after it
    assert cands[1].tokens == (7, 0) and cands[1].match_len == 2


def test_documents_never_match_or_copy_across_a_separator():
    index = SuffixIndex()
    index.add_document([1, 2, 3])
    index.add_document([4, 1, 2])
    assert index.tokens == (1, 2, 3, SEPARATOR, 4, 1, 2)
    (cand,) = index.propose(8)
    assert cand.tokens == (3,)  # stops where the first document ends
    index.add_document([3, 4])
    # "2 <sep> 3" is not an occurrence of "2 3": the only match for the suffix "3 4" is none
    assert index.propose(8) == []


def test_a_query_from_another_sequence():
    memory = SuffixIndex()
    memory.add_document([10, 11, 12, 13, 14, 15])
    memory.add_document([20, 11, 12, 30])
    # the query ends with "11 12", preceded by 10: the longer match wins
    (first, second) = memory.propose(3, 2, query=[7, 10, 11, 12])
    assert first.tokens == (13, 14, 15) and first.match_len == 3
    assert second.tokens == (30,)
    # the memory's own end is an occurrence like any other for an outside query
    assert memory.propose(2, 1, query=[12, 30]) == []  # nothing follows it
    assert memory.propose(4, 1, query=[1, 2]) == []


@pytest.mark.parametrize("seed", range(4))
def test_incremental_index_equals_one_built_at_once(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 6, size=300).tolist()
    whole = index_of(tokens)
    grown = SuffixIndex()
    pos = 0
    while pos < len(tokens):
        step = int(rng.integers(1, 9))
        grown.extend(tokens[pos : pos + step])
        pos += step
        assert grown.propose(16, 3) == index_of(tokens[:pos]).propose(16, 3)
    assert grown.propose(16, 3) == whole.propose(16, 3)


def test_brute_force_agreement_on_random_text():
    """The main candidate's first token is the most common successor among the occurrences
    of the longest repeated suffix (brute force over the whole context)."""
    rng = np.random.default_rng(7)
    for _ in range(50):
        tokens = rng.integers(0, 4, size=int(rng.integers(10, 60))).tolist()
        cands = index_of(tokens, max_match=5, max_occurrences=1000).propose(4, 3)
        best_n, followers = 0, []
        for n in range(5, 1, -1):
            suffix = tokens[-n:]
            ends = [e for e in range(n, len(tokens)) if tokens[e - n : e] == suffix]
            if ends:
                best_n, followers = n, [tokens[e] for e in ends]
                break
        if not best_n:
            assert cands == []
            continue
        counts = {t: followers.count(t) for t in followers}
        assert counts[cands[0].tokens[0]] == max(counts.values())


def test_copy_candidates_earn_higher_estimates_as_the_match_grows():
    short = copy_candidate(0, [1, 2, 3], match_len=2)
    assert short.raw[0] == COPY_PRIOR[LOOKUP][2]
    assert short.buckets == ((LOOKUP, 2), ("lookup-run", 3), ("lookup-run", 4))
    long = copy_candidate(0, list(range(1, 21)), match_len=30)
    assert long.raw[0] == COPY_PRIOR[LOOKUP][24]
    assert long.raw[-1] == COPY_RUN_PRIOR[32]
    assert all(a <= b for a, b in zip(long.raw[1:], long.raw[2:], strict=False))
    weak = copy_candidate(0, [1, 2], match_len=2, support=[0.5, 1.0], source=MEMORY)
    assert weak.raw[0] == pytest.approx(0.5 * COPY_PRIOR[MEMORY][2])
    assert weak.buckets[0] == (MEMORY, 2) and weak.buckets[1] == ("memory-run", 3)
    assert [match_bucket(n) for n in (1, 4, 5, 7, 8, 15, 16, 40)] == [1, 4, 5, 5, 8, 12, 16, 32]


def test_a_long_agreeing_copy_fills_a_flat_tree_and_a_steep_curve_trims_it():
    cand = copy_candidate(0, list(range(1, 31)), match_len=40)
    flat = TreePolicy([1.0] * 32).select([cand], with_drafter=False)
    assert len(flat.sequences[0]) == 31  # the root and all 30 copied tokens
    steep = TreePolicy([1.0 + 0.5 * i for i in range(32)]).select([cand], with_drafter=False)
    assert 1 < len(steep.sequences[0]) < 31


def test_copies_shrink_to_the_room_left_near_the_end_of_the_context():
    """1024 positions: 990 prompt tokens + 16 new ones leave 18 for a round's lookahead; the
    default copy length (32) shrinks to fit instead of turning the request down, so a caller
    that keeps v1's headroom (16 tokens past max_tokens) still gets answers."""
    import mlx.core as mx
    from helpers import random_model, tiny_llama_config

    from mlx_redrafter.generation import GenerationError, stream_generate

    class Tok:
        eos_token_ids: set = set()

        class detokenizer:  # noqa: N801  (a stand-in object)
            reset = add_token = finalize = staticmethod(lambda *a: None)
            last_segment = ""

    config = tiny_llama_config(64, 48, 2, max_position_embeddings=1024, tie_word_embeddings=False)
    model = random_model(config, 3)
    mx.eval(model.parameters())
    prompt = ([1, 2, 3, 4] * 250)[:990]
    spec = [r.token for r in stream_generate(model, Tok(), prompt, max_tokens=16)]
    plain = [r.token for r in stream_generate(model, Tok(), prompt, max_tokens=16, lookup=False)]
    assert spec == plain
    with pytest.raises(GenerationError, match="context length"):  # an explicit length stays
        list(stream_generate(model, Tok(), prompt, max_tokens=16, lookup_max=32))
