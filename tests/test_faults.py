"""Faults over real HTTP: a model file that fails on cue, served by the real server.

`fault_lm` answers " ok" forever (so `max_tokens` ends every answer) and, on trigger words in
the prompt, does what a real model can do to the engine: run out of memory during prefill (the
message MLX's Metal allocator gives), fail in the middle of decoding, run slowly, or raise an
exception that no per-request handler catches, which stops the engine thread. No test hook is
involved: the faults come from the model, through the engine's own error paths.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import mlx.core as mx
import pytest
from model_factory import copy_qwen3_tokenizer
from server_process import ServerProcess

MODEL = "faulty"
CHAT = "/v1/chat/completions"
GRACE_SECONDS = 4
SLOW_SECONDS = 0.05  # per engine step while a slow prompt is running
# Words the Qwen3 tokenizer keeps as one token each (checked in `triggers`).
TRIGGER_WORDS = {
    "answer": " ok",
    "oom": " explode",
    "glitch": " glitch",
    "slow": " sleepy",
    "kill": " vanish",
}

FAULT_MODEL_SOURCE = '''\
"""fault_lm: answers one token forever; fails on cue (see tests/test_faults.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs
from mlx_lm.models.cache import KVCache


class EngineThreadKilled(BaseException):
    """Escapes the engine's per-request handlers (they catch Exception), as a bug would."""


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int
    answer_token: int
    oom_token: int
    glitch_token: int
    slow_token: int
    kill_token: int
    slow_seconds: float


class Model(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.bias = mx.zeros((1,))

    def __call__(self, inputs: mx.array, cache: Any = None, **_: Any) -> mx.array:
        a = self.args
        b, length = inputs.shape
        ids = inputs.astype(mx.float32).reshape(b, 1, length, 1)
        if cache is not None:
            # The cache keeps every token id seen, so "history" covers the whole sequence.
            ids, _ = cache[0].update_and_fetch(ids, ids)
        fresh = set(inputs.reshape(-1).tolist())
        history = set(ids.reshape(-1).astype(mx.int32).tolist())
        if a.kill_token in fresh:
            raise EngineThreadKilled("injected: the engine thread stops")
        if a.oom_token in fresh:
            raise RuntimeError(
                "[metal::malloc] Attempting to allocate 137438953472 bytes which is greater "
                "than the maximum allowed buffer size of 77309411328 bytes."
            )
        if a.glitch_token in history and a.answer_token in fresh:  # decoding, not prefill
            raise RuntimeError("[decode] injected failure in the middle of generation")
        if a.slow_token in history:
            time.sleep(a.slow_seconds)
        vocab = mx.arange(a.vocab_size)
        logits = mx.where(vocab == a.answer_token, 100.0, -100.0)
        return mx.broadcast_to(logits, (b, length, a.vocab_size))

    def make_cache(self) -> list[Any]:
        return [KVCache()]

    @property
    def layers(self) -> list[Any]:
        return [self]
'''


def write_fault_model(destination: Path, triggers: dict[str, int]) -> tuple[Path, Path]:
    destination.mkdir(parents=True, exist_ok=True)
    model_file = destination / "fault_lm.py"
    model_file.write_text(FAULT_MODEL_SOURCE)
    model_dir = destination / "model"
    model_dir.mkdir(exist_ok=True)
    mx.save_safetensors(str(model_dir / "model.safetensors"), {"bias": mx.zeros((1,))})
    config = {
        "model_type": "fault_lm",
        "vocab_size": 151936,
        "eos_token_id": 151645,
        "answer_token": triggers["answer"],
        "oom_token": triggers["oom"],
        "glitch_token": triggers["glitch"],
        "slow_token": triggers["slow"],
        "kill_token": triggers["kill"],
        "slow_seconds": SLOW_SECONDS,
    }
    (model_dir / "config.json").write_text(json.dumps(config))
    copy_qwen3_tokenizer(model_dir)
    return model_file, model_dir


@pytest.fixture(scope="module")
def triggers(qwen3_tokenizer_path: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer_path)
    ids = {}
    for name, word in TRIGGER_WORDS.items():
        tokens = tokenizer.encode(word, add_special_tokens=False)
        assert len(tokens) == 1, word
        # Above the ids the engine's warm-up prompts use, so warming up triggers nothing.
        assert tokens[0] > 1000, word
        ids[name] = tokens[0]
    return ids


# Every fault, with the engine on a thread of the server's process (the default) and in a
# process of its own (`--engine-process`), where it crosses a pipe.
ENGINE_MODES = {"engine-thread": [], "engine-process": ["--engine-process"]}


def start_fault_server(
    folder: Path, triggers: dict[str, int], options: list[str] | None = None
) -> ServerProcess:
    model_file, model_dir = write_fault_model(folder, triggers)
    server = ServerProcess(
        [
            "--model-name",
            str(model_dir),
            "--served-model-name",
            MODEL,
            "--custom-model",
            str(model_file),
            "--max-tokens",
            "16",
            "--max-running",
            "4",
            "--prefill-chunk",
            "64",
            "--shutdown-grace-seconds",
            str(GRACE_SECONDS),
            "--log-level",
            "warning",
            # asyncio's own loop here (`--event-loop`); the other servers of the suite run
            # uvicorn's default, uvloop.
            "--event-loop",
            "asyncio",
            *(options or []),
        ],
        folder / "server.log",
    )
    server.wait_healthy()
    return server


@pytest.fixture(scope="module", params=list(ENGINE_MODES))
def fault_server(
    request: pytest.FixtureRequest,
    triggers: dict[str, int],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProcess]:
    """Shared by this module's tests; the last one stops it with SIGTERM."""
    folder = tmp_path_factory.mktemp(f"faults-{request.param}")
    server = start_fault_server(folder, triggers, ENGINE_MODES[request.param])
    try:
        yield server
    finally:
        server.stop()


def body(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


def data_lines(text: str) -> list[str]:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


def assert_error_json(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    return error


def assert_stream_ends_with_error(lines: list[str]) -> dict[str, Any]:
    assert lines[-1] == "[DONE]"
    error = json.loads(lines[-2])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def assert_healthy(server: ServerProcess) -> None:
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    answer = httpx.post(f"{server.base_url}{CHAT}", json=body("Hi", max_tokens=3), timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 3


def test_out_of_memory_in_prefill_fails_only_that_request(fault_server: ServerProcess) -> None:
    async def scenario() -> (
        tuple[httpx.Response, list[httpx.Response], httpx.Response, list[str], bool]
    ):
        async with httpx.AsyncClient(base_url=fault_server.base_url, timeout=30) as client:

            async def bystander() -> list[str]:
                request = body("Take your time, sleepy one.", max_tokens=40, stream=True)
                async with client.stream("POST", CHAT, json=request) as response:
                    assert response.status_code == 200
                    return [line[6:] async for line in response.aiter_lines() if line]

            running = asyncio.create_task(bystander())
            await asyncio.sleep(0.5)  # 40 slow steps take 2 s: it is decoding now
            # Arriving during one slow step, these three are prefilled in one batched pass.
            plain, *neighbours = await asyncio.gather(
                client.post(CHAT, json=body("Please explode now.", max_tokens=5)),
                client.post(CHAT, json=body("Just a question.", max_tokens=5)),
                client.post(CHAT, json=body("Another question.", max_tokens=5)),
            )
            streamed = await client.post(CHAT, json=body("Please explode now.", stream=True))
            overlapped = not running.done()
            return plain, neighbours, streamed, await running, overlapped

    plain, neighbours, streamed, bystander, overlapped = asyncio.run(scenario())
    error = assert_error_json(plain, 500, "engine_error")
    for neighbour in neighbours:
        assert neighbour.status_code == 200, neighbour.text
        assert neighbour.json()["choices"][0]["message"]["content"] == " ok" * 5
    assert "malloc" in error["message"]
    assert streamed.status_code == 200
    assert assert_stream_ends_with_error(data_lines(streamed.text))["code"] == "engine_error"
    # The request running alongside was untouched.
    assert overlapped
    assert bystander[-1] == "[DONE]"
    chunks = [json.loads(line) for line in bystander[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == " ok" * 40
    assert_healthy(fault_server)


def test_failure_while_decoding_ends_the_stream_with_an_error_then_done(
    fault_server: ServerProcess,
) -> None:
    url = f"{fault_server.base_url}{CHAT}"
    streamed = httpx.post(url, json=body("A glitch ahead.", stream=True), timeout=30)
    assert streamed.status_code == 200
    lines = data_lines(streamed.text)
    assert json.loads(lines[0])["choices"][0]["delta"]["role"] == "assistant"
    assert assert_stream_ends_with_error(lines)["code"] == "engine_error"
    plain = httpx.post(url, json=body("A glitch ahead."), timeout=30)
    assert_error_json(plain, 500, "engine_error")
    assert_healthy(fault_server)
    metrics = httpx.get(f"{fault_server.base_url}/metrics").text
    assert f'mlx_llm_request_errors_total{{model="{MODEL}"}}' in metrics


@pytest.mark.parametrize("mode", list(ENGINE_MODES))
def test_engine_thread_death_turns_health_503(
    mode: str, triggers: dict[str, int], tmp_path_factory: pytest.TempPathFactory
) -> None:
    server = start_fault_server(tmp_path_factory.mktemp("doomed"), triggers, ENGINE_MODES[mode])
    try:
        url = f"{server.base_url}{CHAT}"
        assert httpx.get(f"{server.base_url}/metrics").text.count("mlx_llm_engine_up{") == 1
        dying = httpx.post(url, json=body("Now vanish."), timeout=30)
        assert_error_json(dying, 500, "engine_error")
        health = httpx.get(f"{server.base_url}/health")
        assert health.status_code == 503
        assert health.json()["status"] == "engine_stopped"
        assert_error_json(httpx.post(url, json=body("Hi")), 503, "service_unavailable")
        metrics = httpx.get(f"{server.base_url}/metrics").text
        assert f'mlx_llm_engine_up{{model="{MODEL}"}} 0.0' in metrics
    finally:
        assert server.stop() == 0


def read_raw_response(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(payload)


def test_sigterm_refuses_new_work_lets_running_requests_finish_and_exits_zero(
    fault_server: ServerProcess,
) -> None:
    """Runs last: it stops the module's server."""
    url = f"{fault_server.base_url}{CHAT}"
    results: dict[str, list[str] | BaseException] = {}
    streaming = {name: threading.Event() for name in ("short", "long")}

    def consume(name: str, max_tokens: int) -> None:
        request = body("Slowly, sleepy.", max_tokens=max_tokens, stream=True)
        lines: list[str] = []
        try:
            with httpx.stream("POST", url, json=request, timeout=60) as response:
                for line in response.iter_lines():
                    streaming[name].set()
                    if line:
                        lines.append(line[6:])
            results[name] = lines
        except httpx.HTTPError as error:
            results[name] = error
        streaming[name].set()

    # 40 steps of 0.05 s end within the grace period; 2000 would take 100 s.
    threads = [
        threading.Thread(target=consume, args=("short", 40)),
        threading.Thread(target=consume, args=("long", 2000)),
    ]
    for thread in threads:
        thread.start()
    for event in streaming.values():
        assert event.wait(20)
    # A request whose headers are in but whose body is not, on its open connection.
    late = json.dumps(body("Too late.", max_tokens=2)).encode()
    sock = socket.create_connection(("127.0.0.1", fault_server.port), timeout=30)
    sock.sendall(
        f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1:{fault_server.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(late)}\r\n\r\n".encode()
        + late[:10]
    )
    time.sleep(0.3)
    signalled = time.monotonic()
    fault_server.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    sock.sendall(late[10:])
    status, refused = read_raw_response(sock)
    sock.close()
    assert status == 503
    assert refused["error"]["code"] == "service_unavailable"

    returncode = fault_server.process.wait(timeout=GRACE_SECONDS + 15)
    elapsed = time.monotonic() - signalled
    for thread in threads:
        thread.join(timeout=10)
    assert returncode == 0
    assert GRACE_SECONDS - 0.5 < elapsed < GRACE_SECONDS + 10
    short = results["short"]
    assert isinstance(short, list) and short[-1] == "[DONE]", short
    assert json.loads(short[-2])["choices"][0]["finish_reason"] == "length"
    # The long one was cut when the grace period ended.
    long = results["long"]
    assert isinstance(long, BaseException) or long[-1] != "[DONE]"
