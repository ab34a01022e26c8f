"""Memory across requests: a bounded corpus of earlier prompts and outputs per client, which
lookup (v2) copies draft candidates from.

`LookupMemory` keeps one `ClientMemory` per client key (an API key, a chat session), each a
`SuffixIndex` over at most `max_tokens` tokens of earlier requests, least recently used clients
dropped past `max_clients`. Text of one client is only ever proposed to requests of the same
client: a request's speed tells whether a guess matched earlier text, so clients must not share
a corpus. Candidates are verified like any other, so output never changes (greedy-identical,
sampling exact). Each client also keeps what lookup learnt about its memory's acceptance (the
calibration of the MEMORY buckets), carried from one request to the next.

Memory: the corpus costs about BYTES_PER_TOKEN bytes per token held (tokens, n-gram keys and
links; measured by tests/test_lookup_memory.py), so the whole memory stays under
max_clients x max_tokens x BYTES_PER_TOKEN.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from .errors import RedrafterError
from .sizing import MEMORY, Calibration
from .suffix_index import SuffixIndex

DEFAULT_MEMORY_TOKENS = 65536  # per client
DEFAULT_MAX_CLIENTS = 16
BYTES_PER_TOKEN = 1500  # upper bound of the index's footprint per token (7 hashed lengths)
KEEP_AFTER_EVICTION = 0.75  # an overfull corpus keeps its newest 3/4, so rebuilds are rare
HISTORY_VERSION = 1
MAX_CARRIED = 64.0  # predicted acceptances a client's memory calibration carries over


class ClientMemory:
    """One client's corpus: its documents (newest last) and their index, rebuilt without the
    oldest documents when it holds more than `max_tokens`. Readers use `index` as it is at the
    start of a request; writers replace it whole, never mutate one a reader may hold, except
    by appending (which readers tolerate)."""

    def __init__(self, max_tokens: int, min_match: int = 2, max_match: int = 8):
        self.max_tokens = max_tokens
        self.min_match, self.max_match = min_match, max_match
        self.documents: list[list[int]] = []
        self.index = self._new_index()
        self.calibration = Calibration()  # MEMORY buckets only
        self._lock = threading.Lock()

    def _new_index(self) -> SuffixIndex:
        return SuffixIndex(self.min_match, self.max_match)

    @property
    def num_tokens(self) -> int:
        return sum(len(d) for d in self.documents)

    def add(self, tokens: Sequence[int]) -> None:
        """Remember one request's prompt + output. A request that continues the previous one
        (a chat's next turn: the same conversation plus more) extends it instead of storing it
        twice."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            return
        with self._lock:
            last = self.documents[-1] if self.documents else None
            if last is not None and len(tokens) >= len(last) and tokens[: len(last)] == last:
                self.index.extend(tokens[len(last) :])
                self.documents[-1] = tokens
            else:
                self.index.add_document(tokens)
                self.documents.append(tokens)
            if self.num_tokens > self.max_tokens:
                self._evict()

    def _evict(self) -> None:
        """Keep the newest documents that fit in KEEP_AFTER_EVICTION x max_tokens (the newest
        one cut to its last tokens if it alone is too long) and rebuild the index."""
        budget = int(self.max_tokens * KEEP_AFTER_EVICTION)
        kept: list[list[int]] = []
        total = 0
        for doc in reversed(self.documents):
            if total + len(doc) > budget:
                if not kept:
                    kept.append(doc[len(doc) - budget :])
                break
            kept.append(doc)
            total += len(doc)
        kept.reverse()
        index = self._new_index()
        for doc in kept:
            index.add_document(doc)
        self.documents, self.index = kept, index

    def learn(self, calibration: Calibration) -> None:
        """Keep a request's learnt MEMORY calibration for the next request of this client."""
        carried = Calibration()
        for bucket, predicted in calibration.predicted.items():
            if not bucket[0].startswith(MEMORY):
                continue
            # at most MAX_CARRIED observations' worth, so that the client's own recent
            # requests keep moving it
            keep = min(1.0, MAX_CARRIED / max(predicted, 1e-9))
            carried.add(bucket, predicted * keep, calibration.hits.get(bucket, 0.0) * keep)
        with self._lock:
            self.calibration = carried


class LookupMemory:
    """Per-client bounded corpora of earlier requests (see the module docstring)."""

    def __init__(
        self,
        max_tokens: int = DEFAULT_MEMORY_TOKENS,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        min_match: int = 2,
        max_match: int = 8,
    ):
        if max_tokens < 1:
            raise RedrafterError(f"lookup memory max_tokens must be >= 1, got {max_tokens}")
        if max_clients < 1:
            raise RedrafterError(f"lookup memory max_clients must be >= 1, got {max_clients}")
        self.max_tokens = max_tokens
        self.max_clients = max_clients
        self.min_match, self.max_match = min_match, max_match
        self._clients: OrderedDict[str, ClientMemory] = OrderedDict()
        self._lock = threading.Lock()

    def client(self, key: str | None) -> ClientMemory:
        """The corpus of client `key` (None: the anonymous client), created when first asked
        for; the least recently used client is forgotten when there are too many."""
        key = "" if key is None else str(key)
        with self._lock:
            memory = self._clients.get(key)
            if memory is None:
                memory = ClientMemory(self.max_tokens, self.min_match, self.max_match)
                self._clients[key] = memory
                while len(self._clients) > self.max_clients:
                    self._clients.popitem(last=False)
            else:
                self._clients.move_to_end(key)
            return memory

    def add(self, key: str | None, tokens: Sequence[int]) -> None:
        self.client(key).add(tokens)

    @property
    def num_clients(self) -> int:
        return len(self._clients)

    @property
    def num_tokens(self) -> int:
        with self._lock:
            clients = list(self._clients.values())
        return sum(c.num_tokens for c in clients)

    @property
    def max_bytes(self) -> int:
        """The bound on what the memory may hold, in bytes (see BYTES_PER_TOKEN)."""
        return self.max_clients * self.max_tokens * BYTES_PER_TOKEN

    # -- a bounded file of earlier conversations (chat) --------------------------------------

    def save(self, path: str | os.PathLike, key: str | None, model: str) -> Path:
        """Write client `key`'s documents (at most max_tokens tokens) to `path`, atomically,
        tagged with `model` (token ids only mean something to the model's tokenizer)."""
        path = Path(path)
        memory = self.client(key)
        data = {"version": HISTORY_VERSION, "model": model, "documents": memory.documents}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, separators=(",", ":")))
        tmp.replace(path)
        return path

    def load(self, path: str | os.PathLike, key: str | None, model: str) -> int:
        """Add the documents a `save` wrote for `model` to client `key`; returns how many
        tokens were read (0 for a missing file, or one written for another model or version).
        A file that is not such a record raises RedrafterError naming it."""
        path = Path(path)
        if not path.exists():
            return 0
        try:
            data = json.loads(path.read_text())
            ok = isinstance(data, dict) and all(
                isinstance(d, list) and all(isinstance(t, int) and t >= 0 for t in d)
                for d in data.get("documents", [])
            )
        except (OSError, ValueError):
            ok = False
        if not ok:
            raise RedrafterError(
                f"{path} is not a lookup history file; delete it to start a new one"
            )
        if data.get("version") != HISTORY_VERSION or data.get("model") != model:
            return 0
        memory = self.client(key)
        for doc in data["documents"]:
            memory.add(doc)
        return sum(len(d) for d in data["documents"])
