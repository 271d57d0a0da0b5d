"""Reuse of KV state across requests that share a prefix (a growing chat, a system prompt).

A policy over mlx-lm's `LRUPromptCache` (a token trie with LRU eviction under a byte budget):
entries are stored when a sequence finishes; when a new prompt starts, the entry it shares most
with is found by a walk along the trie (`_nearest`, not mlx-lm's search) and copied, trimmed to
the common prefix.
"""

from __future__ import annotations

import copy
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
        nearest = self._nearest(tokens, at_least=MIN_REUSED_TOKENS)
        if nearest is None:
            self.misses += 1
            return None, 0
        source, reused = nearest
        stored = self._cache._trie.get(_MODEL_KEY, source).prompt_cache
        # A longer entry, or the whole prompt stored, is cut to what is reused: checked before
        # anything is copied.
        cut = len(source) - reused
        if cut and not can_trim_prompt_cache(stored):
            self.misses += 1
            return None, 0
        cache = copy.deepcopy(stored)
        if cut:
            trim_prompt_cache(cache, cut)
        self.hits += 1
        return cache, reused

    def _nearest(self, tokens: list[int], at_least: int = 1) -> tuple[list[int], int] | None:
        """The stored entry to copy for `tokens` and how many prompt tokens it covers: what
        mlx-lm's `fetch_nearest_cache` picks (an exact entry, a longer one to trim to the common
        prefix, or the longest shorter one), found by walking the trie along `tokens` only.
        None when nothing is stored that covers `at_least` tokens.

        mlx-lm's own search also looks for the *shortest* entry extending past the common
        prefix, visiting every node below it with a list copy each: for a prompt sharing just
        a chat template's header with 64 stored answers that is 5-9 ms of Python, 18-35 ms with
        256 (2-core VM, `bench/prefix_lookup.py`), on the engine thread, for every new prompt;
        more below a long shared system prompt. Any entry below serves (the same tokens give the
        same keys and values up to there), so the first one found going down is taken.
        """
        node = self._cache._trie._trie.get(_MODEL_KEY)
        common, last_entry = 0, -1
        while node is not None and common < len(tokens):
            child = node.get(tokens[common])
            if child is None:
                break
            node = child
            if "__value__" in node:
                last_entry = common
            common += 1
        if node is None or common == 0:
            return None
        if last_entry == len(tokens) - 1:  # the whole prompt is stored
            return (tokens, len(tokens) - 1) if len(tokens) - 1 >= at_least else None
        shorter = last_entry + 1 if last_entry > 0 else 0  # as mlx-lm: never a 1-token entry
        if max(min(len(tokens) - 1, common), shorter) < at_least:
            return None
        if common > shorter:
            below: list[int] = []
            while "__value__" not in node:  # every node leads to an entry
                token = next(iter(node))
                below.append(token)
                node = node[token]
            longer = tokens[:common] + below
            if can_trim_prompt_cache(node["__value__"].prompt_cache):
                return longer, min(len(tokens) - 1, common)
        if shorter >= max(at_least, 1):
            return tokens[:shorter], shorter
        return None

    def store(self, tokens: list[int], cache: list[Any]) -> None:
        if self.enabled and tokens:
            self._cache.insert_cache(_MODEL_KEY, list(tokens), cache)

    def clear(self) -> None:
        self._cache.trim_to(n_sequences=0)
