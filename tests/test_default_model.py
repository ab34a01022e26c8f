"""The real default model (SmolLM2-135M-Instruct, float32): our port decodes like mlx-lm, and
ReDrafter's greedy output equals plain decoding."""

from __future__ import annotations

import pytest
from helpers import assert_greedy_equal, reference_logits

from mlx_redrafter.generation import stream_generate
from mlx_redrafter.loading import load

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in two sentences why the sky is blue.",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default(default_model_dir):
    model, tokenizer = load(default_model_dir)
    chats = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
        for p in PROMPTS
    ]
    return model, tokenizer, chats


def ours(model, tokenizer, ids, drafter=None, n=32, **kw):
    if drafter is None:
        kw.setdefault("lookup", False)  # plain decoding
    return [r.token for r in stream_generate(model, tokenizer, ids, drafter, max_tokens=n, **kw)]


def test_greedy_matches_mlx_lm(default, default_model_dir):
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.generate import generate_step

    lm_model, _ = mlx_lm.load(str(default_model_dir))
    model, tokenizer, chats = default
    for ids in chats:
        expected = []
        for token, _ in generate_step(mx.array(ids), lm_model, max_tokens=32):
            expected.append(int(token))
            if int(token) in tokenizer.eos_token_ids:
                break
        # Our kernels and mlx-lm's differ in rounding: equal up to any near-tie.
        assert_greedy_equal(ours(model, tokenizer, ids), expected,
                            reference_logits(lm_model, ids, expected))  # fmt: skip


def test_redrafter_greedy_equals_plain_on_the_default_model(default):
    from mlx_redrafter.drafter import init_drafter

    model, tokenizer, chats = default
    drafter = init_drafter(model, seed=0, draft_vocab_ids=list(range(4096)))
    for ids, (W, L) in zip(chats, [(1, 4), (2, 4), (4, 5)], strict=True):
        plain = ours(model, tokenizer, ids)
        spec = ours(model, tokenizer, ids, drafter, beam_width=W, beam_length=L)
        assert_greedy_equal(spec, plain, reference_logits(model, ids, plain))


def test_shipped_drafter_loads_and_keeps_greedy_output(default):
    from mlx_redrafter.defaults import default_drafter_dir
    from mlx_redrafter.drafter import load_drafter

    model, tokenizer, chats = default
    drafter = load_drafter(default_drafter_dir(), base=model)
    assert drafter.args.hidden_size == model.args.hidden_size
    for ids in chats:
        responses = list(stream_generate(model, tokenizer, ids, drafter, max_tokens=32))
        plain = ours(model, tokenizer, ids)
        assert_greedy_equal(
            [r.token for r in responses], plain, reference_logits(model, ids, plain)
        )
        # A trained drafter gets accepted sometimes; a broken one never would.
        assert responses[-1].stats.tokens_per_step > 1.0
