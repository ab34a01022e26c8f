"""Tree sizing: which candidate nodes a round verifies, by expected gain over verify cost.

Every candidate (a drafter beam, a context-lookup continuation) carries, per token, an
estimate of P(token accepted | its parent accepted): the drafter's own conditional
probability, or a rate per lookup match length, each scaled by a calibration learnt online
from the acceptance seen so far in this generation. A node's estimate P(node accepted) is the
product along its path (the largest over the candidates through it), so it never exceeds its
parent's. With the device's verify-cost curve c(n) = t(n)/t(1) and the drafter's cost d (both
in plain steps), a round of n nodes is worth

    E(n) / (c(n) + d),   E(n) = 1 + sum of P over the n - 1 non-root nodes

tokens per plain step, and the tree keeps the n most likely nodes that maximise it.
docs/tree-attention.md has a worked example.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

DRAFTER = "drafter"
LOOKUP = "lookup"  # copied from this request's context
MEMORY = "memory"  # copied from earlier requests (lookup_memory.LookupMemory)
SAMPLED = "sampled"  # calibration bucket of drafter nodes drawn without replacement

# t(n)/t(1) measured on a 2-core x86 CPU (SmolLM2-135M, float32, the fast path; `tune
# --curve-only`, BENCHMARKS.md section 7): used when `tune` has stored no curve for the device
# and model. Not monotonic: the 16-token pass hits faster kernels than 9-15 tokens do.
CPU_COST_POINTS = {
    1: 1.0, 2: 1.15, 3: 1.23, 4: 1.43, 5: 1.49, 6: 1.52, 7: 1.53, 8: 1.58,
    12: 2.0, 16: 1.55, 32: 2.25,
}  # fmt: skip
# A GPU verifies a few dozen tokens at nearly the cost of one (Apple measured a knee between
# 12 and 16 candidates for a 7B model on M-series GPUs).
GPU_COST_POINTS = {1: 1.0, 2: 1.03, 8: 1.08, 12: 1.12, 16: 1.45, 32: 2.0}

# P(first copied token accepted) by match length, and P(a further copied token accepted |
# the one before it was): a copy that has started holds up (measured on SmolLM2-135M's greedy
# answers to document prompts: ~0.5 at match length 2 for the first token, 0.73-0.94 after).
LOOKUP_PRIOR = {1: 0.3, 2: 0.45, 3: 0.6, 4: 0.7}
LOOKUP_RUN_PRIOR = 0.8
LOOKUP_RUN = "lookup-run"  # calibration bucket of the copied tokens after the first
# Lookup v2 (`copy_candidate`): priors per match-length bucket, for the first copied token and
# for each one after it. A copied token k (0-based) is only tested once the k before it were
# accepted, when the match behind it is match_len + k long: its bucket is that length's, so a
# copy that keeps matching earns ever higher estimates and the tree keeps it long.
MATCH_BUCKETS = (1, 2, 3, 4, 5, 8, 12, 16, 24, 32)
COPY_PRIOR = {
    LOOKUP: {
        1: 0.3,
        2: 0.45,
        3: 0.6,
        4: 0.7,
        5: 0.75,
        8: 0.8,
        12: 0.85,
        16: 0.85,
        24: 0.9,
        32: 0.9,
    },
    # earlier requests' text: a match there says less about this request
    MEMORY: {
        1: 0.2,
        2: 0.3,
        3: 0.4,
        4: 0.5,
        5: 0.55,
        8: 0.65,
        12: 0.7,
        16: 0.75,
        24: 0.8,
        32: 0.85,
    },
}
COPY_RUN_PRIOR = {
    1: 0.8,
    2: 0.8,
    3: 0.8,
    4: 0.8,
    5: 0.82,
    8: 0.85,
    12: 0.88,
    16: 0.9,
    24: 0.92,
    32: 0.94,
}
UNKNOWN_PRIOR = 0.5  # for candidates that bring no estimate (e.g. test oracles)
MAX_COND = 0.98
PRIOR_WEIGHT = 4.0  # pseudo-observations behind each calibration's initial scale of 1
DEFAULT_MAX_NODES = 32
REPROBE_EVERY = 16  # rounds between two drafter runs when lookup keeps winning
PROFILE_ROUNDS = 3  # the drafter runs in a generation's first rounds until its profile has these
DRAFT_COST_WINDOW = 15  # rounds behind the drafter's cost estimate (a running median)


def cost_curve_from_points(points: dict[int, float], max_nodes: int) -> np.ndarray:
    """t(n)/t(1) for n = 1..max_nodes, linear between the given points and past the last."""
    ns = np.array(sorted(points), dtype=np.float64)
    ts = np.array([points[int(n)] for n in ns], dtype=np.float64)
    grid = np.arange(1, max_nodes + 1, dtype=np.float64)
    curve = np.interp(grid, ns, ts)
    if ns.size >= 2 and grid[-1] > ns[-1]:
        slope = (ts[-1] - ts[-2]) / (ns[-1] - ns[-2])
        past = grid > ns[-1]
        curve[past] = ts[-1] + slope * (grid[past] - ns[-1])
    return curve


def default_cost_curve(device: str = "cpu", max_nodes: int = DEFAULT_MAX_NODES) -> np.ndarray:
    points = CPU_COST_POINTS if device == "cpu" else GPU_COST_POINTS
    return cost_curve_from_points(points, max_nodes)


@dataclass(frozen=True)
class Candidate:
    """One candidate sequence: tokens[0] is the root g0; raw[k] and bucket[k] belong to
    tokens[k + 1] (the source's own P(token accepted | parent accepted) and the calibration
    it is corrected by)."""

    source: str
    tokens: tuple[int, ...]
    raw: tuple[float, ...]
    buckets: tuple[tuple[str, int], ...]

    def prefix(self, n: int) -> Candidate:
        """The candidate cut to its first n tokens after the root (n >= 1)."""
        return Candidate(self.source, self.tokens[: n + 1], self.raw[:n], self.buckets[:n])


def drafter_candidates(beams: np.ndarray, prefix_scores: np.ndarray | None) -> list[Candidate]:
    """Beams (W, L) and their prefix log-probs (W, L) -> candidates, one per beam."""
    out = []
    for w in range(beams.shape[0]):
        if prefix_scores is None:
            raw = [UNKNOWN_PRIOR] * (beams.shape[1] - 1)
        else:
            raw = np.exp(np.diff(prefix_scores[w].astype(np.float64))).tolist()
        buckets = tuple((DRAFTER, d) for d in range(1, beams.shape[1]))
        out.append(Candidate(DRAFTER, tuple(int(t) for t in beams[w]), tuple(raw), buckets))
    return out


def sampled_candidates(draft, kept: Sequence[int] | None = None) -> list[Candidate]:
    """Nodes drawn without replacement (`rsd_draft.SampledDraft`, tree 0) as candidates, one
    per leaf. Their tokens are keys, not tokens: node j is -1 - j, so that while the tree is
    chosen a drawn node never merges with another source's node. The choice must not depend
    on which tokens were drawn (a sibling's proposal assumes it was kept whatever it drew):
    a rank-i draw at any depth is estimated by the root q's i-th largest probability (known
    before any draw), calibrated per depth. Estimates fall with rank, so any kept set holds
    each node's earlier draws."""
    valid = draft.valid[0]
    nodes = [j for j in range(1, valid.shape[0]) if valid[j] and (kept is None or j in kept)]
    if not nodes:
        return []
    top = draft.root_top[0]
    parents, ranks, depths = draft.parents[0], draft.ranks[0], draft.depths
    inner = {int(parents[j]) for j in nodes}
    out = []
    for leaf in (j for j in nodes if j not in inner):
        chain = []
        j = leaf
        while j > 0:
            chain.append(j)
            j = int(parents[j])
        chain.reverse()
        raw = tuple(float(top[min(int(ranks[j]), top.size - 1)]) for j in chain)
        buckets = tuple((SAMPLED, int(depths[j])) for j in chain)
        keys = (int(draft.tokens[0, 0]), *(-1 - j for j in chain))
        out.append(Candidate(DRAFTER, keys, raw, buckets))
    return out


def lookup_candidate(root: int, continuation: Sequence[int], match_len: int) -> Candidate:
    """A copied continuation: its first token is calibrated per match length, the rest
    (which the copy reaches only once the first was accepted) together."""
    m = max(1, min(match_len, max(LOOKUP_PRIOR)))
    n = len(continuation)
    raw = (LOOKUP_PRIOR[m],) + (LOOKUP_RUN_PRIOR,) * (n - 1)
    buckets = ((LOOKUP, m),) + ((LOOKUP_RUN, m),) * (n - 1)
    return Candidate(LOOKUP, (int(root), *map(int, continuation)), raw[:n], buckets[:n])


def match_bucket(length: int) -> int:
    """The calibration bucket of a match length: the largest MATCH_BUCKETS entry <= it."""
    out = MATCH_BUCKETS[0]
    for b in MATCH_BUCKETS:
        if length >= b:
            out = b
    return out


def copy_candidate(
    root: int,
    continuation: Sequence[int],
    match_len: int,
    support: Sequence[float] | None = None,
    source: str = LOOKUP,
) -> Candidate:
    """A lookup-v2 continuation (from the context, or from earlier requests with source
    MEMORY): token k's estimate is the prior of its match-length bucket (match_len + k, see
    COPY_RUN_PRIOR) times its support among the matched occurrences; the first token and the
    ones after it are calibrated apart, per source and bucket."""
    n = len(continuation)
    support = (1.0,) * n if support is None else tuple(support)
    first = match_bucket(match_len)
    raw = [COPY_PRIOR[source][first] * support[0]]
    buckets = [(source, first)]
    for k in range(1, n):
        b = match_bucket(match_len + k)
        raw.append(COPY_RUN_PRIOR[b] * support[k])
        buckets.append((source + "-run", b))
    return Candidate(source, (int(root), *map(int, continuation)), tuple(raw), tuple(buckets))


@dataclass
class Choice:
    """The nodes a round verifies: the sequences to pack (in candidate order), and for each
    kept prefix its estimate and the (source, bucket, raw) contributions that predicted it."""

    sequences: list[tuple[int, ...]]
    estimate: dict[tuple[int, ...], float]
    sources: dict[tuple[int, ...], list[tuple[str, tuple[str, int], float]]]
    expected_tokens: float
    cost: float

    @property
    def value(self) -> float:
        return self.expected_tokens / self.cost


@dataclass
class Calibration:
    """Per bucket: sum of raw estimates and hits over the nodes whose parent was accepted.

    A bucket's scale shrinks towards its group's (the buckets of one kind, e.g. every match
    length of lookup's first copied tokens), and the group's towards 1: with ten match-length
    buckets per source, each seen a few times in a short answer, lookup that keeps failing must
    be learnt from all of them at once, not bucket by bucket."""

    predicted: dict[tuple[str, int], float] = field(default_factory=dict)
    hits: dict[tuple[str, int], float] = field(default_factory=dict)
    group_predicted: dict[str, float] = field(default_factory=dict)
    group_hits: dict[str, float] = field(default_factory=dict)

    def group_scale(self, group: str) -> float:
        pred = self.group_predicted.get(group, 0.0)
        return (self.group_hits.get(group, 0.0) + PRIOR_WEIGHT) / (pred + PRIOR_WEIGHT)

    def scale(self, bucket: tuple[str, int]) -> float:
        pred = self.predicted.get(bucket, 0.0)
        prior = PRIOR_WEIGHT * self.group_scale(bucket[0])
        return (self.hits.get(bucket, 0.0) + prior) / (pred + PRIOR_WEIGHT)

    def corrected(self, raw: float, bucket: tuple[str, int]) -> float:
        return float(min(MAX_COND, raw * self.scale(bucket)))

    def observe(self, bucket: tuple[str, int], raw: float, hit: bool) -> None:
        self.add(bucket, raw, float(hit))

    def add(self, bucket: tuple[str, int], predicted: float, hits: float) -> None:
        """Count `predicted` (a sum of raw estimates) and `hits` for a bucket and its group."""
        self.predicted[bucket] = self.predicted.get(bucket, 0.0) + predicted
        self.hits[bucket] = self.hits.get(bucket, 0.0) + hits
        group = bucket[0]
        self.group_predicted[group] = self.group_predicted.get(group, 0.0) + predicted
        self.group_hits[group] = self.group_hits.get(group, 0.0) + hits

    def absorb(self, other: Calibration) -> None:
        """Add every bucket of `other` (what an earlier request learnt) to this one."""
        for bucket, predicted in other.predicted.items():
            self.add(bucket, predicted, other.hits.get(bucket, 0.0))


class TreePolicy:
    """Chooses each round's nodes from all candidates and learns from the outcome.

    cost_curve: t(n)/t(1) for n = 1..len (in plain steps); draft_cost: the drafter's time in
    plain steps (updated online by `observe_times`).
    """

    def __init__(
        self,
        cost_curve: Sequence[float],
        max_nodes: int = DEFAULT_MAX_NODES,
        draft_cost: float = 0.1,
    ):
        curve = np.asarray(cost_curve, dtype=np.float64)
        if curve.ndim != 1 or curve.size < 1 or not np.all(np.isfinite(curve)) or curve[0] <= 0:
            raise ValueError(f"cost curve must be positive t(n)/t(1) values, got {cost_curve}")
        if curve.size < max_nodes:
            points = {i + 1: float(t) for i, t in enumerate(curve)}
            curve = cost_curve_from_points(points, max_nodes)
        self.curve = curve[:max_nodes] / curve[0]
        self.max_nodes = max_nodes
        self.draft_cost = draft_cost
        # (draft_time, verify_time) -> the same on every rank of a model split over several
        # (distributed.shared_timings); None on one machine.
        self.share_timings = None
        # False: keep draft_cost as given instead of learning it from round timings, so the
        # trees, and with them a seeded sampled run's draws, do not depend on the machine's
        # timing (a run with a seed repeats itself).
        self.learn_costs = True
        self.calibration = Calibration()
        # EMA of the drafter's raw conditional estimates along its best beam, per depth: what
        # a drafter round typically brings, for deciding whether to run it (`want_drafter`)
        self.drafter_profile: list[float] | None = None
        self.profile_rounds = 0  # drafter rounds behind the profile
        self.rounds_without_drafter = 0
        self._draft_ratios: list[float] = []  # the last DRAFT_COST_WINDOW draft/step ratios

    # -- choosing ---------------------------------------------------------------------------

    def select(
        self, candidates: Sequence[Candidate], with_drafter: bool, learn: bool = True
    ) -> Choice:
        """The n most likely nodes (ancestors first) that maximise E(n) / (c(n) + d). A
        round's real choice (`learn`) also updates the drafter's profile."""
        if with_drafter and learn:
            self._learn_profile(candidates)
        estimate: dict[tuple[int, ...], float] = {}
        sources: dict[tuple[int, ...], list] = {}
        order: dict[tuple[int, ...], int] = {}
        for cand in candidates:
            p = 1.0
            for k in range(1, len(cand.tokens)):
                prefix = cand.tokens[: k + 1]
                p *= self.calibration.corrected(cand.raw[k - 1], cand.buckets[k - 1])
                order.setdefault(prefix, len(order))
                estimate[prefix] = max(estimate.get(prefix, 0.0), p)
                sources.setdefault(prefix, []).append(
                    (cand.source, cand.buckets[k - 1], cand.raw[k - 1])
                )
        # Ties go to the shallower, then earlier node, so every kept node's parent is kept.
        ranked = sorted(estimate, key=lambda q: (-estimate[q], len(q), order[q]))
        ranked = ranked[: self.max_nodes - 1]
        probs = np.array([estimate[q] for q in ranked], dtype=np.float64)
        expected = 1.0 + np.concatenate([[0.0], np.cumsum(probs)])  # E(n), n = 1..len+1
        draft = self.draft_cost if with_drafter else 0.0
        cost = self.curve[: expected.size] + draft
        n = int(np.argmax(expected / cost)) + 1
        kept = set(ranked[: n - 1])
        root = candidates[0].tokens[:1] if candidates else ()
        sequences = []
        for cand in candidates:
            k = 1
            while k < len(cand.tokens) and cand.tokens[: k + 1] in kept:
                k += 1
            if k > 1:
                sequences.append(cand.tokens[:k])
        if not sequences:
            sequences = [root]
        return Choice(
            sequences=sequences,
            estimate={q: estimate[q] for q in kept},
            sources={q: sources[q] for q in kept},
            expected_tokens=float(expected[n - 1]),
            cost=float(cost[n - 1]),
        )

    def _learn_profile(self, candidates: Sequence[Candidate]) -> None:
        """The drafter's typical estimates: the mean of its first rounds' best beams, then an
        exponential average (weight 0.2), so that one odd first round does not set it."""
        beam = next((c for c in candidates if c.source == DRAFTER), None)
        if beam is None or not beam.raw:
            return
        if self.drafter_profile is None or len(self.drafter_profile) != len(beam.raw):
            self.drafter_profile = list(beam.raw)
            self.profile_rounds = 1
        else:
            self.profile_rounds += 1
            w = max(0.2, 1.0 / self.profile_rounds)
            self.drafter_profile = [
                (1 - w) * old + w * new
                for old, new in zip(self.drafter_profile, beam.raw, strict=True)
            ]

    def want_drafter(self, candidates: Sequence[Candidate]) -> bool:
        """Whether this round should run the drafter, given the lookup candidates it has.

        Both sides are estimates of the same kind: the tree lookup alone would verify,
        against the tree of lookup plus a typical drafter beam (its profile, calibrated like
        any drafter node, its tokens distinct from every copy), the drafter's cost included.
        Comparing a lookup estimate with the drafter's realised rounds (as before) let
        optimistic lookup estimates keep the drafter out where it paid. The drafter runs
        until its profile rests on PROFILE_ROUNDS rounds (one odd first beam kept it out of a
        whole short answer), and is re-probed every REPROBE_EVERY rounds so that its
        calibration does not go stale.

        Siblings with distinct tokens are accepted in exclusive events, so the phantom's first
        token, distinct from every copy's, can be accepted with at most what the copies'
        first tokens leave: 1 minus the sum of their estimates. A sure copy leaves the drafter
        little to add, whatever its profile says."""
        if (
            self.drafter_profile is None
            or self.profile_rounds < PROFILE_ROUNDS
            or self.rounds_without_drafter >= REPROBE_EVERY
        ):
            return True
        root = candidates[0].tokens[0] if candidates else 0
        depth = len(self.drafter_profile)
        profile = list(self.drafter_profile)
        left = 1.0 - self._first_token_mass(candidates)
        scale = self.calibration.scale((DRAFTER, 1))
        profile[0] = min(profile[0], max(0.0, left) / scale) if scale > 0 else 0.0
        phantom = Candidate(
            DRAFTER,
            (root, *range(-1, -depth - 1, -1)),  # ids no real candidate has: no merging
            tuple(profile),
            tuple((DRAFTER, d) for d in range(1, depth + 1)),
        )
        alone = self.select(candidates, False, learn=False)
        merged = self.select([*candidates, phantom], True, learn=False)
        return merged.value > alone.value

    def _first_token_mass(self, candidates: Sequence[Candidate]) -> float:
        """The summed estimates of the candidates' distinct first tokens (each token once, at
        its best estimate)."""
        best: dict[int, float] = {}
        for cand in candidates:
            if len(cand.tokens) > 1:
                p = self.calibration.corrected(cand.raw[0], cand.buckets[0])
                best[cand.tokens[1]] = max(best.get(cand.tokens[1], 0.0), p)
        return sum(best.values())

    # -- learning ---------------------------------------------------------------------------

    def observe(
        self, choice: Choice | None, accepted: Sequence[tuple[int, ...]], with_drafter: bool
    ):
        """Update the calibration from the round's accepted prefixes (root excluded); a
        round with no candidate at all has `choice` None."""
        if choice is None:
            self.rounds_without_drafter += 1
            return
        accepted_set = set(accepted)
        for prefix, contributions in choice.sources.items():
            parent = prefix[:-1]
            if len(parent) > 1 and parent not in accepted_set:
                continue  # never tested: its parent was rejected
            hit = prefix in accepted_set
            for _, bucket, raw in contributions:
                self.calibration.observe(bucket, raw, hit)
        if with_drafter:
            self.rounds_without_drafter = 0
        else:
            self.rounds_without_drafter += 1

    def observe_times(self, draft_time: float, verify_time: float, num_nodes: int) -> None:
        """Learn the drafter's cost in plain steps from one round's timings: the median of the
        last DRAFT_COST_WINDOW rounds' ratios, so that one round slowed down by anything else
        on the machine (a shared CPU's verify times swing 2x) does not move it."""
        if not self.learn_costs:
            return
        if self.share_timings is not None:
            draft_time, verify_time = self.share_timings(draft_time, verify_time)
        if draft_time <= 0 or verify_time <= 0:
            return
        step = verify_time / self.curve[min(num_nodes, self.max_nodes) - 1]
        self._draft_ratios = [*self._draft_ratios[-(DRAFT_COST_WINDOW - 1) :], draft_time / step]
        self.draft_cost = float(np.median(self._draft_ratios))


def credit_sources(choice: Choice, accepted: Sequence[tuple[int, ...]]) -> dict[str, int]:
    """Accepted drafted tokens by the source(s) that proposed them: drafter, lookup or both."""
    out: dict[str, int] = {}
    for prefix in accepted:
        names = {s for s, _, _ in choice.sources.get(prefix, [])}
        key = "both" if len(names) > 1 else (names.pop() if names else DRAFTER)
        out[key] = out.get(key, 0) + 1
    return out
