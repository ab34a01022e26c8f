"""Grammar-constrained decoding: JSON schemas and JSON objects as token masks (llguidance).

A `GrammarConstraint` holds the grammar state after the tokens emitted so far. Each plain step
masks the target's logits with the state's allowed tokens. Each speculative round cuts every
candidate at its first forbidden token (`prune`: a forbidden token is never verified), masks
the logits of every verified node with the mask of the tokens on that node's path
(`mask_tree`), and moves the state past the tokens the round emits (`advance`). Acceptance
then runs on the masked target distribution, so constrained speculation is exact: greedy
output equals constrained plain decoding, and sampling samples the masked distribution.
docs/structured-output.md explains the rules.
"""

from __future__ import annotations

import json
import time
import weakref
from collections.abc import Sequence
from typing import Any

import llguidance
import llguidance.numpy as llg_numpy
import mlx.core as mx
import numpy as np

from .errors import ConstraintError
from .prompts import eos_ids
from .sizing import Candidate
from .tree import Tree

_NEG_INF = float("-inf")
GRAMMAR = "grammar"  # the candidate source of forced continuations
FORCED_PRIOR = 0.9  # P(a forced token accepted | its parent was), before calibration
MAX_FORCED = 16
# Compact JSON (', ' and ': ', no other whitespace): a small model cannot wander off into
# endless newlines, and the output reads like json.dumps.
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class JsonGrammar:
    """Compiles JSON grammars for one tokenizer and vocabulary; build it once (~0.3 s for a
    49K vocabulary) and make a `GrammarConstraint` per generation (~1 ms each).

    vocab_size is the model's logits width (it may exceed the tokenizer's vocabulary; the
    extra ids are never allowed). The grammar ends with the tokenizer's end-of-sequence ids.
    """

    def __init__(self, tokenizer, vocab_size: int, flexible_whitespace: bool = False):
        self.vocab_size = int(vocab_size)
        self.eos = sorted(eos_ids(tokenizer))
        if not self.eos:
            raise ConstraintError("the tokenizer has no end-of-sequence token to end JSON with")
        self.options = {} if flexible_whitespace else dict(COMPACT)
        self.tokenizer = _ll_tokenizer(tokenizer, self.vocab_size, self.eos)

    @classmethod
    def for_model(cls, model, tokenizer, flexible_whitespace: bool = False) -> JsonGrammar:
        """The grammar compiler for `model`'s logits width and `tokenizer`."""
        return cls(tokenizer, model.args.vocab_size, flexible_whitespace)

    def json_schema(self, schema: dict | str) -> GrammarConstraint:
        """Output that is one JSON value valid under `schema` (a dict or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ConstraintError(f"the JSON schema is not valid JSON ({e})") from None
        if not isinstance(schema, dict):
            raise ConstraintError(
                f"a JSON schema must be a JSON object, got {type(schema).__name__}"
            )
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, self.options)
        except ValueError as e:
            raise ConstraintError(f"unusable JSON schema: {_first_line(e)}") from None
        return GrammarConstraint(self, grammar)

    def json_object(self) -> GrammarConstraint:
        """Output that is one JSON object (OpenAI's response_format json_object)."""
        return self.json_schema({"type": "object"})

    def response_format(self, response_format: dict | None) -> GrammarConstraint | None:
        """The constraint for an OpenAI `response_format`: None for {"type": "text"} or None;
        json_object; json_schema ({"json_schema": {"name": ..., "schema": {...}}})."""
        if response_format is None:
            return None
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind == "text":
            return None
        if kind == "json_object":
            return self.json_object()
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if schema is None:
                raise ConstraintError("response_format json_schema needs json_schema.schema")
            return self.json_schema(schema)
        raise ConstraintError(
            f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}"
        )


class GrammarConstraint:
    """The grammar state of one generation, over the tokens it has emitted.

    The generation loops (generation.py) call `mask_logits` before a plain step's choice,
    `prune` and `mask_tree` around a round's verification, and `advance` with what each step
    or round emits. `mask_time` and `masks` count the host work spent on masks.
    """

    def __init__(self, grammar: JsonGrammar, compiled: str):
        self.grammar = grammar
        self.matcher = llguidance.LLMatcher(grammar.tokenizer, compiled, log_level=0)
        if self.matcher.is_error():
            raise ConstraintError(f"unusable JSON schema: {_first_line(self.matcher.get_error())}")
        self.words = (grammar.vocab_size + 31) // 32
        self.propose_forced = True  # `forced` proposes the grammar's forced continuations
        self.masks = 0  # masks computed (one per plain step, one per verified node)
        self.mask_time = 0.0

    @property
    def vocab_size(self) -> int:
        return self.grammar.vocab_size

    def reset(self) -> None:
        """Back to the start of the grammar (for a new generation), counters cleared."""
        self.matcher.reset()
        self.masks, self.mask_time = 0, 0.0

    @property
    def is_accepting(self) -> bool:
        """The tokens so far form a complete value (the grammar would allow end-of-sequence)."""
        return self.matcher.is_accepting()

    def allowed(self, tokens: Sequence[int]) -> int:
        """How many of `tokens`, from the current state, the grammar allows in a row."""
        return int(self.matcher.validate_tokens([int(t) for t in tokens]))

    def advance(self, tokens: Sequence[int]) -> None:
        """Move past emitted tokens; every one must be allowed (they were chosen under masks)."""
        tokens = [int(t) for t in tokens]
        if self.matcher.is_stopped() and set(tokens) <= set(self.grammar.eos):
            return  # past the end (a plain step decodes one token ahead): never emitted
        if self.allowed(tokens) != len(tokens) or not self.matcher.consume_tokens(tokens):
            raise ConstraintError(
                f"token(s) {tokens} were emitted but the grammar forbids them: "
                f"{_first_line(self.matcher.get_error())}"
            )

    def forced(self, root: int) -> list[Candidate]:
        """The continuation the grammar forces from here (a key name, `": "`, a closing
        bracket) as a candidate from `root` (the last emitted token), or none. Forced bytes
        may still be split into other tokens than these, so it is verified like any other."""
        if not self.propose_forced:
            return []
        tokens = self.matcher.compute_ff_tokens()[:MAX_FORCED]
        if not tokens:
            return []
        n = len(tokens)
        buckets = tuple((GRAMMAR, min(k + 1, 2)) for k in range(n))
        return [Candidate(GRAMMAR, (int(root), *map(int, tokens)), (FORCED_PRIOR,) * n, buckets)]

    def prune(self, candidates: Sequence) -> list:
        """Candidates (sizing.Candidate: tokens[0] is the root, already emitted) cut before
        their first forbidden token; those with nothing left after the root are dropped."""
        out = []
        for cand in candidates:
            keep = self.allowed(cand.tokens[1:])
            if keep > 0:
                out.append(cand if keep == len(cand.tokens) - 1 else cand.prefix(keep))
        return out

    # -- masks --------------------------------------------------------------------------------

    def bitmask(self) -> np.ndarray:
        """int32 (words,): bit t of the mask is set iff the grammar allows token t next."""
        out = np.zeros((1, self.words), dtype=np.int32)
        self._fill(out, 0)
        return out[0]

    def mask_logits(self, logits: mx.array) -> mx.array:
        """logits (V,) or (1, V) with every token the current state forbids set to -inf."""
        bits = np.zeros((1, self.words), dtype=np.int32)
        self._fill(bits, 0)
        masked = apply_bitmask(logits.reshape(1, -1), bits)
        return masked.reshape(logits.shape)

    def tree_bitmasks(self, tree: Tree) -> np.ndarray:
        """int32 (N, words): each node's mask, for the tokens on its path after the root.

        Walks the nodes in packed order (parents first), rolling the grammar state back to the
        common ancestor and forward to the node; the state ends where it began.
        """
        bits = np.zeros((tree.num_nodes, self.words), dtype=np.int32)
        held: list[int] = []  # nodes consumed beyond the root, in path order
        for u in range(tree.num_nodes):
            path = _path(tree, u)
            common = 0
            while common < min(len(held), len(path)) and held[common] == path[common]:
                common += 1
            if len(held) > common:
                self.matcher.rollback(len(held) - common)
            del held[common:]
            for v in path[common:]:
                token = int(tree.tokens[v])
                if self.matcher.validate_tokens([token]) != 1:
                    self.matcher.rollback(len(held))
                    raise ConstraintError(
                        f"tree node {v} (token {token}) is forbidden by the grammar: "
                        "candidates must be pruned before verification"
                    )
                self.matcher.consume_token(token)
                held.append(v)
            self._fill(bits, u)
        if held:
            self.matcher.rollback(len(held))
        return bits

    def mask_tree(self, tree: Tree, logits: mx.array) -> mx.array:
        """Verify logits (N, V) with each node's forbidden tokens set to -inf."""
        return apply_bitmask(logits, self.tree_bitmasks(tree))

    def _fill(self, bits: np.ndarray, row: int) -> None:
        start = time.perf_counter()
        llg_numpy.fill_next_token_bitmask(self.matcher, bits, row)
        if not bits[row].any():
            # Only after an error or past the end: allow end-of-sequence so the row stays a
            # distribution (nothing after it is emitted).
            for t in self.grammar.eos:
                bits[row, t // 32] |= np.int32(np.uint32(1 << (t % 32)).view(np.int32))
        self.masks += 1
        self.mask_time += time.perf_counter() - start


def apply_bitmask(logits: mx.array, bits: np.ndarray) -> mx.array:
    """logits (N, V) -> logits with -inf where bit t of row n of bits (N, words) is clear."""
    n, vocab = logits.shape
    words = mx.array(bits.view(np.uint32))  # (N, words)
    shifts = mx.arange(32, dtype=mx.uint32)
    allowed = ((words[:, :, None] >> shifts) & 1).reshape(n, -1)[:, :vocab]  # (N, V)
    return mx.where(allowed.astype(mx.bool_), logits, mx.array(_NEG_INF, logits.dtype))


def allowed_tokens(bits: np.ndarray, vocab_size: int) -> np.ndarray:
    """The token ids whose bit is set in one mask row (words,)."""
    flat = np.unpackbits(bits.view(np.uint8), bitorder="little")[:vocab_size]
    return np.flatnonzero(flat)


def _path(tree: Tree, u: int) -> list[int]:
    """Nodes from the root's first child down to u (empty for the root)."""
    out = []
    while u > 0:
        out.append(u)
        u = int(tree.parents[u])
    return out[::-1]


def _ll_tokenizer(tokenizer, vocab_size: int, eos: list[int]) -> llguidance.LLTokenizer:
    """llguidance's view of a tokenizer (mlx-lm wrapper, transformers fast tokenizer or
    `tokenizers.Tokenizer`), cached per tokenizer object."""
    key = getattr(tokenizer, "_tokenizer", tokenizer)
    cached = _cache_get(key)
    if cached is not None and cached[0] == (vocab_size, tuple(eos)):
        return cached[1]
    backend = getattr(key, "backend_tokenizer", key)
    if not hasattr(backend, "to_str"):
        raise ConstraintError(
            f"structured output needs a fast (tokenizers) tokenizer, got {type(key).__name__}"
        )
    if backend.get_vocab_size(with_added_tokens=True) > vocab_size:
        raise ConstraintError(
            f"the tokenizer has {backend.get_vocab_size(with_added_tokens=True)} tokens but "
            f"the model only {vocab_size} logits"
        )
    try:
        ll = llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=eos)
    except (ValueError, RuntimeError) as e:
        raise ConstraintError(f"cannot use the tokenizer for structured output: {e}") from None
    try:
        _TOKENIZERS[key] = ((vocab_size, tuple(eos)), ll)
    except TypeError:  # not weak-referenceable: no cache
        pass
    return ll


def _cache_get(key):
    try:
        return _TOKENIZERS.get(key)
    except TypeError:
        return None


def _first_line(e: Any) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
