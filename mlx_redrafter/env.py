"""What this process runs on: the device, the default dtype, dtype names, the BLAS, versions.

A leaf: it imports nothing of this package but the BLAS loader, so every other module can ask
it. Benchmarks, training logs and `mlx-redrafter info` describe the machine from here.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time

import mlx.core as mx

from . import __version__
from .blas import blas_in_use

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def fast_path() -> bool:
    """Whether the fast path (fused projections, compiled CPU kernels) is on: unless
    MLX_REDRAFTER_FAST=0. Tuned verify-cost curves are stored per setting."""
    return os.environ.get("MLX_REDRAFTER_FAST", "1") != "0"


def parse_dtype(name: str, what: str, error: type[Exception] = ValueError) -> mx.Dtype:
    """The MLX dtype called `name`; `error` naming `what` (a file, an option) otherwise."""
    if name not in DTYPES:
        raise error(f"{what}: unsupported dtype {name!r} (use float32, float16 or bfloat16)")
    return DTYPES[name]


def dtype_name(dtype) -> str:
    """'float32' for mx.float32 (any MLX dtype)."""
    return str(dtype).rsplit(".", 1)[-1]


def default_dtype() -> str:
    """float16 on Metal (fast there); float32 elsewhere (float16 is slow on x86 CPUs)."""
    return "float16" if mx.metal.is_available() else "float32"


def compute_dtype(model):
    """The dtype a model computes in: that of its final norm's weight (the embedding may be
    quantized), or None when it cannot be told."""
    norm = getattr(getattr(model, "model", None), "norm", None)
    weight = getattr(norm, "weight", None)
    return getattr(weight, "dtype", None)


def model_dtype(model) -> str:
    """The compute dtype's name, with the quantization if there is one: 'float32, 4-bit weights'."""
    dtype = compute_dtype(model)
    name = dtype_name(dtype) if dtype is not None else "unknown"
    q = getattr(getattr(model, "args", None), "quantization", None)
    return f"{name}, {q['bits']}-bit weights" if q else name


def device_name() -> str:
    """A human description of the MLX default device, e.g. 'cpu (x86_64, 2 cores)'."""
    dev = mx.default_device()
    if dev.type == mx.gpu:
        try:
            name = mx.device_info().get("device_name", "")
        except Exception:  # older mlx or a backend without device_info
            name = ""
        backend = "metal" if mx.metal.is_available() else "cuda"
        return f"gpu ({backend}{', ' + name if name else ''})"
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def mlx_lm_version() -> str:
    try:
        import mlx_lm  # heavy; only its version is wanted
    except ImportError:
        return "not installed"
    return mlx_lm.__version__


def machine() -> dict:
    """Device, BLAS and versions: what every benchmark and training log records."""
    return {
        "device": device_name(),
        "cpu_count": os.cpu_count(),
        "blas": blas_in_use(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm_version(),
        "mlx_redrafter": __version__,
        "python": platform.python_version(),
    }


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def matmul_ms(size: int = 1024, repeats: int = 10) -> float:
    """Median time of one float32 (size x size) @ (size x size) matmul in this process, in ms."""
    a = mx.random.normal((size, size))
    b = mx.random.normal((size, size))
    mx.eval(a, b, a @ b)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - t)
    times.sort()
    return 1000 * times[len(times) // 2]


def compare_blas(size: int = 1024, repeats: int = 10) -> list[dict]:
    """Matmul time with each BLAS, each measured in a fresh process (the BLAS is per process)."""
    code = (
        "import json, mlx_redrafter.env as e; "
        f"print(json.dumps({{'blas': e.blas_in_use(), 'ms': e.matmul_ms({size}, {repeats})}}))"
    )
    rows = []
    for choice in ("bundled", ""):
        env = dict(os.environ)
        env.pop("MLX_REDRAFTER_BLAS", None)
        if choice:
            env["MLX_REDRAFTER_BLAS"] = choice
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["label"] = "bundled" if choice else row["blas"].split(" (")[0]
        rows.append({"size": size, **row})
    return rows
