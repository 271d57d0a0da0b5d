"""A round of many users arriving together, in the engine alone (no HTTP), on the device.

Starts the engine exactly as the server does (`cli.model_starter`: fused projections,
accelerated 4-bit layers, compiled decode blocks, warm-up), then submits N requests of L
distinct prompt tokens each, all at once or spread evenly over `--spread-ms`, each generating
T tokens, and prints for every round: aggregate output tokens/s, TTFT p50 / p99, the engine's
prefill and decode seconds, and each prefill pass (prompts, tokens, ms in the call and how much
of it was spent waiting for the device). The serving benchmark's figures at 64 streams include
HTTP and the clients; this separates what the engine itself spends.

    python bench/gpu_prefill_round.py --tokenizer-dir .gpu/tokenizer --rounds 64x136,64x136
    python bench/gpu_prefill_round.py --server-arg=--prefill-chunk --server-arg=8192
    python bench/gpu_prefill_round.py --model smollm2 --rounds 8x64 --variants default,two-pass
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))


class PassLog:
    """Wraps the engine's prefill passes and its synchronous evaluations to time them."""

    def __init__(self) -> None:
        from mlx_llm_server.engine import engine as engine_module

        self.passes: list[tuple[str, int, int, float, float]] = []
        self.waited = 0.0
        evaluate = engine_module.evaluate
        log = self

        def timed_evaluate(*arrays: Any, wait: bool = True) -> None:
            started = time.perf_counter()
            try:
                evaluate(*arrays, wait=wait)
            finally:
                if wait:
                    log.waited += time.perf_counter() - started

        engine_module.evaluate = timed_evaluate  # type: ignore[assignment]
        group, chunk = engine_module.Engine._prefill_group, engine_module.Engine._prefill_chunk

        def timed_group(engine: Any, sequences: list[Any]) -> Any:
            tokens = sum(s.prompt_len - s.prefilled for s in sequences)
            return log._time("group", len(sequences), tokens, lambda: group(engine, sequences))

        def timed_chunk(engine: Any, sequence: Any, budget: int) -> Any:
            tokens = min(budget, sequence.prompt_len - sequence.prefilled)
            return log._time("alone", 1, tokens, lambda: chunk(engine, sequence, budget))

        engine_module.Engine._prefill_group = timed_group  # type: ignore[method-assign]
        engine_module.Engine._prefill_chunk = timed_chunk  # type: ignore[method-assign]

    def _time(self, kind: str, prompts: int, tokens: int, call: Any) -> Any:
        waited, started = self.waited, time.perf_counter()
        try:
            return call()
        finally:
            spent = time.perf_counter() - started
            self.passes.append((kind, prompts, tokens, spent, self.waited - waited))


async def one_request(engine: Any, tag: str, prompt: list[int], tokens: int) -> tuple[float, int]:
    from mlx_llm_server.engine.types import GenerationRequest, SamplingParams, TokenEvent

    request = GenerationRequest(tag, prompt, tokens, SamplingParams(temperature=0.0))
    started = time.perf_counter()
    first, count = float("nan"), 0
    async for event in engine.submit(request):
        if isinstance(event, TokenEvent):
            if count == 0:
                first = time.perf_counter() - started
            count += 1
    return first, count


async def run_round(
    engine: Any, log: PassLog, users: int, length: int, tokens: int, spread: float, seed: int
) -> None:
    async def user(i: int) -> tuple[float, int]:
        await asyncio.sleep(spread * i / max(users - 1, 1))
        start = 1000 + seed * 100_003 + i * 1_009
        # Ids of this model's vocabulary (MLX's CPU gather does not check the range).
        prompt = [(start + 7 * j) % min(engine.vocab_size, 150_000) for j in range(length)]
        return await one_request(engine, f"r{seed}-{i}", prompt, tokens)

    before = engine.stats()
    log.passes.clear()
    started = time.perf_counter()
    results = await asyncio.gather(*(user(i) for i in range(users)))
    wall = time.perf_counter() - started
    after = engine.stats()
    ttfts = sorted(r[0] for r in results)
    produced = sum(r[1] for r in results)
    p99 = ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))]
    prefill = after.prefill_seconds - before.prefill_seconds
    decode = after.decode_seconds - before.decode_seconds
    waited = after.decode_wait_seconds - before.decode_wait_seconds
    queued = after.decode_launch_seconds - before.decode_launch_seconds
    steps = after.decode_steps - before.decode_steps
    rows = (after.decode_rows - before.decode_rows) / max(steps, 1)
    print(
        f"\n{users} x {length} tokens, {tokens} out, spread {spread * 1e3:.0f} ms: "
        f"{produced / wall:,.1f} tok/s over {wall:.2f} s; TTFT p50 {statistics.median(ttfts):.3f} "
        f"p99 {p99:.3f} s; engine prefill {prefill:.2f} s, decode {decode:.2f} s in {steps} steps "
        f"({decode / max(steps, 1) * 1e3:.1f} ms: {waited / max(steps, 1) * 1e3:.1f} waiting on "
        f"the device, {queued / max(steps, 1) * 1e3:.1f} queuing steps on it; {rows:.1f} rows)",
        flush=True,
    )
    print("| pass | prompts | tokens | ms | of which waiting |")
    print("|---|---:|---:|---:|---:|")
    for index, (kind, prompts, count, spent, waited) in enumerate(log.passes):
        print(f"| {index} {kind} | {prompts} | {count} | {spent * 1e3:.1f} | {waited * 1e3:.1f} |")
    total = sum(p[3] for p in log.passes)
    print(
        f"| all {len(log.passes)} | | | {total * 1e3:.1f} | {sum(p[4] for p in log.passes) * 1e3:.1f} |"
    )


@contextlib.contextmanager
def engine_variant(engine: Any, variant: str) -> Iterator[None]:
    """Applies one round's setting to the running engine, and restores it after."""
    import mlx.core as mx

    config, clear, head = engine.config, mx.clear_cache, engine._head
    if variant.startswith("chunk"):
        engine.config = dataclasses.replace(config, prefill_chunk=int(variant[len("chunk") :]))
    elif variant == "keep-cache":
        mx.clear_cache = lambda: None  # the engine calls it through the module
    elif variant == "two-pass":
        engine._head = None  # each prompt's last token in a pass of its own, as mlx-lm does
    elif variant != "default":
        raise SystemExit(f"unknown variant {variant!r}")
    try:
        yield
    finally:
        engine.config, mx.clear_cache, engine._head = config, clear, head


def start_engine(model: Path, tokenizer_dir: Path | None, server_args: list[str]) -> Any:
    """The engine as the server starts it (`cli.model_starter`), on `model` (the Qwen3-8B-shaped
    4-bit model is built there first if missing); returns the served model."""
    from mlx_llm_server.models.builtin import BUILTIN_MODELS

    built = model.is_file() or (model / "config.json").exists() or str(model) in BUILTIN_MODELS
    if not built:
        from serve_bench import build_model

        build_model("qwen3-8b-4bit", model, tokenizer_dir)
    from mlx_llm_server.cli import build_parser, model_starter
    from mlx_llm_server.model_setup import apply_cuda_defaults, limit_buffer_cache
    from mlx_llm_server.pool import ModelSpec

    # The engine on a thread of this process: these scripts read its state directly.
    options = ["--model-name", str(model), "--no-engine-process", *server_args]
    parsed = build_parser().parse_args(options)
    apply_cuda_defaults()
    limit_buffer_cache(parsed.buffer_cache_gb)
    started = time.perf_counter()
    served = model_starter(parsed, {})(ModelSpec(str(model), str(model)))
    print(f"engine ready in {time.perf_counter() - started:.1f} s", flush=True)
    return served


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path("/tmp/sb/model-qwen3-8b-4bit"))
    parser.add_argument("--tokenizer-dir", type=Path)
    parser.add_argument("--rounds", default="64x136,64x136", help="users x prompt tokens")
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--spread-ms", default="0", help="arrival spread of each round")
    parser.add_argument(
        "--variants",
        default="default",
        help="engine settings per round, comma-separated: default, chunkN (a prefill chunk of "
        "N tokens), keep-cache (MLX's buffer cache not emptied after prefill passes), "
        "two-pass (a prompt's last token in a forward pass of its own)",
    )
    parser.add_argument("--server-arg", action="append", default=[])
    args = parser.parse_args()
    from mlx_llm_server.cli import exit_without_teardown

    log = PassLog()
    served = start_engine(args.model, args.tokenizer_dir, args.server_arg)
    rounds = [tuple(int(n) for n in r.split("x")) for r in args.rounds.split(",")]
    spreads = [float(s) / 1e3 for s in args.spread_ms.split(",")]

    async def everything() -> None:
        cases = [(r, s, v) for r in rounds for s in spreads for v in args.variants.split(",")]
        for seed, ((users, length), spread, variant) in enumerate(cases):  # distinct prompts
            with engine_variant(served.engine, variant):
                print(f"\nvariant: {variant}", end="")
                await run_round(served.engine, log, users, length, args.output_tokens, spread, seed)

    asyncio.run(everything())
    served.engine.stop()
    sys.stdout.flush()
    exit_without_teardown(0)  # as the server exits: MLX's device state is not torn down
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
