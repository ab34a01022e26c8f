"""Memory across requests: bounded per-client corpora, isolation between clients, the history
file, and generation with the memory on (greedy output identical to plain decoding)."""

from __future__ import annotations

import json
import tracemalloc

import mlx.core as mx
import numpy as np
import pytest
from helpers import FakeTokenizer, random_model, tiny_llama_config

from mlx_redrafter.errors import RedrafterError
from mlx_redrafter.generation import stream_generate
from mlx_redrafter.lookup_memory import BYTES_PER_TOKEN, LookupMemory
from mlx_redrafter.sizing import MEMORY, Calibration


def test_each_client_holds_at_most_max_tokens_and_the_newest_text():
    memory = LookupMemory(max_tokens=1000, max_clients=2)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 500, size=int(rng.integers(50, 400))).tolist() for _ in range(40)]
    for doc in docs:
        memory.add("a", doc)
        client = memory.client("a")
        assert client.num_tokens <= 1000
        # separators and the index never hold more than the documents and their n-grams
        assert len(client.index) <= client.num_tokens + len(client.documents)
        assert client.index.num_keys <= 7 * client.num_tokens
    assert memory.client("a").documents[-1] == docs[-1]
    # a document longer than the whole budget keeps its last tokens
    memory.add("a", list(range(3000)))
    assert memory.client("a").documents == [list(range(3000 - 750, 3000))]


def test_memory_bound_in_bytes():
    """What an index over max_tokens costs, measured, stays under BYTES_PER_TOKEN per token."""
    rng = np.random.default_rng(1)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        memory = LookupMemory(max_tokens=20000, max_clients=1)
        for _ in range(30):  # 3x the budget: evictions included
            memory.add("a", rng.integers(0, 49152, size=2000).tolist())
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert memory.num_tokens <= 20000
    assert used <= 20000 * BYTES_PER_TOKEN
    assert memory.max_bytes == 20000 * BYTES_PER_TOKEN


def test_clients_are_isolated_and_the_least_recent_is_dropped():
    memory = LookupMemory(max_tokens=100, max_clients=2)
    memory.add("a", [1, 2, 3, 4, 5])
    assert memory.client("b").index.propose(4, 3, query=[1, 2]) == []  # b never sees a's text
    assert memory.client("a").index.propose(4, 3, query=[1, 2])[0].tokens == (3, 4, 5)
    memory.add("c", [9, 9])  # three clients: b was used less recently than a
    assert memory.num_clients == 2
    assert memory.client("a").num_tokens == 5
    assert memory.client("b").num_tokens == 0  # forgotten (and made anew)


def test_a_continued_conversation_is_stored_once():
    memory = LookupMemory()
    memory.add(None, [1, 2, 3])
    memory.add(None, [1, 2, 3, 4, 5])  # the next turn: same conversation plus more
    memory.add(None, [7, 8])
    client = memory.client(None)
    assert client.documents == [[1, 2, 3, 4, 5], [7, 8]]
    assert client.index.tokens == (1, 2, 3, 4, 5, -1, 7, 8)


def test_memory_calibration_is_carried_and_capped():
    memory = LookupMemory()
    learnt = Calibration()
    for _ in range(500):
        learnt.observe((MEMORY, 8), 0.5, True)
        learnt.observe(("lookup", 8), 0.5, True)
    memory.client("a").learn(learnt)
    carried = memory.client("a").calibration
    assert ("lookup", 8) not in carried.predicted  # only the memory's own buckets
    assert carried.predicted[(MEMORY, 8)] == pytest.approx(64.0)
    assert carried.hits[(MEMORY, 8)] == pytest.approx(128.0)  # the same rate: 2x the raw


def test_history_file_round_trip(tmp_path):
    path = tmp_path / "history" / "model.json"
    memory = LookupMemory(max_tokens=50)
    memory.add("me", [1, 2, 3])
    memory.add("me", [5, 6])
    memory.save(path, "me", "model-x")
    again = LookupMemory(max_tokens=50)
    assert again.load(path, "me", "model-x") == 5
    assert again.client("me").documents == [[1, 2, 3], [5, 6]]
    assert LookupMemory().load(path, "me", "model-y") == 0  # another model's ids: ignored
    assert LookupMemory().load(tmp_path / "missing.json", "me", "model-x") == 0
    path.write_text(json.dumps({"documents": [["x"]]}))
    with pytest.raises(RedrafterError, match="not a lookup history file"):
        LookupMemory().load(path, "me", "model-x")


def test_bad_settings():
    with pytest.raises(RedrafterError):
        LookupMemory(max_tokens=0)
    with pytest.raises(RedrafterError):
        LookupMemory(max_clients=0)


def _tiny_model(seed):
    config = tiny_llama_config(64, 48, 2, max_position_embeddings=1024, tie_word_embeddings=False)
    model = random_model(config, seed)
    model.lm_head.weight = model.lm_head.weight * 4.0
    mx.eval(model.parameters())
    return model


def _tokens(model, prompt, **kw):
    return [r.token for r in stream_generate(model, FakeTokenizer(), prompt, None, **kw)]


@pytest.mark.parametrize("seed", range(3))
def test_greedy_output_is_unchanged_with_the_memory_on(seed):
    model = _tiny_model(60 + seed)
    rng = np.random.default_rng(seed)
    memory = LookupMemory(max_tokens=2000)
    prompts = [rng.integers(0, 64, size=12).tolist() for _ in range(3)]
    prompts.append(prompts[0])  # the same request again: the memory holds its whole answer
    copied = 0
    for prompt in prompts:
        plain = _tokens(model, prompt, max_tokens=40, lookup=False)
        responses = list(
            stream_generate(
                model, FakeTokenizer(), prompt, None, max_tokens=40,
                lookup_memory=memory, lookup_client="k",
            )
        )  # fmt: skip
        assert [r.token for r in responses] == plain
        copied = responses[-1].stats.accepted_from.get(MEMORY, 0)
    assert copied >= 10  # the repeated request copied its answer from memory
    assert memory.client("k").num_tokens > 0
    assert memory.client("other").num_tokens == 0
