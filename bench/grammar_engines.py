"""Compares grammar engines for constrained decoding with the real Qwen3 tokenizer (offline).

Engines: llguidance, xgrammar, outlines-core, each measured if importable. For each: whether
it needs torch, tokenizer build time from the Hugging Face fast tokenizer, JSON-schema compile
time (fresh schema each time, so no engine cache helps), first-mask and per-token mask times
along a valid ~100-token response, and feature probes (does it accept a valid instance and
reject an invalid one). Then the MLX cost of applying packed bitmasks to a batch of logits
(`mlx_llm_server.text.grammar.apply_token_bitmask`).

    .venv/bin/python bench/grammar_engines.py
    # xgrammar requires torch; to measure it anyway, install it apart without dependencies
    # and let the script stand in a stub for torch's import (xgrammar never calls it here):
    .venv/bin/pip install --no-deps --target /tmp/xgr xgrammar apache-tvm-ffi
    .venv/bin/python bench/grammar_engines.py --extra-path /tmp/xgr --torch-stub
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.metadata
import json
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

VOCAB = 151936  # Qwen3's logits width (the tokenizer has 151669 tokens)
EOS_IDS = [151645, 151643]

TYPICAL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "score": {"type": "number"},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address", "score", "active"],
    "additionalProperties": False,
}
TYPICAL_INSTANCE = json.dumps(
    {
        "name": "Ada Lovelace, Countess of Lovelace",
        "age": 36,
        "role": "admin",
        "tags": ["mathematics", "analytical engine", "poetry of science", "notes"],
        "address": {"street": "12 St James's Square", "city": "London", "zip": "12345"},
        "score": 97.25,
        "active": True,
    }
)

TREE: dict[str, Any] = {
    "$defs": {
        "node": {
            "type": "object",
            "properties": {
                "v": {"type": "integer"},
                "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}},
            },
            "required": ["v", "kids"],
            "additionalProperties": False,
        }
    },
    "$ref": "#/$defs/node",
}


def _obj(props: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": list(props),
        "additionalProperties": False,
    }


# name, schema, a valid instance, an invalid one
PROBES: list[tuple[str, dict[str, Any], str, str]] = [
    ("typical nested", TYPICAL_SCHEMA, TYPICAL_INSTANCE, TYPICAL_INSTANCE.replace("admin", "root")),
    (
        "enum",
        _obj({"c": {"enum": ["red", "green", 3]}}),
        '{"c": "green"}',
        '{"c": "blue"}',
    ),
    (
        "anyOf",
        _obj({"v": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}),
        '{"v": 3}',
        '{"v": true}',
    ),
    (
        "array maxItems",
        _obj({"a": {"type": "array", "items": {"enum": [1, 2]}, "maxItems": 2}}),
        '{"a": [1, 2]}',
        '{"a": [1, 2, 1]}',
    ),
    (
        "int min/max",
        _obj({"n": {"type": "integer", "minimum": 0, "maximum": 150}}),
        '{"n": 42}',
        '{"n": 151}',
    ),
    (
        "string maxLength",
        _obj({"s": {"type": "string", "maxLength": 3}}),
        '{"s": "abc"}',
        '{"s": "abcd"}',
    ),
    (
        "pattern",
        _obj({"z": {"type": "string", "pattern": "^[0-9]{5}$"}}),
        '{"z": "12345"}',
        '{"z": "1234a"}',
    ),
    ("additionalProperties", _obj({"a": {"type": "integer"}}), '{"a": 1}', '{"a": 1, "b": 2}'),
    (
        "recursive $ref",
        TREE,
        '{"v": 1, "kids": [{"v": 2, "kids": [{"v": 3, "kids": []}]}]}',
        '{"v": 1, "kids": [{"v": "x", "kids": []}]}',
    ),
    ("any object", {"type": "object"}, '{"a": [1, {"b": null}], "c": "d"}', "[1]"),
]


class Engine:
    """One engine behind a small common interface."""

    name = ""
    requires_torch = False

    def build_tokenizer(self, hf_tokenizer: Any) -> None:
        raise NotImplementedError

    def compile(self, schema: dict[str, Any]) -> Any:
        raise NotImplementedError

    def matcher(self, grammar: Any) -> Any:
        raise NotImplementedError

    def fill(self, matcher: Any, bitmask: np.ndarray) -> None:
        raise NotImplementedError

    def accept(self, matcher: Any, token: int) -> bool:
        raise NotImplementedError

    def accepting(self, matcher: Any) -> bool:
        raise NotImplementedError


class LLGuidance(Engine):
    name = "llguidance"

    def __init__(self) -> None:
        import llguidance

        self.llg = llguidance
        self.version = llguidance.__version__
        self.options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

    def build_tokenizer(self, hf_tokenizer: Any) -> None:
        self.tokenizer = self.llg.LLTokenizer(
            hf_tokenizer.backend_tokenizer.to_str(), n_vocab=VOCAB, eos_token=EOS_IDS
        )

    def compile(self, schema: dict[str, Any]) -> Any:
        source = self.llg.LLMatcher.grammar_from_json_schema(schema, overrides=self.options)
        matcher = self.llg.LLMatcher(self.tokenizer, source, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def matcher(self, grammar: Any) -> Any:
        return grammar.deep_copy()

    def fill(self, matcher: Any, bitmask: np.ndarray) -> None:
        matcher.unsafe_compute_mask_ptr(bitmask.ctypes.data, bitmask.nbytes)

    def accept(self, matcher: Any, token: int) -> bool:
        return matcher.consume_token(token)

    def accepting(self, matcher: Any) -> bool:
        return matcher.is_accepting()


class XGrammar(Engine):
    name = "xgrammar"
    requires_torch = True

    def __init__(self) -> None:
        import xgrammar

        self.xgr = xgrammar
        self.version = importlib.metadata.version("xgrammar")

    def build_tokenizer(self, hf_tokenizer: Any) -> None:
        info = self.xgr.TokenizerInfo.from_huggingface(
            hf_tokenizer, vocab_size=VOCAB, stop_token_ids=EOS_IDS
        )
        self.compiler = self.xgr.GrammarCompiler(info, cache_enabled=False)

    def compile(self, schema: dict[str, Any]) -> Any:
        return self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(", ", ": ")
        )

    def matcher(self, grammar: Any) -> Any:
        return self.xgr.GrammarMatcher(grammar)

    def fill(self, matcher: Any, bitmask: np.ndarray) -> None:
        matcher.fill_next_token_bitmask(bitmask[None, :], 0)

    def accept(self, matcher: Any, token: int) -> bool:
        return matcher.accept_token(token)

    def accepting(self, matcher: Any) -> bool:
        return matcher.accept_token(EOS_IDS[0])


class OutlinesCore(Engine):
    name = "outlines-core"

    def __init__(self) -> None:
        import outlines_core

        self.oc = outlines_core
        self.version = importlib.metadata.version("outlines-core")

    def build_tokenizer(self, hf_tokenizer: Any) -> None:
        # `Vocabulary.from_pretrained` downloads from the hub: build the map by hand instead
        # (byte-level BPE token text -> raw bytes; special and added tokens left out).
        byte_of = {char: byte for byte, char in _bytes_to_unicode().items()}
        skip = set(hf_tokenizer.all_special_ids) | set(hf_tokenizer.added_tokens_decoder)
        tokens: dict[bytes, list[int]] = {}
        for text, token_id in hf_tokenizer.get_vocab().items():
            if token_id not in skip:
                tokens.setdefault(bytes(byte_of[c] for c in text), []).append(token_id)
        self.vocabulary = self.oc.Vocabulary(hf_tokenizer.eos_token_id, tokens)

    def compile(self, schema: dict[str, Any]) -> Any:
        from outlines_core.json_schema import build_regex_from_schema

        regex = build_regex_from_schema(json.dumps(schema), whitespace_pattern=r"[ ]?")
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, grammar: Any) -> Any:
        return self.oc.Guide(grammar)

    def fill(self, matcher: Any, bitmask: np.ndarray) -> None:
        matcher.write_mask_into(bitmask.ctypes.data, bitmask.size, 4)

    def accept(self, matcher: Any, token: int) -> bool:
        try:
            matcher.advance(token, return_tokens=False)
        except ValueError:
            return False
        return True

    def accepting(self, matcher: Any) -> bool:
        return matcher.is_finished()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable character table of byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


def _install_torch_stub() -> None:
    """A stand-in module so xgrammar (and tvm-ffi) import without torch; nothing calls it."""
    stub = types.ModuleType("torch")
    stub.__spec__ = importlib.machinery.ModuleSpec("torch", None)
    stub.__version__ = "0.0.0"  # type: ignore[attr-defined]

    class Placeholder:
        pass

    stub.Tensor = stub.LongTensor = stub.FloatTensor = Placeholder  # type: ignore[attr-defined]
    stub.cuda = types.SimpleNamespace(is_available=lambda: False)  # type: ignore[attr-defined]
    stub.tensor = lambda *args, **kwargs: None  # type: ignore[attr-defined]
    stub.__getattr__ = lambda name: Placeholder()  # type: ignore[attr-defined]  # dtypes
    sys.modules["torch"] = stub


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def _variant(schema: dict[str, Any], i: int) -> dict[str, Any]:
    """The schema with one property renamed: a fresh compile for engines that cache."""
    props = {(f"name{i}" if k == "name" else k): v for k, v in schema["properties"].items()}
    required = [f"name{i}" if r == "name" else r for r in schema["required"]]
    return {**schema, "properties": props, "required": required}


def measure(engine: Engine, hf_tokenizer: Any, reps: int) -> dict[str, str]:
    row: dict[str, str] = {"version": engine.version}
    row["needs torch"] = "yes (hard dependency)" if engine.requires_torch else "no"
    seconds, _ = _timed(lambda: engine.build_tokenizer(hf_tokenizer))
    row["tokenizer build (s)"] = f"{seconds:.2f}"

    # Fresh schema variants: compile, then walk a valid instance twice. The first walk is
    # cold (lazy engines build lexer states as they go), the second warm (a new sequence on
    # the same grammar, as in a server where a schema repeats).
    compile_times, first_masks, cold, warm = [], [], [], []
    bitmask = np.zeros((VOCAB + 31) // 32, dtype=np.int32)
    for i in range(reps):
        seconds, grammar = _timed(lambda i=i: engine.compile(_variant(TYPICAL_SCHEMA, i)))
        compile_times.append(seconds)
        tokens = hf_tokenizer.encode(TYPICAL_INSTANCE.replace('"name"', f'"name{i}"'))
        for times in (cold, warm):
            matcher = engine.matcher(grammar)
            for k, token in enumerate(tokens):
                seconds, _ = _timed(lambda m=matcher: engine.fill(m, bitmask))
                if k == 0 and times is cold:
                    first_masks.append(seconds)
                elif k > 0:
                    times.append(seconds)
                bit = (int(bitmask[token // 32]) >> (token % 32)) & 1
                assert bit and engine.accept(matcher, token), f"{engine.name} rejected a token"
    row["compile typical schema (ms)"] = _ms(statistics.median(compile_times))
    row["first mask, cold (ms)"] = _ms(statistics.median(first_masks))
    row["compile + first mask (ms)"] = _ms(
        statistics.median(c + f for c, f in zip(compile_times, first_masks, strict=True))
    )
    for label, times in (("cold", cold), ("warm", warm)):
        times.sort()
        row[f"mask/token {label} (ms) mean/p99/max"] = "/".join(
            _ms(v) for v in (statistics.fmean(times), times[int(len(times) * 0.99)], times[-1])
        )
    row["tokens per walk"] = str(len(tokens))

    for name, schema, valid, invalid in PROBES:
        row[f"probe: {name}"] = probe(engine, hf_tokenizer, schema, valid, invalid)
    return row


def probe(engine: Engine, hf_tokenizer: Any, schema: dict[str, Any], valid: str, bad: str) -> str:
    try:
        seconds, grammar = _timed(lambda: engine.compile(schema))
    except Exception as exc:
        return f"compile error: {str(exc).splitlines()[0][:40]}"

    def accepts(text: str) -> bool:
        matcher = engine.matcher(grammar)
        ok = all(engine.accept(matcher, t) for t in hf_tokenizer.encode(text))
        return ok and engine.accepting(matcher)

    if not accepts(valid):
        return "REJECTS VALID"
    verdict = "ok" if not accepts(bad) else "loose (accepts invalid)"
    return f"{verdict} ({_ms(seconds)} ms)"


def measure_mlx_apply() -> list[tuple[str, str]]:
    import mlx.core as mx

    from mlx_llm_server.text.grammar import apply_token_bitmask

    rng = np.random.default_rng(0)
    words = (VOCAB + 31) // 32
    rows = []
    for batch in (1, 8, 32):
        bitmask = rng.integers(-(2**31), 2**31, size=(batch, words), dtype=np.int64)
        bitmask = bitmask.astype(np.int32)
        for dtype in (mx.float32, mx.bfloat16):
            logits = mx.random.normal((batch, VOCAB)).astype(dtype)
            mx.eval(logits, apply_token_bitmask(logits, bitmask))  # compile for this shape
            times = []
            for _ in range(20):
                seconds, _ = _timed(lambda b=bitmask, x=logits: mx.eval(apply_token_bitmask(x, b)))
                times.append(seconds)
            rows.append((f"B={batch} {dtype}", _ms(statistics.median(times))))
    return rows


def measure_batch_masks(hf_tokenizer: Any, batch: int = 16) -> str:
    """Per-step `compute_grammar_bitmask` for `batch` sequences walking the typical instance."""
    from mlx_llm_server.text.grammar import (
        GrammarCompiler,
        GrammarMatcher,
        compute_grammar_bitmask,
    )

    compiler = GrammarCompiler(hf_tokenizer, vocab_size=VOCAB, eos_token_ids=EOS_IDS)
    matchers = [GrammarMatcher(compiler.compile_json_schema(TYPICAL_SCHEMA)) for _ in range(batch)]
    times = []
    for token in hf_tokenizer.encode(TYPICAL_INSTANCE):
        seconds, _ = _timed(lambda: compute_grammar_bitmask(matchers))
        times.append(seconds)
        for matcher in matchers:
            assert matcher.accept_token(token)
    first, rest = times[0], times[1:]  # the first step also starts the thread pool
    return (
        f"first step {_ms(first)} ms, then mean {_ms(statistics.fmean(rest))} ms, "
        f"max {_ms(max(rest))} ms per step"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra-path", action="append", default=[], help="added to sys.path")
    parser.add_argument("--torch-stub", action="store_true", help="import xgrammar w/o torch")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    sys.path[:0] = args.extra_path

    from model_factory import qwen3_tokenizer_dir
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())
    print(f"# {time.strftime('%Y-%m-%d')} {platform.machine()} {platform.system()}", end=" ")
    print(f"Python {platform.python_version()}, Qwen3 tokenizer ({len(hf_tokenizer)} tokens)")

    engines: list[Engine] = []
    notes: list[str] = []
    for factory in (LLGuidance, XGrammar, OutlinesCore):
        try:
            engines.append(factory())
        except ImportError as exc:
            if factory is XGrammar and args.torch_stub and "torch" in str(exc):
                _install_torch_stub()
                engines.append(factory())
                notes.append("xgrammar imported with a torch stub (it imports torch at load)")
            else:
                notes.append(f"{factory.name}: not importable ({exc})")

    results = {engine.name: measure(engine, hf_tokenizer, args.reps) for engine in engines}
    keys = list(next(iter(results.values())))
    width = max(len(k) for k in keys) + 2
    columns = [max(24, *(len(r[k]) + 2 for k in keys)) for r in results.values()]
    print("".ljust(width) + "".join(n.ljust(c) for n, c in zip(results, columns, strict=True)))
    for key in keys:
        cells = "".join(r[key].ljust(c) for r, c in zip(results.values(), columns, strict=True))
        print(key.ljust(width) + cells)
    for note in notes:
        print(f"note: {note}")

    print(f"\ncompute_grammar_bitmask, 16 rows: {measure_batch_masks(hf_tokenizer)}")
    print("\nMLX apply_token_bitmask (packed bitmask -> -inf), median ms:")
    for label, value in measure_mlx_apply():
        print(f"  {label:<28}{value}")


if __name__ == "__main__":
    main()
