"""What the server itself costs per streamed token, on a model that costs almost nothing.

The server runs a scripted model (tests/scripted_model.py: a lookup, no weights to speak of,
a 32,768-entry vocabulary) through the real loading path, engine, detokenizer, SSE and HTTP.
N clients stream `--output-tokens` each at once; the aggregate tokens/s is then the ceiling the
server's own per-token work (engine step bookkeeping, event-loop hand-off, text assembly, chunk
encoding, socket writes, all under one interpreter lock) allows, whatever the model.

The clients are raw asyncio sockets in another process that only count `data:` events, so
their own cost stays small next to the server's.

    python bench/stream_overhead.py --clients 1,16,64 --output-tokens 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

VOCAB = 32768


def build_model(folder: Path, length: int) -> tuple[Path, Path]:
    from model_factory import qwen3_tokenizer_dir
    from scripted_model import write_scripted_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())
    text = "The quick brown fox jumps over the lazy dog while the band plays on. " * 200
    ids = [t for t in tokenizer.encode(text, add_special_tokens=False) if t < VOCAB][:length]
    model_file, model_dir = write_scripted_model(folder, ids)
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["vocab_size"] = VOCAB
    config_path.write_text(json.dumps(config))
    return model_file, model_dir


async def one_stream(port: int, body: bytes) -> tuple[int, float, float]:
    """Returns (events, seconds to the first event, total seconds)."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    await writer.drain()
    events = 0
    first = 0.0
    tail = b""
    while True:
        data = await reader.read(65536)
        if not data:
            break
        chunk = tail + data
        count = chunk.count(b"data: ")
        if count and not first:
            first = time.perf_counter() - started
        events += count
        tail = chunk[-16:]
        events -= tail.count(b"data: ")  # counted again with the next read
        if b"[DONE]" in chunk:
            events += tail.count(b"data: ")
            break
    writer.close()
    return events, first, time.perf_counter() - started


def client_process(port: int, clients: int, tokens: int, queue: multiprocessing.Queue) -> None:
    body = json.dumps(
        {
            "model": "scripted",
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": tokens,
            "temperature": 0.0,
            "stream": True,
        }
    ).encode()

    async def run() -> tuple[float, list[tuple[int, float, float]]]:
        started = time.perf_counter()
        results = await asyncio.gather(*(one_stream(port, body) for _ in range(clients)))
        return time.perf_counter() - started, results

    queue.put(asyncio.run(run()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", default="1,16,64")
    parser.add_argument("--output-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--server-arg", action="append", default=[], help="passed to the server")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from server_process import ServerProcess

    folder = Path(tempfile.mkdtemp(prefix="stream-overhead-"))
    model_file, model_dir = build_model(folder, args.output_tokens + 8)
    counts = [int(c) for c in args.clients.split(",")]
    server = ServerProcess(
        [
            "--model-name",
            str(model_dir),
            "--served-model-name",
            "scripted",
            "--custom-model",
            str(model_file),
            "--log-level",
            "warning",
            "--max-running",
            str(max(counts)),
            *args.server_arg,
        ],
        folder / "server.log",
    )
    try:
        server.wait_healthy()
        print(f"{'N':>4} {'tok/s':>9} {'TTFT p50':>9} {'per-stream tok/s':>17}")
        for clients in counts:
            best = None
            for _ in range(args.rounds):
                queue: multiprocessing.Queue = multiprocessing.Queue()
                proc = multiprocessing.Process(
                    target=client_process, args=(server.port, clients, args.output_tokens, queue)
                )
                proc.start()
                wall, results = queue.get(timeout=600)
                proc.join()
                # Events besides tokens: the role chunk, the finish chunk and [DONE].
                tokens = sum(max(0, events - 3) for events, _, _ in results)
                rate = tokens / wall
                if best is None or rate > best[0]:
                    ttfts = sorted(r[1] for r in results)
                    per_stream = sorted(max(0, r[0] - 3) / r[2] for r in results)
                    best = (rate, ttfts[len(ttfts) // 2], per_stream[len(per_stream) // 2])
            assert best is not None
            print(f"{clients:>4} {best[0]:>9.0f} {best[1]:>8.3f}s {best[2]:>17.1f}")
    finally:
        server.stop()
    print(f"(cores: {os.cpu_count()}; best of {args.rounds} rounds; server log {folder})")


if __name__ == "__main__":
    main()
