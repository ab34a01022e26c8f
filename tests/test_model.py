"""The base model port against mlx-lm, and tree-shaped verification against sequential decoding."""

import importlib

import mlx.core as mx
import mlx.nn as nn
import pytest
from helpers import TINY_ARGS, TINY_FAMILIES, assert_close, literal_tree, random_params
from mlx.utils import tree_flatten

from mlx_redrafter.model import Model, ModelArgs, UnsupportedModelError

BASE = TINY_ARGS

FAMILIES = {**TINY_FAMILIES, "llama-tied": dict(model_type="llama", tie_word_embeddings=True)}


def pair(family: str, seed: int = 0):
    """Our model and mlx-lm's for the same random weights."""
    cfg = {**BASE, **FAMILIES[family]}
    mx.random.seed(seed)
    # mlx-lm runs mistral checkpoints with its llama module.
    name = {"mistral": "llama"}.get(cfg["model_type"], cfg["model_type"])
    module = importlib.import_module(f"mlx_lm.models.{name}")
    ref = module.Model(module.ModelArgs.from_dict(cfg))
    params = random_params(ref)
    ref.load_weights(params)
    ours = Model(ModelArgs.from_dict(cfg))
    ours.load_weights(params, strict=True)
    mx.eval(ref.parameters(), ours.parameters())
    return ours, ref, cfg


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_mlx_lm(family):
    ours, ref, cfg = pair(family)
    tokens = mx.random.randint(0, cfg["vocab_size"], (2, 24))
    hidden, logits = ours(tokens)
    expected = ref(tokens)
    assert hidden.shape == (2, 24, cfg["hidden_size"])
    assert_close(logits, expected)
    # The hidden state is the post-norm one mlx-lm's inner model returns.
    assert_close(hidden, ref.model(tokens))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_logits_match_mlx_lm(bits):
    ours, ref, cfg = pair("llama")
    nn.quantize(ref, group_size=32, bits=bits)
    nn.quantize(ours, group_size=32, bits=bits)
    ours.load_weights(tree_flatten(ref.parameters()), strict=True)
    tokens = mx.random.randint(0, cfg["vocab_size"], (1, 16))
    assert_close(ours(tokens)[1], ref(tokens))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_cached_chunks_match_full_forward(family):
    ours, _, cfg = pair(family)
    tokens = mx.random.randint(0, cfg["vocab_size"], (1, 30))
    full = ours(tokens)[1]
    cache = ours.make_cache()
    parts = []
    for a, b in [(0, 7), (7, 8), (8, 20), (20, 30)]:
        parts.append(ours(tokens[:, a:b], cache)[1])
        cache.commit()
    assert cache.offset == 30
    assert_close(mx.concatenate(parts, axis=1), full)


def test_cache_grows_past_its_step():
    ours, _, cfg = pair("llama")
    tokens = mx.random.randint(0, cfg["vocab_size"], (1, 40))
    full = ours(tokens)[1]
    cache = ours.make_cache()
    cache.step = 8  # force several reallocations
    outs = []
    for t in range(40):
        outs.append(ours(tokens[:, t : t + 1], cache)[1])
        cache.commit()
    assert_close(mx.concatenate(outs, axis=1), full)


def close(a, b):
    # Random weights give logits in the tens: compare relative to their scale.
    assert_close(a, b)


@pytest.mark.parametrize("family", ["llama", "llama3-rope", "qwen2", "qwen3"])
def test_tree_verify_matches_sequential_and_commit_continues(family):
    ours, _, cfg = pair(family, seed=3)
    V = cfg["vocab_size"]
    prompt = mx.random.randint(0, V, (1, 9))
    node_tokens = mx.array([[5, 17, 33, 42, 60, 77]])
    depths, mask, branches = literal_tree(prompt.shape[1])

    cache = ours.make_cache()
    ours(prompt, cache)
    cache.commit()
    P = cache.offset
    positions = mx.array(P + depths)[None]
    hidden, logits = ours(node_tokens, cache, positions=positions, mask=mask)

    for branch in branches:
        seq = mx.concatenate([prompt, node_tokens[:, branch]], axis=1)
        ref_h, ref_logits = ours(seq)
        got = logits[:, branch]
        close(got, ref_logits[:, P:])
        close(hidden[:, branch], ref_h[:, P:])

    # Keep branch r -> b -> e (nodes 0, 3, 5), then continue decoding one token.
    cache.commit([0, 3, 5])
    assert cache.offset == P + 3
    nxt = mx.array([[11]])
    step_logits = ours(nxt, cache)[1]
    cache.commit()
    seq = mx.concatenate([prompt, node_tokens[:, [0, 3, 5]], nxt], axis=1)
    close(step_logits[:, -1], ours(seq)[1][:, -1])


def test_commit_rejects_indices_outside_the_pass():
    ours, _, cfg = pair("llama")
    cache = ours.make_cache()
    ours(mx.array([[1, 2, 3]]), cache)
    with pytest.raises(IndexError):
        cache.commit([0, 3])


def test_unsupported_model_type_is_named():
    with pytest.raises(UnsupportedModelError, match="gpt_neox"):
        ModelArgs.from_dict({**BASE, "model_type": "gpt_neox"})


def test_transformers5_rope_parameters_are_read():
    cfg = {k: v for k, v in BASE.items() if k != "rope_theta"}
    cfg = {
        **cfg,
        "model_type": "llama",
        "rope_parameters": {"rope_type": "default", "rope_theta": 123.0},
    }
    assert ModelArgs.from_dict(cfg).rope_theta == 123.0
