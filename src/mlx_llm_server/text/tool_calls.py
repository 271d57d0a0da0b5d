"""Finds tool calls in generated text and shapes them the way OpenAI streams them.

A model marks each tool call with a start and an end marker; Qwen3 (Hermes format) writes
`<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`, several in one turn.
`ToolCallParser` consumes generated content in increments (valid UTF-8, already cut at stop
strings, reasoning already split off) and returns events:

- `ContentDelta(text)`: text outside call blocks.
- For each call, `ToolCallDelta(index, id, name, "")` first (OpenAI's
  `{"index", "id", "type": "function", "function": {"name", "arguments": ""}}`), then
  `ToolCallDelta(index, None, None, fragment)` pieces whose fragments concatenate to the
  arguments' JSON (an object; OpenAI's `{"index", "function": {"arguments": fragment}}`).

Invariants:
- Marker text never reaches content unless the block is malformed (below); a suffix that could
  be the start of a marker is held back until the next increment decides it.
- For any way the same text is cut into increments, the concatenated content and the calls
  (names, arguments) are the same; `parse_tool_calls` gives that result in one call.
- A call is emitted once its whole block has arrived and parsed: the name delta, then the
  arguments in one fragment, as JSON re-serialised from the parsed value (always valid JSON).
- Whitespace that only separates content from calls (Qwen3 puts `\\n` around each block) is
  dropped: the run before a call, and the run after a call unless content follows it (then it
  stays, as the separator of the content before and after). Other content is verbatim.

Malformed blocks (not parseable, no function name, arguments not an object) become content,
markers included, exactly as generated: nothing the model wrote is lost, and every emitted
call has a name and valid JSON arguments. A block left open when the generation ends is a call
if its text parses on its own (a stop string may have eaten the end marker), else content.
A block ends at the first end marker, so an argument string that quotes the end marker itself
splits the block and makes it malformed; a stray end marker outside a block is content.

`detect_tool_format` picks the format from a chat template, mirroring mlx-lm's detection.
Hermes is parsed here; the other formats reuse mlx-lm's parsers (imported on first use, since
importing mlx-lm loads MLX).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

ToolSpecs: TypeAlias = Sequence[Mapping[str, Any]] | None


@dataclass(frozen=True, slots=True)
class FunctionCall:
    """One call as a format's parser reads it, before an id is assigned."""

    name: str
    arguments: dict[str, Any]
    id: str | None = None  # kept when the model writes one (Mistral does)


@dataclass(frozen=True, slots=True)
class ContentDelta:
    """Text outside tool-call blocks."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """One streamed piece of a tool call.

    The first piece of a call has `id` and `name` set and `arguments_delta == ""`; the pieces
    after it have both None and carry arguments text.
    """

    index: int
    id: str | None
    name: str | None
    arguments_delta: str

    def to_openai(self) -> dict[str, Any]:
        """The `choices[].delta.tool_calls[]` entry of an OpenAI stream chunk."""
        function: dict[str, Any] = {}
        if self.name is not None:
            function["name"] = self.name
        function["arguments"] = self.arguments_delta
        entry: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            entry["id"] = self.id
            entry["type"] = "function"
        entry["function"] = function
        return entry


ToolCallEvent: TypeAlias = ContentDelta | ToolCallDelta


@dataclass(frozen=True, slots=True)
class ParsedToolCall:
    """A complete call; `arguments_json` is the JSON text of an object."""

    id: str
    name: str
    arguments_json: str

    def to_openai(self) -> dict[str, Any]:
        """The `choices[].message.tool_calls[]` entry of an OpenAI response."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments_json},
        }


ParseFn: TypeAlias = Callable[[str, ToolSpecs], list[FunctionCall]]


@dataclass(frozen=True)
class ToolCallFormat:
    """How a model family marks tool calls.

    `parse` gets the text between the markers and the request's tools, and returns at least one
    call or raises ValueError. An empty `end` means a call runs to the end of the generation
    (Mistral's `[TOOL_CALLS]`).
    """

    name: str
    start: str
    end: str
    parse: ParseFn = field(repr=False, compare=False)


def new_tool_call_id() -> str:
    """A fresh id shaped like OpenAI's (`call_` and 24 characters)."""
    return f"call_{uuid.uuid4().hex[:24]}"


def function_call_from_json(item: object) -> FunctionCall:
    """Reads `{"name": str, "arguments": object}` (or `parameters`); raises ValueError otherwise.

    Arguments given as a JSON string holding an object are decoded; missing ones are `{}`.
    """
    if not isinstance(item, Mapping):
        raise ValueError(f"a tool call must be an object, got {type(item).__name__}")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("a tool call needs a non-empty string name")
    arguments = item["arguments"] if "arguments" in item else item.get("parameters", {})
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):
        # Some models (and templates) write the arguments as a JSON string.
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as error:
            raise ValueError("tool call arguments are not JSON") from error
    if not isinstance(arguments, dict):
        raise ValueError("tool call arguments must be an object")
    call_id = item.get("id")
    return FunctionCall(name, arguments, call_id if isinstance(call_id, str) and call_id else None)


def _parse_hermes(block: str, tools: ToolSpecs) -> list[FunctionCall]:
    """`{"name": ..., "arguments": {...}}`, or a list of such objects, in one block."""
    try:
        # strict=False admits raw newlines inside strings, which models write in code arguments.
        payload = json.loads(block.strip(), strict=False)
    except json.JSONDecodeError as error:
        raise ValueError(f"tool call is not JSON: {error}") from error
    items = payload if isinstance(payload, list) else [payload]
    if not items:
        raise ValueError("empty list of tool calls")
    return [function_call_from_json(item) for item in items]


def _mlx_lm_parser(module_name: str) -> ParseFn:
    """Wraps `mlx_lm.tool_parsers.<module_name>.parse_tool_call`, imported on first use."""

    def parse(block: str, tools: ToolSpecs) -> list[FunctionCall]:
        module = importlib.import_module(f"mlx_lm.tool_parsers.{module_name}")
        try:
            result = module.parse_tool_call(block, tools)
        except Exception as error:  # these parsers raise assorted errors on malformed text
            raise ValueError(f"{module_name} could not parse the tool call: {error}") from error
        items = result if isinstance(result, list) else [result]
        if not items:
            raise ValueError("no tool call parsed")
        return [function_call_from_json(item) for item in items]

    return parse


HERMES = ToolCallFormat("hermes", "<tool_call>", "</tool_call>", _parse_hermes)

# Markers as mlx-lm 0.32's tool_parsers modules define them (checked by the tests).
_MLX_LM_MARKERS: dict[str, tuple[str, str]] = {
    "minimax_m2": ("<minimax:tool_call>", "</minimax:tool_call>"),
    "gemma4": ("<|tool_call>", "<tool_call|>"),
    "function_gemma": ("<start_function_call>", "<end_function_call>"),
    "longcat": ("<longcat_tool_call>", "</longcat_tool_call>"),
    "glm47": ("<tool_call>", "</tool_call>"),
    "laguna": ("<tool_call>", "</tool_call>"),
    "pythonic": ("<|tool_call_start|>", "<|tool_call_end|>"),
    "qwen3_coder": ("<tool_call>", "</tool_call>"),
    "kimi_k2": ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"),
    "kimi_k3": ("<|open|>tools<|sep|>", "<|close|>tools<|sep|>"),
    "minicpm5": ("<function name=", "</function>"),
    "mistral": ("[TOOL_CALLS]", ""),
    "muse_spark": ("<atem:function_calls>", "</atem:function_calls>"),
}

TOOL_CALL_FORMATS: Mapping[str, ToolCallFormat] = {
    HERMES.name: HERMES,
    **{
        name: ToolCallFormat(name, start, end, _mlx_lm_parser(name))
        for name, (start, end) in _MLX_LM_MARKERS.items()
    },
}

# Checked in order, first match wins: the order of mlx-lm 0.32's `_infer_tool_parser`, whose
# `json_tools` is `hermes` here. Several formats share `<tool_call>`, so the order matters.
_DETECTION: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("minimax_m2", lambda t: "<minimax:tool_call>" in t),
    ("gemma4", lambda t: "<|tool_call>" in t and "<tool_call|>" in t),
    ("function_gemma", lambda t: "<start_function_call>" in t),
    ("longcat", lambda t: "<longcat_tool_call>" in t),
    ("glm47", lambda t: "<arg_key>" in t),
    ("pythonic", lambda t: "<|tool_list_start|>" in t or "<|tool_call_start|>" in t),
    ("qwen3_coder", lambda t: "<tool_call>\\n<function=" in t or "<tool_call>\n<function=" in t),
    ("kimi_k2", lambda t: "<|tool_calls_section_begin|>" in t),
    ("minicpm5", lambda t: '<function name="' in t and '<param name="' in t),
    ("mistral", lambda t: "[TOOL_CALLS]" in t),
    ("muse_spark", lambda t: "<atem:function_calls>" in t),
    ("hermes", lambda t: "<tool_call>" in t and "tool_call.name" in t),
)


def detect_tool_format(chat_template: str | None) -> ToolCallFormat | None:
    """The tool-call format a chat template teaches its model, or None if none is recognised."""
    if not isinstance(chat_template, str):
        return None
    for name, matches in _DETECTION:
        if matches(chat_template):
            return TOOL_CALL_FORMATS[name]
    return None


def _partial_marker_len(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for length in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0


class ToolCallParser:
    """Streaming extraction of tool calls from one generation's content.

    Call `feed` with each increment and `finish` once at the end. `calls` lists the calls
    emitted so far, in index order.
    """

    def __init__(
        self,
        tool_format: ToolCallFormat = HERMES,
        tools: ToolSpecs = None,
        id_factory: Callable[[], str] = new_tool_call_id,
    ) -> None:
        if not tool_format.start:
            raise ValueError("a tool-call format needs a start marker")
        self._format = tool_format
        self._tools = tools
        self._new_id = id_factory
        self._buffer = ""  # undecided text: a partial marker, trailing whitespace, a block
        self._inside = False
        self._whitespace_before_block = ""  # dropped if the block is a call, else content
        self._after_call = False  # a call was the last thing settled
        self._calls: list[ParsedToolCall] = []

    @property
    def calls(self) -> list[ParsedToolCall]:
        return list(self._calls)

    def feed(self, text: str) -> list[ToolCallEvent]:
        """Consumes one increment; returns the events it settles (possibly none)."""
        self._buffer += text
        out: list[ToolCallEvent] = []
        progressed = True
        while progressed:  # one increment can hold several blocks
            progressed = self._close_block(out) if self._inside else self._open_block(out)
        return out

    def finish(self) -> list[ToolCallEvent]:
        """Ends the generation: settles an open block and emits held-back text."""
        out: list[ToolCallEvent] = []
        if self._inside:
            block, self._buffer, self._inside = self._buffer, "", False
            self._settle_block(out, block, self._format.start + block)
        else:
            if not (self._after_call and self._buffer.isspace()):
                self._emit_content(out, self._buffer)
            self._buffer = ""
        return out

    def _open_block(self, out: list[ToolCallEvent]) -> bool:
        """Emits content up to a start marker; True when one was found."""
        buffer = self._buffer
        index = buffer.find(self._format.start)
        if index >= 0:
            before = buffer[:index]
            body = before.rstrip()
            self._emit_content(out, body)
            self._whitespace_before_block = before[len(body) :]
            self._buffer = buffer[index + len(self._format.start) :]
            self._inside = True
            return True
        safe = buffer[: len(buffer) - _partial_marker_len(buffer, self._format.start)]
        body = safe.rstrip()
        self._emit_content(out, body)
        # Trailing whitespace waits: it is dropped if a call follows.
        self._buffer = buffer[len(body) :]
        return False

    def _close_block(self, out: list[ToolCallEvent]) -> bool:
        """Settles the open block if its end marker has arrived; True when it did."""
        end = self._format.end
        if not end:
            return False
        index = self._buffer.find(end)
        if index < 0:
            return False
        block = self._buffer[:index]
        self._buffer = self._buffer[index + len(end) :]
        self._inside = False
        self._settle_block(out, block, self._format.start + block + end)
        return True

    def _settle_block(self, out: list[ToolCallEvent], block: str, raw: str) -> None:
        try:
            parsed = self._format.parse(block, self._tools)
        except ValueError:
            parsed = []
        whitespace, self._whitespace_before_block = self._whitespace_before_block, ""
        if not parsed:
            self._emit_content(out, whitespace + raw)
            return
        for function_call in parsed:
            call = ParsedToolCall(
                id=function_call.id or self._new_id(),
                name=function_call.name,
                arguments_json=json.dumps(function_call.arguments, ensure_ascii=False),
            )
            index = len(self._calls)
            self._calls.append(call)
            out.append(ToolCallDelta(index, call.id, call.name, ""))
            out.append(ToolCallDelta(index, None, None, call.arguments_json))
        self._after_call = True

    def _emit_content(self, out: list[ToolCallEvent], text: str) -> None:
        if text:
            out.append(ContentDelta(text))
            self._after_call = False


def collect_tool_call_events(events: Iterable[ToolCallEvent]) -> tuple[str, list[ParsedToolCall]]:
    """Assembles streamed events into `(content, calls)`, as a non-streaming response has them."""
    content: list[str] = []
    ids: dict[int, str] = {}
    names: dict[int, str] = {}
    arguments: dict[int, list[str]] = {}
    for event in events:
        if isinstance(event, ContentDelta):
            content.append(event.text)
            continue
        if event.id is not None:
            ids[event.index] = event.id
        if event.name is not None:
            names[event.index] = event.name
        arguments.setdefault(event.index, []).append(event.arguments_delta)
    calls = [
        ParsedToolCall(ids[index], names[index], "".join(arguments[index]))
        for index in sorted(arguments)
    ]
    return "".join(content), calls


def parse_tool_calls(
    text: str,
    tool_format: ToolCallFormat = HERMES,
    tools: ToolSpecs = None,
    id_factory: Callable[[], str] = new_tool_call_id,
) -> tuple[str, list[ParsedToolCall]]:
    """Non-streaming: the content outside tool-call blocks and the calls, in order.

    The same as collecting a `ToolCallParser`'s events for the same text fed in any chunks.
    """
    parser = ToolCallParser(tool_format, tools, id_factory)
    return collect_tool_call_events(parser.feed(text) + parser.finish())


def _text_of_parts(content: object) -> object:
    """Joins a list of text-only content parts into a string; other content is unchanged."""
    if isinstance(content, list) and all(
        isinstance(part, Mapping) and part.get("type") == "text" for part in content
    ):
        return "".join(str(part.get("text", "")) for part in content)
    return content


def to_template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Converts OpenAI-shaped chat messages into what Hugging Face chat templates expect.

    - `content: None` (an assistant turn with only tool calls) becomes `""`: templates test and
      concatenate it as a string.
    - Text-only content-part lists become one string; lists holding other parts (images) are
      left for a multimodal template.
    - `tool_calls[].function.arguments` given as a JSON string becomes the decoded object: most
      templates (Qwen3's among them) render it with `tojson`, which would quote a string again.
      A string that is not JSON is left as is.
    The input is not modified; other keys (`tool_call_id`, `name`, `reasoning_content`) pass.
    """
    converted: list[dict[str, Any]] = []
    for message in messages:
        out = dict(message)
        out["content"] = "" if out.get("content") is None else _text_of_parts(out["content"])
        if out.get("tool_calls"):
            out["tool_calls"] = [_template_tool_call(call) for call in out["tool_calls"]]
        converted.append(out)
    return converted


def _template_tool_call(call: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(call)
    function = call.get("function")
    if isinstance(function, Mapping):
        function = dict(function)
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            # Text that is not JSON is left as is: the template shows what the client sent.
            with contextlib.suppress(json.JSONDecodeError):
                function["arguments"] = json.loads(arguments) if arguments.strip() else {}
        out["function"] = function
    return out
