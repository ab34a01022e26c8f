"""Acceptance over the tree: greedy walks on literal trees, and a chi-square test that the
sampling rule emits exactly what plain sampling would (and that Apple's per-beam rule does not).

The exact statement tested: one round emits the drafted tokens along the accepted path and
then one token of its own. Plain sampling from the same per-node target tables, stopped at
the first token that leaves the tree (or after a leaf), has a distribution we can enumerate;
the round's output must follow it exactly.
"""

import math

import mlx_redrafter  # noqa: F401  (first: loads the BLAS before mlx.core)

# isort: split
import mlx.core as mx
import numpy as np
import pytest
from helpers import assert_close

from mlx_redrafter.accept import (
    Acceptance,
    SamplingConfig,
    greedy_accept,
    process_logits,
    sample_accept,
    sample_accept_batch,
    sample_token,
    uniforms_shape,
)
from mlx_redrafter.tree import Tree, pack_beams

BEAMS = np.array([[91, 92, 93, 95], [91, 92, 94, 96], [91, 92, 93, 97]])
ACCEPT_P = 1e-4  # a correct sampler fails a single seeded test this rarely
REJECT_P = 1e-6  # a biased sampler must fall below this


# ---------------------------------------------------------------------------------------------
# Chi-square without scipy


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square(df): the regularised upper incomplete gamma Q(df/2, x/2)."""
    a, z = df / 2.0, x / 2.0
    if z <= 0:
        return 1.0
    log_front = -z + a * math.log(z) - math.lgamma(a)
    if z < a + 1:  # the series for P(a, z) converges fast here
        term = total = 1.0 / a
        n = a
        while abs(term) > abs(total) * 1e-16:
            n += 1
            term *= z / n
            total += term
        return max(0.0, 1.0 - total * math.exp(log_front))
    # Continued fraction for Q(a, z), modified Lentz.
    tiny = 1e-300
    b = z + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 100_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        h *= d * c
        if abs(d * c - 1) < 1e-16:
            break
    return math.exp(log_front) * h


def chi2_pvalue(observed: dict, expected: dict, total: int) -> float:
    """Goodness of fit of observed counts to expected probabilities; bins with an expected
    count below 5 are merged into one (and that into the smallest bin if still below 5)."""
    impossible = [k for k in observed if expected.get(k, 0.0) == 0.0]
    assert not impossible, f"outcomes with probability 0 were emitted: {impossible[:5]}"
    obs, exp = [], []
    sparse_obs = sparse_exp = 0.0
    for key, prob in expected.items():
        e = prob * total
        if e < 5:
            sparse_obs += observed.get(key, 0)
            sparse_exp += e
        else:
            obs.append(observed.get(key, 0))
            exp.append(e)
    if sparse_exp >= 5 or not exp:
        obs.append(sparse_obs)
        exp.append(sparse_exp)
    else:
        i = int(np.argmin(exp))
        obs[i] += sparse_obs
        exp[i] += sparse_exp
    obs, exp = np.array(obs, float), np.array(exp, float)
    if len(obs) < 2:
        return 1.0
    stat = float(np.sum((obs - exp) ** 2 / exp))
    return chi2_sf(stat, len(obs) - 1)


def test_chi2_sf_known_values():
    assert chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-9)
    assert chi2_sf(18.307038053275146, 10) == pytest.approx(0.05, rel=1e-9)
    assert chi2_sf(124.34211340400407, 100) == pytest.approx(0.05, rel=1e-8)
    assert chi2_sf(2.0, 2) == pytest.approx(math.exp(-1.0), rel=1e-12)
    assert chi2_sf(60.0, 2) == pytest.approx(math.exp(-30.0), rel=1e-9)
    assert chi2_sf(0.5, 7) == pytest.approx(0.9994, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# References written independently of the library


def ref_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """float64 reference for process_logits, one row (V,) at a time."""
    x = np.asarray(logits, np.float64)
    if temperature <= 0 or top_k == 1:
        out = np.zeros_like(x)
        out[np.argmax(x)] = 1.0
        return out
    x = x / temperature
    if 0 < top_k < x.size:
        x[np.argsort(-x, kind="stable")[top_k:]] = -np.inf
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]
        probs[order[before >= top_p]] = 0.0
        probs /= probs.sum()
    return probs


def exact_round_distribution(tree: Tree, probs: np.ndarray) -> dict:
    """{emitted token tuple: probability} for plain sampling stopped on leaving the tree."""
    out = {}
    child_of = [
        {int(tree.tokens[v]): int(v) for v in tree.children[u] if v >= 0}
        for u in range(tree.num_nodes)
    ]

    def visit(u: int, prefix: tuple, mass: float) -> None:
        for t in np.flatnonzero(probs[u] > 0):
            m = mass * probs[u, t]
            if int(t) in child_of[u]:
                visit(child_of[u][int(t)], prefix + (int(t),), m)
            else:
                out[prefix + (int(t),)] = m

    visit(0, (), 1.0)
    return out


def count_outcomes(tokens: np.ndarray, num_accepted: np.ndarray) -> dict:
    """Counts of emitted token tuples; tokens (S, L) padded with -1 past num_accepted."""
    rows, counts = np.unique(tokens, axis=0, return_counts=True)
    out = {}
    for row, count in zip(rows, counts, strict=True):
        key = tuple(int(t) for t in row if t >= 0)
        out[key] = out.get(key, 0) + int(count)
    return out


def apple_rule(tree, beams, p, q, rng, samples):
    """Apple's sampling acceptance (approximate), vectorised over samples: per beam accept
    drafted token k iff u < p(x)/q(x) with independent uniforms per (beam, position), keep
    the beam with the longest accepted run, then sample relu(p - q) normalised at the first
    rejection, or p after a full run. p, q: (N, V) per-node target and drafter probabilities.
    Returns emitted tokens (S, L) padded with -1 and the accepted counts (S,)."""
    width, length = beams.shape
    prev = tree.paths[:, :-1]  # (W, L-1) node before each drafted token
    drafted = beams[:, 1:]
    ratio = p[prev, drafted] / q[prev, drafted]  # (W, L-1)
    accepted = rng.random((samples, width, length - 1)) < ratio
    runs = np.cumprod(accepted, axis=-1).sum(axis=-1)  # (S, W)
    best = np.argmax(runs, axis=-1)  # first beam with the longest run
    n = runs[np.arange(samples), best]
    node = tree.paths[best, n]
    dist = np.where((n == length - 1)[:, None], p[node], np.maximum(p[node] - q[node], 0.0))
    empty = dist.sum(axis=-1) <= 0
    dist[empty] = p[node[empty]]
    cdf = np.cumsum(dist / dist.sum(axis=-1, keepdims=True), axis=-1)
    token = np.minimum((cdf < rng.random(samples)[:, None]).sum(axis=-1), p.shape[1] - 1)
    tokens = np.full((samples, length), -1)
    for k in range(1, length):
        ok = n >= k
        tokens[ok, k - 1] = beams[best[ok], k]
    tokens[np.arange(samples), n] = token
    return tokens, n


# ---------------------------------------------------------------------------------------------
# Synthetic trees


def random_case(seed: int, width: int, length: int, vocab: int):
    """Beams over a few tokens per position (so prefixes collide) and per-node target logits
    that favour the drafted children, so that acceptance reaches every depth."""
    rng = np.random.default_rng(seed)
    beams = np.empty((width, length), dtype=np.int64)
    beams[:, 0] = 0
    for k in range(1, length):
        beams[:, k] = rng.choice(rng.permutation(vocab)[:3], size=width)
    tree = pack_beams(beams)
    logits = rng.normal(size=(tree.num_nodes, vocab))
    for u in range(tree.num_nodes):
        kids = tree.children[u][tree.children[u] >= 0]
        logits[u, tree.tokens[kids]] += rng.uniform(1.0, 3.5, size=kids.size)
    return beams, tree, logits.astype(np.float32)


def run_batch(tree, logits, temperature, top_k, top_p, samples, seed):
    uniforms = mx.random.uniform(shape=(samples, *uniforms_shape(tree)), key=mx.random.key(seed))
    return sample_accept_batch(
        tree, mx.array(logits), SamplingConfig(temperature, top_p, top_k), uniforms
    )


def expected_for(tree, logits, temperature, top_k, top_p):
    probs = np.stack([ref_probs(row, temperature, top_k, top_p) for row in logits])
    return exact_round_distribution(tree, probs)


# ---------------------------------------------------------------------------------------------
# Greedy on literal trees


def one_hot_logits(tree: Tree, targets: dict, vocab: int = 100) -> mx.array:
    """Logits (N, vocab) whose argmax at node u is targets[u] (token 0 elsewhere)."""
    logits = np.zeros((tree.num_nodes, vocab), np.float32)
    for u, t in targets.items():
        logits[u, t] = 5.0
    return mx.array(logits)


def test_greedy_full_acceptance_second_child():
    tree = pack_beams(BEAMS)
    result = greedy_accept(tree, one_hot_logits(tree, {0: 92, 1: 94, 4: 96, 5: 50}))
    assert isinstance(result, Acceptance)
    assert result.path.tolist() == [0, 1, 4, 5]  # node 4 is the second child of node 1
    assert result.tokens == [92, 94, 96, 50]
    assert result.num_accepted == 3
    assert len(result.tokens) == BEAMS.shape[1]


def test_greedy_second_child_at_depth_two():
    tree = pack_beams(BEAMS)
    result = greedy_accept(tree, one_hot_logits(tree, {0: 92, 1: 93, 2: 97, 6: 8}))
    assert result.path.tolist() == [0, 1, 2, 6]
    assert result.tokens == [92, 93, 97, 8]


def test_greedy_immediate_rejection():
    tree = pack_beams(BEAMS)
    result = greedy_accept(tree, one_hot_logits(tree, {0: 17, 1: 93}))
    assert result.path.tolist() == [0]
    assert result.tokens == [17]
    assert result.num_accepted == 0


def test_greedy_stops_in_the_middle_of_a_branch():
    tree = pack_beams(BEAMS)
    result = greedy_accept(tree, one_hot_logits(tree, {0: 92, 1: 93, 2: 11, 3: 1}))
    assert result.path.tolist() == [0, 1, 2]
    assert result.tokens == [92, 93, 11]


def test_greedy_matches_plain_greedy_on_random_tables():
    # Plain greedy walks the same per-node tables one token at a time.
    for seed in range(50):
        _, tree, logits = random_case(seed, width=4, length=4, vocab=6)
        result = greedy_accept(tree, mx.array(logits))
        u, emitted = 0, []
        while True:
            t = int(np.argmax(logits[u]))
            emitted.append(t)
            kids = [v for v in tree.children[u] if v >= 0 and tree.tokens[v] == t]
            if not kids:
                break
            u = kids[0]
        assert result.tokens == emitted


def test_bad_logits_shape_raises():
    tree = pack_beams(BEAMS)
    with pytest.raises(ValueError, match="num_nodes=7"):
        greedy_accept(tree, mx.zeros((6, 100)))
    with pytest.raises(ValueError, match="uniforms"):
        sample_accept(tree, mx.zeros((7, 100)), SamplingConfig(1.0), mx.zeros((7, 2)))


# ---------------------------------------------------------------------------------------------
# The warped target distribution


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.6), (0.9, 5, 0.8), (2.0, 12, 0.999), (0.0, 0, 1.0)],
)
def test_process_logits_matches_reference(temperature, top_k, top_p):
    logits = np.random.default_rng(1).normal(size=(2, 5, 12)).astype(np.float32) * 2
    out = process_logits(mx.array(logits), SamplingConfig(temperature, top_p, top_k))
    assert out.dtype == mx.float32 and out.shape == (2, 5, 12)
    probs = np.exp(np.array(out))
    for row_in, row_out in zip(logits.reshape(-1, 12), probs.reshape(-1, 12), strict=True):
        ref = ref_probs(row_in, temperature, top_k, top_p)
        assert np.array_equal(row_out > 0, ref > 0)
        assert_close(row_out, ref, rtol=1e-5)


def test_process_logits_keeps_the_top_token_and_tolerates_minus_inf():
    logits = mx.array([[0.0, -np.inf, 3.0, 2.9], [-np.inf, -np.inf, 1.0, -np.inf]])
    probs = np.exp(np.array(process_logits(logits, SamplingConfig(1.0, 1e-6, 0))))
    assert probs.tolist() == [[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]]
    probs = np.array(process_logits(logits, SamplingConfig(1e-4, 1.0, 2)))
    assert not np.isnan(probs).any()


def test_sample_token_distribution_and_greedy_cases():
    logits = np.random.default_rng(2).normal(size=10).astype(np.float32)
    samples = 20_000
    tiled = mx.broadcast_to(mx.array(logits), (samples, 10))
    tokens = np.array(sample_token(tiled, SamplingConfig(0.8, 0.9, 6), key=mx.random.key(3)))
    expected = dict(enumerate(ref_probs(logits, 0.8, 6, 0.9)))
    observed = dict(zip(*np.unique(tokens, return_counts=True), strict=True))
    assert chi2_pvalue(observed, expected, samples) > ACCEPT_P
    best = int(np.argmax(logits))
    assert int(sample_token(mx.array(logits), SamplingConfig(0.0))) == best
    assert np.all(np.array(sample_token(tiled[:100], SamplingConfig(1.0, top_k=1))) == best)


# ---------------------------------------------------------------------------------------------
# Lossless sampling: chi-square against the exact distribution


@pytest.mark.parametrize(
    "width, length, vocab, temperature, top_k, top_p",
    [
        (3, 3, 8, 1.0, 0, 1.0),
        (4, 4, 12, 0.7, 5, 1.0),
        (2, 3, 16, 1.3, 0, 0.8),
        (5, 3, 10, 1.0, 4, 0.9),
        (1, 4, 8, 1.0, 0, 1.0),
        (6, 2, 8, 0.5, 0, 1.0),
    ],
)
def test_sampling_is_lossless(width, length, vocab, temperature, top_k, top_p):
    _, tree, logits = random_case(width * 100 + length, width, length, vocab)
    samples = 40_000
    batch = run_batch(tree, logits, temperature, top_k, top_p, samples, seed=width + 7 * length)
    observed = count_outcomes(batch.tokens, batch.num_accepted)
    expected = expected_for(tree, logits, temperature, top_k, top_p)
    assert chi2_pvalue(observed, expected, samples) > ACCEPT_P
    # The test has teeth only if deep acceptances happen: every run length with an
    # expected count of 20 or more is seen.
    likely = max(len(k) for k, prob in expected.items() if prob * samples >= 20)
    assert batch.num_accepted.max() + 1 >= likely >= min(length, 3)


def shared_prefix_case():
    """Three beams sharing their first drafted token 1, a drafter sure of it (q = 0.9), and a
    target that gives it 0.3: the case where per-beam coins over-accept."""
    beams = np.array([[0, 1, 2], [0, 1, 3], [0, 1, 4]])
    tree = pack_beams(beams)
    vocab = 8
    rng = np.random.default_rng(5)
    p = rng.dirichlet(np.ones(vocab), size=tree.num_nodes)
    p[0] = (1 - 0.3) * p[0] / (p[0].sum() - p[0, 1])
    p[0, 1] = 0.3
    q = np.full((tree.num_nodes, vocab), 0.1 / (vocab - 1))
    for u in range(tree.num_nodes):
        kids = tree.children[u][tree.children[u] >= 0]
        if kids.size:
            q[u] = 0.1 / (vocab - kids.size)
            q[u, tree.tokens[kids]] = 0.9 / kids.size
    return beams, tree, p, q


def test_apple_rule_fails_the_same_test():
    beams, tree, p, q = shared_prefix_case()
    samples = 20_000
    tokens, n = apple_rule(tree, beams, p, q, np.random.default_rng(0), samples)
    expected = exact_round_distribution(tree, p)
    assert chi2_pvalue(count_outcomes(tokens, n), expected, samples) < REJECT_P
    # ...while ours passes on the same tree and target.
    batch = run_batch(tree, np.log(p).astype(np.float32), 1.0, 0, 1.0, samples, seed=1)
    assert (
        chi2_pvalue(count_outcomes(batch.tokens, batch.num_accepted), expected, samples) > ACCEPT_P
    )


def test_apple_rule_passes_when_drafter_is_one_hot_on_a_single_chain():
    # Sanity check of the reference itself: with W = 1 and q = one-hot on the drafted token,
    # p/q = p(x) and relu(p - q) = p without x, which is the exact rule.
    beams, tree, logits = random_case(11, 1, 3, 8)
    p = np.stack([ref_probs(row, 1.0, 0, 1.0) for row in logits])
    q = np.zeros_like(p)
    q[tree.paths[0, :-1], beams[0, 1:]] = 1.0
    q[tree.paths[0, -1]] = p[tree.paths[0, -1]]
    samples = 20_000
    tokens, n = apple_rule(tree, beams, p, q, np.random.default_rng(1), samples)
    expected = exact_round_distribution(tree, p)
    assert chi2_pvalue(count_outcomes(tokens, n), expected, samples) > ACCEPT_P


def test_drafter_equal_to_target():
    # The beams are the target's own best continuations (q == p): still exact, no NaN.
    rng = np.random.default_rng(9)
    vocab = 8
    table = (
        rng.normal(size=(vocab + 1, vocab)).astype(np.float32) * 2
    )  # next-token logits by last token
    beams = np.zeros((3, 3), np.int64)
    top = np.argsort(-table[0])[:3]
    beams[:, 1] = top
    beams[:, 2] = [np.argmax(table[t + 1]) for t in top]
    tree = pack_beams(beams)
    logits = table[np.where(tree.depths == 0, 0, tree.tokens + 1)]
    samples = 20_000
    batch = run_batch(tree, logits, 1.0, 0, 1.0, samples, seed=4)
    assert not np.any(batch.tokens[np.arange(samples), batch.num_accepted] < 0)
    expected = expected_for(tree, logits, 1.0, 0, 1.0)
    assert (
        chi2_pvalue(count_outcomes(batch.tokens, batch.num_accepted), expected, samples) > ACCEPT_P
    )


# ---------------------------------------------------------------------------------------------
# Numerical edge cases


def test_top_k_1_and_tiny_temperature_act_greedy():
    for seed in range(20):
        _, tree, logits = random_case(seed, width=4, length=4, vocab=10)
        # Distinct logits at least 0.05 apart: at T = 1e-4 the runner-up has e^-500 mass.
        logits = (np.argsort(np.argsort(logits, axis=1), axis=1) * 0.05).astype(np.float32)
        greedy = greedy_accept(tree, mx.array(logits))
        for temperature, top_k in [(1.0, 1), (1e-4, 0), (0.0, 0)]:
            probs = np.array(
                process_logits(mx.array(logits), SamplingConfig(temperature, 1.0, top_k))
            )
            assert not np.isnan(probs).any()
            batch = run_batch(tree, logits, temperature, top_k, 1.0, 64, seed=seed)
            for s in range(len(batch)):
                assert batch[s].tokens == greedy.tokens
                assert batch[s].path.tolist() == greedy.path.tolist()


def test_children_holding_all_mass_with_uniforms_at_one():
    # top_k = 2 leaves only the root's two children in the support. Uniforms of exactly 1
    # reject both (u < r(x) fails even for r(x) = 1), so the residual is empty and the
    # emitted token must come from the fallback to p: one of the two, never NaN or garbage.
    tree = pack_beams(np.array([[0, 3, 4], [0, 5, 6]]))
    logits = np.full((tree.num_nodes, 8), -1.0, np.float32)
    logits[0, [3, 5]] = [2.0, 1.0]
    ones = mx.ones((500, *uniforms_shape(tree)))
    # Make the fallback uniform vary so both tokens can appear.
    fallback = mx.random.uniform(shape=(500, tree.num_nodes), key=mx.random.key(0))
    uniforms = mx.concatenate([ones[..., :-1], fallback[..., None]], axis=-1)
    batch = sample_accept_batch(tree, mx.array(logits), SamplingConfig(1.0, 1.0, 2), uniforms)
    assert np.all(batch.num_accepted == 0)
    assert set(np.unique(batch.tokens[:, 0]).tolist()) == {3, 5}
    # With the largest float32 uniform below 1, the last remaining child is always accepted.
    below_one = mx.full((1, *uniforms_shape(tree)), np.nextafter(np.float32(1), np.float32(0)))
    result = sample_accept_batch(tree, mx.array(logits), SamplingConfig(1.0, 1.0, 2), below_one)[0]
    assert result.path.tolist() == [0, 3]  # node 3 carries token 5
    assert result.tokens[0] == 5


def test_residual_mass_below_float32_range():
    # The children 5, 6, 7 hold all but ~e^-118 of the mass (1e-52: zero as a float32
    # probability). The last child is then accepted with probability exactly 1, and when every
    # child is forced out the residual is still sampled in proportion to exp(offsets), not NaN.
    tree = pack_beams(np.array([[0, 5], [0, 6], [0, 7]]))
    offsets = np.array([0.0, 0.5, 1.0, 1.5, 2.0], np.float32)  # tokens 0..4
    logits = np.zeros((tree.num_nodes, 8), np.float32)
    logits[0, :5] = -120.0 + offsets
    samples = 20_000
    below_one = np.nextafter(np.float32(1), np.float32(0))
    u = np.random.default_rng(3).random((samples, *uniforms_shape(tree))).astype(np.float32)
    u[:, 0, :2] = 0.99  # reject the first two children (r(x) is 1/3, then 1/2)
    u[:, 0, 2] = below_one
    batch = sample_accept_batch(tree, mx.array(logits), SamplingConfig(1.0, 1.0, 0), mx.array(u))
    assert np.all(batch.paths[:, 1] == 3)
    u[:, 0, 2] = 1.0  # now force the last child out too
    batch = sample_accept_batch(tree, mx.array(logits), SamplingConfig(1.0, 1.0, 0), mx.array(u))
    assert np.all(batch.num_accepted == 0)
    weights = np.exp(offsets.astype(np.float64))
    expected = {(i,): w / weights.sum() for i, w in enumerate(weights)}
    observed = count_outcomes(batch.tokens, batch.num_accepted)
    assert chi2_pvalue(observed, expected, samples) > ACCEPT_P


def test_seeded_determinism_and_single_equals_batch():
    _, tree, logits = random_case(3, 4, 4, 10)
    logits = mx.array(logits)
    mx.random.seed(123)
    first = sample_accept(tree, logits, SamplingConfig(0.9, 0.95, 0))
    mx.random.seed(123)
    second = sample_accept(tree, logits, SamplingConfig(0.9, 0.95, 0))
    assert first.path.tolist() == second.path.tolist() and first.tokens == second.tokens

    uniforms = mx.random.uniform(shape=(32, *uniforms_shape(tree)), key=mx.random.key(5))
    batch = sample_accept_batch(tree, logits, SamplingConfig(0.9, 0.95, 0), uniforms)
    again = sample_accept_batch(tree, logits, SamplingConfig(0.9, 0.95, 0), uniforms)
    assert np.array_equal(batch.tokens, again.tokens)
    for s in range(32):
        single = sample_accept(tree, logits, SamplingConfig(0.9, 0.95, 0), uniforms[s])
        assert single.path.tolist() == batch[s].path.tolist()
        assert single.tokens == batch[s].tokens
        assert len(single.tokens) == len(single.path) == single.num_accepted + 1


# ---------------------------------------------------------------------------------------------
# Top-k / top-p from candidates (a partial selection instead of a sort of the vocabulary)


@pytest.mark.parametrize(
    "temperature, top_k, top_p, candidates",
    [(1.0, 5, 1.0, 256), (0.8, 0, 0.9, 256), (1.3, 0, 0.6, 4), (0.9, 6, 0.8, 3), (0.5, 0, 0.95, 3)],
)
def test_candidates_give_process_logits_where_decided(
    monkeypatch, temperature, top_k, top_p, candidates
):
    import mlx_redrafter.accept as accept

    monkeypatch.setattr(accept, "TOP_P_CANDIDATES", candidates)
    logits = np.random.default_rng(4).normal(size=(40, 30)).astype(np.float32) * 2
    logits[0, :4] = 5.0  # a tie at the top
    ids, logprobs, decided = accept.warp_candidates(
        mx.array(logits), SamplingConfig(temperature, top_p, top_k)
    )
    full = np.exp(
        np.array(process_logits(mx.array(logits), SamplingConfig(temperature, top_p, top_k)))
    )
    ids, probs, decided = np.array(ids), np.exp(np.array(logprobs)), np.array(decided)
    for row in np.flatnonzero(decided):
        dense = np.zeros(30)
        dense[ids[row]] = probs[row]
        assert np.array_equal(dense > 0, full[row] > 0)  # the same kept set, exactly
        assert_close(dense, full[row], rtol=1e-5)
    if top_k or candidates >= 30:
        assert decided.all()  # top-k bounds the support: never a fallback
    else:
        assert 0 < decided.sum() < decided.size  # both paths occur: the test has teeth


@pytest.mark.parametrize("candidates", [4, 8])
def test_sampling_is_lossless_with_few_candidates(monkeypatch, candidates):
    # 8 candidates decide every node of this case; with 4, half the nodes need the fallback.
    import mlx_redrafter.accept as accept

    monkeypatch.setattr(accept, "TOP_P_CANDIDATES", candidates)
    _, tree, logits = random_case(23, 3, 3, 10)
    _, _, decided = accept.warp_candidates(mx.array(logits), SamplingConfig(1.0, 0.85))
    samples = 40_000
    batch = run_batch(tree, logits, 1.0, 0, 0.85, samples, seed=5)
    observed = count_outcomes(batch.tokens, batch.num_accepted)
    assert chi2_pvalue(observed, expected_for(tree, logits, 1.0, 0, 0.85), samples) > ACCEPT_P
    assert np.array(decided).all() == (candidates == 8)
    # A single round (no batch) goes through the same path.
    result = sample_accept(tree, mx.array(logits), SamplingConfig(1.0, 0.85, 0))
    assert result.tokens[:-1] == [int(t) for t in tree.tokens[result.path[1:]]]


def test_candidate_rounds_reject_a_wrong_target():
    # Control: the same machinery, asked about a different top-p, fails the chi-square test.
    _, tree, logits = random_case(23, 3, 3, 10)
    samples = 40_000
    batch = run_batch(tree, logits, 1.0, 0, 0.5, samples, seed=5)
    observed = count_outcomes(batch.tokens, batch.num_accepted)
    assert chi2_pvalue(observed, expected_for(tree, logits, 1.0, 0, 0.85), samples) < REJECT_P
