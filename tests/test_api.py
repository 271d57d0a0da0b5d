"""The specified endpoints over real HTTP, with the official `openai` client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from conftest import TINY_CONTEXT
from model_factory import qwen3_tokenizer_dir
from server_process import ServerProcess
from transformers import AutoTokenizer

MODEL = "tiny-qwen3"
MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def client(tiny_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer() -> object:
    return AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())


def prompt_token_count(tokenizer: object, messages: list[dict[str, str]]) -> int:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)  # type: ignore[attr-defined]
    return len(tokenizer.encode(text, add_special_tokens=False))  # type: ignore[attr-defined]


def test_health_names_the_model(tiny_server: ServerProcess) -> None:
    response = httpx.get(f"{tiny_server.base_url}/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "models": [MODEL]}


def test_models_list_in_openai_format(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].object == "model"
    assert isinstance(models[0].created, int)
    assert models[0].owned_by


def test_non_streaming_completion(client: openai.OpenAI, tokenizer: object) -> None:
    completion = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8)
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == MODEL
    assert isinstance(completion.created, int)
    choice = completion.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens == prompt_token_count(tokenizer, MESSAGES)
    assert 1 <= usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_max_tokens_ends_with_length(client: openai.OpenAI) -> None:
    # logit_bias keeps end-of-sequence away, so the limit is what ends the answer.
    completion = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=5, logit_bias={"151645": -100}
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 5


def test_max_completion_tokens_is_honoured(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=3, logit_bias={"151645": -100}
    )
    assert completion.usage is not None and completion.usage.completion_tokens == 3


def test_streaming_matches_non_streaming(client: openai.OpenAI) -> None:
    kwargs = {"model": MODEL, "messages": MESSAGES, "max_tokens": 12, "temperature": 0.0}
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[0].choices[0].delta.role == "assistant"
    assert all(c.id == whole.id or c.id.startswith("chatcmpl-") for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    finishes = [c.choices[0].finish_reason for c in content_chunks]
    assert finishes[-1] in ("stop", "length")
    assert all(f is None for f in finishes[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == whole.choices[0].message.content
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_raw_stream_ends_with_done(tiny_server: ServerProcess) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{tiny_server.base_url}/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["choices"][0]["delta"]["role"] == "assistant"
    last = json.loads(events[-2][6:])
    assert last["choices"][0]["finish_reason"] in ("stop", "length")


def test_content_parts_and_unknown_fields_are_accepted(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Again."},
        ],
        max_tokens=3,
        extra_body={"some_future_field": {"x": 1}, "metadata": {"a": "b"}},
    )
    assert completion.choices[0].message.content is not None


# Errors ----------------------------------------------------------------------------------

BAD_REQUESTS = [
    ("not json", b"{not json", 400),
    ("non-object body", b"[1, 2]", 400),
    ("missing messages", json.dumps({"model": MODEL}).encode(), 400),
    ("empty messages", json.dumps({"model": MODEL, "messages": []}).encode(), 400),
    ("messages not a list", json.dumps({"model": MODEL, "messages": "hi"}).encode(), 400),
    (
        "unknown role",
        json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}).encode(),
        400,
    ),
    (
        "content of wrong type",
        json.dumps({"model": MODEL, "messages": [{"role": "user", "content": 5}]}).encode(),
        400,
    ),
    (
        "max_tokens as string",
        json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": "5"}).encode(),
        400,
    ),
    (
        "negative max_tokens",
        json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": -1}).encode(),
        400,
    ),
    (
        "temperature out of range",
        json.dumps({"model": MODEL, "messages": MESSAGES, "temperature": 5}).encode(),
        400,
    ),
    (
        "top_p out of range",
        json.dumps({"model": MODEL, "messages": MESSAGES, "top_p": 1.5}).encode(),
        400,
    ),
    ("NaN temperature", b'{"model": "tiny-qwen3", "messages": [], "temperature": NaN}', 400),
    ("invalid UTF-8", b'{"model": "tiny-qwen3", "messages": "\xff\xfe"}', 400),
    (
        "unknown model",
        json.dumps({"model": "no-such-model", "messages": MESSAGES}).encode(),
        404,
    ),
    (
        "stream not a boolean",
        json.dumps({"model": MODEL, "messages": MESSAGES, "stream": "yes"}).encode(),
        400,
    ),
]


@pytest.mark.parametrize(("name", "body", "status"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors(
    tiny_server: ServerProcess, name: str, body: bytes, status: int
) -> None:
    response = httpx.post(
        f"{tiny_server.base_url}/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["type"] == "invalid_request_error"
    assert httpx.get(f"{tiny_server.base_url}/health").status_code == 200


def test_unknown_model_is_404_with_code(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-17", messages=MESSAGES)
    assert raised.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_context_length_exceeded_before_streaming(client: openai.OpenAI) -> None:
    long_prompt = [{"role": "user", "content": "word " * (TINY_CONTEXT + 10)}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as raised:
            client.chat.completions.create(model=MODEL, messages=long_prompt, stream=stream)
        assert raised.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    short = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, messages=short, max_tokens=TINY_CONTEXT)
    assert raised.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    assert client.chat.completions.create(model=MODEL, messages=short, max_tokens=2).choices


def test_unsupported_fields_are_refused_not_ignored(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=MODEL, prompt="Once", suffix="the end")
    assert raised.value.body["param"] == "suffix"  # type: ignore[index]


def test_unknown_route_is_openai_404(tiny_server: ServerProcess) -> None:
    response = httpx.get(f"{tiny_server.base_url}/v1/nothing-here")
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
