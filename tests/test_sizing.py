"""Multi-source trees: packing ragged candidates, per-node estimates and the cost-aware choice."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_redrafter.sizing import (
    DRAFTER,
    LOOKUP,
    PROFILE_ROUNDS,
    Calibration,
    Candidate,
    TreePolicy,
    copy_candidate,
    cost_curve_from_points,
    credit_sources,
    default_cost_curve,
    drafter_candidates,
    lookup_candidate,
)
from mlx_redrafter.tree import pack_beams, pack_sequences


def test_lookup_chain_sharing_a_beam_prefix_is_deduplicated():
    # root 7; beams 7-1-2, 7-1-3; a lookup chain 7-1-2-5-6 shares 7-1-2 with beam 0.
    tree = pack_sequences([(7, 1, 2), (7, 1, 3), (7, 1, 2, 5, 6)])
    assert tree.tokens.tolist() == [7, 1, 2, 3, 5, 6]
    assert tree.depths.tolist() == [0, 1, 2, 2, 3, 4]
    assert tree.parents.tolist() == [-1, 0, 1, 1, 2, 4]
    assert tree.paths.tolist() == [[0, 1, 2, -1, -1], [0, 1, 3, -1, -1], [0, 1, 2, 4, 5]]
    assert tree.children.tolist() == [[1, -1], [2, 3], [4, -1], [-1, -1], [5, -1], [-1, -1]]
    assert tree.positions(10).tolist() == [10, 11, 12, 12, 13, 14]
    expected = np.array(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 0, 1, 0, 0],
            [1, 1, 1, 0, 1, 0],
            [1, 1, 1, 0, 1, 1],
        ],
        dtype=bool,
    )
    assert np.array_equal(tree.ancestor_mask(), expected)
    mask = np.array(tree.attention_mask(3))
    assert mask.shape == (1, 1, 6, 9)
    assert mask[0, 0, :, :3].all() and np.array_equal(mask[0, 0, :, 3:], expected)


def test_pack_sequences_equals_pack_beams_on_equal_lengths():
    rng = np.random.default_rng(0)
    for _ in range(50):
        beams = rng.integers(0, 3, size=(int(rng.integers(1, 5)), int(rng.integers(1, 6))))
        beams[:, 0] = 9
        a, b = pack_beams(beams), pack_sequences(beams.tolist())
        for name in ("tokens", "depths", "parents", "paths", "children"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
        # tokens along every path give the beams back
        assert np.array_equal(a.tokens[a.paths], beams)


def test_pack_sequences_rejects_bad_input():
    with pytest.raises(ValueError, match="root"):
        pack_sequences([(1, 2), (3, 4)])
    with pytest.raises(ValueError, match="non-empty"):
        pack_sequences([])


def _beams():
    beams = np.array([[5, 1, 2, 3], [5, 1, 4, 6]])
    prefix = np.log(np.array([[1.0, 0.9, 0.72, 0.36], [1.0, 0.9, 0.09, 0.009]]))
    return drafter_candidates(beams, prefix)


def test_drafter_estimates_are_the_conditional_probabilities():
    cands = _beams()
    assert cands[0].source == DRAFTER
    assert np.allclose(cands[0].raw, [0.9, 0.8, 0.5])
    assert np.allclose(cands[1].raw, [0.9, 0.1, 0.1])
    assert cands[0].buckets == ((DRAFTER, 1), (DRAFTER, 2), (DRAFTER, 3))


def test_flat_cost_keeps_more_nodes_than_steep():
    cands = _beams() + [lookup_candidate(5, [1, 2, 7, 8, 9, 10], match_len=3)]
    flat = TreePolicy(np.ones(32)).select(cands, with_drafter=True)
    steep = TreePolicy(1.0 + 0.3 * np.arange(32)).select(cands, with_drafter=True)
    n_flat = len(flat.estimate) + 1
    n_steep = len(steep.estimate) + 1
    assert n_flat > n_steep >= 1
    # A flat curve verifies every candidate node: the 9 distinct non-root prefixes.
    assert n_flat == 10
    assert flat.value >= steep.expected_tokens / (1.0 + 0.3 * (n_flat - 1) + 0.1)


def test_kept_nodes_are_ancestor_closed_and_within_budget():
    rng = np.random.default_rng(1)
    for trial in range(200):
        cands = []
        for _ in range(int(rng.integers(1, 5))):
            n = int(rng.integers(1, 7))
            toks = (0, *rng.integers(0, 3, size=n).tolist())
            raw = tuple(rng.uniform(0.01, 0.99, size=n).tolist())
            src = DRAFTER if rng.random() < 0.5 else LOOKUP
            cands.append(Candidate(src, toks, raw, tuple((src, 1) for _ in range(n))))
        budget = int(rng.integers(1, 8))
        slope = float(rng.uniform(0.0, 0.5))
        policy = TreePolicy(1.0 + slope * np.arange(32), max_nodes=budget)
        choice = policy.select(cands, with_drafter=bool(trial % 2))
        kept = set(choice.estimate)
        assert len(kept) + 1 <= budget
        for prefix in kept:
            assert len(prefix) == 2 or prefix[:-1] in kept
        tree = pack_sequences(choice.sequences)
        assert tree.num_nodes == len(kept) + 1
        # the estimate never rises along a path
        for prefix in kept:
            if len(prefix) > 2:
                assert choice.estimate[prefix] <= choice.estimate[prefix[:-1]] + 1e-12


def test_the_chosen_size_maximises_expected_tokens_per_cost():
    cands = _beams()
    curve = 1.0 + 0.17 * np.arange(32)
    policy = TreePolicy(curve, draft_cost=0.1)
    choice = policy.select(cands, with_drafter=True)
    probs = sorted([0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.5, 0.9 * 0.1, 0.9 * 0.1 * 0.1], reverse=True)
    values = [(1 + sum(probs[: n - 1])) / (curve[n - 1] + 0.1) for n in range(1, 7)]
    assert len(choice.estimate) + 1 == int(np.argmax(values)) + 1
    assert choice.value == pytest.approx(max(values))


def test_calibration_learns_from_outcomes():
    policy = TreePolicy(1.0 + 0.1 * np.arange(32))
    cand = lookup_candidate(0, [1, 2, 3], match_len=2)
    before = policy.select([cand], with_drafter=False)
    # Every copied token is accepted for a while: the lookup estimate rises.
    for _ in range(20):
        choice = policy.select([cand], with_drafter=False)
        accepted = [cand.tokens[: k + 1] for k in range(1, len(choice.sequences[0]))]
        policy.observe(choice, accepted, with_drafter=False)
    after = policy.select([cand], with_drafter=False)
    assert after.estimate[(0, 1)] > before.estimate[(0, 1)]
    # ... and never rejected: it falls below where it started.
    policy = TreePolicy(1.0 + 0.1 * np.arange(32))
    for _ in range(20):
        choice = policy.select([cand], with_drafter=False)
        policy.observe(choice, [], with_drafter=False)
    assert (
        policy.select([cand], with_drafter=False).estimate.get((0, 1), 0.0)
        < before.estimate[(0, 1)]
    )


def test_nodes_whose_parent_was_rejected_teach_nothing():
    policy = TreePolicy(np.ones(32))
    cand = lookup_candidate(0, [1, 2, 3], match_len=3)
    choice = policy.select([cand], with_drafter=False)
    policy.observe(choice, [], with_drafter=False)  # the first copied token was rejected
    assert policy.calibration.predicted == {(LOOKUP, 3): pytest.approx(cand.raw[0])}
    assert policy.calibration.hits == {(LOOKUP, 3): 0.0}


def test_drafter_is_skipped_when_lookup_alone_is_better_and_reprobed():
    policy = TreePolicy(1.0 + 0.17 * np.arange(32))
    copy = [copy_candidate(0, list(range(1, 17)), match_len=40)]  # a long, sure copy
    assert policy.want_drafter(copy)  # no drafter profile yet
    for _ in range(PROFILE_ROUNDS):  # learns the profile (0.9, 0.1, 0.1)
        weak = policy.select(_beams()[1:], with_drafter=True)
        policy.observe(weak, [], with_drafter=True)
    assert not policy.want_drafter(copy)  # the copy alone is worth more than copy + drafter
    assert policy.want_drafter([])  # with nothing to copy, a 0.9 first token pays its cost
    for k in range(16):
        # rounds with a lookup candidate, and rounds with no candidate at all
        policy.observe(policy.select(copy, False) if k % 2 else None, [], with_drafter=False)
    assert policy.want_drafter(copy)  # re-probed after a while


def test_a_weak_copy_does_not_keep_a_good_drafter_out():
    """The old rule compared lookup's estimate with the drafter's realised rounds; a copy
    estimated above what drafter rounds realised kept the drafter out. Now both sides are
    estimates, and a weak copy (match length 2) loses to copy + drafter."""
    policy = TreePolicy(1.0 + 0.17 * np.arange(32))
    good = policy.select(_beams(), with_drafter=True)  # profile (0.9, 0.8, 0.5)
    policy.observe(good, [(5, 1), (5, 1, 2)], with_drafter=True)
    weak = [copy_candidate(5, [7, 8, 9], match_len=2)]
    assert policy.want_drafter(weak)


def test_draft_cost_is_a_running_median():
    policy = TreePolicy(np.ones(32))
    for _ in range(10):
        policy.observe_times(0.01, 0.1, 3)
    policy.observe_times(0.5, 0.1, 3)  # one round slowed by something else
    assert policy.draft_cost == pytest.approx(0.1)


def test_credit_by_source():
    cands = _beams() + [lookup_candidate(5, [1, 2, 9], match_len=2)]
    choice = TreePolicy(np.ones(32)).select(cands, with_drafter=True)
    credit = credit_sources(choice, [(5, 1), (5, 1, 2), (5, 1, 2, 9)])
    assert credit == {"both": 2, LOOKUP: 1}


def test_cost_curves():
    curve = cost_curve_from_points({1: 1.0, 2: 1.2, 4: 1.6}, 6)
    assert np.allclose(curve, [1.0, 1.2, 1.4, 1.6, 1.8, 2.0])
    cpu, gpu = default_cost_curve("cpu"), default_cost_curve("gpu")
    assert cpu.shape == gpu.shape == (32,)
    assert cpu[0] == gpu[0] == 1.0 and gpu[7] < cpu[7] and np.all(cpu >= 1.0)
    with pytest.raises(ValueError, match="cost curve"):
        TreePolicy([0.0, 1.0])


def test_with_nothing_to_copy_the_drafter_runs_while_it_pays():
    policy = TreePolicy(1.0 + 0.17 * np.arange(32))
    good = policy.select(_beams(), with_drafter=True)
    kept = sorted(good.estimate, key=len)
    policy.observe(good, [q for q in kept if q[:3] == (5, 1, 2)[: len(q)]], with_drafter=True)
    assert policy.want_drafter([])
    for _ in range(30):  # rounds where nothing drafted is accepted: worth less than plain
        policy.observe(policy.select(_beams(), with_drafter=True), [], with_drafter=True)
    assert not policy.want_drafter([])


def test_calibration_shrinks_buckets_towards_their_group():
    """Misses at some match lengths lower the estimate at a length never seen yet."""
    calibration = Calibration()
    for m in (2, 3, 4):
        for _ in range(5):
            calibration.observe((LOOKUP, m), 0.6, False)
    unseen = calibration.scale((LOOKUP, 8))
    assert unseen == pytest.approx(4 / (9 + 4))  # the group's rate, not the prior's 1.0
    assert calibration.scale((DRAFTER, 1)) == 1.0  # other groups are untouched
    merged = Calibration()
    merged.absorb(calibration)
    assert merged.scale((LOOKUP, 8)) == pytest.approx(unseen)


def test_a_sure_copy_leaves_the_drafter_only_what_it_does_not_cover():
    """The phantom drafter beam is a sibling of the copies with a distinct first token: it
    can be accepted only where they are not, so its first estimate is capped by 1 minus
    theirs. With a 0.95 copy the drafter (profile 0.9, 0.8, ...) is not worth its cost; the
    uncapped phantom (0.9 on top of 0.95) would have run it."""
    curve = np.array([1.0, 1.15, 1.23, 1.43, 1.49, 1.52, 1.53, 1.58] + [1.6] * 24)
    sure = Candidate(LOOKUP, (5, 7, 8, 9), (0.95, 0.9, 0.9), tuple((LOOKUP, 32) for _ in "abc"))

    def policy_with_profile():
        policy = TreePolicy(curve)
        for _ in range(PROFILE_ROUNDS):
            good = policy.select(_beams(), with_drafter=True)  # profile (0.9, 0.8, 0.5)
            policy.observe(good, [(5, 1), (5, 1, 2)], with_drafter=True)
        return policy

    policy = policy_with_profile()
    assert not policy.want_drafter([sure])
    assert policy.want_drafter([])  # nothing to copy: the drafter pays
    # The control: without the cap, the same phantom is worth running.
    uncapped = policy_with_profile()
    uncapped._first_token_mass = lambda candidates: 0.0
    assert uncapped.want_drafter([sure])


def test_one_weak_first_round_does_not_keep_the_drafter_out():
    """The profile is the mean of the first rounds, and the drafter runs until it has
    PROFILE_ROUNDS of them: a first beam at 0.13 (then 0.9s) must not skip the drafter for
    the next 14 rounds, as it did with a profile set by the first round alone."""
    curve = 1.0 + 0.17 * np.arange(32)
    weak = drafter_candidates(np.array([[5, 1, 2]]), np.log(np.array([[1.0, 0.13, 0.05]])))
    good = drafter_candidates(np.array([[5, 1, 2]]), np.log(np.array([[1.0, 0.9, 0.72]])))
    policy = TreePolicy(curve)
    policy.observe(policy.select(weak, with_drafter=True), [], with_drafter=True)
    assert policy.want_drafter([])  # one round is not a profile yet
    for _ in range(2):
        policy.observe(policy.select(good, True), [(5, 1), (5, 1, 2)], with_drafter=True)
    assert policy.profile_rounds == 3
    assert policy.drafter_profile[0] == pytest.approx((0.13 + 0.9 + 0.9) / 3)
    assert policy.want_drafter([])
