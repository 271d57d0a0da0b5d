"""4-bit affine quantized matmul on an NVIDIA GPU: correctness, per-shape timings, decode.

Run on the GPU machine from the repository root (random weights are built there):

    python3 bench/gpu_qmm.py --out "$OUT" [--budget 560] [--quick-check | --skip-check]
        [--skip-table] [--skip-e2e]

Checks the fused kernel of ``mlx_llm_server.kernels.quantized_linear`` against
``mx.quantized_matmul`` and a float64 reference on Qwen3-8B's linear shapes; prints per shape
and row count the time of the stock op (on 2-D rows and on decode's (B, 1, K) rows), of
dequantize + matmul, of a bf16 matmul on pre-dequantized weights and of each fused tile shape,
with weight GB/s and TFLOP/s; then times batched decode of a Qwen3-8B-shaped 4-bit model, stock
against the accelerated layers under several path policies. The first use of each stock kernel
class JIT-compiles for ~40 s, which the budget has to cover. Results: $OUT/gpu_qmm.{log,json}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

import mlx_llm_server.kernels.quantized_linear as qlmod
from mlx_llm_server.kernels.quantized_linear import (
    AcceleratedQuantizedEmbedding,
    AcceleratedQuantizedLinear,
    FusedConfig,
    accelerate_quantized_layers,
    choose_path,
    dequantize_matmul,
    fused_quantized_matmul,
)

# (name, N = output features, K = input features) of Qwen3-8B's linears.
SHAPES = [
    ("q/o_proj", 4096, 4096),
    ("k/v_proj", 1024, 4096),
    ("gate/up", 12288, 4096),
    ("down", 4096, 12288),
    ("lm_head", 151936, 4096),
]
ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
GS = 64
L2_BYTES = 50 * 2**20
T0 = time.perf_counter()


def log(msg: str, fh: Any = None) -> None:
    line = f"[{time.perf_counter() - T0:7.1f}s] {msg}"
    print(line, flush=True)
    if fh is not None:
        fh.write(line + "\n")
        fh.flush()


def elapsed() -> float:
    return time.perf_counter() - T0


def rel_err(a: mx.array, b: mx.array) -> float:
    a32, b32 = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.abs(a32 - b32).max() / mx.abs(b32).max()).item()


def random_qweight(n: int, k: int, dtype: mx.Dtype = mx.bfloat16, gs: int = GS) -> tuple:
    w = (mx.random.normal((n, k)) * 0.02).astype(dtype)
    q, s, b = mx.quantize(w, group_size=gs, bits=4)
    mx.eval(q, s, b)
    return q, s, b


def stock(x: mx.array, q: mx.array, s: mx.array, b: mx.array, gs: int = GS) -> mx.array:
    return mx.quantized_matmul(x, q, s, b, transpose=True, group_size=gs, bits=4)


def reference_rows(x: mx.array, q: mx.array, s: mx.array, b: mx.array, rows: int, gs: int):
    """float64 x @ W[:rows].T on the host, W dequantized from the packed words."""
    qn = np.array(q[:rows]).astype(np.uint64)
    vals = np.stack([(qn >> (4 * i)) & 0xF for i in range(8)], -1).reshape(rows, -1)
    sn = np.array(s[:rows].astype(mx.float32)).astype(np.float64)
    bn = np.array(b[:rows].astype(mx.float32)).astype(np.float64)
    w = vals * np.repeat(sn, gs, 1) + np.repeat(bn, gs, 1)
    return np.array(x.astype(mx.float32)).astype(np.float64) @ w.T


def time_calls(make: Callable[[int], mx.array], copies: int, target_s: float = 0.015) -> float:
    """Median seconds per call over chains of calls that rotate through weight copies.

    The lazy graph is built before the clock starts; the time covers MLX's encoding and
    the GPU work, which overlap.
    """
    mx.eval(make(0))
    mx.eval(make(1 % copies))
    mx.synchronize()
    outs = [make(i % copies) for i in range(4)]
    t = time.perf_counter()
    mx.eval(outs)
    mx.synchronize()
    est = (time.perf_counter() - t) / 4
    reps = int(min(300, max(3, target_s / max(est, 1e-7))))
    times = []
    for rep in range(5):
        outs = [make((rep * reps + i) % copies) for i in range(reps)]
        mx.synchronize()
        t = time.perf_counter()
        mx.eval(outs)
        mx.synchronize()
        times.append((time.perf_counter() - t) / reps)
        del outs
    return statistics.median(times)


def fused_variants(m: int, n: int) -> list[FusedConfig]:
    mt = 1 if m <= 8 else 2 if m <= 16 else 4 if m <= 32 else 8
    out = [FusedConfig(mt, 1, 8), FusedConfig(mt, 1, 4)]
    if mt <= 4 and n % 32 == 0:
        out.append(FusedConfig(mt, 2, 8))
    return out


def check_correctness(fh: Any, results: dict, quick: bool = False) -> bool:
    log("== correctness: fused vs mx.quantized_matmul and a float64 reference ==", fh)
    ok = True
    rows_to_check = [1, 13, 100] if quick else [1, 5, 8, 13, 32, 64, 100]
    cases = [(name, n, k, mx.bfloat16, GS) for name, n, k in SHAPES]
    if not quick:
        cases += [
            ("q/o_proj f16", 4096, 4096, mx.float16, 64),
            ("q/o_proj gs32", 4096, 4096, mx.bfloat16, 32),
        ]
    out = []
    for name, n, k, dtype, gs in cases:
        q, s, b = random_qweight(n, k, dtype, gs)
        for m in rows_to_check if dtype == mx.bfloat16 and gs == GS else [1, 24, 64]:
            x = mx.random.normal((m, k)).astype(dtype)
            ys = stock(x, q, s, b, gs)
            yf = fused_quantized_matmul(x, q, s, b, gs)
            mx.eval(ys, yf)
            nan = bool(mx.isnan(yf).any().item())
            e_stock = rel_err(yf, ys)
            ref = reference_rows(x, q, s, b, 256, gs)
            scale = np.abs(ref).max()
            e_ref_f = float(np.abs(np.array(yf[:, :256].astype(mx.float32)) - ref).max() / scale)
            e_ref_s = float(np.abs(np.array(ys[:, :256].astype(mx.float32)) - ref).max() / scale)
            # Within bf16 rounding of float64, and of the stock op unless that one is off itself.
            good = (not nan) and e_ref_f < 1e-2 and e_stock < max(1e-2, 2 * e_ref_s)
            ok &= good
            out.append(
                dict(
                    shape=name,
                    n=n,
                    k=k,
                    m=m,
                    dtype=str(dtype),
                    gs=gs,
                    vs_stock=e_stock,
                    fused_vs_f64=e_ref_f,
                    stock_vs_f64=e_ref_s,
                    nan=nan,
                    ok=good,
                )
            )
            log(
                f"{name:14s} m={m:4d} fused-vs-stock {e_stock:.2e}  fused-vs-f64 {e_ref_f:.2e}"
                f"  stock-vs-f64 {e_ref_s:.2e}  {'OK' if good else 'FAIL'}",
                fh,
            )
        del q, s, b
        mx.clear_cache()

    # Modules: 3-D input with bias, and the tied-embedding head (as_linear).
    lin = nn.QuantizedLinear(4096, 1024, bias=True, group_size=64, bits=4)
    lin.set_dtype(mx.bfloat16)
    fast = AcceleratedQuantizedLinear.from_quantized(lin)
    x = mx.random.normal((2, 3, 4096)).astype(mx.bfloat16)
    e_mod = rel_err(fast(x), lin(x))
    emb = nn.QuantizedEmbedding(151936, 4096, group_size=64, bits=4)
    emb.set_dtype(mx.bfloat16)
    femb = AcceleratedQuantizedEmbedding.from_quantized(emb)
    h = mx.random.normal((4, 1, 4096)).astype(mx.bfloat16)
    e_emb = rel_err(femb.as_linear(h), emb.as_linear(h))
    good = e_mod < 1e-2 and e_emb < 1e-2
    ok &= good
    log(
        f"modules: linear 3-D+bias {e_mod:.2e}, tied embedding as_linear {e_emb:.2e} "
        f"{'OK' if good else 'FAIL'}",
        fh,
    )
    results["correctness"] = [*out, dict(module_linear=e_mod, module_embedding=e_emb)]
    return ok


def copy_bandwidth(fh: Any, results: dict) -> None:
    a = mx.random.randint(0, 255, (2**30,)).astype(mx.uint8)
    mx.eval(a)
    one = mx.array(1, mx.uint8)
    t = time_calls(lambda i, a=a: a + one, 1, target_s=0.05)
    gbs = 2 * a.nbytes / t / 1e9
    log(f"device copy (read+write 1 GiB): {t * 1e3:.3f} ms, {gbs:.0f} GB/s", fh)
    results["copy_gbs"] = gbs


def overhead_floor(fh: Any, results: dict) -> None:
    q, s, b = random_qweight(256, 256)
    x = mx.random.normal((1, 256)).astype(mx.bfloat16)
    lin = nn.QuantizedLinear(256, 256, bias=False, group_size=GS, bits=4)
    lin.set_dtype(mx.bfloat16)
    fast = AcceleratedQuantizedLinear.from_quantized(lin)
    x3 = x[None]
    makers = {
        "stock": lambda i: stock(x, q, s, b),
        "fused": lambda i: fused_quantized_matmul(x, q, s, b, GS),
        "QuantizedLinear": lambda i: lin(x3),
        "Accelerated": lambda i: fast(x3),
    }
    floor = {}
    for key, make in makers.items():
        t_run = time_calls(make, 1)
        t = time.perf_counter()
        outs = [make(i) for i in range(300)]
        t_build = (time.perf_counter() - t) / 300
        mx.eval(outs)
        floor[key] = dict(run_us=t_run * 1e6, build_us=t_build * 1e6)
        log(
            f"per-call host floor (256x256 weight, 1 row) {key:15s}: graph build "
            f"{t_build * 1e6:5.1f} us, eval {t_run * 1e6:5.1f} us",
            fh,
        )
    results["floor_us"] = floor


def bench_table(fh: Any, results: dict, deadline: float) -> None:
    log("== per-shape timings (median us per call; GB/s = weight bytes / time) ==", fh)
    rows: list[dict[str, Any]] = []
    results["table"] = rows
    # All shapes' weights stay resident, rows outermost: a short budget drops large M first.
    weights = {}
    for name, n, k in SHAPES:
        wbytes = n * k // 2 + 2 * n * (k // GS) * 2
        # Enough weight copies to rotate through that each call reads from device memory.
        copies = max(2, min(64, math.ceil(3 * L2_BYTES / wbytes)))
        ws = [random_qweight(n, k) for _ in range(copies)]
        nd = max(1, min(copies, math.ceil(3 * L2_BYTES / (n * k * 2))))
        dense = [mx.dequantize(*ws[i], group_size=GS, bits=4) for i in range(nd)]
        mx.eval(dense)
        weights[name] = (ws, dense, wbytes)
    log("weights built", fh)
    for m in ROWS:
        for name, n, k in SHAPES:
            if elapsed() > deadline:
                log(f"skip {name} m={m}: time budget", fh)
                continue
            ws, dense, wbytes = weights[name]
            bench_shape(name, n, k, m, ws, dense, wbytes, rows, fh)


def bench_shape(
    name: str, n: int, k: int, m: int, ws: list, dense: list, wbytes: int, rows: list, fh: Any
) -> None:
    copies = len(ws)
    x = mx.random.normal((m, k)).astype(mx.bfloat16)
    x3 = x[:, None, :]
    mx.eval(x, x3)
    methods: dict[str, Callable[[int], mx.array]] = {
        "stock": lambda i: stock(x, *ws[i]),
        "dequant": lambda i: dequantize_matmul(x, *ws[i], GS),
        "bf16_dense": lambda i: x @ dense[i % len(dense)].T,
    }
    if m <= 64:
        methods["stock_rows3d"] = lambda i: stock(x3, *ws[i])
    for cfg in fused_variants(m, n):
        methods[f"fused_m{cfg.mt}r{cfg.rt}k{cfg.kw}"] = lambda i, cfg=cfg: fused_quantized_matmul(
            x, *ws[i], GS, cfg
        )
    y_ref = stock(x, *ws[0])
    rec: dict[str, Any] = dict(shape=name, n=n, k=k, m=m, weight_bytes=wbytes)
    for key, fn in methods.items():
        try:
            t = time_calls(fn, copies)
            rec[key + "_us"] = t * 1e6
            if key.startswith("fused"):
                rec[key + "_err"] = rel_err(fn(0), y_ref)
        except Exception as exc:  # report and go on with the other methods
            log(f"{name} m={m} {key}: {type(exc).__name__}: {exc}", fh)
    rows.append(rec)
    line = f"{name:9s} m={m:4d}"
    for key in ["stock", "stock_rows3d", "dequant", "bf16_dense"]:
        if key + "_us" in rec:
            line += f" {key} {rec[key + '_us']:8.1f}"
    fused = [kk[:-3] for kk in rec if kk.startswith("fused") and kk.endswith("_us")]
    if fused:
        best = min(fused, key=lambda kk: rec[kk + "_us"])
        rec["best_fused"] = best
        tb = rec[best + "_us"]
        line += (
            f" | {best} {tb:8.1f} ({wbytes / tb / 1e3:5.0f} GB/s, "
            f"{2 * m * n * k / tb / 1e6:6.1f} TF/s, err {rec.get(best + '_err', -1):.1e})"
        )
        if "stock_us" in rec:
            line += f" x{rec['stock_us'] / tb:5.1f} vs stock"
    log(line, fh)


def build_qwen3_8b() -> nn.Module:
    from mlx_lm.models.qwen3 import Model, ModelArgs

    args = ModelArgs(
        model_type="qwen3",
        hidden_size=4096,
        num_hidden_layers=36,
        intermediate_size=12288,
        num_attention_heads=32,
        rms_norm_eps=1e-6,
        vocab_size=151936,
        num_key_value_heads=8,
        max_position_embeddings=40960,
        head_dim=128,
        tie_word_embeddings=False,
        rope_theta=1e6,
    )
    model = Model(args)
    model.set_dtype(mx.bfloat16)
    nn.quantize(model, group_size=64, bits=4)
    # Materialise layer by layer to keep the float temporaries small.
    for layer in model.model.layers:
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    return model


def decode_tps(model: nn.Module, batch: int, steps: int, warm: int = 3) -> float:
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    prompt = mx.random.randint(0, 151936, (batch, 16))

    def step(tok: mx.array) -> mx.array:
        logits = model(tok[:, None], cache=cache)
        return mx.argmax(logits[:, -1, :], axis=-1)

    logits = model(prompt, cache=cache)
    tok = mx.argmax(logits[:, -1, :], axis=-1)
    mx.eval(tok)
    for _ in range(warm):
        tok = step(tok)
        mx.eval(tok)
    mx.synchronize()
    t = time.perf_counter()
    # As mlx-lm does: build step n+1 while the GPU runs step n.
    nxt = step(tok)
    mx.async_eval(nxt)
    for _ in range(steps - 1):
        nxt = step(nxt)
        mx.async_eval(nxt)
    mx.eval(nxt)
    return batch * steps / (time.perf_counter() - t)


# Decode variants after the swap: path-policy overrides on the kernels module.
POLICIES: dict[str, dict[str, float]] = {
    "accelerated": {},
    "flatten_only": {"_FUSED_MAX_ROWS": 0},
    "fused_at_one_row_too": {"_FUSED_ONE_ROW_MIN_WEIGHTS": 0},
}


def _with_policy(overrides: dict[str, float], fn: Callable[[], float]) -> float:
    saved = {key: getattr(qlmod, key) for key in overrides}
    for key, value in overrides.items():
        setattr(qlmod, key, value)
    try:
        return fn()
    finally:
        for key, value in saved.items():
            setattr(qlmod, key, value)


def bench_e2e(fh: Any, results: dict, deadline: float) -> None:
    log("== decode, Qwen3-8B-shaped 4-bit model (random weights), tokens/s ==", fh)
    t = time.perf_counter()
    model = build_qwen3_8b()
    nbytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    log(f"model built in {time.perf_counter() - t:.1f}s, {nbytes / 1e9:.2f} GB", fh)
    out: dict[str, dict[int, float]] = {}
    results["decode_tps"] = out
    batches = [1, 8, 32, 64]

    def measure(label: str, bsz: int, overrides: dict[str, float]) -> None:
        if elapsed() > deadline:
            log(f"skip {label} batch {bsz}: time budget", fh)
            return
        steps = 12 if label == "stock" and bsz > 8 else 32
        try:
            tps = _with_policy(overrides, lambda: decode_tps(model, bsz, steps))
        except Exception:
            log(f"{label} batch {bsz} failed:\n{traceback.format_exc()}", fh)
            return
        out.setdefault(label, {})[bsz] = tps
        log(f"{label:20s} batch {bsz:3d}: {tps:8.1f} tokens/s ({steps} steps)", fh)
        mx.clear_cache()

    for bsz in batches:
        measure("stock", bsz, {})
    n = accelerate_quantized_layers(model)
    log(f"accelerate_quantized_layers replaced {n} layers", fh)
    for label, overrides in POLICIES.items():
        for bsz in batches:
            measure(label, bsz, overrides)
    # Batch 1 is host-bound and noisy: measure it once more.
    for label, overrides in POLICIES.items():
        measure(label + "_again", 1, overrides)
    if "stock" in out:
        for label, row in out.items():
            line = f"{label:20s}" + "".join(
                f"  b{b}: {row[b]:7.1f} (x{row[b] / out['stock'][b]:.2f})"
                for b in batches
                if b in row and b in out["stock"]
            )
            log(line, fh)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--budget", type=float, default=560.0, help="seconds for the whole run")
    ap.add_argument("--table-share", type=float, default=0.55, help="budget share before decode")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-table", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--quick-check", action="store_true", help="bf16, group 64, 3 row counts")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_qmm.log"), "w") as fh:
        return run(args, fh)


def run(args: argparse.Namespace, fh: Any) -> int:
    results: dict[str, Any] = {}
    json_path = os.path.join(args.out, "gpu_qmm.json")
    log(
        f"mlx {mx.__version__}, device {mx.default_device()}, "
        f"cuda {mx.cuda.is_available()}, path for 4 rows of 12288x4096: "
        f"{choose_path(4, 12288, 4096)}",
        fh,
    )
    ok = True
    try:
        if not args.skip_check:
            ok = check_correctness(fh, results, args.quick_check)
        copy_bandwidth(fh, results)
        overhead_floor(fh, results)
        if not args.skip_table:
            bench_table(fh, results, args.budget * args.table_share)
    except Exception:
        log(traceback.format_exc(), fh)
        ok = False
    finally:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
    if not args.skip_e2e:
        try:
            bench_e2e(fh, results, args.budget)
        except Exception:
            log(traceback.format_exc(), fh)
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
    log(f"done, correctness {'OK' if ok else 'FAILED'}", fh)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
