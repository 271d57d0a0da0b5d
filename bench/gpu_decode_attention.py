"""The batched decode-attention kernel on the device: correctness, per-call time, engine steps.

`kernels/decode_attention.py` lets each warp take `POSITIONS_PER_WARP` positions at a time. This
checks every tile size given against MLX's masked attention (bf16 and f16, rows 1-64, KV 1-2049,
random left padding), times dependent calls of each on Qwen3-8B's shape (32 query heads, 8
key/value heads, 128 dims) for 64 rows at several KV lengths, and then, with `--rounds`, runs
rounds of many users in the engine alone (started as the server starts it) with the tile sizes
alternating, printing each round's decode step.

    python bench/gpu_decode_attention.py --tiles 1,4,8 --rounds 64x136,64x136
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def check(tiles: list[int]) -> bool:
    import mlx.core as mx

    from mlx_llm_server.kernels import decode_attention as da

    scale = HEAD_DIM**-0.5
    ok = True
    print("| tile | largest relative error (bf16, f16; rows 1-64; KV 1-2049) | NaN |")
    print("|---:|---:|---|")
    for tile in tiles:
        da.POSITIONS_PER_WARP = tile
        worst, nan = 0.0, False
        for dtype in (mx.bfloat16, mx.float16):
            for rows in (1, 2, 8, 64):
                for kv_len in (1, 7, 136, 640, 2049):
                    cap = kv_len + 7  # a cache buffer with room past the last position
                    k1, k2, k3, k4 = mx.random.split(mx.random.key(rows * 10_000 + kv_len), 4)
                    q = mx.random.normal((rows, HEADS, 1, HEAD_DIM), key=k1).astype(dtype)
                    k = mx.random.normal((rows, KV_HEADS, cap, HEAD_DIM), key=k2).astype(dtype)
                    v = mx.random.normal((rows, KV_HEADS, cap, HEAD_DIM), key=k3).astype(dtype)
                    pad = mx.random.randint(0, kv_len, (rows,), key=k4).astype(mx.int32)
                    pad[0] = 0
                    kv, vv = k[..., :kv_len, :], v[..., :kv_len, :]  # views, as caches give
                    ours = da.batch_decode_attention(q, kv, vv, pad, scale).astype(mx.float32)
                    ref = da.reference_decode_attention(q, kv, vv, pad, scale)
                    ref = ref.astype(mx.float32)
                    err = (mx.abs(ours - ref).max() / mx.abs(ref).max()).item()
                    nan = nan or bool(mx.isnan(ours).any().item())
                    worst = max(worst, err)
        print(f"| {tile} | {worst:.2e} | {'yes' if nan else 'no'} |", flush=True)
        ok = ok and not nan and worst < 2e-2
    return ok


def timing(tiles: list[int], rows: int, lengths: list[int], calls: int = 50) -> None:
    import mlx.core as mx

    from mlx_llm_server.kernels import decode_attention as da

    scale = HEAD_DIM**-0.5
    print(f"\nDependent calls, {rows} rows, left padding as a batch keeps it; us a call")
    print("| KV length | bytes read | " + " | ".join(f"tile {t}" for t in tiles) + " |")
    print("|---:|---:|" + "---:|" * len(tiles))
    for length in lengths:
        q = mx.random.normal((rows, HEADS, 1, HEAD_DIM)).astype(mx.bfloat16)
        k = mx.random.normal((rows, KV_HEADS, length, HEAD_DIM)).astype(mx.bfloat16)
        v = mx.random.normal((rows, KV_HEADS, length, HEAD_DIM)).astype(mx.bfloat16)
        pad = (mx.arange(rows) * 37 % (length // 4 + 1)).astype(mx.int32)
        mx.eval(q, k, v, pad)
        read = 2 * int(((length - pad).sum()).item()) * KV_HEADS * HEAD_DIM * 2
        cells = []
        for tile in tiles:
            da.POSITIONS_PER_WARP = tile
            best = float("inf")
            for _ in range(3):
                x = q
                mx.eval(da.batch_decode_attention(x, k, v, pad, scale))  # built and warm
                mx.synchronize()
                started = time.perf_counter()
                for _ in range(calls):
                    x = da.batch_decode_attention(x, k, v, pad, scale)
                mx.eval(x)
                mx.synchronize()
                best = min(best, (time.perf_counter() - started) / calls * 1e6)
            cells.append(f"{best:.1f} ({read / best / 1e3:,.0f} GB/s)")  # bytes/us -> GB/s
        print(f"| {length} | {read / 1e6:.1f} MB | " + " | ".join(cells) + " |", flush=True)


def engine_rounds(args: Any, tiles: list[int]) -> None:
    from gpu_prefill_round import PassLog, run_round, start_engine

    from mlx_llm_server.kernels import decode_attention as da

    log = PassLog()
    served = start_engine(args.model, args.tokenizer_dir, [])
    rounds = [tuple(int(n) for n in r.split("x")) for r in args.rounds.split(",")]

    async def everything() -> None:
        seed = 0
        for users, length in rounds:
            for tile in tiles:
                da.POSITIONS_PER_WARP = tile  # read when each step builds its graph
                print(f"\ntile {tile}:", end="")
                await run_round(served.engine, log, users, length, args.output_tokens, 0.0, seed)
                seed += 1

    asyncio.run(everything())
    served.engine.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiles", default="1,4,8", help="positions a warp takes at a time")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--lengths", default="136,264,392,640,2048")
    parser.add_argument("--rounds", default="", help="engine rounds, users x prompt tokens")
    parser.add_argument("--output-tokens", type=int, default=256)
    parser.add_argument("--model", type=Path, default=Path("/tmp/sb/model-qwen3-8b-4bit"))
    parser.add_argument("--tokenizer-dir", type=Path)
    args = parser.parse_args()
    tiles = [int(t) for t in args.tiles.split(",")]
    if not check(tiles):
        print("a tile size failed the check: no timing")
        return 1
    timing(tiles, args.rows, [int(n) for n in args.lengths.split(",")])
    if args.rounds:
        engine_rounds(args, tiles)
    from mlx_llm_server.cli import exit_without_teardown

    sys.stdout.flush()
    exit_without_teardown(0)  # as the server exits: MLX's device state is not torn down
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
