"""One choice's token events turned into OpenAI's pieces: content, reasoning, tool calls.

The text runs through the text layer in a fixed order: the incremental detokenizer (never half
a UTF-8 character), the stop-string matcher (never part of a stop string; applied to all text,
reasoning included), the reasoning splitter (`<think>…</think>`), then the tool-call parser on
the content. What one token contributes comes out as one `ChoiceUpdate`, so streaming and
non-streaming responses are assembled from the same pieces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import protocol as wire
from .engine.types import FinishEvent, TokenEvent
from .text.detokenizer import IncrementalDetokenizer, token_bytes, token_text
from .text.reasoning import ReasoningParser
from .text.stop import StopStringMatcher
from .text.tool_calls import ContentDelta, ToolCallDelta, ToolCallFormat, ToolCallParser

# OpenAI's floor for logprobs that are -inf (a token the sampler could not have picked).
_LOGPROB_FLOOR = -9999.0


@dataclass(frozen=True)
class ChoiceOptions:
    stops: list[str] = field(default_factory=list)
    reasoning: bool = False
    starts_in_reasoning: bool = False
    tool_format: ToolCallFormat | None = None
    tools: list[dict[str, Any]] | None = None
    logprobs: bool = False


@dataclass
class ChoiceUpdate:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    logprobs: list[wire.TokenLogprob] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls or self.logprobs)


def logprob_entry(tokenizer: Any, event: TokenEvent) -> wire.TokenLogprob:
    def entry(token_id: int, logprob: float) -> wire.TopLogprob:
        return wire.TopLogprob(
            token=token_text(tokenizer, token_id),
            logprob=max(logprob, _LOGPROB_FLOOR),
            bytes=list(token_bytes(tokenizer, token_id)),
        )

    main = entry(event.token_id, event.logprob if event.logprob is not None else 0.0)
    tops = [entry(t, lp) for t, lp in (event.top_logprobs or ())]
    return wire.TokenLogprob(
        token=main.token, logprob=main.logprob, bytes=main.bytes, top_logprobs=tops
    )


class ChoiceAssembler:
    def __init__(self, tokenizer: Any, options: ChoiceOptions) -> None:
        self._tokenizer = tokenizer
        self.options = options
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stops = StopStringMatcher(options.stops) if options.stops else None
        self._reasoning = (
            ReasoningParser(starts_in_reasoning=options.starts_in_reasoning)
            if options.reasoning
            else None
        )
        self._tools = (
            ToolCallParser(options.tool_format, tools=options.tools)
            if options.tool_format is not None
            else None
        )
        self.stopped = False  # a stop string matched: the engine request should be cancelled
        self.tokens = 0

    def add(self, event: TokenEvent) -> ChoiceUpdate:
        self.tokens += 1
        if self.stopped:
            return ChoiceUpdate()
        update = self._route(self._cut(self._detokenizer.add_token(event.token_id)), final=False)
        if self.options.logprobs:
            update.logprobs.append(logprob_entry(self._tokenizer, event))
        return update

    def finish(self, finish: FinishEvent | None) -> tuple[ChoiceUpdate, str]:
        """Releases held text; returns it with the choice's `finish_reason`."""
        tail = ""
        if not self.stopped:
            # A generation cut by max_tokens can end inside a character: drop its incomplete
            # bytes rather than send a replacement character.
            tail = self._cut(self._detokenizer.flush().rstrip("\ufffd"))
            if self._stops is not None and not self.stopped:
                tail += self._stops.flush()
        update = self._route(tail, final=True)
        if self._tools is not None and self._tools.calls:
            reason = "tool_calls"
        elif self.stopped or finish is None:
            reason = "stop"
        else:
            reason = "length" if finish.finish_reason == "length" else "stop"
        return update, reason

    def completion_tokens(self, finish: FinishEvent | None) -> int:
        if finish is not None and not self.stopped:
            return finish.completion_tokens
        return self.tokens

    def _cut(self, text: str) -> str:
        if self._stops is None or not text:
            return text
        result = self._stops.feed(text)
        self.stopped = result.stopped
        return result.text

    def _route(self, text: str, final: bool) -> ChoiceUpdate:
        update = ChoiceUpdate()
        content = text
        if self._reasoning is not None:
            pieces = self._reasoning.feed(text) if text else []
            if final:
                pieces += self._reasoning.flush()
            update.reasoning = "".join(p.reasoning for p in pieces)
            content = "".join(p.content for p in pieces)
        if self._tools is None:
            update.content = content
            return update
        events = self._tools.feed(content) if content else []
        if final:
            events += self._tools.finish()
        for item in events:
            if isinstance(item, ContentDelta):
                update.content += item.text
            else:
                update.tool_calls.append(item)
        return update
