"""Recursive Speculative Decoding: sampled drafts and recursive rejection sampling are exact.

The statement tested: one round emits tokens that are a prefix of a plain sample from the
target. Continuing every round's output with plain sampling up to D tokens must then give
exactly the plain-sampling distribution of D-token sequences, which we enumerate. Each
round drafts a fresh random tree (Gumbel-Top-k or Stochastic Beam Search over a table
drafter), so the test covers the drafting as well as the acceptance. Every test has a
control: the same machinery with one thing broken must fail the same chi-square test.
"""

import itertools

import mlx_redrafter  # noqa: F401  (first: loads the BLAS before mlx.core)

# isort: split
import mlx.core as mx
import numpy as np
import pytest
from test_accept import ACCEPT_P, REJECT_P, chi2_pvalue, ref_probs
from test_generation import tiny_model, tokens_of

import mlx_redrafter.rsd as rsd
from mlx_redrafter.accept import SamplingConfig, process_logits, sample_accept
from mlx_redrafter.drafter import init_drafter
from mlx_redrafter.errors import GenerationError
from mlx_redrafter.rsd import (
    accept_batch,
    accepted_keys,
    build_round,
    draft_logq_rows,
    node_key,
    point_mass_proposals,
    proposals_batch,
    rsd_accept,
    split_choice,
)
from mlx_redrafter.rsd_draft import SampledDraft, gumbel_topk_tree, stochastic_beam_tree
from mlx_redrafter.sizing import (
    TreePolicy,
    default_cost_curve,
    lookup_candidate,
    sampled_candidates,
)
from mlx_redrafter.tree import pack_sequences

ROOT = 0


class World:
    """Target and drafter logits as tables over every prefix of up to `depth` tokens after
    the root; the drafter is the target plus noise, so that drafts are often accepted."""

    def __init__(self, vocab: int, depth: int, seed: int, noise: float = 0.7, sharp: float = 1.5):
        rng = np.random.default_rng(seed)
        self.vocab, self.depth = vocab, depth
        self.code = {(): 0}
        for n in range(1, depth + 2):  # the root, then `depth` tokens
            for tail in itertools.product(range(vocab), repeat=n - 1):
                self.code[(ROOT, *tail)] = len(self.code)
        size = len(self.code)
        self.p = (rng.normal(size=(size, vocab)) * sharp).astype(np.float32)
        self.q = (self.p + rng.normal(size=(size, vocab)) * noise).astype(np.float32)
        self.child = np.zeros((size, vocab), np.int32)  # code of prefix + token
        for prefix, c in self.code.items():
            for t in range(vocab):
                key = (ROOT,) if not prefix else (*prefix, t)
                self.child[c, t] = self.code.get(key, 0)

    def step(self):
        world = self

        class Step:
            vocab_ids = None

            def start(self, batch):
                return mx.zeros((batch, 1), mx.int32)

            def __call__(self, state, tokens):
                state = mx.array(world.child)[state, tokens]  # (B, n)
                return state, mx.array(world.q)[state]

        return Step()

    def exact(self, sampling: SamplingConfig, length: int) -> dict:
        """{sequence of `length` tokens after the root: plain-sampling probability}."""
        out = {}
        for seq in itertools.product(range(self.vocab), repeat=length):
            prob, prefix = 1.0, (ROOT,)
            for t in seq:
                prob *= ref_probs(self.p[self.code[prefix]], *_ref_args(sampling))[t]
                prefix = (*prefix, t)
            if prob > 0:
                out[seq] = prob
        return out

    def extend(self, tokens, num, sampling: SamplingConfig, length: int, rng) -> np.ndarray:
        """Continue each row's first num+1 tokens to `length` by plain sampling (numpy)."""
        out = np.full((tokens.shape[0], length), -1, np.int64)
        probs = np.stack([ref_probs(row, *_ref_args(sampling)) for row in self.p])
        codes = np.full(tokens.shape[0], self.code[(ROOT,)])
        for k in range(length):
            have = k <= num
            nxt = np.where(have, tokens[:, min(k, tokens.shape[1] - 1)], -1)
            cdf = np.cumsum(probs[codes], axis=1)
            drawn = np.minimum((cdf < rng.random(codes.size)[:, None]).sum(axis=1), self.vocab - 1)
            out[:, k] = np.where(have, nxt, drawn)
            codes = self.child[codes, out[:, k]]
        return out


def _ref_args(s: SamplingConfig):
    return s.temperature, s.top_k, s.top_p


def counts(rows: np.ndarray) -> dict:
    keys, n = np.unique(rows, axis=0, return_counts=True)
    return {tuple(int(t) for t in k): int(c) for k, c in zip(keys, n, strict=True)}


def run_rounds(world, draft, sampling, lookups=(), seed=0, flip=None, wrong_q=None):
    """One RSD round per drafted tree: build, target per node, accept. Returns (tokens,
    num_accepted). `lookups`: deterministic sequences added to every tree (point masses);
    flip(b, slots): a control's change to the slots; wrong_q: a control's drafter logits."""
    batch = draft.tokens.shape[0]
    trees, props = [], []
    for b in range(batch):
        kept = [j for j in range(1, draft.tokens.shape[1]) if draft.valid[b, j]]
        tree, prop = build_round(list(lookups), draft, kept, tree_index=b)
        trees.append(tree)
        props.append(prop)
    n = max(t.num_nodes for t in trees)
    slots = proposals_batch(props, n)
    if flip is not None:
        flip(slots)
    node_tokens = np.zeros((batch, n), np.int32)
    depths = np.zeros((batch, n), np.int32)
    codes = np.zeros((batch, n), np.int32)
    q_rows = np.full((batch, n), -1, np.int32)
    for b, (tree, prop) in enumerate(zip(trees, props, strict=True)):
        m = tree.num_nodes
        node_tokens[b, :m], depths[b, :m], q_rows[b, :m] = tree.tokens, tree.depths, prop.q_rows
        for u in range(m):
            codes[b, u] = world.code[_prefix(tree, u)]
    logp = process_logits(mx.array(world.p)[mx.array(codes)], sampling)
    if wrong_q is None:
        logq = draft_logq_rows(draft.logq, None, q_rows, world.vocab)
    else:  # the drafter's table warped differently from how the draft was drawn
        dcodes = np.where(q_rows >= 0, codes, 0)
        logq = process_logits(mx.array(world.q)[mx.array(dcodes)], wrong_q)
        logq = mx.where(mx.array(q_rows >= 0)[..., None], logq, -mx.inf)
    u = mx.random.uniform(shape=(batch, n, slots.nodes.shape[2] + 1), key=mx.random.key(seed))
    result = accept_batch(node_tokens, depths, slots, logp, logq, u)
    return result.tokens, result.num_accepted


def _prefix(tree, u):
    out = []
    while u >= 0:
        out.append(int(tree.tokens[u]))
        u = int(tree.parents[u])
    return tuple(reversed(out))


def check(world, draft, sampling, length, seed=0, **kw):
    tokens, num = run_rounds(world, draft, sampling, seed=seed, **kw)
    rng = np.random.default_rng(seed + 1)
    rows = world.extend(tokens, num, sampling, length, rng)
    return chi2_pvalue(counts(rows), world.exact(sampling, length), rows.shape[0]), num


SAMPLES = 12_000


# ---------------------------------------------------------------------------------------------
# Sampled siblings: Gumbel-Top-k and Stochastic Beam Search


@pytest.mark.parametrize(
    "method, shape, sampling",
    [
        ("topk", (3,), SamplingConfig(1.0)),
        ("topk", (3, 2), SamplingConfig(0.8)),
        ("topk", (2, 2, 1), SamplingConfig(1.0, 0.9, 0)),  # deep, top-p on p and q
        ("sbs", (3, 3), SamplingConfig(1.0)),
        ("sbs", (4, 4), SamplingConfig(1.2, 1.0, 4)),  # deep, top-k on p and q
    ],
)
def test_sampled_siblings_are_exact(method, shape, sampling):
    world = World(vocab=5, depth=3, seed=sum(shape))
    key = mx.random.key(len(shape) * 10 + shape[0])
    step = world.step()
    if method == "topk":
        draft = gumbel_topk_tree(step, ROOT, shape, sampling, SAMPLES, key)
    else:
        draft = stochastic_beam_tree(step, ROOT, *shape, sampling, SAMPLES, key)
    length = min(3, draft.depths.max() + 1)
    p, num = check(world, draft, sampling, length, seed=3)
    assert p > ACCEPT_P
    # Teeth: drafted tokens are accepted, at every depth the tree has.
    assert np.mean(num >= 1) > 0.5 and num.max() == draft.depths.max()


def test_forgetting_earlier_siblings_fails(monkeypatch):
    # Control: each sibling's proposal taken as the whole q instead of q minus earlier draws.
    world = World(vocab=5, depth=3, seed=5)
    sampling = SamplingConfig(1.0)
    draft = gumbel_topk_tree(world.step(), ROOT, (3,), sampling, SAMPLES, mx.random.key(1))
    assert check(world, draft, sampling, 2, seed=3)[0] > ACCEPT_P
    monkeypatch.setattr(rsd, "_remove_draw", lambda q_left, hot, draw, valid: q_left)
    assert check(world, draft, sampling, 2, seed=3)[0] < REJECT_P


def test_q_warped_unlike_the_draft_fails():
    # Control: drafts drawn from the top-k-warped q, acceptance told the unwarped q.
    world = World(vocab=5, depth=3, seed=6)
    sampling = SamplingConfig(1.0, 1.0, 2)
    draft = gumbel_topk_tree(world.step(), ROOT, (2, 1), sampling, SAMPLES, mx.random.key(2))
    assert check(world, draft, sampling, 2, seed=4)[0] > ACCEPT_P
    assert check(world, draft, sampling, 2, seed=4, wrong_q=SamplingConfig(1.0))[0] < REJECT_P


# ---------------------------------------------------------------------------------------------
# Deterministic and sampled siblings in one tree, duplicates between sources


def test_mixed_point_masses_and_samples_with_duplicates():
    # A lookup copy (point masses along 0 -> 1 -> 2) and a deterministic beam (0 -> 3 -> 3)
    # beside Stochastic Beam Search samples: the samples often draw 1 or 3 too (duplicates).
    world = World(vocab=4, depth=3, seed=8)
    sampling = SamplingConfig(0.9)
    lookups = [(ROOT, 1, 2), (ROOT, 3, 3)]
    draft = stochastic_beam_tree(world.step(), ROOT, 2, 3, sampling, SAMPLES, mx.random.key(3))
    tokens = draft.tokens[:, 1:3]
    assert np.mean(np.any(tokens == 1, axis=1)) > 0.2  # duplicates do occur
    p, _ = check(world, draft, sampling, 3, seed=5, lookups=lookups)
    assert p > ACCEPT_P


def test_point_mass_treated_as_a_sample_fails():
    # Control: the copied tokens' slots marked as draws from q.
    world = World(vocab=4, depth=3, seed=8)
    sampling = SamplingConfig(0.9)
    lookups = [(ROOT, 1, 2), (ROOT, 3, 3)]
    draft = stochastic_beam_tree(world.step(), ROOT, 2, 3, sampling, SAMPLES, mx.random.key(3))

    def flip(slots):
        slots.sampled[slots.nodes >= 0] = True

    assert check(world, draft, sampling, 3, seed=5, lookups=lookups, flip=flip)[0] < REJECT_P


def test_copy_counted_as_a_draw_fails(monkeypatch):
    # Control for duplicates: a point mass wrongly removed from q as if the drafter drew it.
    world = World(vocab=4, depth=3, seed=9)
    sampling = SamplingConfig(1.0)
    lookups = [(ROOT, 1), (ROOT, 2)]
    draft = gumbel_topk_tree(world.step(), ROOT, (2,), sampling, SAMPLES, mx.random.key(4))

    def point_first(slots):  # copies tried first, then the samples
        order = np.argsort(slots.sampled, axis=-1, kind="stable")
        slots.nodes[:] = np.take_along_axis(slots.nodes, order, -1)
        slots.sampled[:] = np.take_along_axis(slots.sampled, order, -1)

    assert check(world, draft, sampling, 2, seed=6, lookups=lookups, flip=point_first)[0] > (
        ACCEPT_P
    )

    def remove_any(q_left, hot, draw, valid):
        return mx.where(valid[..., None] & hot, 0.0, q_left)

    monkeypatch.setattr(rsd, "_remove_draw", remove_any)
    p, _ = check(world, draft, sampling, 2, seed=6, lookups=lookups, flip=point_first)
    assert p < REJECT_P


# ---------------------------------------------------------------------------------------------
# The point-mass case is accept.py's rule; literal trees


def test_point_masses_match_the_deterministic_rule():
    tree = pack_sequences([(0, 1, 2), (0, 1, 3), (0, 4)])
    logits = mx.array(np.random.default_rng(0).normal(size=(tree.num_nodes, 6)), mx.float32)
    sampling = SamplingConfig(1.0)
    props = point_mass_proposals(tree)
    for seed in range(20):
        u = mx.random.uniform(shape=(tree.num_nodes, 3), key=mx.random.key(seed))
        a = rsd_accept(tree, props, logits, sampling, None, u)
        b = sample_accept(tree, logits, sampling, u)
        assert a.tokens == b.tokens and a.path.tolist() == b.path.tolist()


def test_worked_example_accept_probabilities():
    # docs/tree-attention.md: r = (0.5, 0.3, 0.2), q = (0.3, 0.6, 0.1); the drafter drew
    # x1 = 1, then a copy proposes token 0. Slot 1: min(1, 0.3/0.6) = 0.5; on rejection
    # r <- max(r - q, 0) = (0.2, 0, 0.1), normalised (2/3, 0, 1/3). Slot 2 (point mass at 0):
    # accept with 2/3; on rejection r <- (0, 0, 1): the emitted token is 2.
    r = mx.log(mx.array([[[0.5, 0.3, 0.2]]]))
    q = mx.log(mx.array([[[0.3, 0.6, 0.1]]]))
    slot_tokens = mx.array([[[1, 0]]])
    sampled = mx.array([[[True, False]]])
    for u_slot, want in [((0.49, 0.9), 0), ((0.51, 0.66), 1), ((0.51, 0.67), -1)]:
        u = mx.array([[[*u_slot, 0.5]]])
        chosen, fallback = rsd._slot_outcomes(r, q, slot_tokens, sampled, u)
        assert int(chosen.item()) == want  # the accepted slot
        if want < 0:
            assert int(fallback.item()) == 2


def test_build_round_orders_samples_then_copies_and_checks_kept():
    world = World(vocab=4, depth=2, seed=1)
    sampling = SamplingConfig(1.0)
    draft = gumbel_topk_tree(world.step(), ROOT, (3,), sampling, 1, mx.random.key(0))
    drawn = [int(t) for t in draft.tokens[0, 1:4]]
    tree, props = build_round([(ROOT, drawn[1], 2)], draft, [1, 2, 3])
    root_slots = [int(tree.tokens[v]) for v in props.nodes[0] if v >= 0]
    assert root_slots == drawn + [drawn[1]]  # three draws in order, then the copy's point mass
    assert props.sampled[0].tolist()[:4] == [True, True, True, False]
    assert props.q_rows[0] == 0 and (props.q_rows[1:] == -1).all()
    with pytest.raises(ValueError, match="earlier-drawn"):
        build_round([], draft, [1, 3])


# ---------------------------------------------------------------------------------------------
# Expected acceptance (replay), sizing, the engine


def test_expected_accepted_equals_the_mean_of_rounds():
    world = World(vocab=5, depth=3, seed=12)
    sampling = SamplingConfig(0.9)
    draft = stochastic_beam_tree(world.step(), ROOT, 2, 4, sampling, 1, mx.random.key(7))
    kept = [j for j in range(1, draft.tokens.shape[1]) if draft.valid[0, j]]
    tree, props = build_round([(ROOT, 1, 2)], draft, kept)
    codes = [world.code[_prefix(tree, u)] for u in range(tree.num_nodes)]
    logp = process_logits(mx.array(world.p)[mx.array(codes)], sampling)
    logq = draft_logq_rows(draft.logq, None, props.q_rows[None], world.vocab)[0]
    exact = rsd.expected_accepted(tree, props, logp, logq)
    folded = rsd.expected_accepted(tree, props, logp, logq, support=np.arange(3))
    samples = 40_000
    u = mx.random.uniform(shape=(samples, tree.num_nodes, props.nodes.shape[1] + 1))
    slots = proposals_batch([props] * samples, tree.num_nodes)
    result = accept_batch(
        np.broadcast_to(tree.tokens, (samples, tree.num_nodes)),
        np.broadcast_to(tree.depths, (samples, tree.num_nodes)),
        slots,
        mx.broadcast_to(logp, (samples, *logp.shape)),
        mx.broadcast_to(logq, (samples, *logq.shape)),
        u,
    )
    mean, sd = result.num_accepted.mean(), result.num_accepted.std() / samples**0.5
    assert exact > 0.5 and abs(mean - exact) < 5 * sd
    assert folded == pytest.approx(exact, rel=1e-5)  # folding columns changes nothing
    point = point_mass_proposals(tree)
    beams = rsd.expected_accepted(tree, point, logp)  # the deterministic-children rule
    u = mx.random.uniform(shape=(samples, tree.num_nodes, point.nodes.shape[1] + 1))
    batch = accept_batch(
        np.broadcast_to(tree.tokens, (samples, tree.num_nodes)),
        np.broadcast_to(tree.depths, (samples, tree.num_nodes)),
        proposals_batch([point] * samples, tree.num_nodes),
        mx.broadcast_to(logp, (samples, *logp.shape)),
        mx.full((samples, *logp.shape), -mx.inf),
        u,
    )
    got = batch.num_accepted.mean()
    assert abs(got - beams) < 5 * batch.num_accepted.std() / samples**0.5


def test_sizing_choice_does_not_depend_on_the_drawn_tokens():
    world = World(vocab=6, depth=3, seed=2)
    sampling = SamplingConfig(1.0)
    draft = gumbel_topk_tree(world.step(), ROOT, (4, 2), sampling, 1, mx.random.key(5))
    policy = TreePolicy(default_cost_curve("cpu"), max_nodes=8)
    lookup = [lookup_candidate(ROOT, (1, 2), 3)]

    def kept_nodes(d):
        choice = policy.select(sampled_candidates(d) + lookup, True)
        det, kept = split_choice(choice.sequences, d)
        build_round(det, d, kept)  # a valid round: parents and earlier draws kept
        return det, kept

    det, kept = kept_nodes(draft)
    assert 0 < len(kept) < int(draft.valid.sum()) - 1  # the budget cut the tree
    tokens = draft.tokens.copy()
    tokens[:, 1:] = (tokens[:, 1:] + 3) % world.vocab  # other draws, the root kept
    other = SampledDraft(**{**vars(draft), "tokens": tokens})
    assert kept_nodes(other) == (det, kept)
    # The calibration learns from accepted sampled nodes (their keys).
    tree, props = build_round(det, draft, kept)
    path = np.array([0, int(props.nodes[0, 0])])
    keys = accepted_keys(tree, props, path, draft)
    assert keys[0] == (ROOT, int(tree.tokens[path[1]])) and keys[1] == (ROOT, node_key(1))


@pytest.mark.parametrize("method", ["sbs", "gumbel-topk", "beam"])
def test_engine_sampled_rounds_and_greedy(method):
    model = tiny_model(3)
    drafter = init_drafter(model, seed=1, draft_vocab_ids=list(range(0, 64, 2)))
    prompt = [5, 9, 2, 5, 9, 2, 5]
    for lookup in (False, True):
        out = tokens_of(model, prompt, drafter, max_tokens=24, temperature=0.8, top_p=0.9,
                        seed=4, beam_width=3, beam_length=3, draft_method=method, lookup=lookup)  # fmt: skip
        assert len(out) == 24 and all(0 <= t < 64 for t in out)
    plain = tokens_of(model, prompt, max_tokens=20)
    assert tokens_of(model, prompt, drafter, max_tokens=20, draft_method=method) == plain


def test_bad_draft_method_is_one_error():
    with pytest.raises(GenerationError, match="draft_method"):
        tokens_of(tiny_model(0), [1, 2], object(), temperature=1.0, draft_method="nope")


@pytest.mark.parametrize("sampling", [SamplingConfig(0.8, 0.7, 0), SamplingConfig(1.0, 1.0, 5)])
def test_folded_columns_give_the_dense_outcomes(monkeypatch, sampling):
    # With top-p/top-k, rsd_accept works over the columns where p or q has mass; the same
    # uniforms must give the same outcome as the recursion over the whole vocabulary.
    import mlx_redrafter.accept as accept

    monkeypatch.setattr(accept, "TOP_P_CANDIDATES", 12)
    world = World(vocab=6, depth=2, seed=3)
    vocab = 40
    draft = gumbel_topk_tree(world.step(), ROOT, (3, 2), sampling, 1, mx.random.key(1))
    kept = [j for j in range(1, draft.tokens.shape[1]) if draft.valid[0, j]]
    tree, props = build_round([(ROOT, 7, 8)], draft, kept)
    # Target logits over a larger vocabulary, peaked on the low ids (top-p decided).
    rng = np.random.default_rng(0)
    logits = np.concatenate(
        [rng.normal(size=(tree.num_nodes, 10)) * 2 + 4, rng.normal(size=(tree.num_nodes, 30))],
        axis=1,
    ).astype(np.float32)
    logits = mx.array(logits)
    q6 = draft_logq_rows(draft.logq, None, props.q_rows[None], 6)[0]
    logq = mx.concatenate([q6, mx.full((tree.num_nodes, vocab - 6), -mx.inf)], axis=1)
    logp = process_logits(logits, sampling)
    folded_used = 0
    for seed in range(30):
        u = mx.random.uniform(
            shape=(tree.num_nodes, props.nodes.shape[1] + 1), key=mx.random.key(seed)
        )
        draft40 = SampledDraft(**{**vars(draft), "logq": mx.concatenate(
            [draft.logq, mx.full((1, draft.logq.shape[1], vocab - 6), -mx.inf)], axis=2)})  # fmt: skip
        got = rsd_accept(tree, props, logits, sampling, draft40, u)
        want = accept_batch(
            tree.tokens[None], tree.depths[None], proposals_batch([props]),
            logp[None], logq[None], u[None],
        )[0]  # fmt: skip
        assert got.tokens == want.tokens and got.path.tolist() == want.path.tolist()
        folded_used += rsd._folded_target(tree, props, logits, logq, sampling) is not None
    assert folded_used == 30


def test_default_draft_method_by_temperature():
    assert rsd.default_draft_method(SamplingConfig(0.0)) == "beam"
    assert rsd.default_draft_method(SamplingConfig(0.3, 0.9)) == "beam"
    assert rsd.default_draft_method(SamplingConfig(0.7, 0.9)) == "sbs"
    assert rsd.default_draft_method(SamplingConfig(1.0, 1.0, 1)) == "beam"  # top-k 1: greedy
    # One chain (W = 1) has no siblings to draw without replacement: beams.
    assert rsd.default_draft_method(SamplingConfig(0.7, 0.9), beam_width=1) == "beam"
    assert rsd.default_draft_method(SamplingConfig(0.7, 0.9), beam_width=2) == "sbs"
