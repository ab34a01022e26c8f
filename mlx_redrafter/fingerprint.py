"""Which base model a drafter, or a drafter's training data, belongs to: a fingerprint of its
shape and a sample of its embedding, compared up to rounding."""

from __future__ import annotations

import mlx.core as mx
import numpy as np


def model_fingerprint(model) -> dict:
    """What identifies a base model for the data and the drafter: shape plus an embedding sample."""
    args = model.args
    n = min(256, args.vocab_size)
    sample = np.array(model.embed(mx.arange(n)).astype(mx.float32), dtype=np.float64)
    sums = sample.reshape(8, -1).sum(axis=1) if n % 8 == 0 else sample.sum(axis=1)[:8]
    return {
        "model_type": args.model_type,
        "hidden_size": args.hidden_size,
        "num_hidden_layers": args.num_hidden_layers,
        "vocab_size": args.vocab_size,
        "embedding_checksum": [round(float(x), 4) for x in sums],
    }


def same_model(a: dict, b: dict) -> bool:
    """Whether two fingerprints are of the same base model (the checksums up to rounding)."""
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
    if any(a.get(k) != b.get(k) for k in keys):
        return False
    x, y = np.array(a["embedding_checksum"]), np.array(b["embedding_checksum"])
    return x.shape == y.shape and bool(np.allclose(x, y, rtol=1e-2, atol=1e-2))


def describe_model(fp: dict) -> str:
    return (
        f"{fp['model_type']}, hidden {fp['hidden_size']}, {fp['num_hidden_layers']} layers, "
        f"vocab {fp['vocab_size']}"
    )
