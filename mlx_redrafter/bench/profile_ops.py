"""Where an n-token verify forward spends its time: each kind of op of the base model, timed
on its own with the model's own layers and weights, for several node counts.

Every category builds the graph for all layers at once and evaluates it (as the forward
does), so per-op dispatch is counted; the parts overlap less than in the real forward, so
they need not add up to it exactly. `forward` is the real `generation.verify_tree` (n > 1) or a
plain decode step (n = 1) for comparison.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..generation import verify_tree
from ..model import fast_attention, fast_silu_mul
from ..tree import pack_beams

CATEGORIES = (
    "forward",
    "projections",
    "lm_head",
    "attention",
    "rope",
    "norms",
    "elementwise",
    "mask_build",
    "cache_writes",
    "host_sync",
)

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}

Timed = Callable[[Callable[[], object]], float]  # milliseconds a step takes


def prefilled_cache(model, context: int, rng: np.random.Generator):
    """A fresh cache holding `context` committed random tokens (evaluated)."""
    cache = model.make_cache()
    model(mx.array(rng.integers(0, model.args.vocab_size, context), dtype=mx.int32)[None], cache)
    cache.commit()
    mx.eval(cache.state())
    return cache


def _best_time(run: Callable[[], object], repeats: int, clock: Callable[[], float]) -> float:
    run()  # warm-up (allocations, compiled kernels)
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        run()
        best = min(best, clock() - start)
    return best


def profile_forward(
    model,
    sizes: Sequence[int] = (1, 2, 4, 8, 16, 32),
    context: int = 256,
    repeats: int = 5,
    clock: str = "wall",
    seed: int = 0,
) -> list[dict]:
    """Milliseconds per category (see CATEGORIES) for each n in `sizes`, after `context`
    committed tokens. Returns [{"n", "<category>": ms, ...}]; the best of `repeats` timings
    (least disturbed by other work). clock "cpu" counts this process's CPU time instead of
    wall time (steadier on a shared machine; then use a single BLAS thread)."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    timer = CLOCKS[clock]
    rng = np.random.default_rng(seed)
    cache = prefilled_cache(model, context, rng)

    def timed(run: Callable[[], object]) -> float:
        return 1e3 * _best_time(run, repeats, timer)

    return [_profile_size(model, cache, n, rng, timed) for n in sizes]


def _profile_size(model, cache, n: int, rng, timed: Timed) -> dict:
    """One row of `profile_forward`: every category at n nodes. The categories run in the
    order of CATEGORIES (the attention inputs read the cache the forward has grown)."""
    args = model.args
    dtype = model.model.norm.weight.dtype
    tree = pack_beams(rng.integers(0, args.vocab_size, (1, n)))
    x = mx.random.normal((1, n, args.hidden_size)).astype(dtype)
    hidden_mlp = mx.random.normal((1, n, args.intermediate_size)).astype(dtype)
    mx.eval(x, hidden_mlp)

    def forward():
        if n == 1:
            mx.eval(model(mx.array([[1]], dtype=mx.int32), cache))
        else:
            mx.eval(verify_tree(model, cache, tree))
        cache.trim(0)

    row = {"n": n, "forward": timed(forward)}
    row["projections"] = timed(lambda: _projections(model.layers, x, hidden_mlp))
    row["lm_head"] = timed(lambda: mx.eval(model.logits(x)))
    row.update(_attention_rows(model, cache, tree, n, x, timed))
    row.update(_other_rows(model, cache, tree, n, x, hidden_mlp, timed))
    return row


def _projections(layers, x: mx.array, hidden_mlp: mx.array) -> None:
    """Every linear layer of the blocks (fused or not, as the model has them)."""
    outs = []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        if "qkv_proj" in attn:
            outs.append(attn.qkv_proj(x))
        else:
            outs += [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
        outs.append(attn.o_proj(x[..., : attn.n_heads * attn.head_dim]))
        if "gate_up_proj" in mlp:
            outs.append(mlp.gate_up_proj(x))
        else:
            outs += [mlp.gate_proj(x), mlp.up_proj(x)]
        outs.append(mlp.down_proj(hidden_mlp))
    mx.eval(outs)


def _attention_rows(model, cache, tree, n: int, x: mx.array, timed: Timed) -> dict:
    """attention (over the cache plus the n nodes, with the tree mask), rope and norms."""
    layers = model.layers
    fast = model.fast_kernels
    dtype = x.dtype
    attn0 = layers[0].self_attn
    heads, kv_heads, head_dim = attn0.n_heads, attn0.n_kv_heads, attn0.head_dim
    q = mx.random.normal((1, n, heads, head_dim)).astype(dtype)
    k = mx.random.normal((1, n, kv_heads, head_dim)).astype(dtype)
    positions = mx.array(tree.positions(cache.offset), dtype=mx.int32)[None]
    mask = tree.attention_mask(cache.offset) if n > 1 else None
    keys = [layer.keys[..., : cache.offset + n, :] for layer in cache.layers]
    values = [layer.values[..., : cache.offset + n, :] for layer in cache.layers]
    qt = q.transpose(0, 2, 1, 3)
    mx.eval(q, k, qt, positions, keys, values)

    def attention():
        outs = []
        for i in range(len(layers)):
            qi = qt + float(i)  # distinct inputs: no shared subgraph
            if fast:
                outs.append(fast_attention(qi, keys[i], values[i], attn0.scale, mask))
            else:
                outs.append(
                    mx.fast.scaled_dot_product_attention(
                        qi, keys[i], values[i], scale=attn0.scale, mask=mask
                    )
                )
        mx.eval(outs)

    def rope():
        pos = positions if n > 1 else None
        outs = []
        for i, layer in enumerate(layers):
            r = layer.self_attn.rope
            outs += [r(q + float(i), cache.offset, pos), r(k + float(i), cache.offset, pos)]
        mx.eval(outs)

    def norms():
        outs = []
        for i, layer in enumerate(layers):
            xi = x + float(i)
            outs += [layer.input_layernorm(xi), layer.post_attention_layernorm(xi)]
            if "q_norm" in layer.self_attn:
                outs += [layer.self_attn.q_norm(q + float(i)), layer.self_attn.k_norm(k)]
        outs.append(model.model.norm(x))
        mx.eval(outs)

    return {"attention": timed(attention), "rope": timed(rope), "norms": timed(norms)}


def _other_rows(model, cache, tree, n: int, x, hidden_mlp, timed: Timed) -> dict:
    """elementwise (MLP activation, residual adds), mask_build, cache_writes, host_sync."""
    layers = model.layers
    fast = model.fast_kernels

    def elementwise():
        outs = []
        for i in range(len(layers)):
            gate = hidden_mlp + float(i)
            act = fast_silu_mul(gate, hidden_mlp) if fast else nn.silu(gate) * hidden_mlp
            outs += [act, (x + float(i)) + x]  # the MLP activation, the residual adds
            outs.append(outs[-1] + x)
        mx.eval(outs)

    def mask_build():
        mx.eval(
            mx.array(tree.tokens, dtype=mx.int32),
            mx.array(tree.positions(cache.offset), dtype=mx.int32),
            tree.attention_mask(cache.offset),
        )

    row = {"elementwise": timed(elementwise), "mask_build": timed(mask_build)}
    attn0 = layers[0].self_attn
    kv = mx.random.normal((1, attn0.n_kv_heads, n, attn0.head_dim)).astype(x.dtype)
    mx.eval(kv)

    def cache_writes():
        for i, layer in enumerate(cache.layers):
            layer.update(kv + float(i), kv)
        mx.eval(cache.state())

    row["cache_writes"] = timed(cache_writes)
    row["host_sync"] = timed(lambda: mx.argmax(x[0, :, :8], axis=-1).tolist())
    return row


def format_profile(rows: list[dict]) -> str:
    """A Markdown table: one row per category, one column per n, milliseconds."""
    sizes = [r["n"] for r in rows]
    lines = [
        "| op (ms) | " + " | ".join(f"n={n}" for n in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
    ]
    for cat in CATEGORIES:
        lines.append(f"| {cat} | " + " | ".join(f"{r[cat]:.1f}" for r in rows) + " |")
    return "\n".join(lines)
