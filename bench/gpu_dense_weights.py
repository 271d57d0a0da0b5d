"""Dense copies of the 4-bit weights (`--dense-weights`) against the 4-bit paths, by row count.

Run on the GPU machine from the repository root (random weights are built there):

    python3 bench/gpu_dense_weights.py [--parts 1,2] [--rows 16,24,32,40,48,64]

A decode step of many rows runs the fused 4-bit kernel at ~100-115 TFLOP/s (bench/NOTES.md,
"H200: two weight tiles a warp"); a bf16 product through cuBLAS on weights dequantized once, at
load, reads 3.5x the bytes but runs on MLX's tuned GEMMs. Where the two cross decides
`--dense-weights-rows`.

1. Correctness, per layer of a Qwen3-8B block and the output head, with its epilogue as a step
   runs it: the dense path against `mx.quantized_matmul` followed by MLX's own operations
   (largest relative error, bf16), and against dequantize + matmul (expected 0: the same
   weights, the same product).
2. Microseconds a decode block's four matmuls take (fused q/k/v; o_proj and down_proj adding
   the residual; the fused gate/up with SwiGLU), dependent calls through the layers as the
   server calls them, on the server's 4-bit path and on the dense copy; then the output head.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from gpu_qmm import random_qweight, rel_err  # noqa: E402

import mlx_llm_server.kernels.quantized_linear as ql  # noqa: E402
from mlx_llm_server.kernels.quantized_linear import (  # noqa: E402
    AcceleratedQuantizedLinear,
    apply_epilogue,
    keep_dense_weights,
    residual_linear,
    swiglu_linear,
)

GS = 64
L2_BYTES = 60 * 2**20
HIDDEN, QKV, INTERMEDIATE, VOCAB = 4096, 6144, 12288, 151936


def layer(n: int, k: int, interleaved: bool = False) -> AcceleratedQuantizedLinear:
    """A 4-bit layer as the server swaps it in (random weights, bf16 scales)."""
    stock = nn.QuantizedLinear(k, n, bias=False, group_size=GS, bits=4)
    stock.weight, stock.scales, stock.biases = random_qweight(n, k)
    if interleaved:
        stock.gate_up_interleaved = True  # type: ignore[attr-defined]
    return AcceleratedQuantizedLinear.from_quantized(stock)


class Block(nn.Module):
    """The four matmuls of one decode block, called as compiled_decode calls them."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = layer(QKV, HIDDEN)
        self.o = layer(HIDDEN, HIDDEN)
        self.gate_up = layer(2 * INTERMEDIATE, HIDDEN, interleaved=True)
        self.down = layer(HIDDEN, INTERMEDIATE)

    def __call__(self, h: mx.array) -> mx.array:
        attended = self.qkv(h)[:, :HIDDEN]  # stands in for attention's output
        h = residual_linear(self.o, attended, h)
        return residual_linear(self.down, swiglu_linear(self.gate_up, h), h)


def set_path(model: nn.Module, path: str | None) -> None:
    for _, module in model.named_modules():
        if isinstance(module, AcceleratedQuantizedLinear):
            module.force_path = path


def part_check(rows: list[int]) -> bool:
    print("\n## 1. Correctness (max |a-b| / max |b|, bf16)\n", flush=True)
    print("| layer | rows | dense vs stock + MLX op | dense vs dequantize + matmul | ok |")
    print("|---|---:|---:|---:|---|")
    ok = True
    cases = [
        ("qkv fused", QKV, HIDDEN, "none"),
        ("o_proj + residual", HIDDEN, HIDDEN, "residual"),
        ("gate_up fused + SwiGLU", 2 * INTERMEDIATE, HIDDEN, "swiglu"),
        ("down + residual", HIDDEN, INTERMEDIATE, "residual"),
        ("output head", VOCAB, HIDDEN, "none"),
    ]
    for name, n, k, epilogue in cases:
        holder = nn.Module()
        holder.layer = layer(n, k, interleaved=epilogue == "swiglu")
        keep_dense_weights(holder, 1)
        lin = holder.layer
        q, s, b = lin["weight"], lin["scales"], lin["biases"]
        for m in rows:
            x = mx.random.normal((m, k)).astype(mx.bfloat16)
            out_n = n // 2 if epilogue == "swiglu" else n
            res = (
                mx.random.normal((m, out_n)).astype(mx.bfloat16) if epilogue == "residual" else None
            )
            stock = apply_epilogue(
                mx.quantized_matmul(x, q, s, b, group_size=GS, bits=4), epilogue, res
            )
            wd = mx.dequantize(q, s, b, group_size=GS, bits=4)
            plain = apply_epilogue(x @ wd.T, epilogue, res)
            lin.force_path = "dense"
            if epilogue == "residual":
                y = residual_linear(lin, x, res)
            elif epilogue == "swiglu":
                y = swiglu_linear(lin, x)
            else:
                y = lin(x)
            mx.eval(y, stock, plain)
            nan = bool(mx.isnan(y).any().item())
            e_stock, e_same = rel_err(y, stock), rel_err(y, plain)
            good = not nan and e_same == 0.0 and e_stock < 2e-2
            ok &= good
            print(f"| {name} | {m} | {e_stock:.2e} | {e_same:.2e} | {'ok' if good else 'FAIL'} |")
        del holder, lin
        mx.clear_cache()
    print(f"\ncorrectness: {'all ok' if ok else 'FAILED'}", flush=True)
    return ok


def chained_us(blocks: list[nn.Module], x: mx.array, calls: int = 48) -> float:
    """Median us a call through ``blocks`` in turn, each call's input the last one's output (no
    two calls overlap on the device, as in a step); the graph is built before the clock."""
    mx.eval(blocks[0](x), blocks[-1](x))
    times = []
    for _ in range(5):
        h = x
        for i in range(calls):
            h = blocks[i % len(blocks)](h)
        mx.synchronize()
        started = time.perf_counter()
        mx.eval(h)
        mx.synchronize()
        times.append((time.perf_counter() - started) / calls)
    return sorted(times)[2] * 1e6


def part_table(rows: list[int]) -> None:
    print("\n## 2. Microseconds a call (dependent calls, bf16, group 64)\n", flush=True)
    block_bytes = (QKV + HIDDEN + 2 * INTERMEDIATE) * HIDDEN * 2 + HIDDEN * INTERMEDIATE * 2
    copies = max(2, math.ceil(3 * L2_BYTES / (block_bytes // 4)))
    holder = nn.Module()
    holder.blocks = [Block() for _ in range(copies)]
    started = time.perf_counter()
    kept = keep_dense_weights(holder, 1)
    print(
        f"dense copies of {copies} blocks: {kept / 1e9:.2f} GB in {time.perf_counter() - started:.1f} s"
    )
    head = nn.Module()
    head.layers = [layer(VOCAB, HIDDEN) for _ in range(2)]
    keep_dense_weights(head, 1)
    print(
        "\n| rows | block, 4-bit path (us) | block, dense (us) | dense / 4-bit | head, 4-bit | head, dense |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for m in rows:
        x = mx.random.normal((m, HIDDEN)).astype(mx.bfloat16)
        mx.eval(x)
        cells = {}
        for label, path in (("4bit", None), ("dense", "dense")):
            # The 4-bit path: what `choose_path` picks when no call takes the dense copy.
            ql._dense_min_rows = 1 if path else 2**30
            set_path(holder, path)
            set_path(head, path)
            cells[label] = chained_us(holder.blocks, x)
            cells["head " + label] = chained_us(
                [lambda h, lin=lin: lin(h)[:, :HIDDEN] for lin in head.layers], x, calls=8
            )
        print(
            f"| {m} | {cells['4bit']:.1f} | {cells['dense']:.1f} | "
            f"{cells['dense'] / cells['4bit']:.2f} | {cells['head 4bit']:.1f} | "
            f"{cells['head dense']:.1f} |",
            flush=True,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    # Above 64 rows the 4-bit path is MLX's stock kernel, whose first use compiles for ~40 s.
    parser.add_argument("--rows", default="16,24,32,40,48,64", help="part 2's row counts")
    parser.add_argument("--check-rows", default="33,64", help="part 1's row counts")
    parser.add_argument("--parts", default="1,2")
    args = parser.parse_args()
    parts = {int(p) for p in args.parts.split(",")}
    ok = True
    if 1 in parts:
        ok = part_check([int(r) for r in args.check_rows.split(",")])
    if 2 in parts:
        part_table([int(r) for r in args.rows.split(",")])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
