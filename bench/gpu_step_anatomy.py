"""Where a decode step's time goes, on the device: KV length, padding, rows leaving and joining.

Loads the Qwen3-8B-shaped 4-bit model through the server's own loading path (built on the
device first if missing; see serve_bench.build_model), with the accelerated quantized layers
and the server's CUDA defaults, then prints one table per part:

1. Steady decode at each row count and KV length, pipelined as the engine runs it (graph of step
   t+1 queued before step t's tokens are read): milliseconds a step, with a batch cache whose
   rows are left-padded as a server's are, and with a plain cache of the same length (no mask).
   Unpipelined, the same step split into building its graph (Python) and evaluating it.
2. What a row leaving or joining costs at the largest row count and KV length: mlx-lm's
   `BatchKVCache.filter` / `extract` against the engine's `filter_rows` / `extract_row`, and
   `extend` by one new row; each timed from a synchronised device to its result evaluated.
3. Sampling alone for that many rows: greedy, and temperature with top-p.
4. One row, by quantized-matmul path: the server's choice, the fused kernel on the MLP
   projections, and the stock op everywhere (steady ms, graph building, evaluation).
5. One decoder layer's operations at the largest row count and KV length, each called 40 times
   in one evaluation: microseconds a call (host encoding and device time together).
6. The batched decode-attention kernel (`kernels/decode_attention.py`) against MLX's attention
   with the padding as a boolean mask: largest relative error over row counts, KV lengths and
   paddings, then microseconds a call against the masked and the unmasked stock attention.

Part 1 runs the batch cache twice: MLX's masked attention, then the decode-attention kernel.

7. Batched steps by quantized-matmul path: the server's choice against the fused kernel on
   every layer (and on every layer but the narrow k/v projections).
8. Compiled decode blocks (`kernels/compiled_decode.py`) at each row count: the model's own
   blocks against compiled ones, each with the server's matmul choice and with the fused kernel
   on every layer (which differ at one row only); settings alternate over `--repeats` rounds,
   median (fastest) ms a step, and the first round's unpipelined build / evaluate.

9. The fused q/k-norm + RoPE kernel (`kernels/head_rope.py`) in compiled decode blocks: its
   largest error against the model's own operations, the number of graph nodes in a one-row
   step with and without it, then steps at each row count as in part 8.

10. The fused 4-bit kernel's epilogues and folded norms (residual adds, SwiGLU, RMSNorm before
   q/k/v and gate/up; `kernels/quantized_linear.py`): largest errors, graph nodes at one row,
   then steps with and without them as in part 8.

11. Prefill of prompts arriving together, as the engine groups them (right-padded, one pass):
   for each group shape (prompts x tokens), milliseconds for the body pass (KV cache evaluated,
   no logits), the last-token pass with sampling, and joining a running batch; prompt tokens/s;
   the body pass again with the quantized matmuls pinned to each path; and what the group's
   matmuls alone take (dequantize + cuBLAS on every projection of every layer).

`--parts` picks which (e.g. `1,5`).

    python bench/gpu_step_anatomy.py --rows 1,64 --lengths 16,256,640
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import re
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

KV_STEP = 256  # mlx-lm grows a KV cache in steps of this many positions


def load_model(
    folder: Path, tokenizer_dir: Path | None = None, fuse: bool = True
) -> tuple[Any, Any]:
    """The server's model from `folder` (built there first if missing), accelerated as the
    server does it (`fuse`: with q/k/v and gate/up fused, as the server serves it)."""
    import mlx.core as mx

    from mlx_llm_server.kernels.fused_projections import fuse_projections
    from mlx_llm_server.kernels.quantized_linear import accelerate_quantized_layers
    from mlx_llm_server.model_setup import CUDA_DEFAULTS, limit_buffer_cache
    from mlx_llm_server.models.loader import load

    if not (folder / "config.json").exists():
        from serve_bench import build_model

        build_model("qwen3-8b-4bit", folder, tokenizer_dir)
    for name, value in CUDA_DEFAULTS.items():
        os.environ.setdefault(name, value)
    limit_buffer_cache(4.0)
    loaded = load(str(folder))
    fused = fuse_projections(loaded.model) if fuse else 0
    swapped = accelerate_quantized_layers(loaded.model)
    print(
        f"model loaded; fused projections: {fused}; accelerated layers: {swapped}; "
        f"device {mx.default_device()}",
        flush=True,
    )
    return loaded.model, loaded.model.args


def kv_shape(args: Any, rows: int, capacity: int) -> tuple[int, int, int, int]:
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    return (rows, args.num_key_value_heads, capacity, head_dim)


def capacity_for(length: int, steps: int) -> int:
    return -(-(length + steps) // KV_STEP) * KV_STEP


def batch_caches(args: Any, rows: int, length: int, steps: int, padded: bool) -> list[Any]:
    """Per-layer batch caches of `length` positions; rows left-padded as a server's are (the
    oldest row none, the others up to half the length) when `padded`."""
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache

    padding = [(r * 37) % (length // 2 + 1) if padded and r else 0 for r in range(rows)]
    shape = kv_shape(args, rows, capacity_for(length, steps))
    caches = []
    for _ in range(args.num_hidden_layers):
        cache = BatchKVCache(padding)
        cache.keys = mx.random.normal(shape, dtype=mx.bfloat16)
        cache.values = mx.random.normal(shape, dtype=mx.bfloat16)
        cache.offset = cache.offset + length
        cache._idx = length
        caches.append(cache)
    mx.eval([c.state for c in caches])
    return caches


def plain_caches(args: Any, rows: int, length: int, steps: int) -> list[Any]:
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    shape = kv_shape(args, rows, capacity_for(length, steps))
    caches = []
    for _ in range(args.num_hidden_layers):
        cache = KVCache()
        cache.keys = mx.random.normal(shape, dtype=mx.bfloat16)
        cache.values = mx.random.normal(shape, dtype=mx.bfloat16)
        cache.offset = length
        caches.append(cache)
    mx.eval([c.state for c in caches])
    return caches


def steady_ms(model: Any, cache: list[Any], rows: int, steps: int) -> tuple[float, float]:
    """Median ms a step, pipelined as the engine runs; and the median graph-building ms."""
    import mlx.core as mx

    tokens = mx.zeros((rows, 1), dtype=mx.uint32)
    pending = None
    stamps, builds = [], []
    for _ in range(steps):
        started = time.perf_counter()
        logits = model(tokens, cache=cache)[:, -1, :]
        tokens = mx.argmax(logits, axis=-1, keepdims=True)
        mx.async_eval(tokens)
        builds.append(time.perf_counter() - started)
        if pending is not None:
            pending.tolist()
        pending = tokens
        stamps.append(time.perf_counter())
    gaps = [b - a for a, b in itertools.pairwise(stamps[4:])]
    return statistics.median(gaps) * 1e3, statistics.median(builds[4:]) * 1e3


def unpipelined_ms(model: Any, cache: list[Any], rows: int, steps: int) -> tuple[float, float]:
    """Median ms building one step's graph, and evaluating it with nothing else in flight."""
    import mlx.core as mx

    tokens = mx.zeros((rows, 1), dtype=mx.uint32)
    builds, evals = [], []
    for _ in range(steps):
        started = time.perf_counter()
        logits = model(tokens, cache=cache)[:, -1, :]
        tokens = mx.argmax(logits, axis=-1, keepdims=True)
        built = time.perf_counter()
        mx.eval(tokens)
        builds.append(built - started)
        evals.append(time.perf_counter() - built)
    return statistics.median(builds[2:]) * 1e3, statistics.median(evals[2:]) * 1e3


def part_steady(model: Any, args: Any, rows: list[int], lengths: list[int], steps: int) -> None:
    import mlx.core as mx

    print("\n## 1. Steady decode (ms a step)\n", flush=True)
    print(
        "| rows | KV length | batch cache, masked | batch cache, kernel | plain cache, no mask "
        "| tokens/s (kernel) | build (masked) | unpipelined (plain): build / evaluate |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for count in rows:
        for length in lengths:
            if count == 1:
                batch_step = kernel_step = build = float("nan")
            else:
                set_decode_kernel(model, False)
                cache = batch_caches(args, count, length, steps, padded=True)
                batch_step, build = steady_ms(model, cache, count, steps)
                set_decode_kernel(model, True)
                cache = batch_caches(args, count, length, steps, padded=True)
                kernel_step, _ = steady_ms(model, cache, count, steps)
                del cache
            cache = plain_caches(args, count, length, steps + 12)
            plain_step, plain_build = steady_ms(model, cache, count, steps)
            unpiped = unpipelined_ms(model, cache, count, 10)
            del cache
            mx.clear_cache()
            step = plain_step if count == 1 else kernel_step
            print(
                f"| {count} | {length} | {batch_step:.2f} | {kernel_step:.2f} | {plain_step:.2f} | "
                f"{count / step * 1e3:,.1f} | {(plain_build if count == 1 else build):.2f} | "
                f"{unpiped[0]:.2f} / {unpiped[1]:.2f} |",
                flush=True,
            )


def set_decode_kernel(model: Any, on: bool) -> None:
    for layer in model.model.layers:
        layer.self_attn.batch_decode_kernel = on


def synced_ms(action: Callable[[], Any]) -> float:
    import mlx.core as mx

    mx.synchronize()
    started = time.perf_counter()
    result = action()
    mx.eval(result)
    mx.synchronize()
    return (time.perf_counter() - started) * 1e3


def part_churn(model: Any, args: Any, rows: int, length: int) -> None:
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache, KVCache

    from mlx_llm_server.engine.batch import extract_row, filter_rows

    print(f"\n## 2. Rows leaving and joining, {rows} rows, KV length {length} (ms)\n", flush=True)
    kept = [r for r in range(rows) if r != 1]
    index = mx.array(kept, dtype=mx.int32)

    def fresh() -> list[Any]:
        mx.clear_cache()
        return batch_caches(args, rows, length, 16, padded=True)

    def one_step(cache: list[Any], count: int) -> float:
        tokens = mx.zeros((count, 1), dtype=mx.uint32)
        return synced_ms(lambda: model(tokens, cache=cache)[:, -1, :].argmax(axis=-1))

    figures: list[tuple[str, float]] = []
    for _ in range(2):  # the first round pays first-use costs
        figures = []
        cache = fresh()
        figures.append(("one decode step (reference)", one_step(cache, rows)))
        figures.append(
            (
                "mlx-lm: every layer's filter (one row leaves)",
                synced_ms(lambda c=cache: [layer.filter(index) or layer.state for layer in c]),
            )
        )
        figures.append(("the next decode step after it", one_step(cache, rows - 1)))
        cache = fresh()
        figures.append(
            (
                "engine: filter_rows (one row leaves)",
                synced_ms(lambda c=cache: filter_rows(c, kept) or [layer.state for layer in c]),
            )
        )
        figures.append(("the next decode step after it", one_step(cache, rows - 1)))
        cache = fresh()
        figures.append(
            (
                "mlx-lm: every layer's extract (one row's cache)",
                synced_ms(lambda c=cache: [layer.extract(1).state for layer in c]),
            )
        )
        figures.append(
            (
                "engine: extract_row",
                synced_ms(lambda c=cache: [layer.state for layer in extract_row(c, 1)]),
            )
        )

        def joiner() -> list[Any]:
            single = []
            for _ in range(args.num_hidden_layers):
                layer = KVCache()
                layer.keys = mx.random.normal(kv_shape(args, 1, 256), dtype=mx.bfloat16)
                layer.values = mx.random.normal(kv_shape(args, 1, 256), dtype=mx.bfloat16)
                layer.offset = 200
                single.append(BatchKVCache.merge([layer]))
            mx.eval([layer.state for layer in single])
            return single

        new_row = joiner()
        figures.append(
            (
                "extend every layer by one row of 200 positions",
                synced_ms(
                    lambda c=cache, n=new_row: [
                        a.extend(b) or a.state for a, b in zip(c, n, strict=True)
                    ]
                ),
            )
        )
        figures.append(("the next decode step after it", one_step(cache, rows + 1)))
        del cache
    for name, value in figures:
        print(f"| {name} | {value:.2f} |", flush=True)


def part_sampling(rows: int, vocab: int) -> None:
    import mlx.core as mx

    from mlx_llm_server.engine.sampling import SamplingBatch
    from mlx_llm_server.engine.types import SamplingParams

    print(f"\n## 3. Sampling alone, {rows} rows of {vocab:,} logits (ms)\n", flush=True)
    logits = mx.random.normal((rows, vocab), dtype=mx.bfloat16)
    mx.eval(logits)
    for name, params in (
        ("greedy", SamplingParams(temperature=0.0)),
        ("temperature 0.7, top-p 0.9", SamplingParams(temperature=0.7, top_p=0.9)),
    ):
        batch = SamplingBatch([params] * rows, vocab)
        times = [synced_ms(lambda b=batch: b.sample(logits).arrays()) for _ in range(12)]
        print(f"| {name} | {statistics.median(times[2:]):.2f} |", flush=True)


def accelerated_layers(model: Any) -> list[tuple[str, Any]]:
    """(name, layer) of every accelerated quantized layer: their `force_path` pins a path."""
    from mlx_llm_server.kernels.quantized_linear import (
        AcceleratedQuantizedEmbedding,
        AcceleratedQuantizedLinear,
    )

    accelerated = AcceleratedQuantizedLinear | AcceleratedQuantizedEmbedding
    return [(name, m) for name, m in model.named_modules() if isinstance(m, accelerated)]


def part_one_row_paths(model: Any, args: Any, length: int, steps: int) -> None:
    import mlx.core as mx

    print(f"\n## 4. One row by matmul path, KV length {length} (ms)\n", flush=True)
    print("| path | step | build | unpipelined: build / evaluate |\n|---|---:|---:|---|")
    layers = accelerated_layers(model)
    mlp = ("gate_proj", "up_proj", "down_proj")
    choices = {
        "server's choice": lambda name: None,
        "fused kernel on gate/up/down": lambda name: "fused" if name.endswith(mlp) else None,
        "stock op everywhere": lambda name: "stock",
    }
    for label, pick in choices.items():
        for name, layer in layers:
            layer.force_path = pick(name)
        cache = plain_caches(args, 1, length, steps + 12)
        step, build = steady_ms(model, cache, 1, steps)
        unpiped = unpipelined_ms(model, cache, 1, 10)
        print(
            f"| {label} | {step:.2f} | {build:.2f} | {unpiped[0]:.2f} / {unpiped[1]:.2f} |",
            flush=True,
        )
        del cache
        mx.clear_cache()
    for _, layer in layers:
        layer.force_path = None


def part_batch_paths(model: Any, args: Any, rows: list[int], length: int, steps: int) -> None:
    import mlx.core as mx

    print(f"\n## 7. Batched steps by matmul path, KV length {length} (ms a step)\n", flush=True)
    print("| rows | server's choice | fused kernel, every layer | fused kernel, but k/v |")
    print("|---:|---:|---:|---:|")
    layers = accelerated_layers(model)
    kv = ("k_proj", "v_proj")
    choices = [
        lambda name: None,
        lambda name: "fused",
        lambda name: None if name.endswith(kv) else "fused",
    ]
    set_decode_kernel(model, True)
    for count in rows:
        figures = []
        for pick in choices:
            for name, layer in layers:
                layer.force_path = pick(name)
            cache = batch_caches(args, count, length, steps, padded=True)
            figures.append(steady_ms(model, cache, count, steps)[0])
            del cache
            mx.clear_cache()
        print(f"| {count} | " + " | ".join(f"{f:.2f}" for f in figures) + " |", flush=True)
    for _, layer in layers:
        layer.force_path = None


def set_compiled_blocks(model: Any, on: bool, head_rope: bool = True) -> None:
    from mlx_llm_server.kernels.compiled_decode import CompiledDecodeBlock, compile_decode_blocks

    layers = model.model.layers
    layers[:] = [b.block if isinstance(b, CompiledDecodeBlock) else b for b in layers]
    if on:
        compile_decode_blocks(model, head_rope=head_rope)


def alternating_steps(
    model: Any,
    args: Any,
    count: int,
    length: int,
    steps: int,
    repeats: int,
    settings: dict[str, Callable[[], None]],
) -> dict[str, str]:
    """Steady steps at `count` rows (a plain cache at one row, left-padded batch caches above)
    under each setting (applied by its callable), alternating over `repeats` rounds: for each,
    "median (fastest); build / evaluate" ms, the split from the first round's unpipelined step."""
    import mlx.core as mx

    times: dict[str, list[float]] = {name: [] for name in settings}
    split: dict[str, str] = {}
    for round_ in range(repeats):
        for name, apply in settings.items():
            apply()
            if count == 1:
                cache = plain_caches(args, 1, length, steps + 12)
            else:
                cache = batch_caches(args, count, length, steps + 12, padded=True)
            times[name].append(steady_ms(model, cache, count, steps)[0])
            if round_ == 0:
                build, evaluate = unpipelined_ms(model, cache, count, 10)
                split[name] = f"; {build:.2f} / {evaluate:.2f}"
            del cache
            mx.clear_cache()
    return {
        n: f"{statistics.median(times[n]):.2f} ({min(times[n]):.2f}){split[n]}" for n in settings
    }


def part_compiled_blocks(
    model: Any, args: Any, rows: list[int], length: int, steps: int, repeats: int
) -> None:
    print(f"\n## 8. Compiled decode blocks, KV length {length} (ms a step)\n", flush=True)
    settings = {
        "model blocks": (False, None),
        "compiled blocks": (True, None),
        "model blocks, fused kernel everywhere": (False, "fused"),
        "compiled blocks, fused kernel everywhere": (True, "fused"),
    }
    print("| rows | " + " | ".join(settings) + " |\n|---:|" + "---:|" * len(settings))
    layers = accelerated_layers(model)
    set_decode_kernel(model, True)

    def apply(name: str) -> None:
        compiled, path = settings[name]
        set_compiled_blocks(model, compiled)
        for _, layer in layers:
            layer.force_path = path

    for count in rows:
        names = [n for n in settings if count == 1 or settings[n][1] is None]
        cells = alternating_steps(
            model, args, count, length, steps, repeats, {n: lambda n=n: apply(n) for n in names}
        )
        print(f"| {count} | " + " | ".join(cells.get(n, "") for n in settings) + " |", flush=True)
    set_compiled_blocks(model, False)
    for _, layer in layers:
        layer.force_path = None


def graph_nodes(model: Any, cache: list[Any], rows: int) -> str:
    """How many nodes one decode step's graph has, and the commonest primitives."""
    import mlx.core as mx

    logits = model(mx.zeros((rows, 1), dtype=mx.uint32), cache=cache)
    dot = Path("/tmp/decode-step.dot")
    mx.export_to_dot(str(dot), logits, *[a for c in cache for a in (c.keys, c.values)])
    kinds = Counter(re.findall(r'label ="([A-Za-z]+)', dot.read_text()))
    mx.eval(logits)
    common = ", ".join(f"{kind} {n}" for kind, n in kinds.most_common(8))
    return f"{sum(kinds.values())} ({common})"


def settings_table(
    model: Any,
    args: Any,
    rows: list[int],
    length: int,
    steps: int,
    repeats: int,
    settings: dict[str, Callable[[], None]],
) -> None:
    """For each setting (applied by its callable) the graph's node count at one row, then a
    table of steps at each row count, the settings alternating (`alternating_steps`)."""
    for name, apply in settings.items():
        apply()
        cache = plain_caches(args, 1, length, 4)
        print(f"| graph nodes, one row, {name} | {graph_nodes(model, cache, 1)} |", flush=True)
        del cache
    print("\n| rows | " + " | ".join(settings) + " |\n|---:|" + "---:|" * len(settings))
    for count in rows:
        cells = alternating_steps(model, args, count, length, steps, repeats, settings)
        print(f"| {count} | " + " | ".join(cells[n] for n in settings) + " |", flush=True)


def part_head_rope(
    model: Any, args: Any, rows: list[int], length: int, steps: int, repeats: int
) -> None:
    """The fused q/k-norm + RoPE kernel (`kernels/head_rope.py`) in compiled decode blocks: its
    largest error against the model's own operations, the graph's node count at one row, then
    steps with and without it (fused 4-bit kernel on every layer at one row, as served)."""
    import mlx.core as mx

    from mlx_llm_server.kernels.head_rope import head_rope_for
    from mlx_llm_server.kernels.quantized_linear import set_one_row_fused

    print(f"\n## 9. Fused q/k norms and RoPE, KV length {length}\n", flush=True)
    attention = model.model.layers[0].self_attn
    fused = head_rope_for(attention)
    assert fused is not None, "the kernel does not apply to this model"
    width = attention.qkv_proj.weight.shape[0]
    dtype = model.model.norm.weight.dtype  # the model's activations
    worst = 0.0
    for count in (1, 3, 8, 64):
        for per_row in (False, True):
            key = mx.random.key(count * 7 + per_row)
            qkv = (mx.random.normal((count, 1, width), key=key) * 3).astype(dtype)
            if per_row:
                offset = mx.random.randint(-300, 30_000, (count,)).astype(mx.int32)
            else:
                offset = mx.array(12_345, dtype=mx.int32)
            assert fused.supports(qkv), f"the kernel does not take {dtype}"
            for a, b in zip(fused(qkv, offset), fused.reference(qkv, offset), strict=True):
                a, b = a.astype(mx.float32), b.astype(mx.float32)
                assert a.shape == b.shape and not mx.isnan(a).any().item()
                worst = max(worst, (mx.abs(a - b).max() / mx.abs(b).max()).item())
    print(
        f"| largest relative error (the model's dtype; rows 1-64; positions -300-30,000) | "
        f"{worst:.2e} |",
        flush=True,
    )
    set_one_row_fused(True)
    set_decode_kernel(model, True)
    settings = {"compiled blocks": False, "compiled blocks, fused heads": True}
    settings_table(
        model,
        args,
        rows,
        length,
        steps,
        repeats,
        {
            n: lambda on=on: set_compiled_blocks(model, True, head_rope=on)
            for n, on in settings.items()
        },
    )
    set_compiled_blocks(model, False)
    set_one_row_fused(False)


def set_epilogues(model: Any, on: bool, norm_rows: int = 0) -> None:
    """Fused epilogues on or off, with gate/up rows interleaved or concatenated to match (as
    `fuse_projections` lays them out at load under each setting), norms folded in up to
    `norm_rows` rows; compiled blocks retraced."""
    import mlx.core as mx

    from mlx_llm_server.kernels.compiled_decode import CompiledDecodeBlock
    from mlx_llm_server.kernels.quantized_linear import (
        GATE_UP_RUN,
        interleave_gate_up,
        set_folded_norm_rows,
        set_fused_epilogues,
    )

    set_fused_epilogues(on)
    set_folded_norm_rows(norm_rows)
    for block in model.model.layers:
        block = block.block if isinstance(block, CompiledDecodeBlock) else block
        layer = block.mlp.gate_up_proj
        if layer.gate_up_interleaved == on:
            continue
        for name in ("weight", "scales", "biases"):
            rows = layer[name]
            if on:
                layer[name] = interleave_gate_up(*mx.split(rows, 2))
            else:
                runs = rows.reshape(-1, 2, GATE_UP_RUN, rows.shape[-1])
                halves = [runs[:, i].reshape(-1, rows.shape[-1]) for i in (0, 1)]
                layer[name] = mx.concatenate(halves)
        layer.gate_up_interleaved = on
        mx.eval(layer.parameters())
    set_compiled_blocks(model, True)


def part_epilogues(
    model: Any, args: Any, rows: list[int], length: int, steps: int, repeats: int
) -> None:
    """The fused 4-bit kernel's epilogues and folded norm (`kernels/quantized_linear.py`):
    residual adds on o_proj (reading attention's (B, heads, 1, D) output as it is) and
    down_proj, the norm before q/k/v, the norm + SwiGLU on the interleaved gate_up_proj. Their
    largest error against the same kernel without them followed by MLX's operations, and against
    `reference_fused_matmul` (MLX's operations on the stock matmul); the graph's node count at
    one row; then steps with and without them (compiled blocks with the head kernel, fused
    kernel at one row as served)."""
    import mlx.core as mx

    from mlx_llm_server.kernels.quantized_linear import (
        NORM_MAX_ROWS,
        apply_epilogue,
        fused_quantized_matmul,
        reference_fused_matmul,
        set_one_row_fused,
    )

    print(f"\n## 10. Fused matmul epilogues and norms, KV length {length}\n", flush=True)
    set_epilogues(model, True)
    block = model.model.layers[0].block  # compiled now
    attention, mlp = block.self_attn, block.mlp
    dtype = model.model.norm.weight.dtype
    cases = {  # layer, epilogue, norm folded in, input as attention's heads
        "o_proj + residual, (B, heads, 1, D) input": (attention.o_proj, "residual", None, True),
        "down_proj + residual": (mlp.down_proj, "residual", None, False),
        "input norm + qkv_proj": (attention.qkv_proj, "none", block.input_layernorm, False),
        "gate_up_proj, SwiGLU": (mlp.gate_up_proj, "swiglu", None, False),
        "norm + gate_up_proj, SwiGLU": (
            mlp.gate_up_proj,
            "swiglu",
            block.post_attention_layernorm,
            False,
        ),
    }
    print("| layer, what is fused | rows | vs the kernel + MLX ops | vs stock matmul + MLX ops |")
    print("|---|---|---:|---:|")
    for name, (layer, epilogue, norm, as_heads) in cases.items():
        w, scales, biases = layer["weight"], layer["scales"], layer["biases"]
        k = w.shape[1] * 8
        norm_args = None if norm is None else (norm.weight, float(norm.eps))
        counts = [c for c in (1, 3, 8, 13, 33, 64) if norm is None or c <= NORM_MAX_ROWS]
        same, stock = 0.0, 0.0
        for count in counts:
            key = mx.random.key(count)
            x = (mx.random.normal((count, 1, k), key=key) * 2).astype(dtype)
            residual = None
            if epilogue == "residual":
                residual = (mx.random.normal((count, 1, w.shape[0]), key=key) * 4).astype(dtype)
            given = x.reshape(count, attention.n_heads, 1, -1) if as_heads else x
            kwargs = {"epilogue": epilogue, "residual": residual, "norm": norm_args}
            ours = fused_quantized_matmul(given, w, scales, biases, layer.group_size, **kwargs)
            normed = x if norm is None else norm(x)
            plain = fused_quantized_matmul(normed, w, scales, biases, layer.group_size)
            references = {
                "same": apply_epilogue(plain, epilogue, residual),
                "stock": reference_fused_matmul(
                    given, w, scales, biases, layer.group_size, **kwargs
                ),
            }
            a = ours.astype(mx.float32)
            for into, ref in references.items():
                b = ref.astype(mx.float32)
                assert a.shape == b.shape and not mx.isnan(a).any().item()
                err = (mx.abs(a - b).max() / mx.abs(b).max()).item()
                same, stock = (max(same, err), stock) if into == "same" else (same, max(stock, err))
        span = f"{counts[0]}-{counts[-1]}"
        print(f"| {name} | {span} | {same:.2e} | {stock:.2e} |", flush=True)
    set_one_row_fused(True)
    set_decode_kernel(model, True)
    settings = {
        "separate operations": (False, 0),
        "fused epilogues": (True, 0),
        "fused epilogues, folded norms": (True, NORM_MAX_ROWS),
    }
    settings_table(
        model,
        args,
        rows,
        length,
        steps,
        repeats,
        {n: lambda s=s: set_epilogues(model, *s) for n, s in settings.items()},
    )
    set_epilogues(model, True)
    set_compiled_blocks(model, False)
    set_one_row_fused(False)


def timed_ms(action: Callable[[], Any], repeats: int = 3) -> float:
    """Median ms of `action` from a synchronised device to its result evaluated."""
    import mlx.core as mx

    times = []
    for _ in range(repeats):
        mx.synchronize()
        started = time.perf_counter()
        mx.eval(action())
        mx.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def part_prefill(model: Any, args: Any, groups: list[tuple[int, int]], running: int) -> None:
    """Prefill of a group of prompts the way `Engine._prefill_group` runs it."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_llm_server.engine.batch import merge_caches

    print("\n## 11. Prefill of a group of prompts (ms; tokens/s of the body pass)\n", flush=True)
    print(
        "| prompts x tokens | body pass | prompt tokens/s | last token + sample | "
        f"join a {running}-row batch | body, stock matmul | body, dequant + cuBLAS | "
        "matmuls alone (dequant + cuBLAS) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    layers = accelerated_layers(model)
    vocab = args.vocab_size

    def fresh(count: int) -> list[Any]:
        return merge_caches([make_prompt_cache(model) for _ in range(count)])

    def body(count: int, tokens: int) -> list[Any]:
        cache = fresh(count)
        for layer in cache:
            layer.prepare(lengths=[tokens] * count, right_padding=[0] * count)
        ids = mx.random.randint(0, vocab, (count, tokens)).astype(mx.uint32)
        model(ids, cache=cache)
        mx.eval([layer.state for layer in cache])
        for layer in cache:
            layer.finalize()
        return cache

    def matmuls_alone(rows: int) -> float:
        from mlx_llm_server.kernels.quantized_linear import dequantize_matmul

        shapes = {}
        for name, layer in layers:
            if "layers." in name:
                shapes.setdefault(name.split(".")[-1], layer)
        x = {
            n: mx.random.normal((rows, s["weight"].shape[1] * 8)).astype(mx.bfloat16)
            for n, s in shapes.items()
        }
        mx.eval(x)

        def run() -> list[Any]:
            out = []
            for _ in range(args.num_hidden_layers):
                for n, s in shapes.items():
                    out.append(
                        dequantize_matmul(x[n], s["weight"], s["scales"], s["biases"], s.group_size)
                    )
            return out

        return timed_ms(run)

    running_cache = batch_caches(args, running, 256, 16, padded=True)

    def row(count: int, tokens: int) -> list[str]:
        body_ms = timed_ms(lambda: [layer.state for layer in body(count, tokens)])
        cells = [f"{count} x {tokens}", f"{body_ms:.1f}", f"{count * tokens / body_ms * 1e3:,.0f}"]
        cache = body(count, tokens)
        last = mx.zeros((count, 1), dtype=mx.uint32)
        sampled = timed_ms(lambda: mx.argmax(model(last, cache=cache)[:, -1, :], axis=-1))
        cells.append(f"{sampled:.1f}")

        def join() -> list[Any]:
            # As `DecodeBatch.add_batch` does; shallow copies keep the running batch as it was.
            states = []
            for target, theirs in zip(running_cache, body(count, tokens), strict=True):
                joined = copy.copy(target)
                joined.extend(theirs)
                states.append(joined.state)
            return states

        cells.append(f"{timed_ms(join) - body_ms:.1f}")
        for path in ("stock", "dequant"):
            for _, layer in layers:
                layer.force_path = path
            cells.append(f"{timed_ms(lambda: [c.state for c in body(count, tokens)]):.1f}")
        for _, layer in layers:
            layer.force_path = None
        cells.append(f"{matmuls_alone(count * tokens):.1f}")
        return cells

    for count, tokens in groups:
        print("| " + " | ".join(row(count, tokens)) + " |", flush=True)
        mx.clear_cache()


def per_call_us(action: Callable[[], Any], calls: int = 40) -> float:
    import mlx.core as mx

    mx.eval(action())  # first use
    mx.synchronize()
    started = time.perf_counter()
    mx.eval([action() for _ in range(calls)])
    mx.synchronize()
    return (time.perf_counter() - started) / calls * 1e6


def part_layer_ops(model: Any, args: Any, rows: int, length: int) -> None:
    import mlx.core as mx

    print(f"\n## 5. One layer's operations, {rows} rows, KV length {length} (us a call)\n")
    layer = model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    heads, kv_heads = args.num_attention_heads, args.num_key_value_heads
    head_dim = kv_shape(args, 1, 1)[3]
    bf16 = mx.bfloat16
    x = mx.random.normal((rows, 1, args.hidden_size), dtype=bf16)
    wide = mx.random.normal((rows, 1, args.intermediate_size), dtype=bf16)
    q = mx.random.normal((rows, heads, 1, head_dim), dtype=bf16)
    k_new = mx.random.normal((rows, kv_heads, 1, head_dim), dtype=bf16)
    keys = mx.random.normal((rows, kv_heads, length, head_dim), dtype=bf16)
    values = mx.random.normal((rows, kv_heads, length, head_dim), dtype=bf16)
    mask = mx.arange(length)[None, None, None, :] >= (mx.arange(rows) % 7)[:, None, None, None]
    offsets = mx.full((rows,), length, dtype=mx.int32)
    cache = plain_caches(args, rows, length, 64)[0]
    cache_batch = batch_caches(args, rows, length, 64, padded=True)[0]
    mx.eval(x, wide, q, k_new, keys, values, mask, offsets)
    scale = head_dim**-0.5
    head = getattr(model, "lm_head", None) or model.model.embed_tokens.as_linear
    sdpa = mx.fast.scaled_dot_product_attention
    # The projections the layer has: separate, or fused as the server serves them.
    projections = [
        (name, getattr(module, name))
        for module, names in (
            (attn, ("qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj")),
            (mlp, ("gate_up_proj", "gate_proj", "up_proj")),
        )
        for name in names
        if name in module
    ]
    ops: list[tuple[str, Callable[[], Any]]] = [
        ("input_layernorm (RMSNorm)", lambda: layer.input_layernorm(x)),
        *[(name, lambda p=proj: p(x)) for name, proj in projections],
        ("down_proj", lambda: mlp.down_proj(wide)),
        ("silu(gate) * up", lambda: mx.sigmoid(wide) * wide * wide),
        ("q_norm", lambda: attn.q_norm(q)),
        ("RoPE on q, one offset per row", lambda: attn.rope(q, offset=offsets)),
        ("attention, no mask", lambda: sdpa(q, keys, values, scale=scale)),
        ("attention, boolean mask", lambda: sdpa(q, keys, values, scale=scale, mask=mask)),
        ("KV update, plain cache", lambda: cache.update_and_fetch(k_new, k_new)),
        ("KV update, batch cache", lambda: cache_batch.update_and_fetch(k_new, k_new)),
        ("residual add", lambda: x + x),
        ("whole layer, plain cache", lambda: layer(x, None, KVCacheView(cache, length))),
        ("output head (lm_head)", lambda: head(x)),
        ("argmax over the vocabulary", lambda: mx.argmax(head(x), axis=-1)),
    ]
    for name, action in ops:
        print(f"| {name} | {per_call_us(action):.1f} |", flush=True)


class KVCacheView:
    """A plain cache reset to a fixed length before every use: repeated calls of a whole layer
    keep the same KV length instead of growing it."""

    def __init__(self, cache: Any, length: int) -> None:
        self._cache, self._length = cache, length

    @property
    def offset(self) -> int:
        return self._length

    def update_and_fetch(self, keys: Any, values: Any) -> Any:
        self._cache.offset = self._length
        return self._cache.update_and_fetch(keys, values)


def part_decode_kernel(args: Any, rows: int, length: int) -> None:
    import mlx.core as mx

    from mlx_llm_server.kernels.decode_attention import (
        batch_decode_attention,
        reference_decode_attention,
    )

    print("\n## 6. Decode-attention kernel against MLX's masked attention\n", flush=True)
    heads, kv_heads = args.num_attention_heads, args.num_key_value_heads
    head_dim = kv_shape(args, 1, 1)[3]
    scale = head_dim**-0.5
    worst = 0.0
    for dtype in (mx.bfloat16, mx.float16):
        for count in (1, 2, 8, rows):
            for kv_len in (1, 7, 640, 2049):
                cap = capacity_for(kv_len, 1)
                key = mx.random.key(count * 10_000 + kv_len)
                k1, k2, k3, k4 = mx.random.split(key, 4)
                q = mx.random.normal((count, heads, 1, head_dim), key=k1).astype(dtype)
                k = mx.random.normal((count, kv_heads, cap, head_dim), key=k2).astype(dtype)
                v = mx.random.normal((count, kv_heads, cap, head_dim), key=k3).astype(dtype)
                pad = mx.random.randint(0, kv_len, (count,), key=k4).astype(mx.int32)
                pad[0] = 0  # the oldest row has none
                kv, vv = k[..., :kv_len, :], v[..., :kv_len, :]  # views, as the cache gives
                ours = batch_decode_attention(q, kv, vv, pad, scale).astype(mx.float32)
                ref = reference_decode_attention(q, kv, vv, pad, scale).astype(mx.float32)
                err = (mx.abs(ours - ref).max() / mx.abs(ref).max()).item()
                assert not mx.isnan(ours).any().item(), "NaN from the kernel"
                worst = max(worst, err)
    print(f"| largest relative error (bf16 and f16; rows 1-{rows}; KV 1-2049) | {worst:.2e} |")
    q = mx.random.normal((rows, heads, 1, head_dim), dtype=mx.bfloat16)
    k = mx.random.normal((rows, kv_heads, length, head_dim), dtype=mx.bfloat16)
    pad = (mx.arange(rows) * 37 % (length // 2 + 1)).astype(mx.int32)
    mask = mx.arange(length)[None, None, None, :] >= pad[:, None, None, None]
    sdpa = mx.fast.scaled_dot_product_attention
    for name, action in (
        ("kernel (rows skip their padding)", lambda: batch_decode_attention(q, k, k, pad, scale)),
        ("MLX, boolean mask", lambda: sdpa(q, k, k, scale=scale, mask=mask)),
        ("MLX, no mask", lambda: sdpa(q, k, k, scale=scale)),
    ):
        print(f"| {name}, {rows} rows, KV {length} | {per_call_us(action):.1f} us |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path("/tmp/sb/model-qwen3-8b-4bit"))
    parser.add_argument("--tokenizer-dir", type=Path)
    parser.add_argument("--rows", default="1,64")
    parser.add_argument("--lengths", default="16,256,640")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--parts", default="6,1,2,3,4,5,7")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of part 8")
    parser.add_argument(
        "--groups",
        default="1x2048,15x136,30x136,60x136",
        help="part 11: prompts x tokens of each prefill group",
    )
    args = parser.parse_args()
    model, model_args = load_model(args.model, args.tokenizer_dir)
    rows = [int(r) for r in args.rows.split(",")]
    lengths = [int(n) for n in args.lengths.split(",")]
    parts = {int(p) for p in args.parts.split(",")}
    if 6 in parts:
        part_decode_kernel(model_args, max(rows), max(lengths))
    if 1 in parts:
        part_steady(model, model_args, rows, lengths, args.steps)
    if 2 in parts:
        part_churn(model, model_args, max(rows), max(lengths))
    if 3 in parts:
        part_sampling(max(rows), model_args.vocab_size)
    if 4 in parts:
        part_one_row_paths(model, model_args, 256, args.steps)
    if 5 in parts:
        part_layer_ops(model, model_args, max(rows), max(lengths))
    if 7 in parts:
        part_batch_paths(model, model_args, [r for r in rows if r > 1], max(lengths), args.steps)
    if 8 in parts:
        part_compiled_blocks(model, model_args, rows, max(lengths), args.steps, args.repeats)
    if 9 in parts:
        part_head_rope(model, model_args, rows, max(lengths), args.steps, args.repeats)
    if 10 in parts:
        part_epilogues(model, model_args, rows, max(lengths), args.steps, args.repeats)
    if 11 in parts:
        groups = [tuple(int(n) for n in g.split("x")) for g in args.groups.split(",")]
        part_prefill(model, model_args, groups, max(rows))  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
