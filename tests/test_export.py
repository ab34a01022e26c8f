"""`convert drafter --to apple`: our drafters in Apple's PyTorch layout (what TensorRT-LLM's
ReDrafter converter reads), back through our own converter with the same beams."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from helpers import TINY_ARGS, invoke, random_model

from mlx_redrafter.beam import beam_search
from mlx_redrafter.convert import convert_drafter
from mlx_redrafter.drafter import (
    init_drafter,
    load_drafter,
    quantize_drafter,
    save_drafter,
)
from mlx_redrafter.errors import ConvertError
from mlx_redrafter.export import OUTSIDE_VOCAB_LOGIT, apple_tensor_names, export_drafter

# TensorRT-LLM's converter (examples/redrafter/convert_checkpoint.py) lists these names for a
# drafter with two ResBlocks, and reads these config fields.
TRT_LLM_NAMES = {
    "input_proj.weight",
    "input_proj.bias",
    "lm_head.0.linear.weight",
    "lm_head.0.linear.bias",
    "lm_head.1.linear.weight",
    "lm_head.1.linear.bias",
    "lm_head.2.weight",
    "rnn_u.weight",
    "rnn_u.bias",
    "rnn_w.weight",
}
TRT_LLM_CONFIG = ("hidden_size", "exit_dim", "num_draft_layers", "rnn")


@pytest.fixture(scope="module")
def base():
    return random_model(TINY_ARGS, seed=0)  # hidden 64, vocab 101


def _beams(drafter, base, seed: int):
    rng = np.random.default_rng(seed)
    context = mx.array(rng.standard_normal(base.args.hidden_size).astype(np.float32) * 3)
    beams, scores = beam_search(drafter, base, context, int(rng.integers(100)), 4, 4)
    return np.array(beams), np.array(scores)


def _round_trip(drafter, base, tmp_path, fmt="safetensors"):
    ours = save_drafter(drafter, tmp_path / "ours")
    apple = export_drafter(ours, tmp_path / "apple", fmt=fmt)
    back = convert_drafter(apple, tmp_path / "back", base=base)
    return apple, load_drafter(back, base=base)


VARIANTS = {
    "apple-recipe": dict(),  # exit_dim = 2h: no input_proj
    "input-proj": dict(exit_dim=96),
    "one-block-no-rnn": dict(num_draft_layers=1, rnn=False),
    "draft-vocab": dict(draft_vocab_ids=list(range(3, 101, 2))),
    "draft-vocab-proj": dict(exit_dim=96, draft_vocab_ids=list(range(40))),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_round_trip_gives_the_same_beams(name, base, tmp_path):
    drafter = init_drafter(base, seed=5, **VARIANTS[name])
    apple, back = _round_trip(drafter, base, tmp_path)
    config = json.loads((apple / "config.json").read_text())
    assert all(k in config for k in TRT_LLM_CONFIG)
    n, h = config["num_draft_layers"], config["hidden_size"]
    names = set(mx.load(str(apple / "model.safetensors")))
    assert names == set(apple_tensor_names(n, config["exit_dim"] != 2 * h, config["rnn"]))
    assert back.draft_vocab_ids is None  # a full-vocabulary head, as TensorRT-LLM has
    for seed in range(3):
        (b0, s0), (b1, s1) = _beams(drafter, base, seed), _beams(back, base, seed)
        np.testing.assert_array_equal(b1, b0)
        np.testing.assert_allclose(s1, s0, rtol=1e-4, atol=1e-4)


def test_names_are_the_ones_tensorrt_llm_lists(base, tmp_path):
    drafter = init_drafter(base, seed=1, exit_dim=96)
    apple, _ = _round_trip(drafter, base, tmp_path)
    assert set(mx.load(str(apple / "model.safetensors"))) == TRT_LLM_NAMES
    config = json.loads((apple / "config.json").read_text())
    assert (config["hidden_size"], config["exit_dim"], config["rnn"]) == (64, 96, True)
    assert config["vocab_size"] == 101


def test_draft_vocab_becomes_a_full_head_that_never_drafts_outside_it(base, tmp_path):
    ids = list(range(10, 30))
    drafter = init_drafter(base, seed=2, draft_vocab_ids=ids)
    apple, back = _round_trip(drafter, base, tmp_path)
    weights = mx.load(str(apple / "model.safetensors"))
    exit_dim = json.loads((apple / "config.json").read_text())["exit_dim"]
    assert exit_dim % 8 == 0 and exit_dim > 2 * 64
    head = np.array(weights["lm_head.2.weight"])
    outside = np.setdiff1d(np.arange(101), ids)
    assert (head[outside, 128] == OUTSIDE_VOCAB_LOGIT).all() and (head[ids, 128] == 0).all()
    beams, _ = _beams(back, base, 0)
    assert set(beams[:, 1:].ravel()) <= set(ids)


def test_quantized_drafter_is_written_dequantized(base, tmp_path):
    drafter = quantize_drafter(init_drafter(base, seed=3, exit_dim=128), group_size=32, bits=8)
    apple, back = _round_trip(drafter, base, tmp_path)
    weights = mx.load(str(apple / "model.safetensors"))
    assert all(v.dtype == mx.float32 for v in weights.values())
    for seed in range(2):
        np.testing.assert_array_equal(_beams(back, base, seed)[0], _beams(drafter, base, seed)[0])


def test_torch_format(base, tmp_path):
    torch = pytest.importorskip("torch")
    drafter = init_drafter(base, seed=4)
    apple, back = _round_trip(drafter, base, tmp_path, fmt="pt")
    state = torch.load(apple / "model.pt", map_location="cpu")
    assert set(state) == set(apple_tensor_names(2, False, True))
    assert all(v.dtype == torch.float32 for v in state.values())
    np.testing.assert_array_equal(_beams(back, base, 0)[0], _beams(drafter, base, 0)[0])


def test_multi_layer_drafter_is_refused_in_one_line(base, tmp_path):
    drafter = init_drafter(base, seed=6, feature_layers=[0])
    ours = save_drafter(drafter, tmp_path / "ours")
    with pytest.raises(ConvertError, match="TensorRT-LLM"):
        export_drafter(ours, tmp_path / "apple")
    result = invoke(["convert", "drafter", str(ours), "--to", "apple", "-o", str(tmp_path / "a")])
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "base layers [0]" in lines[0] and "TensorRT-LLM" in lines[0]
    assert not (tmp_path / "a").exists() and not (tmp_path / "apple").exists()


def test_cli_writes_apple_layout(base, tmp_path):
    ours = save_drafter(init_drafter(base, seed=7), tmp_path / "ours")
    out = tmp_path / "apple"
    args = ["convert", "drafter", str(ours), "--to", "apple", "-o", str(out), "--dtype", "float16"]
    result = invoke(args)
    assert result.returncode == 0, result.stderr
    assert "TensorRT-LLM" in result.stdout
    weights = mx.load(str(out / "model.safetensors"))
    assert all(v.dtype == mx.float16 for v in weights.values())
    assert invoke(args).returncode == 1  # not empty: refused without --overwrite
    bad = invoke(["convert", "drafter", str(ours), "--to", "onnx", "-o", str(tmp_path / "x")])
    assert bad.returncode == 1 and "--to" in bad.stderr
