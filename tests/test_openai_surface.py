"""The wider OpenAI surface with the official client: completions, sampling, logprobs, n,
reasoning, tool calls and structured output."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from server_process import ServerProcess

MODEL = "tiny-qwen3"
NO_EOS = {"151645": -100}
QUESTION = [{"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
def client(tiny_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def agent(agent_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{agent_server.base_url}/v1", api_key="unused", max_retries=0)


# Legacy completions ----------------------------------------------------------------------


def test_completion_with_a_string_prompt(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=6, logit_bias=NO_EOS
    )
    assert completion.id.startswith("cmpl-")
    assert completion.object == "text_completion"
    assert len(completion.choices) == 1
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 6


def test_completion_with_several_prompts_and_choices(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model=MODEL, prompt=["One", "Two"], n=2, max_tokens=3, logit_bias=NO_EOS, seed=1
    )
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    assert completion.usage is not None and completion.usage.completion_tokens == 12


def test_completion_with_token_ids_and_echo(client: openai.OpenAI) -> None:
    ids = [9707, 11, 1879]  # "Hello, world"
    completion = client.completions.create(
        model=MODEL, prompt=ids, echo=True, max_tokens=2, logit_bias=NO_EOS
    )
    assert completion.choices[0].text.startswith("Hello, world")
    assert completion.usage is not None and completion.usage.prompt_tokens == 3


def test_completion_stream_and_logprobs(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="Hi", max_tokens=5, logit_bias=NO_EOS, stream=True, logprobs=2
        )
    )
    assert chunks[-1].choices[0].finish_reason == "length"
    tokens = [
        t for c in chunks for t in (c.choices[0].logprobs.tokens if c.choices[0].logprobs else [])
    ]
    assert len(tokens) == 5
    whole = client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=5, logit_bias=NO_EOS, logprobs=2, temperature=0
    )
    logprobs = whole.choices[0].logprobs
    assert logprobs is not None
    assert len(logprobs.tokens or []) == len(logprobs.token_logprobs or []) == 5
    assert all(len(top) <= 2 for top in logprobs.top_logprobs or [])
    assert (logprobs.text_offset or [])[0] == 0


# Sampling ---------------------------------------------------------------------------------


def test_same_seed_same_output_even_under_load(tiny_server: ServerProcess) -> None:
    aclient = openai.AsyncOpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="x", max_retries=0)

    async def seeded(seed: int) -> str:  # the client is closed inside the loop, below
        completion = await aclient.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            max_tokens=12,
            temperature=1.0,
            seed=seed,
            logit_bias=NO_EOS,
        )
        return completion.choices[0].message.content or ""

    async def scenario() -> tuple[str, str, str, list[str]]:
        async with aclient:
            alone = await seeded(42)
            again = await seeded(42)
            other = await seeded(7)
            crowded = await asyncio.gather(*(seeded(s) for s in (42, 1, 2, 3, 42)))
        return alone, again, other, list(crowded)

    alone, again, other, crowded = asyncio.run(scenario())
    assert alone == again
    assert other != alone
    assert crowded[0] == alone and crowded[4] == alone


def test_n_choices_are_indexed_and_differ(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        n=3,
        max_tokens=8,
        temperature=1.0,
        seed=5,
        logit_bias=NO_EOS,
    )
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert len({c.message.content for c in completion.choices}) > 1
    assert completion.usage is not None and completion.usage.completion_tokens == 24
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=QUESTION, n=2, max_tokens=4, stream=True, logit_bias=NO_EOS
        )
    )
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_chat_logprobs_in_openai_format(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=4,
        logprobs=True,
        top_logprobs=3,
        logit_bias=NO_EOS,
    )
    content = completion.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 4
    for entry in content:
        assert entry.logprob <= 0
        assert isinstance(entry.bytes, list)
        assert len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
    streamed = [
        c.choices[0].logprobs
        for c in client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            max_tokens=3,
            logprobs=True,
            stream=True,
            logit_bias=NO_EOS,
        )
        if c.choices and c.choices[0].logprobs
    ]
    assert sum(len(lp.content or []) for lp in streamed) == 3


def test_top_logprobs_without_logprobs_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=QUESTION, top_logprobs=2)


# Reasoning and tool calls -----------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}


def test_reasoning_goes_to_reasoning_content(agent: openai.OpenAI) -> None:
    completion = agent.chat.completions.create(model="agent", messages=QUESTION)
    message = completion.choices[0].message
    assert message.reasoning_content == "The user wants the weather, so I call the tool."  # type: ignore[attr-defined]
    assert message.content is not None
    assert message.content.startswith("Let me look that up.")
    assert "<think>" not in message.content


def test_tool_call_non_streaming(agent: openai.OpenAI) -> None:
    completion = agent.chat.completions.create(
        model="agent", messages=QUESTION, tools=[WEATHER_TOOL]
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look that up."
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    assert calls[0].id.startswith("call_")
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "unit": "celsius"}


def test_tool_call_streaming_deltas(agent: openai.OpenAI) -> None:
    chunks = list(
        agent.chat.completions.create(
            model="agent", messages=QUESTION, tools=[WEATHER_TOOL], stream=True
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    content = "".join(d.content or "" for d in deltas)
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert "<tool_call>" not in content and "<think>" not in content
    assert content == "Let me look that up."
    assert reasoning == "The user wants the weather, so I call the tool."
    calls = [call for d in deltas for call in d.tool_calls or []]
    assert calls[0].id and calls[0].type == "function" and calls[0].function.name == "get_weather"
    arguments = "".join(c.function.arguments or "" for c in calls)
    assert json.loads(arguments) == {"city": "Paris", "unit": "celsius"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_results_in_the_history_render(agent: openai.OpenAI) -> None:
    history = [
        *QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    ]
    completion = agent.chat.completions.create(
        model="agent", messages=history, tools=[WEATHER_TOOL]
    )
    assert completion.choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_leaves_text_alone(agent: openai.OpenAI) -> None:
    completion = agent.chat.completions.create(
        model="agent", messages=QUESTION, tools=[WEATHER_TOOL], tool_choice="none"
    )
    assert completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].message.tool_calls is None


def test_required_tool_call_is_valid_even_from_a_random_model(client: openai.OpenAI) -> None:
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        completion = client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            tools=[WEATHER_TOOL],
            tool_choice=choice,  # type: ignore[arg-type]
            max_tokens=120,
            temperature=0.8,
            seed=3,
        )
        calls = completion.choices[0].message.tool_calls
        assert completion.choices[0].finish_reason == "tool_calls", completion
        assert calls and calls[0].function.name == "get_weather"
        arguments = json.loads(calls[0].function.arguments)
        assert set(arguments) == {"city", "unit"}
        assert arguments["unit"] in ("celsius", "fahrenheit")
        assert isinstance(arguments["city"], str) and len(arguments["city"]) <= 12


def test_unknown_forced_tool_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    assert raised.value.body["param"] == "tool_choice"  # type: ignore[index]


# Structured output ------------------------------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
    },
    "required": ["name", "age", "color", "tags"],
}


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_validates_from_a_random_model(
    client: openai.OpenAI, stream: bool
) -> None:
    kwargs = {
        "model": MODEL,
        "messages": QUESTION,
        "max_tokens": 200,
        "temperature": 0.9,
        "seed": 11,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON, "strict": True},
        },
    }
    if stream:
        text = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(**kwargs, stream=True)  # type: ignore[call-overload]
            if c.choices
        )
    else:
        text = client.chat.completions.create(**kwargs).choices[0].message.content or ""  # type: ignore[call-overload]
    value = json.loads(text)
    assert set(value) == {"name", "age", "color", "tags"}
    assert isinstance(value["name"], str) and len(value["name"]) <= 10
    assert isinstance(value["age"], int) and 0 <= value["age"] <= 120
    assert value["color"] in ("red", "green", "blue")
    assert isinstance(value["tags"], list) and len(value["tags"]) <= 3


def test_json_object_mode_gives_an_object(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=300,
        temperature=0.0,
        response_format={"type": "json_object"},
    )
    text = completion.choices[0].message.content or ""
    if completion.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # cut by max_tokens: still a prefix of a JSON object
        assert text.lstrip().startswith("{")


def test_invalid_schema_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            response_format={
                "type": "json_schema",
                "json_schema": {
                    "name": "bad",
                    "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}},
                },
            },
        )
    assert raised.value.body["param"] == "response_format"  # type: ignore[index]
