"""Exact text over HTTP: multibyte characters split across tokens, stop strings, finish reasons.

The scripted model answers every prompt with SCRIPT_TEXT, whose Korean, CJK and emoji
characters span several tokens each (each such token decodes alone to U+FFFD).
"""

from __future__ import annotations

import openai
import pytest
from conftest import SCRIPT_TEXT
from server_process import ServerProcess

MESSAGES = [{"role": "user", "content": "Anything."}]


@pytest.fixture(scope="module")
def client(scripted_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{scripted_server.base_url}/v1", api_key="unused", max_retries=0)


def stream_pieces(client: openai.OpenAI, **kwargs: object) -> tuple[list[str], str | None]:
    pieces: list[str] = []
    finish = None
    for chunk in client.chat.completions.create(
        model="scripted", messages=MESSAGES, stream=True, **kwargs  # type: ignore[call-overload]
    ):
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    return pieces, finish


def test_the_script_splits_characters_across_tokens(script_tokens: list[int]) -> None:
    from model_factory import qwen3_tokenizer_dir
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())
    alone = [tokenizer.decode([t]) for t in script_tokens]
    assert sum("\ufffd" in piece for piece in alone) >= 5


def test_stream_never_emits_broken_characters(client: openai.OpenAI) -> None:
    pieces, finish = stream_pieces(client)
    assert "".join(pieces) == SCRIPT_TEXT
    assert not any("\ufffd" in piece for piece in pieces)
    for piece in pieces:
        piece.encode("utf-8")  # no lone surrogates either
    assert len(pieces) > 5  # it really streamed in increments
    assert finish == "stop"


def test_non_streaming_text_and_usage(client: openai.OpenAI, script_tokens: list[int]) -> None:
    completion = client.chat.completions.create(model="scripted", messages=MESSAGES)
    assert completion.choices[0].message.content == SCRIPT_TEXT
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    # Every scripted token plus the end-of-sequence token.
    assert completion.usage.completion_tokens == len(script_tokens) + 1


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        (" STOP", "Hello 쀍龘🎉 한국어 日本語の文字 中文 𠜎"),
        (["nothing", "文字"], "Hello 쀍龘🎉 한국어 日本語の"),
        ("龘", "Hello 쀍"),
        ("Hello", ""),
    ],
)
def test_stop_strings_cut_the_text(
    client: openai.OpenAI, stop: str | list[str], expected: str, stream: bool
) -> None:
    if stream:
        pieces, finish = stream_pieces(client, stop=stop)
        text = "".join(pieces)
        assert not any("\ufffd" in piece for piece in pieces)
    else:
        completion = client.chat.completions.create(model="scripted", messages=MESSAGES, stop=stop)
        text, finish = completion.choices[0].message.content, completion.choices[0].finish_reason
    assert text == expected
    assert finish == "stop"


def test_length_mid_character_emits_no_broken_text(client: openai.OpenAI) -> None:
    # "Hello" and " " then the first byte-token of 쀍: the cut leaves an incomplete character.
    pieces, finish = stream_pieces(client, max_tokens=3)
    assert finish == "length"
    assert not any("\ufffd" in piece for piece in pieces)
