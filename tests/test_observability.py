"""What an operator sees, over real HTTP: /metrics, request ids and JSON access logs."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_process import ServerProcess, serving

MODEL = "tiny-qwen3"
NO_EOS = {"151645": -100}
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def observed(
    tiny_qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("observed")
    with serving(
        [
            "--model-name",
            str(tiny_qwen3_dir),
            "--served-model-name",
            MODEL,
            "--max-running",
            "4",
            "--access-log-format",
            "json",
            "--log-level",
            "info",
        ],
        folder / "server.log",
    ) as server:
        yield server


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(server: ServerProcess) -> Samples:
    response = httpx.get(f"{server.base_url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def chat(server: ServerProcess, **extra: object) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}], **extra}
    return httpx.post(f"{server.base_url}{CHAT}", json=body, timeout=60)


def test_requests_latencies_and_tokens_are_counted(observed: ServerProcess) -> None:
    before = scrape(observed)
    plain = chat(observed, max_tokens=6, logit_bias=NO_EOS).json()
    streamed = chat(
        observed,
        max_tokens=5,
        logit_bias=NO_EOS,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = json.loads(streamed.text.split("data: ")[-2])["usage"]
    assert chat(observed, max_tokens=0).status_code == 400
    assert httpx.get(f"{observed.base_url}/v1/nowhere").status_code == 404
    after = scrape(observed)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    route = {"route": CHAT}
    assert delta("mlx_llm_http_requests_total", **route, status="200") == 2
    assert delta("mlx_llm_http_requests_total", **route, status="400") == 1
    assert delta("mlx_llm_http_requests_total", route="other", status="404") == 1
    model = {"model": MODEL}
    for histogram in ("time_to_first_token", "request_duration"):
        assert delta(f"mlx_llm_{histogram}_seconds_count", **model) == 2
        assert delta(f"mlx_llm_{histogram}_seconds_sum", **model) > 0
    # One gap between each pair of consecutive tokens.
    assert delta("mlx_llm_inter_token_seconds_count", **model) == (6 - 1) + (5 - 1)
    prompt = plain["usage"]["prompt_tokens"] + usage["prompt_tokens"]
    assert delta("mlx_llm_prompt_tokens_total", **model) == prompt
    assert delta("mlx_llm_completion_tokens_total", **model) == 6 + 5
    # Where the engine's time went: prompt work and decode steps both took some.
    assert delta("mlx_llm_engine_prefill_seconds_total", **model) > 0
    assert delta("mlx_llm_engine_prompts_prefilled_total", **model) == 2
    assert delta("mlx_llm_engine_prefill_steps_total", **model) == 2  # one after the other
    decode = delta("mlx_llm_engine_decode_seconds_total", **model)
    assert decode > 0
    # Parts of it waiting on the device for tokens and queuing steps: never more than the whole.
    waited = delta("mlx_llm_engine_decode_wait_seconds_total", **model)
    launched = delta("mlx_llm_engine_decode_launch_seconds_total", **model)
    assert waited > 0 and launched > 0 and waited + launched <= decode


def test_engine_state_and_memory_are_exposed(observed: ServerProcess) -> None:
    samples = scrape(observed)
    model = {"model": MODEL}
    for gauge in (
        "mlx_llm_queue_depth",
        "mlx_llm_running_sequences",
        "mlx_llm_kv_cache_bytes",
        "mlx_llm_prefix_cache_bytes",
        "mlx_llm_prefix_cache_entries",
    ):
        assert (gauge, frozenset(model.items())) in samples, gauge
    assert value(samples, "mlx_llm_engine_up", **model) == 1
    assert value(samples, "mlx_llm_mlx_active_memory_bytes") > 0  # the weights, at least
    assert value(samples, "mlx_llm_mlx_peak_memory_bytes") > 0
    assert ("mlx_llm_mlx_cache_memory_bytes", frozenset()) in samples
    assert value(samples, "process_resident_memory_bytes") > 0


def test_running_sequences_and_kv_memory_while_decoding(observed: ServerProcess) -> None:
    started = threading.Event()

    def long_stream() -> None:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Tell me everything."}],
            "max_tokens": 300,
            "logit_bias": NO_EOS,
            "stream": True,
        }
        with httpx.stream("POST", f"{observed.base_url}{CHAT}", json=body, timeout=60) as r:
            for _ in r.iter_lines():
                started.set()

    thread = threading.Thread(target=long_stream)
    thread.start()
    assert started.wait(30)
    during = scrape(observed)
    thread.join(60)
    model = {"model": MODEL}
    assert value(during, "mlx_llm_running_sequences", **model) == 1
    assert value(during, "mlx_llm_kv_cache_bytes", **model) > 0
    after = scrape(observed)
    assert value(after, "mlx_llm_running_sequences", **model) == 0
    assert value(after, "mlx_llm_queue_depth", **model) == 0


def test_prefix_cache_hits_and_bytes(observed: ServerProcess) -> None:
    system = {"role": "system", "content": "You are a careful assistant. " * 20}
    first = [system, {"role": "user", "content": "First question?"}]
    before = scrape(observed)
    answer = chat(observed, messages=first, max_tokens=4, temperature=0).json()
    second = [
        *first,
        {"role": "assistant", "content": answer["choices"][0]["message"]["content"]},
        {"role": "user", "content": "And a follow-up?"},
    ]
    usage = chat(observed, messages=second, max_tokens=4).json()["usage"]
    after = scrape(observed)
    model = {"model": MODEL}
    hits = value(after, "mlx_llm_prefix_cache_hits_total", **model)
    assert hits - value(before, "mlx_llm_prefix_cache_hits_total", **model) >= 1
    assert value(after, "mlx_llm_prefix_cache_bytes", **model) > 0
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0


def access_lines(server: ServerProcess) -> list[dict[str, object]]:
    lines = []
    for line in server.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"request_id"' in line:
            lines.append(json.loads(line))
    return lines


def wait_for_line(server: ServerProcess, request_id: str) -> dict[str, object]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        found = [line for line in access_lines(server) if line["request_id"] == request_id]
        if found:
            return found[-1]
        time.sleep(0.05)
    raise AssertionError(f"no access line for {request_id}")


def test_request_id_is_echoed_and_logged_as_json(observed: ServerProcess) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    response = httpx.post(
        f"{observed.base_url}{CHAT}", json=body, headers={"X-Request-Id": "trace-abc-123"}
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "trace-abc-123"
    line = wait_for_line(observed, "trace-abc-123")
    assert line["method"] == "POST"
    assert line["path"] == CHAT
    assert line["status"] == 200
    assert isinstance(line["duration_s"], float) and line["duration_s"] > 0
    assert line["client"] == "127.0.0.1"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", str(line["time"]))

    generated = httpx.get(f"{observed.base_url}/health").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert wait_for_line(observed, generated)["status"] == 200


def test_refused_requests_are_logged_and_counted_too(observed: ServerProcess) -> None:
    before = scrape(observed)
    refused = httpx.get(
        f"{observed.base_url}/v1/models",
        headers={"Host": "evil.example", "X-Request-Id": "refused-1"},
    )
    assert refused.status_code == 403
    assert refused.headers["x-request-id"] == "refused-1"
    assert wait_for_line(observed, "refused-1")["status"] == 403
    after = scrape(observed)
    labels = {"route": "/v1/models", "status": "403"}
    assert value(after, "mlx_llm_http_requests_total", **labels) == (
        value(before, "mlx_llm_http_requests_total", **labels) + 1
    )
