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


def graph_build_split(model: object, steps: int = 48) -> str:
    """One stream, plain cache, no pipelining: median ms to build a step's graph in Python,
    and to evaluate it (encoding the kernels on the host plus running them)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([list(range(100, 164))]), cache=cache))  # type: ignore[operator]
    token = mx.array([[7]])
    builds, evals = [], []
    for _ in range(steps):
        started = time.perf_counter()
        logits = model(token, cache=cache)  # type: ignore[operator]
        token = mx.argmax(logits[:, -1, :], axis=-1, keepdims=True)
        built = time.perf_counter()
        mx.eval(token)
        builds.append(built - started)
        evals.append(time.perf_counter() - built)
    return (
        f"build {statistics.median(builds[8:]) * 1000:.2f} ms, "
        f"evaluate {statistics.median(evals[8:]) * 1000:.2f} ms per step"
    )


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


async def first_token_seconds(engine: object, tag: str, prompt: list[int]) -> float:
    from mlx_llm_server.engine.types import GenerationRequest, SamplingParams, TokenEvent

    request = GenerationRequest(tag, prompt, 1, SamplingParams(temperature=0.0), frozenset())
    started = time.perf_counter()
    async for event in engine.submit(request):  # type: ignore[attr-defined]
        if isinstance(event, TokenEvent):
            return time.perf_counter() - started
    return float("nan")


async def probe_shapes(engine: object) -> None:
    """Shapes the warm-up never ran: new prompt lengths (twice each: a stall shows as a first
    run much slower than the second), a growing conversation, and one long decode crossing
    KV-cache growth boundaries (every 256 tokens)."""
    base = 20_000
    for length in (37, 100, 333, 777, 1500, 3000):
        runs = []
        for repeat in range(2):
            start = base + 7919 * (length + repeat)
            prompt = [(start + i) % 150_000 for i in range(length)]
            runs.append(await first_token_seconds(engine, f"len{length}-{repeat}", prompt))
        print(
            f"  new prompt length {length:5}: TTFT first {runs[0] * 1000:7.1f} ms, "
            f"again {runs[1] * 1000:7.1f} ms",
            flush=True,
        )
    conversation = [(base + 3 * i) % 150_000 for i in range(300)]
    turns = []
    for turn in range(8):
        turns.append(await first_token_seconds(engine, f"turn{turn}", list(conversation)))
        conversation += [(base + 11 * turn + i) % 150_000 for i in range(57 + 13 * turn)]
    print("  growing conversation TTFT ms: " + " ".join(f"{t * 1000:.0f}" for t in turns))
    stamps: list[float] = []
    await decode_one(engine, "long", 0, 700, 400, stamps)
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    slow = sorted(range(len(gaps)), key=lambda i: -gaps[i])[:4]
    print(
        f"  one stream, 700 tokens: median step {statistics.median(gaps) * 1000:.1f} ms, "
        "slowest " + ", ".join(f"{gaps[i] * 1000:.0f} ms at token {i + 1}" for i in sorted(slow)),
        flush=True,
    )


class StepClock:
    """Splits the engine's decode step into building the next step's graph (host work) and
    waiting for the tokens of the step before (the device, or a host behind it)."""

    def __init__(self) -> None:
        from mlx_llm_server.engine.batch import DecodeBatch

        self.step_seconds = 0.0
        self.read_seconds = 0.0
        self.steps = 0
        step, read = DecodeBatch.step, DecodeBatch._read
        clock = self

        def timed_step(batch: DecodeBatch) -> list:
            started = time.perf_counter()
            try:
                return step(batch)
            finally:
                clock.step_seconds += time.perf_counter() - started
                clock.steps += 1

        def timed_read(batch: DecodeBatch, output: object) -> list:
            started = time.perf_counter()
            try:
                return read(batch, output)
            finally:
                clock.read_seconds += time.perf_counter() - started

        DecodeBatch.step = timed_step  # type: ignore[method-assign]
        DecodeBatch._read = timed_read  # type: ignore[method-assign]

    def reset(self) -> None:
        self.step_seconds = self.read_seconds = 0.0
        self.steps = 0

    def summary(self) -> str:
        steps = max(self.steps, 1)
        build = (self.step_seconds - self.read_seconds) / steps * 1000
        return f"build {build:.2f} ms + wait {self.read_seconds / steps * 1000:.2f} ms per step"


def engine_decode(
    folder: Path,
    batches: list[int],
    steps: int,
    accelerate: bool,
    compiled: bool = False,
    skip_probes: bool = False,
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
            if compiled:
                from mlx_llm_server.kernels.compiled_decode import compile_decode_blocks

                print(f"  compiled blocks: {compile_decode_blocks(loaded.model)}", flush=True)
            return EngineModel(loaded.model, loaded.vocab_size)

        started = time.perf_counter()
        await asyncio.wrap_future(engine.start(setup))
        print(
            f"  engine ready in {time.perf_counter() - started:.1f}s "
            f"(warm-up {engine.warm_up_seconds:.1f}s)",
            flush=True,
        )
        clock = StepClock()
        for batch in batches:
            stamps: list[float] = []
            clock.reset()
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
                f"slowest {max(gaps) * 1000:7.1f} ms, wall {wall:.1f}s; {clock.summary()}",
                flush=True,
            )
        if not skip_probes:
            await probe_shapes(engine)
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
    parser.add_argument("--compiled", choices=["no", "yes", "both"], default="yes")
    parser.add_argument("--skip-probes", action="store_true")
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        from serve_bench import build_model

        build_model("qwen3-8b-4bit", args.model, args.tokenizer_dir)
    from mlx_lm import load

    model, _ = load(str(args.model))
    print(
        f"raw mlx-lm generate_step, 1 stream: {raw_generate_step(model, 128):.1f} tok/s; "
        f"unpipelined {graph_build_split(model)}",
        flush=True,
    )
    import mlx.core as mx

    if mx.cuda.is_available():
        from mlx_llm_server.kernels.quantized_linear import accelerate_quantized_layers

        accelerate_quantized_layers(model)
        print(
            f"raw generate_step, accelerated layers: {raw_generate_step(model, 128):.1f} tok/s; "
            f"unpipelined {graph_build_split(model)}",
            flush=True,
        )
    from mlx_llm_server.kernels.compiled_decode import compile_decode_blocks

    compile_decode_blocks(model)
    print(
        f"raw generate_step, compiled blocks: {raw_generate_step(model, 128):.1f} tok/s; "
        f"unpipelined {graph_build_split(model)}",
        flush=True,
    )
    del model
    batches = [int(b) for b in args.batches.split(",")]
    modes = {"no": [False], "yes": [True], "both": [False, True]}[args.accelerate]
    for accelerate in modes:
        for compiled in {"no": [False], "yes": [True], "both": [False, True]}[args.compiled]:
            print(
                f"engine, accelerated quantized matmul: {accelerate}, compiled blocks: {compiled}",
                flush=True,
            )
            engine_decode(args.model, batches, args.steps, accelerate, compiled, args.skip_probes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
