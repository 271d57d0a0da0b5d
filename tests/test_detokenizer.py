"""IncrementalDetokenizer, token_bytes and token_text against real tokenizers.

The main property, checked on forced and random token sequences: the pieces streamed by
`add_token` plus `flush` concatenate to `tokenizer.decode(ids)`, and (for byte-level BPE, where
it can be stated exactly) after every token the text emitted so far is the decode of the tokens
so far, less only a trailing U+FFFD that stands for a character still being spelled out.
"""

from __future__ import annotations

import codecs
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from mlx_llm_server.text.detokenizer import IncrementalDetokenizer, token_bytes, token_text

FFFD = "\ufffd"
IM_END = 151645
ENDOFTEXT = 151643
THINK = 151667  # "<think>": an added token that is not special, so never skipped
THINK_END = 151668

# Characters this tokenizer spells with several tokens, each decoding alone to U+FFFD.
SPLIT_CHARACTERS = {
    "쀍": [168, 222, 235],  # Korean
    "꽑": [124246, 239],  # Korean
    "龘": [82912, 246],  # Chinese
    "驫": [76080, 104],  # Chinese
    "鬱": [99439, 109],  # Japanese / Chinese
    "ヿ": [2775, 123],  # Japanese katakana
    "𩸽": [103914, 116, 121],  # Japanese kanji (outside the BMP)
    "\u200d": [378, 235],  # zero-width joiner inside emoji sequences
}

# GPT-2's byte table from transformers, independent of the module under test.
_BYTE_OF_CHAR = {char: byte for byte, char in bytes_to_unicode().items()}


@pytest.fixture(scope="module")
def qwen(qwen3_tokenizer_path: Path) -> Any:
    return AutoTokenizer.from_pretrained(qwen3_tokenizer_path)


def stream(tokenizer: Any, ids: Sequence[int], skip: bool = True) -> list[str]:
    """The pieces of `ids`: one per `add_token`, then the `flush` result."""
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
    pieces = [detok.add_token(i) for i in ids]
    pieces.append(detok.flush())
    assert detok.text == "".join(pieces)
    assert list(detok.token_ids) == list(ids)
    return pieces


def qwen_bytes(tokenizer: Any, token_id: int) -> bytes:
    piece = tokenizer.convert_ids_to_tokens(token_id)
    try:
        return bytes(_BYTE_OF_CHAR[c] for c in piece)
    except KeyError:
        return piece.encode()


def expected_emitted(tokenizer: Any, ids: Sequence[int], skip: bool) -> str:
    """decode(ids), less the one U+FFFD of an unfinished UTF-8 tail (byte-level BPE only)."""
    text = tokenizer.decode(list(ids), skip_special_tokens=skip)
    special = set(tokenizer.all_special_ids)
    data = b"".join(qwen_bytes(tokenizer, i) for i in ids if not (skip and i in special))
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    decoder.decode(data, final=False)
    if decoder.getstate()[0]:
        assert text.endswith(FFFD)
        return text[:-1]
    return text


def check_exact(tokenizer: Any, ids: Sequence[int], skip: bool = True) -> list[str]:
    """Streams `ids`, checking the step-by-step property; returns the pieces."""
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
    pieces = []
    for k, token_id in enumerate(ids, start=1):
        pieces.append(detok.add_token(token_id))
        assert detok.text == expected_emitted(tokenizer, ids[:k], skip), (ids, k)
    pieces.append(detok.flush())
    assert "".join(pieces) == tokenizer.decode(list(ids), skip_special_tokens=skip), ids
    return pieces


# --- forced sequences with split characters ----------------------------------------------------


def test_split_characters_decode_alone_to_replacement(qwen: Any) -> None:
    for char, ids in SPLIT_CHARACTERS.items():
        assert qwen.encode(char) == ids or char == "\u200d"
        assert qwen.decode(ids) == char
        assert all(qwen.decode([i]) == FFFD for i in ids), char


def test_split_characters_are_emitted_whole(qwen: Any) -> None:
    for char, ids in SPLIT_CHARACTERS.items():
        pieces = check_exact(qwen, ids)
        assert pieces == [""] * (len(ids) - 1) + [char, ""], char


def test_splitting_tokens_found_by_encoding(qwen: Any) -> None:
    text = "🎉👨‍👩‍👧 한국어 日本語 中文 𠜎 쀍 龘 ヿ 𩸽 꽑"
    ids = qwen.encode(text)
    partial = [i for i in ids if FFFD in qwen.decode([i])]
    assert len(partial) >= 10  # the text really exercises split characters
    pieces = check_exact(qwen, ids)
    assert "".join(pieces) == text
    assert not any(FFFD in p for p in pieces)
    # Each emoji of the family arrives whole, joined by whole zero-width joiners.
    assert "👨" in pieces and "\u200d" in pieces and "👧" in pieces


def test_leading_space_and_split_character_in_one_token(qwen: Any) -> None:
    # " 쀍" is "Ġì" + "Ģ" + "į": the space arrives at once, the character when complete.
    ids = [3315, 222, 235]
    assert qwen.decode(ids) == " 쀍"
    assert check_exact(qwen, ids) == [" ", "", "쀍", ""]


def test_mixed_with_ascii_and_special_tokens(qwen: Any) -> None:
    hello = qwen.encode("Hello, world!")
    ids = (
        [THINK]
        + qwen.encode("\n")
        + SPLIT_CHARACTERS["쀍"][:2]
        + [IM_END]  # a skipped special token between the bytes of one character
        + SPLIT_CHARACTERS["쀍"][2:]
        + [THINK_END]
        + hello
        + SPLIT_CHARACTERS["龘"]
        + [IM_END, ENDOFTEXT]
    )
    for skip in (True, False):
        check_exact(qwen, ids, skip)
    # Kept, "<|im_end|>" cuts the character's bytes apart: both sides are invalid bytes.
    assert FFFD not in "".join(stream(qwen, ids, True))
    assert "".join(stream(qwen, ids, False)).count(FFFD) == 2
    assert "".join(stream(qwen, ids, True)) == "<think>\n쀍</think>Hello, world!龘"
    assert stream(qwen, ids, False)[-3:] == ["<|im_end|>", "<|endoftext|>", ""]


def test_special_tokens_only(qwen: Any) -> None:
    assert stream(qwen, [IM_END] * 50) == [""] * 51
    assert "".join(stream(qwen, [IM_END, ENDOFTEXT], skip=False)) == "<|im_end|><|endoftext|>"


def test_unfinished_character_at_the_end_is_flushed(qwen: Any) -> None:
    pieces = check_exact(qwen, [*qwen.encode("ab"), 168, 222])
    assert pieces == ["ab", "", "", FFFD]


def test_invalid_byte_sequences_are_not_held(qwen: Any) -> None:
    lead = 101862  # "ðł": the first two bytes of a four-byte character
    a = qwen.encode("a")[0]
    # The lead bytes cut short by "a" are invalid: emitted as soon as "a" shows it.
    assert check_exact(qwen, [lead, a, lead, lead, a]) == ["", FFFD + "a", "", FFFD, FFFD + "a", ""]
    # Only the last unfinished sequence is ever held; a long run of them is released.
    detok = IncrementalDetokenizer(qwen)
    for k in range(1, 21):
        detok.add_token(lead)
        assert detok.text.count(FFFD) >= k - 1
    assert detok.text + detok.flush() == qwen.decode([lead] * 20)
    # Stray continuation bytes cannot start anything: emitted at once.
    assert check_exact(qwen, [222, 235, a]) == [FFFD, FFFD, "a", ""]


def byte_token(tokenizer: Any, byte: int) -> int:
    """The single-byte token of a byte-level BPE vocabulary."""
    return tokenizer.convert_tokens_to_ids(bytes_to_unicode()[byte])


def test_chain_of_tokens_ending_inside_characters(qwen: Any) -> None:
    # "💤" then "핤" x 12, cut so that every token boundary falls inside a character:
    # F0 | 9F | 92 | A4 ED | 95 | A4 ED | 95 | ... | A4. Only one U+FFFD is ever held.
    a4_ed = 44680
    assert token_bytes(qwen, a4_ed) == b"\xa4\xed"
    ids = [byte_token(qwen, b) for b in (0xF0, 0x9F, 0x92)]
    ids += [a4_ed, byte_token(qwen, 0x95)] * 12 + [byte_token(qwen, 0xA4)]
    assert qwen.decode(ids) == "💤" + "핤" * 12
    pieces = check_exact(qwen, ids)
    assert pieces[3] == "💤" and pieces[-2:] == ["핤", ""]


def test_works_with_mlx_lm_tokenizer_wrapper(qwen3_tokenizer_path: Path) -> None:
    from mlx_lm.tokenizer_utils import load

    wrapper = load(qwen3_tokenizer_path)
    ids = [*wrapper.encode("한국어 쀍 🎉"), IM_END]
    assert "".join(stream(wrapper, ids)) == wrapper.decode(ids, skip_special_tokens=True)
    assert token_bytes(wrapper, 168) == b"\xec"


# --- random sequences --------------------------------------------------------------------------


def _partial_pool(tokenizer: Any, rng: random.Random) -> list[int]:
    """Vocabulary tokens whose bytes are not whole characters (found by sampling)."""
    pool = set()
    for char_ids in SPLIT_CHARACTERS.values():
        pool.update(char_ids)
    for _ in range(20000):
        i = rng.randrange(151643)
        try:
            qwen_bytes(tokenizer, i).decode("utf-8")
        except UnicodeDecodeError:
            pool.add(i)
    return sorted(pool)


def test_random_sequences_match_full_decode(qwen: Any) -> None:
    rng = random.Random(1234)
    partial = _partial_pool(qwen, rng)
    assert len(partial) > 100
    specials = [IM_END, ENDOFTEXT, THINK, THINK_END, 151644]
    vocab_size = len(qwen)
    for trial in range(120):
        length = rng.randint(1, 40)
        ids = []
        for _ in range(length):
            roll = rng.random()
            if roll < 0.5:
                ids.append(rng.choice(partial))
            elif roll < 0.6:
                ids.append(rng.choice(specials))
            else:
                ids.append(rng.randrange(vocab_size))
        check_exact(qwen, ids, skip=trial % 2 == 0)


def test_random_sequences_from_the_whole_vocabulary(qwen: Any) -> None:
    rng = random.Random(99)
    for trial in range(200):
        ids = [rng.randrange(len(qwen)) for _ in range(rng.randint(1, 60))]
        skip = trial % 2 == 0
        pieces = stream(qwen, ids, skip)
        full = qwen.decode(ids, skip_special_tokens=skip)
        assert "".join(pieces) == full
        offset = 0
        for piece in pieces:  # every U+FFFD sits where the full decode has one
            for k, char in enumerate(piece):
                if char == FFFD:
                    assert full[offset + k] == FFFD
            offset += len(piece)


# --- cost per token ----------------------------------------------------------------------------


class CountingTokenizer:
    """Forwards to a tokenizer, recording the length of every decode call."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.decode_lengths: list[int] = []

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        self.decode_lengths.append(len(ids))
        return self._inner.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_per_token_cost_stays_flat(qwen: Any) -> None:
    text = "Streaming 한국어 쀍 and 日本語 𩸽 with 🎉👨‍👩‍👧 emoji. "
    unit = [*qwen.encode(text), IM_END]
    ids = unit * 400  # ~12k tokens
    counting = CountingTokenizer(qwen)
    detok = IncrementalDetokenizer(counting)
    for i in ids:
        detok.add_token(i)
    text = detok.text + detok.flush()
    assert text == qwen.decode(ids, skip_special_tokens=True)
    lengths = [n for n in counting.decode_lengths if n > 0]
    # At most two small decodes per token, and the window never grows with the sequence.
    assert len(counting.decode_lengths) <= 2 * len(ids) + 10
    assert max(lengths) <= 8
    first, last = lengths[: len(lengths) // 10], lengths[-len(lengths) // 10 :]
    assert sum(last) / len(last) <= sum(first) / len(first) + 0.5


# --- SentencePiece-style tokenizers ------------------------------------------------------------

CORPUS = [
    "Hello world, this is a tiny test corpus.",
    "The quick brown fox jumps over the lazy dog.",
    "Streaming text one token at a time.",
    "héllo wörld naïve café",
] * 5


def _llama_style() -> PreTrainedTokenizerFast:
    """BPE on "▁"-marked text with byte fallback and Llama's decoder chain."""
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    # Trained on "▁"-split words so that, as in SentencePiece, no merge crosses a word start.
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    base.train_from_iterator(CORPUS, trainer)
    state = json.loads(base.to_str())
    vocab = dict(state["model"]["vocab"])
    merges = [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["model"]["merges"]
    ]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _metaspace_unigram() -> PreTrainedTokenizerFast:
    """Unigram with the Metaspace pre-tokenizer and decoder (T5 / XLM-R style)."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=120,
        special_tokens=["<unk>", "<s>", "</s>"],
        unk_token="<unk>",
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module", params=["llama", "metaspace"])
def spm(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    return _llama_style() if request.param == "llama" else _metaspace_unigram()


def test_sentencepiece_leading_space(spm: PreTrainedTokenizerFast) -> None:
    ids = spm.encode("Hello world, the quick fox", add_special_tokens=False)
    tokens = spm.convert_ids_to_tokens(ids)
    assert tokens[0].startswith("▁") and sum(t.startswith("▁") for t in tokens) >= 4
    pieces = stream(spm, ids)
    assert "".join(pieces) == spm.decode(ids) == "Hello world, the quick fox"
    # Spaces inside the text survive even though each window drops its first token's space.
    word = next(i for i, t in zip(ids[1:], tokens[1:], strict=True) if t.startswith("▁"))
    assert spm.decode([word]) == spm.convert_ids_to_tokens(word)[1:]
    assert "".join(stream(spm, [*ids[:2], word, word])) == spm.decode([*ids[:2], word, word])
    # After a skipped special token the next word keeps its space, as the full decode does.
    eos = spm.convert_tokens_to_ids("</s>")
    bos = spm.convert_tokens_to_ids("<s>")
    for seq in ([*ids[:2], eos, word], [eos, word, word], [bos, eos, *ids, eos, *ids]):
        for skip in (True, False):
            assert "".join(stream(spm, seq, skip)) == spm.decode(seq, skip_special_tokens=skip)


def test_sentencepiece_random_sequences(spm: PreTrainedTokenizerFast) -> None:
    rng = random.Random(7)
    vocab = spm.get_vocab()
    ordinary = [i for t, i in vocab.items() if not t.startswith("<0x")]
    encoded = [spm.encode(s, add_special_tokens=False) for s in ("中文", "🎉", " café", "쀍")]
    for trial in range(150):
        ids: list[int] = []
        while len(ids) < rng.randint(1, 40):
            if rng.random() < 0.2:
                ids.extend(rng.choice(encoded))
            else:
                ids.append(rng.choice(ordinary))
        skip = trial % 2 == 0
        pieces = stream(spm, ids, skip)
        full = spm.decode(ids, skip_special_tokens=skip)
        assert "".join(pieces) == full, ids
        assert FFFD not in "".join(pieces)


def test_byte_fallback_characters_are_emitted_whole() -> None:
    spm = _llama_style()
    ids = spm.encode("Hi 中文 🎉.", add_special_tokens=False)
    assert sum(t.startswith("<0x") for t in spm.convert_ids_to_tokens(ids)) == 10
    pieces = stream(spm, ids)
    assert "".join(pieces) == "Hi 中文 🎉."
    assert "中" in pieces and "文" in pieces and "🎉" in pieces
    assert not any(FFFD in p for p in pieces)


def test_byte_fallback_invalid_bytes_are_given_up_on() -> None:
    spm = _llama_style()
    stray = spm.convert_tokens_to_ids("<0x80>")
    detok = IncrementalDetokenizer(spm, max_pending_tokens=4)
    pieces = [detok.add_token(stray) for _ in range(6)]
    assert pieces[:4] == [""] * 4 and pieces[4] == FFFD * 5  # held at most four tokens
    assert "".join(pieces) + detok.flush() == spm.decode([stray] * 6) == FFFD * 6


# --- token_bytes / token_text ------------------------------------------------------------------


def test_token_bytes_rebuild_the_text(qwen: Any) -> None:
    text = "Hello 🎉👨‍👩‍👧 한국어 日本語 中文 𠜎 쀍 龘\n\ttabs  and spaces"
    ids = qwen.encode(text)
    assert b"".join(token_bytes(qwen, i) for i in ids) == text.encode()
    assert token_bytes(qwen, 168) == b"\xec" and token_bytes(qwen, 3315) == b" \xec"
    assert [token_bytes(qwen, i) for i in SPLIT_CHARACTERS["쀍"]] == [b"\xec", b"\x80", b"\x8d"]
    assert token_bytes(qwen, IM_END) == b"<|im_end|>"
    assert token_bytes(qwen, THINK) == b"<think>"
    assert token_bytes(qwen, 10**7) == b""  # outside the vocabulary


def test_token_text(qwen: Any) -> None:
    hello = qwen.encode(" hello")
    assert len(hello) == 1 and token_text(qwen, hello[0]) == " hello"
    assert token_text(qwen, 168) == FFFD and token_text(qwen, 3315) == " " + FFFD
    assert token_text(qwen, IM_END) == "<|im_end|>"
    assert token_text(qwen, qwen.encode("\n")[0]) == "\n"
    assert token_text(qwen, 168) is token_text(qwen, 168)  # cached


def test_token_bytes_sentencepiece(spm: PreTrainedTokenizerFast) -> None:
    ids = spm.encode("Hello world", add_special_tokens=False)
    assert b"".join(token_bytes(spm, i) for i in ids) == b" Hello world"
    assert token_text(spm, ids[0]).startswith(" ")
    if "<0xE4>" in spm.get_vocab():
        assert token_bytes(spm, spm.convert_tokens_to_ids("<0xE4>")) == b"\xe4"
        assert token_text(spm, spm.convert_tokens_to_ids("<0xE4>")) == FFFD
