"""Shared test helpers (plain functions; the pytest fixtures are in conftest.py).

Tiny on-disk models for CLI tests: a random Llama with a real (byte-level BPE) tokenizer and
a ChatML template, readable by `mlx_redrafter.loading.load` and by `mlx_lm.load`, plus a
random drafter for it. Nothing is downloaded. Tiny in-memory models: their configs, the model
families, random weights, a literal draft tree. Comparing numbers computed in different orders.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "the quick brown fox jumps over the lazy dog. " * 4,
    "Hello world, how are you today? I am fine, thank you for asking.",
    "Write a short poem about the sea. Tell me a story about a cat and a hat.",
    "Compose an engaging travel blog post about a recent trip to Hawaii.",
    "What is 12 + 30? The answer is 42. Explain why the sky is blue.",
    "system user assistant You are a helpful assistant.",
]


def save_tokenizer(tok, path: Path, config: dict, indent: int | None = None) -> None:
    """Write a `tokenizers.Tokenizer` as path/tokenizer.json, and path/tokenizer_config.json
    for a PreTrainedTokenizerFast with `config`'s keys."""
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **config}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=indent))


def write_tokenizer(path: Path, vocab_size: int = 320) -> int:
    """A byte-level BPE over printable ASCII only, so random models print readable text.
    Returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Byte-level symbols of printable ASCII map to themselves; space and newline do not.
    alphabet = [chr(c) for c in range(33, 127)] + ["Ġ", "Ċ"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 4096,
        "chat_template": CHATML,
        "added_tokens_decoder": {
            str(i): {
                "content": s,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, s in enumerate(SPECIAL)
        },
    }
    save_tokenizer(tok, path, config, indent=2)
    return tok.get_vocab_size()


def write_tiny_model(
    path: Path,
    seed: int = 0,
    context_length: int = 4096,
    layers: int = 2,
    hidden: int = 64,
) -> Path:
    """A random llama directory (config.json, model.safetensors, tokenizer) at `path`."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_redrafter.model import Model, ModelArgs

    vocab = write_tokenizer(path)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "max_position_embeddings": context_length,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": 2,  # <|im_end|>
        "torch_dtype": "float32",
    }
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    # Larger-than-default weights spread the logits, so greedy choices have clear margins.
    params = {}
    for k, v in tree_flatten(model.parameters()):
        if "norm" in k:
            params[k] = 1.0 + 0.1 * mx.random.normal(v.shape)
        else:
            params[k] = mx.random.normal(v.shape) * (1.0 if "embed" in k else hidden**-0.5)
    mx.save_safetensors(str(path / "model.safetensors"), params, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def write_tiny_drafter(model_dir: Path, path: Path, seed: int = 0) -> Path:
    from mlx_redrafter.drafter import init_drafter, save_drafter
    from mlx_redrafter.loading import load_model

    return save_drafter(init_drafter(load_model(model_dir), seed=seed), path)


def cli_env(config_dir: Path | None = None) -> dict[str, str]:
    """Environment for running the CLI in a subprocess: offline, isolated config dir."""
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("MLX_REDRAFTER_DEBUG", None)
    if config_dir is not None:
        env["MLX_REDRAFTER_CONFIG_DIR"] = str(config_dir)
    return env


def run_cli(args: list[str], env=None, input: str | None = None, timeout: float = 300):
    """Run `python cli.py ARGS` from the repository root; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "cli.py"), *args],
        input=input,
        capture_output=True,
        text=True,
        env=env or cli_env(),
        cwd=REPO_ROOT,
        timeout=timeout,
    )


class Invoked:
    """What an in-process CLI call returned (the fields of CompletedProcess that tests read)."""

    def __init__(self, result):
        self.returncode = result.exit_code
        self.stdout = result.stdout
        self.stderr = result.stderr
        self.exception = result.exception


def invoke(args: list[str], env: dict[str, str] | None = None, input: str | None = None):
    """Run the CLI in this process (no interpreter start-up or re-import: much faster than
    `run_cli`); `env` entries are set for the call only (None unsets one)."""
    import tempfile

    from typer.testing import CliRunner

    from mlx_redrafter.cli import app

    extra = {"HF_HUB_OFFLINE": "1", "MLX_REDRAFTER_DEBUG": None, **(env or {})}
    if extra.get("MLX_REDRAFTER_CONFIG_DIR"):
        return Invoked(CliRunner().invoke(app, args, input=input, env=extra))
    # Never read or write the user's own tuned shapes: a config dir of the call's own, removed
    # after it.
    with tempfile.TemporaryDirectory(prefix="mlx-redrafter-cfg-") as config_dir:
        extra["MLX_REDRAFTER_CONFIG_DIR"] = config_dir
        return Invoked(CliRunner().invoke(app, args, input=input, env=extra))


# ---------------------------------------------------------------------------------------------
# Tiny random models


def tiny_llama_config(
    vocab_size: int,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    intermediate_size: int | None = None,
    num_key_value_heads: int = 2,
    **extra,
) -> dict:
    """A tiny llama config: 4 attention heads, RMS-norm eps 1e-5, an MLP twice as wide as the
    hidden size unless told; `extra` keys (max_position_embeddings, tie_word_embeddings, ...)
    follow in their order."""
    return dict(
        model_type="llama",
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_attention_heads=4,
        num_key_value_heads=num_key_value_heads,
        rms_norm_eps=1e-5,
        vocab_size=vocab_size,
        **extra,
    )


# The base config of the model-family tests (test_model, test_fused): each family, those below
# and each file's own, sets its model_type and keys on top.
TINY_ARGS = tiny_llama_config(
    101, 64, intermediate_size=96, max_position_embeddings=256, rope_theta=10000.0
)

TINY_FAMILIES = {
    "llama": dict(model_type="llama", tie_word_embeddings=False),
    "llama3-rope": dict(
        model_type="llama",
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "mistral": dict(model_type="mistral", tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", tie_word_embeddings=True, head_dim=32),
}


def random_model(config: dict, seed: int):
    """Our Model for `config` with the default initial weights drawn after
    mx.random.seed(seed), evaluated."""
    import mlx.core as mx

    from mlx_redrafter.model import Model, ModelArgs

    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model


def random_params(model) -> list:
    """New (name, value) pairs for every parameter of `model`, drawn from the current random
    state: 0.5 x N(0, 1), plus 1 for norms. Random non-trivial norms and biases, so every
    parameter matters."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    return [
        (k, mx.random.normal(v.shape) * 0.5 + (1.0 if "norm" in k else 0.0))
        for k, v in tree_flatten(model.parameters())
    ]


def literal_tree(prefix_len: int):
    """A literal tree after `prefix_len` cached tokens: root r, children a and b, a has child c,
    b has children d and e.

    Nodes 0=r 1=a 2=c 3=b 4=d 5=e. Returns (depths (6,) numpy, mask (1, 1, 6, prefix_len + 6)
    mx bool: all of the prefix and each node's ancestors and itself, root-to-leaf branches).
    """
    import mlx.core as mx

    parents = [-1, 0, 1, 0, 3, 3]
    depths = np.array([0, 1, 2, 1, 2, 2])
    n = len(parents)
    ancestors = np.zeros((n, n), bool)
    for i in range(n):
        j = i
        while j >= 0:
            ancestors[i, j] = True
            j = parents[j]
    mask = np.concatenate([np.ones((n, prefix_len), bool), ancestors], axis=1)
    branches = [[0, 1, 2], [0, 3, 4], [0, 3, 5]]
    return depths, mx.array(mask)[None, None], branches


# ---------------------------------------------------------------------------------------------
# Comparing numbers computed in different orders

# The same float maths computed in another order (another BLAS or thread count, another CPU's
# kernels, a batched or tree-shaped pass instead of one token at a time) rounds differently,
# and the difference grows with depth: float32 logits of a 2-layer random model differ by up
# to ~1.5e-5 of their largest magnitude across CPUs. Tolerances are relative to that scale.
RTOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


def as_numpy(x):
    """A float64 numpy copy of an mx.array (any dtype), numpy array or list."""
    if hasattr(x, "astype") and type(x).__module__.startswith("mlx"):
        import mlx.core as mx

        x = x.astype(mx.float32)
    return np.asarray(x, dtype=np.float64)


def _dtype_name(x) -> str:
    return str(getattr(x, "dtype", "float32")).replace("mlx.core.", "")


def assert_close(actual, expected, rtol: float | None = None, what: str = "") -> None:
    """|actual - expected| <= rtol x the largest magnitude of either, everywhere.

    rtol defaults to RTOL of the lower-precision dtype of the two (float32 when neither is
    an mx.array of another dtype).
    """
    if rtol is None:
        rtol = max(RTOL.get(_dtype_name(actual), RTOL["float32"]),
                   RTOL.get(_dtype_name(expected), RTOL["float32"]))  # fmt: skip
    a, e = as_numpy(actual), as_numpy(expected)
    assert a.shape == e.shape, f"{what}shape {a.shape} != {e.shape}"
    scale = max(np.abs(e).max(initial=0.0), np.abs(a).max(initial=0.0), np.finfo(np.float32).tiny)
    err = np.abs(a - e).max(initial=0.0)
    assert err <= rtol * scale, f"{what}max |difference| {err:.3g} > {rtol:g} x scale {scale:.3g}"


def top2_margins(logits) -> np.ndarray:
    """Top-1 minus top-2 value along the last axis: how far each greedy choice is from a tie."""
    values = np.sort(as_numpy(logits), axis=-1)
    return values[..., -1] - values[..., -2]


def assert_greedy_equal(got: list[int], expected: list[int], logits, rtol: float | None = None):
    """Greedy tokens from two computation shapes agree, except past a near-tie.

    logits: (len(expected), V), the reference's logits that chose each expected token. A
    position whose top-2 margin is within rtol x the logits' scale may flip between shapes
    (or machines), and everything after it may then differ; up to the first such position the
    tokens must be equal. At least half of the tokens must come before any near-tie, or the
    case tests too little and should use other inputs.
    """
    rtol = RTOL.get(_dtype_name(logits), RTOL["float32"]) if rtol is None else rtol
    logits = as_numpy(logits)
    assert logits.shape[0] >= len(expected), (logits.shape, len(expected))
    tol = rtol * max(np.abs(logits).max(initial=0.0), 1e-30)
    margins = top2_margins(logits[: len(expected)])
    ties = np.flatnonzero(margins <= tol)
    checked = int(ties[0]) if len(ties) else len(expected)
    assert checked >= (len(expected) + 1) // 2, (
        f"near-tie at position {checked} of {len(expected)} (margin {margins[checked]:.3g}): "
        "the case checks too little"
    )
    n = min(len(got), len(expected))
    first = next((i for i in range(n) if got[i] != expected[i]), None)
    if first is None and len(got) != len(expected):
        first = n  # one stopped earlier
    if first is not None and (first < checked or not len(ties)):
        margin = f"{margins[first]:.3g}" if first < len(margins) else "n/a"
        raise AssertionError(
            f"tokens differ at position {first} (reference margin {margin}, tolerance "
            f"{tol:.3g}): {got[first : first + 4]} != {expected[first : first + 4]}"
        )


def reference_logits(model, prompt: list[int], tokens: list[int]):
    """The logits (len(tokens), V) that chose each of `tokens` after `prompt`, from one full
    forward of prompt + tokens (our Model returns (hidden, logits); mlx-lm's returns logits)."""
    import mlx.core as mx

    seq = mx.array([list(prompt) + list(tokens)], dtype=mx.int32)
    out = model(seq)
    logits = out[1] if isinstance(out, tuple) else out
    start = len(prompt) - 1
    return logits[0, start : start + len(tokens)].astype(mx.float32)


class FakeDetokenizer:
    def __init__(self):
        self.reset()

    def reset(self):
        self.tokens, self.segment = [], ""

    def add_token(self, t):
        self.tokens.append(t)
        self.segment = f"<{t}>"

    def finalize(self):
        self.segment = ""

    @property
    def last_segment(self):
        seg, self.segment = self.segment, ""
        return seg


class FakeTokenizer:
    """Token i is the text '<i>'; enough for the decode loop."""

    def __init__(self, eos=()):
        self.eos_token_ids = set(eos)
        self.detokenizer = FakeDetokenizer()

    def encode(self, text):
        return [int(t) for t in text.split()]
