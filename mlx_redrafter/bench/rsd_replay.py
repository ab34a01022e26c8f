"""Tokens per step of sampled decoding, replayed (`bench --acceptance --temp T`): deterministic
beams against drafts sampled without replacement (RSD) at each tree's verify budget.

Sampled output is not one fixed sequence, so each (prompt, seed) first samples a plain
continuation at the request's temperature; then at every position of it, every draft
configuration drafts a tree from the true context (the hidden state of the last token) and
the round's *expected* number of accepted tokens is computed exactly from the target's
distributions at the tree's nodes (`rsd.expected_accepted`: no acceptance uniforms, so no
acceptance noise; the sampled drafts still vary with the seed). All configurations' trees at
one position are verified in one forward pass over their union. Tokens per step = 1 + the
mean over positions (every position, not only those a real run would start a round at).

With context lookup (`DraftConfig.lookup`), the longest earlier match of the context's
suffix (prompt + the sampled continuation so far, `SuffixIndex`) adds its copied
continuation, cut to the beams' depth (L - 1 tokens), as one more branch of point masses;
`lookup` alone (method LOOKUP_ONLY) is that branch without the drafter. The nodes a tree
really verified are counted per position (`mean_nodes`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..accept import SamplingConfig, dense_logprobs
from ..beam import beam_search
from ..generation import drafter_features, prefill, stream_generate, verify_tree
from ..rsd import (
    BEAM,
    build_round,
    draft_logq_rows,
    draft_sampled,
    expected_accepted,
    point_mass_proposals,
)
from ..suffix_index import SuffixIndex
from ..tree import Tree, pack_beams, pack_sequences

LOOKUP_ONLY = "lookup"  # a DraftConfig method: the lookup branch without the drafter


@dataclass(frozen=True)
class DraftConfig:
    """One way to draft: `method` (beam, sbs, gumbel-topk) with a W x L shape, with or
    without a context-lookup branch (`lookup`); method LOOKUP_ONLY: the lookup branch alone
    (its width counts as one)."""

    method: str
    beam_width: int
    beam_length: int
    lookup: bool = False

    @property
    def branches(self) -> int:
        """Branches of depth L - 1 at most: the drafter's W, plus one for lookup."""
        if self.method == LOOKUP_ONLY:
            return 1
        return self.beam_width + int(self.lookup)

    @property
    def budget(self) -> int:
        """Nodes verified per round at most, the root included: 1 + branches x (L - 1)."""
        return 1 + self.branches * (self.beam_length - 1)

    @property
    def name(self) -> str:
        if self.method == LOOKUP_ONLY:
            return f"{LOOKUP_ONLY}-L{self.beam_length}"
        suffix = "+lookup" if self.lookup else ""
        return f"{self.method}{suffix}-W{self.beam_width}-L{self.beam_length}"


def sampled_reference(model, tokenizer, ids, sampling: SamplingConfig, seed: int, n: int):
    """A plain sampled continuation of `ids` (n tokens or up to EOS)."""
    out = []
    for r in stream_generate(
        model, tokenizer, list(ids), None, max_tokens=n, lookup=False, seed=seed,
        temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
    ):  # fmt: skip
        out.append(r.token)
    return out


def _draft(model, drafter, context, g0: int, config: DraftConfig, sampling, copy: tuple):
    """(tree, proposals, draft or None) of one configuration; `copy` is lookup's branch
    (g0 and the copied tokens; () when nothing matched)."""
    shape = (config.beam_width, config.beam_length)
    with_lookup = config.lookup or config.method == LOOKUP_ONLY
    copies = [copy[: config.beam_length]] if with_lookup and len(copy) > 1 else []
    if config.method == LOOKUP_ONLY:
        tree = pack_sequences(copies or [(g0,)])
        return tree, point_mass_proposals(tree), None
    if config.method == BEAM:
        beams, _ = beam_search(drafter, model, context, g0, *shape)
        beams = np.array(beams)
        tree = pack_sequences([tuple(b) for b in beams] + copies) if copies else pack_beams(beams)
        return tree, point_mass_proposals(tree), None
    draft = draft_sampled(model, drafter, context, g0, config.method, shape, sampling)
    kept = [j for j in range(1, draft.valid.shape[1]) if draft.valid[0, j]]
    tree, proposals = build_round(copies, draft, kept)
    return tree, proposals, draft


def _sequences(tree: Tree) -> list[tuple[int, ...]]:
    return [tuple(int(t) for t in tree.tokens[row[row >= 0]]) for row in tree.paths]


def _prefixes(tree: Tree) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = []
    for u in range(tree.num_nodes):
        p = int(tree.parents[u])
        out.append((int(tree.tokens[u]),) if p < 0 else out[p] + (int(tree.tokens[u]),))
    return out


def replay_positions(
    model,
    drafter,
    ids: Sequence[int],
    ref: Sequence[int],
    configs: Sequence[DraftConfig],
    sampling: SamplingConfig,
    seed: int,
    nodes: dict[str, list[int]] | None = None,
) -> dict[str, list[float]]:
    """Expected accepted tokens per position of `ref` for every configuration (and, into
    `nodes` if given, the nodes each tree verified)."""
    features = drafter_features(drafter)
    cache = model.make_cache()
    context = prefill(model, cache, list(ids), features=features)
    out: dict[str, list[float]] = {c.name: [] for c in configs}
    vocab = drafter.draft_vocab_ids
    support = None if vocab is None else np.array(vocab)
    index = SuffixIndex()
    index.extend(list(ids))
    depth = max(c.beam_length for c in configs) - 1
    for i in range(len(ref) - 1):
        g0 = int(ref[i])
        index.extend([g0])
        found = index.propose(depth, 1)
        copy = (g0,) + found[0].tokens if found else ()
        mx.random.seed(seed * 100_003 + i)
        rounds = [_draft(model, drafter, context, g0, c, sampling, copy) for c in configs]
        union = pack_sequences([s for tree, _, _ in rounds for s in _sequences(tree)])
        hidden, logits = verify_tree(model, cache, union, features)
        logp = dense_logprobs(logits, sampling)
        row_of = {p: u for u, p in enumerate(_prefixes(union))}
        for config, (tree, proposals, draft) in zip(configs, rounds, strict=True):
            rows = mx.array([row_of[p] for p in _prefixes(tree)])
            logq = None
            if draft is not None:
                logq = draft_logq_rows(
                    draft.logq, draft.vocab_ids, proposals.q_rows[None], logits.shape[1]
                )[0]
            expected = expected_accepted(tree, proposals, logp[rows], logq, support)
            out[config.name].append(expected)
            if nodes is not None:
                nodes.setdefault(config.name, []).append(tree.num_nodes)
        context = hidden[0]
        cache.commit(np.array([0], dtype=np.int32))  # keep g0 only: the next position
        mx.eval(context)
    return out


def sampled_acceptance(
    model,
    tokenizer,
    drafter,
    prompts: Sequence[Sequence[int]],
    configs: Sequence[DraftConfig],
    sampling: SamplingConfig,
    seeds: Sequence[int],
    max_tokens: int,
    on_prompt: Callable[[], None] | None = None,
) -> dict:
    """Tokens per step of every configuration, over prompts x seeds: the mean, and the spread
    (standard deviation) of the per-seed means."""
    per_seed = {c.name: {s: [] for s in seeds} for c in configs}
    nodes: dict[str, list[int]] = {}
    for ids in prompts:
        for seed in seeds:
            ref = sampled_reference(model, tokenizer, ids, sampling, seed, max_tokens)
            got = replay_positions(model, drafter, ids, ref, configs, sampling, seed, nodes)
            for name, values in got.items():
                per_seed[name][seed].extend(values)
            if on_prompt is not None:
                on_prompt()
    table = {}
    for c in configs:
        means = [1.0 + float(np.mean(v)) for v in per_seed[c.name].values() if v]
        every = [x for v in per_seed[c.name].values() for x in v]
        table[c.name] = {
            "method": c.method,
            "beam_width": c.beam_width,
            "beam_length": c.beam_length,
            "lookup": c.lookup or c.method == LOOKUP_ONLY,
            "budget": c.budget,
            "mean_nodes": float(np.mean(nodes[c.name])) if nodes.get(c.name) else 0.0,
            "positions": len(every),
            "tokens_per_step": 1.0 + float(np.mean(every)) if every else 1.0,
            "seed_spread": float(np.std(means)) if len(means) > 1 else 0.0,
        }
    return {
        "sampling": {
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
        },
        "seeds": list(seeds),
        "configs": table,
    }


def format_sampled_acceptance(result: dict) -> str:
    """A table: one row per configuration, by budget."""
    s = result["sampling"]
    lines = [
        f"sampled acceptance · temperature {s['temperature']}, top-p {s['top_p']}, "
        f"top-k {s['top_k']} · seeds {','.join(map(str, result['seeds']))}",
        "",
        "| budget | draft | W x L | lookup | mean nodes | tokens/step | spread over seeds |",
        "|---:|---|---|---|---:|---:|---:|",
    ]
    rows = sorted(
        result["configs"].values(),
        key=lambda r: (r["budget"], r.get("lookup", False), r["method"]),
    )
    for r in rows:
        look = "yes" if r.get("lookup") else "no"
        lines.append(
            f"| {r['budget']} | {r['method']} | {r['beam_width']}x{r['beam_length']} | "
            f"{look} | {r.get('mean_nodes', 0.0):.1f} | {r['tokens_per_step']:.3f} | "
            f"{r['seed_spread']:.3f} |"
        )
    return "\n".join(lines)
