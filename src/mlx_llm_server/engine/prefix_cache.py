"""Reuse of KV state across requests that share a prefix (a growing chat, a system prompt).

A thin policy over mlx-lm's `LRUPromptCache` (a token trie with LRU eviction under a byte
budget): entries are stored when a sequence finishes and fetched, trimmed to the common prefix,
when a new prompt starts.
"""

from __future__ import annotations

from typing import Any

from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

_MODEL_KEY = "model"

# A cached prefix shorter than this is not reused. Different users' prompts share a chat
# template's first few tokens; reusing those saves next to nothing, but mlx-lm copies the whole
# stored entry that shares them (every layer's KV) and trims it: with 64 users arriving
# together on an H200, that fetch held the interpreter lock in 7% of a 5-s sample (bench/NOTES.md,
# "H200: where a 64-stream round goes"). vLLM's prefix caching reuses whole 16-token blocks only.
MIN_REUSED_TOKENS = 16


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
        if self._reusable(tokens) < MIN_REUSED_TOKENS:
            self.misses += 1
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

    def _reusable(self, tokens: list[int]) -> int:
        """How many tokens `fetch_nearest_cache` would reuse, found without copying anything
        (the same choice it makes: an exact entry, a longer one trimmed, or a shorter one)."""
        found = self._cache._trie.search(_MODEL_KEY, tokens)
        if found.exact is not None:
            return len(tokens) - 1
        shorter = len(found.shorter) if found.shorter is not None else 0
        if found.longer is not None and found.common_prefix > shorter:
            return min(len(tokens) - 1, found.common_prefix)
        return shorter

    def store(self, tokens: list[int], cache: list[Any]) -> None:
        if self.enabled and tokens:
            self._cache.insert_cache(_MODEL_KEY, list(tokens), cache)

    def clear(self) -> None:
        self._cache.trim_to(n_sequences=0)
