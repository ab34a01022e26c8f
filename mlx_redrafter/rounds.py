"""The decoding loops as token generators: prefill, plain steps, and the speculative round.

`plain_steps` yields one token per step; `redrafter_steps` yields, per round, the accepted
drafted tokens plus the target's own token. A round (`speculative_round`): lookup and draft
candidates, select (sizing.py), pack (tree.py), verify (one tree-attention forward), accept
(accept.py, rsd.py), commit (cache.py). generation.py turns these tokens into text.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .accept import SamplingConfig, greedy_accept, sample_accept, sample_token
from .beam import beam_search
from .cache import KVCache
from .errors import GenerationError
from .logprobs import LogprobRecorder
from .lookup import ContextIndex
from .lookup_memory import ClientMemory
from .rsd import BEAM, accepted_keys, build_round, draft_sampled, rsd_accept, split_choice
from .sizing import (
    DRAFTER,
    MEMORY,
    TreePolicy,
    copy_candidate,
    credit_sources,
    drafter_candidates,
    lookup_candidate,
    sampled_candidates,
)
from .suffix_index import SuffixIndex
from .tree import Tree, pack_sequences

DEFAULT_LOOKUP_VERSION = 2

PREFILL_CHUNK = 512


@dataclass(frozen=True)
class TokenChoice(SamplingConfig):
    """The sampling rule (SamplingConfig: what acceptance and drafting take) plus what a
    generation keeps about each choice: `constraint`, a grammar (constrain.py) that masks the
    logits before the choice and prunes candidates; `logprobs`, a LogprobRecorder fed the
    logits of each choice."""

    constraint: object | None = None
    logprobs: LogprobRecorder | None = None

    @classmethod
    def of(cls, sampling: SamplingConfig) -> TokenChoice:
        """`sampling` as a TokenChoice (a plain SamplingConfig keeps nothing extra)."""
        if isinstance(sampling, cls):
            return sampling
        return cls(sampling.temperature, sampling.top_p, sampling.top_k)


@dataclass
class DecodeStats:
    """What a run did; updated in place while it runs."""

    prompt_tokens: int = 0
    prefill_time: float = 0.0
    num_tokens: int = 0
    decode_time: float = 0.0  # from the first generated token to the last
    steps: int = 0  # base-model decode steps (plain) or verify rounds (ReDrafter)
    accepted: list[int] = field(default_factory=list)  # drafted tokens accepted per round
    beam_length: int = 1
    beam_width: int = 1  # the drafter's beam shape this run used (W, L)
    draft_time: float = 0.0  # the drafter's beam search
    # The verify forward. It runs lazily, inside acceptance's host sync, so without profile
    # that sync counts here and accept_time stays 0; with profile it is evaluated on its own.
    verify_time: float = 0.0
    accept_time: float = 0.0  # acceptance and the cache commit (measured with profile only)
    tree_nodes: int = 0
    nodes: list[int] = field(default_factory=list)  # verified nodes per round
    drafter_rounds: int = 0  # rounds in which the drafter ran
    accepted_from: dict[str, int] = field(default_factory=dict)  # accepted tokens per source

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_time if self.prefill_time > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        # The first token comes out of prefill; the decode rate counts the ones after it.
        n = self.num_tokens - 1
        return n / self.decode_time if self.decode_time > 0 and n > 0 else 0.0

    @property
    def tokens_per_step(self) -> float:
        if not self.accepted:
            return 1.0
        return float(np.mean(self.accepted)) + 1.0

    @property
    def accept_by_depth(self) -> list[float]:
        """Fraction of rounds that accepted a drafted token at depth 1, 2, ... L-1."""
        if not self.accepted or self.beam_length < 2:
            return []
        acc = np.asarray(self.accepted)
        return [float(np.mean(acc >= d)) for d in range(1, self.beam_length)]

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "num_tokens": self.num_tokens,
            "prefill_tps": self.prefill_tps,
            "decode_tps": self.decode_tps,
            "tokens_per_step": self.tokens_per_step,
            "accept_by_depth": self.accept_by_depth,
            "steps": self.steps,
            "draft_time": self.draft_time,
            "verify_time": self.verify_time,
            "accept_time": self.accept_time,
            "mean_tree_nodes": self.tree_nodes / max(1, len(self.accepted)),
            "drafter_rounds": self.drafter_rounds,
            "accepted_from": dict(self.accepted_from),
        }


def _sample(logits: mx.array, sampling: SamplingConfig) -> mx.array:
    """logits (V,) -> token id (scalar array); the same warping as the acceptance rule.

    Under a constraint the forbidden tokens are masked first (and the state moves past the
    choice: one host sync); the choice's logprobs are recorded from the unmasked logits.
    """
    constraint = getattr(sampling, "constraint", None)
    if constraint is None:
        token = sample_token(logits, sampling)
    else:
        mx.async_eval(logits)  # the forward runs while the host computes the mask
        token = sample_token(constraint.mask_logits(logits), sampling)
        constraint.advance([token.item()])
    recorder = getattr(sampling, "logprobs", None)
    if recorder is not None:
        recorder.record(logits[None], token[None])
    return token


def prefill(
    model,
    cache: KVCache,
    tokens: Sequence[int],
    chunk: int = PREFILL_CHUNK,
    features: Sequence[int] = (),
) -> mx.array:
    """Run the prompt through the model into the cache; return the last hidden state (h,),
    with the `features` layers' states appended (a multi-layer drafter's context)."""
    hidden = None
    for start in range(0, len(tokens), chunk):
        part = mx.array(tokens[start : start + chunk], dtype=mx.int32)[None]
        last = start + chunk >= len(tokens)
        hidden, _ = model(part, cache, return_logits=False, features=features if last else ())
        cache.commit()
        if start + chunk < len(tokens):
            mx.eval(cache.state())
    return hidden[0, -1]


def plain_steps(
    model,
    cache: KVCache,
    prompt: Sequence[int],
    sampling: SamplingConfig,
    stats: DecodeStats,
) -> Iterator[list[int]]:
    """Autoregressive decoding; yields [token] per step. The cache holds all but the last."""
    sampling = TokenChoice.of(sampling)
    t0 = time.perf_counter()
    hidden = prefill(model, cache, prompt)
    token = _sample(model.logits(hidden).astype(mx.float32), sampling)
    mx.eval(token)
    stats.prefill_time = time.perf_counter() - t0

    def step(tok: mx.array) -> mx.array:
        _, logits = model(tok.reshape(1, 1), cache)
        cache.commit()
        return _sample(logits[0, -1].astype(mx.float32), sampling)

    # Pipelining as mlx-lm does: queue step n+1 before handing out token n.
    while True:
        nxt = step(token)
        mx.async_eval(nxt)
        yield [token.item()]
        stats.steps += 1
        token = nxt


def draft_beams(
    model, drafter, context: mx.array, g0: int, beam_width: int, beam_length: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """The drafter's beams (W, L) and their prefix log-probs (W, L) or None, on the host.

    A drafter object may bring its own `propose(model, context, g0, W, L) -> (beams, scores)`
    (tests use oracle drafters; they give no per-node estimates); otherwise the RNN drafter's
    beam search runs.
    """
    propose = getattr(drafter, "propose", None)
    if propose is None:
        beams, _, prefix = beam_search(
            drafter, model, context, g0, beam_width, beam_length, prefix_scores=True
        )
        mx.eval(beams, prefix)
        return np.array(beams), np.array(prefix)
    beams, _ = propose(model, context, g0, beam_width, beam_length)
    return np.array(beams), None


def drafter_features(drafter) -> tuple[int, ...]:
    """The base layers a drafter's context carries besides the last (none for no drafter,
    an Apple-layout drafter, or a drafter object of another kind)."""
    return tuple(getattr(drafter, "feature_layers", ()) or ())


def verify_tree(
    model, cache: KVCache, tree: Tree, features: Sequence[int] = ()
) -> tuple[mx.array, mx.array]:
    """One base forward over the packed nodes: hidden (N, h) and float32 logits (N, V);
    with `features`, hidden carries those layers' states too (from this same pass).

    Node u sits at position offset + depth(u) and attends to the committed cache and to its
    ancestors; its K/V are written at offset + u until `cache.commit` keeps the accepted path.
    """
    tokens = mx.array(tree.tokens, dtype=mx.int32)[None]
    positions = mx.array(tree.positions(cache.offset), dtype=mx.int32)[None]
    hidden, logits = model(
        tokens, cache, positions, tree.attention_mask(cache.offset), features=features
    )
    return hidden[0], logits[0].astype(mx.float32)


@dataclass
class LookupConfig:
    """Context lookup: continuations of the longest earlier match of the context's suffix.

    version 2 (the default): `SuffixIndex`, long copies weighted by agreement, and candidates
    from earlier requests when a `LookupMemory` is given; version 1: `ContextIndex` (n-gram
    continuations of at most 8 tokens; kept for comparison)."""

    max_tokens: int = 32  # longest copied continuation
    min_match: int = 2
    max_match: int = 8
    max_candidates: int = 3
    version: int = DEFAULT_LOOKUP_VERSION

    @classmethod
    def v1(cls) -> LookupConfig:
        return cls(max_tokens=8, max_candidates=2, version=1)

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise GenerationError(f"lookup max tokens must be >= 1, got {self.max_tokens}")
        if self.version not in (1, 2):
            raise GenerationError(f"lookup version must be 1 or 2, got {self.version}")
        if not 1 <= self.min_match <= self.max_match:
            raise GenerationError(
                f"lookup match lengths must satisfy 1 <= min <= max, got "
                f"{self.min_match} and {self.max_match}"
            )


@dataclass
class Speculation:
    """What a speculative generation fixes before its first round: where candidates come
    from and how a round's tree is chosen."""

    drafter: object | None = None
    beam: tuple[int, int] = (1, 3)  # (W, L) of the drafter's beams
    lookup: LookupConfig | None = None
    policy: TreePolicy | None = None  # None: verify every drafter beam as drafted
    draft_method: str = BEAM  # when sampling: beams or a sampled draft (rsd.py)
    memory: ClientMemory | None = None  # earlier requests (lookup v2 only)
    profile: bool = False  # evaluate the verify forward on its own (exact time split)


class _RoundState:
    """What a speculative generation carries between rounds."""

    def __init__(self, spec: Speculation, history: Sequence[int]):
        drafter, lookup = spec.drafter, spec.lookup
        self.profile = spec.profile
        self.drafter = drafter
        self.draft_method = BEAM
        if drafter is not None and getattr(drafter, "propose", None) is None:
            self.draft_method = spec.draft_method  # sampled drafts need the RNN drafter's q
        self.features = drafter_features(drafter)
        self.beam = spec.beam
        self.lookup = lookup
        self.policy = spec.policy
        self.index = None
        self.memory: ClientMemory | None = spec.memory
        if lookup is not None:
            kind = SuffixIndex if lookup.version == 2 else ContextIndex
            self.index = kind(lookup.min_match, lookup.max_match)
            self.index.extend(history)


def speculative_round(model, cache: KVCache, state: _RoundState, context, g0, sampling, stats):
    """draft -> lookup -> select -> pack -> verify -> accept -> commit; returns (tokens, new
    context). The tree holds the nodes worth their verify cost on this device (all drafter
    beams when there is no sizing policy)."""
    sampling = TokenChoice.of(sampling)
    t0 = time.perf_counter()
    policy = state.policy
    candidates = _allowed(sampling, lookup_candidates(state, g0), g0)  # lookup
    with_drafter = state.drafter is not None and (policy is None or policy.want_drafter(candidates))
    draft = None
    sampled_draft = state.draft_method != BEAM and not sampling.greedy
    if with_drafter and sampled_draft and sampling.constraint is None:  # draft (RSD)
        draft = draft_sampled(
            model, state.drafter, context, g0, state.draft_method, state.beam, sampling
        )
        candidates = sampled_candidates(draft) + candidates
    elif with_drafter:  # draft
        beams, prefix = draft_beams(model, state.drafter, context, g0, *state.beam)
        candidates = _allowed(sampling, drafter_candidates(beams, prefix)) + candidates
    t_draft = time.perf_counter()
    if policy is None:  # select
        choice = None
        sequences = [c.tokens for c in candidates] or [(g0,)]
    else:
        choice = policy.select(candidates, with_drafter) if candidates else None
        sequences = choice.sequences if choice else [(g0,)]
    proposals = None
    if draft is None:  # pack
        tree = pack_sequences(sequences)
    else:
        det, kept = split_choice(sequences, draft)
        tree, proposals = build_round(det, draft, kept)
    hidden, logits = verify_tree(model, cache, tree, state.features)  # verify
    if state.profile:
        mx.eval(hidden, logits)
    t_verify = time.perf_counter()
    target = logits if sampling.constraint is None else _mask_tree(sampling, tree, logits)
    if sampling.greedy:  # accept
        result = greedy_accept(tree, target)
    elif proposals is not None and proposals.any_sampled:
        result = rsd_accept(tree, proposals, target, sampling, draft)
    else:
        result = sample_accept(tree, target, sampling)
    path = np.asarray(result.path)
    _after_accept(sampling, logits, path, result.tokens)
    cache.commit(path)  # commit
    t_end = time.perf_counter()

    accepted = [tuple(int(t) for t in tree.tokens[path[: k + 1]]) for k in range(1, len(path))]
    if policy is not None:
        keys = accepted if proposals is None else accepted_keys(tree, proposals, path, draft)
        policy.observe(choice, keys, with_drafter)
        if with_drafter:
            policy.observe_times(t_draft - t0, t_end - t_draft, tree.num_nodes)
    credit = credit_sources(choice, accepted) if choice else {DRAFTER: len(accepted)}
    for source, n in credit.items():
        if n:
            stats.accepted_from[source] = stats.accepted_from.get(source, 0) + n
    if state.index is not None:
        state.index.extend(result.tokens)
    stats.draft_time += t_draft - t0
    if state.profile:
        stats.verify_time += t_verify - t_draft
        stats.accept_time += t_end - t_verify
    else:  # the forward runs lazily inside accept's host sync: that time is verify time
        stats.verify_time += t_end - t_draft
    stats.steps += 1
    stats.drafter_rounds += int(with_drafter)
    stats.tree_nodes += tree.num_nodes
    stats.nodes.append(tree.num_nodes)
    stats.accepted.append(len(path) - 1)
    return [int(t) for t in result.tokens], hidden[int(path[-1])]


def _allowed(sampling: SamplingConfig, candidates: list, g0: int | None = None) -> list:
    """Candidates cut before the first token the constraint forbids (never verified); with
    the root g0, also the continuation the grammar forces from it."""
    if sampling.constraint is None:
        return candidates
    forced = [] if g0 is None else sampling.constraint.forced(g0)
    return sampling.constraint.prune(candidates + forced)


def _mask_tree(sampling: SamplingConfig, tree: Tree, logits: mx.array) -> mx.array:
    """Verify logits with each node's forbidden tokens at -inf, for the tokens on its path.
    The forward runs while the host computes the masks."""
    mx.async_eval(logits)
    return sampling.constraint.mask_tree(tree, logits)


def _after_accept(sampling: SamplingConfig, logits: mx.array, path, tokens: list[int]) -> None:
    """Record the emitted tokens' logprobs (row path[i] predicted tokens[i]) and move the
    constraint past them."""
    if sampling.logprobs is not None:
        sampling.logprobs.record(logits[mx.array(path)], tokens)
    if sampling.constraint is not None:
        sampling.constraint.advance(tokens)


def lookup_candidates(state: _RoundState, g0: int) -> list:
    """Continuations copied from the context (which ends with g0), as sizing candidates."""
    if state.index is None:
        return []
    look = state.lookup
    found = state.index.propose(look.max_tokens, look.max_candidates)
    if look.version == 1:
        return [lookup_candidate(g0, c.tokens, c.match_len) for c in found]
    out = [copy_candidate(g0, c.tokens, c.match_len, c.support) for c in found]
    if state.memory is not None:
        query = state.index.tail(state.memory.index.max_extend)
        found = state.memory.index.propose(look.max_tokens, look.max_candidates, query)
        out += [copy_candidate(g0, c.tokens, c.match_len, c.support, MEMORY) for c in found]
    return out


def redrafter_steps(
    model,
    cache: KVCache,
    prompt: Sequence[int],
    sampling: SamplingConfig,
    stats: DecodeStats,
    spec: Speculation,
    history: Sequence[int] | None = None,
) -> Iterator[list[int]]:
    """Speculative decoding: prefill, then rounds (`speculative_round`) until closed.

    Candidates come from the drafter (if any) and from context lookup (if `spec.lookup`);
    with a `spec.policy` each round verifies the nodes worth their cost. Each round yields
    the accepted drafted tokens followed by the target's own next token. State between
    rounds: `g0`, emitted but not yet in the cache, and `context`, the post-norm hidden state
    of the last committed token. `history` is the whole context before `prompt` + `prompt`
    (for lookup; default `prompt`). With spec.profile the verify forward is evaluated on its
    own so the time split is exact (one more sync per round).
    """
    sampling = TokenChoice.of(sampling)
    stats.beam_width, stats.beam_length = spec.beam
    t0 = time.perf_counter()
    context = prefill(model, cache, prompt, features=drafter_features(spec.drafter))
    g0 = _sample(model.logits(context).astype(mx.float32), sampling)
    mx.eval(g0, context)
    g0 = g0.item()
    stats.prefill_time = time.perf_counter() - t0
    yield [g0]

    state = _RoundState(spec, list(prompt if history is None else history) + [g0])
    while True:
        tokens, context = speculative_round(model, cache, state, context, g0, sampling, stats)
        g0 = tokens[-1]
        yield tokens
