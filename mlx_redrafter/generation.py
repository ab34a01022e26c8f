"""The response stream: `stream_generate` and `generate` (the Python API).

`stream_generate` checks a request, resolves its decoding settings, reuses or makes the KV
cache, runs a token generator (rounds.py: plain steps or speculative rounds) and turns its
tokens into text: the streaming detokenizer, stop strings, EOS and max_tokens. It yields a
`GenerationResponse` per emitted token; the CLI, chat, server and benchmark all consume it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import mlx.core as mx

from . import defaults
from .accept import SamplingConfig
from .cache import KVCache
from .errors import GenerationError
from .logprobs import LogprobRecorder, TokenLogprob
from .lookup_memory import ClientMemory, LookupMemory
from .plan import (
    DEFAULT_LOOKUP,
    DecodePlan,
    lookahead_tokens,
    resolve_beam,
    resolve_lookup,
    tree_policy,
)
from .prompts import eos_ids
from .rounds import (
    DEFAULT_LOOKUP_VERSION,
    PREFILL_CHUNK,
    DecodeStats,
    LookupConfig,
    Speculation,
    TokenChoice,
    draft_beams,
    drafter_features,
    plain_steps,
    prefill,
    redrafter_steps,
    speculative_round,
    verify_tree,
)
from .rsd import DRAFT_CHOICES
from .sizing import TreePolicy

# Re-exported: the Python API and its users import these from here.
__all__ = [
    "DEFAULT_LOOKUP",
    "DEFAULT_LOOKUP_VERSION",
    "PREFILL_CHUNK",
    "DecodePlan",
    "DecodeStats",
    "GenerateOptions",
    "GenerationError",
    "GenerationResponse",
    "OPTION_DEFAULTS",
    "LookupConfig",
    "SamplingConfig",
    "Speculation",
    "TokenChoice",
    "draft_beams",
    "drafter_features",
    "encode_prompt",
    "generate",
    "lookahead_tokens",
    "plain_steps",
    "prefill",
    "redrafter_steps",
    "resolve_beam",
    "resolve_lookup",
    "speculative_round",
    "stream_generate",
    "tree_policy",
    "verify_tree",
]


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


@dataclass(frozen=True)
class GenerateOptions:
    """The keyword arguments of `stream_generate` (see there), one default each."""

    max_tokens: int = defaults.DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    beam_width: int | None = None
    beam_length: int | None = None
    lookup: bool | LookupConfig | None = None
    lookup_max: int | None = None
    stop: Sequence[str] = ()
    profile: bool = False
    constraint: object | None = None
    logprobs: int | None = None
    draft_method: str | None = None
    lookup_memory: LookupMemory | None = None
    lookup_client: str | None = None

    @classmethod
    def of(cls, options: dict, caller: str = "stream_generate") -> GenerateOptions:
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
        return cls(**options)


# Each option's default, as one object: the CLI, ChatSession and the server's Engine read
# theirs from here (a decoding setting left None is resolved by the DecodePlan).
OPTION_DEFAULTS = GenerateOptions()


@dataclass
class _Run:
    """One generation, set up: the token generator and what its end needs."""

    ids: list[int]  # the whole prompt
    cache: KVCache
    steps: Iterator[list[int]]
    stats: DecodeStats
    sampling: TokenChoice
    drafted: bool  # a drafter proposes: its accepted tokens are `from_draft`
    memory: ClientMemory | None = None
    policy: TreePolicy | None = None


def stream_generate(
    model,
    tokenizer,
    prompt: str | Sequence[int],
    drafter=None,
    *,
    cache: KVCache | None = None,
    plan: DecodePlan | None = None,
    **options,
) -> Iterator[GenerationResponse]:
    """Generate from `prompt` (text or token ids), yielding one response per token.

    `options` are the fields of `GenerateOptions` (max_tokens, temperature, top_p, top_k,
    seed, beam_width, beam_length, lookup, lookup_max, stop, profile, constraint, logprobs,
    draft_method, lookup_memory, lookup_client), as keyword arguments.

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

    A `plan` (`DecodePlan.resolve(model, ...)`, built once for many calls) gives the beam
    shape, lookup settings and verify-cost curve; beam_width, beam_length, lookup and
    lookup_max then stay unset. Without one, a plan is resolved from them for this call.
    """
    opts = GenerateOptions.of(options)
    run = _start(model, tokenizer, prompt, drafter, cache, opts, plan)
    text_out = _TextOut(tokenizer, opts.stop, opts.max_tokens)
    recorder, stats = run.sampling.logprobs, run.stats
    emitted: list[int] = []
    t_first = None
    try:
        for tokens in run.steps:
            for i, token in enumerate(tokens):
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
                    from_draft=run.drafted and i < len(tokens) - 1,
                    stats=stats,
                    logprobs=None if recorder is None else recorder.pop(token),
                )
                if finish:
                    return
    finally:
        _finish(run, emitted)


def _start(
    model, tokenizer, prompt, drafter, cache: KVCache | None, opts: GenerateOptions, plan=None
) -> _Run:
    """Check the request, reuse or make the cache, and start the token generator."""
    recorder = None if opts.logprobs is None else LogprobRecorder(opts.logprobs)
    sampling = TokenChoice(opts.temperature, opts.top_p, opts.top_k, opts.constraint, recorder)
    sampling.validate()
    if opts.constraint is not None:
        _check_constraint(model, opts.constraint)
    max_tokens = opts.max_tokens
    if max_tokens < 1:
        raise GenerationError(f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
    plan = _plan_for(model, opts, plan)
    draft_method = plan.draft_method(sampling, opts.draft_method)
    if draft_method not in DRAFT_CHOICES:
        raise GenerationError(f"draft_method must be one of {DRAFT_CHOICES}, got {draft_method!r}")
    ids = encode_prompt(tokenizer, prompt)
    look = plan.fit_copies(model.context_length, len(ids), max_tokens)
    beam = plan.beam_for(sampling)
    _check_fits(model, len(ids), max_tokens, lookahead_tokens(drafter is not None, beam[1], look))
    if opts.seed is not None:
        mx.random.seed(opts.seed)
    if cache is None:
        cache = model.make_cache()
    new_ids = _reuse_cache(cache, ids)

    stats = DecodeStats(prompt_tokens=len(new_ids))
    memory = None
    if look is not None and look.version == 2 and opts.lookup_memory is not None:
        memory = opts.lookup_memory.client(opts.lookup_client)
    if drafter is None and look is None:
        steps = plain_steps(model, cache, new_ids, sampling, stats)
        return _Run(ids, cache, steps, stats, sampling, drafted=False)
    policy = plan.tree_policy(model, memory) if look is not None else None
    if policy is not None and opts.seed is not None:
        policy.learn_costs = False  # seeded: the same trees, so the same draws, on any machine
    spec = Speculation(drafter, beam, look, policy, draft_method, memory, opts.profile)
    steps = redrafter_steps(model, cache, new_ids, sampling, stats, spec, history=ids)
    return _Run(ids, cache, steps, stats, sampling, drafter is not None, memory, policy)


def _plan_for(model, opts: GenerateOptions, plan: DecodePlan | None) -> DecodePlan:
    """The given plan (with no decoding keywords beside it), else one resolved for this call."""
    given = (opts.beam_width, opts.beam_length, opts.lookup, opts.lookup_max)
    if plan is None:
        return DecodePlan.resolve(model, *given)
    if any(v is not None for v in given):
        raise GenerationError(
            "pass either plan= or beam_width/beam_length/lookup/lookup_max, not both"
        )
    return plan


def _check_constraint(model, constraint) -> None:
    vocab = getattr(getattr(model, "args", None), "vocab_size", constraint.vocab_size)
    if constraint.vocab_size != vocab:
        raise GenerationError(
            f"the constraint was built for {constraint.vocab_size} logits, the model has "
            f"{vocab} (build it with JsonGrammar.for_model)"
        )
    constraint.reset()


def _finish(run: _Run, emitted: list[int]) -> None:
    """Close the generator, remember the request (lookup memory), record the cache's tokens."""
    run.steps.close()
    ids, cache = run.ids, run.cache
    if run.memory is not None:
        run.memory.add(list(ids) + emitted)
        if run.policy is not None:
            run.memory.learn(run.policy.calibration)
    # The cache holds every emitted token but the last (it would be fed next), or less
    # if a prefill was interrupted (Ctrl-C) before all of it was committed.
    cache.hold((list(ids) + emitted[:-1])[: cache.offset])


def _check_fits(model, prompt_tokens: int, max_tokens: int, lookahead: int) -> None:
    limit = model.context_length
    if limit and prompt_tokens + max_tokens + lookahead > limit:
        raise GenerationError(
            f"prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
            f"context length of {limit} tokens",
            param="max_tokens",
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


def _reuse_cache(cache: KVCache, ids: list[int]) -> list[int]:
    """Trim `cache` to its longest common prefix with `ids`; return the ids left to prefill."""
    common = min(cache.common_prefix(ids), len(ids) - 1, cache.offset)  # prefill >= 1 token
    cache.hold(ids[:common])
    return ids[common:]


def generate(model, tokenizer, prompt, drafter=None, **kwargs) -> str:
    """Generate and return the whole text (see `stream_generate` for the arguments)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, drafter, **kwargs))
