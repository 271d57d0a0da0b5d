"""Turns generated token ids into text, one token at a time (pure Python, no MLX).

`IncrementalDetokenizer` streams text for a generation. Its invariants, for any token sequence
`ids` fed one by one through `add_token` and ended with `flush`:

1. Completeness: the concatenation of every returned piece equals
   `tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)`, up to the limits below
   (which encoder-made token sequences never reach).
2. No partial characters: a returned piece never carries a U+FFFD replacement character that
   stands for a character still being spelled out byte by byte; every U+FFFD returned is one the
   full decode has at the same place (an invalid byte sequence the model really produced).
3. Bounded work: each `add_token` decodes a small window of recent tokens (about two text-making
   tokens plus the ones still pending), at most twice, never the whole sequence.

Method (the prefix/read-offset scheme of vLLM and TGI): the window starts at a token boundary
where the byte stream sits on a character boundary. The tokens of the window before the read
offset are the *prefix*: already emitted, and kept only as context so that decoders whose
output depends on the neighbouring token (SentencePiece's leading "▁" space, which decoders
drop from the first token) decode the new tokens exactly as the full sequence does. New text is
`decode(window)` minus what was already emitted from it. While the decoded window ends in U+FFFD
the character may still be incomplete, and that U+FFFD tail is held back; text before it is
emitted at once. The window moves on only when the pending tokens produced text, so the prefix
always holds a token that takes any first-token rule (e.g. the dropped leading space).

Byte-level BPE tokenizers (GPT-2 style, e.g. Qwen, Llama 3): the hold is exact. The raw bytes of
the pending tokens decide whether the tail is an unfinished UTF-8 sequence, so an invalid byte
sequence is emitted as soon as the next byte proves it invalid, and the window then moves past
it. Only one U+FFFD (the unfinished character) is ever held. The pending limit (at least 32
tokens here) only bounds the window against a chain of tokens that each end inside a character.
Other tokenizers: a trailing U+FFFD is held for at most `max_pending_tokens` tokens, then the
detokenizer gives up waiting, emits what decode gives and moves on (so nothing is held forever
and the window stays bounded). Four tokens are enough for any character an encoder produces,
so giving up only happens on invalid byte runs.

Skipped special tokens (with `skip_special_tokens=True`) are left out of the window, exactly as
`decode` leaves them out before its decoder runs, so runs of them cost nothing.

Known limits of completeness: a byte sequence left unfinished for more than the pending limit
and then completed is emitted as U+FFFD (for byte-level BPE this takes 32+ tokens in a row
each ending inside a character, a tokenization no encoder makes); and
SentencePiece's ByteFallback decoder turns a whole run of byte tokens into one U+FFFD per byte
when the run is not valid UTF-8, changing characters of the run that were already complete and
emitted. Valid byte-fallback runs, as an encoder produces them, are exact.

`token_bytes` and `token_text` give one token's raw bytes and text, for OpenAI `logprobs`.
"""

from __future__ import annotations

import codecs
import contextlib
import importlib
import json
import re
import weakref
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["IncrementalDetokenizer", "token_bytes", "token_text"]

REPLACEMENT_CHAR = "\ufffd"

# Byte-level holds are exact, so their pending limit only bounds the window: it is reached only
# by a character-spanning chain of tokens (e.g. b"\xa4\xed", b"\x95", b"\xa4\xed", ...) that
# keeps every token boundary inside a character, which encoders do not produce.
_BYTE_LEVEL_MIN_PENDING = 32

_BYTE_FALLBACK_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable character (byte-level BPE)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# Character of a byte-level BPE token -> the byte it stands for.
_BYTE_DECODER: dict[str, int] = {char: byte for byte, char in _bytes_to_unicode().items()}


def _decoder_kinds(tokenizer: Any) -> tuple[str, list[str]]:
    """The top-level decoder type of a tokenizer and all decoder types nested in it."""
    try:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None) if backend is not None else None
        if decoder is None:
            return "", []
        state = json.loads(decoder.__getstate__())
    except Exception:
        return "", []

    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("type"), str):
                found.append(node["type"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(state)
    top = state.get("type", "") if isinstance(state, dict) else ""
    return str(top), found


def _backend_decode(tokenizer: Any) -> Callable[[list[int], bool], str] | None:
    """The Rust `tokenizers` decode behind a transformers fast tokenizer, where calling it
    directly gives exactly what `tokenizer.decode` gives: neither method overridden, and no
    clean-up of spaces after it. It skips ~2.5 us of transformers' Python a call, paid once or
    twice per streamed token."""
    try:
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerBase
    except ImportError:
        return None
    stock = []
    for module, name in (
        ("transformers.tokenization_utils_tokenizers", "TokenizersBackend"),  # transformers 5
        ("transformers.tokenization_utils_fast", "PreTrainedTokenizerFast"),  # transformers 4
    ):
        with contextlib.suppress(ImportError, AttributeError):
            stock.append(getattr(importlib.import_module(module), name)._decode)
    cls = type(tokenizer)
    backend = getattr(tokenizer, "_tokenizer", None)
    if (
        getattr(cls, "decode", None) is not PreTrainedTokenizerBase.decode
        or getattr(cls, "_decode", None) not in stock
        or getattr(tokenizer, "clean_up_tokenization_spaces", True)
        or not isinstance(backend, Tokenizer)
    ):
        return None
    decode = backend.decode
    return lambda ids, skip: decode(ids, skip_special_tokens=skip)


class _TokenizerInfo:
    """Per-tokenizer facts and caches shared by every detokenizer and logprobs lookup.

    `byte_level`: tokens are GPT-2 byte-level BPE strings and `decode` is the lossy UTF-8 decode
    of their concatenated bytes. `sentencepiece`: tokens use the "▁" space marker and
    `<0xHH>` byte-fallback pieces. Lookups are cached per token id (bounded by the vocabulary).
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        top, kinds = _decoder_kinds(tokenizer)
        self.byte_level = top == "ByteLevel" or (
            not kinds and isinstance(getattr(tokenizer, "byte_decoder", None), dict)
        )
        self.sentencepiece = not self.byte_level and (
            "Metaspace" in kinds
            or "ByteFallback" in kinds
            or (not kinds and getattr(tokenizer, "sp_model", None) is not None)
        )
        special: set[int] = set()
        with contextlib.suppress(Exception):
            special.update(int(i) for i in getattr(tokenizer, "all_special_ids", None) or ())
        try:
            added = dict(getattr(tokenizer, "added_tokens_decoder", None) or {})
        except Exception:
            added = {}
        for token_id, token in added.items():
            if getattr(token, "special", False):
                special.add(int(token_id))
        self._special_candidates = frozenset(special)
        self._skipped: dict[int, bool] = {}
        self._bytes: dict[int, bytes] = {}
        self._text: dict[int, str] = {}
        self.direct_decode = _backend_decode(tokenizer)

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if self.direct_decode is not None:
            return self.direct_decode(ids, skip_special_tokens)
        return str(self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))

    def is_skipped(self, token_id: int) -> bool:
        """Whether `decode(..., skip_special_tokens=True)` drops this token entirely."""
        if token_id not in self._special_candidates:
            return False
        cached = self._skipped.get(token_id)
        if cached is None:
            decode = self._tokenizer.decode
            cached = (
                decode([token_id], skip_special_tokens=True) == ""
                and decode([token_id], skip_special_tokens=False) != ""
            )
            self._skipped[token_id] = cached
        return cached

    def token_bytes(self, token_id: int) -> bytes:
        cached = self._bytes.get(token_id)
        if cached is None:
            cached = self._compute_bytes(token_id)
            self._bytes[token_id] = cached
        return cached

    def token_text(self, token_id: int) -> str:
        cached = self._text.get(token_id)
        if cached is None:
            cached = self.token_bytes(token_id).decode("utf-8", errors="replace")
            self._text[token_id] = cached
        return cached

    def _compute_bytes(self, token_id: int) -> bytes:
        try:
            piece = self._tokenizer.convert_ids_to_tokens(token_id)
        except Exception:
            piece = None
        if not isinstance(piece, str):
            return b""
        if self.byte_level:
            # As the ByteLevel decoder does: map through the byte table, or take the token's
            # own UTF-8 when a character is outside it (added tokens such as "<think>\n").
            try:
                return bytes(_BYTE_DECODER[char] for char in piece)
            except KeyError:
                return piece.encode("utf-8")
        if self.sentencepiece:
            match = _BYTE_FALLBACK_PIECE.fullmatch(piece)
            if match is not None:
                return bytes([int(match.group(1), 16)])
            return piece.replace("▁", " ").encode("utf-8")
        try:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
        except Exception:
            text = piece
        return str(text).encode("utf-8")


_INFO_CACHE: weakref.WeakKeyDictionary[Any, _TokenizerInfo] = weakref.WeakKeyDictionary()


def _info_for(tokenizer: Any) -> _TokenizerInfo:
    """The cached `_TokenizerInfo` of a tokenizer (a fresh one if it cannot be weakly keyed)."""
    try:
        info = _INFO_CACHE.get(tokenizer)
    except TypeError:
        return _TokenizerInfo(tokenizer)
    if info is None:
        info = _TokenizerInfo(tokenizer)
        with contextlib.suppress(TypeError):
            _INFO_CACHE[tokenizer] = info
    return info


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The raw bytes one token stands for (OpenAI logprobs `bytes`).

    Byte-level BPE tokens map through the GPT-2 byte table, so a token holding part of a
    character gives that part's bytes; SentencePiece `<0xHH>` pieces give their byte and "▁"
    gives a space. Results are cached per tokenizer and token id.
    """
    return _info_for(tokenizer).token_bytes(int(token_id))


def token_text(tokenizer: Any, token_id: int) -> str:
    """One token's text (OpenAI logprobs `token`): its bytes decoded as UTF-8.

    Bytes that do not form whole characters become U+FFFD, so this may contain U+FFFD where the
    streamed text does not. A leading SentencePiece space is kept (" Hello", not "Hello").
    """
    return _info_for(tokenizer).token_text(int(token_id))


def _unfinished_utf8_tail(data: bytes) -> bytes:
    """The bytes at the end of `data` that start a UTF-8 sequence more bytes could complete.

    Python's decoder buffers exactly such a tail (and, more cautiously than UTF-8 requires,
    also an ED A0..BF surrogate start); an empty result means the data ends finished.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    decoder.decode(data[-3:], final=False)
    return bytes(decoder.getstate()[0])


def _rejects(tail: bytes, following: bytes) -> bool:
    """Whether the first byte of `following` cannot continue the unfinished `tail`."""
    if not tail:
        return True
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    decoder.decode(tail, final=False)
    return decoder.decode(following[:1], final=False).startswith(REPLACEMENT_CHAR)


class IncrementalDetokenizer:
    """Streams the text of a token sequence as tokens arrive.

    Invariant: `"".join(pieces) == tokenizer.decode(token_ids, skip_special_tokens=...)`, where
    `pieces` are the strings returned by every `add_token` call followed by `flush`, and no
    piece carries a U+FFFD for a character that later tokens complete (see the module docstring
    for the method and the limits for non-byte-level tokenizers). Per-token work is bounded by
    the window, not by the length of the sequence.

    `max_pending_tokens` bounds how many tokens a trailing U+FFFD is held for tokenizers whose
    bytes cannot be inspected; for byte-level BPE, whose holds are exact, at least 32 is used.

    `tokenizer` is a Hugging Face tokenizer, or anything with `decode(ids,
    skip_special_tokens=...)` and `convert_ids_to_tokens` (mlx-lm's `TokenizerWrapper` works).
    Not thread-safe: use one instance per generation.
    """

    def __init__(
        self,
        tokenizer: Any,
        skip_special_tokens: bool = True,
        max_pending_tokens: int = 4,
    ) -> None:
        if max_pending_tokens < 1:
            raise ValueError("max_pending_tokens must be at least 1")
        self._tokenizer = tokenizer
        self._info = _info_for(tokenizer)
        self._skip_special_tokens = skip_special_tokens
        self._max_pending = (
            max(max_pending_tokens, _BYTE_LEVEL_MIN_PENDING)
            if self._info.byte_level
            else max_pending_tokens
        )
        self._token_ids: list[int] = []
        # Decode window: starts on a character boundary; skipped special tokens are left out.
        self._window: list[int] = []
        # window[:_read] is the prefix: ends on a character boundary and is emitted (all but a
        # final U+FFFD for one step after `_slide_past_rejected_tail`).
        self._read = 0
        # Characters of decode(window[:_read]), and of decode(window) already emitted.
        self._prefix_len = 0
        self._emitted = 0
        self._pieces: list[str] = []

    @property
    def skip_special_tokens(self) -> bool:
        return self._skip_special_tokens

    @property
    def token_ids(self) -> Sequence[int]:
        """Every token id added so far, skipped special tokens included (do not mutate)."""
        return self._token_ids

    @property
    def text(self) -> str:
        """All text returned so far by `add_token` and `flush`."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def add_token(self, token_id: int) -> str:
        """Adds one token; returns the text it made final (often "", never a partial char)."""
        token_id = int(token_id)
        self._token_ids.append(token_id)
        if self._skip_special_tokens and self._info.is_skipped(token_id):
            return ""
        self._window.append(token_id)
        return self._step(final=False)

    def flush(self) -> str:
        """Returns the text still held back (an unfinished character decodes as U+FFFD)."""
        if len(self._window) == self._read:
            return ""
        return self._step(final=True)

    def _decode(self, ids: list[int]) -> str:
        return self._info.decode(ids, self._skip_special_tokens)

    def _step(self, final: bool) -> str:
        text = self._decode(self._window)
        if not final and text.endswith(REPLACEMENT_CHAR) and self._tail_may_change():
            if self._info.byte_level:
                text = self._slide_past_rejected_tail(text)
            if len(self._window) - self._read <= self._max_pending:
                # Emit what lies before the unfinished tail; keep the window where it is.
                if self._info.byte_level:
                    stable = len(text) - 1  # a lossy UTF-8 decode gives one U+FFFD for it
                else:
                    stable = len(text.rstrip(REPLACEMENT_CHAR))
                piece = text[self._emitted : stable] if stable > self._emitted else ""
                self._emitted = max(self._emitted, stable)
                if piece:
                    self._pieces.append(piece)
                return piece
        piece = text[self._emitted :]
        # Move on only once the pending tokens made text (as TGI does): the new prefix then
        # holds a text-making token, which absorbs a decoder's first-token rules. Giving up on
        # a tail held too long also moves on, which bounds the window.
        if piece or final or len(self._window) - self._read > self._max_pending:
            self._advance(text)
        if piece:
            self._pieces.append(piece)
        return piece

    def _pending_bytes_tail(self, end: int) -> bytes:
        """The last (up to 3) bytes of the pending tokens window[_read:end]."""
        tail = b""
        for token_id in reversed(self._window[self._read : end]):
            tail = self._info.token_bytes(token_id) + tail
            if len(tail) >= 3:
                break
        return tail

    def _tail_may_change(self) -> bool:
        """Whether the trailing U+FFFD may still become a character as more tokens come."""
        if not self._info.byte_level:
            return True
        return bool(_unfinished_utf8_tail(self._pending_bytes_tail(len(self._window))))

    def _slide_past_rejected_tail(self, text: str) -> str:
        """Byte-level only: when the newest token cannot continue the unfinished sequence the
        pending tokens before it ended in, that sequence is invalid for good and the boundary
        before the newest token is a character boundary. The tokens up to there become the
        prefix, so a run of invalid bytes never widens the window. Returns decode(window).
        """
        end = len(self._window) - 1
        if end <= self._read:
            return text
        tail = _unfinished_utf8_tail(self._pending_bytes_tail(end))
        if not _rejects(tail, self._info.token_bytes(self._window[-1])):
            return text
        # Byte-level decoding splits exactly at a character boundary: text = prefix + rest.
        shift = self._prefix_len
        del self._window[: self._read]
        self._read = len(self._window) - 1
        self._prefix_len = len(self._decode(self._window[: self._read]))
        self._emitted -= shift
        return text[shift:]

    def _advance(self, text: str) -> None:
        """Makes the pending tokens the new prefix; the old prefix leaves the window."""
        if self._read == 0:
            prefix_text = text
        else:
            del self._window[: self._read]
            prefix_text = self._decode(self._window)
        self._read = len(self._window)
        self._prefix_len = self._emitted = len(prefix_text)
