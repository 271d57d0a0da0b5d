"""Reuse of KV state across requests that share a prefix (a growing chat, a system prompt).

A thin policy over mlx-lm's `LRUPromptCache` (a token trie with LRU eviction under a byte
budget): entries are stored when a sequence finishes and fetched, trimmed to the common prefix,
when a new prompt starts.
"""

from __future__ import annotations

from typing import Any

from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

_MODEL_KEY = "model"


class PrefixCache:
    def __init__(self, max_bytes: int, max_entries: int = 256) -> None:
        self.enabled = max_bytes > 0
        self._cache = LRUPromptCache(max_size=max_entries, max_bytes=max(max_bytes, 0))
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._cache.nbytes

    def __len__(self) -> int:
        return len(self._cache)

    def fetch(self, tokens: list[int]) -> tuple[list[Any] | None, int]:
        """A private copy of the longest cached prefix of `tokens`, and its length.

        At least one token is always left to compute, since its logits start the generation.
        """
        if not self.enabled or len(tokens) < 2:
            return None, 0
        cache, remaining = self._cache.fetch_nearest_cache(_MODEL_KEY, tokens)
        if cache is None:
            self.misses += 1
            return None, 0
        if not remaining:
            if not can_trim_prompt_cache(cache):
                self.misses += 1
                return None, 0
            trim_prompt_cache(cache, 1)
            remaining = tokens[-1:]
        self.hits += 1
        return cache, len(tokens) - len(remaining)

    def store(self, tokens: list[int], cache: list[Any]) -> None:
        if self.enabled and tokens:
            self._cache.insert_cache(_MODEL_KEY, list(tokens), cache)

    def clear(self) -> None:
        self._cache.trim_to(n_sequences=0)
