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
