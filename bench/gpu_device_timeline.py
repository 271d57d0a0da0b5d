"""Where a decode step's device time goes, read from the device's own clock, in the engine alone.

No profiler reaches the device machine, so this puts one: a one-thread kernel that stores the
device's nanosecond clock (`%globaltimer`) once one array is ready, and which the next
operation waits for, so it runs as soon as whatever produced that array has finished. Stamps go after each decode block's three parts
(norm + q/k/v projection + q/k norms and RoPE; the KV-cache writes + attention; o_proj + MLP)
and after each step's sampled tokens. Differences between consecutive stamps are device time
between those points, gaps included; the gap before a step's first block is the device waiting
for the host to hand it the step.

The engine is started as the server starts it (`cli.model_starter`) and serves rounds of users
as `gpu_prefill_round.py` does (each round first without stamps, then with, so the stamps' own
cost shows; `with block stamps` puts one a block, `with part stamps` three). For each stamped
round it prints, per decode step (median over steps of the most
common row count): the device span from one step's tokens to the next, the gap before its
first block, each block part summed over the blocks, and the tail (final norm, head, sampling).

    python bench/gpu_device_timeline.py --tokenizer-dir .gpu/tokenizer --rounds 1x136,64x136
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

_CLOCK_SOURCE = r"""
  if (threadIdx.x == 0) {
    unsigned long long now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    clock[0] = now;
  }
"""


class DeviceClock:
    """Stamps arrays with the device time at which they were ready.

    Each stamp is made a dependency of what follows it (`mx.depends`): otherwise MLX queues the
    stamps wherever its graph order puts them, and they run at once, long after what they wait
    for (tried: every stamp of a step within a few microseconds). They are read back on the
    engine thread (MLX's streams belong to the thread that made them) at its first decode step
    after the stamped round, so reading costs the round nothing.
    """

    def __init__(self) -> None:
        import mlx.core as mx

        self.mx = mx
        self.enabled = False
        self.blocks_only = False  # one stamp a block (after its MLP), not three
        self.in_step = False
        self.step = -1
        self.rows = 0
        self.current: list[tuple[str, Any]] = []
        self.unread: list[tuple[int, int, list[tuple[str, Any]]]] = []
        self.read: dict[int, tuple[int, dict[str, list[int]]]] = {}
        self.kernels: dict[Any, Any] = {}

    def _kernel(self, dtype: Any) -> Any:
        # One kernel name per input type: MLX keeps a compiled kernel under its name alone,
        # and the kernel's signature differs with the type of what it waits for.
        if dtype not in self.kernels:
            self.kernels[dtype] = self.mx.fast.cuda_kernel(
                name=f"device_clock_stamp_{str(dtype).rsplit('.', 1)[-1]}",
                input_names=["after"],
                output_names=["clock"],
                source=_CLOCK_SOURCE,
                ensure_row_contiguous=False,  # no copy of what it waits for
            )
        return self.kernels[dtype]

    def stamp(self, label: str, after: Any) -> Any:
        """`after`, made to wait for a stamp of the time it was ready."""
        if not self.enabled or (self.blocks_only and label in ("qkv", "attention")):
            return after
        waited = after[0] if isinstance(after, (list, tuple)) else after
        (clock,) = self._kernel(waited.dtype)(
            inputs=[waited],
            grid=(32, 1, 1),
            threadgroup=(32, 1, 1),
            output_shapes=[(1,)],
            output_dtypes=[self.mx.uint64],
        )
        self.current.append((label, clock))
        return self.mx.depends(after, clock)

    def begin_step(self, rows: int) -> None:
        self.step += 1
        self.rows = rows
        self.current = []

    def finish_step(self) -> None:
        self.unread.append((self.step, self.rows, self.current))
        self.current = []

    def read_back(self) -> None:
        """Reads every kept stamp (on the engine thread)."""
        for step, rows, stamps in self.unread:
            labels: dict[str, list[int]] = defaultdict(list)
            for label, clock in stamps:
                labels[label].append(int(clock.item()))
            self.read[step] = (rows, labels)
        self.unread = []

    def collect(self) -> dict[int, tuple[int, dict[str, list[int]]]]:
        """step -> (rows, label -> clock readings in order), nanoseconds."""
        read, self.read = self.read, {}
        return read


def install(clock: DeviceClock) -> None:
    """Wraps decode steps, their evaluation and compiled decode blocks to stamp their parts."""
    from mlx_llm_server.engine import batch as batch_module
    from mlx_llm_server.kernels import compiled_decode
    from mlx_llm_server.kernels.compiled_decode import _CACHES, _offset_array

    step, evaluate = batch_module.DecodeBatch.step, batch_module.evaluate

    def stamped_step(self: Any) -> Any:
        if not clock.enabled:
            if clock.unread:
                clock.read_back()
            return step(self)
        clock.begin_step(len(self.sequences))
        # The previous step's tokens: its end, or when this step reached the device.
        self.pending.tokens = clock.stamp("start", self.pending.tokens)
        clock.in_step = True
        try:
            return step(self)
        finally:
            clock.in_step = False
            clock.finish_step()

    def stamped_evaluate(*arrays: Any, wait: bool = True) -> None:
        if clock.enabled and clock.in_step:
            first = arrays[0][0] if isinstance(arrays[0], list) else arrays[0]
            clock.stamp("end", first)  # the sampled tokens (nothing follows in this step)
            arrays = ([c for _, c in clock.current], *arrays)
        evaluate(*arrays, wait=wait)

    batch_module.DecodeBatch.step = stamped_step  # type: ignore[method-assign]
    batch_module.evaluate = stamped_evaluate  # type: ignore[assignment]
    call = compiled_decode.CompiledDecodeBlock.__call__

    def stamped_block(self: Any, x: Any, mask: Any = None, cache: Any = None) -> Any:
        decoding = (
            clock.in_step
            and x.shape[1] == 1
            and type(cache) in _CACHES
            and (self.max_rows is None or x.shape[0] <= self.max_rows)
        )
        if not decoding:
            return call(self, x, mask, cache)
        # The block's own decode path, with a stamp after each part.
        mx = clock.mx
        queries, keys, values = self._before(x, _offset_array(cache.offset))
        queries, keys, values = clock.stamp("qkv", [queries, keys, values])
        keys, values = cache.update_and_fetch(keys, values)
        attention = self.block.self_attn
        attend = getattr(attention, "attend", None)
        if attend is not None:
            attended = attend(queries, keys, values, mask, cache)
        else:
            attended = mx.fast.scaled_dot_product_attention(
                queries, keys, values, scale=attention.scale, mask=mask
            )
        attended = clock.stamp("attention", attended)
        return clock.stamp("mlp", self._after(x, attended))

    compiled_decode.CompiledDecodeBlock.__call__ = stamped_block  # type: ignore[method-assign]


def report(steps: dict[int, tuple[int, dict[str, list[int]]]], skip: int) -> None:
    """Per-step medians over the steps of the most common row count."""
    usable = {s: v for s, v in steps.items() if v[1].get("start") and v[1].get("mlp")}
    ordered = sorted(usable)[skip:]
    if len(ordered) < 3:
        print("too few stamped steps")
        return
    rows = Counter(usable[s][0] for s in ordered).most_common(1)[0][0]
    cells: dict[str, list[float]] = defaultdict(list)
    per_block: dict[str, list[float]] = defaultdict(list)
    for s in ordered:
        count, labels = usable[s]
        if count != rows or s + 1 not in usable:
            continue
        start, end = labels["start"][0], labels["end"][0]
        mlp = labels["mlp"]
        blocks = len(mlp)
        following = usable[s + 1][1]["start"][0]  # when the next step reached the device
        ends = [start, *mlp[:-1]]  # what each block starts after
        if "qkv" in labels:
            qkv, att = labels["qkv"], labels["attention"]
            parts = {
                "q/k/v + heads": [q - e for q, e in zip(qkv, ends, strict=True)],
                "cache write + attention": [a - q for a, q in zip(att, qkv, strict=True)],
                "o_proj + MLP": [m - a for m, a in zip(mlp, att, strict=True)],
            }
        else:
            parts = {"whole block": [m - e for m, e in zip(mlp, ends, strict=True)]}
        first = next(iter(parts))
        cells["step span (tokens to tokens)"].append((end - start) / 1e3)
        cells["next step's gap"].append((following - end) / 1e3)
        for name, values in parts.items():
            cells[f"{name}, all {blocks} blocks"].append(sum(values) / 1e3)
            per_block[name].extend(v / 1e3 for v in values[1:])  # block 0 holds the embedding
        cells[f"first block's {first} incl. embedding"].append(parts[first][0] / 1e3)
        cells["tail: norm, head, sampling"].append((end - mlp[-1]) / 1e3)
    print(
        f"{len(cells['step span (tokens to tokens)'])} steps of {rows} rows; median (p10, p90) us"
    )
    print("| part | median | p10 | p90 |")
    print("|---|---:|---:|---:|")
    for name, values in [*cells.items(), *((f"{k}, one block", v) for k, v in per_block.items())]:
        ordered_values = sorted(values)
        p10 = ordered_values[int(0.1 * (len(values) - 1))]
        p90 = ordered_values[int(0.9 * (len(values) - 1))]
        print(f"| {name} | {statistics.median(values):,.1f} | {p10:,.1f} | {p90:,.1f} |")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path("/tmp/sb/model-qwen3-8b-4bit"))
    parser.add_argument("--tokenizer-dir", type=Path)
    parser.add_argument("--rounds", default="1x136,64x136", help="users x prompt tokens")
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--skip-steps", type=int, default=8, help="first steps of a round left out")
    parser.add_argument("--server-arg", action="append", default=[])
    args = parser.parse_args()
    from gpu_prefill_round import PassLog, run_round, start_engine

    from mlx_llm_server.cli import exit_without_teardown

    clock = DeviceClock()
    install(clock)
    log = PassLog()
    served = start_engine(args.model, args.tokenizer_dir, args.server_arg)
    rounds = [tuple(int(n) for n in r.split("x")) for r in args.rounds.split(",")]

    async def everything() -> None:
        seed = 0
        for users, length in rounds:
            for stamped, blocks_only in ((False, False), (True, True), (True, False)):
                clock.enabled, clock.blocks_only, clock.step = stamped, blocks_only, -1
                kind = "block" if blocks_only else "part"
                print(f"\n{f'with {kind} stamps' if stamped else 'without stamps'}:", end="")
                await run_round(served.engine, log, users, length, args.output_tokens, 0.0, seed)
                seed += 1
                if stamped:
                    clock.enabled = False
                    # A short request whose decode step reads the stamps back.
                    await run_round(served.engine, log, 1, 16, 3, 0.0, 10_000 + seed)
                    report(clock.collect(), args.skip_steps)

    asyncio.run(everything())
    served.engine.stop()
    sys.stdout.flush()
    exit_without_teardown(0)  # as the server exits: MLX's device state is not torn down
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
