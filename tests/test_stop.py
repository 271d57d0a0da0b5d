"""StopStringMatcher: OpenAI `stop` strings over streamed text pieces."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from mlx_llm_server.text.detokenizer import IncrementalDetokenizer
from mlx_llm_server.text.stop import StopResult, StopStringMatcher


def run(stops: Sequence[str], pieces: Sequence[str]) -> tuple[list[StopResult], str]:
    """Feeds every piece (also after a stop); returns the results and the flush."""
    matcher = StopStringMatcher(stops)
    results = [matcher.feed(p) for p in pieces]
    return results, matcher.flush()


def emitted(stops: Sequence[str], pieces: Sequence[str]) -> tuple[str, bool]:
    results, tail = run(stops, pieces)
    return "".join(r.text for r in results) + tail, any(r.stopped for r in results)


def reference(stops: Sequence[str], text: str) -> tuple[str, bool]:
    """The text before the stop string that is complete first (ties: the one starting first)."""
    hits = [(text.find(s) + len(s), text.find(s)) for s in stops if s and s in text]
    return (text[: min(hits)[1]], True) if hits else (text, False)


def test_no_stops_passes_text_through() -> None:
    results, tail = run([], ["a", "", "bc"])
    assert [r.text for r in results] == ["a", "", "bc"] and tail == ""
    assert not any(r.stopped for r in results)
    assert emitted(["", ""], ["x", "y"]) == ("xy", False)  # empty stops are ignored


def test_stop_within_one_piece() -> None:
    results, tail = run(["STOP"], ["hello STOP world", "more"])
    assert results[0] == StopResult("hello ", True, "STOP")
    assert results[1] == StopResult("", True, "STOP")
    assert tail == ""


def test_stop_across_piece_boundaries() -> None:
    results, tail = run(["<|end|>"], ["Hi <", "|en", "d", "|> ignored"])
    assert [r.text for r in results] == ["Hi ", "", "", ""]
    assert [r.stopped for r in results] == [False, False, False, True]
    assert tail == ""
    # One character at a time.
    text = "abc<|end|>def"
    assert emitted(["<|end|>"], list(text)) == ("abc", True)


def test_stop_at_the_very_start() -> None:
    assert run(["Hi"], ["Hi there"])[0][0] == StopResult("", True, "Hi")
    results, _ = run(["Hi"], ["H", "i", "!"])
    assert [r.text for r in results] == ["", "", ""] and results[1].stopped


def test_stop_string_itself_is_not_emitted_nor_what_follows() -> None:
    assert emitted(["\n\n"], ["line one\n", "\nline two"]) == ("line one", True)


def test_held_text_released_when_partial_match_fails() -> None:
    results, tail = run(["STOP"], ["ab S", "T", "x", "yz"])
    assert [r.text for r in results] == ["ab ", "", "STx", "yz"]
    assert tail == "" and not any(r.stopped for r in results)
    # A failed partial match that contains a new partial match keeps only the new one.
    results, tail = run(["aab"], ["a", "a", "a", "c"])
    assert [r.text for r in results] == ["", "", "a", "aac"]
    results, tail = run(["aab"], ["aa", "a", "b"])
    assert [r.text for r in results] == ["", "a", ""] and results[-1].stopped


def test_no_stop_flush_returns_the_held_tail() -> None:
    matcher = StopStringMatcher(["</answer>"])
    assert matcher.feed("the answer is 42 </ans").text == "the answer is 42 "
    assert matcher.held == "</ans"
    assert matcher.flush() == "</ans"
    assert matcher.held == "" and not matcher.stopped


def test_overlapping_and_prefix_sharing_stops() -> None:
    stops = ["abc", "bcd", "ab", "xyz", "xy!"]
    # "ab" is complete before "abc" could be.
    results, _ = run(stops, ["12a", "bc"])
    assert results[0] == StopResult("12", False)
    assert results[1] == StopResult("", True, "ab")
    # The stop complete first wins (generation stops there), however the text is cut, even
    # though a longer stop starting earlier would have completed later.
    for pieces in (["xabcde"], ["xabc", "de"], list("xabcde")):
        results, _ = run(["abcde", "bcd"], pieces)
        assert "".join(r.text for r in results) == "xa"
        assert next(r.stop for r in results if r.stopped) == "bcd"
    # Ending at the same place, the one starting first wins.
    for pieces in (["xabc"], ["xa", "bc"]):
        results, _ = run(["bc", "abc"], pieces)
        assert "".join(r.text for r in results) == "x" and results[-1].stop == "abc"
    # Prefix-sharing stops: "xy" is held for both, released when neither can follow.
    results, tail = run(stops, ["0x", "y", "?"])
    assert [r.text for r in results] == ["0", "", "xy?"] and tail == ""
    results, _ = run(stops, ["0x", "y", "!"])
    assert results[-1] == StopResult("", True, "xy!")


def test_multibyte_stop_strings() -> None:
    stops = ["终了", "🎉🎉", "한국어"]
    assert emitted(stops, ["こんにちは终", "了です"]) == ("こんにちは", True)
    assert emitted(stops, ["party 🎉", " 🎉", "🎉 end"]) == ("party 🎉 ", True)
    assert emitted(stops, ["한국", "말"]) == ("한국말", False)
    results, _ = run(stops, ["ok 한", "국"])
    assert [r.text for r in results] == ["ok ", ""]


def test_single_string_stop_and_duplicates() -> None:
    assert StopStringMatcher("END").stops == ("END",)  # type: ignore[arg-type]
    assert StopStringMatcher(["a", "a", "bb"]).stops == ("a", "bb")


def test_held_text_is_shorter_than_the_longest_stop() -> None:
    matcher = StopStringMatcher(["aaac", "ab"])
    out = ""
    for _ in range(100):
        result = matcher.feed("a")
        assert not result.stopped and len(matcher.held) <= 3
        out += result.text
    assert out == "a" * 97
    assert matcher.feed("c") == StopResult("", True, "aaac")


def test_random_texts_and_cuts_match_reference() -> None:
    rng = random.Random(42)
    alphabet = "ab한🎉\n"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stops = [
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
            for _ in range(rng.randint(1, 4))
        ]
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        bounds = [0, *cuts, len(text)]
        pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
        want, want_stopped = reference(stops, text)
        matcher = StopStringMatcher(stops)
        out = ""
        fed = ""
        for piece in pieces:
            result = matcher.feed(piece)
            fed += piece
            out += result.text
            assert want.startswith(out)  # never emits a byte of a stop string
            if result.stopped:
                break
            # Holds exactly the longest suffix that could still begin a stop string.
            assert out + matcher.held == fed
            longest = max(
                (k for s in stops for k in range(1, len(s)) if fed.endswith(s[:k])), default=0
            )
            assert len(matcher.held) == longest
        out += matcher.flush()
        assert (out, matcher.stopped) == (want, want_stopped), (text, stops, pieces)


def test_many_stops_long_stream_is_fast() -> None:
    stops = [f"<stop-{i:02d}-marker>" for i in range(16)]
    matcher = StopStringMatcher(stops)
    piece = "some streamed <stop- text with <stop-1 near misses "
    out = [matcher.feed(piece).text for _ in range(20000)]
    assert not matcher.stopped
    assert "".join(out) + matcher.flush() == piece * 20000
    assert matcher.feed("<stop-15-marker> after").stopped


@pytest.fixture(scope="module")
def qwen(qwen3_tokenizer_path: Path) -> AutoTokenizer:
    return AutoTokenizer.from_pretrained(qwen3_tokenizer_path)


def test_with_detokenized_qwen3_stream(qwen: AutoTokenizer) -> None:
    text = "先说 한국어 쀍 然后 🎉👨‍👩‍👧 停止 after"
    ids = qwen.encode(text)
    for stop, want in (
        ("停止", text[: text.index("停止")]),
        ("쀍 然", "先说 한국어 "),
        ("zz", text),
    ):
        detok = IncrementalDetokenizer(qwen)
        matcher = StopStringMatcher([stop, "never"])
        out = ""
        for token_id in ids:
            result = matcher.feed(detok.add_token(token_id))
            out += result.text
            if result.stopped:
                break
        else:
            out += matcher.feed(detok.flush()).text + matcher.flush()
        assert out == want
