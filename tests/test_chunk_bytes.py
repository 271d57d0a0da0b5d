"""The streaming fast paths produce what the slow paths would, byte for byte.

A content-only chunk is rendered from a template (`ContentChunks`) and the detokenizer decodes
through the Rust tokenizer directly where transformers would only forward to it; both against
the paths they shortcut, on text that JSON and UTF-8 make tricky.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from mlx_llm_server import protocol as wire
from mlx_llm_server.service import ContentChunks
from mlx_llm_server.text.detokenizer import _info_for

TRICKY = [
    "",
    " hello",
    'quote " and backslash \\ and slash /',
    "new\nline\ttab\rreturn\b\f",
    "".join(chr(c) for c in range(32)) + "\x7f",
    "안녕하세요 你好 こんにちは 😀👨‍👩‍👧 \u2028\u2029 \ufeff \ufffd",
    '"content":"\\u0000"',  # the marker's own text, as content
    "}}]}\n\ndata: [DONE]",
]


def slow_chunk(text: str, index: int, model: str) -> bytes:
    body = wire.ChatCompletionChunk(
        id="chatcmpl-5f0c",
        created=1764500000,
        model=model,
        choices=[wire.ChunkChoice(index=index, delta=wire.ChoiceDelta(content=text or None))],
    )
    return f"data: {body.model_dump_json(exclude_none=True)}\n\n".encode()


@pytest.mark.parametrize("model", ["qwen3", 'odd "model" \\ name ""'])
@pytest.mark.parametrize("index", [0, 3])
def test_content_chunks_match_the_models_rendering(index: int, model: str) -> None:
    template = ContentChunks(lambda text: slow_chunk(text, index, model))
    rng = random.Random(7)
    samples = TRICKY[1:] + [
        "".join(
            chr(rng.choice([rng.randrange(32, 0xD800), rng.randrange(0xE000, 0x110000)]))
            for _ in range(rng.randint(1, 12))
        )
        for _ in range(300)
    ]
    for text in samples:
        fast = template(text)
        assert fast == slow_chunk(text, index, model)
        assert json.loads(fast[len(b"data: ") :])["choices"][0]["delta"]["content"] == text


@pytest.fixture(scope="module")
def qwen(qwen3_tokenizer_path: Path) -> Any:
    return AutoTokenizer.from_pretrained(qwen3_tokenizer_path)


def test_detokenizer_decodes_through_the_rust_tokenizer_exactly(qwen: Any) -> None:
    info = _info_for(qwen)
    assert info.direct_decode is not None  # the fast path is taken for Qwen's tokenizer
    rng = random.Random(3)
    specials = [151643, 151644, 151645, 151667, 151668]
    for trial in range(400):
        ids = [
            rng.choice(specials) if rng.random() < 0.1 else rng.randrange(len(qwen))
            for _ in range(rng.randint(1, 6))
        ]
        skip = trial % 2 == 0
        assert info.decode(ids, skip) == qwen.decode(ids, skip_special_tokens=skip)


def test_detokenizer_keeps_transformers_decode_where_it_does_more(
    qwen3_tokenizer_path: Path,
) -> None:
    cleaned = AutoTokenizer.from_pretrained(qwen3_tokenizer_path, clean_up_tokenization_spaces=True)
    assert _info_for(cleaned).direct_decode is None

    class Wrapped:  # anything else with a decode method
        def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
            return "|".join(map(str, ids))

    wrapped = Wrapped()
    info = _info_for(wrapped)
    assert info.direct_decode is None
    assert info.decode([1, 2], True) == "1|2"
