"""Tool-call extraction: OpenAI-shaped events, the same for every way of cutting the text."""

from __future__ import annotations

import copy
import itertools
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from mlx_llm_server.text.reasoning import ReasoningParser
from mlx_llm_server.text.tool_calls import (
    HERMES,
    TOOL_CALL_FORMATS,
    ContentDelta,
    ParsedToolCall,
    ToolCallDelta,
    ToolCallEvent,
    ToolCallFormat,
    ToolCallParser,
    collect_tool_call_events,
    detect_tool_format,
    new_tool_call_id,
    parse_tool_calls,
    to_template_messages,
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
            size = rng.randint(1, 12)
            pieces.append(rest[:size])
            rest = rest[size:]
        yield pieces


def counting_ids() -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def stream(
    pieces: list[str], tool_format: ToolCallFormat = HERMES, tools: list | None = None
) -> list[ToolCallEvent]:
    parser = ToolCallParser(tool_format, tools, id_factory=counting_ids())
    events: list[ToolCallEvent] = []
    for piece in pieces:
        events.extend(parser.feed(piece))
    events.extend(parser.finish())
    assert parser.calls == collect_tool_call_events(events)[1]
    return events


def check_event_shapes(events: list[ToolCallEvent]) -> None:
    """Each call: a header delta (id, name, empty arguments), then argument fragments."""
    seen: set[int] = set()
    for event in events:
        if isinstance(event, ContentDelta):
            assert event.text
            continue
        if event.index not in seen:
            assert event.index == len(seen)
            assert event.id is not None and event.name is not None
            assert event.arguments_delta == ""
            seen.add(event.index)
        else:
            assert event.id is None and event.name is None
            assert event.arguments_delta


def calls_of(text: str, **kwargs: object) -> list[tuple[str, dict]]:
    _, calls = parse_tool_calls(text, id_factory=counting_ids(), **kwargs)
    return [(call.name, json.loads(call.arguments_json)) for call in calls]


def hermes(name: str, arguments: dict) -> str:
    """A call block exactly as Qwen3 writes it."""
    payload = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"<tool_call>\n{payload}\n</tool_call>"


PARIS = hermes("get_weather", {"city": "Paris", "unit": "celsius"})
LONDON = hermes("get_weather", {"city": "London", "unit": "celsius"})
CODE = hermes("run_python", {"code": "print('<tool_call>')\nx = {'a': [1, 2]}"})
MALFORMED = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>'

# (generated text, expected content, expected [(name, arguments)])
CASES = [
    pytest.param(PARIS, "", [("get_weather", {"city": "Paris", "unit": "celsius"})], id="one"),
    pytest.param(
        f"{PARIS}\n{LONDON}",
        "",
        [
            ("get_weather", {"city": "Paris", "unit": "celsius"}),
            ("get_weather", {"city": "London", "unit": "celsius"}),
        ],
        id="two",
    ),
    pytest.param(
        f"I'll check both cities.\n\n{PARIS}\n{LONDON}\n",
        "I'll check both cities.",
        [
            ("get_weather", {"city": "Paris", "unit": "celsius"}),
            ("get_weather", {"city": "London", "unit": "celsius"}),
        ],
        id="content-then-calls",
    ),
    pytest.param(
        f"Checking.\n{PARIS}\nMeanwhile, pack an umbrella.\n",
        "Checking.\nMeanwhile, pack an umbrella.\n",
        [("get_weather", {"city": "Paris", "unit": "celsius"})],
        id="content-around-a-call",
    ),
    pytest.param(
        CODE,
        "",
        [("run_python", {"code": "print('<tool_call>')\nx = {'a': [1, 2]}"})],
        id="marker-inside-a-json-string",
    ),
    pytest.param(
        hermes("lookup", {"city": "Zürich", "note": "日本語 ✓"}),
        "",
        [("lookup", {"city": "Zürich", "note": "日本語 ✓"})],
        id="non-ascii-arguments",
    ),
    pytest.param(
        '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>',
        "",
        [("now", {})],
        id="empty-arguments",
    ),
    pytest.param(
        '<tool_call>\n{"name": "now"}\n</tool_call>', "", [("now", {})], id="arguments-missing"
    ),
    pytest.param(
        '<tool_call>\n{"name": "f", "arguments": "{\\"x\\": 1}"}\n</tool_call>',
        "",
        [("f", {"x": 1})],
        id="arguments-as-json-string",
    ),
    pytest.param(
        '<tool_call>\n{"name": "f", "parameters": {"x": 1}}\n</tool_call>',
        "",
        [("f", {"x": 1})],
        id="parameters-key",
    ),
    pytest.param(
        '<tool_call>\n[{"name": "f", "arguments": {}}, {"name": "g", "arguments": {"y": 2}}]\n'
        "</tool_call>",
        "",
        [("f", {}), ("g", {"y": 2})],
        id="list-in-one-block",
    ),
    pytest.param(
        '<tool_call>\n{"name": "write", "arguments": {"text": "line one\nline two"}}\n</tool_call>',
        "",
        [("write", {"text": "line one\nline two"})],
        id="raw-newline-in-a-string",
    ),
    pytest.param(MALFORMED, MALFORMED, [], id="malformed-json"),
    pytest.param(
        f"Sure.\n{MALFORMED}\n{PARIS}",
        f"Sure.\n{MALFORMED}",
        [("get_weather", {"city": "Paris", "unit": "celsius"})],
        id="malformed-then-valid",
    ),
    pytest.param(
        '<tool_call>\n{"arguments": {"x": 1}}\n</tool_call>',
        '<tool_call>\n{"arguments": {"x": 1}}\n</tool_call>',
        [],
        id="no-name",
    ),
    pytest.param(
        '<tool_call>\n{"name": "f", "arguments": [1, 2]}\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": [1, 2]}\n</tool_call>',
        [],
        id="arguments-not-an-object",
    ),
    pytest.param(
        '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n',
        "",
        [("f", {"x": 1})],
        id="unterminated-but-complete",
    ),
    pytest.param(
        'Ok.\n<tool_call>\n{"name": "f", "argu',
        'Ok.\n<tool_call>\n{"name": "f", "argu',
        [],
        id="unterminated-truncated",
    ),
    pytest.param(
        "Use <b>bold</b> and <tool> tags; <tool_call is not a marker.\n",
        "Use <b>bold</b> and <tool> tags; <tool_call is not a marker.\n",
        [],
        id="marker-lookalikes",
    ),
    pytest.param("The weather is fine.", "The weather is fine.", [], id="content-only"),
    pytest.param("Trailing <tool_c", "Trailing <tool_c", [], id="truncated-marker"),
    pytest.param("", "", [], id="empty"),
]


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_every_split_gives_the_same_result(text: str, content: str, calls: list) -> None:
    expected_content, expected_calls = parse_tool_calls(text, id_factory=counting_ids())
    assert expected_content == content
    assert [(c.name, json.loads(c.arguments_json)) for c in expected_calls] == calls
    for pieces in chunkings(text):
        events = stream(pieces)
        check_event_shapes(events)
        assert collect_tool_call_events(events) == (expected_content, expected_calls), pieces
        if calls:
            # A valid call never shows its markers in content.
            assert "</tool_call>" not in "".join(
                e.text for e in events if isinstance(e, ContentDelta)
            ).replace(MALFORMED, "")


def test_streamed_events_match_openai_deltas() -> None:
    parser = ToolCallParser(id_factory=counting_ids())
    assert parser.feed("Let me check.\n<tool") == [ContentDelta("Let me check.")]
    assert parser.feed('_call>\n{"name": "get_weather", ') == []
    events = parser.feed('"arguments": {"city": "Paris"}}\n</tool_call>\n')
    assert [event.to_openai() for event in events] == [
        {
            "index": 0,
            "id": "call_0",
            "type": "function",
            "function": {"name": "get_weather", "arguments": ""},
        },
        {"index": 0, "function": {"arguments": '{"city": "Paris"}'}},
    ]
    assert parser.feed(LONDON)[0] == ToolCallDelta(1, "call_1", "get_weather", "")
    assert parser.finish() == []
    assert [call.to_openai() for call in parser.calls] == [
        {
            "id": "call_0",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        },
        {
            "id": "call_1",
            "type": "function",
            "function": {
                "name": "get_weather",
                "arguments": '{"city": "London", "unit": "celsius"}',
            },
        },
    ]


def test_whitespace_after_a_call_waits_for_what_follows() -> None:
    parser = ToolCallParser(id_factory=counting_ids())
    assert len(parser.feed(PARIS)) == 2
    assert parser.feed("\n") == []  # dropped if another call or the end follows
    assert parser.feed("Done") == [ContentDelta("\nDone")]


def test_default_ids_look_like_openai_ids() -> None:
    _, calls = parse_tool_calls(f"{PARIS}{LONDON}")
    assert all(call.id.startswith("call_") and len(call.id) == 29 for call in calls)
    assert calls[0].id != calls[1].id
    assert new_tool_call_id() != new_tool_call_id()


def test_reasoning_then_tool_calls_stream_like_the_whole() -> None:
    """The server chains the two parsers: reasoning first, its content into the tool parser."""
    text = (
        "<think>\nThe user wants the weather in Paris and London; call the tool twice.\n"
        f"</think>\n\n{PARIS}\n{LONDON}"
    )
    for pieces in chunkings(text, random_rounds=5):
        reasoning_parser = ReasoningParser()
        tool_parser = ToolCallParser(id_factory=counting_ids())
        reasoning, events = [], []
        for piece in [*pieces, None]:
            deltas = reasoning_parser.feed(piece) if piece is not None else reasoning_parser.flush()
            for delta in deltas:
                reasoning.append(delta.reasoning)
                events.extend(tool_parser.feed(delta.content))
        events.extend(tool_parser.finish())
        content, calls = collect_tool_call_events(events)
        assert "".join(reasoning).startswith("The user wants the weather")
        assert content == ""
        assert [json.loads(call.arguments_json)["city"] for call in calls] == ["Paris", "London"]


# --- Formats -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen3_tokenizer(qwen3_tokenizer_path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(qwen3_tokenizer_path))


def test_qwen3_template_is_detected_as_hermes(qwen3_tokenizer) -> None:
    assert detect_tool_format(qwen3_tokenizer.chat_template) is HERMES


def test_templates_without_tool_calls() -> None:
    assert detect_tool_format(None) is None
    assert detect_tool_format("{{ messages[0].content }}") is None


# A snippet of each family's template, enough for its markers to be recognised.
TEMPLATE_SNIPPETS = {
    "minimax_m2": "{{ '<minimax:tool_call>' }}",
    "gemma4": "{{ '<|tool_call>call:' }}{{ '<tool_call|>' }}",
    "function_gemma": "{{ '<start_function_call>' }}",
    "longcat": "<longcat_tool_call>",
    "glm47": "<tool_call>{{ name }}<arg_key>",
    "pythonic": "<|tool_call_start|>",
    "qwen3_coder": "{{- '<tool_call>\\n<function=' + tool_call.name }}",
    "kimi_k2": "<|tool_calls_section_begin|>",
    "minicpm5": '<function name="{{ name }}"><param name="x">',
    "mistral": "[TOOL_CALLS]",
    "muse_spark": "<atem:function_calls>",
    "hermes": "<tool_call>\n{{ tool_call.name }}",
}


@pytest.mark.parametrize("name", sorted(TEMPLATE_SNIPPETS))
def test_detection_agrees_with_mlx_lm(name: str) -> None:
    tokenizer_utils = pytest.importorskip("mlx_lm.tokenizer_utils")
    template = TEMPLATE_SNIPPETS[name]
    shim = SimpleNamespace(chat_template=template, get_vocab=dict)
    expected = tokenizer_utils._infer_tool_parser(shim)
    detected = detect_tool_format(template)
    assert detected is not None and detected.name == name
    assert {"json_tools": "hermes"}.get(expected, expected) == name


@pytest.mark.parametrize("name", sorted(set(TOOL_CALL_FORMATS) - {"hermes"}))
def test_markers_agree_with_mlx_lm(name: str) -> None:
    module = pytest.importorskip(f"mlx_lm.tool_parsers.{name}")
    tool_format = TOOL_CALL_FORMATS[name]
    assert (tool_format.start, tool_format.end) == (module.tool_call_start, module.tool_call_end)


def test_hermes_markers_agree_with_mlx_lm_json_tools() -> None:
    module = pytest.importorskip("mlx_lm.tool_parsers.json_tools")
    assert (HERMES.start, HERMES.end) == (module.tool_call_start, module.tool_call_end)


QWEN3_CODER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            },
        },
    }
]


def test_qwen3_coder_reuses_the_mlx_lm_parser() -> None:
    pytest.importorskip("mlx_lm.tool_parsers.qwen3_coder")
    text = (
        "Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
    )
    tool_format = TOOL_CALL_FORMATS["qwen3_coder"]
    expected = ("Checking.", [("get_weather", {"city": "Paris", "days": 3})])
    for pieces in chunkings(text, random_rounds=5):
        events = stream(pieces, tool_format, QWEN3_CODER_TOOLS)
        check_event_shapes(events)
        content, calls = collect_tool_call_events(events)
        assert (content, [(c.name, json.loads(c.arguments_json)) for c in calls]) == expected


def test_mistral_calls_run_to_the_end_of_the_generation() -> None:
    pytest.importorskip("mlx_lm.tool_parsers.mistral")
    tool_format = TOOL_CALL_FORMATS["mistral"]
    parser = ToolCallParser(tool_format, id_factory=counting_ids())
    assert parser.feed("On it. ") == [ContentDelta("On it.")]
    assert parser.feed('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}') == []
    events = parser.finish()
    assert events == [
        ToolCallDelta(0, "call_0", "get_weather", ""),
        ToolCallDelta(0, None, None, '{"city": "Paris"}'),
    ]
    assert calls_of("[TOOL_CALLS]oops[ARGS]{", tool_format=tool_format) == []


# --- Rendering a tool conversation through the real template -------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_abc123",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_abc123", "content": '{"temp_c": 18}'},
]


def test_openai_tool_conversation_renders_through_the_qwen3_template(qwen3_tokenizer) -> None:
    original = copy.deepcopy(CONVERSATION)
    messages = to_template_messages(CONVERSATION)
    assert original == CONVERSATION  # the input is not modified
    assert messages[2]["content"] == ""
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert messages[3]["tool_call_id"] == "call_abc123"

    prompt = qwen3_tokenizer.apply_chat_template(
        messages, tools=[WEATHER_TOOL], tokenize=False, add_generation_prompt=True
    )
    system_turn = prompt.split("<|im_end|>")[0]
    assert "You are terse." in system_turn and '"name": "get_weather"' in system_turn
    assistant_turn = prompt.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    assert assistant_turn == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    )
    assert '<|im_start|>user\n<tool_response>\n{"temp_c": 18}\n</tool_response><|im_end|>' in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    # What the template renders for a call, the parser reads back as the same call.
    content, calls = parse_tool_calls(assistant_turn)
    assert content == ""
    assert [(c.name, json.loads(c.arguments_json)) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]


def test_content_alongside_tool_calls_renders(qwen3_tokenizer) -> None:
    messages = to_template_messages(
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Paris "},
                    {"type": "text", "text": "and Rome?"},
                ],
            },
            {
                "role": "assistant",
                "content": "Checking both.",
                "tool_calls": [
                    {
                        "id": "a",
                        "type": "function",
                        "function": {"name": "w", "arguments": '{"c": "Paris"}'},
                    },
                    {"id": "b", "type": "function", "function": {"name": "w", "arguments": ""}},
                ],
            },
            {"role": "tool", "tool_call_id": "a", "content": "18"},
            {"role": "tool", "tool_call_id": "b", "content": [{"type": "text", "text": "21"}]},
        ]
    )
    assert messages[0]["content"] == "Paris and Rome?"
    prompt = qwen3_tokenizer.apply_chat_template(messages, tokenize=False)
    assert (
        'Checking both.\n<tool_call>\n{"name": "w", "arguments": {"c": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "w", "arguments": {}}\n</tool_call>'
    ) in prompt
    assert "<tool_response>\n18\n</tool_response>\n<tool_response>\n21\n</tool_response>" in prompt


def test_to_template_messages_leaves_what_it_cannot_improve() -> None:
    image_parts = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {}},
    ]
    messages = to_template_messages(
        [
            {"role": "user", "content": image_parts},
            {
                "role": "assistant",
                "content": None,
                "reasoning_content": "thought",
                "tool_calls": [
                    {
                        "id": "x",
                        "type": "function",
                        "function": {"name": "f", "arguments": "not json"},
                    }
                ],
            },
        ]
    )
    assert messages[0]["content"] == image_parts
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == "not json"
    assert messages[1]["reasoning_content"] == "thought"


def test_parsed_call_round_trips_through_openai_shape() -> None:
    call = ParsedToolCall("call_1", "f", '{"x": 1}')
    assert to_template_messages(
        [{"role": "assistant", "content": None, "tool_calls": [call.to_openai()]}]
    )[0]["tool_calls"][0]["function"] == {"name": "f", "arguments": {"x": 1}}
