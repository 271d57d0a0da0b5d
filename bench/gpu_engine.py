"""The engine without HTTP, on the device: raw mlx-lm decode against ours, per batch size.

Builds a Qwen3-8B-shaped 4-bit model (random weights; see serve_bench.build_model), then prints:
mlx-lm's `generate_step` tokens/s for one stream (the raw reference), and our engine's decode
tokens/s at each batch size (all sequences decoding, steady state), with the slowest step of
each run (a compile stall shows up there), for the stock quantized matmul and, where it applies,
the accelerated one (`kernels.quantized_linear.accelerate_quantized_layers`).

    python bench/gpu_engine.py --tokenizer-dir .gpu/tokenizer --batches 1,8,32,64
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))


def raw_generate_step(model: object, steps: int) -> float:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    prompt = mx.array(list(range(100, 164)))
    for _ in generate_step(prompt, model, max_tokens=8):  # warm
        pass
    started = time.perf_counter()
    count = 0
    for _ in generate_step(prompt, model, max_tokens=steps):
        count += 1
    return count / (time.perf_counter() - started)


async def decode_one(
    engine: object, tag: str, i: int, steps: int, first_token: int, stamps: list[float]
) -> None:
    """One greedy request of 64 prompt tokens; the first one records when its tokens arrive."""
    from mlx_llm_server.engine.types import GenerationRequest, SamplingParams, TokenEvent

    request = GenerationRequest(
        f"{tag}-{i}",
        list(range(first_token + i, first_token + 64 + i)),
        steps,
        SamplingParams(temperature=0.0),
        frozenset(),
    )
    async for event in engine.submit(request):  # type: ignore[attr-defined]
        if isinstance(event, TokenEvent) and i == 0:
            stamps.append(time.perf_counter())


def engine_decode(
    folder: Path, batches: list[int], steps: int, accelerate: bool
) -> list[tuple[int, float, float, float]]:
    from mlx_llm_server.engine.engine import Engine, EngineConfig, EngineModel
    from mlx_llm_server.models.loader import load

    results = []

    async def run() -> None:
        engine = Engine(EngineConfig(max_running=max(batches), prefill_chunk=512))

        def setup() -> EngineModel:
            loaded = load(str(folder))
            if accelerate:
                from mlx_llm_server.kernels.quantized_linear import accelerate_quantized_layers

                print(
                    f"  accelerated layers: {accelerate_quantized_layers(loaded.model)}", flush=True
                )
            return EngineModel(loaded.model, loaded.vocab_size)

        started = time.perf_counter()
        await asyncio.wrap_future(engine.start(setup))
        print(
            f"  engine ready in {time.perf_counter() - started:.1f}s "
            f"(warm-up {engine.warm_up_seconds:.1f}s)",
            flush=True,
        )
        for batch in batches:
            stamps: list[float] = []
            t0 = time.perf_counter()
            await asyncio.gather(
                *(decode_one(engine, f"b{batch}", i, steps, 200, stamps) for i in range(batch))
            )
            wall = time.perf_counter() - t0
            gaps = [b - a for a, b in itertools.pairwise(stamps[8:])]  # steady state
            step = statistics.median(gaps)
            results.append((batch, batch / step, max(gaps), wall))
            print(
                f"  batch {batch:3}: {batch / step:8.1f} tok/s steady, step {step * 1000:6.1f} ms, "
                f"slowest {max(gaps) * 1000:7.1f} ms, wall {wall:.1f}s",
                flush=True,
            )
        # Odd batch sizes after warm-up: a compile on the request path would stall a step here.
        for batch in (3, 5, 12, 27):
            if batch > max(batches):
                continue
            stamps = []
            await asyncio.gather(
                *(
                    decode_one(engine, f"odd{batch}", i, steps // 2, 300, stamps)
                    for i in range(batch)
                )
            )
            gaps = [b - a for a, b in itertools.pairwise(stamps)]
            print(
                f"  odd batch {batch:3}: slowest step {max(gaps) * 1000:7.1f} ms, "
                f"median {statistics.median(gaps) * 1000:6.1f} ms",
                flush=True,
            )
        engine.stop()

    asyncio.run(run())
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path("/tmp/sb/model-qwen3-8b-4bit"))
    parser.add_argument("--tokenizer-dir", type=Path)
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--accelerate", choices=["no", "yes", "both"], default="both")
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        from serve_bench import build_model

        build_model("qwen3-8b-4bit", args.model, args.tokenizer_dir)
    from mlx_lm import load

    model, _ = load(str(args.model))
    print(
        f"raw mlx-lm generate_step, 1 stream: {raw_generate_step(model, 128):.1f} tok/s", flush=True
    )
    del model
    batches = [int(b) for b in args.batches.split(",")]
    modes = {"no": [False], "yes": [True], "both": [False, True]}[args.accelerate]
    for accelerate in modes:
        print(f"engine, accelerated quantized matmul: {accelerate}", flush=True)
        engine_decode(args.model, batches, args.steps, accelerate)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
