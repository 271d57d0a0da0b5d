"""Routes a model's `<think>…</think>` block into reasoning and the rest into content.

Generated text arrives in increments (valid UTF-8, already cut at stop strings). The parser
turns each increment into ordered `ReasoningDelta` pieces such that, for any way the same text
is cut into increments, the concatenated reasoning and the concatenated content are the same
(`split_reasoning` gives that result in one call).

What counts as the reasoning block:
- The start tag opens it only when it is the first non-whitespace text of the generation
  (Qwen3 and its kin emit `<think>` first; a later `<think>` is quoted text, kept as content).
  With `starts_in_reasoning=True` (the prompt already ends in `<think>`, see
  `prompt_ends_in_reasoning`) the generation begins inside the block.
- The first end tag closes it; everything after is content, verbatim, tags included.
- No end tag: everything after the start tag is reasoning (generation stopped mid-thought).
- No start tag: everything is content.

Whitespace: reasoning has its surrounding whitespace stripped (the `\\n` Qwen3 puts inside the
tags), and content loses the whitespace right after the end tag (the `\\n\\n` after
`</think>`, including the empty `<think>\\n\\n</think>\\n\\n` of disabled thinking). Nothing
else is dropped: a partial tag still held when the generation ends is emitted as text.

Tags are never emitted: a suffix that could be the start of a tag is held back until the next
increment decides it, and reasoning's trailing whitespace is held until more reasoning follows.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_START = "<think>"
THINK_END = "</think>"

# Phases of a generation.
_BEFORE = 0  # nothing but whitespace (or a partial start tag) seen yet
_REASONING = 1
_CONTENT = 2


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """One piece of output: exactly one of `content` and `reasoning` is non-empty."""

    content: str = ""
    reasoning: str = ""


def _partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for length in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


def prompt_ends_in_reasoning(prompt_text: str, start: str = THINK_START) -> bool:
    """Whether a rendered prompt pre-fills the start tag, so the generation begins inside it.

    Only the very end of the prompt counts (trailing whitespace aside): a `<think>` quoted in an
    earlier message must not flip the parser into reasoning. Qwen3's disabled thinking ends in
    `<think>\\n\\n</think>\\n\\n`, which is not an open block.
    """
    return prompt_text.rstrip().endswith(start)


_MAX_LEADING_WHITESPACE = 2


class ReasoningParser:
    """Streaming splitter of one generation into reasoning and content.

    Call `feed` with each increment and `flush` once at the end; the pieces, in order, are the
    output. One parser per generation.
    """

    def __init__(
        self,
        start: str = THINK_START,
        end: str = THINK_END,
        starts_in_reasoning: bool = False,
    ) -> None:
        if not start or not end:
            raise ValueError("reasoning tags must be non-empty")
        self._start = start
        self._end = end
        self._phase = _REASONING if starts_in_reasoning else _BEFORE
        # Text not yet decided: a possible partial tag, or whitespace whose fate depends on
        # what follows.
        self._buffer = ""
        self._reasoning_started = False
        self._strip_content_start = False

    @property
    def in_reasoning(self) -> bool:
        """Whether the text fed so far leaves the generation inside the reasoning block."""
        return self._phase == _REASONING

    def feed(self, text: str) -> list[ReasoningDelta]:
        """Consumes one increment; returns the pieces it settles (possibly none)."""
        self._buffer += text
        out: list[ReasoningDelta] = []
        if self._phase == _BEFORE:
            self._advance_before()
        if self._phase == _REASONING:
            self._advance_reasoning(out, final=False)
        if self._phase == _CONTENT:
            self._advance_content(out)
        return out

    def flush(self) -> list[ReasoningDelta]:
        """Ends the generation: emits whatever was held back."""
        out: list[ReasoningDelta] = []
        if self._phase == _BEFORE:
            # Only whitespace or a partial start tag: it was never a reasoning block.
            self._phase = _CONTENT
        if self._phase == _REASONING:
            self._advance_reasoning(out, final=True)
        if self._phase == _CONTENT:
            self._advance_content(out)
        return out

    def _advance_before(self) -> None:
        head = self._buffer.lstrip()
        if head.startswith(self._start):
            # Whitespace before the start tag is dropped with it.
            self._buffer = head[len(self._start) :]
            self._phase = _REASONING
        elif not self._start.startswith(head) or (
            len(self._buffer) - len(head) > _MAX_LEADING_WHITESPACE
        ):
            # The buffer, leading whitespace included, is content. Whitespace is held only so
            # long: a model that opens with a run of blank lines is not about to think, and its
            # stream must not stall until the end.
            self._phase = _CONTENT

    def _advance_reasoning(self, out: list[ReasoningDelta], final: bool) -> None:
        index = self._buffer.find(self._end)
        if index >= 0:
            self._emit_reasoning(out, self._buffer[:index].rstrip())
            self._buffer = self._buffer[index + len(self._end) :]
            self._phase = _CONTENT
            self._strip_content_start = True
            return
        if final:
            self._emit_reasoning(out, self._buffer.rstrip())
            self._buffer = ""
            return
        safe = self._buffer[: len(self._buffer) - _partial_tag_len(self._buffer, self._end)]
        body = safe.rstrip()
        self._emit_reasoning(out, body)
        # Trailing whitespace and a possible partial end tag wait for the next increment.
        self._buffer = self._buffer[len(body) :]

    def _emit_reasoning(self, out: list[ReasoningDelta], text: str) -> None:
        if not self._reasoning_started:
            text = text.lstrip()
            if not text:
                return
            self._reasoning_started = True
        if text:
            out.append(ReasoningDelta(reasoning=text))

    def _advance_content(self, out: list[ReasoningDelta]) -> None:
        if self._strip_content_start:
            self._buffer = self._buffer.lstrip()
            if not self._buffer:
                return
            self._strip_content_start = False
        if self._buffer:
            out.append(ReasoningDelta(content=self._buffer))
            self._buffer = ""


def split_reasoning(
    text: str,
    start: str = THINK_START,
    end: str = THINK_END,
    starts_in_reasoning: bool = False,
) -> tuple[str, str]:
    """Non-streaming split of a whole generation: returns `(content, reasoning)`.

    Equal to concatenating the pieces of a `ReasoningParser` fed the same text in any chunks.
    """
    parser = ReasoningParser(start, end, starts_in_reasoning)
    pieces = parser.feed(text) + parser.flush()
    content = "".join(piece.content for piece in pieces)
    reasoning = "".join(piece.reasoning for piece in pieces)
    return content, reasoning
