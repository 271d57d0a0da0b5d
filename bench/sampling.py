"""Cost of one sampling step over a 151,936-token vocabulary, by how many rows filter (top-p).

python bench/sampling.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import mlx.core as mx

from mlx_llm_server.engine.sampling import SamplingBatch
from mlx_llm_server.engine.types import SamplingParams

VOCAB = 151936
BATCH = 16


def main() -> int:
    mx.random.seed(0)
    logits = mx.random.normal((BATCH, VOCAB)) * 3
    print(f"{'rows with top_p':>16} {'ms per step':>12}")
    for filtered in (0, 1, 4, BATCH):
        params = [SamplingParams(temperature=0.8, top_p=0.9)] * filtered + [
            SamplingParams(temperature=0.8)
        ] * (BATCH - filtered)
        batch = SamplingBatch(params, VOCAB)
        mx.eval(batch.sample(logits).tokens)
        started = time.perf_counter()
        for _ in range(10):
            mx.eval(batch.sample(logits).tokens)
        print(f"{filtered:>16} {(time.perf_counter() - started) / 10 * 1000:12.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
