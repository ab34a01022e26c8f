"""Drafter v2: the base's top-k stored in the data, the distillation losses, multi-layer
drafters (feature layers), early stopping, data time budgets and coverage-sized draft
vocabularies."""

import json
import types
from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import RTOL, assert_close, assert_greedy_equal, reference_logits, write_tiny_model
from mlx.utils import tree_flatten
from test_generation import FakeTokenizer, NoisyOracle, tokens_of
from test_generation import tiny_model as sharp_model
from test_train import EOS, VOCAB, TinyTokenizer, tiny_model, write_alpaca

import mlx_redrafter.train.shards as train_shards
from mlx_redrafter import train
from mlx_redrafter.batch import generate_batch, teacher_forced_hidden
from mlx_redrafter.beam import beam_search
from mlx_redrafter.drafter import init_drafter, load_drafter, save_drafter
from mlx_redrafter.errors import DrafterError
from mlx_redrafter.generation import prefill, stream_generate, verify_tree
from mlx_redrafter.loading import load
from mlx_redrafter.prompts import encode_chat, read_prompts
from mlx_redrafter.train import (
    DataConfig,
    DistillData,
    FitConfig,
    TrainError,
    TrainInterrupted,
    build_dataset,
    draft_logits,
    fit,
    make_positions,
    train_drafter,
)
from mlx_redrafter.train.objective import (
    _soft_cross_entropy,
    evaluate,
    head_targets,
    loss_terms,
    size_for_coverage,
    teacher_targets,
    vocabulary_index,
)
from mlx_redrafter.tree import pack_sequences

TOP_K = 8
FEATURES = (0,)  # the data's feature layer (the tiny data model has 2 blocks)
RUN = dict(progress=False, eos_token_ids=[EOS])


def data_model():
    """test_train's tiny model with 4x sharper logits: the top-k log-probabilities are spread
    out, so a misaligned row or id shows in the comparisons."""
    model = tiny_model()
    model.lm_head.weight = model.lm_head.weight * 4.0
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def model():
    return data_model()


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return write_alpaca(tmp_path_factory.mktemp("prompts") / "alpaca.json")


# The data of the resume and time-budget tests: 3 shards of 8 prompts.
DATA_KW = dict(
    new_tokens=10,
    gen_batch_size=4,
    shard_size=8,
    top_k=TOP_K,
    feature_layers=FEATURES,
    progress=False,
)


@pytest.fixture(scope="module")
def data(model, prompts_file, tmp_path_factory):
    """Made in one uninterrupted call."""
    work = tmp_path_factory.mktemp("work")
    return build_dataset(model, TinyTokenizer(), prompts_file, work, **DATA_KW)


def params(drafter):
    return {k: np.array(v) for k, v in tree_flatten(drafter.parameters())}


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def assert_same_data(a: DistillData, b: DistillData):
    assert a.num_sequences == b.num_sequences
    assert all(np.array_equal(x, y) for x, y in zip(a.tokens, b.tokens, strict=True))
    for name in ("hidden", "hidden_start", "prompt_index", "top_ids", "top_logprobs", "features"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.feature_layers == b.feature_layers


def log_softmax64(logits) -> np.ndarray:
    x = np.array(logits.astype(mx.float32), np.float64)
    top = x.max(axis=-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


def rms_norm64(x) -> np.ndarray:
    x = np.array(x, np.float64)
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + 1e-5)


# ---------------------------------------------------------------------------------------------
# The data: top-k and feature layers


@pytest.mark.parametrize("target", ["self", "relabel"])
def test_stored_top_k_is_the_full_forward_top_k(model, data, prompts_file, tmp_path, target):
    tok = TinyTokenizer()
    if target == "relabel":
        kw = dict(DATA_KW, new_tokens=9)
        data = build_dataset(model, tok, prompts_file, tmp_path, target="relabel", **kw)
    assert data.top_k == TOP_K and data.feature_layers == FEATURES
    assert data.top_ids.dtype == np.int32 and data.top_logprobs.dtype == np.float16
    h = model.args.hidden_size
    assert data.top_ids.shape == (len(data.hidden), TOP_K) == data.top_logprobs.shape
    assert data.features.shape == (len(data.hidden), h) and data.features.dtype == np.float16
    prompts = read_prompts(prompts_file)
    selection = train.select_prompts(prompts, None)
    checked_ids = 0
    for i in range(data.num_sequences):
        ids = encode_chat(tok, prompts[selection[data.prompt_index[i]]].text)
        response = data.tokens[i][1:].tolist()
        rows = np.arange(data.hidden_start[i], data.hidden_start[i + 1])
        assert len(rows) == len(response)
        # One full forward over prompt + response: row j is the distribution over x_{j+1}.
        seq = mx.array([ids + response[:-1]])
        hidden, logits = model(seq, features=FEATURES)
        start = len(ids) - 1
        ref = log_softmax64(logits[0, start:])  # (len(response), V)
        stored_ids, stored_lp = data.top_ids[rows], data.top_logprobs[rows].astype(np.float64)
        ref_sorted = -np.sort(-ref, axis=-1)
        assert_close(-np.sort(-stored_lp, axis=-1), ref_sorted[:, :TOP_K], rtol=RTOL["float16"])
        # Each stored log-probability is the full forward's at that id.
        assert_close(stored_lp, np.take_along_axis(ref, stored_ids, -1), rtol=RTOL["float16"])
        tol = RTOL["float32"] * np.abs(ref).max()
        for j in range(len(rows)):
            assert len(set(stored_ids[j].tolist())) == TOP_K
            if ref_sorted[j, TOP_K - 1] - ref_sorted[j, TOP_K] > tol:
                assert set(stored_ids[j].tolist()) == set(np.argsort(-ref[j])[:TOP_K].tolist())
                checked_ids += 1
            if ref_sorted[j, 0] - ref_sorted[j, 1] > tol:
                # The stored top-1 is the next target: the token itself, or its label.
                best = int(stored_ids[j, np.argmax(data.top_logprobs[rows[j]])])
                assert best == int(data.targets(i)[j + 1]), (i, j)
        # The stored hidden and feature states are the full forward's at the same rows.
        assert_close(data.hidden[rows], hidden[0, start:, :h], rtol=RTOL["float16"])
        assert_close(data.features[rows], hidden[0, start:, h:], rtol=RTOL["float16"])
        assert_close(data.context(rows, FEATURES), hidden[0, start:], rtol=RTOL["float16"])
    assert checked_ids > 0.8 * len(data.hidden)


def test_context_reads_the_stored_feature_layers():
    hidden = np.arange(12, dtype=np.float16).reshape(3, 4)
    features = 100 + np.arange(24, dtype=np.float16).reshape(3, 8)  # layers 3 then 1, h = 4
    data = DistillData(
        tokens=[np.arange(4, dtype=np.int32)],
        hidden=hidden,
        hidden_start=np.array([0, 3]),
        prompt_index=np.array([0]),
        features=features,
        feature_layers=(3, 1),
    )
    rows = np.array([2, 0])
    np.testing.assert_array_equal(data.context(rows), hidden[rows])
    np.testing.assert_array_equal(
        data.context(rows, (1,)), np.concatenate([hidden[rows], features[rows, 4:]], 1)
    )
    np.testing.assert_array_equal(
        data.context(rows, (1, 3)),
        np.concatenate([hidden[rows], features[rows, 4:], features[rows, :4]], 1),
    )
    with pytest.raises(TrainError, match="feature layers"):
        data.context(rows, (2,))


def test_batched_generation_keeps_top_k_and_features(model):
    rng = np.random.default_rng(4)
    prompts = [[int(t) for t in rng.integers(3, VOCAB, n)] for n in (5, 2, 9)]
    out = generate_batch(model, prompts, 7, [EOS], 2, None, (1, 0), 5)
    forced = teacher_forced_hidden(
        model, prompts, [o[0] for o in out], with_labels=True, features=(1, 0), top_k=5
    )
    h = model.args.hidden_size
    for (response, hidden, ids, lp), (f_hidden, labels, f_ids, f_lp) in zip(
        out, forced, strict=True
    ):
        assert hidden.shape == (len(response), 3 * h) and ids.shape == (len(response), 5)
        assert labels.tolist() == response  # greedy: the labels are the response itself
        assert_close(hidden, f_hidden)
        order, f_order = np.argsort(-lp, axis=-1), np.argsort(-f_lp, axis=-1)
        assert_close(np.take_along_axis(lp, order, -1), np.take_along_axis(f_lp, f_order, -1))
        assert ids[np.arange(len(response)), order[:, 0]].tolist() == response
        np.testing.assert_array_equal(np.sort(ids, -1), np.sort(f_ids, -1))


# ---------------------------------------------------------------------------------------------
# The distillation losses


def soft_ce_numpy(logits, ids, weights):
    """-> (loss (...,), d loss.sum() * cot / d logits) in float64, for a cotangent."""
    x = np.array(logits, np.float64)
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    picked = np.take_along_axis(x, ids, -1)
    loss = (weights * (lse[..., None] - picked)).sum(-1)
    softmax = np.exp(x - lse[..., None])
    return loss, softmax, lse


def test_soft_cross_entropy_value_and_gradient_match_numpy():
    rng = np.random.default_rng(0)
    K, k = 9, 4
    logits = (3 * rng.standard_normal((2, 3, K))).astype(np.float32)
    ids = rng.integers(0, K, (2, 3, k)).astype(np.int32)
    ids[0, 0] = [5, 2, 5, 7]  # a repeated id: its weights add up
    ids[1, 2] = [3, 3, 3, 3]
    weights = rng.uniform(0, 1, (2, 3, k)).astype(np.float32)
    weights[0, 1] = 0.0  # a row with no target
    weights[1, 0, 2] = 0.0
    cot = rng.standard_normal((2, 3)).astype(np.float32)

    loss_np, softmax, _ = soft_ce_numpy(logits, ids, weights.astype(np.float64))
    grad_np = softmax * (cot[..., None] * weights.sum(-1, keepdims=True))
    for b in range(2):
        for t in range(3):
            for j in range(k):
                grad_np[b, t, ids[b, t, j]] -= cot[b, t] * weights[b, t, j]
    assert abs(grad_np[0, 0, 5]) > 0  # the repeated id's gradient counts both weights

    def f(x):
        loss, _ = _soft_cross_entropy(x, mx.array(ids), mx.array(weights))
        return (loss * mx.array(cot)).sum(), loss

    (_, loss), grad = mx.value_and_grad(f)(mx.array(logits))
    assert_close(loss, loss_np)
    assert_close(grad, grad_np)
    # The softmax output is the softmax.
    assert_close(
        _soft_cross_entropy(mx.array(logits), mx.array(ids), mx.array(weights))[1], softmax
    )
    # A repeated id is the same as its weights summed on one entry.
    merged_w = weights.copy()
    merged_w[1, 2] = [weights[1, 2].sum(), 0, 0, 0]
    (_, merged), merged_grad = mx.value_and_grad(
        lambda x: (
            (_soft_cross_entropy(x, mx.array(ids), mx.array(merged_w))[0] * mx.array(cot)).sum(),
            _soft_cross_entropy(x, mx.array(ids), mx.array(merged_w))[0],
        )
    )(mx.array(logits))
    assert_close(merged, loss_np)
    assert_close(merged_grad, grad_np)


def random_drafter(base, seed, **kw):
    """A drafter whose fuse (if any) is random, so every context column matters."""
    drafter = init_drafter(base, seed=seed, **kw)
    if "fuse" in drafter:
        w = drafter.fuse.weight
        drafter.fuse.weight = mx.random.normal(w.shape, key=mx.random.key(seed + 100)) * (
            w.shape[1] ** -0.5
        )
        drafter.fuse.bias = 0.1 * mx.random.normal((w.shape[0],), key=mx.random.key(seed + 101))
        mx.eval(drafter.parameters())
    return drafter


def loss_case(model, seed=0):
    rng = np.random.default_rng(seed)
    vocab = [EOS, 3, 5, 8, 13, 21, 30, 34, 40, 47, 55, 60]
    K, N, B, k = len(vocab), 3, 10, 4
    drafter = random_drafter(model, 1, draft_vocab_ids=vocab, feature_layers=[1, 0])
    hidden = mx.array(rng.standard_normal((B, drafter.context_size)).astype(np.float32))
    embeddings = model.embed(mx.array(rng.integers(0, VOCAB, (B, N)).astype(np.int32)))
    targets = rng.integers(0, K, (N, B)).astype(np.int32)
    targets[0, :3] = -1  # outside the draft vocabulary: not trained
    targets[2, 6:] = -2  # past the end
    tids = rng.integers(0, K, (N, B, k)).astype(np.int32)
    tids[1, 4, :2] = [7, 7]  # a repeated id
    tw = rng.uniform(0.1, 1, (N, B, k)).astype(np.float32)
    tw /= tw.sum(-1, keepdims=True)
    tw[2, 6:] = 0.0  # no teacher past the end
    tw[0, 1] = 0.0  # nor here
    return drafter, hidden, embeddings, targets, tids, tw


@pytest.mark.parametrize("kd", [0.3, 1.0, 0.0])
def test_mix_loss_equals_a_numpy_reference(model, kd):
    drafter, hidden, embeddings, targets, tids, tw = loss_case(model)
    loss, head_loss, counts = loss_terms(
        drafter, hidden, embeddings, mx.array(targets), mx.array(tids), mx.array(tw), kd=kd
    )
    logits = draft_logits(drafter, hidden, embeddings)  # (N, B, K)
    x = np.array(logits, np.float64)
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    N = targets.shape[0]
    ref_heads, ref_head_loss = [], []
    for i in range(N):
        trained = np.flatnonzero(targets[i] >= 0)
        label_ce = lse[i, trained] - x[i, trained, targets[i, trained]]
        taught = np.flatnonzero(tw[i].sum(-1) > 0)
        teacher_ce = [
            sum(tw[i, b, j] * (lse[i, b] - x[i, b, tids[i, b, j]]) for j in range(tids.shape[2]))
            for b in taught
        ]
        ref_heads.append((1 - kd) * label_ce.mean() + kd * np.mean(teacher_ce))
        ref_head_loss.append(label_ce.sum())
    assert_close(loss, np.mean(ref_heads))
    # The per-head loss is the label's cross-entropy (what evaluation reports) whatever kd.
    assert_close(head_loss, np.array(ref_head_loss))
    assert np.array(counts)[0].tolist() == (targets >= 0).sum(1).tolist()

    # The gradient of the custom-vjp loss is that of a plain MLX formula.
    def plain(drafter, hidden, embeddings, targets, tids, tw):
        z = draft_logits(drafter, hidden, embeddings).astype(mx.float32)
        lse = mx.logsumexp(z, axis=-1)
        trained = targets >= 0
        picked = mx.take_along_axis(z, mx.maximum(targets, 0)[..., None], -1)[..., 0]
        label = ((lse - picked) * trained).sum(1) / mx.maximum(trained.sum(1), 1)
        teach = (tw * (lse[..., None] - mx.take_along_axis(z, tids, -1))).sum(-1)
        taught = tw.sum(-1) > 0
        teach = teach.sum(1) / mx.maximum(taught.sum(1), 1)
        return ((1 - kd) * label + kd * teach).mean()

    args = (hidden, embeddings, mx.array(targets), mx.array(tids), mx.array(tw))
    (got, *_), grads = nn.value_and_grad(drafter, lambda *a: loss_terms(*a, kd=kd))(drafter, *args)
    want, want_grads = nn.value_and_grad(drafter, plain)(drafter, *args)
    assert_close(got, want)
    want_grads = dict(tree_flatten(want_grads))
    for name, g in tree_flatten(grads):
        assert_close(g, want_grads[name], what=f"{name}: ")
    assert np.abs(np.array(dict(tree_flatten(grads))["fuse.weight"])).max() > 0


def test_teacher_targets_align_heads_with_stored_rows():
    # One sequence x_0..x_5; hidden row j holds the distribution over x_{j+1}.
    lp = np.log(np.array([0.6, 0.3, 0.1]))
    top_ids = np.array([[20 + j, 30 + j, 40 + j] for j in range(5)], np.int32)
    top_ids[3] = [50, 51, 52]  # none inside the draft vocabulary
    data = DistillData(
        tokens=[np.array([10, 11, 12, 13, 14, 15], np.int32)],
        hidden=np.zeros((5, 2), np.float16),
        hidden_start=np.array([0, 5]),
        prompt_index=np.array([0]),
        top_ids=top_ids,
        top_logprobs=np.tile(lp, (5, 1)).astype(np.float16),
    )
    assert data.top_k == 3
    vocab = np.array([20, 21, 22, 23, 24, 31, 33, 41, 42], np.int32)  # not 30, 32, 34, 40, 43
    head_index = vocabulary_index(vocab, 60)
    pos = make_positions(data, [0], num_predict=2)
    assert pos.rows.tolist() == [0, 1, 2, 3]
    idx = np.array([0, 1, 2, 3])
    rows, weights = teacher_targets(data, pos, idx, head_index)
    assert rows.shape == weights.shape == (2, 4, 3) and rows.dtype == np.int32

    p = np.exp(lp.astype(np.float16).astype(np.float32))
    expected = np.zeros((2, 4, 3))
    for i in (1, 2):  # head i at t predicts x_{t+i+1}: row t + i
        for t in range(4):
            r = t + i
            if t + i + 1 > 5:
                continue  # past the end: no teacher
            inside = head_index[top_ids[r]] >= 0
            if inside.any():
                expected[i - 1, t] = np.where(inside, p, 0) / np.where(inside, p, 0).sum()
            np.testing.assert_array_equal(
                rows[i - 1, t], np.where(inside, head_index[top_ids[r]], 0)
            )
    assert_close(weights, expected)
    # By hand: row 1 (21, 31, 41) all inside; row 2 (22, 32, 42) without 32.
    assert_close(weights[0, 0], [0.6, 0.3, 0.1], rtol=RTOL["float16"])
    assert_close(weights[0, 1], [6 / 7, 0, 1 / 7], rtol=RTOL["float16"])
    assert rows[0, 1].tolist() == [2, 0, 8]
    assert (weights[0, 2] == 0).all() and (weights[1, 1] == 0).all()  # row 3: none inside
    assert (weights[1, 3] == 0).all()  # head 2 at t = 3 is past the end
    # The full vocabulary: the teacher's probabilities themselves.
    rows, weights = teacher_targets(data, pos, np.array([1]), None)
    np.testing.assert_array_equal(rows[:, 0], top_ids[[2, 3]])
    assert_close(weights[:, 0], np.tile(p / p.sum(), (2, 1)))


def test_size_for_coverage():
    counts = np.array([5, 0, 3, 2, 0])  # sorted shares: 0.5, 0.8, 1.0
    assert size_for_coverage(counts, 0.5) == 1
    assert size_for_coverage(counts, 0.51) == 2
    assert size_for_coverage(counts, 0.8) == 2
    assert size_for_coverage(counts, 0.81) == 3
    assert size_for_coverage(counts, 1.0) == 3
    assert size_for_coverage(np.array([4, 3, 2, 1]), 1.0) == 0  # the whole vocabulary
    assert size_for_coverage(np.array([4, 3, 2, 1]), 0.95) == 0
    assert size_for_coverage(np.array([4, 3, 2, 1]), 0.9) == 3
    assert size_for_coverage(np.zeros(4, np.int64), 0.5) == 0
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(TrainError, match="coverage"):
            size_for_coverage(counts, bad)


# ---------------------------------------------------------------------------------------------
# Training on the teacher's distribution


def two_token_teacher(n_seq=40, length=12, h=32, A=7, B=9):
    """Sequences x_0 = 5 then A everywhere, random contexts, and a teacher whose top-2 is
    0.7 on A and 0.3 on B at every position (its argmax, A, is every label)."""
    rng = np.random.default_rng(0)
    tokens = [np.array([5] + [A] * (length - 1), np.int32) for _ in range(n_seq)]
    rows = n_seq * (length - 1)
    return DistillData(
        tokens=tokens,
        hidden=rng.standard_normal((rows, h)).astype(np.float16),
        hidden_start=np.arange(n_seq + 1) * (length - 1),
        prompt_index=np.arange(n_seq),
        top_ids=np.tile(np.array([A, B], np.int32), (rows, 1)),
        top_logprobs=np.tile(np.log([0.7, 0.3]), (rows, 1)).astype(np.float16),
    )


TEACHER_FIT = FitConfig(
    epochs=10,
    learning_rate=1e-2,
    batch_size=32,
    num_predict=2,
    num_layers=1,
    eval_fraction=0.1,
    checkpoint_every=1000,
    warmup_fraction=0.0,
)


def test_kd_learns_the_teacher_distribution_and_ce_its_argmax(tmp_path):
    model = tiny_model()
    data = two_token_teacher(h=model.args.hidden_size)
    probs = {}
    for loss in ("kd", "ce"):
        config = replace(TEACHER_FIT, loss=loss)
        fit(model, data, tmp_path / loss, work_dir=tmp_path / f"w-{loss}", config=config, **RUN)
        drafter = load_drafter(tmp_path / loss, base=model)
        rows = np.arange(0, len(data.hidden), 7)
        context = mx.array(data.hidden[rows]).astype(mx.float32)
        inputs = mx.array(np.full((len(rows), 2), 7, np.int32))
        logits = draft_logits(drafter, context, model.embed(inputs))  # (N, B, V)
        probs[loss] = np.array(mx.softmax(logits, axis=-1)).mean(axis=1)  # (N, V)
    for head in probs["kd"]:
        assert abs(head[7] - 0.7) < 0.1 and abs(head[9] - 0.3) < 0.1, head[[7, 9]]
    for head in probs["ce"]:
        assert head[7] > 0.9, head[7]


# ---------------------------------------------------------------------------------------------
# Multi-layer drafters: the base's features


def three_layer_model(seed=0):
    return tiny_model(seed=seed, layers=3)


def test_model_features_equal_a_manual_forward():
    model = three_layer_model()
    tokens = mx.array(np.random.default_rng(0).integers(0, VOCAB, (2, 7)).astype(np.int32))
    hidden, logits = model(tokens, features=(2, 0))
    plain_hidden, plain_logits = model(tokens)
    h = model.args.hidden_size
    assert hidden.shape == (2, 7, 3 * h)
    # The layers by hand.
    x = model.embed(tokens)
    outs = []
    for layer in model.model.layers:
        x = layer(x, "causal", None, 0, None)
        outs.append(x)
    assert_close(hidden[..., :h], model.model.norm(x))
    assert_close(hidden[..., h : 2 * h], rms_norm64(outs[2]))
    assert_close(hidden[..., 2 * h :], rms_norm64(outs[0]))
    assert_close(hidden[..., :h], plain_hidden)
    assert_close(logits, plain_logits)
    assert_close(model.logits(hidden), plain_logits)
    with pytest.raises(DrafterError, match="feature layers"):
        model(tokens, features=(3,))
    for bad in ((3,), (-1,), (0, 0)):
        with pytest.raises(DrafterError, match="distinct block indices"):
            model.check_features(bad)
    model.check_features((0, 1, 2))


def test_cache_passes_carry_the_full_forward_features():
    model = three_layer_model(seed=1)
    F = (1, 0)
    prompt = [0, 7, 19, 33, 2, 41, 8]
    # Chunked prefill: the last state carries the features.
    cache = model.make_cache()
    context = prefill(model, cache, prompt, chunk=3, features=F)
    full, _ = model(mx.array([prompt]), features=F)
    assert_close(context, full[0, -1])
    # A verify pass over a tree: every node's hidden is the full forward's at its position.
    sequences = [(5, 9, 12, 3), (5, 9, 40), (5, 17, 1, 1, 6)]
    tree = pack_sequences(sequences)
    hidden, logits = verify_tree(model, cache, tree, F)
    assert hidden.shape == (tree.num_nodes, 3 * model.args.hidden_size)
    for s, seq in enumerate(sequences):
        ref_hidden, ref_logits = model(mx.array([prompt + list(seq)]), features=F)
        nodes = mx.array(tree.paths[s, : len(seq)])
        assert_close(hidden[nodes], ref_hidden[0, len(prompt) :])
        assert_close(logits[nodes], ref_logits[0, len(prompt) :])
    # Without features the same pass gives the plain hidden state.
    cache.commit(np.array([0]))
    plain_hidden, _ = verify_tree(model, cache, pack_sequences([(4, 4)]))
    assert plain_hidden.shape == (2, model.args.hidden_size)


class RecordingOracle(NoisyOracle):
    """test_generation's noisy oracle, as a drafter whose context carries feature layers;
    records the context it is handed with the index of its g0."""

    def __init__(self, reference, vocab, seed, feature_layers):
        super().__init__(reference, vocab, seed)
        self.feature_layers = feature_layers
        self.seen = []

    def propose(self, model, context, g0, W, L):
        self.seen.append((self.pos, np.array(context)))
        return super().propose(model, context, g0, W, L)


@pytest.mark.parametrize("seed,W,L", [(0, 2, 4), (1, 3, 5)])
def test_speculative_rounds_hand_the_drafter_full_forward_features(seed, W, L):
    model = sharp_model(seed, layers=3)
    prompt = np.random.default_rng(seed).integers(0, 64, 9).tolist()
    plain = tokens_of(model, prompt, max_tokens=24)
    oracle = RecordingOracle(plain, 64, seed, (2, 0))
    spec = [
        r.token
        for r in stream_generate(
            model, FakeTokenizer(), prompt, oracle, max_tokens=24, beam_width=W,
            beam_length=L, lookup=False,
        )
    ]  # fmt: skip
    assert_greedy_equal(spec, plain, reference_logits(model, prompt, plain))
    assert len(oracle.seen) > 3
    full, _ = model(mx.array([prompt + plain]), features=(2, 0))
    for pos, context in oracle.seen:
        # The context of g0 = plain[pos] is the state of the token before it.
        assert context.shape == (3 * model.args.hidden_size,)
        assert_close(context, full[0, len(prompt) + pos - 1], what=f"g0 #{pos}: ")


@pytest.mark.parametrize("vocab", [None, [EOS, 5, 9, 17, 23, 30, 41, 42, 57]])
def test_multi_layer_training_logits_equal_beam_search_logits(vocab):
    model = three_layer_model()
    drafter = random_drafter(
        model, 3, exit_dim=48, num_draft_layers=2, draft_vocab_ids=vocab, feature_layers=[2, 0]
    )
    prompt = [0, 7, 19, 33, 2]
    hidden, logits = model(mx.array([prompt]), features=drafter.feature_layers)
    context = hidden[0, -1]
    assert context.shape == (drafter.context_size,)
    g0 = int(mx.argmax(logits[0, -1]).item())
    N = 4
    beams, scores = beam_search(drafter, model, context, g0, beam_width=1, beam_length=N + 1)
    beam = np.array(beams)[0].tolist()
    inputs = mx.array([beam[:N]])
    logits_t = draft_logits(drafter, context[None], model.embed(inputs))  # (N, 1, K)
    state = drafter.initial_state(1)
    for i in range(N):
        state = drafter.next_state(state, model.embed(mx.array([beam[i]])))
        assert_close(logits_t[i], drafter.head(context[None], state))
    drafted = drafter.full_vocab_ids(mx.argmax(logits_t[:, 0], axis=-1))
    assert np.array(drafted).tolist() == beam[1:]
    logp = logits_t[:, 0] - mx.logsumexp(logits_t[:, 0], axis=-1, keepdims=True)
    picked = mx.take_along_axis(logp, drafter.head_index(mx.array(beam[1:]))[:, None], -1)
    assert_close(picked.sum(), scores[0])


@pytest.mark.parametrize("seed,W,L", [(0, 2, 4), (1, 1, 3)])
def test_greedy_with_a_multi_layer_drafter_equals_plain(seed, W, L):
    model = sharp_model(seed, layers=3)
    drafter = random_drafter(model, seed, feature_layers=[1, 0])
    prompt = np.random.default_rng(seed).integers(0, 64, 7).tolist()
    plain = tokens_of(model, prompt, max_tokens=20)
    spec = tokens_of(
        model, prompt, drafter, max_tokens=20, beam_width=W, beam_length=L, lookup=False
    )
    assert_greedy_equal(spec, plain, reference_logits(model, prompt, plain))


def test_multi_layer_drafter_round_trip(tmp_path):
    model = three_layer_model()
    drafter = random_drafter(
        model, 2, draft_vocab_ids=[EOS, 4, 9, 16, 25, 36], feature_layers=[2, 0]
    )
    assert drafter.feature_layers == (2, 0) and drafter.context_size == 3 * model.args.hidden_size
    save_drafter(drafter, tmp_path / "d")
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["feature_layers"] == [2, 0]
    loaded = load_drafter(tmp_path / "d", base=model)
    assert loaded.feature_layers == (2, 0) and "fuse" in loaded
    assert_same_params(params(drafter), params(loaded))
    context = model(mx.array([[0, 3, 8, 2]]), features=(2, 0))[0][0, -1]
    emb = model.embed(mx.array([[4, 9, 16]]))
    np.testing.assert_array_equal(
        np.array(draft_logits(drafter, context[None], emb)),
        np.array(draft_logits(loaded, context[None], emb)),
    )
    # The base must have the layers the drafter reads.
    with pytest.raises(DrafterError, match="feature layers"):
        load_drafter(tmp_path / "d", base=tiny_model())


def test_multi_layer_drafter_round_trip_gives_the_same_beams(tmp_path):
    model = three_layer_model()
    drafter = random_drafter(model, 2, feature_layers=[2, 0])
    save_drafter(drafter, tmp_path / "d")
    loaded = load_drafter(tmp_path / "d", base=model)
    context = model(mx.array([[0, 3, 8, 2]]), features=(2, 0))[0][0, -1]
    a = beam_search(drafter, model, context, 5, 3, 4)
    b = beam_search(loaded, model, context, 5, 3, 4)
    np.testing.assert_array_equal(np.array(a[0]), np.array(b[0]))
    np.testing.assert_array_equal(np.array(a[1]), np.array(b[1]))


def test_apple_layout_drafter_is_unchanged():
    model = three_layer_model()
    for kw in (dict(), dict(exit_dim=48, draft_vocab_ids=[EOS, 3, 9]), dict(rnn=False)):
        plain = init_drafter(model, seed=3, **kw)
        for none in (None, ()):
            other = init_drafter(model, seed=3, feature_layers=none, **kw)
            assert "fuse" not in other and other.feature_layers == ()
            assert other.args.feature_layers is None
            assert "feature_layers" not in other.args.to_dict()
            assert_same_params(params(plain), params(other))
        assert "fuse" not in plain and plain.context_size == model.args.hidden_size
        # A multi-layer drafter draws the same weights for the rest, and its fuse starts as
        # [I 0]: the same logits as the last-layer drafter.
        multi = init_drafter(model, seed=3, feature_layers=[1], **kw)
        p, m = params(plain), params(multi)
        assert set(m) - set(p) == {"fuse.weight", "fuse.bias"}
        assert_same_params(p, {k: v for k, v in m.items() if not k.startswith("fuse.")})
        h = model.args.hidden_size
        np.testing.assert_array_equal(m["fuse.weight"], np.eye(h, 2 * h))
        tokens = mx.array([[0, 3, 8, 2]])
        context = model(tokens, features=(1,))[0][0, -1]
        emb = model.embed(mx.array([[4, 9, 16]]))
        assert_close(
            draft_logits(multi, context[None], emb),
            draft_logits(plain, context[None, :h], emb),
        )
    with pytest.raises(DrafterError, match="feature layers"):
        init_drafter(model, feature_layers=[3])


# ---------------------------------------------------------------------------------------------
# Resume, time budgets and early stopping


def test_data_resume_after_ctrl_c_equals_one_run(model, data, prompts_file, tmp_path, monkeypatch):
    real = train_shards.generate_batch
    calls = []

    def flaky(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train_shards, "generate_batch", flaky)
    tok = TinyTokenizer()
    with pytest.raises(TrainInterrupted, match="run again to resume"):
        build_dataset(model, tok, prompts_file, tmp_path, **DATA_KW)
    assert len(list((tmp_path / "data").glob("shard-*.npz"))) == 1
    assert calls[0][-4:-2] == (FEATURES, TOP_K)  # the features and top-k reach the generator
    again = build_dataset(model, tok, prompts_file, tmp_path, **DATA_KW)
    assert len(calls) == 4 and again.stats["shards_missing"] == 0
    assert_same_data(again, data)
    # Other settings are other data.
    with pytest.raises(TrainError, match="top_k"):
        build_dataset(model, tok, prompts_file, tmp_path, **dict(DATA_KW, top_k=4))


def test_time_budget_stops_between_shards(model, data, prompts_file, tmp_path, monkeypatch):
    # A clock that each shard's generation moves on by 10 s.
    clock = [1000.0]
    real_time = train_shards.time
    monkeypatch.setattr(
        train_shards,
        "time",
        types.SimpleNamespace(perf_counter=lambda: clock[0], time=real_time.time),
    )
    real = train_shards.generate_batch

    def slow(*args):
        clock[0] += 10.0
        return real(*args)

    monkeypatch.setattr(train_shards, "generate_batch", slow)
    tok = TinyTokenizer()
    part = build_dataset(model, tok, prompts_file, tmp_path, time_budget=15, **DATA_KW)
    # Shards start at 0 s and 10 s; the third would start at 20 s > 15 s.
    assert part.num_sequences == 16 and part.stats["shards_missing"] == 1
    assert len(part.hidden) == len(part.top_ids) == len(part.features) == part.hidden_start[-1]
    rest = build_dataset(model, tok, prompts_file, tmp_path, **DATA_KW)
    assert rest.stats["shards_missing"] == 0
    assert_same_data(rest, data)
    with pytest.raises(TrainError, match="time_budget"):
        build_dataset(model, tok, prompts_file, tmp_path, time_budget=0, **DATA_KW)


MIX_FIT = FitConfig(
    epochs=10,
    learning_rate=2e-3,
    batch_size=16,
    num_predict=3,
    num_layers=1,
    eval_fraction=0.15,
    checkpoint_every=1000,
    loss="mix",
    kd_weight=0.4,
    feature_layers=FEATURES,
    feature_noise=0.2,
    patience=4,  # evaluations every 2 steps
)


@pytest.fixture(scope="module")
def mix_run(model, data, tmp_path_factory):
    """One uninterrupted run of MIX_FIT: (log, out dir, work dir)."""
    base = tmp_path_factory.mktemp("mix")
    log = fit(model, data, base / "out", work_dir=base / "work", config=MIX_FIT, **RUN)
    return log, base / "out", base / "work"


def test_patience_stops_early_and_keeps_the_best_drafter(model, data, mix_run):
    log, out, work = mix_run
    evals = log["evals"]
    score = "expected_tokens_per_step_w1"
    best = max(range(len(evals)), key=lambda i: (evals[i][score], -i))  # the first of ties
    assert log["finished"] and log["stopped_early"]
    total = log["settings"]["total_steps"]
    assert log["steps"] < total
    assert len(evals) - 1 - best == MIX_FIT.patience  # stopped as soon as patience ran out
    assert log["best_step"] == evals[best]["step"] < evals[-1]["step"]
    assert log["final_eval"] == evals[best]
    # The written drafter is the best evaluation's, not the last step's.
    written = load_drafter(out, base=model)
    assert written.feature_layers == FEATURES
    assert_same_params(params(written), params(load_drafter(work / "best", base=model)))
    last = params(load_drafter(work / "checkpoint" / "drafter", base=model))
    assert any(not np.array_equal(last[k], v) for k, v in params(written).items())
    # Evaluated again, it scores what the best evaluation logged.
    _, eval_seqs = train.split_sequences(data.num_sequences, MIX_FIT.eval_fraction)
    pos = make_positions(data, eval_seqs, MIX_FIT.num_predict)
    targets = head_targets(pos.labels, vocabulary_index(None, VOCAB))
    again = evaluate(written, model, data, pos, targets)
    assert_close(again["loss"], evals[best]["loss"])
    assert again[score] == evals[best][score]
    assert abs(evals[-1]["loss"] - evals[best]["loss"]) > 1e-3 * evals[best]["loss"]


def test_training_resume_with_mix_noise_and_patience_is_exact(model, data, mix_run, tmp_path):
    ref, ref_out, _ = mix_run
    assert ref["steps"] > 9

    def interrupt(step, metrics):
        if step == 9:  # between evaluations
            raise KeyboardInterrupt

    work = tmp_path / "w"
    with pytest.raises(TrainInterrupted, match="resume"):
        fit(model, data, tmp_path / "o", work_dir=work, config=MIX_FIT, callback=interrupt, **RUN)
    resumed = fit(model, data, tmp_path / "o", work_dir=work, config=MIX_FIT, **RUN)
    assert resumed["curves"] == ref["curves"] and resumed["evals"] == ref["evals"]
    assert resumed["best_step"] == ref["best_step"] and resumed["steps"] == ref["steps"]
    assert_same_params(params(load_drafter(tmp_path / "o")), params(load_drafter(ref_out)))
    # A crash after step 7 (the last checkpoint) and a new start.
    work = tmp_path / "w2"
    fit(model, data, tmp_path / "o2", work_dir=work, config=replace(MIX_FIT, max_steps=7), **RUN)
    resumed = fit(model, data, tmp_path / "o2", work_dir=work, config=MIX_FIT, **RUN)
    assert resumed["curves"] == ref["curves"] and resumed["evals"] == ref["evals"]
    assert_same_params(params(load_drafter(tmp_path / "o2")), params(load_drafter(ref_out)))
    # The noise is part of the run: another level is another curve.
    other = fit(
        model,
        data,
        tmp_path / "o3",
        work_dir=tmp_path / "w3",
        config=replace(MIX_FIT, feature_noise=0.0, max_steps=3),
        **RUN,
    )
    assert other["curves"]["loss"] != ref["curves"]["loss"][:3]


def test_starting_over_ignores_an_earlier_runs_best_drafter(model, data, tmp_path):
    work = tmp_path / "w"
    first = fit(
        model, data, tmp_path / "a", work_dir=work, config=replace(MIX_FIT, max_steps=3), **RUN
    )
    assert first["best_step"] == 2 and (work / "best").exists()
    # Started over with another learning rate, stopped before its first evaluation.
    config = replace(MIX_FIT, max_steps=1, learning_rate=1e-2)
    log = fit(model, data, tmp_path / "b", work_dir=work, config=config, resume=False, **RUN)
    assert log["steps"] == 1 and log["evals"] == [] and log["best_step"] is None
    last = params(load_drafter(work / "checkpoint" / "drafter"))
    assert_same_params(params(load_drafter(tmp_path / "b")), last)


def test_train_drafter_with_v2_settings(model, prompts_file, tmp_path):
    log = train_drafter(
        model,
        prompts_file,
        tmp_path / "out",
        tokenizer=TinyTokenizer(),
        data_config=DataConfig(
            new_tokens=8, gen_batch_size=8, shard_size=8, top_k=4, feature_layers=[0, 1]
        ),
        fit_config=FitConfig(
            epochs=1,
            learning_rate=3e-3,
            batch_size=32,
            num_predict=2,
            num_layers=1,
            loss="mix",
            kd_weight=0.25,
            feature_layers=[1],
            draft_vocab_coverage=0.8,
        ),
        progress=False,
    )
    s = log["settings"]
    assert s["loss"] == "mix" and s["kd_weight"] == 0.25 and s["feature_layers"] == [1]
    assert s["top_k"] == 4 and s["data_feature_layers"] == [0, 1]
    drafter = load_drafter(tmp_path / "out", base=model)
    assert drafter.feature_layers == (1,)
    # The draft vocabulary is sized for 80% of the training targets (EOS always in it).
    size = log["draft_vocab"]["size"]
    assert 0 < size < VOCAB and drafter.head_size == size
    # The data train_drafter made, read back.
    data = build_dataset(
        model, TinyTokenizer(), prompts_file, tmp_path / "out-work", new_tokens=8,
        gen_batch_size=8, shard_size=8, top_k=4, feature_layers=(0, 1), progress=False,
    )  # fmt: skip
    train_seqs, _ = train.split_sequences(data.num_sequences, 0.05)
    counts = train.target_counts(data, train_seqs, VOCAB)
    want = size_for_coverage(counts, 0.8)
    assert size in (want, want + 1)  # + EOS when the most frequent tokens lack it
    assert EOS in np.array(drafter.draft_vocab_ids).tolist()


@pytest.mark.parametrize("target", [0.5, 0.8])
def test_draft_vocab_coverage_reaches_its_target(model, data, tmp_path, target):
    config = replace(MIX_FIT, loss="ce", max_steps=1, draft_vocab_coverage=target)
    log = fit(model, data, tmp_path / "o", work_dir=tmp_path / "w", config=config, **RUN)
    train_seqs, _ = train.split_sequences(data.num_sequences, MIX_FIT.eval_fraction)
    counts = train.target_counts(data, train_seqs, VOCAB)
    assert counts[EOS] == 0  # the responses are cut before EOS
    # The most frequent tokens that reach the target, and EOS.
    assert log["draft_vocab"]["size"] == size_for_coverage(counts, target) + 1
    assert log["draft_vocab"]["coverage_train"] >= target


# ---------------------------------------------------------------------------------------------
# Bad settings


def test_bad_v2_settings(model, data, prompts_file, tmp_path):
    def fit_with(**changes):
        config = replace(MIX_FIT, **changes)
        return fit(model, data, tmp_path / "o", work_dir=tmp_path / "w", config=config, **RUN)

    with pytest.raises(TrainError, match="loss must be one of ce, kd, mix, got 'foo'"):
        fit_with(loss="foo")
    with pytest.raises(TrainError, match=r"kd_weight must be in \[0, 1\], got 1.5"):
        fit_with(kd_weight=1.5)
    with pytest.raises(TrainError, match="feature_noise"):
        fit_with(feature_noise=-1.0)
    with pytest.raises(TrainError, match="patience"):
        fit_with(patience=0)
    with pytest.raises(TrainError, match="coverage"):
        fit_with(draft_vocab_coverage=1.5)
    # The distillation losses need the top-k in the data.
    no_top = replace(data, top_ids=None, top_logprobs=None)
    for loss in ("kd", "mix"):
        with pytest.raises(TrainError, match="top-k"):
            fit(
                model, no_top, tmp_path / "o", work_dir=tmp_path / f"w-{loss}",
                config=replace(MIX_FIT, loss=loss), **RUN,
            )  # fmt: skip
    # Feature layers the data does not hold.
    with pytest.raises(TrainError, match="feature layers"):
        fit_with(feature_layers=(1,))
    # Out of range when making data, through the whole job, and for the generator's model.
    for bad in ([2], [-1], [0, 0]):
        with pytest.raises(TrainError, match="feature layers"):
            build_dataset(
                model, TinyTokenizer(), prompts_file, tmp_path / "d", feature_layers=bad,
                progress=False,
            )  # fmt: skip
    with pytest.raises(TrainError, match="feature layers"):
        train_drafter(
            model, prompts_file, tmp_path / "o", tokenizer=TinyTokenizer(),
            fit_config=FitConfig(feature_layers=[2]), progress=False,
        )  # fmt: skip
    with pytest.raises(TrainError, match="lack"):
        train_drafter(
            model, prompts_file, tmp_path / "o", tokenizer=TinyTokenizer(),
            fit_config=FitConfig(feature_layers=[1]), data_config=DataConfig(feature_layers=[0]),
            progress=False,
        )  # fmt: skip
    with pytest.raises(TrainError, match="top_k"):
        build_dataset(model, TinyTokenizer(), prompts_file, tmp_path / "d", top_k=-1)
    with pytest.raises(TrainError, match="loss must be"):
        train_drafter(model, prompts_file, tmp_path / "o", tokenizer=TinyTokenizer(),
                      fit_config=FitConfig(loss="foo"))  # fmt: skip


def test_fit_with_an_out_of_range_feature_layer_is_a_train_error(model, data, tmp_path):
    with pytest.raises(TrainError, match="feature layers"):
        fit(
            model, data, tmp_path / "o", work_dir=tmp_path / "w",
            config=replace(MIX_FIT, feature_layers=(5,)), **RUN,
        )  # fmt: skip


def test_data_workers_make_the_same_shards_as_one_process(tmp_path):
    """--workers 2: shards made in two spawned processes equal one process's."""
    model_dir = write_tiny_model(tmp_path / "model")
    model, tok = load(model_dir)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(json.dumps({"turns": [f"question number {i} about x"]}) + "\n" for i in range(8))
    )
    kw = dict(new_tokens=6, shard_size=2, progress=False, top_k=4, feature_layers=(0,))
    one = build_dataset(model, tok, prompts, tmp_path / "one", **kw)
    two = build_dataset(
        model, tok, prompts, tmp_path / "two", workers=2, model_source=(str(model_dir), None), **kw
    )
    assert len(list((tmp_path / "two" / "data").glob("shard-*.npz"))) == 4
    for a, b in zip(one.tokens, two.tokens, strict=True):
        np.testing.assert_array_equal(a, b)
    # Workers run one BLAS thread: other summation orders, equal up to float16 rounding.
    for name in ("hidden", "features", "top_logprobs"):
        a, b = getattr(two, name).astype(np.float32), getattr(one, name).astype(np.float32)
        assert_close(a, b, rtol=2e-3, what=f"{name}: ")
    np.testing.assert_array_equal(one.prompt_index, two.prompt_index)
    # Two processes' shard times overlap: the stats count each at half (a wall-clock share).
    shard_seconds = 0.0
    for path in sorted((tmp_path / "two" / "data").glob("shard-*.npz")):
        with np.load(path) as z:
            assert int(z["gen_processes"]) == 2
            shard_seconds += float(z["gen_seconds"])
    assert two.stats["generation_seconds"] == pytest.approx(shard_seconds / 2, abs=0.01)
