"""Llama-family base model (llama, mistral, qwen2, qwen3) with explicit positions and masks.

`model(tokens, cache, positions, mask) -> (hidden, logits)`: hidden is the last hidden state
after the final norm (what the drafter conditions on). A position per token and an arbitrary
boolean mask let a packed tree of draft tokens be verified in one forward pass.
Parameter names follow Hugging Face (and mlx-lm), so checkpoints load unchanged.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .cache import KVCache, LayerCache
from .env import fast_path
from .errors import DrafterError, UnsupportedModelError
from .kernels import (  # noqa: F401  (re-exported: accept.py and bench import them from here)
    additive_mask,
    fast_attention,
    fast_exp,
    fast_kernels_available,
    fast_silu_mul,
    kernel,
)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


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


def fuse_linears(linears: list[nn.Module]) -> nn.Module | None:
    """One layer computing the given layers' outputs concatenated along the last axis.

    Works for `nn.Linear` and for `nn.QuantizedLinear` with one quantization (the packed
    rows of a quantized weight are independent, so stacking rows stays exact); returns None
    for anything else. The result is bit-identical per output row up to the matmul's own
    blocking, which is why the fused model is tested against the unfused one.
    """
    first = linears[0]
    kind = type(first)
    if kind not in (nn.Linear, nn.QuantizedLinear) or any(type(m) is not kind for m in linears):
        return None
    has_bias = "bias" in first
    if any(("bias" in m) != has_bias for m in linears):
        return None
    fused = kind.__new__(kind)
    nn.Module.__init__(fused)
    if kind is nn.QuantizedLinear:
        settings = {(m.group_size, m.bits, m.mode, "biases" in m) for m in linears}
        if len(settings) != 1:
            return None
        fused.group_size, fused.bits, fused.mode = first.group_size, first.bits, first.mode
        fused.scales = mx.concatenate([m.scales for m in linears], axis=0)
        if "biases" in first:
            fused.biases = mx.concatenate([m.biases for m in linears], axis=0)
        else:
            fused.biases = None
    fused.weight = mx.concatenate([m.weight for m in linears], axis=0)
    if has_bias:
        fused.bias = mx.concatenate([m.bias for m in linears], axis=0)
    if kind is nn.QuantizedLinear:
        fused.freeze()
    return fused


# ---------------------------------------------------------------------------------------------
# The forward

_ROPE_TABLES: dict[tuple, tuple[mx.array, mx.array]] = {}
# Passes of up to this many tokens (tree verification) run each block's MLP half compiled.
COMPILE_MAX_TOKENS = 64


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
        freqs = None if self._freqs is None else tuple(np.array(self._freqs).tolist())
        self._table_key = (self.dims, self.base, self.scale, freqs)

    def table(self, size: int) -> tuple[mx.array, mx.array]:
        """cos and sin of every position's angles, float32 (P, dims / 2) with P >= size.

        The angles are those of mx.fast.rope (position * scale / period), computed in
        float64; the table is shared by all layers and grows by doubling.
        """
        cached = _ROPE_TABLES.get(self._table_key)
        if cached is None or cached[0].shape[0] < size:
            rows = max(1024, 1 << max(0, size - 1).bit_length())
            if self._freqs is None:
                periods = self.base ** (np.arange(0, self.dims, 2, dtype=np.float64) / self.dims)
            else:
                periods = np.array(self._freqs, dtype=np.float64)
            angles = np.arange(rows, dtype=np.float64)[:, None] * self.scale / periods[None]
            cached = (mx.array(np.cos(angles), mx.float32), mx.array(np.sin(angles), mx.float32))
            _ROPE_TABLES[self._table_key] = cached
        return cached

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

    def __call__(self, x: mx.array, offset: int = 0, positions: mx.array | None = None, fast=False):
        """x (B, T, H, D), the projection's own layout -> rotated (B, H, T, D).

        With positions (B, T), each token gets its own: mx.fast.rope takes one offset per
        batch row, and (B, T, H, D) is already (B*T, H, 1, D) in memory, so the tokens sit
        on the batch axis without a copy and only the result is transposed (once).
        fast: rotate with rows of `table` (gathered per token: positions must be below
        offset + T, as every causal use has them), which costs fewer ops on the CPU than
        mx.fast.rope there; half-split (non-traditional) RoPE only.
        """
        B, T, H, D = x.shape
        if fast and not self.traditional:
            cos, sin = self.table(offset + T)
            if positions is None:
                cos, sin = cos[offset : offset + T, None], sin[offset : offset + T, None]
            else:
                cos, sin = cos[positions][..., None, :], sin[positions][..., None, :]
            return kernel("rope")(x, cos, sin).transpose(0, 2, 1, 3)
        if positions is None:
            return self._rope(x.transpose(0, 2, 1, 3), offset)
        y = self._rope(x.reshape(B * T, H, 1, D), positions.reshape(-1))
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

    def fuse(self) -> bool:
        """Replace q/k/v_proj by one `qkv_proj` (rows stacked q, k, v); False if they differ."""
        fused = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        if fused is None:
            return False
        self.qkv_proj = fused
        del self.q_proj, self.k_proj, self.v_proj
        return True

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """x (B, T, dim) -> q (B, T, H, D), k and v (B, T, H_kv, D)."""
        B, T, _ = x.shape
        D = self.head_dim
        if "qkv_proj" in self:
            qkv = self.qkv_proj(x)
            split = [self.n_heads * D, (self.n_heads + self.n_kv_heads) * D]
            q, k, v = mx.split(qkv, split, axis=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(B, T, self.n_heads, D)
        k = k.reshape(B, T, self.n_kv_heads, D)
        v = v.reshape(B, T, self.n_kv_heads, D)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def __call__(self, x, mask, cache: LayerCache | None, offset: int, positions, fast=False):
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q = self.rope(q, offset, positions, fast)  # (B, H, T, D)
        k = self.rope(k, offset, positions, fast)
        v = v.transpose(0, 2, 1, 3)
        if cache is not None:
            k, v = cache.update(k, v)
        if fast:
            out = fast_attention(q, k, v, self.scale, mask)
        else:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hidden = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(dim, hidden, bias=args.mlp_bias)
        self.up_proj = nn.Linear(dim, hidden, bias=args.mlp_bias)
        self.down_proj = nn.Linear(hidden, dim, bias=args.mlp_bias)

    def fuse(self) -> bool:
        """Replace gate/up_proj by one `gate_up_proj` (rows stacked gate, up)."""
        fused = fuse_linears([self.gate_proj, self.up_proj])
        if fused is None:
            return False
        self.gate_up_proj = fused
        del self.gate_proj, self.up_proj
        return True

    def __call__(self, x, fast=False):
        if "gate_up_proj" in self:
            gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(fast_silu_mul(gate, up) if fast else nn.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x, mask, cache, offset, positions, fast=False):
        h = x + self.self_attn(self.input_layernorm(x), mask, cache, offset, positions, fast)
        if fast and 1 < h.shape[1] <= COMPILE_MAX_TOKENS:
            # Verify-sized passes: the norm, MLP and residual as one compiled graph, traced
            # once per token count (a bounded set). Same arithmetic, fewer dispatches.
            if self._compiled_mlp is None:
                self._compiled_mlp = mx.compile(self._mlp_residual)
            return self._compiled_mlp(h)
        return self._mlp_residual(h, fast)

    _compiled_mlp = None  # built on first use; `Model.optimize` drops it (weights are baked in)

    def _mlp_residual(self, h, fast=True):
        return h + self.mlp(self.post_attention_layernorm(h), fast)


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
        # CPU float32: attention softmax and SiLU through the compiled exp (see `optimize`).
        self.fast_kernels = False

    def optimize(self, fuse: bool = True, fast_kernels: bool | None = None) -> Model:
        """Speed up inference in place; the weights on disk keep mlx-lm's names.

        fuse: q/k/v and gate/up projections become one matmul each (where their layers
        have the same type and quantization). fast_kernels: the compiled CPU exp for the
        attention softmax and the SiLU; None = on when the default device is the CPU and the
        compiled kernels run. MLX_REDRAFTER_FAST=0 in the environment turns both off (the
        escape hatch, and the "before" of the benchmarks).
        """
        if not fast_path():
            return self
        for layer in self.model.layers:
            layer._compiled_mlp = None
            if fuse:
                layer.self_attn.fuse()
                layer.mlp.fuse()
        if fast_kernels is None:
            fast_kernels = mx.default_device() == mx.cpu and fast_kernels_available()
        self.fast_kernels = bool(fast_kernels)
        return self

    @property
    def fused(self) -> bool:
        return "qkv_proj" in self.model.layers[0].self_attn

    def __call__(
        self,
        tokens: mx.array,
        cache: KVCache | None = None,
        positions: mx.array | None = None,
        mask: mx.array | str | None = None,
        return_logits: bool = True,
        features: Sequence[int] = (),
    ) -> tuple[mx.array, mx.array | None]:
        """tokens (B, T) int32 -> (hidden (B, T, h), logits (B, T, V) or None).

        features: block indices whose outputs are appended to the hidden state, each
        RMS-normalised (no weight): hidden is then (B, T, (1 + len(features)) * h), the
        post-norm last layer first (what a multi-layer drafter reads; `logits` reads only the
        first h columns). The states come from this same pass.

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
        fast = self.fast_kernels and h.dtype == mx.float32
        if fast and mask is not None:
            mask = additive_mask(mask, T, offset + T)  # once per forward, not per layer
        if features:
            self.check_features(features)
        taken = {}
        for i, layer in enumerate(self.model.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            h = layer(h, mask, layer_cache, offset, positions, fast)
            if i in features:
                taken[i] = mx.fast.rms_norm(h, None, self.args.rms_norm_eps)
        if cache is not None:
            cache.written(T)
        hidden = self.model.norm(h)
        logits = self.logits(hidden) if return_logits else None
        if features:
            hidden = mx.concatenate([hidden] + [taken[i] for i in features], axis=-1)
        return hidden, logits

    def check_features(self, features: Sequence[int]) -> None:
        """Raise DrafterError unless `features` are distinct block indices of this model."""
        n = len(self.model.layers)
        if len(set(features)) != len(features) or any(not 0 <= i < n for i in features):
            raise DrafterError(
                f"feature layers {list(features)} must be distinct block indices in 0..{n - 1}"
            )

    def logits(self, hidden: mx.array) -> mx.array:
        """Logits from the post-norm hidden state (the first h columns of a hidden state that
        carries feature layers)."""
        if hidden.shape[-1] != self.args.hidden_size:
            hidden = hidden[..., : self.args.hidden_size]
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
