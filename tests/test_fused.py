"""The inference fast path (`Model.optimize`): fused projections and the compiled CPU kernels
give the logits of the plain model, on every family, dense and quantized, for prefill, cached
decode steps and tree verification with per-token positions."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import (
    TINY_ARGS,
    TINY_FAMILIES,
    assert_close,
    literal_tree,
    random_model,
    random_params,
)
from mlx.utils import tree_flatten

from mlx_redrafter import model as model_lib
from mlx_redrafter.model import Model, ModelArgs, fast_attention, fast_exp, fast_silu_mul

BASE = TINY_ARGS

FAMILIES = {
    **TINY_FAMILIES,
    "llama-mha": dict(model_type="llama", tie_word_embeddings=True, num_key_value_heads=4),
    "linear-rope": dict(
        model_type="llama", tie_word_embeddings=True, rope_scaling={"type": "linear", "factor": 2.0}
    ),
}

needs_kernels = pytest.mark.skipif(
    not model_lib.fast_kernels_available(), reason="compiled CPU kernels do not run here"
)


def plain_model(family: str, bits: int | None = None, seed: int = 0) -> Model:
    model = random_model({**BASE, **FAMILIES[family]}, seed)
    model.update(nn.utils.tree_unflatten(random_params(model)))
    if bits is not None:
        nn.quantize(model, group_size=32, bits=bits)
    mx.eval(model.parameters())
    return model


def copy_of(model: Model) -> Model:
    other = Model(model.args)
    if "scales" in model.model.layers[0].self_attn.q_proj:
        q = model.model.layers[0].self_attn.q_proj
        nn.quantize(other, group_size=q.group_size, bits=q.bits)
    other.load_weights(tree_flatten(model.parameters()), strict=True)
    mx.eval(other.parameters())
    return other


def tree_inputs(prefix_len: int):
    """Positions and mask of helpers.literal_tree (depths 0 1 2 1 2 2) after the prefix."""
    depths, mask, _ = literal_tree(prefix_len)
    return mx.array(prefix_len + depths)[None], mask


def run_all(model: Model, prompt: mx.array, nodes: mx.array) -> list[mx.array]:
    """Logits of a causal prefill, two cached decode steps and a tree verify."""
    cache = model.make_cache()
    out = [model(prompt, cache)[1]]
    cache.commit()
    for token in (7, 9):
        out.append(model(mx.array([[token]]), cache)[1])
        cache.commit()
    positions, mask = tree_inputs(cache.offset)
    hidden, logits = model(nodes, cache, positions=positions, mask=mask)
    return [*out, hidden, logits]


@pytest.mark.parametrize("bits", [None, 4, 8])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fused_model_equals_unfused(family, bits):
    plain = plain_model(family, bits)
    fused = copy_of(plain).optimize(fuse=True, fast_kernels=False)
    assert fused.fused and not plain.fused
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert "q_proj" not in attn and "gate_proj" not in mlp
    assert isinstance(attn.qkv_proj, nn.QuantizedLinear if bits else nn.Linear)
    prompt = mx.random.randint(0, BASE["vocab_size"], (1, 12))
    nodes = mx.random.randint(0, BASE["vocab_size"], (1, 6))
    expected = run_all(plain, prompt, nodes)
    for got, want in zip(run_all(fused, prompt, nodes), expected, strict=True):
        assert_close(got, want)


@needs_kernels
@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fast_kernels_equal_library_ops(family, bits):
    plain = plain_model(family, bits, seed=1)
    fast = copy_of(plain).optimize(fuse=True, fast_kernels=True)
    assert fast.fast_kernels
    prompt = mx.random.randint(0, BASE["vocab_size"], (1, 12))
    nodes = mx.random.randint(0, BASE["vocab_size"], (1, 6))
    expected = run_all(plain, prompt, nodes)
    for got, want in zip(run_all(fast, prompt, nodes), expected, strict=True):
        assert_close(got, want)


def test_fusion_keeps_mixed_layers_apart():
    model = plain_model("llama")
    attn = model.model.layers[0].self_attn
    attn.k_proj = nn.QuantizedLinear.from_linear(attn.k_proj, group_size=32, bits=4)
    assert not attn.fuse()  # a quantized k next to dense q/v stays unfused
    assert "q_proj" in attn and "qkv_proj" not in attn
    mlp = model.model.layers[0].mlp
    mlp.up_proj = nn.QuantizedLinear.from_linear(mlp.up_proj, group_size=32, bits=8)
    mlp.gate_proj = nn.QuantizedLinear.from_linear(mlp.gate_proj, group_size=32, bits=4)
    assert not mlp.fuse()  # different bit widths


def test_escape_hatch_turns_the_fast_path_off(monkeypatch):
    monkeypatch.setenv("MLX_REDRAFTER_FAST", "0")
    model = plain_model("llama").optimize()
    assert not model.fused and not model.fast_kernels


@needs_kernels
def test_fast_exp_is_exp_to_float_precision():
    x = mx.linspace(-87.0, 88.0, 100001)  # the normal float32 range of exp
    got, expected = np.array(fast_exp(x), np.float64), np.exp(np.array(x, np.float64))
    rel = np.abs(got - expected) / expected
    assert rel.max() < 2.5e-7  # a few float32 ulps (MLX's own CPU exp: ~4e-6 here)
    edges = np.array(fast_exp(mx.array([-mx.inf, -1e30, -100.0, 0.0, 89.0])))
    assert edges[0] == 0.0 and edges[1] == 0.0  # masked keys drop out exactly
    assert 0.0 <= edges[2] < 2.0**-126 and edges[3] == 1.0 and edges[4] == np.inf
    # Control: one Taylor term fewer misses the bound, so the bound can fail.
    r = np.log(2.0) / 2
    assert abs(sum(r**i / np.prod(range(1, i + 1)) for i in range(6)) - np.exp(r)) > 2.5e-7


@needs_kernels
def test_fast_silu_mul_matches_nn_silu():
    gate = mx.random.normal((3, 200)) * 20
    up = mx.random.normal((3, 200))
    assert_close(fast_silu_mul(gate, up), nn.silu(gate) * up)


@needs_kernels
@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "additive"])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)])
def test_fast_attention_matches_sdpa(mask_kind, heads):
    n_heads, n_kv = heads
    B, T, S, D = 2, 5, 13, 16
    q = mx.random.normal((B, n_heads, T, D))
    k = mx.random.normal((B, n_kv, S, D))
    v = mx.random.normal((B, n_kv, S, D))
    keep = mx.random.uniform(shape=(B, 1, T, S)) < 0.6
    keep = keep | (mx.arange(S) == 0)  # every query attends somewhere
    mask = {
        "none": None,
        "causal": "causal",
        "bool": keep,
        "additive": mx.where(keep, 0.0, -1e9),
    }[mask_kind]
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5, mask=mask)
    assert_close(fast_attention(q, k, v, D**-0.5, mask), expected)
    if mask_kind == "bool":  # control: ignoring the mask is caught
        with pytest.raises(AssertionError):
            assert_close(fast_attention(q, k, v, D**-0.5, None), expected)


@needs_kernels
@pytest.mark.parametrize("family", ["llama", "llama3-rope", "linear-rope", "qwen3"])
def test_rope_table_matches_fast_rope_far_out(family):
    from mlx_redrafter.model import RoPE

    args = ModelArgs.from_dict({**BASE, **FAMILIES[family]})
    rope = RoPE(args)
    x = mx.random.normal((1, 5, 3, args.head_dim))
    for offset in (0, 3000):
        positions = mx.array([[0, 1, 1, 2, 4]]) + offset
        expected = rope(x, offset, positions)  # mx.fast.rope
        assert_close(rope(x, offset, positions, fast=True), expected, rtol=2e-4)
        assert_close(rope(x, offset, None, fast=True), rope(x, offset, None), rtol=2e-4)
    # Control: the wrong positions are caught at this tolerance.
    with pytest.raises(AssertionError):
        assert_close(rope(x, 3000, positions + 1, fast=True), expected, rtol=2e-4)


@needs_kernels
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_compiled_blocks_equal_eager_for_every_node_count(monkeypatch, family):
    from mlx_redrafter.generation import verify_tree
    from mlx_redrafter.tree import pack_beams

    fast = copy_of(plain_model(family, seed=2)).optimize()
    prompt = mx.random.randint(0, BASE["vocab_size"], (1, 10))
    rng = np.random.default_rng(0)
    shapes = [(1, 2), (2, 3), (3, 4), (4, 5), (2, 9), (5, 13)]  # up to 61 nodes
    trees = [pack_beams(np.concatenate([np.zeros((w, 1), int), rng.integers(1, 9, (w, n - 1))],
                                       axis=1)) for w, n in shapes]  # fmt: skip

    def verify_all():
        out = []
        for tree in trees:
            cache = fast.make_cache()
            fast(prompt, cache)
            cache.commit()
            out.append(verify_tree(fast, cache, tree))
        return out

    compiled = verify_all()
    assert fast.model.layers[0]._compiled_mlp is not None
    monkeypatch.setattr(model_lib, "COMPILE_MAX_TOKENS", 0)  # every pass eager
    for tree, (hidden, logits), (eager_h, eager_l) in zip(
        trees, compiled, verify_all(), strict=True
    ):
        assert logits.shape[0] == tree.num_nodes
        assert_close(hidden, eager_h)
        assert_close(logits, eager_l)
    assert sorted({t.num_nodes for t in trees}) == [t.num_nodes for t in trees]  # all distinct
