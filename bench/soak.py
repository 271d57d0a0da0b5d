"""Soak test: many mixed requests against the real server, looking for what breaks over time.

Starts the server on a tiny random-weight Qwen3 (built like tests/model_factory.py) on a free
127.0.0.1 port, then runs --requests requests from --clients concurrent clients:

- 5% bad input (malformed JSON, wrong types, unknown model, ...): must be 4xx;
- 20% disconnect at a random point: before the answer, after a few stream events, or while a
  non-streaming answer is being generated;
- the rest complete, half of them streaming, with varied prompts (some sharing a prefix),
  lengths, sampling settings, stop strings, logprobs, n and both endpoints.

It prints the figures that must stay at zero (5xx answers, error events inside streams, hung
requests: no answer within --timeout, malformed streams: a 200 stream not ending in
`data: [DONE]`, bad input accepted, sequences still running once idle) and the server's
resident memory once idle after --baseline-after requests and after all of them.

    python bench/soak.py                      # 2,000 requests, 16 clients
    python bench/soak.py --requests 200       # the short version tests/test_soak.py runs

Bounded: --requests requests, --max-seconds in all, --timeout per request; only 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from model_factory import build_tiny_qwen3  # noqa: E402
from server_process import ServerProcess  # noqa: E402

MODEL = "tiny-qwen3"
NO_EOS = {"151645": -100}
WORDS = " ".join(
    (
        "river mountain quiet number seven bright window paper orange memory signal garden",
        "winter stone lamp question answer travel engine coffee letter music silver forest",
        "bridge market candle shadow thunder ocean harbor valley pencil rocket",
    )
).split()
SYSTEMS = [
    "You are a concise assistant. " * 12,
    "You answer in French, politely. " * 10,
    "You are a pirate who explains mathematics. " * 8,
    "",
]
VALID = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
BAD_INPUTS: list[tuple[bytes, dict[str, str]]] = [
    (b"{not json", {}),
    (b"[1, 2, 3]", {}),
    (json.dumps({**VALID, "messages": []}).encode(), {}),
    (json.dumps({**VALID, "model": "../../etc/passwd"}).encode(), {}),
    (json.dumps({**VALID, "max_tokens": -5}).encode(), {}),
    (json.dumps({**VALID, "temperature": "hot"}).encode(), {}),
    (json.dumps({**VALID, "n": 1000}).encode(), {}),
    (b'{"model": "tiny-qwen3", "messages": [{"role": "user", "content": "\\ud800"}]}', {}),
    (b'{"model": "tiny-qwen3", "messages": [], "temperature": NaN}', {}),
    (json.dumps(VALID).encode(), {"Content-Type": "text/plain"}),
    (json.dumps({**VALID, "messages": [{"role": "wizard", "content": "x"}]}).encode(), {}),
    (json.dumps({**VALID, "max_tokens": 10**9}).encode(), {}),
]


@dataclass
class SoakResult:
    requests: int = 0
    completed: int = 0
    disconnected: int = 0
    bad_input_sent: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    server_errors: int = 0  # 5xx answers
    stream_error_events: int = 0  # an error event inside a 200 stream
    hung: int = 0
    malformed_streams: int = 0
    bad_input_accepted: int = 0
    running_when_idle: float = 0.0
    queued_when_idle: float = 0.0
    rss_baseline_bytes: int = 0
    rss_final_bytes: int = 0
    # MLX's own count (weights, prefix cache, ...): exact, where RSS depends on the allocator.
    mlx_active_baseline_bytes: int = 0
    mlx_active_final_bytes: int = 0
    rss_trace: list[tuple[int, int]] = field(default_factory=list)  # (requests done, bytes)
    baseline_after: int = 0
    wall_seconds: float = 0.0
    stopped_early: bool = False
    examples: list[str] = field(default_factory=list)

    @property
    def rss_growth_percent(self) -> float:
        if not self.rss_baseline_bytes:
            return 0.0
        return 100.0 * (self.rss_final_bytes - self.rss_baseline_bytes) / self.rss_baseline_bytes

    @property
    def failures(self) -> int:
        return (
            self.server_errors
            + self.stream_error_events
            + self.hung
            + self.malformed_streams
            + self.bad_input_accepted
        )

    def note(self, text: str) -> None:
        if len(self.examples) < 10:
            self.examples.append(text[:300])


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True)
    return int(out.stdout.strip() or 0) * 1024


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class Soak:
    def __init__(self, base_url: str, pid: int, args: argparse.Namespace) -> None:
        self.base_url = base_url
        self.pid = pid
        self.args = args
        self.rng = random.Random(args.seed)
        self.result = SoakResult(requests=args.requests, baseline_after=args.baseline_after)
        self.statuses: Counter[int] = Counter()
        self.next_index = 0
        self.in_flight = 0
        self.deadline = time.monotonic() + args.max_seconds
        every = args.rss_every or args.requests
        self.checkpoints = {args.baseline_after, *range(every, args.requests, every)}

    # One request -----------------------------------------------------------------------

    def _prompt(self) -> list[dict[str, str]]:
        words = " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(1, 80)))
        system = self.rng.choice(SYSTEMS)
        messages = [{"role": "system", "content": system}] if system else []
        return [*messages, {"role": "user", "content": words}]

    def _body(self, stream: bool) -> tuple[str, dict[str, Any]]:
        rng = self.rng
        body: dict[str, Any] = {"model": MODEL, "max_tokens": rng.randint(1, 32)}
        if rng.random() < 0.15:
            path = "/v1/completions"
            body["prompt"] = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60)))
            if rng.random() < 0.3:
                body["logprobs"] = rng.randint(0, 3)
        else:
            path = "/v1/chat/completions"
            body["messages"] = self._prompt()
            if rng.random() < 0.2:
                body["logprobs"] = True
                body["top_logprobs"] = rng.randint(0, 4)
        body["temperature"] = rng.choice([0.0, 0.7, 1.0])
        if rng.random() < 0.05:
            # Short: while a top-p row runs, every step sorts the vocabulary (slow on a CPU).
            body["top_p"] = rng.choice([0.5, 0.9])
            body["max_tokens"] = min(body["max_tokens"], 4)
        if rng.random() < 0.3:
            body["logit_bias"] = NO_EOS
        if rng.random() < 0.2:
            body["stop"] = rng.sample(WORDS, 2)
        if rng.random() < 0.1:
            body["n"] = 2
        if rng.random() < 0.1:
            body["seed"] = rng.randint(0, 1000)
        if stream:
            body["stream"] = True
            if rng.random() < 0.5:
                body["stream_options"] = {"include_usage": True}
        return path, body

    async def one(self, client: httpx.AsyncClient) -> None:
        rng, result = self.rng, self.result
        roll = rng.random()
        stream = rng.random() < 0.5
        if roll < self.args.bad_fraction:
            await self._bad_input(client)
        elif roll < self.args.bad_fraction + self.args.disconnect_fraction:
            await self._disconnect(client, stream)
        else:
            path, body = self._body(stream)
            try:
                await asyncio.wait_for(self._complete(client, path, body), self.args.timeout)
            except asyncio.TimeoutError:
                result.hung += 1
                result.note(f"hung: {path} {json.dumps(body)[:200]}")

    async def _bad_input(self, client: httpx.AsyncClient) -> None:
        self.result.bad_input_sent += 1
        payload, headers = self.rng.choice(BAD_INPUTS)
        headers = {"Content-Type": "application/json", **headers}
        try:
            response = await asyncio.wait_for(
                client.post("/v1/chat/completions", content=payload, headers=headers),
                self.args.timeout,
            )
        except asyncio.TimeoutError:
            self.result.hung += 1
            return
        self._status(response.status_code, response.text)
        if response.status_code < 400:
            self.result.bad_input_accepted += 1
            self.result.note(f"bad input accepted: {payload[:100]!r}")
        elif "error" not in response.json():
            self.result.bad_input_accepted += 1

    async def _disconnect(self, client: httpx.AsyncClient, stream: bool) -> None:
        """Leaves at a random point; counts a hang only if nothing came back in time."""
        self.result.disconnected += 1
        path, body = self._body(stream)
        body["max_tokens"] = self.rng.randint(8, 100)
        if not stream or self.rng.random() < 0.3:
            # Gone before the answer (or while a non-streaming one is generated).
            try:
                response = await asyncio.wait_for(
                    client.post(path, json=body), self.rng.uniform(0.005, 0.5)
                )
            except asyncio.TimeoutError:
                return
            self._status(response.status_code, response.text)
            return
        keep = self.rng.randint(0, 8)

        async def read_some() -> None:
            async with client.stream("POST", path, json=body) as response:
                self._status(response.status_code, "")
                if keep == 0:
                    return  # gone as soon as the answer starts
                seen = 0
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        if '"error"' in line:
                            self.result.stream_error_events += 1
                            self.result.note(f"error event: {line}")
                        seen += 1
                        if seen >= keep:
                            return  # closing the response drops the connection mid-stream

        try:
            await asyncio.wait_for(read_some(), self.args.timeout)
        except asyncio.TimeoutError:
            self.result.hung += 1
            self.result.note(f"hung before {keep} events: {path}")

    async def _complete(self, client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> None:
        result = self.result
        if not body.get("stream"):
            response = await client.post(path, json=body)
            self._status(response.status_code, response.text)
            if response.status_code == 200:
                result.completed += 1
            return
        try:
            async with client.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    self._status(response.status_code, (await response.aread()).decode())
                    return
                self._status(200, "")
                data = [
                    line[6:] async for line in response.aiter_lines() if line.startswith("data: ")
                ]
        except httpx.HTTPError as error:  # cut off mid-stream
            result.malformed_streams += 1
            result.note(f"stream broke: {error!r}")
            return
        if not data or data[-1] != "[DONE]":
            result.malformed_streams += 1
            result.note(f"no [DONE]: {data[-2:]}")
            return
        for item in data[:-1]:
            try:
                event = json.loads(item)
            except ValueError:
                result.malformed_streams += 1
                result.note(f"not JSON: {item[:100]}")
                return
            if "error" in event:
                result.stream_error_events += 1
                result.note(f"error event: {item}")
                return
        result.completed += 1

    def _status(self, status: int, text: str) -> None:
        self.statuses[status] += 1
        if status >= 500:
            self.result.server_errors += 1
            self.result.note(f"{status}: {text[:200]}")

    # The run ---------------------------------------------------------------------------

    async def settle(self, client: httpx.AsyncClient) -> tuple[float, float]:
        """Waits for the server to go idle (disconnected requests leave within a step)."""
        running = queued = 0.0
        for _ in range(100):
            text = (await client.get("/metrics")).text
            running = metric(text, "mlx_llm_running_sequences")
            queued = metric(text, "mlx_llm_queue_depth")
            if running == 0 and queued == 0:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # the engine gives its buffer cache back when idle
        return running, queued

    async def worker(self, client: httpx.AsyncClient, gate: asyncio.Event) -> None:
        while True:
            await gate.wait()
            if self.next_index >= self.args.requests:
                return
            if time.monotonic() > self.deadline:
                self.result.stopped_early = True
                return
            index = self.next_index
            self.next_index += 1
            if index in self.checkpoints:
                await self._checkpoint(client, gate, index)
            self.in_flight += 1
            try:
                await self.one(client)
            finally:
                self.in_flight -= 1

    async def _checkpoint(self, client: httpx.AsyncClient, gate: asyncio.Event, done: int) -> None:
        """Pauses every client, lets the server go idle, then reads its memory."""
        gate.clear()
        while self.in_flight:
            await asyncio.sleep(0.05)
        await self.settle(client)
        rss = rss_bytes(self.pid)
        self.result.rss_trace.append((done, rss))
        text = (await client.get("/metrics")).text
        if done == self.args.baseline_after:
            self.result.rss_baseline_bytes = rss
            self.result.mlx_active_baseline_bytes = int(
                metric(text, "mlx_llm_mlx_active_memory_bytes")
            )
        mb = 1 << 20
        print(
            f"  {done} requests: RSS {rss / mb:.1f} MB, MLX active "
            f"{metric(text, 'mlx_llm_mlx_active_memory_bytes') / mb:.1f} MB, cache "
            f"{metric(text, 'mlx_llm_mlx_cache_memory_bytes') / mb:.1f} MB, prefix cache "
            f"{metric(text, 'mlx_llm_prefix_cache_bytes') / mb:.1f} MB",
            file=sys.stderr,
            flush=True,
        )
        gate.set()

    async def run(self) -> SoakResult:
        started = time.monotonic()
        limits = httpx.Limits(max_connections=self.args.clients * 2)
        timeout = httpx.Timeout(self.args.timeout)
        async with httpx.AsyncClient(
            base_url=self.base_url, limits=limits, timeout=timeout
        ) as client:
            gate = asyncio.Event()
            gate.set()
            await asyncio.gather(*(self.worker(client, gate) for _ in range(self.args.clients)))
            running, queued = await self.settle(client)
            self.result.rss_final_bytes = rss_bytes(self.pid)
            self.result.rss_trace.append((self.next_index, self.result.rss_final_bytes))
            text = (await client.get("/metrics")).text
            self.result.mlx_active_final_bytes = int(
                metric(text, "mlx_llm_mlx_active_memory_bytes")
            )
            self.result.running_when_idle, self.result.queued_when_idle = running, queued
            health = await client.get("/health")
            if health.status_code != 200:
                self.result.server_errors += 1
                self.result.note(f"health after the soak: {health.status_code}")
        self.result.statuses = {str(k): v for k, v in sorted(self.statuses.items())}
        self.result.wall_seconds = time.monotonic() - started
        return self.result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--disconnect-fraction", type=float, default=0.2)
    parser.add_argument("--bad-fraction", type=float, default=0.05)
    parser.add_argument("--baseline-after", type=int, default=100, help="RSS baseline point")
    parser.add_argument(
        "--rss-every", type=int, default=0, help="also read RSS (idle) every N requests"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="per request, seconds")
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="for the whole run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra server option, e.g. --server-arg=--max-running=32 (repeatable)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--server-log", type=Path, default=None, help="keep the server's log")
    return parser


def server_args(model_dir: Path, extra: Sequence[str]) -> list[str]:
    return [
        "--model-name",
        str(model_dir),
        "--served-model-name",
        MODEL,
        "--context-length",
        "2048",
        "--max-running",
        "16",
        # Bounded, so that what the prefix cache keeps stops growing early in the run.
        "--prefix-cache-mb",
        "8",
        "--log-level",
        "warning",
        *extra,
    ]


def run(args: argparse.Namespace) -> SoakResult:
    with tempfile.TemporaryDirectory(prefix="soak-") as folder:
        model_dir = build_tiny_qwen3(Path(folder) / "tiny-qwen3")
        log = args.server_log or Path(folder) / "server.log"
        server = ServerProcess(server_args(model_dir, args.server_arg), log)
        try:
            started = time.monotonic()
            server.wait_healthy()
            print(f"server ready in {time.monotonic() - started:.1f} s", flush=True)
            soak = Soak(server.base_url, server.process.pid, args)
            result = asyncio.run(soak.run())
        finally:
            code = server.stop()
        if code != 0:
            result.server_errors += 1
            tail = log.read_text(errors="replace")[-500:]
            result.note(f"server exited with {code}: {tail}")
    return result


def report(result: SoakResult) -> str:
    mb = 1 << 20
    lines = [
        f"requests                 {result.requests} ({result.completed} completed, "
        f"{result.disconnected} disconnected, {result.bad_input_sent} bad input)",
        f"statuses                 {result.statuses}",
        f"5xx answers              {result.server_errors}",
        f"error events in streams  {result.stream_error_events}",
        f"hung requests            {result.hung}",
        f"malformed streams        {result.malformed_streams}",
        f"bad input accepted       {result.bad_input_accepted}",
        f"running/queued when idle {result.running_when_idle:.0f}/{result.queued_when_idle:.0f}",
        f"RSS after {result.baseline_after:<5}          {result.rss_baseline_bytes / mb:.1f} MB",
        f"RSS after {result.requests:<5}          {result.rss_final_bytes / mb:.1f} MB",
        f"RSS growth               {result.rss_growth_percent:+.2f}%",
        f"MLX active memory        {result.mlx_active_baseline_bytes / mb:.1f} MB -> "
        f"{result.mlx_active_final_bytes / mb:.1f} MB",
        f"wall time                {result.wall_seconds:.1f} s"
        + (" (stopped early at --max-seconds)" if result.stopped_early else ""),
    ]
    lines += [f"  e.g. {example}" for example in result.examples]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    print(report(result))
    if args.json is not None:
        figures = {**asdict(result), "rss_growth_percent": result.rss_growth_percent}
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if result.failures == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
