"""What deciding a new prompt's prefix reuse costs the engine thread, by entries stored.

Stores N answers of 254 tokens each below a shared start (a chat template's 10-token header,
or a 500-token system prompt), then times the reuse decision for a new prompt of that start and
126 tokens of its own: mlx-lm's trie search (which also visits every stored answer below the
shared start) against the server's walk along the prompt (`PrefixCache._nearest`; a start
under 16 tokens is not reused, so "tokens reused" is 0 there). With 64 users arriving
together, the engine makes this decision once per user before any prompt work. Pure Python, no
device needed.

    python bench/prefix_lookup.py [--entries 16,64,256]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import random
import time
from collections.abc import Callable

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from mlx_llm_server.engine.prefix_cache import MIN_REUSED_TOKENS, PrefixCache


def timed(call: Callable[[], object], repeats: int = 5) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", default="16,64,256")
    args = parser.parse_args()
    rng = random.Random(0)
    print("| shared start | answers stored | mlx-lm's search, ms | the walk, ms | tokens reused |")
    print("|---|---:|---:|---:|---:|")
    starts = {"10-token header": list(range(100, 110)), "500-token system prompt": list(range(500))}
    for (label, header), entries in itertools.product(
        starts.items(), (int(n) for n in args.entries.split(","))
    ):
        cache = PrefixCache(max_bytes=1 << 40, max_entries=entries)
        layer = KVCache()
        layer.update_and_fetch(mx.zeros((1, 1, 1, 1)), mx.zeros((1, 1, 1, 1)))
        for _ in range(entries):
            cache.store(header + [rng.randrange(150_000) for _ in range(254)], [layer])
        prompt = header + [rng.randrange(150_000) for _ in range(126)]
        search = timed(functools.partial(cache._cache._trie.search, "model", prompt))
        walk = timed(functools.partial(cache._nearest, prompt, MIN_REUSED_TOKENS))
        nearest = cache._nearest(prompt, MIN_REUSED_TOKENS)
        reusable = nearest[1] if nearest else 0
        print(f"| {label} | {entries} | {search * 1e3:.2f} | {walk * 1e3:.4f} | {reusable} |")


if __name__ == "__main__":
    main()
