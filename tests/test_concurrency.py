"""Many users at once: continuous batching, cancellation, backpressure and the prefix cache."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from server_process import ServerProcess, serving

MODEL = "tiny-qwen3"
NO_EOS = {"151645": -100}  # keeps the random model from ending early


def metric(server: ServerProcess, name: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics").text
    match = re.search(rf"^{name}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def wait_for(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def prompts(count: int) -> list[list[dict[str, str]]]:
    return [
        [{"role": "user", "content": f"Question number {i}: " + "why? " * i}] for i in range(count)
    ]


async def greedy_texts(
    base_url: str, conversations: list[list[dict[str, str]]], concurrent: bool
) -> list[str]:
    # Closed before the event loop ends, so no transport outlives its loop.
    async with openai.AsyncOpenAI(
        base_url=f"{base_url}/v1", api_key="unused", max_retries=0
    ) as client:
        return await _greedy_texts(client, conversations, concurrent)


async def _greedy_texts(
    client: openai.AsyncOpenAI, conversations: list[list[dict[str, str]]], concurrent: bool
) -> list[str]:
    async def one(messages: list[dict[str, str]]) -> str:
        stream = await client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=24, temperature=0, logit_bias=NO_EOS, stream=True  # type: ignore[arg-type]
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    if concurrent:
        return list(await asyncio.gather(*(one(m) for m in conversations)))
    return [await one(m) for m in conversations]


def test_concurrent_streams_match_one_at_a_time(tiny_server: ServerProcess) -> None:
    conversations = prompts(6)
    alone = asyncio.run(greedy_texts(tiny_server.base_url, conversations, concurrent=False))
    together = asyncio.run(greedy_texts(tiny_server.base_url, conversations, concurrent=True))
    assert together == alone
    assert metric(tiny_server, "mlx_llm_max_batch_size") >= 4


def test_no_sampling_option_switches_batching_off(tiny_server: ServerProcess) -> None:
    options = [
        {"temperature": 0.7, "top_p": 0.9},
        {"temperature": 1.0, "extra_body": {"top_k": 5}, "seed": 3},
        {"temperature": 0.5, "extra_body": {"min_p": 0.1}, "presence_penalty": 1.0},
        {"temperature": 0.0, "frequency_penalty": 0.5, "logit_bias": {"1": 5}},
        {"temperature": 0.9, "extra_body": {"repetition_penalty": 1.3}},
        {"temperature": 0.8, "logprobs": True, "top_logprobs": 3},
    ]
    steps_before = metric(tiny_server, "mlx_llm_decode_steps_total")
    rows_before = metric(tiny_server, "mlx_llm_decode_rows_total")

    async def run_all() -> None:
        client = openai.AsyncOpenAI(
            base_url=f"{tiny_server.base_url}/v1", api_key="unused", max_retries=0
        )

        async def one(extra: dict[str, object]) -> None:
            bias = {**NO_EOS, **extra.pop("logit_bias", {})}  # type: ignore[dict-item]
            completion = await client.chat.completions.create(
                model=MODEL, messages=prompts(1)[0], max_tokens=40, logit_bias=bias, **extra  # type: ignore[arg-type]
            )
            assert completion.usage is not None and completion.usage.completion_tokens == 40

        async with client:
            await asyncio.gather(*(one(dict(o)) for o in options))

    asyncio.run(run_all())
    steps = metric(tiny_server, "mlx_llm_decode_steps_total") - steps_before
    rows = metric(tiny_server, "mlx_llm_decode_rows_total") - rows_before
    # 6 x 40 tokens in far fewer than 240 steps: the requests shared decode steps.
    assert rows >= 6 * 39
    assert steps < rows / 3


def test_streaming_disconnect_frees_the_slot(tiny_server: ServerProcess) -> None:
    body = {
        "model": MODEL,
        "messages": prompts(1)[0],
        "max_tokens": 900,
        "stream": True,
        "logit_bias": NO_EOS,
    }
    with httpx.stream("POST", f"{tiny_server.base_url}/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        for _ in range(5):
            next(lines)
        assert metric(tiny_server, "mlx_llm_running_sequences") == 1
    wait_for(lambda: metric(tiny_server, "mlx_llm_running_sequences") == 0, timeout=5)
    steps = metric(tiny_server, "mlx_llm_decode_steps_total")
    time.sleep(0.3)
    assert metric(tiny_server, "mlx_llm_decode_steps_total") == steps  # stopped stepping


def test_non_streaming_disconnect_frees_the_slot(tiny_server: ServerProcess) -> None:
    body = {"model": MODEL, "messages": prompts(1)[0], "max_tokens": 900, "logit_bias": NO_EOS}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{tiny_server.base_url}/v1/chat/completions", json=body, timeout=0.5)
    wait_for(lambda: metric(tiny_server, "mlx_llm_running_sequences") == 0, timeout=5)
    assert httpx.get(f"{tiny_server.base_url}/health").status_code == 200


def test_second_turn_reuses_cached_prefix(tiny_server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="unused", max_retries=0)
    system = {"role": "system", "content": "You are a careful assistant. " * 20}
    first_turn = [system, {"role": "user", "content": "First question?"}]
    first = client.chat.completions.create(
        model=MODEL, messages=first_turn, max_tokens=8, temperature=0
    )
    second_turn = [
        *first_turn,
        {"role": "assistant", "content": first.choices[0].message.content or ""},
        {"role": "user", "content": "And a follow-up?"},
    ]
    for stream in (False, True):
        if stream:
            chunks = list(
                client.chat.completions.create(
                    model=MODEL,
                    messages=second_turn,
                    max_tokens=4,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            usage = chunks[-1].usage
        else:
            usage = client.chat.completions.create(
                model=MODEL, messages=second_turn, max_tokens=4
            ).usage
        assert usage is not None and usage.prompt_tokens_details is not None
        cached = usage.prompt_tokens_details.cached_tokens or 0
        assert cached > len(system["content"]) // 8
        assert cached < usage.prompt_tokens


@pytest.fixture(scope="module", params=["engine-thread", "engine-process"])
def small_server(
    request: pytest.FixtureRequest, tiny_qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One running and one queued request at most; the engine on a thread of the server's
    process, or in a process of its own (`--engine-process`), whose queue limit the HTTP
    process keeps."""
    with serving(
        [
            "--model-name",
            str(tiny_qwen3_dir),
            "--served-model-name",
            MODEL,
            "--max-running",
            "1",
            "--max-queued",
            "1",
            "--log-level",
            "info",
            *(["--engine-process"] if request.param == "engine-process" else []),
        ],
        tmp_path_factory.mktemp("small") / "server.log",
    ) as server:
        yield server


def test_full_queue_answers_429_with_retry_after(small_server: ServerProcess) -> None:
    body = {
        "model": MODEL,
        "messages": prompts(1)[0],
        "max_tokens": 2000,
        "stream": True,
        "logit_bias": NO_EOS,
    }
    url = f"{small_server.base_url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body) as running:
        lines = running.iter_lines()
        next(lines)
        with httpx.stream("POST", url, json=body) as queued:
            assert queued.status_code == 200
            try:
                wait_for(lambda: metric(small_server, "mlx_llm_queue_depth") == 1)
            except AssertionError as error:
                rest = list(lines)  # what the running stream said, to tell why it ended
                raise AssertionError(f"{len(rest)} {rest[:2]} {rest[-3:]}") from error
            refused = httpx.post(url, json=body)
            assert refused.status_code == 429
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["type"] == "rate_limit_error"
    # Both clients left: the queued one is dropped, the running one cancelled.
    wait_for(lambda: metric(small_server, "mlx_llm_running_sequences") == 0)
    wait_for(lambda: metric(small_server, "mlx_llm_queue_depth") == 0)
    short = {"model": MODEL, "messages": prompts(1)[0], "max_tokens": 2}
    assert httpx.post(url, json=short).status_code == 200
