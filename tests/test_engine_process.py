"""`--engine-process`: the engine in a process of its own, over real HTTP.

The HTTP process keeps only the tokenizer; requests, grammars and cancellations cross a pipe to
the child that runs the model, and each step's events come back. These tests use what crosses
the pipe (text split mid-character, usage, grammars, logprobs, several choices) and what can
happen to a second process (it dies; the server stops; the server dies).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import SCRIPT_TEXT, serve_script, tiny_server_args
from server_process import ServerProcess, free_port, serving

from mlx_llm_server.engine.engine import EngineConfig
from mlx_llm_server.engine.remote import ChildModel, EngineProcess

TINY = "tiny-qwen3"


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its ")"
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def engine_child(server: ServerProcess) -> int:
    """The server's engine process (not multiprocessing's resource tracker)."""
    for pid in children(server.process.pid):
        if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
            return pid
    raise AssertionError(f"no engine process under {server.process.pid}")


def gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":  # exited; its parent has not collected it yet
            return True
        time.sleep(0.1)
    return False


def tiny_args(tiny_qwen3_dir: Path) -> list[str]:
    return tiny_server_args(tiny_qwen3_dir, "--engine-process")


@pytest.fixture(scope="module")
def scripted_process_server(
    script_tokens: list[int], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """The scripted model (a registered model file: the child registers it too)."""
    folder = tmp_path_factory.mktemp("scripted-process")
    yield from serve_script(folder, script_tokens, "scripted", "--engine-process")


@pytest.fixture(scope="module")
def tiny_process_server(
    tiny_qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("tiny-process") / "server.log"
    with serving(tiny_args(tiny_qwen3_dir), log) as server:
        yield server


def client_of(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0)


def test_text_split_mid_character_streams_whole_and_counts_usage(
    scripted_process_server: ServerProcess, script_tokens: list[int]
) -> None:
    client = client_of(scripted_process_server)
    messages = [{"role": "user", "content": "Go."}]
    stream = client.chat.completions.create(
        model="scripted",
        messages=messages,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == SCRIPT_TEXT
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == len(script_tokens) + 1  # + EOS
    whole = client.chat.completions.create(model="scripted", messages=messages)  # type: ignore[arg-type]
    assert whole.choices[0].message.content == SCRIPT_TEXT
    assert whole.usage is not None and whole.usage.prompt_tokens == usage.prompt_tokens


def test_grammar_logprobs_and_choices_cross_the_pipe(tiny_process_server: ServerProcess) -> None:
    client = client_of(tiny_process_server)
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 8}, "rain": {"type": "boolean"}},
        "required": ["city", "rain"],
        "additionalProperties": False,
    }
    answer = client.chat.completions.create(
        model=TINY,
        messages=[{"role": "user", "content": "Weather?"}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "weather", "schema": schema, "strict": True},
        },
        max_tokens=60,
        temperature=0,
    )
    assert answer.choices[0].finish_reason == "stop"
    value = json.loads(answer.choices[0].message.content or "")
    assert set(value) == {"city", "rain"} and isinstance(value["rain"], bool)

    sampled = client.chat.completions.create(
        model=TINY,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        n=2,
        seed=7,
        logprobs=True,
        top_logprobs=3,
    )
    assert sorted(c.index for c in sampled.choices) == [0, 1]
    for choice in sampled.choices:
        assert choice.logprobs is not None and choice.logprobs.content
        assert all(len(t.top_logprobs) == 3 for t in choice.logprobs.content)
    assert sampled.usage is not None and sampled.usage.completion_tokens == 10


def test_metrics_come_from_the_engine_process(tiny_process_server: ServerProcess) -> None:
    client = client_of(tiny_process_server)
    client.chat.completions.create(
        model=TINY, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
    )
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{tiny_process_server.base_url}/metrics").text
        steps = [
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("mlx_llm_decode_steps_total{")
        ]
        if steps and steps[0] > 0:
            break
        time.sleep(0.2)
    assert steps and steps[0] > 0, metrics
    assert f'mlx_llm_engine_up{{model="{TINY}"}} 1.0' in metrics
    # The weights live in the engine process: its MLX memory is what the server reports.
    active = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("mlx_llm_mlx_active_memory_bytes ")
    )
    assert active > 1e6


def test_a_dead_engine_process_turns_health_503_and_ends_streams(
    tiny_qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    log = tmp_path_factory.mktemp("doomed-process") / "server.log"
    with serving(tiny_args(tiny_qwen3_dir), log) as server:
        url = f"{server.base_url}/v1/chat/completions"
        body = {
            "model": TINY,
            "messages": [{"role": "user", "content": "Talk."}],
            "max_tokens": 1000,
            "stream": True,
            "logit_bias": {"151645": -100, "151643": -100},  # no EOS: it runs until killed
        }
        child = engine_child(server)
        with httpx.stream("POST", url, json=body, timeout=30) as running:
            lines = running.iter_lines()
            next(lines)
            os.kill(child, signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2][6:])["error"]
        assert error["code"] == "engine_error"
        health = httpx.get(f"{server.base_url}/health")
        assert health.status_code == 503
        assert health.json()["status"] == "engine_stopped"
        refused = httpx.post(url, json={**body, "stream": False, "max_tokens": 2})
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "service_unavailable"


def test_no_engine_process_outlives_its_server(
    tiny_qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = tmp_path_factory.mktemp("lifetimes")
    stopped = ServerProcess(tiny_args(tiny_qwen3_dir), folder / "stopped.log")
    stopped.wait_healthy()
    child = engine_child(stopped)
    assert stopped.stop() == 0  # SIGTERM: the server stops its engine process first
    assert gone(child)

    killed = ServerProcess(tiny_args(tiny_qwen3_dir), folder / "killed.log")
    killed.wait_healthy()
    child = engine_child(killed)
    killed.process.kill()  # no chance to clean up: the engine sees its pipe close
    killed.stop()
    assert gone(child)


def test_a_model_that_fails_to_load_in_the_engine_process_stops_start_up(
    tiny_qwen3_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_qwen3_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_llm_server",
            "--model-name",
            str(broken),
            "--engine-process",
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("mlx-llm-server: Model ") and "could not be loaded" in last, last


def _never_ready() -> ChildModel:
    time.sleep(3600)
    raise AssertionError("unreachable")


def _fails_to_load() -> ChildModel:
    raise ValueError("no weights here")


def test_an_engine_process_that_fails_or_is_stopped_while_starting_ends() -> None:
    failing = EngineProcess(EngineConfig())
    with pytest.raises(ValueError, match="no weights here"):
        failing.start(_fails_to_load).result(timeout=60)
    assert failing.pid is not None and gone(failing.pid)
    assert not failing.running

    starting = EngineProcess(EngineConfig())
    started = starting.start(_never_ready)
    time.sleep(1.0)
    began = time.monotonic()
    starting.stop()  # it reads no messages yet: killed, not waited for
    assert time.monotonic() - began < 5
    assert starting.pid is not None and gone(starting.pid)
    with pytest.raises(RuntimeError, match="exited while starting"):
        started.result(timeout=10)
