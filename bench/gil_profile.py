"""Who holds the interpreter lock while the server streams: a py-spy sample of a live server.

Starts this server on a model folder, drives N streaming clients (serve_bench's clients), and
samples the server with `py-spy record --gil` (only the thread holding the GIL is sampled) while
they stream. Prints, per thread, the share of samples in which it held the lock, and the
functions it held it in. With `--wall`, every thread is sampled whatever it is doing (`--idle`):
where each thread's wall time goes, waiting for the lock or the device included; a function's
share there minus its share under `--gil` is time its thread spent in it without the lock.
With `--native`, C/C++ frames are sampled too (MLX, the CUDA driver): `--under FRAME` then prints
the tree of the engine thread's stacks below a frame, e.g. what `mlx::core::async_eval` spends its
time on (MLX's wait for its queue of unfinished work shows as `pthread_cond_wait` directly under
it). `--summarize FILE` reads a raw file saved before instead of starting a server.
Needs `py-spy` on PATH and permission to trace the server.

    python bench/gil_profile.py --model /tmp/sb/model-qwen3-8b-4bit --clients 1,64 [--wall]
    python bench/gil_profile.py --model ... --clients 1,64 --wall --native --under mlx::core::async_eval
    python bench/gil_profile.py --summarize prof.txt --wall --under mlx::core::async_eval
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from serve_bench import Server, free_port, run_round  # noqa: E402


def summarize(raw: Path, top: int, expected: int, wall: bool = False) -> None:
    """py-spy's raw output: one `thread;frame;...;frame count` line per distinct stack."""
    per_thread: collections.Counter[str] = collections.Counter()
    frames: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        parts = stack.split(";")
        thread = parts[0].split(":")[-1].strip() or parts[0]
        per_thread[thread] += int(count)
        for frame in set(parts[1:]):
            frames[thread][frame] += int(count)
    total = max(expected, 1)
    held = sum(per_thread.values())
    if not wall:
        print(f"  the lock was held in {100 * held / total:.1f}% of {expected} sampling instants")
    for thread, count in per_thread.most_common():
        print(f"  {thread}: {100 * count / total:.1f}%")
        # Frames on every stack of the thread (its entry points) say nothing: left out.
        shown = [(f, n) for f, n in frames[thread].most_common() if n < count][:top]
        for frame, n in shown:
            print(f"    {100 * n / total:5.1f}%  {frame[:140]}")


def tree(
    raw: Path, under: str, thread: str = "mlx-engine", depth: int = 8, floor: float = 1.5
) -> None:
    """The call tree of ``thread``'s stacks below the first frame holding ``under``, each node's
    share of those stacks' samples (nodes under ``floor`` percent left out)."""
    root: dict[str, list] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        parts = stack.split(";")
        if not stack or thread not in parts[0]:
            continue
        start = next((i for i, frame in enumerate(parts) if under in frame), None)
        if start is None:
            continue
        total += int(count)
        node = root
        for frame in parts[start : start + depth]:
            entry = node.setdefault(frame, [0, {}])
            entry[0] += int(count)
            node = entry[1]
    print(f"  {thread} below {under!r}: {total} samples")

    def show(node: dict[str, list], indent: int) -> None:
        for frame, (count, children) in sorted(node.items(), key=lambda item: -item[1][0]):
            if 100 * count / max(total, 1) >= floor:
                print(f"  {'  ' * indent}{100 * count / total:5.1f}%  {frame[:120]}")
                show(children, indent + 1)

    show(root, 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--clients", default="1,64")
    parser.add_argument("--output-tokens", type=int, default=384)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--top", type=int, default=14)
    parser.add_argument("--wall", action="store_true", help="every thread, not the lock's holder")
    parser.add_argument("--native", action="store_true", help="C/C++ frames too (MLX, CUDA)")
    parser.add_argument("--under", help="print the engine thread's call tree below this frame")
    parser.add_argument("--rate", type=int, default=250, help="samples a second")
    parser.add_argument("--summarize", type=Path, help="a saved py-spy raw file: no server")
    args = parser.parse_args()
    if args.summarize is not None:
        samples = sum(
            int(line.rpartition(" ")[2]) for line in args.summarize.read_text().split("\n") if line
        )
        summarize(args.summarize, args.top, samples, wall=True)
        if args.under:
            tree(args.summarize, args.under)
        return 0
    if args.model is None:
        parser.error("--model is needed unless --summarize is given")
    log_dir = Path(tempfile.mkdtemp(prefix="gil-profile-"))
    python_path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": python_path}
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mlx_llm_server",
        "--model-name",
        str(args.model),
        "--served-model-name",
        "bench",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    server = Server("ours", command, port, env, log_dir / "server.log")
    try:
        print(f"server ready in {server.wait_ready('bench', timeout=1800):.1f}s", flush=True)
        for clients in [int(c) for c in args.clients.split(",")]:
            run_round(server, clients, 1, 48, 16)  # untimed: every shape seen once
            raw = log_dir / f"gil-{clients}.txt"
            result: list[object] = []

            def drive(n: int = clients, out: list[object] = result) -> None:
                out.append(run_round(server, n, 1, 48, args.output_tokens, processes=min(n, 8)))

            driver = threading.Thread(target=drive)
            driver.start()
            spy = [
                "py-spy",
                "record",
                "--idle" if args.wall else "--gil",
                *(["--native"] if args.native else []),
                "--threads",
                "--rate",
                str(args.rate),
                "--format",
                "raw",
                "--duration",
                str(args.seconds),
                "--output",
                str(raw),
                "--pid",
                str(server.process.pid),
            ]
            subprocess.run(spy, check=False, capture_output=True, timeout=args.seconds + 60)
            driver.join()
            rate = result[0].throughput if result else float("nan")  # type: ignore[attr-defined]
            print(f"N={clients}: {rate:.1f} tok/s while sampled", flush=True)
            if raw.exists():
                summarize(raw, args.top, args.seconds * args.rate, args.wall)
                if args.under:
                    tree(raw, args.under)
            else:
                print("  py-spy wrote nothing (not installed, or not allowed to trace)")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
