"""The staged 4-bit kernel with two weight tiles a warp, at the row counts of batched decode.

Run on the GPU machine from the repository root (random weights are built there):

    python3 bench/gpu_tile_reuse.py [--parts 1,2] [--rows 33,48,61,64] [--timing-rows 32,48,64]
        [--layers TEXT] [--narrow]

At 64 rows the unstaged kernel reads every activation fragment once per 16 output features,
and the staged one (activations in shared memory) still once per warp's 16 features: shared
memory then moves 512 bytes a warp per two MMAs. With ``rt`` 2 each fragment read serves two
weight tiles (32 features), halving that traffic at the cost of registers (242 a thread for
8 row tiles, no spills; `bench/kernel_build_check.py`).

1. Correctness, per decode layer with its epilogue as a step runs it (fused q/k/v; o_proj and
   down_proj with the residual add; the fused gate/up with SwiGLU) and every variant: largest
   relative error against the same variant without the epilogue followed by MLX's own
   operations (expected 0: the epilogue rounds where MLX does), and against the stock
   ``mx.quantized_matmul`` followed by those operations.
2. Microseconds a call, dependent calls (each input made from the previous output, as a step's
   layers run), every variant, and the four layers' sum: a layer's share of one decode step.

`--layers` keeps the layers whose name holds the text (e.g. "+ residual": o_proj and
down_proj); `--narrow` adds shapes for the 4,096-wide layers, where two tiles a warp in the
staged kernel lost: unstaged ones with more blocks, staged ones with more K split.
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
from gpu_qmm import random_qweight, rel_err  # noqa: E402
from gpu_staged_qmm import chained_us  # noqa: E402

import mlx_llm_server.kernels.quantized_linear as ql  # noqa: E402
from mlx_llm_server.kernels.quantized_linear import (  # noqa: E402
    FusedConfig,
    apply_epilogue,
    fused_quantized_matmul,
)

GS = 64
L2_BYTES = 60 * 2**20
# (name, N, K, epilogue) of one Qwen3-8B decode block with fused projections.
LAYERS = [
    ("qkv fused", 6144, 4096, "none"),
    ("o_proj + residual", 4096, 4096, "residual"),
    ("gate_up fused + SwiGLU", 24576, 4096, "swiglu"),
    ("down + residual", 4096, 12288, "residual"),
]


def variants(m: int, n: int, narrow: bool) -> list[tuple[str, FusedConfig]]:
    out = [("unstaged", ql._unstaged_config(m, n))]
    for min_width, cfg in STAGED_RT1_BY_WIDTH:
        if n >= min_width and n % (16 * cfg.nw) == 0:
            out.append(("staged rt1", cfg))
            break
    mt = 8 if m > 32 else 4
    candidates = [("rt2", mt_, 2, kw, nw) for mt_, nw, kw in RT2_SHAPES if mt_ <= mt]
    if narrow and n <= 4096:
        candidates += [("unstaged", *shape, 1) for shape in NARROW_UNSTAGED]
        candidates += [("rt1", mt_, 1, kw, nw) for mt_, nw, kw in NARROW_STAGED]
    for kind, mt_, rt, kw, nw in candidates:
        cfg = FusedConfig(mt=mt_, rt=rt, kw=kw, nw=nw)
        if n % (16 * rt * nw) == 0 and all(cfg != c for _, c in out):
            out.append((f"{kind} m{mt_}n{nw}k{kw}" + (f"r{rt}" if nw == 1 else ""), cfg))
    return out


# The staged kernel's shapes before two tiles a warp (rt 1), by smallest width.
STAGED_RT1_BY_WIDTH = (
    (65536, FusedConfig(mt=4, rt=1, kw=1, nw=8)),
    (16384, FusedConfig(mt=8, rt=1, kw=2, nw=4)),
    (8192, FusedConfig(mt=4, rt=1, kw=2, nw=4)),
    (0, FusedConfig(mt=4, rt=1, kw=2, nw=2)),
)
RT2_SHAPES = ((8, 4, 2), (8, 4, 1), (8, 2, 2), (8, 2, 1), (4, 4, 2), (4, 2, 2))
# `--narrow`: more shapes for the 4,096-wide layers (o_proj, down_proj), where two tiles a warp
# lost: unstaged (mt, rt, kw) with more blocks, and staged rt 1 with more K split.
NARROW_UNSTAGED = ((4, 1, 4), (4, 2, 8), (4, 2, 4), (8, 1, 8), (8, 1, 2), (2, 2, 4))
NARROW_STAGED = ((4, 2, 4), (8, 2, 2), (4, 4, 2), (4, 2, 2))


def call(
    x: mx.array, weights: tuple, cfg: FusedConfig, epilogue: str, residual: mx.array | None
) -> mx.array:
    q, s, b = weights
    return fused_quantized_matmul(x, q, s, b, GS, config=cfg, epilogue=epilogue, residual=residual)


def part_check(layers: list[tuple], rows: list[int], narrow: bool) -> bool:
    print("\n## 1. Correctness (max |a-b| / max |b|)\n", flush=True)
    print("| layer | rows | variant | vs same kernel + MLX op | vs stock + MLX op | ok |")
    print("|---|---:|---|---:|---:|---|")
    ok = True
    for name, n, k, epilogue in layers:
        weights = random_qweight(n, k)
        q, s, b = weights
        for m in rows:
            x = mx.random.normal((m, k)).astype(mx.bfloat16)
            out_n = n // 2 if epilogue == "swiglu" else n
            residual = (
                mx.random.normal((m, out_n)).astype(mx.bfloat16) if epilogue == "residual" else None
            )
            stock = apply_epilogue(
                mx.quantized_matmul(x, q, s, b, group_size=GS, bits=4), epilogue, residual
            )
            for label, cfg in variants(m, n, narrow):
                y = call(x, weights, cfg, epilogue, residual)
                plain = apply_epilogue(call(x, weights, cfg, "none", None), epilogue, residual)
                mx.eval(y, plain, stock)
                nan = bool(mx.isnan(y).any().item())
                e_same, e_stock = rel_err(y, plain), rel_err(y, stock)
                good = not nan and e_same == 0.0 and e_stock < 2e-2
                ok &= good
                print(
                    f"| {name} | {m} | {label} | {e_same:.2e} | {e_stock:.2e} | "
                    f"{'ok' if good else 'FAIL'} |",
                    flush=True,
                )
        del weights, q, s, b
        mx.clear_cache()
    print(f"\ncorrectness: {'all ok' if ok else 'FAILED'}", flush=True)
    return ok


def part_table(layers: list[tuple], rows: list[int], narrow: bool) -> None:
    print("\n## 2. Microseconds a call (dependent calls, bf16, group 64)\n", flush=True)
    sums: dict[tuple[int, str], float] = {}
    for name, n, k, epilogue in layers:
        nbytes = n * k // 2 + 4 * n * k // GS
        copies = max(2, math.ceil(3 * L2_BYTES / nbytes))
        weights = [random_qweight(n, k) for _ in range(copies)]
        for m in rows:
            x = mx.random.normal((m, k)).astype(mx.bfloat16)
            mx.eval(x)
            cells = []
            for label, cfg in variants(m, n, narrow):
                us = chained_us(x, weights, cfg, n, k, epilogue)
                cells.append(f"{label} {us:.1f}")
                sums[(m, label)] = sums.get((m, label), 0.0) + us
            print(f"| {name} | {m} | " + " | ".join(cells) + " |", flush=True)
        del weights
        mx.clear_cache()
    print("\nper layer (sum of the four calls), us:")
    for m in rows:
        line = ", ".join(f"{label} {us:.1f}" for (mm, label), us in sums.items() if mm == m)
        print(f"  {m} rows: {line}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", default="33,48,61,64", help="part 1's row counts")
    parser.add_argument("--timing-rows", default="32,48,64", help="part 2's row counts")
    parser.add_argument("--parts", default="1,2")
    parser.add_argument("--layers", default="", help="only layers whose name has this text")
    parser.add_argument("--narrow", action="store_true", help="more 4,096-wide layer shapes")
    args = parser.parse_args()
    layers = [layer for layer in LAYERS if args.layers in layer[0]]
    parts = {int(p) for p in args.parts.split(",")}
    ok = True
    if 1 in parts:
        ok = part_check(layers, [int(r) for r in args.rows.split(",")], args.narrow)
    if 2 in parts:
        part_table(layers, [int(r) for r in args.timing_rows.split(",")], args.narrow)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
