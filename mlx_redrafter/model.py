"""Llama-family base model (llama, mistral, qwen2, qwen3) with explicit positions and masks.

`model(tokens, cache, positions, mask) -> (hidden, logits)`: hidden is the last hidden state
after the final norm (what the drafter conditions on). A position per token and an arbitrary
boolean mask let a packed tree of draft tokens be verified in one forward pass.
Parameter names follow Hugging Face (and mlx-lm), so checkpoints load unchanged.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache, LayerCache

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one this package implements."""


@dataclass
class ModelArgs:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    rms_norm_eps: float
    vocab_size: int
    head_dim: int | None = None
    max_position_embeddings: int | None = None
    num_key_value_heads: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope_traditional: bool = False
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = True
    quantization: dict[str, Any] | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"unsupported model_type {self.model_type!r} "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        # Qwen2 always has q/k/v biases (and no o_proj bias); its config has no flag for it.
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        config = dict(config)
        # transformers >= 5 keeps rope settings under "rope_parameters".
        rope = config.get("rope_parameters")
        if isinstance(rope, dict):
            config.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
            if rope.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
                config["rope_scaling"] = rope
        if "model_type" not in config:
            raise UnsupportedModelError("config has no model_type")
        names = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in config.items() if k in names})


def _llama3_freqs(head_dim: int, base: float, scaling: dict[str, Any]) -> mx.array:
    """Frequencies (as periods, the form mx.fast.rope's `freqs` takes) for llama3 rope scaling."""
    factor = scaling["factor"]
    low = scaling.get("low_freq_factor", 1.0)
    high = scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling.get("original_max_position_embeddings", 8192)
    low_wavelen = old_ctx / low
    high_wavelen = old_ctx / high
    periods = base ** (mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim)
    wavelens = 2 * math.pi * periods
    periods = mx.where(wavelens > low_wavelen, periods * factor, periods)
    smooth = (old_ctx / wavelens - low) / (high - low)
    smoothed = periods / ((1 - smooth) / factor + smooth)
    is_medium = (wavelens > high_wavelen) & (wavelens < low_wavelen)
    return mx.where(is_medium, smoothed, periods)


class RoPE(nn.Module):
    """Rotary embedding that takes a scalar offset or one position per token."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.dims = args.head_dim
        self.traditional = args.rope_traditional
        self.base: float | None = args.rope_theta
        self.scale = 1.0
        self._freqs = None
        scaling = args.rope_scaling or {}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type == "linear":
            self.scale = 1.0 / scaling["factor"]
        elif rope_type == "llama3":
            self._freqs = _llama3_freqs(self.dims, args.rope_theta, scaling)
            self.base = None
        elif rope_type not in ("default", None):
            raise UnsupportedModelError(f"unsupported rope_scaling type {rope_type!r}")

    def _rope(self, x: mx.array, offset) -> mx.array:
        return mx.fast.rope(
            x,
            self.dims,
            traditional=self.traditional,
            base=self.base,
            scale=self.scale,
            offset=offset,
            freqs=self._freqs,
        )

    def __call__(self, x: mx.array, offset: int = 0, positions: mx.array | None = None):
        if positions is None:
            return self._rope(x, offset)
        # x: (B, H, T, D); positions: (B, T). mx.fast.rope takes one offset per batch row, so
        # move tokens into the batch axis: (B*T, H, 1, D) with offsets (B*T,).
        B, H, T, D = x.shape
        y = x.transpose(0, 2, 1, 3).reshape(B * T, H, 1, D)
        y = self._rope(y, positions.reshape(-1))
        return y.reshape(B, T, H, D).transpose(0, 2, 1, 3)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim = args.hidden_size
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = self.head_dim**-0.5
        bias = args.qkv_bias
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=args.attention_bias)
        if args.qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.rope = RoPE(args)

    def __call__(self, x, mask, cache: LayerCache | None, offset: int, positions):
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # (B, H, T, D)
        q = self.rope(q, offset, positions)
        k = self.rope(k, offset, positions)
        if cache is not None:
            k, v = cache.update(k, v)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hidden = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(dim, hidden, bias=args.mlp_bias)
        self.up_proj = nn.Linear(dim, hidden, bias=args.mlp_bias)
        self.down_proj = nn.Linear(hidden, dim, bias=args.mlp_bias)

    def __call__(self, x):
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x, mask, cache, offset, positions):
        h = x + self.self_attn(self.input_layernorm(x), mask, cache, offset, positions)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = LlamaModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(
        self,
        tokens: mx.array,
        cache: KVCache | None = None,
        positions: mx.array | None = None,
        mask: mx.array | str | None = None,
        return_logits: bool = True,
    ) -> tuple[mx.array, mx.array | None]:
        """tokens (B, T) int32 -> (hidden (B, T, h), logits (B, T, V) or None).

        positions: (B, T) int32, default `offset + arange(T)` with offset = cache.offset.
        mask: boolean (B, 1, T, S) with True = attend and S = cache.offset + T, or "causal",
        or None (causal for T > 1). With a cache, the T new K/V entries are written at
        cache.offset; cache.commit(...) decides which of them stay.
        """
        T = tokens.shape[1]
        offset = cache.offset if cache is not None else 0
        if mask is None and T > 1:
            mask = "causal"
        if positions is not None:
            positions = positions.astype(mx.int32)
        h = self.model.embed_tokens(tokens)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, mask, cache.layers[i] if cache is not None else None, offset, positions)
        if cache is not None:
            cache.written(T)
        hidden = self.model.norm(h)
        return hidden, (self.logits(hidden) if return_logits else None)

    def logits(self, hidden: mx.array) -> mx.array:
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(hidden)
        return self.lm_head(hidden)

    def embed(self, tokens: mx.array) -> mx.array:
        """The base model's token embedding (the drafter's input embedding)."""
        return self.model.embed_tokens(tokens)

    def make_cache(self, max_size: int | None = None) -> KVCache:
        return KVCache(len(self.model.layers), max_size=max_size)

    @property
    def layers(self):
        return self.model.layers

    @property
    def context_length(self) -> int | None:
        return self.args.max_position_embeddings

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop checkpoint entries that are not parameters (rotary buffers, tied heads)."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
            weights.pop("lm_head.scales", None)
            weights.pop("lm_head.biases", None)
        return weights
