"""Serving benchmark: this server against `mlx_lm.server` on the same model, in one run.

Starts both servers, drives N concurrent streaming clients (fixed prompt and output lengths,
end-of-sequence suppressed with logit_bias so every request generates exactly --output-tokens),
and prints per server and N: aggregate output tokens/s, TTFT p50/p99, inter-token latency
p50/p99, and the ratio ours/theirs. A second scenario replays a 10-turn chat and prints the
time to first token of every turn. With --raw, a separate process first times mlx-lm's own
`generate_step` on one stream (no server) and the device's copy bandwidth, and the one-stream
figures are printed against both: the bandwidth bound is the copy rate over the weights' bytes,
as every decoded token reads all of them once.

    python bench/serve_bench.py                        # tiny random Qwen3, CPU
    python bench/serve_bench.py --model PATH --clients 1,8,32,64 --output-tokens 128
    python bench/serve_bench.py --build qwen3-8b-4bit  # Qwen3-8B-shaped 4-bit (GPU machine)

Only 127.0.0.1 is contacted; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
# Every request suppresses the model's end-of-sequence tokens (Qwen3's until `main` reads the
# served model's own), so each answer is exactly --output-tokens long.
EOS_SUPPRESSED = {"151645": -100, "151643": -100}


def suppress_eos_of(model: Path) -> None:
    """Suppresses the end-of-sequence tokens the server stops on for `model`."""
    sys.path.insert(0, str(ROOT / "src"))
    from mlx_llm_server.models.loader import load_tokenizer_only

    eos = load_tokenizer_only(str(model)).eos_token_ids
    EOS_SUPPRESSED.clear()
    EOS_SUPPRESSED.update({str(token): -100 for token in sorted(eos)})


@dataclass
class RequestTiming:
    ttft: float
    gaps: list[float]
    tokens: int


@dataclass
class RoundResult:
    clients: int
    wall: float
    timings: list[RequestTiming] = field(default_factory=list)
    errors: int = 0  # requests that failed (connection reset, HTTP error, no answer)

    @property
    def tokens(self) -> int:
        return sum(t.tokens for t in self.timings)

    @property
    def throughput(self) -> float:
        return self.tokens / self.wall

    def ttft(self, q: float) -> float:
        return percentile([t.ttft for t in self.timings], q)

    def itl(self, q: float) -> float:
        return percentile([g for t in self.timings for g in t.gaps], q)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


ENGINE_COUNTERS = (
    "mlx_llm_engine_prefill_seconds_total",
    "mlx_llm_engine_decode_seconds_total",
    "mlx_llm_engine_decode_wait_seconds_total",
    "mlx_llm_engine_decode_launch_seconds_total",
    "mlx_llm_decode_steps_total",
    "mlx_llm_decode_rows_total",
    "mlx_llm_prompt_tokens_computed_total",
    "mlx_llm_engine_prefill_steps_total",
    "mlx_llm_engine_prompts_prefilled_total",
)


def engine_counters(server: Server) -> dict[str, float]:
    """This server's engine counters from /metrics (empty for a server without them)."""
    try:
        text = httpx.get(f"{server.url}/metrics", timeout=30).text
    except httpx.HTTPError:
        return {}
    found: dict[str, float] = {}
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name in ENGINE_COUNTERS:
            found[name] = float(rest.rsplit(" ", 1)[1])
    return found


def engine_split(before: dict[str, float], after: dict[str, float], wall: float) -> str:
    """Where the engine thread's time went during a round: prompt work, decode steps, the rest."""
    if not before or not after:
        return ""
    d = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in ENGINE_COUNTERS}
    prefill, decode, wait, launch, steps, rows, prompt, prefill_steps, prompts = (
        d[name] for name in ENGINE_COUNTERS
    )
    # Of a step: "waiting", the engine blocked on the device for its tokens (near zero: the host
    # sets the pace); "queuing", inside MLX encoding and launching the next step.
    per_step = 1000 / max(steps, 1)
    return (
        f"prefill {prefill:5.2f}s ({prompt:6.0f} tok, {prompt / max(prefill, 1e-9):7.0f} tok/s; "
        f"{prefill_steps:3.0f} steps, {prompts / max(prefill_steps, 1):4.1f} prompts a step) | "
        f"decode {decode:5.2f}s in {steps:4.0f} steps ({decode * per_step:5.1f} ms: "
        f"{wait * per_step:4.1f} waiting, {launch * per_step:4.1f} queuing; "
        f"{rows / max(steps, 1):4.1f} rows) | other {wall - prefill - decode:5.2f}s"
    )


MEMORY_GAUGES = {
    "mlx_llm_mlx_active_memory_bytes": "active",
    "mlx_llm_mlx_cache_memory_bytes": "cache",
    "mlx_llm_kv_cache_bytes": "kv",
    "mlx_llm_prefix_cache_bytes": "prefix",
    "mlx_llm_running_sequences": "rows",
}


class MemoryTrace:
    """Samples this server's memory gauges (and the GPU's used memory, where nvidia-smi is)
    twice a second while a round runs; `summary` gives the peaks and a short timeline."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._stop = threading.Event()
        self.samples: list[dict[str, float]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = time.perf_counter()
        self._thread.start()

    def _sample(self) -> dict[str, float]:
        sample = {"t": time.perf_counter() - self._started}
        try:
            text = httpx.get(f"{self._server.url}/metrics", timeout=5).text
        except httpx.HTTPError:
            return sample
        for line in text.splitlines():
            name = line.partition("{")[0].partition(" ")[0]
            if name in MEMORY_GAUGES:
                sample[MEMORY_GAUGES[name]] = float(line.rsplit(" ", 1)[1])
        if shutil.which("nvidia-smi"):
            query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
            out = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout
            with contextlib.suppress(ValueError, IndexError):
                sample["gpu"] = float(out.split()[0]) * 2**20  # MiB
        return sample

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.samples.append(self._sample())

    def summary(self) -> str:
        self._stop.set()
        self._thread.join()
        if not self.samples:
            return ""
        keys = [k for k in ("active", "cache", "kv", "prefix", "gpu") if k in self.samples[0]]
        gb = 2**30
        peaks = ", ".join(f"{k} {max(s.get(k, 0) for s in self.samples) / gb:.1f}" for k in keys)
        step = max(1, len(self.samples) // 8)
        timeline = " | ".join(
            f"{s['t']:.0f}s rows {s.get('rows', 0):.0f} "
            + " ".join(f"{k} {s.get(k, 0) / gb:.1f}" for k in keys)
            for s in self.samples[::step]
        )
        return f"peak GB: {peaks}\n      {timeline}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    def __init__(self, name: str, command: list[str], port: int, env: dict[str, str], log: Path):
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self._log_file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            command, stdout=self._log_file, stderr=subprocess.STDOUT, env=env
        )
        self.model_id = ""

    def wait_ready(self, model_id: str, timeout: float) -> float:
        """Waits until a chat request succeeds; returns seconds since start."""
        deadline = time.monotonic() + timeout
        body = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")
            try:
                response = httpx.post(f"{self.url}/v1/chat/completions", json=body, timeout=600)
                if response.status_code == 200:
                    self.model_id = model_id
                    return time.monotonic() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log_file.close()


def prompt_for(client: int, words: int) -> list[dict[str, str]]:
    # Distinct from the first word on, so no server reuses another client's prefix.
    text = f"Client {client} asks: " + " ".join(
        f"word{(client * 7 + i) % 997}" for i in range(words)
    )
    return [{"role": "user", "content": text}]


async def stream_once(
    http: httpx.AsyncClient, server: Server, messages: list[dict[str, str]], output_tokens: int
) -> tuple[RequestTiming, str]:
    body = {
        "model": server.model_id,
        "messages": messages,
        "max_tokens": output_tokens,
        "temperature": 0.0,
        "logit_bias": EOS_SUPPRESSED,
        "stream": True,
    }
    started = time.perf_counter()
    ttft = None
    last = started
    gaps: list[float] = []
    pieces: list[str] = []
    async with http.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:  # the stream started, then the request failed
                raise httpx.HTTPError(f"error event: {chunk['error'].get('message')}")
            choices = chunk.get("choices") or []
            content = choices[0].get("delta", {}).get("content") if choices else None
            if not content:
                continue
            now = time.perf_counter()
            if ttft is None:
                ttft = now - started
            else:
                gaps.append(now - last)
            last = now
            pieces.append(content)
    return RequestTiming(ttft if ttft is not None else float("nan"), gaps, output_tokens), "".join(
        pieces
    )


async def run_clients(
    url: str,
    model_id: str,
    indices: list[int],
    rounds: int,
    prompt_words: int,
    output_tokens: int,
) -> list[RequestTiming | None]:
    server = Server.__new__(Server)  # only what stream_once reads
    server.name, server.url, server.model_id = "client", url, model_id
    limits = httpx.Limits(
        max_connections=len(indices) + 4, max_keepalive_connections=len(indices) + 4
    )
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as http:

        async def client(index: int) -> list[RequestTiming | None]:
            timings: list[RequestTiming | None] = []
            for r in range(rounds):
                try:
                    timing, _ = await stream_once(
                        http, server, prompt_for(index * 100 + r, prompt_words), output_tokens
                    )
                except httpx.HTTPError as error:
                    print(f"  request failed: {type(error).__name__}: {error}", flush=True)
                    timing = None
                timings.append(timing)
            return timings

        results = await asyncio.gather(*(client(i) for i in indices))
    return [t for per_client in results for t in per_client]


def client_worker(
    args: tuple[str, str, list[int], int, int, int, float],
) -> tuple[list[RequestTiming | None], float]:
    """One client process: waits for the common start, runs its clients, returns the timings
    and when it finished (wall clock, comparable across processes)."""
    url, model_id, indices, rounds, prompt_words, output_tokens, start_at = args
    time.sleep(max(0.0, start_at - time.time()))
    timings = asyncio.run(run_clients(url, model_id, indices, rounds, prompt_words, output_tokens))
    return timings, time.time()


def run_round(
    server: Server,
    clients: int,
    rounds: int,
    prompt_words: int,
    output_tokens: int,
    processes: int = 1,
    first_client: int = 0,
) -> RoundResult:
    """N clients, spread over `processes` client processes so that parsing the streams never
    limits what is measured (one Python process parses ~10k events/s at most)."""
    processes = max(1, min(processes, clients))
    if processes == 1:
        started = time.perf_counter()
        timings = asyncio.run(
            run_clients(
                server.url,
                server.model_id,
                list(range(first_client, first_client + clients)),
                rounds,
                prompt_words,
                output_tokens,
            )
        )
        wall = time.perf_counter() - started
    else:
        import multiprocessing

        start_at = time.time() + 2.0  # every process started and idle by then
        jobs = [
            (
                server.url,
                server.model_id,
                list(range(first_client + p, first_client + clients, processes)),
                rounds,
                prompt_words,
                output_tokens,
                start_at,
            )
            for p in range(processes)
        ]
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            outcomes = pool.map(client_worker, jobs)
        timings = [t for part, _ in outcomes for t in part]
        wall = max(end for _, end in outcomes) - start_at
    done = [t for t in timings if t is not None]
    return RoundResult(clients, wall, done, errors=len(timings) - len(done))


async def warm_client(server: Server) -> None:
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(60.0)) as http,
        http.stream("GET", f"{server.url}/v1/models") as response,
    ):
        async for _ in response.aiter_lines():
            pass


async def chat_turns(server: Server, turns: int, output_tokens: int) -> list[float]:
    messages = [
        {"role": "system", "content": "You are a helpful assistant. " * 20},
    ]
    ttfts = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0)) as http:
        for turn in range(turns):
            messages.append(
                {"role": "user", "content": f"Turn {turn}: tell me more about topic {turn}."}
            )
            timing, text = await stream_once(http, server, messages, output_tokens)
            ttfts.append(timing.ttft)
            messages.append({"role": "assistant", "content": text})
    return ttfts


def raw_reference(model_dir: Path, tokens: int, env: dict[str, str]) -> dict[str, float] | None:
    """mlx-lm's `generate_step` tokens/s on one stream, the weights' GB and the copy GB/s."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "one_stream_bounds.py"), str(model_dir), str(tokens)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        print(f"  raw reference failed: {done.stderr.strip()[-400:]}", flush=True)
        return None
    return json.loads(lines[-1])


def build_model(kind: str, folder: Path, tokenizer_dir: Path | None) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen3

    if kind == "tiny":
        from model_factory import build_tiny_qwen3

        return build_tiny_qwen3(folder)
    if kind != "qwen3-8b-4bit":
        raise SystemExit(f"unknown --build {kind}")
    config = {
        "model_type": "qwen3",
        "hidden_size": 4096,
        "num_hidden_layers": 36,
        "intermediate_size": 12288,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rms_norm_eps": 1e-6,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "eos_token_id": 151645,
        "quantization": {"group_size": 64, "bits": 4},
    }
    folder.mkdir(parents=True, exist_ok=True)
    mx.random.seed(0)
    model = qwen3.Model(qwen3.ModelArgs.from_dict(config))
    model.set_dtype(mx.bfloat16)
    nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config))
    source = tokenizer_dir
    if source is None:
        from model_factory import qwen3_tokenizer_dir

        source = qwen3_tokenizer_dir()
    for file in source.iterdir():
        if file.is_file():
            shutil.copy(file, folder / file.name)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="model folder (default: build one)")
    parser.add_argument("--build", default="tiny", help="tiny | qwen3-8b-4bit (when no --model)")
    parser.add_argument("--tokenizer-dir", type=Path, help="tokenizer files for --build")
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client per N")
    parser.add_argument("--prompt-words", type=int, default=48)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--max-running", type=int, default=64)
    parser.add_argument("--servers", default="ours,mlx_lm")
    parser.add_argument(
        "--client-processes",
        type=int,
        default=max(1, min(8, (os.cpu_count() or 2) // 2)),
        help="processes the clients are spread over",
    )
    parser.add_argument("--ours-arg", action="append", default=[], help="extra server option")
    parser.add_argument("--warmup", action="store_true", help="one untimed round of every N first")
    parser.add_argument(
        "--trace-memory", action="store_true", help="sample this server's memory during rounds"
    )
    parser.add_argument("--openblas", action="store_true", help="preload Debian's OpenBLAS (CPU)")
    parser.add_argument(
        "--raw",
        action="store_true",
        help="also time mlx-lm's generate_step alone and the copy bandwidth (one stream's bounds)",
    )
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--log-dir", type=Path, default=Path(tempfile.gettempdir()) / "serve-bench")
    args = parser.parse_args()

    args.log_dir.mkdir(parents=True, exist_ok=True)
    model_dir = args.model or build_model(
        args.build, args.log_dir / f"model-{args.build}", args.tokenizer_dir
    )
    suppress_eos_of(model_dir)
    python_path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": python_path}
    blas = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
    if args.openblas and Path(blas).exists():
        env["LD_PRELOAD"] = blas
    commands = {
        "ours": [
            sys.executable,
            "-m",
            "mlx_llm_server",
            "--model-name",
            str(model_dir),
            "--served-model-name",
            "bench",
            "--max-running",
            str(args.max_running),
            "--max-queued",
            "1024",
            "--log-level",
            "warning",
            *args.ours_arg,
        ],
        "mlx_lm": [
            sys.executable,
            "-m",
            "mlx_lm.server",
            "--model",
            str(model_dir),
            "--decode-concurrency",
            str(args.max_running),
            "--log-level",
            "WARNING",
        ],
    }
    raw = raw_reference(model_dir, args.output_tokens, env) if args.raw else None
    if raw is not None:
        print(
            f"  raw generate_step {raw['generate_step_tok_s']:.1f} tok/s; copy "
            f"{raw['copy_gb_s']:,.0f} GB/s over {raw['weights_gb']:.2f} GB of weights",
            flush=True,
        )
    model_ids = {"ours": "bench", "mlx_lm": str(model_dir)}
    client_counts = [int(c) for c in args.clients.split(",")]
    names = args.servers.split(",")
    # One entry per round, in the order of --clients (a count may repeat: 1,1,64 runs three).
    results: dict[str, list[RoundResult]] = {}
    turns: dict[str, list[float]] = {}
    startup: dict[str, float] = {}
    cold: dict[str, list[float]] = {}
    splits: dict[str, list[str]] = {}
    for name in names:
        port = free_port()
        command = [*commands[name], "--port", str(port)]
        server = Server(name, command, port, env, args.log_dir / f"{name}.log")
        try:
            startup[name] = server.wait_ready(model_ids[name], timeout=1800)
            # The first requests a fresh server answers, before any warm-up round: stalls from
            # compiling on the request path show here. The client's own first use (imports,
            # connection machinery) is paid beforehand, on a request that generates nothing.
            asyncio.run(warm_client(server))
            cold[name] = []
            for i in range(3):
                # Prompts of their own: each of the three is prefilled in full, like the first.
                first = run_round(
                    server, 1, 1, args.prompt_words, args.output_tokens, first_client=10_000 + i
                ).timings
                cold[name].append(first[0].ttft if first else float("nan"))
            print(f"  {name:7} cold N=1 TTFT: " + ", ".join(f"{t:.3f}s" for t in cold[name]))
            if args.warmup:
                for n in client_counts:
                    warm = run_round(server, n, 1, args.prompt_words, 8, args.client_processes)
                    print(
                        f"  {name:7} warm-up N={n:<3} {warm.wall:.1f}s, {warm.errors} failed",
                        flush=True,
                    )
            results[name] = []
            for n in client_counts:
                counters = engine_counters(server)
                trace = MemoryTrace(server) if args.trace_memory and counters else None
                r = run_round(
                    server,
                    n,
                    args.rounds,
                    args.prompt_words,
                    args.output_tokens,
                    args.client_processes,
                )
                results[name].append(r)
                splits.setdefault(name, []).append(
                    engine_split(counters, engine_counters(server), r.wall)
                )
                if trace is not None:
                    print(f"  {name:7} N={n:<3} memory {trace.summary()}", flush=True)
                print(
                    f"  {name:7} N={n:<3} {r.throughput:9.1f} tok/s  TTFT p50 {r.ttft(50):.3f}s",
                    flush=True,
                )
            try:
                turns[name] = asyncio.run(chat_turns(server, args.turns, 32))
            except httpx.HTTPError as error:
                print(f"  {name}: chat scenario failed: {type(error).__name__}", flush=True)
                turns[name] = [float("nan")] * args.turns
        finally:
            server.stop()

    print()
    print(
        f"model {model_dir.name} | prompt ~{args.prompt_words} words | {args.output_tokens} output tokens | "
        f"{args.rounds} requests per client | {platform.machine()} | warmup={args.warmup} | "
        f"client processes {args.client_processes}"
    )
    print("start-up to first answer: " + ", ".join(f"{n} {s:.1f}s" for n, s in startup.items()))
    for name, ttfts in cold.items():
        print(f"first 3 requests (N=1), TTFT: {name} " + " ".join(f"{t:.3f}s" for t in ttfts))
    header = f"{'server':8} {'N':>3} {'tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>9} {'ITL p99':>9} {'failed':>6}"
    print(header)
    print("-" * len(header))
    for name in names:
        for n, r in zip(client_counts, results[name], strict=False):
            print(
                f"{name:8} {n:>3} {r.throughput:9.1f} {r.ttft(50):9.3f} {r.ttft(99):9.3f} "
                f"{r.itl(50) * 1000:7.1f}ms {r.itl(99) * 1000:7.1f}ms {r.errors:>6}"
            )
    for name, per_round in splits.items():
        if any(per_round):
            print()
            print(f"{name}: engine time per round (from /metrics)")
            for n, split in zip(client_counts, per_round, strict=False):
                print(f"  N={n:<3} {split}")
    if {"ours", "mlx_lm"} <= set(names):
        print()
        print(f"{'N':>3} {'ours/mlx_lm tok/s':>18} {'TTFT p99 ratio':>15}")
        for n, ours, theirs in zip(client_counts, results["ours"], results["mlx_lm"], strict=False):
            print(
                f"{n:>3} {ours.throughput / theirs.throughput:18.2f} {ours.ttft(99) / theirs.ttft(99):15.2f}"
            )
    if raw is not None and 1 in client_counts:
        bound = raw["copy_gb_s"] / raw["weights_gb"]
        print()
        print(
            f"one stream against its bounds ({raw['device']}): raw generate_step "
            f"{raw['generate_step_tok_s']:.1f} tok/s; bandwidth bound {bound:.0f} tok/s "
            f"({raw['copy_gb_s']:,.0f} GB/s copy / {raw['weights_gb']:.2f} GB)"
        )
        for name in names:
            # Decode alone, as generate_step is timed: tokens after the first over the time from
            # the first chunk to the last (a chunk may carry several tokens).
            timings = results[name][client_counts.index(1)].timings
            spent = sum(sum(timing.gaps) for timing in timings)
            decode = sum(timing.tokens - 1 for timing in timings) / spent if spent else float("nan")
            print(
                f"  {name:8} decode {decode:7.1f} tok/s over HTTP = "
                f"{decode / raw['generate_step_tok_s']:.2f}x generate_step, "
                f"{decode / bound:.0%} of the bound"
            )
    print()
    print("10-turn chat, TTFT per turn (s):")
    for name in names:
        print(
            f"{name:8} "
            + " ".join(f"{t:.3f}" for t in turns[name])
            + f"   turn10/turn1 = {turns[name][-1] / turns[name][0]:.2f}"
        )
    if args.json_out:
        payload = {
            name: {
                round_key(client_counts, i): {
                    "tok_s": r.throughput,
                    "failed": r.errors,
                    "ttft_p50": r.ttft(50),
                    "ttft_p99": r.ttft(99),
                    "itl_p50": r.itl(50),
                    "itl_p99": r.itl(99),
                }
                for i, r in enumerate(rounds)
            }
            for name, rounds in results.items()
        }
        payload["turns"] = turns  # type: ignore[assignment]
        payload["startup"] = startup  # type: ignore[assignment]
        payload["cold_ttft"] = cold  # type: ignore[assignment]
        if raw is not None:
            payload["raw"] = raw  # type: ignore[assignment]
        args.json_out.write_text(json.dumps(payload, indent=2))
    return 0


def round_key(client_counts: list[int], index: int) -> str:
    """A round's key in the JSON output: its client count, then `N#2`, `N#3` for repeats."""
    n = client_counts[index]
    repeat = client_counts[: index + 1].count(n)
    return str(n) if repeat == 1 else f"{n}#{repeat}"


if __name__ == "__main__":
    raise SystemExit(main())
