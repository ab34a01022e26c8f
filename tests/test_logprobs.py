"""Log-probabilities on the response stream: from the logits that chose each token, equal to
plain decoding's and to a full forward's, whether the token was drafted, copied or sampled."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from helpers import assert_close, reference_logits
from test_generation import FakeTokenizer, NoisyOracle, tiny_model

from mlx_redrafter.errors import GenerationError
from mlx_redrafter.generation import stream_generate
from mlx_redrafter.logprobs import LogprobRecorder, TokenLogprob, openai_logprob

VOCAB = 64
PROMPT = [3, 5, 7, 11, 13, 3, 5, 7, 11, 13, 3, 5]  # repeats: lookup copies from it


def responses(model, drafter=None, **kw):
    kw.setdefault("lookup", drafter is not None)
    return list(stream_generate(model, FakeTokenizer(), PROMPT, drafter, max_tokens=24, **kw))


def reference_logprobs(model, tokens: list[int]) -> np.ndarray:
    """log_softmax of one full forward's logits (len(tokens), V)."""
    logits = reference_logits(model, PROMPT, tokens)
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


def check_against_reference(model, rs, k: int) -> None:
    tokens = [r.token for r in rs]
    ref = reference_logprobs(model, tokens)
    got = np.array([r.logprobs.logprob for r in rs])
    assert_close(got, ref[np.arange(len(tokens)), tokens], what="chosen logprob: ")
    for i, r in enumerate(rs):
        assert r.logprobs.token == r.token
        assert len(r.logprobs.top) == k
        if k:
            top = np.sort(ref[i])[::-1][:k]
            assert_close([lp for _, lp in r.logprobs.top], top, what=f"top at {i}: ")
            ids = [t for t, _ in r.logprobs.top]
            assert np.allclose(ref[i][ids], top, atol=1e-4 * np.abs(ref[i]).max())


@pytest.mark.parametrize("seed", range(3))
def test_speculative_logprobs_equal_plain_decodings(seed):
    """Greedy: drafted (noisy oracle) and copied (lookup) tokens get the same logprobs and top
    alternatives as plain decoding gives the same tokens."""
    model = tiny_model(seed, VOCAB)
    plain = responses(model, logprobs=5)
    tokens = [r.token for r in plain]
    spec = responses(model, NoisyOracle(tokens, VOCAB, seed), logprobs=5, beam_width=2,
                     beam_length=4, lookup=False)  # fmt: skip
    assert [r.token for r in spec] == tokens
    assert any(r.from_draft for r in spec), "nothing was drafted: the test tests too little"
    assert_close([r.logprobs.logprob for r in spec], [r.logprobs.logprob for r in plain])
    for a, b in zip(spec, plain, strict=True):
        assert_close([lp for _, lp in a.logprobs.top], [lp for _, lp in b.logprobs.top])
    check_against_reference(model, plain, 5)
    check_against_reference(model, spec, 5)


def test_copied_tokens_get_plain_decodings_logprobs():
    model = tiny_model(4, VOCAB)
    plain = responses(model, logprobs=3)
    copied = responses(model, lookup=True, logprobs=3)
    assert [r.token for r in copied] == [r.token for r in plain]
    assert copied[-1].stats.steps < len(copied) - 1, "nothing was copied"
    assert_close([r.logprobs.logprob for r in copied], [r.logprobs.logprob for r in plain])
    check_against_reference(model, copied, 3)


@pytest.mark.parametrize("lookup", [False, True])
def test_sampled_tokens_get_the_models_own_logprobs(lookup):
    """Sampled speculative tokens (temperature, top-k) carry the raw model's logprobs, not the
    warped distribution's."""
    model = tiny_model(7, VOCAB)
    rs = responses(model, lookup=lookup, logprobs=0, temperature=0.8, top_k=10, seed=3)
    check_against_reference(model, rs, 0)
    if lookup:
        assert rs[-1].stats.steps < len(rs), "nothing was copied: the test tests too little"


def test_no_logprobs_unless_asked():
    model = tiny_model(0, VOCAB)
    assert all(r.logprobs is None for r in responses(model))


def test_top_logprobs_range_is_checked():
    model = tiny_model(0, VOCAB)
    for bad in (-1, 21):
        with pytest.raises(GenerationError, match="top_logprobs"):
            responses(model, logprobs=bad)


def test_recorder_hands_out_entries_in_order():
    recorder = LogprobRecorder(2)
    logits = mx.array([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])
    recorder.record(logits, [2, 0])
    recorder.record(logits[:1], [1])
    first = recorder.pop(2)
    assert first.top[0][0] == 2 and first.top[1][0] == 1
    assert first.logprob == pytest.approx(2.0 - np.log(np.exp([0.0, 1.0, 2.0]).sum()), rel=1e-6)
    assert recorder.pop(0).top[0][0] == 0
    with pytest.raises(GenerationError, match="emitted 2"):
        recorder.pop(2)
    with pytest.raises(GenerationError, match="no log-probability"):
        recorder.pop(0)


def test_openai_shape():
    class Tok:
        def decode(self, ids):
            return {5: "hi", 7: "é"}[ids[0]]

    entry = openai_logprob(Tok(), TokenLogprob(5, -0.5, [(5, -0.5), (7, -1.5)]))
    assert entry == {
        "token": "hi", "logprob": -0.5, "bytes": [104, 105],
        "top_logprobs": [
            {"token": "hi", "logprob": -0.5, "bytes": [104, 105]},
            {"token": "é", "logprob": -1.5, "bytes": [195, 169]},
        ],
    }  # fmt: skip
