"""Tile shapes of the fused 4-bit kernel for one-row decode, layer by layer as a step runs them.

Run on the GPU machine from the repository root (random weights are built there):

    python3 bench/gpu_one_row_tiles.py [--configs 1,4 2,4 1,8 ...] [--rows 1]

At one row the kernel's MMA uses one of its eight activation columns, so a layer's time is
its weight reads, its blocks' tails and the gaps between kernels; how many output features a
warp owns (``rt``) and how many warps split K (``kw``) set how many loads are in flight and how
many blocks fill the device. For each decode layer with its epilogue and folded norm as the
server runs one row (q/k/v with the input norm; o_proj + residual, reading attention's
(1, heads, 1, D) output; gate/up with the norm and SwiGLU; down + residual; the output head),
every (rt, kw): the largest relative error against MLX's operations on the stock matmul, and
microseconds a call in dependent calls (each call's input made from the previous output), with
the GB/s of weights read.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import mlx.core as mx  # noqa: E402
from gpu_qmm import random_qweight  # noqa: E402
from gpu_staged_qmm import chained_us  # noqa: E402

from mlx_llm_server.kernels.quantized_linear import (  # noqa: E402
    FusedConfig,
    fused_quantized_matmul,
    reference_fused_matmul,
)

GS = 64
L2_BYTES = 60 * 2**20
# (name, N, K, epilogue, folded norm, input as attention's heads) of a Qwen3-8B decode step.
LAYERS = [
    ("norm + qkv", 6144, 4096, "none", True, False),
    ("o_proj + residual", 4096, 4096, "residual", False, True),
    ("norm + gate_up, SwiGLU", 24576, 4096, "swiglu", True, False),
    ("down + residual", 4096, 12288, "residual", False, False),
    ("head", 151936, 4096, "none", False, False),
]


def call(x, weights, cfg, epilogue, residual, norm):  # type: ignore[no-untyped-def]
    q, s, b = weights
    return fused_quantized_matmul(
        x, q, s, b, GS, config=cfg, epilogue=epilogue, residual=residual, norm=norm
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["1,4", "1,8", "2,4", "2,8", "4,4", "4,8", "1,2", "2,2"],
        help="rt,kw pairs",
    )
    parser.add_argument("--rows", type=int, default=1)
    args = parser.parse_args()
    configs = []
    for text in args.configs:
        rt, kw = (int(v) for v in text.split(","))
        configs.append(FusedConfig(mt=1, rt=rt, kw=kw))
    m = args.rows
    print(f"\n## One-row tile shapes ({m} row(s), bf16, group 64; us a call, GB/s)\n")
    print("| layer | " + " | ".join(f"rt{c.rt} kw{c.kw}" for c in configs) + " | max rel err |")
    print("|---|" + "---:|" * (len(configs) + 1), flush=True)
    ok = True
    for name, n, k, epilogue, folded, as_heads in LAYERS:
        nbytes = n * k // 2 + 4 * n * k // GS
        copies = max(2, math.ceil(3 * L2_BYTES / nbytes))
        weights = [random_qweight(n, k) for _ in range(copies)]
        x = (mx.random.normal((m, 1, k)) * 2).astype(mx.bfloat16)
        out_n = n // 2 if epilogue == "swiglu" else n
        residual = None
        if epilogue == "residual":
            residual = mx.random.normal((m, 1, out_n)).astype(mx.bfloat16)
        norm = None
        if folded:
            norm = ((1 + 0.1 * mx.random.normal((k,))).astype(mx.bfloat16), 1e-6)
        mx.eval(x, *(a for w in weights for a in w))
        reference = reference_fused_matmul(
            x, *weights[0], GS, epilogue=epilogue, residual=residual, norm=norm
        ).astype(mx.float32)
        cells, worst = [], 0.0
        for cfg in configs:
            if n % (16 * cfg.rt):
                cells.append("-")
                continue
            given = x.reshape(m, 32, 1, -1) if as_heads else x
            y = call(given, weights[0], cfg, epilogue, residual, norm).astype(mx.float32)
            err = (mx.abs(y - reference).max() / mx.abs(reference).max()).item()
            bad = bool(mx.isnan(y).any().item()) or err > 2e-2
            ok &= not bad
            worst = max(worst, err)
            us = chained_us(x, weights, cfg, n, k, epilogue, norm, 32 if as_heads else 0)
            cells.append(f"{us:.1f} ({nbytes / us / 1e3:,.0f}){' FAIL' if bad else ''}")
        print(f"| {name} | " + " | ".join(cells) + f" | {worst:.2e} |", flush=True)
        del weights
        mx.clear_cache()
    print(f"\ncorrectness: {'all ok' if ok else 'FAILED'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
