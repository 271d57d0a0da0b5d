"""The `<think>` splitter: the same result for every way of cutting the text into increments."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlx_llm_server.text.reasoning import (
    ReasoningDelta,
    ReasoningParser,
    prompt_ends_in_reasoning,
    split_reasoning,
)


def chunkings(text: str, seed: int = 0, random_rounds: int = 20) -> Iterator[list[str]]:
    """Whole; every two-piece split; one character at a time; random chunk sizes."""
    yield [text]
    for cut in range(1, len(text)):
        yield [text[:cut], text[cut:]]
    yield list(text)
    rng = random.Random(seed)
    for _ in range(random_rounds):
        pieces, rest = [], text
        while rest:
            size = rng.randint(1, 8)
            pieces.append(rest[:size])
            rest = rest[size:]
        yield pieces


def stream(pieces: list[str], starts_in_reasoning: bool = False) -> list[ReasoningDelta]:
    parser = ReasoningParser(starts_in_reasoning=starts_in_reasoning)
    out: list[ReasoningDelta] = []
    for piece in pieces:
        out.extend(parser.feed(piece))
    out.extend(parser.flush())
    return out


def joined(deltas: list[ReasoningDelta]) -> tuple[str, str]:
    return "".join(d.content for d in deltas), "".join(d.reasoning for d in deltas)


# (generated text, starts_in_reasoning, expected content, expected reasoning)
CASES = [
    pytest.param(
        "<think>\nThe user asks for 2 + 2.\nThat is 4.\n</think>\n\nThe answer is **4**.",
        False,
        "The answer is **4**.",
        "The user asks for 2 + 2.\nThat is 4.",
        id="qwen3-thinking",
    ),
    pytest.param(
        "<think>\n\n</think>\n\nHello! How can I help?",
        False,
        "Hello! How can I help?",
        "",
        id="empty-think-block",
    ),
    pytest.param("Hello! How can I help?\n", False, "Hello! How can I help?\n", "", id="no-tags"),
    pytest.param(
        "Okay, the user wants a haiku.\n\nLet me count syllables.\n</think>\n\nAutumn moonlight",
        True,
        "Autumn moonlight",
        "Okay, the user wants a haiku.\n\nLet me count syllables.",
        id="prefilled-think",
    ),
    pytest.param(
        "<think>\nStill weighing the options\n",
        False,
        "",
        "Still weighing the options",
        id="missing-end",
    ),
    pytest.param(
        "Wrap it in a <think> tag, then </think>.",
        False,
        "Wrap it in a <think> tag, then </think>.",
        "",
        id="tag-quoted-in-content",
    ),
    pytest.param(
        "<thinking>is not a tag</thinking>",
        False,
        "<thinking>is not a tag</thinking>",
        "",
        id="tag-lookalike",
    ),
    pytest.param(
        "<think>a < b, and </thinking> is no end tag</think>done",
        False,
        "done",
        "a < b, and </thinking> is no end tag",
        id="lookalike-inside-reasoning",
    ),
    pytest.param(
        "\n\n<think>x</think>y  </think>z",
        False,
        "y  </think>z",
        "x",
        id="whitespace-before-tag-and-second-end-tag",
    ),
    pytest.param(
        "<think>\nFirst.\n\n  Second.  \n</think>\n\n  Indented answer\n",
        False,
        "Indented answer\n",
        "First.\n\n  Second.",
        id="inner-whitespace-kept",
    ),
    pytest.param("<think>abc</thi", False, "", "abc</thi", id="truncated-end-tag"),
    pytest.param("<thi", False, "<thi", "", id="truncated-start-tag"),
    pytest.param("  \n", False, "  \n", "", id="whitespace-only"),
    pytest.param("", False, "", "", id="empty"),
    pytest.param("", True, "", "", id="empty-prefilled"),
    pytest.param(
        "Just content, no end tag", True, "", "Just content, no end tag", id="prefilled-no-end"
    ),
]


@pytest.mark.parametrize(("text", "prefilled", "content", "reasoning"), CASES)
def test_every_split_gives_the_same_result(
    text: str, prefilled: bool, content: str, reasoning: str
) -> None:
    assert split_reasoning(text, starts_in_reasoning=prefilled) == (content, reasoning)
    for pieces in chunkings(text):
        deltas = stream(pieces, prefilled)
        assert joined(deltas) == (content, reasoning), pieces
        for delta in deltas:
            # Exactly one field per piece, and no empty pieces.
            assert bool(delta.content) != bool(delta.reasoning), (pieces, delta)


def test_partial_tags_are_held_back() -> None:
    parser = ReasoningParser()
    assert parser.feed("<thi") == []
    assert parser.feed("nk>") == []
    assert parser.in_reasoning
    assert parser.feed("\nabc") == [ReasoningDelta(reasoning="abc")]
    # Trailing whitespace and the partial end tag wait for what follows.
    assert parser.feed("\n</th") == []
    assert parser.feed("e") == [ReasoningDelta(reasoning="\n</the")]
    assert parser.feed(" end </think") == [ReasoningDelta(reasoning=" end")]
    assert parser.feed(">\n\n") == []
    assert not parser.in_reasoning
    assert parser.feed("Hi") == [ReasoningDelta(content="Hi")]
    assert parser.flush() == []


def test_content_streams_without_delay_when_there_is_no_think_block() -> None:
    parser = ReasoningParser()
    assert parser.feed("Hel") == [ReasoningDelta(content="Hel")]
    assert parser.feed("lo <think>") == [ReasoningDelta(content="lo <think>")]
    assert parser.flush() == []


def test_reasoning_streams_as_it_arrives() -> None:
    parser = ReasoningParser(starts_in_reasoning=True)
    assert parser.feed("Let me") == [ReasoningDelta(reasoning="Let me")]
    assert parser.feed(" see") == [ReasoningDelta(reasoning=" see")]
    assert parser.flush() == []


def test_custom_tags() -> None:
    text = "<longcat_think>why</longcat_think>\nbecause"
    parser = ReasoningParser("<longcat_think>", "</longcat_think>")
    deltas = [d for piece in text for d in parser.feed(piece)] + parser.flush()
    assert joined(deltas) == ("because", "why")
    with pytest.raises(ValueError):
        ReasoningParser(start="")


def test_prompt_ends_in_reasoning_on_synthetic_prompts() -> None:
    assert prompt_ends_in_reasoning("<|im_start|>assistant\n<think>\n")
    assert prompt_ends_in_reasoning("<|im_start|>assistant\n<think>")
    assert not prompt_ends_in_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_ends_in_reasoning("<|im_start|>user\nWhat is <think>?<|im_end|>\n")
    assert not prompt_ends_in_reasoning("")


@pytest.fixture(scope="module")
def qwen3_tokenizer(qwen3_tokenizer_path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(qwen3_tokenizer_path))


def test_prompt_ends_in_reasoning_with_the_qwen3_template(qwen3_tokenizer) -> None:
    messages = [{"role": "user", "content": "Explain what <think> does."}]

    def render(**kwargs: object) -> str:
        return qwen3_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **kwargs
        )

    # Thinking on: the model writes `<think>` itself.
    assert not prompt_ends_in_reasoning(render(enable_thinking=True))
    # Thinking off: the template closes an empty block; the generation is all content.
    disabled = render(enable_thinking=False)
    assert disabled.endswith("<think>\n\n</think>\n\n")
    assert not prompt_ends_in_reasoning(disabled)
    assert split_reasoning("Sure.", starts_in_reasoning=prompt_ends_in_reasoning(disabled)) == (
        "Sure.",
        "",
    )
    # A template that pre-fills the opening tag (as later Qwen3 thinking models do).
    assert prompt_ends_in_reasoning(render() + "<think>\n")


def test_qwen3_token_boundaries(qwen3_tokenizer) -> None:
    """Increments cut where Qwen3's tokens are: `<think>` and `</think>` are single tokens."""
    text = "<think>\nThe user greets me.\n</think>\n\nHello there! 👋 Nice to meet you."
    ids = qwen3_tokenizer.encode(text, add_special_tokens=False)
    # Decode growing prefixes so multi-byte characters arrive whole, as the server sends them.
    pieces, previous = [], ""
    for end in range(1, len(ids) + 1):
        decoded = qwen3_tokenizer.decode(ids[:end])
        if decoded.endswith("\ufffd"):
            continue
        pieces.append(decoded[len(previous) :])
        previous = decoded
    assert "".join(pieces) == text
    assert "<think>" in pieces and "</think>" in pieces
    assert joined(stream(pieces)) == ("Hello there! 👋 Nice to meet you.", "The user greets me.")


def test_a_long_run_of_leading_whitespace_is_content_without_waiting_for_the_end() -> None:
    parser = ReasoningParser()
    pieces = [d for _ in range(20) for d in parser.feed("\n")]
    assert "".join(p.content for p in pieces) == "\n" * 20
    assert not any(p.reasoning for p in pieces)
