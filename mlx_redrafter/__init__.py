"""mlx-redrafter: Recurrent Drafter speculative decoding, native to MLX."""

from .blas import ensure_blas as _ensure_blas

_ensure_blas()  # before anything imports mlx.core

__version__ = "0.1.0"

_LAZY = {
    "load": "loading",
    "load_model": "loading",
    "load_tokenizer": "loading",
    "load_drafter": "drafter",
    "init_drafter": "drafter",
    "save_drafter": "drafter",
    "generate": "generation",
    "stream_generate": "generation",
    "GenerationResponse": "generation",
    "JsonGrammar": "constrain",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    # Lazy so that `import mlx_redrafter` stays cheap and fixes the BLAS before mlx loads.
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'mlx_redrafter' has no attribute {name!r}")
