"""The drafter: forward equations, beam search, and checkpoint loading (Apple's layout)."""

import itertools
import json

# isort: off
import mlx_redrafter  # noqa: F401  (loads the BLAS before mlx.core)
import mlx.core as mx

# isort: on
import mlx.nn as nn
import numpy as np
import pytest
from helpers import RTOL, assert_close, random_model, tiny_llama_config
from mlx.utils import tree_flatten

from mlx_redrafter.beam import beam_search
from mlx_redrafter.drafter import (
    Drafter,
    DrafterArgs,
    DrafterError,
    init_drafter,
    load_drafter,
    quantize_drafter,
    save_drafter,
)

H, V = 32, 64
DRAFT_IDS = [3, 60, 7, 11, 2, 40, 41, 19, 23, 5, 50, 33]  # K = 12, deliberately unsorted

# As many KV heads as attention heads (4).
BASE_CONFIG = tiny_llama_config(
    V, H, intermediate_size=48, num_key_value_heads=4, tie_word_embeddings=True
)

VARIANTS = {
    "rnn": dict(),
    "sum": dict(rnn=False),
    "input-proj": dict(exit_dim=48),
    "sum-input-proj-1-layer": dict(rnn=False, exit_dim=40, num_draft_layers=1),
    "draft-vocab": dict(draft_vocab_ids=DRAFT_IDS),
    "draft-vocab-input-proj": dict(exit_dim=48, draft_vocab_ids=DRAFT_IDS),
}


@pytest.fixture(scope="module")
def base():
    return random_model(BASE_CONFIG, seed=1)


def make_drafter(base, sharpen: float = 4.0, seed: int = 0, **kwargs) -> Drafter:
    """A random drafter whose final head is scaled up so that its distributions are peaked
    (near-uniform drafts would make beam ranks hinge on float noise)."""
    drafter = init_drafter(base, seed=seed, **kwargs)
    final = drafter.lm_head[-1]
    final.weight = final.weight * sharpen
    mx.eval(drafter.parameters())
    return drafter


def context_vector(seed: int = 0) -> mx.array:
    return mx.random.normal((H,), key=mx.random.key(100 + seed))


def numpy_params(drafter: Drafter) -> dict[str, np.ndarray]:
    return {k: np.array(v, dtype=np.float64) for k, v in tree_flatten(drafter.parameters())}


def silu(x):
    return x / (1.0 + np.exp(-x))


def numpy_logits(p, args: DrafterArgs, table, context, tokens) -> np.ndarray:
    """Straight from the equations: logits for the token after `tokens` (x_0 .. x_{t-1})."""
    state = np.zeros(args.hidden_size)
    for tok in tokens:
        e = table[tok]
        if args.rnn:
            state = silu(p["rnn_w.weight"] @ e + p["rnn_u.weight"] @ state + p["rnn_u.bias"])
        else:
            state = state + e
    z = np.concatenate([context, state])
    if "input_proj.weight" in p:
        z = p["input_proj.weight"] @ z + p["input_proj.bias"]
    for i in range(args.num_draft_layers):
        z = z + silu(p[f"lm_head.{i}.linear.weight"] @ z + p[f"lm_head.{i}.linear.bias"])
    return p[f"lm_head.{args.num_draft_layers}.weight"] @ z


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def drafter_log_probs(drafter, base, context, prefixes) -> np.ndarray:
    """log q(. | prefix) for each prefix (tokens including g0), with the drafter's own
    next_state/head, one prefix at a time. -> (n, head_size) float64."""
    out = []
    for prefix in prefixes:
        state = drafter.initial_state(1)
        for tok in prefix:
            state = drafter.next_state(state, base.embed(mx.array([tok])))
        logits = drafter.head(context, state)[0].astype(mx.float32)
        out.append(log_softmax(np.array(logits, dtype=np.float64)))
    return np.stack(out)


def head_ids(drafter) -> list[int]:
    ids = drafter.draft_vocab_ids
    return list(range(drafter.args.vocab_size)) if ids is None else np.array(ids).tolist()


def reference_beam_search(drafter, base, context, g0, width, length, top_k=None):
    """Beam search written out with Python loops over beams and candidates."""
    ids = head_ids(drafter)
    beams, scores = [[g0]], [0.0]
    for _ in range(length - 1):
        log_q = drafter_log_probs(drafter, base, context, beams)
        if top_k is not None and top_k < log_q.shape[1]:
            logits = log_q.copy()
            for row in logits:
                row[row < np.sort(row)[-top_k]] = -np.inf
            log_q = log_softmax(logits)
        candidates = []
        for b, (beam, score) in enumerate(zip(beams, scores, strict=True)):
            for j in range(len(ids)):
                flat = b * len(ids) + j
                candidates.append((-(score + log_q[b, j]), flat, beam + [ids[j]]))
        candidates.sort(key=lambda c: (c[0], c[1]))
        beams = [c[2] for c in candidates[:width]]
        scores = [-c[0] for c in candidates[:width]]
    return beams, np.array(scores)


# ---------------------------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_matches_numpy_equations(base, variant):
    drafter = make_drafter(base, **VARIANTS[variant])
    p = numpy_params(drafter)
    table = np.array(base.model.embed_tokens.weight, dtype=np.float64)
    context = context_vector()
    c = np.array(context, dtype=np.float64)
    for tokens in ([5], [5, 17], [63, 0, 9, 9]):
        state = drafter.initial_state(1)
        for tok in tokens:
            state = drafter.next_state(state, base.embed(mx.array([tok])))
        ours = np.array(drafter.head(context, state)[0])
        ref = numpy_logits(p, drafter.args, table, c, tokens)
        assert ours.shape == (drafter.head_size,)
        assert_close(ours, ref)


def test_module_layout_matches_apple_names(base):
    drafter = init_drafter(base, exit_dim=48, num_draft_layers=2)
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(drafter.parameters())}
    assert shapes == {
        "input_proj.weight": (48, 2 * H),
        "input_proj.bias": (48,),
        "lm_head.0.linear.weight": (48, 48),
        "lm_head.0.linear.bias": (48,),
        "lm_head.1.linear.weight": (48, 48),
        "lm_head.1.linear.bias": (48,),
        "lm_head.2.weight": (V, 48),
        "rnn_u.weight": (H, H),
        "rnn_u.bias": (H,),
        "rnn_w.weight": (H, H),
    }
    plain = init_drafter(base, rnn=False, draft_vocab_ids=DRAFT_IDS)
    names = {k for k, _ in tree_flatten(plain.parameters())}
    assert "input_proj.weight" not in names and "rnn_u.weight" not in names
    assert plain.lm_head[-1].weight.shape == (len(DRAFT_IDS), 2 * H)


def test_head_broadcasts_context_over_beams(base):
    drafter = make_drafter(base)
    context = context_vector()
    state = drafter.next_state(drafter.initial_state(3), base.embed(mx.array([1, 2, 3])))
    batched = drafter.head(context, state)
    for i in range(3):
        single = drafter.head(context[None], state[i : i + 1])
        assert_close(batched[i], single[0])


def test_vocabulary_maps(base):
    drafter = init_drafter(base, draft_vocab_ids=DRAFT_IDS)
    assert np.array(drafter.full_vocab_ids(mx.array([0, 1, 11]))).tolist() == [3, 60, 33]
    assert np.array(drafter.head_index(mx.array([3, 33, 4]))).tolist() == [0, 11, -1]
    full = init_drafter(base)
    assert np.array(full.full_vocab_ids(mx.array([0, 63]))).tolist() == [0, 63]
    assert full.head_size == V and drafter.head_size == len(DRAFT_IDS)


def test_bad_draft_vocab_ids_rejected(base):
    with pytest.raises(DrafterError, match="outside"):
        init_drafter(base, draft_vocab_ids=[1, V])
    with pytest.raises(DrafterError, match="duplicate"):
        init_drafter(base, draft_vocab_ids=[1, 2, 1])
    with pytest.raises(DrafterError, match="empty"):
        init_drafter(base, draft_vocab_ids=[])


def test_init_is_seeded_and_not_degenerate(base):
    a, b, c = (init_drafter(base, seed=s) for s in (0, 0, 1))
    pa, pb, pc = (dict(tree_flatten(d.parameters())) for d in (a, b, c))
    assert all(mx.array_equal(pa[k], pb[k]).item() for k in pa)
    assert not mx.array_equal(pa["lm_head.2.weight"], pc["lm_head.2.weight"]).item()
    # Beams are distinct, and drafts depend on the context and on g0 (the state matters).
    for variant in ("rnn", "sum", "input-proj"):
        drafter = init_drafter(base, **VARIANTS[variant])
        drafts = []
        for seed, g0 in [(0, g) for g in range(8)] + [(1, 0), (2, 0)]:
            beams, _ = beam_search(drafter, base, context_vector(seed), g0, 4, 4)
            rows = frozenset(tuple(r) for r in np.array(beams)[:, 1:].tolist())
            assert len(rows) == 4
            drafts.append(rows)
        assert len(set(drafts[:8])) >= 4, variant
        assert len({drafts[0], drafts[8], drafts[9]}) == 3, variant
    half = init_drafter(base, dtype=mx.float16)
    assert half.dtype == mx.float16 and half.lm_head[-1].weight.dtype == mx.float16


# ---------------------------------------------------------------------------------------------
# Beam search


@pytest.mark.parametrize("variant", ["rnn", "sum", "draft-vocab-input-proj"])
@pytest.mark.parametrize("width,length", [(1, 4), (3, 3), (4, 5), (8, 3)])
def test_beam_search_matches_reference(base, variant, width, length):
    drafter = make_drafter(base, **VARIANTS[variant])
    context = context_vector()
    beams, scores = beam_search(drafter, base, context, 9, width, length)
    mx.eval(beams, scores)
    assert beams.dtype == mx.int32 and beams.shape == (width, length)
    assert scores.dtype == mx.float32 and scores.shape == (width,)
    ref_beams, ref_scores = reference_beam_search(drafter, base, context, 9, width, length)
    assert np.array(beams).tolist() == ref_beams
    assert_close(scores, ref_scores)


@pytest.mark.parametrize("variant", ["rnn", "draft-vocab"])
def test_beam_search_is_exhaustive_without_pruning(base, variant):
    """L=2 (one step), or L=3 with W = head size (nothing is pruned before the last step):
    the beams are exactly the W best of all sequences, with their summed log-probs."""
    drafter = make_drafter(base, **VARIANTS[variant])
    context = context_vector(3)
    ids = head_ids(drafter)
    cases = [(5, 2), (len(ids), 3)] if len(ids) < V else [(5, 2), (7, 2)]
    for width, length in cases:
        log_q1 = drafter_log_probs(drafter, base, context, [[4]])[0]
        seqs, seq_scores = [], []
        if length == 2:
            for j, t in enumerate(ids):
                seqs.append((4, t))
                seq_scores.append(log_q1[j])
        else:
            log_q2 = drafter_log_probs(drafter, base, context, [[4, t] for t in ids])
            for (j1, t1), (j2, t2) in itertools.product(enumerate(ids), repeat=2):
                seqs.append((4, t1, t2))
                seq_scores.append(log_q1[j1] + log_q2[j1, j2])
        order = np.argsort(-np.array(seq_scores), kind="stable")[:width]
        beams, scores = beam_search(drafter, base, context, 4, width, length)
        got = [tuple(r) for r in np.array(beams).tolist()]
        assert set(got) == {seqs[i] for i in order}
        assert got == [seqs[i] for i in order]
        assert_close(scores, np.array(seq_scores)[order])


def test_scores_are_summed_log_probs(base):
    drafter = make_drafter(base, exit_dim=48)
    context = context_vector(1)
    beams, scores = beam_search(drafter, base, context, 30, 5, 5)
    beams = np.array(beams).tolist()
    for beam, score in zip(beams, np.array(scores), strict=True):
        log_q = drafter_log_probs(drafter, base, context, [beam[:t] for t in range(1, 5)])
        assert_close(score, sum(log_q[t, beam[t + 1]] for t in range(4)))
    assert all(b[0] == 30 for b in beams)
    assert len({tuple(b) for b in beams}) == 5
    assert np.all(np.diff(np.array(scores)) <= 0)


def test_width_one_is_greedy(base):
    for variant in ("rnn", "draft-vocab"):
        drafter = make_drafter(base, **VARIANTS[variant])
        ids = head_ids(drafter)
        context = context_vector(2)
        greedy = [12]
        for _ in range(5):
            greedy.append(ids[int(np.argmax(drafter_log_probs(drafter, base, context, [greedy])))])
        beams, _ = beam_search(drafter, base, context, 12, 1, 6)
        assert np.array(beams).tolist() == [greedy]


def test_draft_vocab_beams_use_only_draft_ids(base):
    drafter = make_drafter(base, draft_vocab_ids=DRAFT_IDS)
    beams, scores = beam_search(drafter, base, context_vector(), 62, 6, 5)
    beams = np.array(beams)
    assert (beams[:, 0] == 62).all()
    assert set(beams[:, 1:].ravel().tolist()) <= set(DRAFT_IDS)
    assert np.all(np.diff(np.array(scores)) <= 0)


def test_ties_go_to_the_lower_index(base):
    """A head of zeros makes every log-prob equal, so the order is decided by the tie rule:
    lower beam first, then lower head index."""
    for ids in (None, DRAFT_IDS):
        drafter = init_drafter(base, draft_vocab_ids=ids)
        final = drafter.lm_head[-1]
        final.weight = mx.zeros_like(final.weight)
        beams, scores = beam_search(drafter, base, context_vector(), 8, 4, 4)
        to_id = head_ids(drafter)
        expected = [[8, to_id[0], to_id[0], to_id[j]] for j in range(4)]
        assert np.array(beams).tolist() == expected
        assert_close(scores, np.full(4, 3 * -np.log(drafter.head_size)))


def test_top_k_warp(base):
    drafter = make_drafter(base, sharpen=1.0)
    context = context_vector()
    beams, scores = beam_search(drafter, base, context, 9, 3, 4, top_k=5)
    ref_beams, ref_scores = reference_beam_search(drafter, base, context, 9, 3, 4, top_k=5)
    assert np.array(beams).tolist() == ref_beams
    assert_close(scores, ref_scores)
    # Warping renormalises over the top k, so scores rise; top_k >= V is no warp at all.
    plain_beams, plain_scores = beam_search(drafter, base, context, 9, 3, 4)
    assert np.all(np.array(scores) > np.array(plain_scores))
    same_beams, same_scores = beam_search(drafter, base, context, 9, 3, 4, top_k=V)
    assert np.array_equal(np.array(same_beams), np.array(plain_beams))
    assert_close(same_scores, plain_scores)


@pytest.mark.parametrize("variant", ["rnn", "draft-vocab-input-proj"])
def test_compiled_step_matches(base, variant):
    drafter = make_drafter(base, **VARIANTS[variant])
    context = context_vector()
    for top_k in (None, 6):
        a = beam_search(drafter, base, context, 9, 4, 5, top_k=top_k)
        b = beam_search(drafter, base, context, 9, 4, 5, top_k=top_k, compiled=True)
        assert np.array_equal(np.array(a[0]), np.array(b[0]))
        assert_close(a[1], b[1])
    # The compiled step sees weight updates.
    final = drafter.lm_head[-1]
    final.weight = mx.zeros_like(final.weight)
    beams, _ = beam_search(drafter, base, context, 9, 2, 3, compiled=True)
    first = head_ids(drafter)[0]
    assert np.array(beams).tolist() == [[9, first, first], [9, first, head_ids(drafter)[1]]]


def test_beam_search_input_forms(base):
    drafter = make_drafter(base)
    context = context_vector()
    a = beam_search(drafter, base, context, 9, 3, 4)
    b = beam_search(drafter, base, context[None], mx.array(9), 3, 4)
    c = beam_search(drafter, base, context.astype(mx.float16), 9, 3, 4)
    assert np.array_equal(np.array(a[0]), np.array(b[0]))
    assert np.array_equal(np.array(a[0]), np.array(c[0]))
    half = make_drafter(base, dtype=mx.float16)
    beams, scores = beam_search(half, base, context, 9, 3, 4)
    assert scores.dtype == mx.float32 and np.isfinite(np.array(scores)).all()


def test_beam_search_rejects_bad_shapes(base):
    drafter = make_drafter(base, draft_vocab_ids=DRAFT_IDS)
    context = context_vector()
    with pytest.raises(ValueError, match=r"beam_width 13 is larger than the drafter's draft vocab"):
        beam_search(drafter, base, context, 9, 13, 3)
    with pytest.raises(ValueError, match="beam_width 65 is larger"):
        beam_search(make_drafter(base), base, context, 9, 65, 3)
    with pytest.raises(ValueError, match="beam_length"):
        beam_search(drafter, base, context, 9, 2, 1)
    with pytest.raises(ValueError, match="beam_width"):
        beam_search(drafter, base, context, 9, 0, 3)
    with pytest.raises(ValueError, match="top_k"):
        beam_search(drafter, base, context, 9, 4, 3, top_k=3)
    with pytest.raises(ValueError, match="context"):
        beam_search(drafter, base, mx.zeros((2, H)), 9, 2, 3)


# ---------------------------------------------------------------------------------------------
# Saving and loading


def logits_of(drafter, base) -> np.ndarray:
    state = drafter.next_state(drafter.initial_state(2), base.embed(mx.array([4, 50])))
    return np.array(drafter.head(context_vector(), state).astype(mx.float32))


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_round_trip(base, tmp_path, variant):
    drafter = make_drafter(base, **VARIANTS[variant])
    out = save_drafter(drafter, tmp_path / "drafter")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drafter"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "recurrent_drafting_drafter"
    assert config.get("draft_vocab_ids") == VARIANTS[variant].get("draft_vocab_ids")
    loaded = load_drafter(out, base=base)
    assert loaded.args == drafter.args
    assert np.array_equal(logits_of(loaded, base), logits_of(drafter, base))
    a = beam_search(drafter, base, context_vector(), 1, 4, 4)
    b = beam_search(loaded, base, context_vector(), 1, 4, 4)
    assert np.array_equal(np.array(a[0]), np.array(b[0]))


def test_save_over_existing_directory_keeps_other_files(base, tmp_path):
    out = tmp_path / "drafter"
    save_drafter(init_drafter(base, seed=0), out)
    (out / "README.md").write_text("notes")
    second = init_drafter(base, seed=1, exit_dim=48)
    save_drafter(second, out)
    assert (out / "README.md").read_text() == "notes"
    assert np.array_equal(logits_of(load_drafter(out), base), logits_of(second, base))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drafter"]


def test_quantized_round_trip(base, tmp_path):
    drafter = quantize_drafter(make_drafter(base), group_size=32, bits=8)
    assert isinstance(drafter.lm_head[-1], nn.QuantizedLinear)
    save_drafter(drafter, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 8}
    loaded = load_drafter(tmp_path / "q", base=base)
    assert isinstance(loaded.lm_head[-1], nn.QuantizedLinear)
    assert isinstance(loaded.rnn_u, nn.QuantizedLinear)
    assert np.array_equal(logits_of(loaded, base), logits_of(drafter, base))
    assert loaded.num_parameters == make_drafter(base).num_parameters
    assert "8-bit" in loaded.describe()
    bare = make_drafter(base)
    nn.quantize(bare, group_size=32, bits=4)
    with pytest.raises(DrafterError, match="quantize_drafter"):
        save_drafter(bare, tmp_path / "bare")
    assert not (tmp_path / "bare").exists()


def test_load_with_dtype(base, tmp_path):
    drafter = make_drafter(base)
    save_drafter(drafter, tmp_path / "d")
    half = load_drafter(tmp_path / "d", dtype=mx.float16)
    assert half.dtype == mx.float16
    assert_close(logits_of(half, base), logits_of(drafter, base), rtol=RTOL["float16"])


def write_apple_checkpoint(path, base, emb_norm=False, config_extra=None, drop=(), add=None):
    """What Apple's `save_pretrained` writes (N=1, exit_dim=24 so input_proj exists)."""
    rng = np.random.default_rng(0)
    e = 24
    shapes = {
        "input_proj.weight": (e, 2 * H),
        "input_proj.bias": (e,),
        "lm_head.0.linear.weight": (e, e),
        "lm_head.0.linear.bias": (e,),
        "lm_head.1.weight": (V, e),
        "rnn_u.weight": (H, H),
        "rnn_u.bias": (H,),
        "rnn_w.weight": (H, H),
    }
    if emb_norm:
        shapes["emb_norm.weight"] = (H,)
    weights = {
        k: mx.array(rng.normal(0, 0.3, s).astype(np.float32))
        for k, s in shapes.items()
        if k not in drop
    }
    weights.update(add or {})
    path.mkdir()
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    config = {
        "architectures": ["Drafter"],
        "exit_dim": e,
        "hidden_size": H,
        "model_type": "recurrent_drafting_drafter",
        "num_draft_layers": 1,
        "num_lookback_tokens": -1,
        "rnn": True,
        "torch_dtype": "float32",
        "transformers_version": "4.40.1",
        "vocab_size": V,
    }
    if emb_norm:
        config["emb_norm"] = True
    config.update(config_extra or {})
    (path / "config.json").write_text(json.dumps(config))
    return {k: np.array(v, dtype=np.float64) for k, v in weights.items()}


def test_apple_checkpoint_loads_unchanged(base, tmp_path):
    weights = write_apple_checkpoint(tmp_path / "apple", base)
    drafter = load_drafter(tmp_path / "apple", base=base)
    assert drafter.args.exit_dim == 24 and drafter.args.num_draft_layers == 1
    table = np.array(base.model.embed_tokens.weight, dtype=np.float64)
    c = np.array(context_vector(), dtype=np.float64)
    ref = np.stack([numpy_logits(weights, drafter.args, table, c, [t]) for t in (4, 50)])
    assert_close(logits_of(drafter, base), ref)


def test_emb_norm_checkpoint(base, tmp_path):
    write_apple_checkpoint(tmp_path / "with", base, emb_norm=True)
    drafter = load_drafter(tmp_path / "with", base=base)
    assert "emb_norm" in drafter
    write_apple_checkpoint(tmp_path / "without", base, emb_norm=True, config_extra={})
    config = json.loads((tmp_path / "without" / "config.json").read_text())
    del config["emb_norm"]
    (tmp_path / "without" / "config.json").write_text(json.dumps(config))
    with pytest.raises(DrafterError, match=r"model\.safetensors.*emb_norm\.weight.*emb_norm"):
        load_drafter(tmp_path / "without")


@pytest.mark.parametrize(
    "kind,kwargs,pattern",
    [
        ("missing", dict(drop=("rnn_w.weight",)), r"weights missing for rnn_w\.weight"),
        (
            "extra",
            dict(add={"lm_head.9.weight": mx.zeros((2, 2))}),
            r"unexpected weights lm_head\.9",
        ),
        (
            "shape",
            dict(config_extra={"exit_dim": 20}),
            r"shape mismatch: input_proj\.weight \(24, 64\) \(expected \(20, 64\)\)",
        ),
        (
            "no-input-proj",
            dict(config_extra={"exit_dim": 2 * H}),
            r"unexpected weights input_proj.*exit_dim",
        ),
    ],
)
def test_bad_checkpoint_names_the_file(base, tmp_path, kind, kwargs, pattern):
    write_apple_checkpoint(tmp_path / kind, base, **kwargs)
    with pytest.raises(DrafterError, match=pattern) as err:
        load_drafter(tmp_path / kind)
    assert str(tmp_path / kind / "model.safetensors") in str(err.value)
    assert "\n" not in str(err.value)


def test_mismatched_base_names_both_sides(base, tmp_path):
    write_apple_checkpoint(
        tmp_path / "hidden", base, config_extra={"hidden_size": 4096, "exit_dim": 24}
    )
    with pytest.raises(DrafterError) as err:
        load_drafter(tmp_path / "hidden", base=base)
    msg = str(err.value)
    assert str(tmp_path / "hidden") in msg
    assert "hidden_size 4096 but the base model has 32" in msg
    write_apple_checkpoint(tmp_path / "vocab", base, config_extra={"vocab_size": 32000})
    with pytest.raises(DrafterError, match="vocab_size 32000 but the base model has 64"):
        load_drafter(tmp_path / "vocab", base=base)


def test_bad_config(base, tmp_path):
    with pytest.raises(DrafterError, match="has no config.json"):
        load_drafter(tmp_path)
    write_apple_checkpoint(tmp_path / "llama", base, config_extra={"model_type": "llama"})
    with pytest.raises(DrafterError, match=r"config\.json: model_type is 'llama'"):
        load_drafter(tmp_path / "llama")
    write_apple_checkpoint(tmp_path / "ids", base, config_extra={"draft_vocab_ids": [1, 99]})
    with pytest.raises(DrafterError, match=r"config\.json: draft_vocab_ids has ids outside"):
        load_drafter(tmp_path / "ids", base=base)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    (tmp_path / "broken" / "model.safetensors").write_text("")
    with pytest.raises(DrafterError, match="not valid JSON"):
        load_drafter(tmp_path / "broken")
