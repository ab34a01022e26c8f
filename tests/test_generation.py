"""The ReDrafter loop end to end: exact greedy output, oracle drafters, stops, lossless sampling."""

from __future__ import annotations

import itertools
import math
import time

import mlx.core as mx
import numpy as np
import pytest
from helpers import (
    FakeTokenizer,
    assert_greedy_equal,
    random_model,
    reference_logits,
    tiny_llama_config,
)

from mlx_redrafter import rounds
from mlx_redrafter.accept import (
    SamplingConfig,
    process_logits,
    sample_accept_batch,
    sample_token,
)
from mlx_redrafter.drafter import init_drafter
from mlx_redrafter.generation import (
    GenerationError,
    draft_beams,
    generate,
    prefill,
    stream_generate,
    verify_tree,
)
from mlx_redrafter.model import Model
from mlx_redrafter.tree import pack_beams


def tiny_model(seed: int, vocab: int = 64, layers: int = 2, hidden: int = 48) -> Model:
    config = tiny_llama_config(
        vocab, hidden, layers, max_position_embeddings=1024, tie_word_embeddings=False
    )
    model = random_model(config, seed)
    # Sharper logits than the default init, so greedy runs have structure (and no ties).
    model.lm_head.weight = model.lm_head.weight * 4.0
    mx.eval(model.parameters())
    return model


def tokens_of(model, prompt, drafter=None, **kw):
    if drafter is None:
        kw.setdefault("lookup", False)  # plain decoding, the reference
    return [
        r.token
        for r in stream_generate(model, FakeTokenizer(kw.pop("eos", ())), prompt, drafter, **kw)
    ]


class OracleDrafter:
    """Proposes the true greedy continuation on beam 0 (other beams: wrong tokens)."""

    def __init__(self, reference: list[int], vocab: int, wrong: bool = False):
        self.ref, self.vocab, self.wrong = reference, vocab, wrong
        self.pos = 0  # index in `ref` of the current g0

    def propose(self, model, context, g0, W, L):
        assert self.ref[self.pos] == g0, "the loop lost its place"
        beams = np.zeros((W, L), np.int32)
        beams[:, 0] = g0
        for d in range(1, L):
            true = self.ref[self.pos + d] if self.pos + d < len(self.ref) else 0
            for w in range(W):
                shift = w + (1 if self.wrong else 0)
                beams[w, d] = (true + shift) % self.vocab
        # A wrong drafter's continuation never matches; the oracle's beam 0 always does.
        self.pos += 1 if self.wrong else L
        return mx.array(beams), mx.zeros((W,))


class NoisyOracle:
    """Beam w is right for a random number of tokens k_w, then wrong: partial acceptance,
    stops in the middle of branches, and winners other than beam 0."""

    def __init__(self, reference: list[int], vocab: int, seed: int):
        self.ref, self.vocab = reference + [0] * 16, vocab
        self.rng = np.random.default_rng(seed)
        self.pos = 0

    def propose(self, model, context, g0, W, L):
        assert self.ref[self.pos] == g0, "the loop lost its place"
        truth = np.array(self.ref[self.pos : self.pos + L])
        beams = np.tile(truth, (W, 1)).astype(np.int32)
        right = self.rng.integers(0, L, size=W)  # correct drafted tokens per beam
        for w in range(W):
            wrong = (truth[right[w] + 1 :] + 1 + self.rng.integers(0, self.vocab - 1)) % self.vocab
            beams[w, right[w] + 1 :] = np.where(
                wrong == truth[right[w] + 1 :], (wrong + 1) % self.vocab, wrong
            )
        self.pos += int(right.max()) + 1  # greedy acceptance takes the longest right prefix
        return mx.array(beams), mx.zeros((W,))


# --------------------------------------------------------------------------------------------
# Greedy exactness


CASES = [
    (seed, W, L)
    for seed, (W, L) in zip(
        range(27), list(itertools.product([1, 2, 4], [2, 3, 5])) * 3, strict=False
    )
]


@pytest.mark.parametrize("seed,W,L", CASES)
def test_greedy_redrafter_equals_plain(seed, W, L):
    model = tiny_model(seed % 5)
    drafter = init_drafter(
        model, seed=seed, draft_vocab_ids=list(range(0, 64, 2)) if seed % 3 == 0 else None
    )
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, 64, size=int(rng.integers(1, 12))).tolist()
    max_tokens = int(rng.integers(5, 40))
    plain = tokens_of(model, prompt, max_tokens=max_tokens)
    logits = reference_logits(model, prompt, plain)  # a verify pass may flip only near-ties
    for lookup in (False, True):
        spec = tokens_of(
            model,
            prompt,
            drafter,
            max_tokens=max_tokens,
            beam_width=W,
            beam_length=L,
            lookup=lookup,
        )
        assert_greedy_equal(spec, plain, logits)
    assert len(spec) == max_tokens
    noisy = NoisyOracle(plain, 64, seed)
    responses = list(
        stream_generate(
            model,
            FakeTokenizer(),
            prompt,
            noisy,
            max_tokens=max_tokens,
            beam_width=W,
            beam_length=L,
            lookup=False,  # the oracle counts on seeing every round
        )
    )
    assert_greedy_equal([r.token for r in responses], plain, logits)


@pytest.mark.parametrize("W,L", [(1, 2), (2, 4), (3, 5)])
def test_oracle_drafter_accepts_everything(W, L):
    model = tiny_model(7)
    prompt = [3, 14, 15, 9, 26]
    n_rounds = 6
    max_tokens = 1 + n_rounds * L  # the first token comes from prefill
    plain = tokens_of(model, prompt, max_tokens=max_tokens + L)
    oracle = OracleDrafter(plain, 64)
    responses = list(
        stream_generate(
            model,
            FakeTokenizer(),
            prompt,
            oracle,
            max_tokens=max_tokens,
            beam_width=W,
            beam_length=L,
            lookup=False,
        )
    )
    assert [r.token for r in responses] == plain[:max_tokens]
    stats = responses[-1].stats
    assert stats.tokens_per_step == L
    assert stats.accepted == [L - 1] * n_rounds
    assert stats.accept_by_depth == [1.0] * (L - 1)


@pytest.mark.parametrize("W,L", [(1, 3), (4, 5)])
def test_always_wrong_drafter_gives_one_token_per_step(W, L):
    model = tiny_model(8)
    prompt = [1, 2, 3]
    plain = tokens_of(model, prompt, max_tokens=30)
    wrong = OracleDrafter(plain + [0] * 10, 64, wrong=True)
    responses = list(
        stream_generate(
            model,
            FakeTokenizer(),
            prompt,
            wrong,
            max_tokens=30,
            beam_width=W,
            beam_length=L,
            lookup=False,
        )
    )
    assert [r.token for r in responses] == plain
    assert responses[-1].stats.tokens_per_step == 1.0
    assert responses[-1].stats.accept_by_depth == [0.0] * (L - 1)


def test_eos_inside_an_accepted_run_stops_there():
    model = tiny_model(9)
    prompt = [5, 6, 7]
    L = 5
    plain = tokens_of(model, prompt, max_tokens=40)
    # An EOS that falls in the middle of the first drafted run: rounds emit [t0], [t1..t5], ...
    k = next(i for i in range(2, 5) if plain[i] not in plain[:i])
    eos = plain[k]
    oracle = OracleDrafter(plain, 64)
    spec = list(
        stream_generate(
            model,
            FakeTokenizer([eos]),
            prompt,
            oracle,
            max_tokens=40,
            beam_width=2,
            beam_length=L,
            lookup=False,
        )
    )
    assert [r.token for r in spec] == plain[: k + 1]
    assert spec[-1].finish_reason == "stop"
    assert tokens_of(model, prompt, max_tokens=40, eos=[eos]) == plain[: k + 1]


def test_max_tokens_inside_an_accepted_run():
    model = tiny_model(10)
    prompt = [9, 8]
    plain = tokens_of(model, prompt, max_tokens=20)
    oracle = OracleDrafter(plain, 64)
    spec = list(
        stream_generate(
            model,
            FakeTokenizer(),
            prompt,
            oracle,
            max_tokens=3,
            beam_width=1,
            beam_length=5,
            lookup=False,
        )
    )
    assert [r.token for r in spec] == plain[:3]
    assert spec[-1].finish_reason == "length"


def test_stop_string_is_cut_and_never_streamed():
    model = tiny_model(11)
    prompt = [4, 4, 4]
    plain = tokens_of(model, prompt, max_tokens=12)
    stop = f"<{plain[3]}><{plain[4]}>"
    drafter = init_drafter(model, seed=1)
    responses = list(
        stream_generate(model, FakeTokenizer(), prompt, drafter, max_tokens=12, stop=[stop])
    )
    text = "".join(r.text for r in responses)
    full = "".join(f"<{t}>" for t in plain)
    assert stop not in text
    assert text == full[: full.find(stop)]
    assert responses[-1].finish_reason == "stop"


def test_cache_reuse_prefills_only_the_new_part():
    model = tiny_model(12)
    drafter = init_drafter(model, seed=2)
    tok = FakeTokenizer()
    cache = model.make_cache()
    first = [
        r.token for r in stream_generate(model, tok, [1, 2, 3], drafter, max_tokens=6, cache=cache)
    ]
    turn2 = [1, 2, 3] + first + [7, 7]
    responses = list(stream_generate(model, tok, turn2, drafter, max_tokens=6, cache=cache))
    assert responses[-1].stats.prompt_tokens == 3  # last answer token + the two new ones
    fresh = tokens_of(model, turn2, max_tokens=6)
    assert [r.token for r in responses] == fresh


def test_bad_requests_are_clear_errors():
    model = tiny_model(13)
    tok = FakeTokenizer()
    with pytest.raises(GenerationError, match="empty"):
        generate(model, tok, "   ")
    with pytest.raises(GenerationError, match="context length"):
        generate(model, tok, [1] * 1000, max_tokens=100)
    with pytest.raises(GenerationError, match="max_tokens"):
        generate(model, tok, [1], max_tokens=0)
    with pytest.raises(GenerationError, match="top_p"):
        generate(model, tok, [1], temperature=1.0, top_p=0.0)


def test_profile_splits_round_time():
    model = tiny_model(14)
    drafter = init_drafter(model, seed=3)
    responses = list(
        stream_generate(model, FakeTokenizer(), [1, 2], drafter, max_tokens=20, profile=True)
    )
    stats = responses[-1].stats
    assert stats.draft_time > 0 and stats.verify_time > 0 and stats.accept_time > 0
    assert stats.steps == len(stats.accepted) >= 1


# --------------------------------------------------------------------------------------------
# Lossless sampling, end to end: the first three generated tokens under ReDrafter have the
# distribution of plain sampling (exact, by enumeration), by a chi-square test.


def chi2_sf(x: float, dof: int) -> float:
    """Upper tail of the chi-square distribution (regularised incomplete gamma, by series)."""
    a, z = dof / 2.0, x / 2.0
    if z <= 0:
        return 1.0
    if z < a + 1:  # series for P(a, z)
        term = total = 1.0 / a
        n = a
        while term > total * 1e-15:
            n += 1
            term *= z / n
            total += term
        return 1.0 - math.exp(-z + a * math.log(z) - math.lgamma(a)) * total
    # continued fraction for Q(a, z)
    b, c, d = z + 1 - a, 1e300, 1.0 / (z + 1 - a)
    h = d
    for i in range(1, 10000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1e-300 if abs(d) < 1e-300 else d
        c = b + an / c
        c = 1e-300 if abs(c) < 1e-300 else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return math.exp(-z + a * math.log(z) - math.lgamma(a)) * h


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    n = counts.sum()
    expected = probs * n
    assert np.all(counts[probs == 0] == 0), "an impossible sequence was generated"
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return chi2_sf(stat, int(keep.sum()) - 1)


def exact_first_three(model, prompt, temperature, top_k, top_p, V):
    """p(t1, t2, t3) for plain sampling, enumerated: (V, V, V)."""

    def dist(prefixes):
        _, logits = model(mx.array(prefixes, dtype=mx.int32))
        return np.exp(
            np.array(process_logits(logits[:, -1], SamplingConfig(temperature, top_p, top_k)))
        )

    p1 = dist([prompt])[0]
    p2 = dist([prompt + [a] for a in range(V)])  # (V, V)
    p3 = dist([prompt + [a, b] for a in range(V) for b in range(V)]).reshape(V, V, V)
    return p1[:, None, None] * p2[:, :, None] * p3


def redrafter_first_three(
    model, drafter, prompt, W, L, temperature, top_k, top_p, S, V, make_tree=None
):
    """S draws of the first three tokens, through the engine's own draft/verify/accept steps.

    Only the uniforms differ between draws, so draws that reach the same state share one
    drafted tree and one verify pass, and the acceptance runs batched over them.
    """
    counts = np.zeros((V, V, V), np.int64)
    first = np.array(
        sample_token(
            mx.broadcast_to(model(mx.array([prompt]))[1][0, -1], (S, V)),
            SamplingConfig(temperature, top_p, top_k),
        )
    )

    def expand(committed, g0, n):
        """Continue n draws whose committed tokens (after the prompt) and g0 are given."""
        emitted_so_far = committed + [g0]
        if len(emitted_so_far) >= 3:
            counts[tuple(emitted_so_far[:3])] += n
            return
        cache = model.make_cache()
        context = prefill(model, cache, prompt + committed)
        if make_tree is None:
            tree = pack_beams(draft_beams(model, drafter, context, g0, W, L)[0])
        else:
            tree = make_tree(model, drafter, context, g0, W, L, prompt + committed)
        _, logits = verify_tree(model, cache, tree)
        u = mx.random.uniform(shape=(n, tree.num_nodes, tree.children.shape[1] + 1))
        batch = sample_accept_batch(tree, logits, SamplingConfig(temperature, top_p, top_k), u)
        outcomes = {}
        for s in range(n):
            k = int(batch.num_accepted[s])
            toks = tuple(int(t) for t in batch.tokens[s, : k + 1])
            outcomes[toks] = outcomes.get(toks, 0) + 1
        for toks, m in outcomes.items():
            seq = emitted_so_far + list(toks)
            if len(seq) >= 3:
                counts[tuple(seq[:3])] += m
            else:
                expand(seq[:-1], seq[-1], m)

    for g0 in range(V):
        n = int((first == g0).sum())
        if n:
            expand([], g0, n)
    return counts


SAMPLING_CASES = [
    # W, L, temperature, top_k, top_p
    (1, 3, 1.0, 0, 1.0),
    (2, 3, 0.7, 0, 1.0),
    (4, 2, 1.3, 6, 1.0),
    (2, 4, 1.0, 0, 0.9),
    (3, 3, 0.8, 8, 0.95),
]


def sampled_and_exact(prompt, seed, W, L, sampling, exact_sampling=None, make_tree=None):
    """(counts, exact) for the first three tokens on a small model (V = 12): counts over 20000
    draws through the engine with `sampling` = (temperature, top_k, top_p), made after
    mx.random.seed(seed); exact, their probabilities (flattened) under `exact_sampling`
    (default: the same)."""
    V = 12
    model = tiny_model(21, vocab=V, hidden=32)
    # A drafter that is right often enough that deep acceptances happen.
    drafter = init_drafter(model, seed=5)
    mx.random.seed(seed)
    exact = exact_first_three(model, prompt, *(exact_sampling or sampling), V).reshape(-1)
    counts = redrafter_first_three(
        model, drafter, prompt, W, L, *sampling, 20000, V, make_tree=make_tree
    )
    return counts, exact


@pytest.mark.parametrize("W,L,temperature,top_k,top_p", SAMPLING_CASES)
def test_sampling_is_lossless_end_to_end(W, L, temperature, top_k, top_p):
    counts, exact = sampled_and_exact([1, 5, 3], 1234, W, L, (temperature, top_k, top_p))
    assert counts.sum() == 20000
    assert chi2_pvalue(counts.reshape(-1), exact) > 1e-4


def test_the_chi_square_check_can_fail():
    """The same statistic rejects a distribution that is off (temperature 1.0 vs 0.8)."""
    counts, exact = sampled_and_exact([1, 5, 3], 99, 2, 3, (1.0, 0, 1.0), (0.8, 0, 1.0))
    assert chi2_pvalue(counts.reshape(-1), exact) < 1e-6


def test_sampling_through_stream_generate_is_seeded_and_valid():
    model = tiny_model(22)
    drafter = init_drafter(model, seed=6)
    a = tokens_of(model, [3, 1], drafter, max_tokens=15, temperature=0.9, top_p=0.9, seed=7)
    b = tokens_of(model, [3, 1], drafter, max_tokens=15, temperature=0.9, top_p=0.9, seed=7)
    assert a == b and len(a) == 15


# --------------------------------------------------------------------------------------------
# Context lookup and mixed trees (drafter beams + copied continuations)


@pytest.mark.parametrize("seed", range(8))
def test_greedy_with_lookup_equals_plain_on_repeating_prompts(seed):
    model = tiny_model(30 + seed % 4)
    rng = np.random.default_rng(seed)
    piece = rng.integers(0, 64, size=int(rng.integers(3, 9))).tolist()
    prompt = piece * int(rng.integers(2, 4)) + rng.integers(0, 64, size=2).tolist()
    plain = tokens_of(model, prompt, max_tokens=40)
    drafter = init_drafter(model, seed=seed) if seed % 2 else None
    responses = list(
        stream_generate(
            model,
            FakeTokenizer(),
            prompt,
            drafter,
            max_tokens=40,
            lookup=True,
            lookup_max=int(rng.integers(1, 12)),
        )
    )
    assert [r.token for r in responses] == plain
    stats = responses[-1].stats
    assert sum(stats.accepted) == sum(stats.accepted_from.values())


class OracleIndex:
    """Stands in for SuffixIndex (lookup v2): proposes the true continuation (and a wrong one)."""

    def __init__(self, reference: list[int], prompt_len: int):
        self.ref, self.prompt_len, self.tokens = reference, prompt_len, []

    def __call__(self, min_match, max_match):
        return self

    def extend(self, tokens):
        self.tokens += list(tokens)

    def propose(self, max_tokens, max_candidates=2):
        from mlx_redrafter.suffix_index import SuffixCandidate

        pos = len(self.tokens) - self.prompt_len  # index in ref of the next token
        true = tuple(self.ref[pos : pos + max_tokens])
        wrong = tuple((t + 1) % 64 for t in true)
        return [SuffixCandidate(c, (1.0,) * len(c), 4, 1) for c in (true, wrong) if c]


def test_oracle_lookup_runs_are_accepted_whole(monkeypatch):
    import mlx_redrafter.rounds as rounds

    model = tiny_model(40)
    prompt = [2, 7, 1, 8]
    plain = tokens_of(model, prompt, max_tokens=60)
    monkeypatch.setattr(rounds, "SuffixIndex", OracleIndex(plain, len(prompt)))
    responses = list(
        stream_generate(model, FakeTokenizer(), prompt, None, max_tokens=41, lookup_max=7)
    )
    assert [r.token for r in responses] == plain[:41]
    stats = responses[-1].stats
    # Each round keeps the true chain once its estimate is learnt; every kept copy is accepted.
    assert stats.accepted_from.get("lookup", 0) >= 20
    assert max(stats.accepted) == 7


def test_eos_inside_an_accepted_lookup_run_stops_there(monkeypatch):
    import mlx_redrafter.rounds as rounds

    prompt = [3, 3, 9]
    for seed in range(41, 60):  # a model whose answer has a fresh token early on
        model = tiny_model(seed)
        plain = tokens_of(model, prompt, max_tokens=40)
        fresh = [i for i in (2, 3) if plain[i] not in plain[:i]]
        if fresh:
            break
    k = fresh[0]  # inside the first copied run, which starts after plain[0]
    eos = plain[k]
    monkeypatch.setattr(rounds, "SuffixIndex", OracleIndex(plain, len(prompt)))
    spec = list(
        stream_generate(model, FakeTokenizer([eos]), prompt, None, max_tokens=40, lookup_max=8)
    )
    assert [r.token for r in spec] == plain[: k + 1]
    assert spec[-1].finish_reason == "stop"
    assert spec[-1].stats.accepted_from.get("lookup", 0) >= 1  # the stop came inside a copy


def mixed_tree(model, drafter, context, g0, W, L, history):
    """The drafter's beams and the context-lookup continuations of `history` + g0, merged."""
    from mlx_redrafter.generation import draft_beams
    from mlx_redrafter.lookup import ContextIndex
    from mlx_redrafter.tree import pack_sequences

    beams, _ = draft_beams(model, drafter, context, g0, W, L)
    index = ContextIndex(1, 4)
    index.extend(history + [g0])
    copies = [(g0, *c.tokens) for c in index.propose(4, 2)]
    return pack_sequences([tuple(int(t) for t in b) for b in beams] + copies)


@pytest.mark.parametrize("W,L,temperature,top_k,top_p", [(1, 3, 1.0, 0, 1.0), (2, 2, 0.8, 0, 0.9)])
def test_sampling_is_lossless_with_mixed_trees(W, L, temperature, top_k, top_p):
    prompt = [1, 5, 3, 1, 5, 3, 1]  # lookup always has something to copy
    sampling = (temperature, top_k, top_p)
    counts, exact = sampled_and_exact(prompt, 4321, W, L, sampling, make_tree=mixed_tree)
    assert counts.sum() == 20000
    assert chi2_pvalue(counts.reshape(-1), exact) > 1e-4


def test_the_chi_square_check_can_fail_with_mixed_trees():
    prompt = [1, 5, 3, 1, 5, 3, 1]
    counts, exact = sampled_and_exact(
        prompt, 77, 2, 3, (1.0, 0, 1.0), (0.8, 0, 1.0), make_tree=mixed_tree
    )
    assert chi2_pvalue(counts.reshape(-1), exact) < 1e-6


def mixed_tree_v2(model, drafter, context, g0, W, L, history):
    """As `mixed_tree`, with lookup v2: branches from the context's suffix index and copies
    from a memory of an earlier request, all merged with the drafter's beams."""
    from mlx_redrafter.generation import draft_beams
    from mlx_redrafter.suffix_index import SuffixIndex
    from mlx_redrafter.tree import pack_sequences

    beams, _ = draft_beams(model, drafter, context, g0, W, L)
    index = SuffixIndex(1, 4)
    index.extend(history + [g0])
    memory = SuffixIndex(1, 4)
    memory.add_document([3, 1, 5, 3, 2, 7, 1, 5, 3, 9, 4])
    found = index.propose(4, 3) + memory.propose(4, 2, query=index.tail(8))
    copies = [(g0, *c.tokens) for c in found]
    return pack_sequences([tuple(int(t) for t in b) for b in beams] + copies)


def test_sampling_is_lossless_with_lookup_v2_and_memory_trees():
    prompt = [1, 5, 3, 1, 5, 3, 1]
    counts, exact = sampled_and_exact(prompt, 2468, 1, 3, (1.0, 0, 1.0), make_tree=mixed_tree_v2)
    assert counts.sum() == 20000
    assert chi2_pvalue(counts.reshape(-1), exact) > 1e-4


def test_the_cache_owns_its_tokens():
    model = tiny_model(3)
    cache = model.make_cache()
    assert cache.tokens == [] and cache.common_prefix([1, 2]) == 0
    prompt = [2, 7, 1, 8, 2, 8]
    out = [
        r.token
        for r in stream_generate(
            model, FakeTokenizer(), prompt, max_tokens=5, cache=cache, lookup=False
        )
    ]
    # It holds the prompt and every emitted token but the last (fed next time), in order.
    assert cache.tokens == prompt + out[:-1] and cache.offset == len(cache.tokens)
    assert cache.common_prefix(prompt + [out[0], -1]) == len(prompt) + 1
    assert cache.common_prefix([9] + prompt) == 0
    cache.hold(prompt[:3])
    assert cache.tokens == prompt[:3] and cache.offset == 3
    cache.reset()
    assert cache.tokens == [] and cache.offset == 0


def test_a_seeded_sampled_run_repeats_itself_whatever_the_timings(monkeypatch):
    """The tree policy learns the drafter's cost from round timings; with a seed it does not,
    so the trees, and so the draws, are the same on a slower machine (or a busier moment)."""
    model = tiny_model(seed=5)
    drafter = init_drafter(model, seed=2)
    prompt = [3, 4, 5, 3, 4, 5, 6, 3, 4, 5, 7, 3, 4]

    def run():
        kw = dict(max_tokens=40, temperature=1.0, seed=7, beam_width=1, beam_length=3)
        return [r.token for r in stream_generate(model, FakeTokenizer(), prompt, drafter, **kw)]

    first = run()
    draft = rounds.draft_beams

    def slow_draft_beams(*args, **kwargs):
        time.sleep(0.03)  # the drafter now costs several plain steps
        return draft(*args, **kwargs)

    monkeypatch.setattr(rounds, "draft_beams", slow_draft_beams)
    assert run() == first
