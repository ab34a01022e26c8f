"""Tokens per step for many beam shapes from one plain greedy decode per prompt (`bench
--acceptance`), and the plain greedy references themselves (the harness answers earlier turns
of a conversation with them).

Greedy ReDrafter emits exactly the plain greedy sequence, so how much a round accepts depends
only on the drafter and that sequence: a round at position i drafts from the hidden state of
the last committed token and g0 = ref[i], and the greedy tree walk accepts the longest beam
prefix that matches ref[i+1:]. Replaying the rounds against the reference gives each shape's
tokens per step without a verify pass (the hidden states come from one teacher-forced
forward, equal to the verify pass's up to float rounding). Timing still needs real runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import mlx.core as mx
import numpy as np

from ..batch import generate_batch
from ..beam import beam_search
from ..generation import drafter_features, stream_generate
from ..prompts import eos_ids

DEFAULT_BATCH = 32  # prompts decoded together for the references


def reference_decode(
    model, tokenizer, ids: Sequence[int], max_tokens: int, lookahead: int, features=()
):
    """Plain greedy tokens (max_tokens + lookahead of them, or up to EOS) and hidden states
    (with the `features` layers' states: a multi-layer drafter's context)."""
    ref = []
    finish = None
    for r in stream_generate(
        model, tokenizer, list(ids), None, max_tokens=max_tokens + lookahead, lookup=False
    ):
        ref.append(r.token)
        if r.finish_reason == "stop" and len(ref) <= max_tokens:
            finish = len(ref)
    limit = finish if finish is not None else max_tokens
    seq = mx.array([list(ids) + ref], dtype=mx.int32)
    hidden, _ = model(seq, return_logits=False, features=features)
    return ref, min(limit, len(ref)), hidden[0]


def reference_batch(model, tokenizer, prompts, max_tokens: int, lookahead: int, features=()):
    """reference_decode for many prompts at once through batched greedy generation (the
    training data generator: continuous batching, the hidden states kept as they come).
    Yields (ref, limit, hidden) with hidden[k] the state before ref[k], i.e. prompt_len 1."""
    stop = eos_ids(tokenizer)  # as stream_generate
    out = generate_batch(
        model, prompts, max_tokens + lookahead, stop, DEFAULT_BATCH, features=features
    )
    for ref, hidden in out:
        ends = [i + 1 for i, t in enumerate(ref) if t in stop]
        limit = ends[0] if ends and ends[0] <= max_tokens else max_tokens
        yield ref, min(limit, len(ref)), mx.array(hidden)


def replay_rounds(
    drafter, model, hidden: mx.array, prompt_len: int, ref: list[int], limit: int, W: int, L: int
) -> list[int]:
    """Drafted tokens accepted in each round of a greedy ReDrafter run that emits `limit`."""
    accepted = []
    pos = 0  # index in ref of the round's g0 (emitted, not yet committed)
    while pos + 1 < limit:
        context = hidden[prompt_len - 1 + pos]
        beams, _ = beam_search(drafter, model, context, ref[pos], W, L)
        drafts = np.array(beams)[:, 1:]  # (W, L-1)
        target = np.array(ref[pos + 1 : pos + L], dtype=np.int64)
        n = min(len(target), drafts.shape[1])
        match = drafts[:, :n] == target[None, :n]
        run = np.cumprod(match, axis=1).sum(axis=1)  # leading matches per beam
        a = int(run.max()) if run.size else 0
        accepted.append(a)
        pos += a + 1
    return accepted


def acceptance_grid(
    model,
    tokenizer,
    drafter,
    prompts: Iterable[Sequence[int]],
    shapes: Sequence[tuple[int, int]],
    max_tokens: int,
    on_prompt: Callable[[], None] | None = None,
    batched: bool = True,
) -> dict:
    """Tokens per step and acceptance by depth for every (W, L) in `shapes`, over `prompts`.

    batched: make the plain greedy references for all prompts together (about 4x faster on
    a CPU; equal to one-at-a-time decoding up to float rounding in near ties)."""
    return acceptance_grids(
        model, tokenizer, [drafter], prompts, shapes, max_tokens, on_prompt, batched
    )[0]


def context_columns(hidden: mx.array, carried: Sequence[int], wanted: Sequence[int], h: int):
    """The columns of a hidden state that carries the `carried` feature layers which a drafter
    reading `wanted` (a subset) needs: the last state, then its layers in its order."""
    blocks = [hidden[..., :h]]
    for layer in wanted:
        k = 1 + list(carried).index(layer)
        blocks.append(hidden[..., k * h : (k + 1) * h])
    return blocks[0] if len(blocks) == 1 else mx.concatenate(blocks, axis=-1)


def acceptance_grids(
    model,
    tokenizer,
    drafters: Sequence,
    prompts: Iterable[Sequence[int]],
    shapes: Sequence[tuple[int, int]],
    max_tokens: int,
    on_prompt: Callable[[], None] | None = None,
    batched: bool = True,
) -> list[dict]:
    """acceptance_grid for several drafters of one base over one set of references (made
    once, carrying every feature layer any of them reads)."""
    longest = max(length for _, length in shapes)
    rounds = [{s: [] for s in shapes} for _ in drafters]
    per_prompt: list[list] = [[] for _ in drafters]
    prompts = [list(p) for p in prompts]
    wanted = [drafter_features(d) for d in drafters]
    features = tuple(dict.fromkeys(f for w in wanted for f in w))
    h = model.args.hidden_size
    if batched:
        refs = (
            (1, r)
            for r in reference_batch(model, tokenizer, prompts, max_tokens, longest, features)
        )
    else:
        refs = (
            (len(ids), reference_decode(model, tokenizer, ids, max_tokens, longest, features))
            for ids in prompts
        )
    for prompt_len, (ref, limit, hidden) in refs:
        for d, drafter in enumerate(drafters):
            context = context_columns(hidden, features, wanted[d], h)
            row, counts = {}, {}
            for W, L in shapes:
                acc = replay_rounds(drafter, model, context, prompt_len, ref, limit, W, L)
                rounds[d][(W, L)].extend(acc)
                row[f"{W}x{L}"] = float(np.mean(acc)) + 1.0 if acc else 1.0
                counts[f"{W}x{L}"] = len(acc)
            per_prompt[d].append({"num_tokens": limit, "tokens_per_step": row, "rounds": counts})
        if on_prompt is not None:
            on_prompt()
    return [_grid(r, p) for r, p in zip(rounds, per_prompt, strict=True)]


def by_kind(grid: dict, kinds: Sequence[str]) -> dict:
    """An acceptance grid's tokens per step per kind (the prompts' categories, in order) and
    shape: each kind's rounds pooled, as the whole grid pools every prompt's."""
    out: dict[str, dict[str, float]] = {}
    for kind in dict.fromkeys(kinds):
        rows = [p for p, k in zip(grid["prompts"], kinds, strict=True) if k == kind]
        out[kind] = {}
        for shape in grid["shapes"]:
            n = sum(r["rounds"][shape] for r in rows)
            accepted = sum((r["tokens_per_step"][shape] - 1.0) * r["rounds"][shape] for r in rows)
            out[kind][shape] = 1.0 + accepted / n if n else 1.0
    return out


def _grid(rounds: dict, per_prompt: list) -> dict:
    table = {}
    for (W, L), acc in rounds.items():
        arr = np.asarray(acc)
        table[f"{W}x{L}"] = {
            "beam_width": W,
            "beam_length": L,
            "rounds": int(arr.size),
            "tokens_per_step": float(arr.mean()) + 1.0 if arr.size else 1.0,
            "accept_by_depth": [float(np.mean(arr >= d)) for d in range(1, L)] if arr.size else [],
        }
    return {"shapes": table, "prompts": per_prompt}
