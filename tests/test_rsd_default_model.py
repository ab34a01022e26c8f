"""RSD on the real default model and its shipped drafter: the first three sampled tokens of a
round (drafted without replacement by Stochastic Beam Search, accepted by recursive rejection
sampling, continued by plain sampling) have exactly plain sampling's distribution."""

from __future__ import annotations

import mlx_redrafter  # noqa: F401  (first: loads the BLAS before mlx.core)

# isort: split
import mlx.core as mx
import numpy as np
import pytest
from test_accept import ACCEPT_P, REJECT_P, chi2_pvalue

from mlx_redrafter.accept import SamplingConfig, process_logits
from mlx_redrafter.defaults import default_drafter_dir
from mlx_redrafter.drafter import load_drafter
from mlx_redrafter.generation import drafter_features, prefill
from mlx_redrafter.loading import load
from mlx_redrafter.rsd import accept_batch, build_round, draft_logq_rows, proposals_batch
from mlx_redrafter.rsd_draft import RecurrentStep, stochastic_beam_tree

pytestmark = pytest.mark.slow

SAMPLING = SamplingConfig(1.0, 1.0, 3)  # three tokens per position: 27 outcomes to enumerate
SAMPLES = 4_000
CHUNK = 250


@pytest.fixture(scope="module")
def setup(default_model_dir):
    drafter_dir = default_drafter_dir()
    if not (drafter_dir / "config.json").is_file():
        pytest.skip("the shipped drafter is not installed")
    model, tokenizer = load(default_model_dir)
    drafter = load_drafter(drafter_dir, base=model)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a fruit."}], add_generation_prompt=True
    )
    return model, drafter, ids


class Target:
    """The base model's warped log-probs after prompt + prefix, computed once per prefix."""

    def __init__(self, model, ids):
        self.model, self.ids, self.rows = model, list(ids), {}
        self.vocab = model.args.vocab_size
        self.support = {}

    def need(self, prefixes):
        todo = sorted({p for p in prefixes if p not in self.rows}, key=len)
        for n in sorted({len(p) for p in todo}):
            group = [p for p in todo if len(p) == n]
            seqs = mx.array([self.ids + [int(t) for t in p] for p in group])
            _, logits = self.model(seqs)
            logp = np.array(process_logits(logits[:, -1], SAMPLING))
            for p, row in zip(group, logp, strict=True):
                self.rows[p] = row

    def probs(self, prefix):
        self.need([prefix])
        return np.exp(self.rows[prefix].astype(np.float64))

    def sample(self, prefix, rng) -> int:
        if prefix not in self.support:
            p = self.probs(prefix)
            ids = np.flatnonzero(p > 0)
            self.support[prefix] = (ids, p[ids] / p[ids].sum())
        ids, p = self.support[prefix]
        return int(rng.choice(ids, p=p))


def exact(target: Target) -> dict:
    out = {}
    for a in np.flatnonzero(target.probs(()) > 0):
        for b in np.flatnonzero(target.probs((a,)) > 0):
            for c in np.flatnonzero(target.probs((a, b)) > 0):
                p = target.probs(())[a] * target.probs((a,))[b] * target.probs((a, b))[c]
                out[(int(a), int(b), int(c))] = p
    return out


def rounds(model, drafter, ids, target, seed):
    """SAMPLES rounds from independent g0 ~ p: (g0, then the round's emitted tokens continued
    by plain sampling) cut to three tokens."""
    cache = model.make_cache()
    context = prefill(model, cache, ids, features=drafter_features(drafter))
    p0 = target.probs(())
    rng = np.random.default_rng(seed)
    roots = rng.choice(p0.size, size=SAMPLES, p=p0 / p0.sum())
    out, control = [], []
    for g0 in np.unique(roots):
        total = int(np.sum(roots == g0))
        for start in range(0, total, CHUNK):
            size = min(CHUNK, total - start)
            key = mx.random.key(seed * 100_000 + int(g0) % 1000 * 100 + start // CHUNK)
            good, bad = _chunk(model, drafter, context, int(g0), size, target, key, rng)
            out += good
            control += bad
    return out, control


def _chunk(model, drafter, context, g0, size, target, key, rng):
    step = RecurrentStep(drafter, model, context)
    draft = stochastic_beam_tree(step, g0, 2, 3, SAMPLING, batch=size, key=key)
    trees, props = [], []
    for b in range(size):
        kept = [j for j in range(1, draft.valid.shape[1]) if draft.valid[b, j]]
        tree, prop = build_round([], draft, kept, tree_index=b)
        trees.append(tree)
        props.append(prop)
    n = max(t.num_nodes for t in trees)
    prefixes = [[_prefix(t, u) for u in range(t.num_nodes)] for t in trees]
    target.need({p for ps in prefixes for p in ps})
    slots = proposals_batch(props, n)
    q_rows = np.full((size, n), -1, np.int32)
    node_tokens = np.zeros((size, n), np.int32)
    depths = np.zeros((size, n), np.int32)
    for b, (tree, prop) in enumerate(zip(trees, props, strict=True)):
        m = tree.num_nodes
        q_rows[b, :m], node_tokens[b, :m], depths[b, :m] = prop.q_rows, tree.tokens, tree.depths
    # Only columns where p or q has mass matter (top-k 3 on both) and the nodes' tokens.
    drawn = np.array(mx.any(draft.logq > -mx.inf, axis=(0, 1)))
    cols = {int(t) for t in np.array(draft.vocab_ids)[drawn]} | set(node_tokens.ravel().tolist())
    for ps in prefixes:
        for p in ps:
            cols |= set(np.flatnonzero(np.isfinite(target.rows[p])).tolist())
    cols = np.array(sorted(cols))
    logp = np.full((size, n, cols.size), -np.inf, np.float32)
    for b in range(size):
        logp[b, : len(prefixes[b])] = [target.rows[p][cols] for p in prefixes[b]]
    logq = draft_logq_rows(draft.logq, draft.vocab_ids, q_rows, target.vocab)
    # Control: the drafter's q as if it were not warped by top-k (the draws were).
    raw = draft_logq_rows(_unwarped(draft, step, size), draft.vocab_ids, q_rows, target.vocab)
    u = mx.random.uniform(shape=(size, n, slots.nodes.shape[2] + 1), key=mx.random.split(key)[1])
    where = np.searchsorted(cols, node_tokens)
    outs = []
    for q in (logq, raw):
        q = mx.take(q, mx.array(cols), axis=-1)
        result = accept_batch(where, depths, slots, mx.array(logp), q, u)
        out = []
        for b in range(size):
            k = int(result.num_accepted[b])
            emitted = [g0] + [int(cols[t]) for t in result.tokens[b, : k + 1]]
            while len(emitted) < 3:
                emitted.append(target.sample(tuple(emitted), rng))
            out.append(tuple(emitted[:3]))
        outs.append(out)
    return outs


def _unwarped(draft, step, size):
    """The drafter's plain softmax at the draft's expanded nodes (B, E, K), recomputed."""
    tokens = mx.array(draft.tokens[:, : draft.num_expanded])
    parents = draft.parents[0, : draft.num_expanded]
    # Replay the states level by level: every expanded node's state from its parent's.
    states = [None] * draft.num_expanded
    logits = [None] * draft.num_expanded
    start = step.start(size)  # (B, 1, h)
    for j in range(draft.num_expanded):
        prev = start if parents[j] < 0 else states[parents[j]]
        states[j], logits[j] = step(prev, tokens[:, j : j + 1])
    out = mx.concatenate(logits, axis=1)
    return out - mx.logsumexp(out, axis=-1, keepdims=True)


def _prefix(tree, u):
    """Tokens after the root g0 down to node u, with g0 first."""
    out = []
    while u >= 0:
        out.append(int(tree.tokens[u]))
        u = int(tree.parents[u])
    return tuple(reversed(out))


def test_first_three_tokens_match_plain_sampling(setup):
    model, drafter, ids = setup
    target = Target(model, ids)
    expected = exact(target)
    got, control = rounds(model, drafter, ids, target, seed=1)
    assert chi2_pvalue(_counts(got), expected, len(got)) > ACCEPT_P
    # Control: the same drafts accepted as if q had not been warped (top-k) like the target.
    assert chi2_pvalue(_counts(control), expected, len(control)) < REJECT_P


def _counts(outcomes):
    out = {}
    for k in outcomes:
        out[k] = out.get(k, 0) + 1
    return out
