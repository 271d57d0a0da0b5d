"""Device time of every kernel in one steady decode step, from Nsight Compute (`ncu`).

Two modes. `run` decodes `--steps` steady steps at `--rows` rows over a batch cache of
`--length` positions (the server's layers: accelerated quantized matmuls, the batched
decode-attention kernel), for `ncu` to sample a window of kernel launches in the middle:

    ncu --csv --metrics gpu__time_duration.sum --launch-skip 20000 --launch-count 1000 \\
        python bench/gpu_step_profile.py run --rows 64 --length 640 > kernels.csv

`table` reads that CSV and prints the device time per kernel family and per step (the window's
total divided by the steps it covers, counted by their argmax kernels):

    python bench/gpu_step_profile.py table kernels.csv
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))


def run(rows: int, length: int, steps: int, model_dir: Path) -> None:
    import mlx.core as mx
    from gpu_step_anatomy import batch_caches, load_model, plain_caches, set_decode_kernel

    model, args = load_model(model_dir, ROOT / ".gpu" / "tokenizer")
    set_decode_kernel(model, True)
    if rows == 1:
        cache = plain_caches(args, 1, length, steps)
    else:
        cache = batch_caches(args, rows, length, steps, padded=True)
    tokens = mx.zeros((rows, 1), dtype=mx.uint32)
    for _ in range(steps):
        tokens = mx.argmax(model(tokens, cache=cache)[:, -1, :], axis=-1, keepdims=True)
        mx.eval(tokens)


FAMILIES = [
    ("quantized matmul", re.compile(r"qmm|qmv|quantized|gemv|qlx_", re.I)),
    ("attention", re.compile(r"sdpa|attention|flash", re.I)),
    ("RMSNorm", re.compile(r"rms", re.I)),
    ("RoPE", re.compile(r"rope", re.I)),
    ("copies and slice updates", re.compile(r"copy|slice|scatter|gather|concat", re.I)),
    ("elementwise (activations, adds)", re.compile(r"binary|unary|ternary|compiled|fused", re.I)),
    ("reductions, argmax", re.compile(r"reduce|arg_|argmax|softmax", re.I)),
]


def table(path: Path) -> None:
    durations: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    names: dict[str, float] = defaultdict(float)
    steps = 0
    with path.open() as handle:
        lines = [line for line in handle if line.startswith('"')]
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = row["Kernel Name"]
        value = float(row["Metric Value"].replace(",", ""))  # ns with --print-units base
        family = next((f for f, pattern in FAMILIES if pattern.search(name)), "other")
        durations[family] += value
        counts[family] += 1
        names[name[:90]] += value
        if re.search(r"arg_?reduce|argmax", name, re.I):
            steps += 1  # one argmax a step
    total = sum(durations.values())
    steps = max(steps, 1)
    print(
        f"kernels sampled: {sum(counts.values())} over {steps} steps; "
        f"device time {total / 1e6 / steps:.2f} ms a step"
    )
    print("| kernel family | launches a step | device ms a step | share |\n|---|---:|---:|---:|")
    for family, value in sorted(durations.items(), key=lambda kv: -kv[1]):
        print(
            f"| {family} | {counts[family] / steps:.0f} | {value / 1e6 / steps:.2f} "
            f"| {value / total:.0%} |"
        )
    print("\nlargest kernels:")
    for name, value in sorted(names.items(), key=lambda kv: -kv[1])[:15]:
        print(f"  {value / 1e6:8.3f} ms  {name}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("run")
    r.add_argument("--rows", type=int, default=64)
    r.add_argument("--length", type=int, default=640)
    r.add_argument("--steps", type=int, default=40)
    r.add_argument("--model", type=Path, default=Path("/tmp/sb/model-qwen3-8b-4bit"))
    t = sub.add_parser("table")
    t.add_argument("csv", type=Path)
    args = parser.parse_args()
    if args.mode == "run":
        run(args.rows, args.length, args.steps, args.model)
    else:
        table(args.csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
