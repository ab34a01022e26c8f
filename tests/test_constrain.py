"""Grammar-constrained decoding: valid output for generated schemas, speculative == plain,
forbidden candidates never verified, exact sampling under per-node masks."""

from __future__ import annotations

import json

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from helpers import (
    assert_close,
    invoke,
    reference_logits,
    write_tiny_drafter,
    write_tiny_model,
)
from test_generation import chi2_pvalue

from mlx_redrafter import rounds
from mlx_redrafter.accept import SamplingConfig, process_logits, sample_accept_batch
from mlx_redrafter.constrain import JsonGrammar, allowed_tokens, apply_bitmask
from mlx_redrafter.drafter import load_drafter
from mlx_redrafter.errors import ConstraintError, GenerationError
from mlx_redrafter.generation import stream_generate
from mlx_redrafter.loading import load
from mlx_redrafter.sizing import lookup_candidate
from mlx_redrafter.tree import pack_sequences

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """A random tiny model (root/model) with a real byte-level BPE tokenizer; its drafter."""
    root = tmp_path_factory.mktemp("constrain")
    write_tiny_model(root / "model")
    write_tiny_drafter(root / "model", root / "drafter")
    return root


@pytest.fixture(scope="module")
def tiny(tiny_root):
    """The tiny model, tokenizer, drafter and JSON grammar compiler."""
    root = tiny_root
    model, tokenizer = load(root / "model")
    drafter = load_drafter(root / "drafter", model)
    return model, tokenizer, drafter, JsonGrammar.for_model(model, tokenizer)


def run(model, tokenizer, constraint, **kw):
    responses = list(
        stream_generate(model, tokenizer, PROMPT, max_tokens=kw.pop("max_tokens", 600),
                        constraint=constraint, **kw)
    )  # fmt: skip
    return "".join(r.text for r in responses), [r.token for r in responses], responses


# ---------------------------------------------------------------------------------------------
# Generated schemas: bounded so that any output under them ends within max_tokens


def _name(rng) -> str:
    return "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(1, 6)))


def _scalar(rng) -> dict:
    kind = rng.integers(0, 8)
    if kind == 0:
        return {"type": "boolean"}
    if kind == 1:
        return {"type": "null"}
    if kind == 2:
        lo = int(rng.integers(-50, 50))
        return {"type": "integer", "minimum": lo, "maximum": lo + int(rng.integers(0, 200))}
    if kind == 3:
        return {"type": "string", "minLength": int(rng.integers(0, 3)),
                "maxLength": int(rng.integers(3, 9))}  # fmt: skip
    if kind == 4:
        values = [_name(rng) for _ in range(rng.integers(1, 5))] + [int(rng.integers(0, 9))]
        return {"enum": list(dict.fromkeys(values))}
    if kind == 5:
        return {"const": _name(rng)}
    if kind == 6:
        return {"type": "string", "pattern": "^[a-z]{1,5}[0-9]?$"}
    return {"anyOf": [{"type": "boolean"}, {"type": "string", "maxLength": 4}]}


def _value(rng, depth: int) -> dict:
    kind = rng.integers(0, 4) if depth < 2 else 0
    if kind == 0 or kind == 1:
        return _scalar(rng)
    if kind == 2:
        lo = int(rng.integers(0, 2))
        return {"type": "array", "items": _value(rng, depth + 1), "minItems": lo,
                "maxItems": lo + int(rng.integers(0, 3))}  # fmt: skip
    return _object(rng, depth + 1, int(rng.integers(1, 4)))


def _object(rng, depth: int, size: int) -> dict:
    props = {}
    while len(props) < size:
        props[_name(rng)] = _value(rng, depth)
    required = [k for k in props if rng.random() < 0.7]
    return {"type": "object", "properties": props, "required": required,
            "additionalProperties": False}  # fmt: skip


def generated_schemas(n: int = 50, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = [_object(rng, 0, int(rng.integers(1, 5))) for _ in range(n - 5)]
    out += [{"type": "array", "items": _scalar(rng), "minItems": 1, "maxItems": 3}]
    return out + [_scalar(rng) for _ in range(4)]


SCHEMAS = generated_schemas()


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_output_validates_and_speculation_equals_plain(tiny, index):
    """Under each generated schema: constrained plain greedy output parses and validates,
    speculative greedy output (drafter + lookup) is token-identical to it, and sampled output
    validates too."""
    model, tokenizer, drafter, grammar = tiny
    schema = SCHEMAS[index]
    text, plain, last = run(model, tokenizer, grammar.json_schema(schema), lookup=False)
    assert last[-1].finish_reason == "stop", text
    jsonschema.validate(json.loads(text), schema)
    _, spec, _ = run(model, tokenizer, grammar.json_schema(schema), drafter=drafter)
    assert spec == plain
    sampled, _, _ = run(model, tokenizer, grammar.json_schema(schema), drafter=drafter,
                        temperature=1.0, seed=index)  # fmt: skip
    jsonschema.validate(json.loads(sampled), schema)


def test_logprobs_under_a_constraint_are_the_models_own(tiny):
    """Constrained tokens report the unmasked model's logprobs, speculative as plain."""
    model, tokenizer, drafter, grammar = tiny
    _, tokens, spec = run(model, tokenizer, grammar.json_schema(SCHEMA), drafter=drafter,
                          logprobs=2)  # fmt: skip
    _, _, plain = run(model, tokenizer, grammar.json_schema(SCHEMA), lookup=False, logprobs=2)
    assert [r.token for r in plain] == tokens
    logits = reference_logits(model, tokenizer.encode(PROMPT), tokens)
    ref = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    expected = ref[np.arange(len(tokens)), tokens]
    assert_close([r.logprobs.logprob for r in spec], expected)
    assert_close([r.logprobs.logprob for r in plain], expected)
    assert_close([r.logprobs.top[0][1] for r in spec], ref.max(axis=1))


def test_json_object_mode_gives_an_object(tiny):
    model, tokenizer, drafter, grammar = tiny
    text, _, last = run(model, tokenizer, grammar.json_object(), drafter=drafter, max_tokens=400)
    if last[-1].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    assert text.startswith("{")


def test_response_format_shapes(tiny):
    grammar = tiny[3]
    assert grammar.response_format(None) is None
    assert grammar.response_format({"type": "text"}) is None
    assert grammar.response_format({"type": "json_object"}) is not None
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    assert grammar.response_format(fmt) is not None
    for bad in ({"type": "yaml"}, {"type": "json_schema", "json_schema": {"name": "x"}}, []):
        with pytest.raises(ConstraintError):
            grammar.response_format(bad)


def test_bad_schemas_are_one_line_errors(tiny):
    grammar = tiny[3]
    for bad in ('{"type": ', "[1, 2]", {"type": "nonsense"}):
        with pytest.raises(ConstraintError) as info:
            grammar.json_schema(bad)
        assert "\n" not in str(info.value)


def test_a_constraint_for_another_vocabulary_is_refused(tiny):
    model, tokenizer, _, _ = tiny
    other = JsonGrammar(tokenizer, model.args.vocab_size + 64).json_object()
    with pytest.raises(GenerationError, match="logits"):
        run(model, tokenizer, other)


# ---------------------------------------------------------------------------------------------
# Pruning and per-node masks


class GrammarNoisyOracle:
    """Beam w carries the true (constrained greedy) continuation for a random number of
    tokens, then random tokens, most of which the grammar forbids."""

    def __init__(self, reference: list[int], vocab: int, seed: int):
        self.ref, self.vocab = reference + [0] * 16, vocab
        self.rng = np.random.default_rng(seed)
        self.pos = 0

    def propose(self, model, context, g0, W, L):
        assert self.ref[self.pos] == g0, "the loop lost its place"
        beams = np.tile(np.array(self.ref[self.pos : self.pos + L]), (W, 1)).astype(np.int32)
        right = self.rng.integers(0, L, size=W)
        for w in range(W):
            noise = self.rng.integers(3, self.vocab, size=L - right[w] - 1)
            beams[w, right[w] + 1 :] = np.where(
                noise == beams[w, right[w] + 1 :], (noise + 1) % self.vocab, noise
            )
        self.pos += int(right.max()) + 1
        return mx.array(beams), mx.zeros((W,))


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "xs": {"type": "array", "items": {"enum": ["a", "bb", 3]}, "maxItems": 3},
    },
    "required": ["name", "n", "ok", "xs"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("seed", range(3))
def test_forbidden_drafted_tokens_are_never_verified(tiny, monkeypatch, seed):
    """Every node of every verified tree is allowed on its path; drafts with forbidden tokens
    were proposed and cut; the output equals constrained plain decoding with drafted tokens
    accepted."""
    model, tokenizer, _, grammar = tiny
    _, reference, _ = run(model, tokenizer, grammar.json_schema(SCHEMA), lookup=False)
    constraint = grammar.json_schema(SCHEMA)
    verified, cut = [], []
    real_verify, real_prune = rounds.verify_tree, constraint.prune

    def spy_verify(model, cache, tree, features=()):
        for u in range(1, tree.num_nodes):
            path = []
            while u > 0:
                path.append(int(tree.tokens[u]))
                u = int(tree.parents[u])
            verified.append(constraint.allowed(path[::-1]) == len(path))
        return real_verify(model, cache, tree, features)

    def spy_prune(candidates):
        kept = real_prune(candidates)
        cut.append(sum(len(c.tokens) for c in candidates) - sum(len(c.tokens) for c in kept))
        return kept

    monkeypatch.setattr(rounds, "verify_tree", spy_verify)
    monkeypatch.setattr(constraint, "prune", spy_prune)
    constraint.propose_forced = False  # the oracle follows acceptance from its own beams only
    oracle = GrammarNoisyOracle(reference, model.args.vocab_size, seed)
    _, tokens, responses = run(model, tokenizer, constraint, drafter=oracle, lookup=False,
                               beam_width=3, beam_length=4)  # fmt: skip
    assert tokens == reference
    assert verified and all(verified)
    assert sum(cut) > 0, "the oracle proposed no forbidden token: the test tests nothing"
    assert responses[-1].stats.tokens_per_step > 1.5


def test_forced_continuations_are_proposed_and_accepted(tiny):
    """With lookup alone, the grammar's forced continuations (key names, separators) are
    verified and accepted, and the output is still constrained plain decoding's."""
    model, tokenizer, _, grammar = tiny
    _, reference, _ = run(model, tokenizer, grammar.json_schema(SCHEMA), lookup=False)
    _, tokens, responses = run(model, tokenizer, grammar.json_schema(SCHEMA), lookup=True)
    assert tokens == reference
    stats = responses[-1].stats
    assert stats.accepted_from.get("grammar", 0) >= 8, stats.accepted_from
    constraint = grammar.json_schema(SCHEMA)
    brace = tokenizer.encode("{")[0]
    constraint.advance([brace])  # the root: emitted, so the state is past it
    (forced,) = constraint.forced(brace)
    assert forced.source == "grammar" and forced.tokens[0] == brace
    assert tokenizer.decode(list(forced.tokens)).startswith('{"name"')
    constraint.propose_forced = False
    assert constraint.forced(brace) == []


def test_prune_cuts_candidates_at_their_first_forbidden_token(tiny):
    tokenizer, grammar = tiny[1], tiny[3]
    constraint = grammar.json_schema(SCHEMA)
    brace, quote = tokenizer.encode("{")[0], tokenizer.encode('"')[0]
    constraint.advance([brace])
    x = tokenizer.encode("x")[0]
    kept = constraint.prune([
        lookup_candidate(brace, [quote, x, x], 2),  # '{"x': a key the schema does not have
        lookup_candidate(brace, [x, quote], 2),  # '{x': forbidden at once
        lookup_candidate(brace, tokenizer.encode('"name": "a'), 3),  # all allowed
    ])  # fmt: skip
    assert [c.tokens for c in kept] == [
        (brace, quote), (brace, *tokenizer.encode('"name": "a'))
    ]  # fmt: skip
    assert len(kept[0].raw) == len(kept[0].buckets) == 1


def test_each_node_is_masked_for_its_own_path(tiny):
    """mask_tree's row u equals the mask of a fresh state that consumed u's path; the
    constraint's own state is where it was."""
    tokenizer, grammar = tiny[1], tiny[3]
    constraint = grammar.json_schema(SCHEMA)
    brace = tokenizer.encode("{")[0]
    constraint.advance([brace])
    before = constraint.bitmask().copy()
    seqs = [[brace, *tokenizer.encode(s)] for s in ('"name": "ab', '"name"', '"n')]
    tree = pack_sequences(seqs)
    bits = constraint.tree_bitmasks(tree)
    assert np.array_equal(constraint.bitmask(), before)
    for u in range(tree.num_nodes):
        path, v = [], u
        while v > 0:
            path.append(int(tree.tokens[v]))
            v = int(tree.parents[v])
        fresh = grammar.json_schema(SCHEMA)
        fresh.advance([brace, *path[::-1]])
        assert np.array_equal(bits[u], fresh.bitmask()), f"node {u}"
    # Applying the bits keeps exactly the allowed tokens.
    logits = mx.zeros((tree.num_nodes, grammar.vocab_size))
    masked = np.array(apply_bitmask(logits, bits))
    for u in range(tree.num_nodes):
        assert np.array_equal(
            np.flatnonzero(masked[u] == 0), allowed_tokens(bits[u], grammar.vocab_size)
        )


# ---------------------------------------------------------------------------------------------
# Sampling under masks


def _sampling_case(tiny):
    """A tree after '{"n": ' under an enum schema, with drafted children the grammar allows
    and forbids, and logits that favour a forbidden continuation at an inner node."""
    tokenizer, grammar = tiny[1], tiny[3]
    schema = {"enum": ["ab", "ac", "b", "cd"]}
    constraint = grammar.json_schema(schema)
    enc = {s: tokenizer.encode(s) for s in ('"', "a", "b", "c", "d", "x")}
    assert all(len(v) == 1 for v in enc.values())
    q, a, b, c, d, x = (enc[s][0] for s in ('"', "a", "b", "c", "d", "x"))
    constraint.advance([q])
    candidates = [
        lookup_candidate(q, [a, b], 2),
        lookup_candidate(q, [a, x], 2),  # forbidden after '"a'
        lookup_candidate(q, [x], 2),  # forbidden at the root
        lookup_candidate(q, [c, d], 2),
        lookup_candidate(q, [b, q], 2),
    ]
    tree = pack_sequences([cand.tokens for cand in constraint.prune(candidates)])
    assert x not in tree.tokens.tolist()
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(tree.num_nodes, grammar.vocab_size)).astype(np.float32)
    node_a = int(np.flatnonzero(tree.tokens == a)[0])
    logits[node_a, a] += 4.0  # the root allows 'a' again; after '"a' the grammar does not
    logits[:, [a, b, c]] += 1.5
    return constraint, tree, mx.array(logits), node_a, (a, b, c)


def _samples(tree, logits, temperature, n=20000):
    mx.random.seed(1)
    uniforms = mx.random.uniform(shape=(n, tree.num_nodes, tree.children.shape[1] + 1))
    return sample_accept_batch(tree, logits, SamplingConfig(temperature, 1.0, 0), uniforms)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_under_masks_is_exact(tiny, temperature):
    """First emitted token ~ the masked root distribution; the next, after an accepted 'a',
    ~ the masked distribution of node 'a'; a forbidden token is never emitted."""
    constraint, tree, logits, node_a, (a, b, c) = _sampling_case(tiny)
    masked = constraint.mask_tree(tree, logits)
    batch = _samples(tree, masked, temperature)
    probs = np.exp(np.array(process_logits(masked, SamplingConfig(temperature))))  # (N, V)
    first = np.bincount(batch.tokens[:, 0], minlength=probs.shape[1])
    assert chi2_pvalue(first, probs[0]) > 1e-4
    after_a = batch.tokens[(batch.paths[:, 1] == node_a), 1]
    assert after_a.size > 1000
    second = np.bincount(after_a, minlength=probs.shape[1])
    assert chi2_pvalue(second, probs[node_a]) > 1e-4
    assert second[a] == 0


def test_the_masked_sampling_check_can_fail(tiny):
    """Controls: masking every node with the root's mask (ignoring the path) emits 'a' after
    '"a', which the check calls impossible; masking every node with node 'a's mask (wrong at
    the root) shifts the first token's distribution, and the chi-square test catches it."""
    constraint, tree, logits, node_a, _ = _sampling_case(tiny)
    masked = constraint.mask_tree(tree, logits)
    right = np.exp(np.array(process_logits(masked, SamplingConfig(1.0))))
    bits = constraint.tree_bitmasks(tree)

    batch = _samples(tree, apply_bitmask(logits, np.repeat(bits[:1], tree.num_nodes, 0)), 1.0)
    after_a = batch.tokens[(batch.paths[:, 1] == node_a), 1]
    with pytest.raises(AssertionError, match="impossible"):
        chi2_pvalue(np.bincount(after_a, minlength=right.shape[1]), right[node_a])

    batch = _samples(tree, apply_bitmask(logits, np.repeat(bits[node_a : node_a + 1],
                                                           tree.num_nodes, 0)), 1.0)  # fmt: skip
    first = np.bincount(batch.tokens[:, 0], minlength=right.shape[1])
    assert chi2_pvalue(first, right[0]) < 1e-6


# ---------------------------------------------------------------------------------------------
# The command line


def test_generate_json_schema_option(tiny_root, tmp_path):
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    base = ["generate", "-m", str(tiny_root / "model"), "-d", str(tiny_root / "drafter"),
            "-p", PROMPT, "-n", "200"]  # fmt: skip
    proc = invoke([*base, "--json-schema", str(schema_file), "--json", "--logprobs", "2"])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    jsonschema.validate(json.loads(out["text"]), SCHEMA)
    assert len(out["logprobs"]) == len(out["tokens"])
    assert all(len(e["top"]) == 2 and e["logprob"] <= 0 for e in out["logprobs"])
    proc = invoke([*base, "--json-object"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("{")


@pytest.mark.parametrize(
    "extra,expected",
    [
        (["--json-schema", "{missing}"], "no such file"),
        (["--json-schema", "{bad}"], "not valid JSON"),
        (["--json-schema", "{nonsense}"], "unusable JSON schema"),
        (["--json-schema", "{nonsense}", "--json-object"], "exclude each other"),
        (["--json-object", "--logprobs", "2"], "--logprobs needs --json"),
        (["--json", "--logprobs", "-1"], "--logprobs must be >= 0"),
    ],
)
def test_generate_format_options_fail_in_one_line(tiny_root, tmp_path, extra, expected):
    (tmp_path / "bad.json").write_text('{"type": ')
    (tmp_path / "nonsense.json").write_text('{"type": "nonsense"}')
    files = {k: str(tmp_path / f"{k}.json") for k in ("missing", "bad", "nonsense")}
    args = ["generate", "-m", str(tiny_root / "model"), "-p", PROMPT, "-n", "5"]
    proc = invoke(args + [e.format(**files) for e in extra])
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], lines


# ---------------------------------------------------------------------------------------------
# The default model


@pytest.mark.slow
def test_default_model_schema_output_speculative_equals_plain(default_model_dir):
    from mlx_redrafter.defaults import default_drafter_dir
    from mlx_redrafter.prompts import encode_chat

    model, tokenizer = load(default_model_dir)
    drafter = load_drafter(default_drafter_dir(), model)
    grammar = JsonGrammar.for_model(model, tokenizer)
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "country": {"type": "string", "maxLength": 20},
            "population": {"type": "integer", "minimum": 0},
            "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 30},
                          "maxItems": 3},
        },
        "required": ["city", "country", "population", "landmarks"],
        "additionalProperties": False,
    }  # fmt: skip
    ids = encode_chat(tokenizer, "Describe Paris as JSON: city, country, population, landmarks.")
    outs = []
    for kw in ({"lookup": False}, {"drafter": drafter}):
        responses = list(stream_generate(model, tokenizer, ids, max_tokens=120,
                                         constraint=grammar.json_schema(schema), **kw))  # fmt: skip
        outs.append([r.token for r in responses])
        text = "".join(r.text for r in responses)
        assert responses[-1].finish_reason == "stop", text
        jsonschema.validate(json.loads(text), schema)
    assert outs[0] == outs[1]
    assert responses[-1].stats.tokens_per_step > 1.2
