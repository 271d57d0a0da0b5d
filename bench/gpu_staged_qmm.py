"""The staged 4-bit kernel against the unstaged one, on the device: correctness, per-shape
timings, then whole decode steps of the Qwen3-8B-shaped model with fused projections.

Run on the GPU machine from the repository root (random weights are built there):

    python3 bench/gpu_staged_qmm.py --tokenizer-dir .gpu/tokenizer [--parts 1,2,3]

1. Correctness: every tile shape timed in part 2, at every row count, against dequantize +
   matmul (cuBLAS on the same bf16 weights) over the whole output and against a float64
   reference on the first 256 output features; float16 and group size 32 on one shape.
2. Microseconds a call by layer shape (Qwen3-8B's, plus the fused q/k/v and gate/up widths) and
   row count: the server's tile shape now, the unstaged kernel's, and staged variants; weight
   GB/s and TFLOP/s of the best. Calls rotate through weight copies 3x the L2, so every call
   reads device memory. Independent calls can overlap on the device, which flatters tile shapes
   with few blocks; `--chained` makes each call's input from the previous output instead, so
   they run one after another, as a step's layers do.
3. Whole decode steps (pipelined as the engine runs them, KV 640, left-padded batch caches with
   the decode-attention kernel; one row on a plain cache): separate projections with the
   unstaged kernel (the previous server), then fused projections with the unstaged kernel, with
   the server's policy now and with the first staged policy (8-warp blocks from 9 rows), and at
   one row the fused kernel on every layer; the settings
   alternate over several rounds (median and fastest), and the first round also splits one
   unpipelined step into building its graph and evaluating it.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from gpu_qmm import random_qweight, reference_rows, rel_err, time_calls  # noqa: E402

import mlx_llm_server.kernels.quantized_linear as ql  # noqa: E402
from mlx_llm_server.kernels.quantized_linear import (  # noqa: E402
    FusedConfig,
    dequantize_matmul,
    fused_quantized_matmul,
)

SHAPES = [
    ("q/o_proj", 4096, 4096),
    ("k/v_proj", 1024, 4096),
    ("qkv fused", 6144, 4096),
    ("gate/up", 12288, 4096),
    ("gate_up fused", 24576, 4096),
    ("down", 4096, 12288),
    ("lm_head", 151936, 4096),
]
ROWS = [1, 2, 4, 8, 16, 32, 48, 64]
L2_BYTES = 60 * 2**20
GS = 64


def variants(m: int, n: int) -> list[tuple[str, FusedConfig]]:
    """(label, config): the server's choice, the unstaged kernel's, and staged alternatives."""
    out = [("server", ql._default_fused_config(m, n)), ("unstaged", ql._unstaged_config(m, n))]
    mt = min(ql._mt_for(m), 4)
    if m >= 9 and n % 128 == 0:
        out.append(("staged n8k1", FusedConfig(mt=mt, rt=1, kw=1, nw=8)))
    for nw, kw in ((4, 4), (4, 2), (2, 4), (8, 2), (2, 2), (8, 1)):
        # 512 threads of the 4-tile variant need more than an SM's 64K registers (130 each).
        if n % (16 * nw) == 0 and not (mt >= 4 and nw * kw > 8):
            out.append((f"staged n{nw}k{kw}", FusedConfig(mt=mt, rt=1, kw=kw, nw=nw)))
    if m > 32 and n % 64 == 0:
        out.append(("staged m8n4k2", FusedConfig(mt=8, rt=1, kw=2, nw=4)))
    seen: set[FusedConfig] = set()
    unique = []
    for label, cfg in out:
        if cfg not in seen:
            seen.add(cfg)
            unique.append((label, cfg))
    return unique


def part_check() -> bool:
    print("\n## 1. Correctness (max |a-b| / max |b|)\n", flush=True)
    print("| shape | rows | config | vs dequant+matmul | vs float64 (256 features) | ok |")
    print("|---|---:|---|---:|---:|---|")
    ok = True
    cases = [(name, n, k, mx.bfloat16, GS, [*ROWS, 3, 13, 33]) for name, n, k in SHAPES]
    cases += [
        ("q/o f16", 4096, 4096, mx.float16, 64, [2, 24, 64]),
        ("q/o gs32", 4096, 4096, mx.bfloat16, 32, [2, 24, 64]),
    ]
    for name, n, k, dtype, gs, rows in cases:
        q, s, b = random_qweight(n, k, dtype, gs)
        for m in rows:
            x = mx.random.normal((m, k)).astype(dtype)
            reference = dequantize_matmul(
                x.astype(mx.float32), q, s.astype(mx.float32), b.astype(mx.float32), gs
            )
            f64 = reference_rows(x, q, s, b, 256, gs)
            scale = np.abs(f64).max()
            for label, cfg in variants(m, n):
                y = fused_quantized_matmul(x, q, s, b, gs, config=cfg)
                mx.eval(y)
                nan = bool(mx.isnan(y).any().item())
                e_all = rel_err(y, reference)
                e_f64 = float(np.abs(np.array(y[:, :256].astype(mx.float32)) - f64).max() / scale)
                good = not nan and e_all < 1e-2 and e_f64 < 1e-2
                ok &= good
                if not good or label == "server" or m in (3, 13, 33):
                    print(
                        f"| {name} | {m} | {label} {cfg.mt}/{cfg.rt}/{cfg.kw}/{cfg.nw} | "
                        f"{e_all:.2e} | {e_f64:.2e} | {'ok' if good else 'FAIL'} |",
                        flush=True,
                    )
        del q, s, b
        mx.clear_cache()
    print(f"\ncorrectness: {'all ok' if ok else 'FAILED'}", flush=True)
    return ok


def chained_us(
    x: mx.array,
    weights: list,
    cfg: FusedConfig,
    n: int,
    k: int,
    epilogue: str = "none",
    norm: tuple[mx.array, float] | None = None,
    heads: int = 0,
) -> float:
    """Median us a call when each call's input is made from the previous call's output, so no
    two calls overlap on the device (as in a decode step); one small copy between calls. With
    an ``epilogue`` (the kernel's "residual" or "swiglu"), each call applies it as it stores;
    with ``norm`` (an RMSNorm's weight and eps) it is folded in; with ``heads``, each call reads
    its rows as attention's (rows, heads, 1, D) output. ``x`` is (..., K)."""
    out_n = n // 2 if epilogue == "swiglu" else n
    residual = None
    if epilogue == "residual":
        residual = mx.zeros((*x.shape[:-1], out_n), x.dtype)
    spread = (*([1] * (x.ndim - 1)), k // out_n if out_n < k else 1)

    def chain(count: int) -> mx.array:
        h = x
        for i in range(count):
            q, s, b = weights[i % len(weights)]
            given = h.reshape(-1, heads, 1, k // heads) if heads else h
            y = fused_quantized_matmul(
                given, q, s, b, GS, config=cfg, epilogue=epilogue, residual=residual, norm=norm
            )
            h = y[..., :k] if out_n >= k else mx.tile(y, spread)
        return h

    mx.eval(chain(4))
    times = []
    for _ in range(5):
        out = chain(64)
        mx.synchronize()
        started = time.perf_counter()
        mx.eval(out)
        mx.synchronize()
        times.append((time.perf_counter() - started) / 64)
    return sorted(times)[2] * 1e6


def part_table(chained: bool = False) -> None:
    kind = "chained calls, one copy between calls" if chained else "independent calls"
    print(f"\n## 2. Microseconds a call (bf16, group 64; {kind})\n", flush=True)
    print("| layer (N x K) | rows | server | unstaged | best (config) | best GB/s | best TFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, n, k in SHAPES:
        nbytes = n * k // 2 + 2 * 2 * n * k // GS
        copies = max(2, math.ceil(3 * L2_BYTES / nbytes))
        weights = [random_qweight(n, k) for _ in range(copies)]
        for m in ROWS:
            x = mx.random.normal((m, k)).astype(mx.bfloat16)
            mx.eval(x)
            times: dict[str, float] = {}
            configs = dict(variants(m, n))
            for label, cfg in configs.items():
                if chained:
                    times[label] = chained_us(x, weights, cfg, n, k)
                    continue

                def call(
                    i: int, cfg: FusedConfig = cfg, x: mx.array = x, weights: list = weights
                ) -> mx.array:
                    q, s, b = weights[i]
                    return fused_quantized_matmul(x, q, s, b, GS, config=cfg)

                times[label] = time_calls(call, copies) * 1e6
            best = min(times, key=times.get)  # type: ignore[arg-type]
            cfg = configs[best]
            us = times[best]
            unstaged = times.get("unstaged", times["server"])  # one label where they coincide
            print(
                f"| {name} ({n}x{k}) | {m} | {times['server']:.1f} | {unstaged:.1f} | "
                f"{us:.1f} ({best} {cfg.mt}/{cfg.rt}/{cfg.kw}/{cfg.nw}) | "
                f"{nbytes / us / 1e3:,.0f} | {2 * m * n * k / us / 1e6:.1f} |",
                flush=True,
            )
        del weights
        mx.clear_cache()


def part_steps(args: Any) -> None:
    import statistics

    from gpu_step_anatomy import (
        accelerated_layers,
        batch_caches,
        load_model,
        plain_caches,
        set_decode_kernel,
        steady_ms,
        unpipelined_ms,
    )

    print("\n## 3. Whole decode steps, KV 640 (ms a step)\n", flush=True)
    # Two copies of the model (4.6 GB each), so the settings can alternate round by round:
    # one-row step times drift between runs on the same machine.
    separate, model_args = load_model(args.model, args.tokenizer_dir, fuse=False)
    fused, _ = load_model(args.model, args.tokenizer_dir, fuse=True)
    for model in (separate, fused):
        set_decode_kernel(model, True)
    rows = [int(r) for r in args.rows.split(",")]
    server = ql._default_fused_config

    def staged_from_9(m: int, n: int) -> FusedConfig:
        """The first staged policy: 8-warp blocks over 128 features from 9 rows."""
        if m < 9 or n % 128:
            return ql._unstaged_config(m, n)
        return FusedConfig(mt=min(ql._mt_for(m), 4), rt=1, kw=1, nw=8)

    def step(model: Any, count: int, policy: Any, force: str | None, split: bool) -> tuple:
        ql._default_fused_config = policy
        ql._PLANS.clear()
        for _, layer in accelerated_layers(model):
            layer.force_path = force
        if count == 1:
            cache = plain_caches(model_args, 1, 640, args.steps + 24)
        else:
            cache = batch_caches(model_args, count, 640, args.steps + 12, padded=True)
        ms = steady_ms(model, cache, count, args.steps)[0]
        build_eval = unpipelined_ms(model, cache, count, 10) if split else (math.nan, math.nan)
        for _, layer in accelerated_layers(model):
            layer.force_path = None
        del cache
        mx.clear_cache()
        ql._default_fused_config = server
        return ms, *build_eval

    settings: list[tuple[str, Any, Any, str | None, list[int]]] = [
        (
            "separate projections, unstaged kernel (before)",
            separate,
            ql._unstaged_config,
            None,
            rows,
        ),
        ("fused projections, unstaged kernel", fused, ql._unstaged_config, None, rows),
        ("fused projections, server now", fused, server, None, rows),
        ("fused projections, staged kernel from 9 rows", fused, staged_from_9, None, rows),
        ("separate projections, fused kernel on every layer", separate, server, "fused", [1]),
        ("fused projections, fused kernel on every layer", fused, server, "fused", [1]),
    ]
    figures: dict[tuple[str, int], list[tuple]] = {}
    for round_ in range(args.repeats):
        for label, model, policy, force, counts in settings:
            for count in counts:
                figures.setdefault((label, count), []).append(
                    step(model, count, policy, force, split=round_ == 0)
                )
    print("median (min) of the rounds; then build / evaluate ms of one unpipelined step\n")
    print("| setting | " + " | ".join(f"{r} rows" for r in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for label, *_ in settings:
        cells = []
        for count in rows:
            runs = figures.get((label, count))
            if not runs:
                cells.append("")
                continue
            steps = [run[0] for run in runs]
            ms = statistics.median(steps)
            cells.append(
                f"{ms:.2f} ({min(steps):.2f}) = {count / ms * 1e3:,.0f} tok/s; "
                f"{runs[0][1]:.2f} / {runs[0][2]:.2f}"
            )
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path("/tmp/sb/model-qwen3-8b-4bit"))
    parser.add_argument("--tokenizer-dir", type=Path)
    parser.add_argument("--parts", default="1,2,3")
    parser.add_argument("--rows", default="1,8,32,64")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of part 3's settings")
    parser.add_argument("--chained", action="store_true", help="part 2: dependent calls")
    args = parser.parse_args()
    parts = {int(p) for p in args.parts.split(",")}
    started = time.perf_counter()
    ok = True
    if 1 in parts:
        ok = part_check()
    if 2 in parts:
        part_table(chained=args.chained)
    if 3 in parts:
        part_steps(args)
    print(f"\ndone in {time.perf_counter() - started:.0f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
