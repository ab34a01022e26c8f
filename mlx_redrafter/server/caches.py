"""The prompt caches: KV caches of recent requests, reused when a request extends one.

Each cache belongs to one client (its API key): a request only ever reuses a cache of its own
client, so neither `cached_tokens` nor the prefill time can tell one client anything about
another's prompts. Without keys every client is the same client.
"""

from __future__ import annotations


def cache_bytes(cache) -> int:
    return sum(a.nbytes for a in cache.state())


class PromptCaches:
    """A few KV caches of recent requests, most recent last, bounded in number and bytes
    across all clients.

    `take(ids, owner)` lends out the owner's cache sharing the longest prefix with `ids` (a new
    one when none shares any and there is room, else the least recently used of any owner,
    emptied); `give_back` returns it. Only the engine's worker thread uses it.
    """

    def __init__(self, model, max_entries: int = 4, max_bytes: int = 2 << 30):
        if max_entries < 1:
            raise ValueError(f"the prompt cache needs at least 1 entry, got {max_entries}")
        self.model = model
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.entries: list = []

    def take(self, ids: list[int], owner: str = ""):
        best, best_len = None, 0
        for cache in reversed(self.entries):  # ties go to the most recent
            if getattr(cache, "owner", "") != owner:
                continue
            n = cache.common_prefix(ids)
            if n > best_len:
                best, best_len = cache, n
        if best is None:
            if len(self.entries) < self.max_entries:
                return self._new(owner)
            best = self.entries[0]  # the least recently used
            if getattr(best, "owner", "") != owner:
                # Another client's cache: its memory is reused, never its contents.
                self.entries.remove(best)
                return self._new(owner)
        self.entries.remove(best)
        return best

    def _new(self, owner: str):
        cache = self.model.make_cache()
        cache.owner = owner
        return cache

    def give_back(self, cache) -> None:
        self.entries.append(cache)
        while len(self.entries) > 1 and (
            len(self.entries) > self.max_entries
            or sum(cache_bytes(c) for c in self.entries) > self.max_bytes
        ):
            self.entries.pop(0)
