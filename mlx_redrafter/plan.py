"""The decode plan: a model's decoding settings, resolved once.

`DecodePlan.resolve` works out the drafter's beam shape (each given value, else the shape
`tune` stored for this device and model, else DEFAULT_BEAM), the context lookup settings, and
the verify-cost curve the tree policy starts from (the stored one, else the device type's
default). The loaders (the CLI's `load_for`, `ChatSession`, the server's engine) build one
when they start, and `stream_generate(..., plan=...)` then reads nothing from `tuned.json`;
without a plan, `stream_generate` builds one per call from its keyword arguments.

What stays per generation: the tree policy (`plan.tree_policy`) learns from one generation's
acceptance, so each generation gets a fresh one from the plan's curve.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlx.core as mx

from . import defaults
from .accept import SamplingConfig
from .distributed import shared_timings
from .errors import GenerationError
from .lookup_memory import ClientMemory
from .rounds import LookupConfig
from .rsd import default_draft_method
from .sizing import TreePolicy, default_cost_curve

# Context lookup when a caller does not say: on (version 2).
DEFAULT_LOOKUP = True


@dataclass(frozen=True)
class DecodePlan:
    """Resolved decoding settings for one model (see the module doc)."""

    beam: tuple[int, int]  # (W, L) of the drafter's beams, L counting the root token
    lookup: LookupConfig | None  # None: context lookup is off
    lookup_max_given: bool  # lookup_max was explicit: copies keep it near the context's end
    cost_curve: tuple[float, ...]  # t(n)/t(1), n = 1..N: where each tree policy starts
    # (W, L) for sampled requests: what `tune --temp` stored, unless a shape was given
    sampled_beam: tuple[int, int] | None = None

    @classmethod
    def resolve(
        cls,
        model,
        beam_width: int | None = None,
        beam_length: int | None = None,
        lookup: bool | LookupConfig | None = None,
        lookup_max: int | None = None,
    ) -> DecodePlan:
        """The plan for `model` (its `source_path` keys what `tune` stored; a path works too)."""
        path = getattr(model, "source_path", None) if not _is_path(model) else model
        beam = _resolve_beam(path, beam_width, beam_length)
        sampled = None
        if beam_width is None and beam_length is None and path is not None:
            sampled = _stored_sampled_beam(path)
        look = resolve_lookup(lookup, lookup_max)
        curve = defaults.load_cost_curve(path) if path is not None else None
        if curve is None:
            curve = default_cost_curve("gpu" if mx.default_device().type == mx.gpu else "cpu")
        curve = tuple(float(r) for r in curve)
        return cls(beam, look, lookup_max is not None, curve, sampled)

    def beam_for(self, sampling: SamplingConfig) -> tuple[int, int]:
        """The drafter's (W, L) for a request: the sampled shape when it samples and `tune`
        stored one, else `beam`."""
        if self.sampled_beam is not None and not sampling.greedy:
            return self.sampled_beam
        return self.beam

    @property
    def beam_width(self) -> int:
        return self.beam[0]

    @property
    def beam_length(self) -> int:
        return self.beam[1]

    @property
    def deepest_beam(self) -> int:
        """The longer beam length of the greedy and the sampled shapes."""
        return max(self.beam_length, self.sampled_beam[1] if self.sampled_beam else 0)

    def lookahead(self, with_drafter: bool) -> int:
        """Cache room a round may write past the context: the deepest tree it can verify."""
        return lookahead_tokens(with_drafter, self.deepest_beam, self.lookup)

    def headroom(self, with_drafter: bool) -> int:
        """Context to keep free past max_tokens so that a request fits: the lookahead with the
        copies `fit_copies` allows at the end of the context (default-length copies shrink to
        8 tokens there; an explicit lookup_max does not shrink)."""
        look = self.lookup
        if look is not None and not self.lookup_max_given:
            look = replace(look, max_tokens=min(8, look.max_tokens))
        return lookahead_tokens(with_drafter, self.deepest_beam, look)

    def draft_method(self, sampling: SamplingConfig, requested: str | None) -> str:
        """The drafter's draft method for a request: the one asked for, else the default rule."""
        if requested is not None:
            return requested
        return default_draft_method(sampling, self.beam_for(sampling)[0])

    def fit_copies(self, context_length, prompt_tokens: int, max_tokens: int):
        """Near the end of the context, default-length copies shrink to the room left (at least
        the 8 tokens of v1) rather than turning the request down; an explicit lookup_max stays."""
        look = self.lookup
        if look is None or self.lookup_max_given or not context_length:
            return look
        room = context_length - prompt_tokens - max_tokens - 1
        if room >= look.max_tokens:
            return look
        return replace(look, max_tokens=max(min(8, look.max_tokens), room))

    def tree_policy(self, model, memory: ClientMemory | None = None) -> TreePolicy:
        """A fresh tree policy for one generation, from the plan's curve; a model split over
        ranks (`model.shard_group`) shares round timings so every rank sizes the same tree;
        with a client's `memory`, it starts from what that client's earlier requests learnt."""
        policy = TreePolicy(self.cost_curve)
        group = getattr(model, "shard_group", None)
        if group is not None:
            policy.share_timings = shared_timings(group)
        if memory is not None:
            policy.calibration.absorb(memory.calibration)
        return policy


def _is_path(model) -> bool:
    return model is None or isinstance(model, (str, bytes)) or hasattr(model, "__fspath__")


def _resolve_beam(path, beam_width, beam_length) -> tuple[int, int]:
    try:
        return defaults.resolve_beam(path, beam_width, beam_length)
    except ValueError as e:
        raise GenerationError(str(e)) from None


def _stored_sampled_beam(path) -> tuple[int, int] | None:
    try:
        stored = defaults.tuned_beam(path, sampled=True)
        return defaults.check_beam(*stored) if stored else None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None  # an unreadable or foreign entry is no reason to fail


def resolve_beam(model, beam_width: int | None, beam_length: int | None) -> tuple[int, int]:
    """The drafter's beam shape for `model` (see defaults.resolve_beam), as GenerationError."""
    return _resolve_beam(getattr(model, "source_path", None), beam_width, beam_length)


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
    """Tree sizing for this model on this device (a plan's policy, resolved now): the curve
    `tune` stored for it, else the device type's default."""
    return DecodePlan.resolve(model, lookup=False).tree_policy(model, memory)
