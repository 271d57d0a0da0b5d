"""The prefix cache's reuse policy: long shared prefixes are reused, a template's few tokens not."""

from __future__ import annotations

import copy

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache

from mlx_llm_server.engine import prefix_cache as module
from mlx_llm_server.engine.prefix_cache import MIN_REUSED_TOKENS, PrefixCache


def stored_cache(length: int) -> list[KVCache]:
    cache = KVCache()
    cache.update_and_fetch(mx.ones((1, 2, length, 4)), mx.ones((1, 2, length, 4)))
    return [cache]


@pytest.fixture
def copies(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every deep copy mlx-lm makes of a stored entry."""
    made: list[object] = []
    deepcopy = copy.deepcopy

    def counting(value: object, memo: object = None) -> object:
        made.append(value)
        return deepcopy(value, memo)  # type: ignore[arg-type]

    monkeypatch.setattr(module.LRUPromptCache.__init__.__globals__["copy"], "deepcopy", counting)
    return made


def test_a_few_shared_tokens_are_not_reused_or_copied(copies: list[object]) -> None:
    cache = PrefixCache(max_bytes=1 << 30)
    header = [1, 2, 3, 4, 5]  # what every chat template prompt starts with
    cache.store(header + list(range(100, 200)), stored_cache(105))
    reused, length = cache.fetch(header + list(range(500, 600)))
    assert reused is None and length == 0
    assert (cache.hits, cache.misses) == (0, 1)
    assert copies == []


@pytest.mark.parametrize("shared", [MIN_REUSED_TOKENS, 60])
def test_a_long_shared_prefix_is_reused(shared: int) -> None:
    cache = PrefixCache(max_bytes=1 << 30)
    prefix = list(range(10, 10 + shared))
    cache.store([*prefix, 900, 901, 902], stored_cache(shared + 3))
    reused, length = cache.fetch([*prefix, 700, 701])
    assert reused is not None and length == shared
    assert reused[0].offset == shared
    assert (cache.hits, cache.misses) == (1, 0)


def test_a_whole_stored_prompt_leaves_its_last_token_to_compute() -> None:
    cache = PrefixCache(max_bytes=1 << 30)
    prompt = list(range(40))
    cache.store(prompt, stored_cache(40))
    reused, length = cache.fetch(prompt)
    assert reused is not None and length == 39 and reused[0].offset == 39


def token_cache(tokens: list[int]) -> list[KVCache]:
    """A one-layer cache whose keys and values at each position hold that position's token."""
    cache = KVCache()
    values = mx.array(tokens, dtype=mx.float32).reshape(1, 1, len(tokens), 1)
    cache.update_and_fetch(values, values)
    return [cache]


def mlx_lm_reuse(cache: PrefixCache, tokens: list[int]) -> int:
    """How many prompt tokens mlx-lm's own `fetch_nearest_cache` would reuse for `tokens`."""
    found, remaining = cache._cache.fetch_nearest_cache("model", tokens)
    if found is None:
        return 0
    return len(tokens) - 1 if not remaining else len(tokens) - len(remaining)


def test_the_walk_picks_what_mlx_lm_picks_and_the_keys_match(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import random

    monkeypatch.setattr(module, "MIN_REUSED_TOKENS", 1)  # every reuse: compare the choice itself
    rng = random.Random(5)
    for _ in range(60):
        cache = PrefixCache(max_bytes=1 << 30)
        stems = [[rng.randrange(6) for _ in range(rng.randint(0, 20))] for _ in range(3)]
        stored = []
        for _ in range(rng.randint(1, 8)):
            tokens = rng.choice(stems) + [rng.randrange(6) for _ in range(rng.randint(1, 12))]
            cache.store(tokens, token_cache(tokens))
            stored.append(tokens)
        for _ in range(20):
            base = rng.choice(stored + stems)
            cut = rng.randint(0, len(base))
            query = base[:cut] + [rng.randrange(6) for _ in range(rng.randint(0, 6))]
            if len(query) < 2:
                continue
            expected = mlx_lm_reuse(cache, query)
            nearest = cache._nearest(query)
            assert (nearest[1] if nearest else 0) == expected, (stored, query)
            reused, length = cache.fetch(query)
            assert length == (expected if reused is not None else 0)
            if reused is not None:  # the copied keys are the prompt's own first tokens
                keys = reused[0].state[0][0, 0, :length, 0].tolist()
                assert reused[0].offset == length and keys == query[:length]


def test_a_template_only_overlap_never_searches_below_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # mlx-lm's search visits every stored answer below the shared header (milliseconds each
    # new prompt with many stored): the reuse decision must be made without it.
    cache = PrefixCache(max_bytes=1 << 30)
    header = list(range(1, 11))
    for user in range(64):
        cache.store(header + list(range(1000 * user, 1000 * user + 50)), stored_cache(60))
    calls: list[object] = []
    trie = cache._cache._trie
    original = trie.search
    monkeypatch.setattr(trie, "search", lambda *a: calls.append(a) or original(*a))
    reused, length = cache.fetch(header + list(range(99_000, 99_040)))
    assert reused is None and length == 0 and calls == []


def test_a_whole_stored_prompt_under_the_minimum_is_not_reused(copies: list[object]) -> None:
    cache = PrefixCache(max_bytes=1 << 30)
    prompt = list(range(MIN_REUSED_TOKENS))  # reusing it would leave MIN - 1 tokens reused
    cache.store(prompt, stored_cache(len(prompt)))
    assert cache.fetch(prompt) == (None, 0)
    assert copies == []
    longer = list(range(MIN_REUSED_TOKENS + 1))
    cache.store(longer, stored_cache(len(longer)))
    reused, length = cache.fetch(longer)
    assert reused is not None and length == MIN_REUSED_TOKENS
