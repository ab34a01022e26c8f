"""Decoding loops: plain autoregression and ReDrafter rounds, one response stream for both.

`stream_generate` yields a `GenerationResponse` per emitted token whichever loop produced it;
the CLI, chat and benchmark all consume that stream. Token generators (`plain_steps`,
`redrafter_steps`) yield lists of tokens: one per step for plain decoding, the accepted run
plus the target's own token for a ReDrafter round.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import mlx.core as mx
import numpy as np

from . import defaults
from .accept import SamplingConfig, greedy_accept, sample_accept, sample_token
from .cache import KVCache
from .defaults import load_cost_curve
from .distributed import shared_timings
from .drafter import beam_search
from .errors import GenerationError
from .logprobs import LogprobRecorder, TokenLogprob
from .lookup import ContextIndex
from .lookup_memory import ClientMemory, LookupMemory
from .prompts import eos_ids
from .rsd import (
    BEAM,
    DRAFT_CHOICES,
    accepted_keys,
    build_round,
    default_draft_method,
    draft_sampled,
    rsd_accept,
    split_choice,
)
from .sizing import (
    DRAFTER,
    MEMORY,
    TreePolicy,
    copy_candidate,
    credit_sources,
    default_cost_curve,
    drafter_candidates,
    lookup_candidate,
    sampled_candidates,
)
from .suffix_index import SuffixIndex
from .tree import Tree, pack_sequences

DEFAULT_LOOKUP = True
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


@dataclass
class GenerationResponse:
    text: str  # new text since the previous response
    token: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: str | None  # None while running, then "stop" or "length"
    from_draft: bool = False  # the token was drafted and accepted
    stats: DecodeStats | None = None
    logprobs: TokenLogprob | None = None  # when asked for: the token's log-probability


# ---------------------------------------------------------------------------------------------
# Token generators


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


class _RoundState:
    """What a speculative generation carries between rounds."""

    def __init__(
        self, drafter, beam, lookup: LookupConfig | None, policy, history, profile, memory=None
    ):
        self.profile = profile  # evaluate the verify forward on its own (exact time split)
        self.drafter = drafter
        self.draft_method = BEAM  # when sampling: beams or a sampled draft (rsd.py)
        self.features = drafter_features(drafter)
        self.beam = beam  # (W, L) for the drafter
        self.lookup = lookup
        self.policy = policy  # TreePolicy, or None: verify every drafter beam as drafted
        self.index = None
        self.memory: ClientMemory | None = memory  # earlier requests (lookup v2 only)
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
    drafter,
    cache: KVCache,
    prompt: Sequence[int],
    sampling: SamplingConfig,
    stats: DecodeStats,
    beam_width: int,
    beam_length: int,
    profile: bool = False,
    lookup: LookupConfig | None = None,
    policy: TreePolicy | None = None,
    history: Sequence[int] | None = None,
    draft_method: str = BEAM,
    memory: ClientMemory | None = None,
) -> Iterator[list[int]]:
    """Speculative decoding: prefill, then rounds (`speculative_round`) until closed.

    Candidates come from the drafter (if any) and from context lookup (if `lookup`); with a
    `policy` each round verifies the nodes worth their cost. Each round yields the accepted
    drafted tokens followed by the target's own next token. State between rounds: `g0`,
    emitted but not yet in the cache, and `context`, the post-norm hidden state of the last
    committed token. `history` is the whole context before `prompt` + `prompt` (for lookup;
    default `prompt`). With profile=True the verify forward is evaluated on its own so the
    time split is exact (one more sync per round).
    """
    sampling = TokenChoice.of(sampling)
    stats.beam_length = beam_length
    t0 = time.perf_counter()
    context = prefill(model, cache, prompt, features=drafter_features(drafter))
    g0 = _sample(model.logits(context).astype(mx.float32), sampling)
    mx.eval(g0, context)
    g0 = g0.item()
    stats.prefill_time = time.perf_counter() - t0
    yield [g0]

    history = list(prompt if history is None else history) + [g0]
    state = _RoundState(
        drafter, (beam_width, beam_length), lookup, policy, history, profile, memory
    )
    if drafter is not None and getattr(drafter, "propose", None) is None:
        state.draft_method = draft_method  # sampled drafts need the RNN drafter's q
    while True:
        tokens, context = speculative_round(model, cache, state, context, g0, sampling, stats)
        g0 = tokens[-1]
        yield tokens


# ---------------------------------------------------------------------------------------------
# Front end


class _StopMatcher:
    """Finds stop strings in streamed text, holding back what could be the start of one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, segment: str) -> tuple[str, bool]:
        """Returns (text safe to emit, stopped)."""
        self.pending += segment
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self.pending[: min(hits)]
            self.pending = ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def encode_prompt(tokenizer, prompt: str | Sequence[int]) -> list[int]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise GenerationError("the prompt is empty")
        ids = tokenizer.encode(prompt)
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise GenerationError("the prompt is empty")
    return ids


def stream_generate(
    model,
    tokenizer,
    prompt: str | Sequence[int],
    drafter=None,
    *,
    max_tokens: int = defaults.DEFAULT_MAX_TOKENS,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    beam_width: int | None = None,
    beam_length: int | None = None,
    lookup: bool | LookupConfig | None = None,
    lookup_max: int | None = None,
    stop: Sequence[str] = (),
    cache: KVCache | None = None,
    profile: bool = False,
    constraint=None,
    logprobs: int | None = None,
    draft_method: str | None = None,
    lookup_memory: LookupMemory | None = None,
    lookup_client: str | None = None,
) -> Iterator[GenerationResponse]:
    """Generate from `prompt` (text or token ids), yielding one response per token.

    Speculative decoding (exact: greedy output is identical to plain greedy decoding, and
    sampled output has the same distribution) with candidates from `drafter` (ReDrafter beams
    of `beam_width` x `beam_length`, default: the tuned shape, else 1 x 3) and from context
    lookup (`lookup`, default on; continuations of up to `lookup_max` tokens copied from
    earlier in the context). With both sources, or lookup alone, each round verifies the
    nodes worth their cost on this device; with neither, plain decoding. Pass a `cache`
    (from `model.make_cache()`) to keep the KV cache across calls; it must then hold a
    prefix of `prompt` (its `tokens` attribute records what it holds).

    `constraint` (constrain.JsonGrammar(...).json_schema(schema), .json_object()) restricts
    the output to a grammar, exactly and still speculatively; it is reset here, so it serves
    one generation at a time. `logprobs` (None: off; k >= 0) puts on each response the
    token's log-probability and the k most likely tokens, from the logits that chose it.

    When sampling, the drafter's children are drawn without replacement from its own
    distribution (`draft_method` "sbs" or "gumbel-topk"; "beam" for deterministic beams;
    default: the best measured for sampling) and verified by recursive rejection sampling
    (rsd.py). Under a `constraint` the drafter drafts beams (a pruned sampled child would
    change the rejection residual; a pruned point mass does not).

    With a `lookup_memory`, lookup also copies from the earlier requests of `lookup_client`
    (one bounded corpus per client), and this request's prompt and output are remembered for
    its next ones; output is unchanged, only the speed is.
    """
    recorder = None if logprobs is None else LogprobRecorder(logprobs)
    sampling = TokenChoice(temperature, top_p, top_k, constraint, recorder)
    sampling.validate()
    if constraint is not None:
        vocab = getattr(getattr(model, "args", None), "vocab_size", constraint.vocab_size)
        if constraint.vocab_size != vocab:
            raise GenerationError(
                f"the constraint was built for {constraint.vocab_size} logits, the model has "
                f"{vocab} (build it with JsonGrammar.for_model)"
            )
        constraint.reset()
    if max_tokens < 1:
        raise GenerationError(f"max_tokens must be >= 1, got {max_tokens}")
    beam_width, beam_length = resolve_beam(model, beam_width, beam_length)
    if draft_method is None:
        draft_method = default_draft_method(sampling, beam_width)
    if draft_method not in DRAFT_CHOICES:
        raise GenerationError(f"draft_method must be one of {DRAFT_CHOICES}, got {draft_method!r}")
    look = resolve_lookup(lookup, lookup_max)
    ids = encode_prompt(tokenizer, prompt)
    look = _fit_copies(model, look, len(ids), max_tokens, lookup_max)
    _check_fits(
        model, len(ids), max_tokens, lookahead_tokens(drafter is not None, beam_length, look)
    )
    if seed is not None:
        mx.random.seed(seed)
    if cache is None:
        cache = model.make_cache()
        cache.tokens = []
    new_ids = _reuse_cache(cache, ids)

    stats = DecodeStats(prompt_tokens=len(new_ids))
    memory, policy = None, None
    if look is not None and look.version == 2 and lookup_memory is not None:
        memory = lookup_memory.client(lookup_client)
    if drafter is None and look is None:
        steps = plain_steps(model, cache, new_ids, sampling, stats)
    else:
        policy = tree_policy(model, memory) if look is not None else None
        steps = redrafter_steps(
            model, drafter, cache, new_ids, sampling, stats, beam_width, beam_length, profile,
            lookup=look, policy=policy, history=ids, draft_method=draft_method,
            memory=memory,
        )  # fmt: skip

    text_out = _TextOut(tokenizer, stop, max_tokens)
    emitted: list[int] = []
    t_first = None
    try:
        for run in steps:
            for i, token in enumerate(run):
                emitted.append(token)
                now = time.perf_counter()
                t_first = now if t_first is None else t_first
                stats.num_tokens = len(emitted)
                stats.decode_time = now - t_first
                text, finish = text_out.add(token, len(emitted))
                yield GenerationResponse(
                    text=text,
                    token=token,
                    prompt_tokens=stats.prompt_tokens,
                    prompt_tps=stats.prefill_tps,
                    generation_tokens=len(emitted),
                    generation_tps=stats.decode_tps,
                    peak_memory=mx.get_peak_memory() / 1e9,
                    finish_reason=finish,
                    from_draft=drafter is not None and i < len(run) - 1,
                    stats=stats,
                    logprobs=None if recorder is None else recorder.pop(token),
                )
                if finish:
                    return
    finally:
        steps.close()
        if memory is not None:
            memory.add(list(ids) + emitted)
            if policy is not None:
                memory.learn(policy.calibration)
        # The cache holds every emitted token but the last (it would be fed next), or less
        # if a prefill was interrupted (Ctrl-C) before all of it was committed.
        cache.tokens = (list(ids) + emitted[:-1])[: cache.offset]
        cache.trim(cache.offset - len(cache.tokens))


def _fit_copies(model, look, prompt_tokens: int, max_tokens: int, lookup_max) -> LookupConfig:
    """Near the end of the context, default-length copies shrink to the room left (at least
    the 8 tokens of v1) rather than turning the request down; an explicit lookup_max stays."""
    limit = model.context_length
    if look is None or lookup_max is not None or not limit:
        return look
    room = limit - prompt_tokens - max_tokens - 1
    if room >= look.max_tokens:
        return look
    return replace(look, max_tokens=max(min(8, look.max_tokens), room))


def _check_fits(model, prompt_tokens: int, max_tokens: int, lookahead: int) -> None:
    limit = model.context_length
    if limit and prompt_tokens + max_tokens + lookahead > limit:
        raise GenerationError(
            f"prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
            f"context length of {limit} tokens"
        )


class _TextOut:
    """Tokens -> text pieces: the streaming detokenizer, stop strings, EOS and max_tokens
    decide each token's text and whether it ends the generation ("stop", "length")."""

    def __init__(self, tokenizer, stop: Sequence[str], max_tokens: int):
        self.eos = eos_ids(tokenizer)
        self.detok = tokenizer.detokenizer
        self.detok.reset()
        self.matcher = _StopMatcher(stop)
        self.max_tokens = max_tokens

    def add(self, token: int, count: int) -> tuple[str, str | None]:
        """The text `token` (the `count`-th) adds, and the finish reason if it is the last."""
        detok, matcher = self.detok, self.matcher
        if token in self.eos:
            detok.finalize()
            return matcher.feed(detok.last_segment)[0] + matcher.flush(), "stop"
        detok.add_token(token)
        text, stopped = matcher.feed(detok.last_segment)
        if stopped:
            return text, "stop"
        if count >= self.max_tokens:
            detok.finalize()
            return text + matcher.feed(detok.last_segment)[0] + matcher.flush(), "length"
        return text, None


def resolve_beam(model, beam_width: int | None, beam_length: int | None) -> tuple[int, int]:
    """The drafter's beam shape for `model` (see defaults.resolve_beam), as GenerationError."""
    try:
        return defaults.resolve_beam(getattr(model, "source_path", None), beam_width, beam_length)
    except ValueError as e:
        raise GenerationError(str(e)) from None


def lookahead_tokens(with_drafter: bool, beam_length: int, lookup: LookupConfig | None) -> int:
    """Cache room a round may write past the context: the deepest tree it can verify."""
    extra = 1
    if with_drafter:
        extra = max(extra, beam_length)
    if lookup is not None:
        extra = max(extra, lookup.max_tokens + 1)
    return extra


def resolve_lookup(
    lookup: bool | LookupConfig | None, lookup_max: int | None
) -> LookupConfig | None:
    """Context lookup settings, or None when it is off (default: on, version 2)."""
    if isinstance(lookup, LookupConfig):
        lookup.validate()
        return lookup
    if lookup is None:
        lookup = DEFAULT_LOOKUP
    if not lookup:
        return None
    config = LookupConfig() if lookup_max is None else LookupConfig(max_tokens=lookup_max)
    config.validate()
    return config


def tree_policy(model, memory: ClientMemory | None = None) -> TreePolicy:
    """Tree sizing for this model on this device: the verify-cost curve `tune` stored for it,
    else the default curve of the device type; with a client's `memory`, starting from what
    its earlier requests learnt about copies from that memory."""
    curve = load_cost_curve(getattr(model, "source_path", None))
    if curve is None:
        curve = default_cost_curve("gpu" if mx.default_device().type == mx.gpu else "cpu")
    policy = TreePolicy(curve)
    group = getattr(model, "shard_group", None)
    if group is not None:  # split over ranks: every rank sizes the same tree
        policy.share_timings = shared_timings(group)
    if memory is not None:
        policy.calibration.absorb(memory.calibration)
    return policy


def _reuse_cache(cache: KVCache, ids: list[int]) -> list[int]:
    """Trim `cache` to its longest common prefix with `ids`; return the ids left to prefill."""
    held = getattr(cache, "tokens", None) or []
    common = 0
    for a, b in zip(held, ids, strict=False):
        if a != b:
            break
        common += 1
    common = min(common, len(ids) - 1, cache.offset)  # prefill at least one token
    cache.trim(cache.offset - common)
    cache.tokens = list(ids[:common])
    return ids[common:]


def generate(model, tokenizer, prompt, drafter=None, **kwargs) -> str:
    """Generate and return the whole text (see `stream_generate` for the arguments)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, drafter, **kwargs))
