"""Finds OpenAI `stop` strings in streamed text (pure Python, no MLX).

`StopStringMatcher` sits between the detokenizer and the client. Invariants, for any way the
same text is cut into pieces fed through `feed` and ended with `flush`:

1. The emitted text (every `StopResult.text`, then `flush()`) is the text before the first stop
   string to occur, or all the text when none occurs. "First" means the occurrence that is
   complete soonest (smallest end position), where generation stops; among occurrences ending
   at the same place, the one starting earliest (the longest). The stop string itself and
   everything after it are never emitted, as OpenAI does.
2. A stop string is never partly emitted: text that could still turn out to begin a stop
   string (a suffix of the pending text that is a prefix of some stop string) is held back
   until later text decides it; once it cannot, it is released in order, nothing lost.
3. Held text is always shorter than the longest stop string, and each `feed` costs
   O(len(piece) + longest stop) per stop string (str.find in C), so ~16 stops are cheap.

The result does not depend on how the text is cut into pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["StopResult", "StopStringMatcher"]


@dataclass(frozen=True, slots=True)
class StopResult:
    """What `StopStringMatcher.feed` gives back.

    `text` is safe to emit now. `stopped` is True once a stop string matched (then `text` is
    what preceded the match, and the generation should end); `stop` is the string that matched.
    """

    text: str
    stopped: bool
    stop: str | None = None


class StopStringMatcher:
    """Holds back streamed text that may be the start of a stop string; cuts at a match.

    Empty stop strings are ignored; duplicates count once. The match is the occurrence that
    ends first (ties: the one that starts first), so the outcome is what a generation stopped
    at the first completed stop string shows. After a match, `feed` returns
    `StopResult("", True, stop)` and `flush` returns "".
    """

    def __init__(self, stops: Sequence[str]) -> None:
        if isinstance(stops, str):
            stops = [stops]
        unique = sorted({s for s in stops if s}, key=lambda s: (len(s), s))
        self._stops: tuple[str, ...] = tuple(unique)
        self._held = ""
        self._stopped: str | None = None

    @property
    def stops(self) -> tuple[str, ...]:
        return self._stops

    @property
    def stopped(self) -> bool:
        return self._stopped is not None

    @property
    def held(self) -> str:
        """Text fed but not yet emitted (a possible start of a stop string)."""
        return self._held

    def feed(self, text: str) -> StopResult:
        """Adds a piece of text; returns what can be emitted now and whether a stop matched."""
        if self._stopped is not None:
            return StopResult("", True, self._stopped)
        if not self._stops:
            return StopResult(text, False)
        buffer = self._held + text
        if not buffer:
            return StopResult("", False)

        # The held text holds no whole stop string, so any occurrence ends in the new text;
        # each stop's first occurrence is its earliest-ending one.
        best_end = -1
        match_at = -1
        matched: str | None = None
        for stop in self._stops:
            index = buffer.find(stop)
            if index == -1:
                continue
            end = index + len(stop)
            if matched is None or end < best_end or (end == best_end and index < match_at):
                best_end, match_at, matched = end, index, stop
        if matched is not None:
            self._held = ""
            self._stopped = matched
            return StopResult(buffer[:match_at], True, matched)

        hold_from = len(buffer)
        for stop in self._stops:
            start = self._partial_match_start(buffer, stop)
            if start < hold_from:
                hold_from = start
        self._held = buffer[hold_from:]
        return StopResult(buffer[:hold_from], False)

    def flush(self) -> str:
        """Releases the held text at the end of the stream (empty after a match)."""
        held, self._held = self._held, ""
        return "" if self._stopped is not None else held

    @staticmethod
    def _partial_match_start(buffer: str, stop: str) -> int:
        """Start of the longest proper suffix of `buffer` that is a prefix of `stop`.

        Returns len(buffer) when there is none. Only places where `stop[0]` occurs among the
        last len(stop) - 1 characters are tried, earliest (longest suffix) first.
        """
        end = len(buffer)
        index = buffer.find(stop[0], max(0, end - len(stop) + 1))
        while index != -1:
            if stop.startswith(buffer[index:]):
                return index
            index = buffer.find(stop[0], index + 1)
        return end
