"""Grammar-constrained decoding with the real Qwen3 tokenizer and a tiny random Qwen3.

The weights are random, so a free-running constrained decode could wander for long inside a
string or a number. Each decode runs model- or noise-driven for a few steps, then "finishes":
it takes EOS when allowed, else a closing token (`"`, `}`, `]`, ...) when allowed, else the
best allowed token. Every token still comes from the grammar's mask, so the outputs test it.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache
from transformers import AutoTokenizer

from mlx_llm_server.text.grammar import (
    CompiledGrammar,
    GrammarCompiler,
    GrammarError,
    GrammarMatcher,
    apply_grammar_masks,
    apply_token_bitmask,
    bitmask_words,
    compute_grammar_bitmask,
)

VOCAB = 151936  # the tiny Qwen3's logits width, wider than the tokenizer (151669)
EOS_IDS = (151643, 151645)  # <|endoftext|>, <|im_end|>

PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
        },
        "nickname": {"anyOf": [{"type": "string", "maxLength": 6}, {"type": "null"}]},
    },
    "required": ["name", "age", "role", "tags", "address"],
}

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 20},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "strict": True,
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                    "b": {"type": "integer", "minimum": -1000, "maximum": 1000},
                },
                "required": ["a", "b"],
            },
        },
    },
]

TOOL_BLOCK = re.compile(r"<tool_call>\n(.*?)\n</tool_call>", re.DOTALL)


# -- a small JSON Schema checker for the keywords used here --------------------------------


def schema_errors(value: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    errors: list[str] = []
    options = schema.get("anyOf")
    if options and all(schema_errors(value, option, path) for option in options):
        errors.append(f"{path}: matches no anyOf option")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in enum")
    kind = schema.get("type")
    checks = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
    }
    if kind is not None and not checks[kind](value):
        return [*errors, f"{path}: {value!r} is not {kind}"]
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        errors += [f"{path}: missing {k!r}" for k in schema.get("required", []) if k not in value]
        for key, item in value.items():
            if key in properties:
                errors += schema_errors(item, properties[key], f"{path}.{key}")
            elif schema.get("additionalProperties", True) is False:
                errors.append(f"{path}: unexpected {key!r}")
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", len(value)):
            errors.append(f"{path}: too many items")
        for i, item in enumerate(value):
            errors += schema_errors(item, schema.get("items", {}), f"{path}[{i}]")
    if isinstance(value, str):
        if len(value) > schema.get("maxLength", len(value)):
            errors.append(f"{path}: longer than maxLength")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: {value!r} does not match {schema['pattern']}")
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if is_number and not schema.get("minimum", value) <= value <= schema.get("maximum", value):
        errors.append(f"{path}: {value} out of range")
    return errors


def assert_valid(value: Any, schema: dict[str, Any]) -> None:
    errors = schema_errors(value, schema)
    assert not errors, errors


def test_schema_checker_rejects_bad_instances() -> None:
    good = {
        "name": "a",
        "age": 3,
        "role": "user",
        "tags": [],
        "address": {"city": "x", "zip": "12345"},
    }
    assert_valid(good, PERSON_SCHEMA)
    for bad in (
        {**good, "age": 151},
        {**good, "role": "root"},
        {**good, "address": {"city": "x", "zip": "1234"}},
        {key: v for key, v in good.items() if key != "name"},
    ):
        assert schema_errors(bad, PERSON_SCHEMA)


# -- fixtures and the decode helpers --------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(qwen3_tokenizer_path: Path) -> Any:
    return AutoTokenizer.from_pretrained(qwen3_tokenizer_path)


@pytest.fixture(scope="module")
def compiler(tokenizer: Any) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, vocab_size=VOCAB, eos_token_ids=EOS_IDS)


@pytest.fixture(scope="module")
def model(tiny_qwen3_dir: Path) -> Any:
    loaded_model, _ = load(str(tiny_qwen3_dir))
    return loaded_model


@pytest.fixture(scope="module")
def closers(tokenizer: Any) -> list[int]:
    """Token ids that close strings, arrays and objects, most closing first."""
    vocab = tokenizer.get_vocab()
    texts = ['"}}', '"}', '"]}', '"]', '"', "}}", "}", "]}", "]", ","]
    return [vocab[t] for t in texts if t in vocab]


def choose(masked: np.ndarray, sampled: int, finishing: bool, closers: Sequence[int]) -> int:
    """The sampled token; finishing: EOS, else the first allowed closer, else the best one."""
    if not finishing:
        return sampled
    for token in (*EOS_IDS, *closers):
        if masked[token] > -np.inf:
            return token
    return int(np.argmax(masked))


def decode(
    matchers: list[GrammarMatcher | None],
    next_logits: Any,
    closers: Sequence[int],
    free_steps: int = 24,
    max_steps: int = 400,
) -> list[list[int]]:
    """Generates until every constrained row finishes; `next_logits(tokens)` -> (B, V)."""
    rows = len(matchers)
    outputs: list[list[int]] = [[] for _ in range(rows)]
    tokens: list[int] | None = None
    for step in range(max_steps):
        logits = next_logits(tokens)
        masked_mx = apply_grammar_masks(logits, matchers)
        # Sampling keeps the constrained rows of one batch apart even from the same prompt.
        sampled = np.array(mx.random.categorical(masked_mx * 4.0)).tolist()
        masked = np.array(masked_mx.astype(mx.float32))
        tokens = []
        for row, matcher in enumerate(matchers):
            token = sampled[row]
            if matcher is not None and not matcher.is_finished():
                token = choose(masked[row], token, step >= free_steps, closers)
                assert matcher.accept_token(token), matcher.error
                if token not in EOS_IDS:
                    outputs[row].append(token)
            tokens.append(token)
        if all(m is None or m.is_finished() for m in matchers):
            return outputs
    raise AssertionError("constrained rows did not finish")


def model_logits(model: Any, tokenizer: Any, rows: int) -> Any:
    prompt = tokenizer.encode("<|im_start|>user\nGive me JSON.<|im_end|>\n<|im_start|>assistant\n")
    cache = make_prompt_cache(model)

    def step(tokens: list[int] | None) -> mx.array:
        inputs = mx.array([prompt] * rows) if tokens is None else mx.array(tokens)[:, None]
        logits = model(inputs, cache=cache)[:, -1, :]
        mx.async_eval(logits)  # masks are computed while the forward pass runs
        return logits

    return step


def noise_logits(rows: int, seed: int) -> Any:
    key = mx.random.key(seed)

    def step(tokens: list[int] | None) -> mx.array:
        nonlocal key
        key, sub = mx.random.split(key)
        return mx.random.normal((rows, VOCAB), key=sub)

    return step


def parse_tool_calls(text: str) -> list[dict[str, Any]]:
    blocks = TOOL_BLOCK.findall(text)
    assert blocks, text
    assert "\n".join(f"<tool_call>\n{b}\n</tool_call>" for b in blocks) == text
    return [json.loads(block) for block in blocks]


def parameters_of(name: str) -> dict[str, Any]:
    return next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)


# -- tests -----------------------------------------------------------------------------------


def test_model_batch_with_schema_json_object_and_free_rows(
    compiler: GrammarCompiler, model: Any, tokenizer: Any, closers: list[int]
) -> None:
    mx.random.seed(0)
    schema = compiler.compile_json_schema(PERSON_SCHEMA)
    matchers: list[GrammarMatcher | None] = [
        GrammarMatcher(schema),
        None,
        GrammarMatcher(compiler.compile_json_object()),
        GrammarMatcher(schema),
    ]
    outputs = decode(matchers, model_logits(model, tokenizer, len(matchers)), closers)

    for row in (0, 3):
        value = json.loads(tokenizer.decode(outputs[row]))
        assert_valid(value, PERSON_SCHEMA)
        assert list(value)[:5] == ["name", "age", "role", "tags", "address"]
        # strict mode closes objects: only declared properties
        assert set(value) <= set(PERSON_SCHEMA["properties"])
    assert isinstance(json.loads(tokenizer.decode(outputs[2])), dict)
    assert outputs[1] == []  # the free row was sampled but not recorded
    assert all(m is not None and m.is_finished() for m in (matchers[0], matchers[2]))


@pytest.mark.parametrize("seed", [1, 2])
def test_forced_tool_call_on_noise(
    compiler: GrammarCompiler, tokenizer: Any, closers: list[int], seed: int
) -> None:
    mx.random.seed(seed)
    grammar = compiler.compile_tool_call(TOOLS, forced_name="get_weather")
    matcher = GrammarMatcher(grammar)
    outputs = decode([matcher], noise_logits(1, seed), closers, free_steps=40)
    text = tokenizer.decode(outputs[0])
    calls = parse_tool_calls(text)
    for call in calls:
        assert list(call) == ["name", "arguments"]
        assert call["name"] == "get_weather"
        assert_valid(call["arguments"], parameters_of("get_weather"))
    assert outputs[0][0] == tokenizer.get_vocab()["<tool_call>"]  # the marker's own token


def test_required_tool_call_picks_a_declared_tool(
    compiler: GrammarCompiler, tokenizer: Any, closers: list[int]
) -> None:
    mx.random.seed(3)
    grammar = compiler.compile_tool_call(TOOLS, forced_name=None, parallel_tool_calls=False)
    names = set()
    for seed in range(4):
        matcher = GrammarMatcher(grammar)
        outputs = decode([matcher], noise_logits(1, 10 + seed), closers, free_steps=30)
        (call,) = parse_tool_calls(tokenizer.decode(outputs[0]))
        assert call["name"] in {"get_weather", "add"}
        assert_valid(call["arguments"], parameters_of(call["name"]))
        names.add(call["name"])
    assert names  # both names are allowed; which ones noise picks is not asserted


def test_tool_call_grammar_accepts_and_rejects_texts(
    compiler: GrammarCompiler, tokenizer: Any
) -> None:
    def accepts(grammar: CompiledGrammar, text: str) -> bool:
        matcher = GrammarMatcher(grammar)
        ok = all(matcher.accept_token(t) for t in tokenizer.encode(text))
        return ok and matcher.is_accepting()

    one = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": -2}}\n</tool_call>'
    two = (
        one
        + '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>'
    )
    required = compiler.compile_tool_call(TOOLS, None)
    assert accepts(required, one) and accepts(required, two)
    assert not accepts(compiler.compile_tool_call(TOOLS, None, parallel_tool_calls=False), two)
    assert not accepts(compiler.compile_tool_call(TOOLS, "get_weather"), one)
    # arguments admit only declared properties, strict function or not
    assert not accepts(required, one.replace('"b": -2', '"b": -2, "c": 3'))
    assert not accepts(required, two.replace('"celsius"', '"celsius", "x": 1'))
    assert not accepts(required, one.replace('"add"', '"sub"'))
    assert not accepts(required, one.replace("}}\n", "}\n"))


def test_only_eos_once_complete_and_after_a_rejected_token(
    compiler: GrammarCompiler, tokenizer: Any
) -> None:
    grammar = compiler.compile_json_schema(
        {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    )
    matcher = GrammarMatcher(grammar)
    assert not matcher.is_finished()
    for token in tokenizer.encode('{"a": "x"}'):
        assert matcher.accept_token(token)
    assert matcher.is_accepting() and matcher.is_finished()
    assert np.flatnonzero(matcher.allowed_token_mask()).tolist() == sorted(EOS_IDS)
    assert matcher.accept_token(EOS_IDS[1]) and matcher.error is None

    rejected = GrammarMatcher(grammar)
    assert not rejected.accept_token(tokenizer.encode("x")[0])
    assert rejected.error and rejected.is_finished()
    assert np.flatnonzero(rejected.allowed_token_mask()).tolist() == sorted(EOS_IDS)
    assert not GrammarMatcher(grammar).accept_token(VOCAB + 5)


def test_strict_closes_objects_and_lenient_keeps_them_open(
    compiler: GrammarCompiler, tokenizer: Any
) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    text = '{"a": 1, "b": 2}'

    def accepts(grammar: CompiledGrammar) -> bool:
        matcher = GrammarMatcher(grammar)
        return all(matcher.accept_token(t) for t in tokenizer.encode(text))

    assert not accepts(compiler.compile_json_schema(schema, strict=True))
    assert accepts(compiler.compile_json_schema(schema, strict=False))
    # unsupported keywords: an error when strict, ignored otherwise
    oneof = {"oneOf": [{"type": "integer"}, {"type": "number"}]}
    with pytest.raises(GrammarError, match="oneOf"):
        compiler.compile_json_schema(oneof, strict=True)
    compiler.compile_json_schema(oneof, strict=False)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda c: c.compile_json_schema({"type": "objekt"}), "Invalid type"),
        (lambda c: c.compile_json_schema(["not", "a", "schema"]), "must be an object"),
        (lambda c: c.compile_json_schema({"$ref": "#/$defs/missing"}), "missing"),
        (lambda c: c.compile_json_schema({"type": "string", "pattern": "("}), "regex"),
        (
            lambda c: c.compile_json_schema({"type": "integer", "minimum": 5, "maximum": 1}),
            "minimum",
        ),
        (lambda c: c.compile_json_schema({"properties": {"a": {"not": {}}}}), "not"),
        (lambda c: c.compile_tool_call(TOOLS, forced_name="nope"), "not in tools"),
        (lambda c: c.compile_tool_call([], None), "non-empty"),
        (lambda c: c.compile_tool_call([{"type": "function", "function": {}}], None), "name"),
        (lambda c: c.compile_tool_call([TOOLS[0], TOOLS[0]], None), "duplicate"),
        (
            lambda c: c.compile_tool_call(
                [
                    {
                        "name": "f",
                        "parameters": {"type": "object", "properties": {"x": {"type": "nope"}}},
                    }
                ],
                None,
            ),
            "tool 'f'",
        ),
        (
            lambda c: c.compile_tool_call([{"name": "f", "parameters": {"type": "array"}}], None),
            "object",
        ),
        (lambda c: c.compile_lark("start: undefined_rule"), "undefined_rule"),
    ],
)
def test_invalid_input_raises_grammar_error(
    compiler: GrammarCompiler, make: Any, message: str
) -> None:
    with pytest.raises(GrammarError, match=re.escape(message)) as caught:
        make(compiler)
    assert isinstance(caught.value, ValueError)


def test_unconstrained_rows_untouched(
    compiler: GrammarCompiler, model: Any, tokenizer: Any
) -> None:
    grammar = compiler.compile_json_schema(PERSON_SCHEMA)
    later = GrammarMatcher(grammar)
    for token in tokenizer.encode('{"name": "Al'):
        assert later.accept_token(token)
    matchers = [GrammarMatcher(grammar), None, later, None]
    prompt = mx.array([tokenizer.encode("Hello there")] * len(matchers))
    for logits in (model(prompt)[:, -1, :], model(prompt)[:, -1:, :].astype(mx.bfloat16)):
        masked = np.array(apply_grammar_masks(logits, matchers).astype(mx.float32))
        original = np.array(logits.astype(mx.float32))
        assert masked.shape == original.shape
        for row, matcher in enumerate(matchers):
            got, want = masked[row].reshape(-1), original[row].reshape(-1)
            if matcher is None:
                assert np.array_equal(got, want)
            else:
                allowed = matcher.allowed_token_mask()
                assert np.array_equal(got[allowed], want[allowed])
                assert np.all(np.isneginf(got[~allowed]))
                assert 0 < allowed.sum() < VOCAB
    assert apply_grammar_masks(logits, [None] * len(matchers)) is logits


def test_bitmask_width_and_batch_helpers(compiler: GrammarCompiler) -> None:
    grammar = compiler.compile_json_object()
    matchers = [None, GrammarMatcher(grammar), GrammarMatcher(grammar)]
    bitmask = compute_grammar_bitmask(matchers)
    assert bitmask is not None and bitmask.shape == (3, bitmask_words(VOCAB))
    assert np.all(bitmask[0] == -1)
    single = np.zeros((1, bitmask_words(VOCAB)), dtype=np.int32)
    matchers[1].fill_mask(single)  # type: ignore[union-attr]
    assert np.array_equal(single[0], bitmask[1]) and np.array_equal(bitmask[1], bitmask[2])
    assert compute_grammar_bitmask([None, None]) is None

    # logits wider than the mask: the extra tokens are never allowed; narrower: cut
    ones = np.full((2, 3), -1, dtype=np.int32)  # 96 tokens
    wide = np.array(apply_token_bitmask(mx.zeros((2, 100)), ones))
    assert np.all(wide[:, :96] == 0) and np.all(np.isneginf(wide[:, 96:]))
    narrow = np.array(apply_token_bitmask(mx.zeros((2, 50)), mx.array(ones)))
    assert np.all(narrow == 0)


def test_compile_cache_and_mask_prefetch_in_a_thread(
    compiler: GrammarCompiler, tokenizer: Any
) -> None:
    assert compiler.compile_json_schema(PERSON_SCHEMA) is compiler.compile_json_schema(
        dict(PERSON_SCHEMA)
    )
    assert compiler.compile_json_schema(PERSON_SCHEMA) is not compiler.compile_json_schema(
        PERSON_SCHEMA, strict=False
    )
    grammar = compiler.compile_json_schema(PERSON_SCHEMA)
    reference, prefetched = GrammarMatcher(grammar), GrammarMatcher(grammar)
    for token in tokenizer.encode('{"name": "Bob", "age": 4'):
        assert reference.accept_token(token) and prefetched.accept_token(token)
        worker = threading.Thread(target=prefetched.prefetch_mask)
        worker.start()
        worker.join()
        assert np.array_equal(prefetched.allowed_token_mask(), reference.allowed_token_mask())


def test_compiler_from_mlx_lm_tokenizer_wrapper_uses_its_eos(
    compiler: GrammarCompiler, tiny_qwen3_dir: Path
) -> None:
    _, wrapper = load(str(tiny_qwen3_dir))
    wrapped = GrammarCompiler(wrapper, vocab_size=VOCAB)
    assert set(wrapped.eos_token_ids) == set(wrapper.eos_token_ids)
    with pytest.raises(ValueError, match="vocab_size"):
        GrammarCompiler(wrapper, vocab_size=1000)
