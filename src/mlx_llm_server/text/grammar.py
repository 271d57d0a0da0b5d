"""Grammar-constrained decoding: JSON schemas, JSON objects and forced tool calls.

Built on llguidance (Rust, no torch): a lazy lexer plus an Earley parser that computes the set
of allowed next tokens over the whole vocabulary in well under a millisecond per step for
typical JSON schemas, and compiles a schema in about a millisecond (see bench/NOTES.md,
"Structured output engine").

Pieces, from once per model to once per step:

- `GrammarCompiler(tokenizer, vocab_size, eos_token_ids)`: built once per model (~1 s for a
  150k vocabulary). `compile_json_schema`, `compile_json_object`, `compile_tool_call` and
  `compile_lark` return a `CompiledGrammar`; invalid input raises `GrammarError` (a
  `ValueError`, meant to become an HTTP 400). Recent results are cached.
- `GrammarMatcher(grammar)`: one per sequence; tracks the tokens generated so far.
- `compute_grammar_bitmask(matchers)` (CPU, releases the GIL) and
  `apply_token_bitmask(logits, bitmask)` (one compiled MLX op for the whole batch);
  `apply_grammar_masks(logits, matchers)` does both.

Masks are packed bitmasks: int32 rows of `ceil(vocab_size / 32)` words, bit `t % 32` of word
`t // 32` set when token `t` is allowed (llguidance's and xgrammar's layout). Once the grammar
is complete, or after a rejected token, only the EOS tokens are allowed, so sampling ends the
sequence.

Overlapping mask computation with the model step: the mask for step t depends only on tokens
up to t-1, so a decode loop can start the forward pass, then compute the masks while it runs::

    for matcher, token in zip(matchers, sampled):  # tokens of step t-1
        if matcher is not None:
            matcher.accept_token(token)
    logits = model(tokens, cache=cache)[:, -1, :]
    mx.async_eval(logits)  # the accelerator works ...
    bitmask = compute_grammar_bitmask(matchers)  # ... while the CPU computes masks
    logits = apply_token_bitmask(logits, bitmask) if bitmask is not None else logits

`GrammarMatcher.prefetch_mask()` (e.g. from a worker thread right after `accept_token`) does
the same from elsewhere: the engine caches the mask of the current state, so a later
`fill_mask` only copies it.

Thread safety: `GrammarCompiler` and `CompiledGrammar` are safe to share between threads.
A `GrammarMatcher` must be used by one thread at a time (concurrent calls on the same matcher
raise `RuntimeError`); different matchers may be used from different threads at once, and
mask computation and compilation release the GIL. `apply_token_bitmask` builds MLX graph
nodes: call it from the thread that runs the model.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llguidance
import numpy as np

if TYPE_CHECKING:
    import mlx.core as mx

__all__ = [
    "CompiledGrammar",
    "GrammarCompiler",
    "GrammarError",
    "GrammarMatcher",
    "apply_grammar_masks",
    "apply_token_bitmask",
    "bitmask_words",
    "compute_grammar_bitmask",
]


class GrammarError(ValueError):
    """A schema, tool list or grammar that cannot be compiled (the request's fault)."""


def bitmask_words(vocab_size: int) -> int:
    """Number of int32 words in one packed mask row."""
    return (vocab_size + 31) // 32


# Runtime errors without parser-state dumps: shorter, and they don't echo schemas into logs.
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)
_MAX_ERROR_CHARS = 1000

# Keys whose value is a schema / a list of schemas / a map of name -> schema (JSON Schema 2020-12
# plus draft-07 spellings). Everything else (enum, const, default, examples...) is data.
_SUBSCHEMA_KEYS = frozenset(
    {
        "items",
        "additionalItems",
        "additionalProperties",
        "unevaluatedItems",
        "unevaluatedProperties",
        "contains",
        "propertyNames",
        "not",
        "if",
        "then",
        "else",
    }
)
_SUBSCHEMA_LIST_KEYS = frozenset({"anyOf", "oneOf", "allOf", "prefixItems"})
_SUBSCHEMA_MAP_KEYS = frozenset(
    {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
)
_OPEN_OBJECT_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties")


def _close_objects(schema: Any, close_here: bool = True) -> Any:
    """Copy of `schema` where objects that declare `properties` admit no other keys.

    This is OpenAI's strict mode (`additionalProperties: false` everywhere), filled in rather
    than demanded. `allOf` members stay open: closing each part of an intersection would make
    it unsatisfiable.
    """
    if isinstance(schema, list):
        return [_close_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _SUBSCHEMA_KEYS:
            out[key] = _close_objects(value)
        elif key in _SUBSCHEMA_LIST_KEYS and isinstance(value, list):
            out[key] = [_close_objects(item, close_here=key != "allOf") for item in value]
        elif key in _SUBSCHEMA_MAP_KEYS and isinstance(value, dict):
            out[key] = {name: _close_objects(item) for name, item in value.items()}
        else:
            out[key] = value
    if close_here and "properties" in out and not any(k in out for k in _OPEN_OBJECT_KEYS):
        out["additionalProperties"] = False
    return out


def _lark_string(text: str) -> str:
    """A Lark string literal matching `text` exactly."""
    return json.dumps(text, ensure_ascii=False)


class CompiledGrammar:
    """A grammar compiled for one tokenizer; immutable and shareable between threads.

    Holds a pristine matcher whose first mask is already computed; `GrammarMatcher` starts
    from a copy of it, so the first step of every sequence is cheap.
    """

    __slots__ = ("_template", "eos_token_ids", "kind", "source", "vocab_size", "warnings")

    def __init__(
        self,
        template: llguidance.LLMatcher,
        kind: str,
        vocab_size: int,
        eos_token_ids: tuple[int, ...],
        source: str = "",
    ) -> None:
        self._template = template
        self.kind = kind
        self.source = source  # llguidance's grammar text: what `compile_source` builds again
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        # e.g. unknown `format`s ignored by a non-strict schema
        self.warnings: tuple[str, ...] = tuple(template.get_grammar_warnings())

    def __repr__(self) -> str:
        return f"CompiledGrammar(kind={self.kind!r}, vocab_size={self.vocab_size})"


class GrammarCompiler:
    """Compiles JSON schemas, JSON-object mode and tool-call grammars for one model.

    `tokenizer` is a Hugging Face fast tokenizer (or mlx-lm's `TokenizerWrapper` around one).
    `vocab_size` is the width of the model's logits, which may exceed the tokenizer's
    vocabulary (padding rows are never allowed). `eos_token_ids` are the tokens that end a
    sequence; they are the only tokens allowed once a grammar is complete. Defaults: the
    tokenizer's size and EOS token(s).

    `compact_json=True` fixes JSON whitespace to the `json.dumps` style (`", "` and `": "`,
    no newlines), which is what models write in tool calls and avoids runs of whitespace that
    a weak model can fall into; `False` allows any JSON whitespace.

    Construction takes about a second for a 150k vocabulary; compiling is a millisecond or
    so for typical schemas, and the last `cache_size` results are kept. Thread-safe.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int | None = None,
        eos_token_ids: Iterable[int] | None = None,
        *,
        compact_json: bool = True,
        cache_size: int = 256,
    ) -> None:
        # mlx-lm's TokenizerWrapper keeps the HF tokenizer in `_tokenizer`; an HF fast
        # tokenizer keeps its Rust backend there, which has no `backend_tokenizer`.
        inner = getattr(tokenizer, "_tokenizer", None)
        hf_tokenizer = inner if hasattr(inner, "backend_tokenizer") else tokenizer
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TypeError("GrammarCompiler needs a Hugging Face fast tokenizer")
        if eos_token_ids is None:
            # mlx-lm's wrapper: a set of ids; transformers: an int (alias of eos_token_id)
            eos_token_ids = getattr(tokenizer, "eos_token_ids", None)
            if eos_token_ids is None or isinstance(eos_token_ids, int):
                eos_token_ids = [
                    hf_tokenizer.eos_token_id if eos_token_ids is None else eos_token_ids
                ]
        eos = tuple(sorted({int(t) for t in eos_token_ids if t is not None}))
        if not eos:
            raise ValueError("the tokenizer has no EOS token: pass eos_token_ids")
        tokenizer_size = len(hf_tokenizer)
        vocab_size = tokenizer_size if vocab_size is None else int(vocab_size)
        if vocab_size < tokenizer_size:
            raise ValueError(f"vocab_size {vocab_size} < tokenizer size {tokenizer_size}")
        if max(eos) >= vocab_size:
            raise ValueError(f"EOS token ids {eos} outside the vocabulary ({vocab_size})")

        # Serialize a copy: padding/truncation settings must not leak into the engine's view.
        backend = type(backend).from_str(backend.to_str())
        backend.no_padding()
        backend.no_truncation()
        self._tokenizer = llguidance.LLTokenizer(
            backend.to_str(), n_vocab=vocab_size, eos_token=list(eos)
        )
        self.vocab_size = vocab_size
        self.eos_token_ids = eos
        self._vocab = hf_tokenizer.get_vocab()  # token text -> id, for marker tokens
        whitespace = (
            {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
            if compact_json
            else {"whitespace_flexible": True}
        )
        self._json_options: dict[str, Any] = whitespace
        self._cache: OrderedDict[tuple[Any, ...], CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    # -- public compile entry points -------------------------------------------------------

    def compile_json_schema(self, schema: dict[str, Any], strict: bool = True) -> CompiledGrammar:
        """Grammar for one JSON value valid against `schema` (`response_format: json_schema`).

        `strict=True` (OpenAI's strict structured outputs): keywords the engine does not
        implement (e.g. `not`, unknown `format`s, `oneOf`) are an error, and objects that
        declare `properties` admit no others unless the schema says otherwise. `strict=False`: such keywords are ignored or approximated
        (`oneOf` as `anyOf`) and `additionalProperties` keeps its JSON Schema default (allowed).
        Properties are generated in the order the schema lists them.
        """
        if not isinstance(schema, Mapping):
            raise GrammarError(f"JSON schema must be an object, got {type(schema).__name__}")
        key = ("json_schema", _canonical(schema), strict)
        return self._cached(key, lambda: self._compile_schema(dict(schema), strict))

    def compile_json_object(self) -> CompiledGrammar:
        """Grammar for any JSON object (`response_format: {"type": "json_object"}`)."""
        return self._cached(
            ("json_object",),
            lambda: self._compile_schema({"type": "object"}, strict=False, kind="json_object"),
        )

    def compile_tool_call(
        self,
        tools: list[dict[str, Any]],
        forced_name: str | None,
        *,
        parallel_tool_calls: bool = True,
        start_marker: str = "<tool_call>",
        end_marker: str = "</tool_call>",
    ) -> CompiledGrammar:
        """Grammar for Qwen3/Hermes tool calls (`tool_choice: "required"` or a named function).

        Output: one call, or with `parallel_tool_calls` several separated by newlines, each
        `<tool_call>\\n{"name": NAME, "arguments": ARGS}\\n</tool_call>`, where NAME is
        `forced_name` or any tool's name and ARGS is an object valid against that tool's
        `parameters`. `tools` are OpenAI tool entries (`{"type": "function", "function":
        {...}}`) or bare function objects. Argument objects admit only their declared
        properties (unless the schema sets `additionalProperties`): functions reject unknown
        arguments. A function with `"strict": true` also makes unsupported keywords an error
        (see `compile_json_schema`); otherwise they are ignored. Markers that are single
        tokens of the vocabulary are matched as those tokens, as models write them.
        """
        functions = _functions(tools)
        if forced_name is not None:
            if forced_name not in functions:
                raise GrammarError(f"tool_choice names {forced_name!r}, which is not in tools")
            functions = {forced_name: functions[forced_name]}
        key = (
            "tool_call",
            _canonical(functions),
            parallel_tool_calls,
            start_marker,
            end_marker,
        )
        return self._cached(
            key,
            lambda: self._compile_tool_call(
                functions, parallel_tool_calls, start_marker, end_marker
            ),
        )

    def compile_lark(self, grammar: str) -> CompiledGrammar:
        """Grammar from llguidance's Lark dialect (supports `%json {...}` and `<[token_id]>`)."""
        if not isinstance(grammar, str):
            raise GrammarError("a Lark grammar must be a string")
        return self._cached(
            ("lark", grammar),
            lambda: self._build(llguidance.LLMatcher.grammar_from_lark(grammar), "lark"),
        )

    def compile_source(self, source: str, kind: str) -> CompiledGrammar:
        """A grammar from the text another compiler built (`CompiledGrammar.source`), for the
        same tokenizer in another process."""
        return self._cached(("source", kind, source), lambda: self._build(source, kind))

    # -- internals -------------------------------------------------------------------------

    def _cached(
        self, key: tuple[Any, ...], build: Callable[[], CompiledGrammar]
    ) -> CompiledGrammar:
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        grammar = build()  # outside the lock: compilation releases the GIL
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar

    def _schema_options(self, strict: bool) -> dict[str, Any]:
        return {**self._json_options, "lenient": not strict, "coerce_one_of": not strict}

    def _compile_schema(
        self, schema: dict[str, Any], strict: bool, kind: str = "json_schema"
    ) -> CompiledGrammar:
        if strict:
            schema = _close_objects(schema)
        try:
            source = llguidance.LLMatcher.grammar_from_json_schema(
                schema, overrides=self._schema_options(strict)
            )
        except (ValueError, TypeError) as exc:  # not JSON-serializable, not an object
            raise GrammarError(f"invalid JSON schema: {exc}") from exc
        return self._build(source, kind, what="JSON schema")

    def _compile_tool_call(
        self,
        functions: dict[str, dict[str, Any]],
        parallel: bool,
        start_marker: str,
        end_marker: str,
    ) -> CompiledGrammar:
        alternatives: list[str] = []
        rules: list[str] = []
        for index, (name, function) in enumerate(functions.items()):
            strict = bool(function.get("strict", False))
            parameters = function.get("parameters")
            if parameters is None:
                parameters = {"type": "object", "properties": {}}
            if not isinstance(parameters, Mapping):
                raise GrammarError(f"tool {name!r}: parameters must be a JSON schema object")
            parameters = dict(parameters)
            # Arguments are always an object, also when the schema leaves the type open.
            parameters.setdefault("type", "object")
            if parameters["type"] != "object":
                raise GrammarError(f"tool {name!r}: parameters must describe an object")
            # Functions reject unknown keyword arguments: objects admit only their declared
            # properties unless the schema says otherwise, strict or not.
            parameters = _close_objects(parameters)
            # Options travel inside the schema: `%json` takes no arguments.
            parameters["x-guidance"] = self._schema_options(strict)
            try:
                args_json = json.dumps(parameters, ensure_ascii=False)
            except (TypeError, ValueError) as exc:
                raise GrammarError(f"tool {name!r}: parameters are not JSON: {exc}") from exc
            # The call object is spelled out (name first, then arguments, as Qwen3's chat
            # template renders it) so that `parameters` stays its own document for `$ref`s.
            head = _lark_string('{"name": ' + json.dumps(name, ensure_ascii=False))
            args_open = _lark_string(', "arguments": ')
            rules.append(f"call_{index}: {head} {args_open} args_{index} " + '"}"')
            rules.append(f"args_{index}: %json {args_json}")
            alternatives.append(f"call_{index}")
        start = self._lark_marker(start_marker)
        end = self._lark_marker(end_marker)
        lines = [
            "start: tool_call" + (' ("\\n" tool_call)*' if parallel else ""),
            f'tool_call: {start} "\\n" call "\\n" {end}',
            "call: " + " | ".join(alternatives),
            *rules,
        ]
        source = llguidance.LLMatcher.grammar_from_lark("\n".join(lines))
        try:
            return self._build(source, "tool_call", what="tool-call grammar")
        except GrammarError:
            self._raise_for_bad_parameters(functions)
            raise

    def _raise_for_bad_parameters(self, functions: dict[str, dict[str, Any]]) -> None:
        """Names the tool whose parameters broke a tool-call grammar (a clearer 400)."""
        for name, function in functions.items():
            parameters = _close_objects({"type": "object", **(function.get("parameters") or {})})
            strict = bool(function.get("strict", False))
            source = llguidance.LLMatcher.grammar_from_json_schema(
                parameters, overrides=self._schema_options(strict)
            )
            matcher = llguidance.LLMatcher(self._tokenizer, source, log_level=0, limits=_LIMITS)
            if matcher.is_error():
                raise GrammarError(
                    f"tool {name!r}: invalid parameters schema: {_error_text(matcher)}"
                )

    def _lark_marker(self, marker: str) -> str:
        # The engine treats added tokens as special: a marker that is one such token has to be
        # named by id, as text it would never match the token the model writes.
        token_id = self._vocab.get(marker)
        if token_id is not None and self._tokenizer.is_special_token(token_id):
            return f"<[{token_id}]>"
        return _lark_string(marker)

    def _build(self, source: str, kind: str, what: str = "grammar") -> CompiledGrammar:
        template = llguidance.LLMatcher(self._tokenizer, source, log_level=0, limits=_LIMITS)
        if template.is_error():
            raise GrammarError(f"invalid {what}: {_error_text(template)}")
        # Compute the first mask now: it surfaces errors found only when parsing starts, and
        # copies of the template inherit it.
        row = np.empty(bitmask_words(self.vocab_size), dtype=np.int32)
        template.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
        if template.is_error():
            raise GrammarError(f"invalid {what}: {_error_text(template)}")
        return CompiledGrammar(template, kind, self.vocab_size, self.eos_token_ids, source)


def _error_text(matcher: llguidance.LLMatcher) -> str:
    text = matcher.get_error().replace("<non-verbose/>", "").strip()
    return text[:_MAX_ERROR_CHARS]


def _canonical(value: Any) -> str:
    try:
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise GrammarError(f"not JSON-serializable: {exc}") from exc


def _functions(tools: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> function object, from OpenAI tool entries or bare function objects."""
    if not isinstance(tools, Sequence) or isinstance(tools, str | bytes) or not tools:
        raise GrammarError("tools must be a non-empty list")
    functions: dict[str, dict[str, Any]] = {}
    for tool in tools:
        if not isinstance(tool, Mapping):
            raise GrammarError("each tool must be an object")
        function = (
            tool.get("function", tool) if tool.get("type", "function") == "function" else None
        )
        if not isinstance(function, Mapping):
            raise GrammarError(f"unsupported tool: {tool.get('type')!r}")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise GrammarError("each function needs a non-empty string name")
        if name in functions:
            raise GrammarError(f"duplicate tool name {name!r}")
        functions[name] = dict(function)
    return functions


@dataclass(frozen=True)
class PortableGrammar:
    """A request's grammar as plain data, for an engine in another process."""

    source: str
    kind: str

    def matcher(self, compiler: GrammarCompiler) -> GrammarMatcher:
        return GrammarMatcher(compiler.compile_source(self.source, self.kind))


class GrammarMatcher:
    """The grammar state of one sequence.

    Per step: get the mask (`fill_mask`, or `compute_grammar_bitmask` for a batch), sample,
    then `accept_token`. Once the grammar is complete only EOS is allowed; a rejected token
    puts the matcher in an error state (`error`) where, too, only EOS is allowed.
    Not thread-safe: use one matcher from one thread at a time.
    """

    __slots__ = ("_matcher", "eos_token_ids", "grammar", "vocab_size")

    def __init__(self, grammar: CompiledGrammar) -> None:
        self.grammar = grammar
        self.vocab_size = grammar.vocab_size
        self.eos_token_ids = grammar.eos_token_ids
        self._matcher = grammar._template.deep_copy()

    def portable(self) -> PortableGrammar:
        """What another process needs to start this matcher again (it must not have advanced)."""
        return PortableGrammar(self.grammar.source, self.grammar.kind)

    def fill_mask(self, bitmask: np.ndarray, index: int = 0) -> None:
        """Writes the next-token mask into row `index` of an int32 (rows, words) array."""
        row = bitmask[index]
        if bitmask.dtype != np.int32 or row.shape != (bitmask_words(self.vocab_size),):
            raise ValueError(
                f"bitmask must be int32 of shape (n, {bitmask_words(self.vocab_size)}), "
                f"got {bitmask.dtype} {bitmask.shape}"
            )
        if not row.flags.c_contiguous:
            raise ValueError("bitmask rows must be C-contiguous")
        self._matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)

    def allowed_token_mask(self) -> np.ndarray:
        """The next-token mask as a bool array of shape (vocab_size,)."""
        bitmask = np.empty((1, bitmask_words(self.vocab_size)), dtype=np.int32)
        self.fill_mask(bitmask)
        bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")
        return bits[0, : self.vocab_size].astype(bool)

    def prefetch_mask(self) -> None:
        """Computes (and caches in the engine) the mask for the current state."""
        self._matcher.compute_bitmask()

    def accept_token(self, token_id: int) -> bool:
        """Advances by one generated token; False if the grammar does not allow it."""
        if not 0 <= token_id < self.vocab_size:
            return False
        return self._matcher.consume_token(int(token_id))

    def is_accepting(self) -> bool:
        """True when the text so far is a complete match (EOS is allowed now)."""
        return self._matcher.is_accepting()

    def is_finished(self) -> bool:
        """True once nothing but EOS may follow: grammar complete, EOS accepted, or error."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str | None:
        """Why the matcher stopped on a rejected token, or None."""
        return _error_text(self._matcher) if self._matcher.is_error() else None


_executor: llguidance.LLExecutor | None = None
_executor_lock = threading.Lock()


def _parallel_fill(rows: list[tuple[llguidance.LLMatcher, int]], bitmask: np.ndarray) -> None:
    global _executor
    with _executor_lock:  # one batch at a time on the shared thread pool
        if _executor is None:
            _executor = llguidance.LLExecutor(num_threads=max(1, min(8, os.cpu_count() or 1)))
        _executor.unsafe_compute_mask_ptr(
            rows, bitmask.ctypes.data, bitmask.shape[1] * 4, bitmask.shape[0]
        )


def compute_grammar_bitmask(matchers: Sequence[GrammarMatcher | None]) -> np.ndarray | None:
    """One packed mask per row for a batch, or None when no row is constrained.

    Rows without a matcher are all ones (every token allowed). Several constrained rows are
    computed in parallel on a thread pool. Releases the GIL; safe to run while MLX evaluates
    the model step, as long as no other thread uses these matchers meanwhile.
    """
    constrained = [(i, m) for i, m in enumerate(matchers) if m is not None]
    if not constrained:
        return None
    vocab_size = constrained[0][1].vocab_size
    if any(m.vocab_size != vocab_size for _, m in constrained):
        raise ValueError("matchers of one batch must share a vocabulary size")
    bitmask = np.full((len(matchers), bitmask_words(vocab_size)), -1, dtype=np.int32)
    if len(constrained) == 1:
        index, matcher = constrained[0]
        matcher.fill_mask(bitmask, index)
    else:
        _parallel_fill([(m._matcher, i) for i, m in constrained], bitmask)
    return bitmask


_apply_compiled: Callable[[mx.array, mx.array], mx.array] | None = None


def apply_token_bitmask(logits: mx.array, bitmask: np.ndarray | mx.array) -> mx.array:
    """Sets disallowed tokens' logits to -inf: `logits` (B, ..., V), `bitmask` (B, words).

    Rows whose mask is all ones come back unchanged. Tokens past the mask's width (logits
    wider than the grammar's vocabulary) are disallowed. One fused MLX op for the batch.
    """
    import mlx.core as mx  # only here: the rest of the module is engine-side CPU work

    global _apply_compiled
    if _apply_compiled is None:
        _apply_compiled = mx.compile(_apply_bits)  # specialized per shape, cached by MLX
    vocab = logits.shape[-1]
    words = bitmask_words(vocab)
    if bitmask.shape[0] != logits.shape[0]:
        raise ValueError(f"bitmask has {bitmask.shape[0]} rows for {logits.shape[0]} logits")
    if isinstance(bitmask, np.ndarray):
        if bitmask.shape[1] < words:  # padding tokens beyond the grammar's vocabulary
            bitmask = np.pad(bitmask, ((0, 0), (0, words - bitmask.shape[1])))
        packed = mx.array(bitmask[:, :words].view(np.uint32))
    else:
        if bitmask.shape[1] < words:
            bitmask = mx.pad(bitmask, [(0, 0), (0, words - bitmask.shape[1])])
        packed = bitmask[:, :words].view(mx.uint32)
    return _apply_compiled(logits, packed)


def _apply_bits(logits: mx.array, packed: mx.array) -> mx.array:
    import mlx.core as mx

    shifts = mx.arange(32, dtype=mx.uint32)
    bits = ((packed[:, :, None] >> shifts) & 1).reshape(packed.shape[0], -1)
    allowed = bits[:, : logits.shape[-1]].astype(mx.bool_)
    allowed = allowed.reshape(allowed.shape[0], *([1] * (logits.ndim - 2)), allowed.shape[1])
    return mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))


def apply_grammar_masks(logits: mx.array, matchers: Sequence[GrammarMatcher | None]) -> mx.array:
    """Masks the rows of `logits` (B, ..., V) that have a matcher; others stay as they are.

    Computes the masks (`compute_grammar_bitmask`) and applies them in one MLX op
    (`apply_token_bitmask`); returns `logits` itself when no row is constrained.
    """
    if len(matchers) != logits.shape[0]:
        raise ValueError(f"{len(matchers)} matchers for {logits.shape[0]} rows of logits")
    bitmask = compute_grammar_bitmask(matchers)
    if bitmask is None:
        return logits
    return apply_token_bitmask(logits, bitmask)
