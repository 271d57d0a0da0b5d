"""One stream's bounds on this device, without a server: mlx-lm's own `generate_step` and the
time the weights take to read at the device's copy bandwidth (every decoded token reads them all).

    python bench/one_stream_bounds.py MODEL_DIR TOKENS   # prints one JSON line last

`serve_bench.py --raw` runs it in a process of its own before the servers start, so its memory
is freed before theirs is taken.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))


def generate_step_decode_tok_s(model: object, tokens: int, runs: int = 3) -> float:
    """Median tokens/s of decode alone (after the first token, as a stream's client sees it)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    prompt = mx.array(list(range(1000, 1064)))
    for _ in generate_step(prompt, model, max_tokens=16):  # first use of every shape
        pass
    rates = []
    for _ in range(runs):
        stamps = [time.perf_counter() for _ in generate_step(prompt, model, max_tokens=tokens)]
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return statistics.median(rates)


def main() -> int:
    import mlx.core as mx
    from gpu_qmm import copy_bandwidth
    from mlx_lm import load

    from mlx_llm_server.pool import estimate_nbytes

    folder, tokens = Path(sys.argv[1]), int(sys.argv[2])
    model, _ = load(str(folder))
    figures: dict[str, object] = {
        "generate_step_tok_s": generate_step_decode_tok_s(model, tokens),
        "weights_gb": estimate_nbytes(folder) / 1e9,
        "device": str(mx.default_device()),
    }
    measured: dict[str, float] = {}
    copy_bandwidth(None, measured)
    figures["copy_gb_s"] = measured["copy_gbs"]
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
