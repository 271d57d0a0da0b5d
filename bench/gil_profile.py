"""Who holds the interpreter lock while the server streams: a py-spy sample of a live server.

Starts this server on a model folder, drives N streaming clients (serve_bench's clients), and
samples the server with `py-spy record --gil` (only the thread holding the GIL is sampled) while
they stream. Prints, per thread, the share of samples in which it held the lock, and the
functions it held it in. With `--wall`, every thread is sampled whatever it is doing (`--idle`):
where each thread's wall time goes, waiting for the lock or the device included; a function's
share there minus its share under `--gil` is time its thread spent in it without the lock.
Needs `py-spy` on PATH and permission to trace the server.

    python bench/gil_profile.py --model /tmp/sb/model-qwen3-8b-4bit --clients 1,64 [--wall]
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--clients", default="1,64")
    parser.add_argument("--output-tokens", type=int, default=384)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--top", type=int, default=14)
    parser.add_argument("--wall", action="store_true", help="every thread, not the lock's holder")
    args = parser.parse_args()
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
                "--threads",
                "--rate",
                "250",
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
                summarize(raw, args.top, args.seconds * 250, args.wall)
            else:
                print("  py-spy wrote nothing (not installed, or not allowed to trace)")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
