"""The running batch: rows of sequences that decode together, one token each per step.

Invariant: every row has exactly one sampled token that has been neither read nor fed to the
model (`pending`). A step feeds the pending tokens (computing the next ones asynchronously) and
only then reads them, so the device works on step t+1 while the host handles step t's tokens.
Rows join with their first token sampled by the prefill and leave by filtering every per-row
array (KV cache, sampling state, pending tokens) with the same indices.

A batch of one row keeps its sequence's own single-sequence cache (`solo`) rather than a batch
cache: no padding mask and no per-row offsets, so one user alone decodes exactly as mlx-lm's
`generate_step` does. The cache becomes a batch cache when a second row joins, and single again
when one row is left.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache, KVCache

from .sampling import SampleOutput, SamplingBatch
from .types import GenerationRequest

GrammarMasker = Callable[[mx.array, list[Any]], mx.array]

logger = logging.getLogger(__name__)


def evaluate(*arrays: Any, wait: bool = True) -> None:
    """`mx.eval` (or `mx.async_eval`), tried once more when the device is out of memory.

    MLX keeps freed buffers for reuse and lets that cache grow to nearly the whole device; an
    allocation of a size it does not hold can then fail although most of the memory is idle in
    the cache. Handing the cache back and evaluating again (what was already computed is kept)
    turns that failure into a pause.
    """
    run = mx.eval if wait else mx.async_eval
    try:
        run(*arrays)
    except RuntimeError as error:
        if "out of memory" not in str(error).lower():
            raise
        logger.warning(
            "out of device memory (MLX active %.2f GB, cache %.2f GB); retrying without the cache",
            mx.get_active_memory() / 2**30,
            mx.get_cache_memory() / 2**30,
        )
        mx.clear_cache()
        run(*arrays)


@dataclass
class Sequence:
    """One request's state inside the engine."""

    request: GenerationRequest
    stream: Any  # its RequestStream; None for the engine's own warm-up sequences
    tokens: list[int] = field(default_factory=list)  # prompt + generated, as fed to the model
    cached_tokens: int = 0
    generated: int = 0
    # While prefilling: this sequence's own cache, how far it got, and its sampling state.
    prompt_cache: list[Any] | None = None
    prefilled: int = 0
    prefill_alone: bool = False  # set when a batched prefill failed: it goes a chunk at a time
    cancelled: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_tokens)


@dataclass
class ReadToken:
    sequence: Sequence
    token_id: int
    logprob: float | None
    top_logprobs: tuple[tuple[int, float], ...] | None


def merge_caches(caches: list[list[Any]]) -> list[Any]:
    """Per-layer batch caches holding the given single-sequence caches as rows."""
    return [type(layer[0]).merge(list(layer)) for layer in zip(*caches, strict=True)]


# Rows leave and are extracted through these rather than BatchKVCache's own `filter` and
# `extract`, which read every layer's left padding back from the device (36 waits on a
# Qwen3-8B, the first behind the whole step in flight) and gather the kept rows with an
# indexed copy that runs far below the device's bandwidth (46 ms for 64 rows of 640 positions
# on an H100, about a whole decode step). Every layer's batch cache is padded alike (merged,
# extended, prepared and filtered together), so one read serves them all, and the kept rows
# are copied as runs of consecutive rows.


def _left_padding(cache: list[Any]) -> list[int] | None:
    """Each row's left padding, read once from the first attention layer (None if none)."""
    for layer in cache:
        if type(layer) is BatchKVCache:
            return layer.left_padding.tolist()  # type: ignore[no-any-return]
    return None


def _consecutive_runs(rows: list[int]) -> list[tuple[int, int]]:
    """[start, stop) ranges of consecutive row numbers, in the order given."""
    runs: list[tuple[int, int]] = []
    for row in rows:
        if runs and runs[-1][1] == row:
            runs[-1] = (runs[-1][0], row + 1)
        else:
            runs.append((row, row + 1))
    return runs


def _take_runs(array: mx.array, runs: list[tuple[int, int]], trim: int) -> mx.array:
    """The rows in `runs` of a (rows, heads, positions, dim) array, less `trim` positions on
    the left; one contiguous copy when the rows are not a single run (a single run is a view)."""
    pieces = [array[start:stop, :, trim:, :] for start, stop in runs]
    return pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=0)


def filter_rows(cache: list[Any], rows: list[int]) -> None:
    """Keeps only `rows` in every layer's batch cache, in place, trimming shared padding."""
    index = mx.array(rows, dtype=mx.int32)
    runs = _consecutive_runs(rows)
    padding = _left_padding(cache)
    trim = min(padding[r] for r in rows) if padding is not None else 0
    for layer in cache:
        if type(layer) is not BatchKVCache:
            layer.filter(index)
            continue
        if layer.keys is not None:
            layer.keys = _take_runs(layer.keys, runs, trim)
            layer.values = _take_runs(layer.values, runs, trim)
        layer.offset = layer.offset[index]
        layer.left_padding = layer.left_padding[index] - trim if trim else layer.left_padding[index]
        layer._idx -= trim


def extract_row(cache: list[Any], row: int) -> list[Any]:
    """Row `row` of every layer's batch cache as a single-sequence cache (copied, lazily)."""
    padding = _left_padding(cache)
    caches = []
    for layer in cache:
        if type(layer) is not BatchKVCache:
            caches.append(layer.extract(row))
            continue
        assert padding is not None
        single = KVCache()
        end = layer._idx
        single.keys = mx.contiguous(layer.keys[row : row + 1, :, padding[row] : end])
        single.values = mx.contiguous(layer.values[row : row + 1, :, padding[row] : end])
        single.offset = end - padding[row]
        caches.append(single)
    return caches


class DecodeBatch:
    def __init__(self, model: nn.Module, vocab_size: int, grammar_masker: GrammarMasker | None):
        self.model = model
        self.vocab_size = vocab_size
        self.grammar_masker = grammar_masker
        self.sequences: list[Sequence] = []
        self.cache: list[Any] = []
        self.sampling: SamplingBatch | None = None
        self.pending: SampleOutput | None = None
        self.solo = False  # `cache` holds one sequence's own caches, not batch caches
        # Seconds spent blocked on the device for sampled tokens: near zero means the host
        # (graph building, MLX's encoding, the interpreter lock) sets the pace, not the device.
        self.wait_seconds = 0.0
        # Seconds inside MLX queuing each step on the device (encoding and launching its
        # kernels, without the interpreter lock); the rest of a step is Python.
        self.launch_seconds = 0.0

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.cache)

    def add(
        self,
        sequences: list[Sequence],
        caches: list[list[Any]],
        first_tokens: list[SampleOutput],
        sampling: list[SamplingBatch],
    ) -> None:
        """Rows join with their prompt in `caches` and their first sampled token pending."""
        if not self.sequences and len(sequences) == 1:
            self.cache, self.solo = caches[0], True
            self.pending, self.sampling = first_tokens[0], sampling[0]
            self.sequences = list(sequences)
            return
        if self.solo:
            self._to_batch_cache()
        self.add_batch(
            sequences,
            merge_caches(caches),
            SampleOutput.concat(first_tokens),
            SamplingBatch.concat(sampling),
        )

    def add_batch(
        self,
        sequences: list[Sequence],
        cache: list[Any],
        first_tokens: SampleOutput,
        sampling: SamplingBatch,
    ) -> None:
        """Rows join already batched: per-layer batch caches with one row per sequence."""
        if self.solo:
            self._to_batch_cache()
        if self.sequences:
            for mine, theirs in zip(self.cache, cache, strict=True):
                mine.extend(theirs)
            assert self.pending is not None and self.sampling is not None
            self.pending = SampleOutput.concat([self.pending, first_tokens])
            self.sampling = SamplingBatch.concat([self.sampling, sampling])
        else:
            self.cache, self.pending, self.sampling = cache, first_tokens, sampling
        self.sequences.extend(sequences)
        if len(self.sequences) == 1:
            self._to_solo_cache(0)

    def _to_batch_cache(self) -> None:
        self.cache, self.solo = merge_caches([self.cache]), False

    def _to_solo_cache(self, row: int) -> None:
        self.cache, self.solo = self.extract_cache(row), True

    def keep(self, rows: list[int]) -> None:
        """Drops every row not listed."""
        if len(rows) == len(self.sequences):
            return
        if not rows:
            self.sequences, self.cache, self.sampling, self.pending = [], [], None, None
            self.solo = False
            return
        if len(rows) == 1:
            self._to_solo_cache(rows[0])
        else:
            filter_rows(self.cache, rows)
        assert self.pending is not None and self.sampling is not None
        self.pending = self.pending.select(rows)
        self.sampling = self.sampling.select(rows)
        self.sequences = [self.sequences[r] for r in rows]

    def extract_cache(self, row: int) -> list[Any]:
        """Row `row`'s cache as single-sequence caches (a solo row's own cache as it is)."""
        if self.solo:
            return self.cache
        return extract_row(self.cache, row)

    def step(self) -> list[ReadToken]:
        """Feeds the pending tokens, samples the next ones, and returns the tokens just fed."""
        assert self.pending is not None and self.sampling is not None
        current = self.pending
        matchers = [s.request.grammar for s in self.sequences]
        constrained = any(m is not None for m in matchers)
        if constrained:
            # A grammar needs the token before it can mask the next step: no overlap here.
            read = self._read(current)
            for token, matcher in zip(read, matchers, strict=True):
                if matcher is not None:
                    matcher.accept_token(token.token_id)
        logits = self.model(current.tokens[:, None], cache=self.cache)[:, -1, :]
        if constrained and self.grammar_masker is not None:
            logits = self.grammar_masker(logits, matchers)
        self.pending = self.sampling.sample(logits)
        started = time.perf_counter()
        evaluate(self.pending.arrays(), wait=False)
        self.launch_seconds += time.perf_counter() - started
        return read if constrained else self._read(current)

    def _read(self, output: SampleOutput) -> list[ReadToken]:
        started = time.perf_counter()
        tokens = output.tokens.tolist()
        self.wait_seconds += time.perf_counter() - started
        want_logprobs = any(s.request.sampling.logprobs for s in self.sequences)
        logprobs = output.logprobs.tolist() if want_logprobs else [None] * len(tokens)
        tops: list[Any] = [None] * len(tokens)
        if output.top_ids is not None and output.top_logprobs is not None:
            ids, values = output.top_ids.tolist(), output.top_logprobs.tolist()
            for row, sequence in enumerate(self.sequences):
                width = sequence.request.sampling.top_logprobs
                if sequence.request.sampling.logprobs and width > 0:
                    pairs = sorted(zip(ids[row], values[row], strict=True), key=lambda p: -p[1])
                    tops[row] = tuple(pairs[:width])
        read = []
        for row, sequence in enumerate(self.sequences):
            wants = sequence.request.sampling.logprobs
            read.append(
                ReadToken(sequence, tokens[row], logprobs[row] if wants else None, tops[row])
            )
        return read
