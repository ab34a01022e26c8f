"""Tiny on-disk models for CLI tests: a random Llama with a real (byte-level BPE) tokenizer and
a ChatML template, readable by `mlx_redrafter.loading.load` and by `mlx_lm.load`, plus a
random drafter for it. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
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
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
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
    # Never read or write the user's own tuned shapes.
    extra.setdefault("MLX_REDRAFTER_CONFIG_DIR", tempfile.mkdtemp(prefix="mlx-redrafter-cfg-"))
    return Invoked(CliRunner().invoke(app, args, input=input, env=extra))
