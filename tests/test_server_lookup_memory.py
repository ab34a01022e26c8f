"""The server's memory across requests (`serve --lookup-cache`, on by default): context lookup
also copies from a client's earlier requests, one bounded corpus per API key. Over real HTTP
on 127.0.0.1 with the tiny model: output equals plain decoding with the memory on, a repeated
request drafts from the memory, and no client's text reaches another client's corpus."""

from __future__ import annotations

import httpx
import pytest
from helpers import write_tiny_model
from server_helpers import running

from mlx_redrafter.generation import stream_generate
from mlx_redrafter.loading import load
from mlx_redrafter.lookup_memory import LookupMemory
from mlx_redrafter.server import DoorSettings, Engine

KEYS = ("key-alpha-123", "key-beta-456")
PROMPT = "the cat sat on the mat and the cat sat on the hat and the dog"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_dir = write_tiny_model(tmp_path_factory.mktemp("memory") / "tiny", context_length=512)
    return load(model_dir)


def _complete(url: str, key: str, prompt: str, n: int = 24) -> dict:
    resp = httpx.post(
        f"{url}/v1/completions",
        json={"prompt": prompt, "max_tokens": n, "temperature": 0},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    return resp.json()


def _plain(model, tokenizer, prompt: str, n: int = 24) -> str:
    return "".join(
        r.text for r in stream_generate(model, tokenizer, prompt, None, max_tokens=n, lookup=False)
    )


def test_memory_keeps_output_and_stays_with_its_client(tiny):
    model, tokenizer = tiny
    memory = LookupMemory(max_tokens=4096, max_clients=4)
    engine = Engine(
        model, tokenizer, None, model_name="tiny", decode_options={"lookup_memory": memory}
    )
    with running(engine, DoorSettings(api_keys=KEYS)) as url:
        first = _complete(url, KEYS[0], PROMPT)
        again = _complete(url, KEYS[0], PROMPT + " ")  # a new prompt: no prompt-cache hit
        other = _complete(url, KEYS[1], "a different prompt about the sea and the sky")
    plain = _plain(model, tokenizer, PROMPT)
    assert first["choices"][0]["text"] == plain  # greedy output is unchanged
    assert again["choices"][0]["text"] == _plain(model, tokenizer, PROMPT + " ")
    # The second request of the first client could copy its own earlier answer.
    assert again["redrafter"]["accepted_from"].get("memory", 0) > 0
    # Each client has its own corpus: the first client's text is not in the second's.
    alpha, beta = memory.client("key0"), memory.client("key1")
    alpha_tokens = {t for doc in alpha.documents for t in doc}
    assert alpha.num_tokens > 0 and beta.num_tokens > 0
    assert all(tuple(doc) not in {tuple(d) for d in alpha.documents} for doc in beta.documents)
    assert other["redrafter"]["accepted_from"].get("memory", 0) == 0
    assert alpha_tokens  # sanity: the check above compared something


def test_the_cache_can_be_turned_off(tiny):
    model, tokenizer = tiny
    engine = Engine(
        model, tokenizer, None, model_name="tiny", decode_options={"lookup_memory": None}
    )
    with running(engine) as url:
        _complete(url, "unused", PROMPT)
        again = _complete(url, "unused", PROMPT + " ")
    assert again["redrafter"]["accepted_from"].get("memory", 0) == 0
