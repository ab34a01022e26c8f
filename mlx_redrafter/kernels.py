"""Compiled CPU kernels for the base model's forward: a polynomial exp, SiLU-and-multiply,
softmax attention and half-split RoPE (`Model.optimize` turns them on; acceptance uses the exp).
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx

# CPU kernels. MLX's CPU `exp` costs ~25 ns an element on x86 (numpy's ~3 ns), and the
# softmax over the cache and the SiLU are the work that grows with the number of verified
# tokens. A compiled polynomial exp runs ~5x faster: exp(x) = 2**k * e**r with
# k = round(x / ln 2), r = x - k ln 2 (in two parts, Cody-Waite, so r is exact to float32)
# and e**r from its degree-7 Taylor polynomial (|r| <= ln(2)/2: truncation error < 6e-9).
# Used only on the CPU and for float32.

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693359375  # few mantissa bits: k * _LN2_HI is exact for |k| <= 127
_LN2_LO = -2.12194440e-4
_EXP_COEFFS = [1.0 / math.factorial(i) for i in range(8)]


def _exp_parts(x: mx.array) -> tuple[mx.array, mx.array]:
    """exp(x) = mantissa * 2**k: the mantissa e**r (float32) and 2**k's float32 bits (int32).
    2**-127 and below flush to exactly 0 (bits 0), so exp(-inf) is 0."""
    k = mx.floor(mx.clip(x * _LOG2E, -127.0, 127.0) + 0.5)
    r = (mx.clip(x, -200.0, 200.0) - k * _LN2_HI) - k * _LN2_LO
    mantissa = _EXP_COEFFS[-1]
    for c in reversed(_EXP_COEFFS[:-1]):
        mantissa = mantissa * r + c
    return mantissa, (k.astype(mx.int32) + 127) << 23


def _shifted_exp_parts(x: mx.array, shift: mx.array) -> tuple[mx.array, mx.array]:
    return _exp_parts(x - shift)


def _silu_mul_finish(gate, up, mantissa, power):
    return gate / (1.0 + mantissa * power) * up


def _rotate_half(x, cos, sin):
    """Half-split RoPE: x (..., D), cos and sin broadcastable to (..., D / 2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


_kernels: dict[str, Any] = {}


def kernel(name: str):
    """The compiled kernel `name` (exp, shifted_exp, silu_mul, rope), compiled on first use."""
    if not _kernels:
        # Bit views cannot be traced shapeless, so they stay outside the compiled parts.
        _kernels["exp"] = mx.compile(_exp_parts, shapeless=True)
        _kernels["shifted_exp"] = mx.compile(_shifted_exp_parts, shapeless=True)
        _kernels["silu_mul"] = mx.compile(_silu_mul_finish, shapeless=True)
        _kernels["rope"] = mx.compile(_rotate_half)  # traced once per token count
    return _kernels[name]


def fast_kernels_available() -> bool:
    """Whether the compiled CPU kernels run here (they need a C++ compiler at run time)."""
    if "ok" not in _kernels:
        try:
            mantissa, bits = kernel("exp")(mx.array([0.0, -1.0, float("-inf")]))
            got = mantissa * mx.view(bits, mx.float32)
            _kernels["ok"] = bool(mx.allclose(got, mx.exp(mx.array([0.0, -1.0, -1e9]))).item())
        except Exception:  # no compiler, or a backend without compile support
            _kernels["ok"] = False
    return _kernels["ok"]


def fast_exp(x: mx.array) -> mx.array:
    """float32 exp through the compiled polynomial (see above)."""
    mantissa, bits = kernel("exp")(x)
    return mantissa * mx.view(bits, mx.float32)


def fast_silu_mul(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up = gate / (1 + exp(-gate)) * up."""
    mantissa, bits = kernel("exp")(-gate)
    return kernel("silu_mul")(gate, up, mantissa, mx.view(bits, mx.float32))


def additive_mask(mask, T: int, S: int) -> mx.array:
    """ "causal" or a boolean mask (.., T, S) -> float32 0 / -inf; an additive one as it is."""
    if isinstance(mask, str):
        # Lower-right aligned, as SDPA's "causal": query i sits at key S - T + i.
        mask = mx.arange(S)[None] <= (S - T + mx.arange(T))[:, None]  # (T, S)
    if mask.dtype == mx.bool_:
        mask = mx.where(mask, mx.array(0.0, mx.float32), mx.array(-mx.inf, mx.float32))
    return mask


def fast_attention(q, k, v, scale: float, mask) -> mx.array:
    """Softmax attention as `mx.fast.scaled_dot_product_attention` computes it, with the
    query heads of each KV head folded into one matmul and the compiled exp.

    q (B, H, T, D); k, v (B, H_kv, S, D); mask None, "causal", bool (.., T, S) with
    True = attend, or additive (.., T, S). Returns (B, H, T, D).
    """
    B, H, T, D = q.shape
    n_kv, S = k.shape[1], k.shape[2]
    rep = H // n_kv
    scores = (q * scale).reshape(B, n_kv, rep * T, D) @ k.swapaxes(-1, -2)  # (B, H_kv, rT, S)
    if mask is not None:
        mask = additive_mask(mask, T, S)
        mask = mask.reshape((-1, 1, 1, T, S)) if mask.ndim == 4 else mask
        scores = (scores.reshape(B, n_kv, rep, T, S) + mask).reshape(B, n_kv, rep * T, S)
    mantissa, bits = kernel("shifted_exp")(scores, mx.max(scores, axis=-1, keepdims=True))
    weights = mantissa * mx.view(bits, mx.float32)
    weights = weights / weights.sum(axis=-1, keepdims=True)
    out = weights.astype(v.dtype) @ v  # (B, H_kv, rep * T, D)
    return out.reshape(B, H, T, D)
