"""GGUF -> MLX model directory: dense Hugging Face-named weights, config.json, and a tokenizer
rebuilt from the GGUF metadata, loadable by both mlx-lm and `mlx_redrafter.loading`.

`mx.load` reads a GGUF and keeps Q4_0/Q4_1/Q4_K/Q8_0 tensors quantized as a
(`.weight` uint32, `.scales`, `.biases`) triplet with groups of 32; other block types arrive
dequantized to float16. llama.cpp's converter permutes the rows of llama q/k projections for
its interleaved RoPE; `gguf_weights` undoes that so the half-split RoPE of HF/mlx-lm applies.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .env import parse_dtype
from .errors import GGUFError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
GGUF_GROUP_SIZE = 32  # every GGUF block type mx.load keeps quantized has 32-weight groups

_HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# Byte-level BPE pre-tokenizers by `tokenizer.ggml.pre` (llama.cpp's names). The GPT-2 split
# is what tokenizers' ByteLevel(use_regex=True) applies; the others need an explicit Split.
_GPT2_PRES = {"default", "gpt-2", "gpt2", "mpt", "olmo", "jais"}
_DIGIT_PRES = {"smollm", "starcoder", "refact", "codeshell", "command-r"}  # + digits one by one
_REGEX_PRES = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}

# llama.cpp token types
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


def read_gguf(path: str | Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """Tensors (quantized ones as weight/scales/biases) and metadata as plain Python values."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    try:
        tensors, raw = mx.load(str(path), return_metadata=True)
    except Exception as e:  # mlx raises RuntimeError/ValueError with its own wording
        raise GGUFError(f"{path}: not a readable GGUF file ({e})") from e
    metadata = {}
    for key, value in raw.items():
        if isinstance(value, mx.array):
            value = value.item() if value.ndim == 0 else value.tolist()
        metadata[key] = value
    return tensors, metadata


def _architecture(metadata: dict[str, Any], path: Path) -> str:
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{path}: unsupported GGUF architecture {arch!r} "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    return arch


def _f32(x: float) -> float:
    # GGUF stores float32; print it back as the short decimal it was written from (1e-05).
    return float(str(np.float32(x)))


def gguf_config(
    metadata: dict[str, Any], tensors: dict[str, mx.array], path: str | Path
) -> dict[str, Any]:
    """An HF-style config.json dict from the GGUF metadata."""
    path = Path(path)
    arch = _architecture(metadata, path)

    def get(key: str, default: Any = None, required: bool = True) -> Any:
        value = metadata.get(f"{arch}.{key}", default)
        if value is None and required:
            raise GGUFError(f"{path}: metadata key {arch}.{key} is missing")
        return value

    hidden = get("embedding_length")
    heads = get("attention.head_count")
    kv_heads = get("attention.head_count_kv", heads)
    intermediate = get("feed_forward_length")
    if isinstance(heads, list) or isinstance(kv_heads, list) or isinstance(intermediate, list):
        raise GGUFError(f"{path}: per-layer head counts or FFN sizes are not supported")
    head_dim = get("attention.key_length", hidden // heads)
    rope_dims = get("rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise GGUFError(
            f"{path}: partial rotary embedding ({rope_dims} of {head_dim} dims) is not supported"
        )
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{path}: tensor token_embd.weight is missing")
    if "rope_freqs.weight" in tensors:
        raise GGUFError(f"{path}: per-frequency RoPE factors (rope_freqs) are not supported")

    config: dict[str, Any] = {
        "architectures": [_HF_ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": get("context_length", required=False),
        "vocab_size": tensors["token_embd.weight"].shape[0],
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_output.bias" in tensors
        config["mlp_bias"] = "blk.0.ffn_gate.bias" in tensors
    scaling = get("rope.scaling.type", "none", required=False)
    if scaling == "linear":
        config["rope_scaling"] = {
            "rope_type": "linear",
            "factor": _f32(get("rope.scaling.factor")),
        }
    elif scaling != "none":
        raise GGUFError(f"{path}: RoPE scaling {scaling!r} is not supported")
    for name in ("bos", "eos", "padding"):
        token_id = metadata.get(f"tokenizer.ggml.{name}_token_id")
        if token_id is not None:
            config[f"{'pad' if name == 'padding' else name}_token_id"] = token_id
    return config


def _dense(tensors: dict[str, mx.array], name: str) -> mx.array:
    """The float32 value of tensor `name`, dequantizing a GGUF block-quantized weight."""
    w = tensors[name]
    prefix = name.rpartition(".")[0]
    scales = tensors.get(f"{prefix}.scales") if name.endswith(".weight") else None
    if scales is None:
        return w.astype(mx.float32)
    in_features = scales.shape[-1] * GGUF_GROUP_SIZE
    bits = w.shape[-1] * 32 // in_features
    # fp32 scales/biases so the product is computed (and returned) in fp32 as llama.cpp does.
    return mx.dequantize(
        w,
        scales.astype(mx.float32),
        tensors[f"{prefix}.biases"].astype(mx.float32),
        group_size=GGUF_GROUP_SIZE,
        bits=bits,
    )


def unpermute_rope(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's q/k row permutation: per head, rows (j, half) -> (half, j).

    llama.cpp rotates adjacent pairs (x[2j], x[2j+1]); HF rotates (x[j], x[j + D/2]). Its
    converter reorders each head's D output rows so that row 2j+half holds HF row half*D/2+j.
    Works for weights (out, in) and biases (out,).
    """
    rows = w.shape[0]
    head_dim = rows // n_heads
    rest = w.shape[1:]
    w = w.reshape(n_heads, head_dim // 2, 2, *rest)
    return mx.swapaxes(w, 1, 2).reshape(rows, *rest)


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face parameter name of a GGUF tensor name, or None if there is none."""
    base, _, kind = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES and kind in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[base]}.{kind}"
    m = _LAYER_TENSOR.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def gguf_weights(
    tensors: dict[str, mx.array],
    config: dict[str, Any],
    path: str | Path,
    dtype: str = "float32",
) -> dict[str, mx.array]:
    """Dense weights under Hugging Face names, in `dtype`, with llama q/k rows restored."""
    out_dtype = _mx_dtype(dtype)
    permuted = config["model_type"] == "llama"
    weights = {}
    for name in sorted(tensors):
        if name.endswith((".scales", ".biases")):
            continue
        target = hf_name(name)
        if target is None:
            raise GGUFError(f"{path}: unexpected tensor {name!r} for {config['model_type']}")
        value = _dense(tensors, name)
        if permuted and ".self_attn.q_proj." in target:
            value = unpermute_rope(value, config["num_attention_heads"])
        elif permuted and ".self_attn.k_proj." in target:
            value = unpermute_rope(value, config["num_key_value_heads"])
        weights[target] = value.astype(out_dtype)
    return weights


def _mx_dtype(dtype: str) -> mx.Dtype:
    return parse_dtype(dtype, "dtype", GGUFError)


def _pre_tokenizer(pre: str, path: Path):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2_PRES:
        return byte_level
    if pre in _DIGIT_PRES:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _REGEX_PRES:
        split = pre_tokenizers.Split(Regex(_REGEX_PRES[pre]), behavior="isolated")
        return pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    known = sorted(_GPT2_PRES | _DIGIT_PRES | set(_REGEX_PRES))
    raise GGUFError(
        f"{path}: unsupported tokenizer.ggml.pre {pre!r} (supported: {', '.join(known)})"
    )


def gguf_tokenizer(metadata: dict[str, Any], path: str | Path):
    """A `tokenizers.Tokenizer` (byte-level BPE) rebuilt from the GGUF tokenizer metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    path = Path(path)
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(
            f"{path}: unsupported tokenizer.ggml.model {kind!r} (only byte-level BPE 'gpt2')"
        )
    tokens = metadata.get("tokenizer.ggml.tokens")
    merges = metadata.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise GGUFError(f"{path}: tokenizer.ggml.tokens or tokenizer.ggml.merges is missing")
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise GGUFError(f"{path}: {len(types)} token types for {len(tokens)} tokens")
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    pre = metadata.get("tokenizer.ggml.pre", "default")
    tok.pre_tokenizer = _pre_tokenizer(pre, path)
    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()  # as in Qwen2's own tokenizer.json
    tok.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|>, ...) must match before BPE so they stay one id each.
    control = [
        AddedToken(t, special=True, normalized=False)
        for t, k in zip(tokens, types, strict=True)
        if k == _TOKEN_CONTROL
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, k in zip(tokens, types, strict=True)
        if k == _TOKEN_USER_DEFINED
    ]
    tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)

    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    eos_id = metadata.get("tokenizer.ggml.eos_token_id")
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False)) and bos_id is not None
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and eos_id is not None
    if add_bos or add_eos:
        bos = [(tokens[bos_id], bos_id)] if add_bos else []
        eos = [(tokens[eos_id], eos_id)] if add_eos else []
        single = " ".join([f"{t}:0" for t, _ in bos] + ["$A:0"] + [f"{t}:0" for t, _ in eos])
        pair = (
            single
            + " "
            + " ".join([f"{t}:1" for t, _ in bos] + ["$B:1"] + [f"{t}:1" for t, _ in eos])
        )
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=bos + eos
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def tokenizer_files(metadata: dict[str, Any], config: dict[str, Any]) -> dict[str, dict]:
    """tokenizer_config.json, special_tokens_map.json and generation_config.json contents."""
    tokens = metadata["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[token_id] if token_id is not None and token_id < len(tokens) else None

    special = {
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
    }
    special = {k: v for k, v in special.items() if v is not None}
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.get("max_position_embeddings") or 2048,
    }
    template = metadata.get("tokenizer.chat_template")
    if template:
        tokenizer_config["chat_template"] = template

    eos_ids = [
        metadata[k]
        for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
        if metadata.get(k) is not None
    ]
    eos_ids = list(dict.fromkeys(eos_ids))
    generation: dict[str, Any] = {}
    if "bos_token_id" in config:
        generation["bos_token_id"] = config["bos_token_id"]
    if eos_ids:
        generation["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    if "pad_token_id" in config:
        generation["pad_token_id"] = config["pad_token_id"]
    return {
        "tokenizer_config.json": tokenizer_config,
        "special_tokens_map.json": special,
        "generation_config.json": generation,
    }


def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    dtype: str = "float32",
    *,
    overwrite: bool = False,
) -> Path:
    """Write an MLX model directory (config.json, model.safetensors, tokenizer) from a GGUF.

    Weights are dense in `dtype`. The directory is assembled next to `out_dir` and renamed into
    place at the end, so a failure leaves no half-written output.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    _mx_dtype(dtype)
    if out_dir.exists() and not overwrite:
        raise GGUFError(f"{out_dir}: output directory already exists")
    tensors, metadata = read_gguf(gguf_path)
    config = gguf_config(metadata, tensors, gguf_path)
    config["torch_dtype"] = dtype
    tokenizer = gguf_tokenizer(metadata, gguf_path)
    if len(metadata["tokenizer.ggml.tokens"]) > config["vocab_size"]:
        raise GGUFError(
            f"{gguf_path}: {len(metadata['tokenizer.ggml.tokens'])} tokens but an embedding "
            f"of {config['vocab_size']} rows"
        )
    weights = gguf_weights(tensors, config, gguf_path, dtype)
    del tensors

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        mx.save_safetensors(
            str(tmp / "model.safetensors"),
            weights,
            metadata={"format": "mlx", "source": f"gguf:{gguf_path.name}"},
        )
        _write_json(tmp / "config.json", config)
        tokenizer.save(str(tmp / "tokenizer.json"))
        for name, content in tokenizer_files(metadata, config).items():
            _write_json(tmp / name, content)
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_json(path: Path, content: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2, ensure_ascii=False)
        f.write("\n")
