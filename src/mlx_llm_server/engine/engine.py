"""The engine: one thread owns MLX and runs the continuous batch.

Requests arrive on a thread-safe inbox; each one's events go back to the asyncio event loop
through a `RequestStream`. Every loop iteration: take new requests and cancellations, prefill
at most `prefill_chunk` prompt tokens (so running streams never wait for more than one chunk),
then one decode step for every running sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, make_prompt_cache

from ..errors import EngineError, ServerOverloadedError, ServiceUnavailableError
from .batch import DecodeBatch, GrammarMasker, ReadToken, Sequence, evaluate, merge_caches
from .output_head import OutputHead
from .prefix_cache import PrefixCache
from .sampling import SampleOutput, SamplingBatch
from .types import (
    EngineEvent,
    EngineStats,
    ErrorEvent,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)

logger = logging.getLogger(__name__)


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None elsewhere (macOS, musl)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def release_free_heap() -> None:
    """Returns the C heap's free pages to the OS.

    Freed MLX buffers and tokenizer scratch otherwise stay in glibc's arenas, and the resident
    size drifts by a hundred MB with the mix of past requests although nothing leaks.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


# Every sampling feature runs a kernel of its own (a scatter for logit_bias and the penalty
# counts, a partition for top_logprobs, a sort for top-p, per-row noise for seeds); on a GPU
# each one's first use compiles it (3.9 s on an H100 for the first request with logit_bias),
# so the warm-up uses them all.
WARM_UP_SAMPLING = (
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.7, top_p=0.9, top_k=20, min_p=0.05),
    SamplingParams(temperature=0.0, logit_bias={0: -100.0, 1: 5.0}, logprobs=True, top_logprobs=5),
    SamplingParams(
        temperature=0.8,
        seed=1,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        repetition_penalty=1.1,
    ),
)


CACHE_CLEAR_STEPS = 256
WARM_UP_PROMPT_ROWS = (8, 16, 32, 64)


@dataclass(frozen=True)
class EngineConfig:
    max_running: int = 64
    max_queued: int = 256
    prefill_chunk: int = 512
    prefix_cache_bytes: int = 1 << 30
    # Release MLX's buffer cache after this many steps with nothing running.
    idle_steps_before_clearing: int = 1


class Cancels(Protocol):
    def cancel(self, request_id: str) -> None: ...


class RequestStream:
    """The events of one request, consumed on the event loop with `async for`."""

    def __init__(self, engine: Cancels, request_id: str, loop: asyncio.AbstractEventLoop):
        self._engine = engine
        self.request_id = request_id
        self._loop = loop
        self._events: deque[EngineEvent] = deque()
        self._ready = asyncio.Event()
        self.finished = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def push(self, events: list[EngineEvent]) -> None:
        """Event-loop side: adds events and wakes the consumer."""
        self._events.extend(events)
        self._ready.set()

    def cancel(self) -> None:
        """Stops generation for this request; safe to call more than once."""
        if not self.finished:
            self.finished = True
            self._engine.cancel(self.request_id)

    def __aiter__(self) -> AsyncIterator[EngineEvent]:
        return self._one_by_one()

    async def _one_by_one(self) -> AsyncIterator[EngineEvent]:
        async for batch in self.batches():
            for event in batch:
                yield event

    async def batches(self) -> AsyncIterator[list[EngineEvent]]:
        """Events in the batches they are waiting in: one wake-up handles all of them.

        When the event loop falls behind the engine (many streams), a stream's tokens pile up;
        taking them together lets the caller send them as one chunk instead of one each.
        """
        while True:
            while not self._events:
                self._ready.clear()
                await self._ready.wait()
            batch: list[EngineEvent] = []
            while self._events:
                event = self._events.popleft()
                batch.append(event)
                if not isinstance(event, TokenEvent):
                    self.finished = True
                    yield batch
                    return
            yield batch


@dataclass
class EngineModel:
    """What the engine runs: built on the engine thread, since MLX arrays belong to a thread."""

    model: nn.Module
    vocab_size: int
    grammar_masker: GrammarMasker | None = None


# Hands one step's events to whoever listens: (the stream a request was enqueued with, its
# events) for every request that has some. By default the streams are `RequestStream`s and the
# events go to their event loops; an engine in a process of its own sends them to its parent.
Deliver = Callable[[list[tuple[Any, list[EngineEvent]]]], None]


class Engine:
    def __init__(self, config: EngineConfig | None = None, deliver: Deliver | None = None) -> None:
        self.config = config or EngineConfig()
        self._deliver = deliver or deliver_to_loops
        self.prefix_cache = PrefixCache(self.config.prefix_cache_bytes)
        self.model: nn.Module | None = None
        self._batch: DecodeBatch | None = None
        # Where found, a prompt's last token runs in its body's forward pass (output_head.py).
        self._head: OutputHead | None = None
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._waiting: deque[Sequence] = deque()
        self._prefilling: list[Sequence] = []
        self._by_id: dict[str, Sequence] = {}
        self._queued = 0  # submitted and not yet prefilling; guarded by _lock
        self._lock = threading.Lock()
        self._outbox: list[tuple[RequestStream | None, EngineEvent]] = []
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self.failure: BaseException | None = None
        self._heap_released = True  # once per idle period, see _step
        self.steps = 0
        self.warm_up_seconds = 0.0
        self.decode_steps = 0
        self.decode_rows = 0
        self.max_decode_rows = 0
        self.prompt_tokens_computed = 0
        # Steps that ran prompt work, and prompts whose prefill ended (joined or failed to):
        # their ratio is how many prompts share a step's prompt work on average.
        self.prefill_steps = 0
        self.prompts_prefilled = 0
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0

    # Event-loop side ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        alive = self._thread is not None and self._thread.is_alive()
        return alive and self._ready.is_set() and self.failure is None

    def start(self, setup: Callable[[], EngineModel]) -> Future[EngineModel]:
        """Starts the engine thread, which first runs `setup` (load and warm the model).

        The future resolves once the engine takes requests, or holds setup's exception.
        """
        started: Future[EngineModel] = Future()
        self._thread = threading.Thread(
            target=self._run, args=(setup, started), name="mlx-engine", daemon=True
        )
        self._thread.start()
        return started

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queues a request; raises ServerOverloadedError when the queue is full."""
        stream = RequestStream(self, request.request_id, asyncio.get_running_loop())
        self.enqueue(request, stream)
        return stream

    def enqueue(self, request: GenerationRequest, stream: Any, limit: bool = True) -> None:
        """Queues a request whose events go to `stream` (see `Deliver`); thread-safe.

        With `limit`, raises ServerOverloadedError when `max_queued` requests wait already.
        """
        if not self.running:
            raise ServiceUnavailableError("The generation engine is not running.")
        with self._lock:
            if limit and self._queued >= self.config.max_queued:
                raise ServerOverloadedError(
                    "The server is at capacity; retry shortly.", retry_after_seconds=1
                )
            self._queued += 1
        self._inbox.put(("submit", Sequence(request, stream)))

    def cancel(self, request_id: str) -> None:
        self._inbox.put(("cancel", request_id))

    def stats(self) -> EngineStats:
        batch = self._batch
        return EngineStats(
            waiting=self._queued,
            running=(len(batch) if batch else 0) + len(self._prefilling),
            prefix_cache_bytes=self.prefix_cache.nbytes,
            prefix_cache_entries=len(self.prefix_cache),
            kv_cache_bytes=batch.nbytes if batch else 0,
            prefix_cache_hits=self.prefix_cache.hits,
            prefix_cache_misses=self.prefix_cache.misses,
            decode_steps=self.decode_steps,
            decode_rows=self.decode_rows,
            max_decode_rows=self.max_decode_rows,
            prompt_tokens_computed=self.prompt_tokens_computed,
            prefill_steps=self.prefill_steps,
            prompts_prefilled=self.prompts_prefilled,
            prefill_seconds=self.prefill_seconds,
            decode_seconds=self.decode_seconds,
            decode_wait_seconds=batch.wait_seconds if batch is not None else 0.0,
            decode_launch_seconds=batch.launch_seconds if batch is not None else 0.0,
        )

    # Engine thread -----------------------------------------------------------------------

    def adopt(self, loaded: EngineModel) -> None:
        """Takes the model to run (on the thread that runs it; tests step an engine in theirs)."""
        self.model = loaded.model
        self._batch = DecodeBatch(loaded.model, loaded.vocab_size, loaded.grammar_masker)
        self.vocab_size = loaded.vocab_size
        self._head = OutputHead.find(loaded.model)

    def _run(self, setup: Callable[[], EngineModel], started: Future[EngineModel]) -> None:
        # Generation gets a stream of its own, as mlx-lm's generate does, so the asynchronous
        # evaluation of step t+1 queues behind nothing else.
        with mx.stream(mx.new_stream(mx.default_device())):
            self._serve(setup, started)

    def _serve(self, setup: Callable[[], EngineModel], started: Future[EngineModel]) -> None:
        try:
            loaded = setup()
            self.adopt(loaded)
            started_warm_up = time.monotonic()
            self._warm_up()
            self.warm_up_seconds = time.monotonic() - started_warm_up
        except BaseException as error:
            self.failure = error
            started.set_exception(error)
            return
        self._ready.set()
        started.set_result(loaded)
        try:
            while not self._stopping.is_set():
                self._step(block=not self._has_work())
        except BaseException as error:  # the engine thread must never die silently
            logger.exception("generation engine stopped")
            self.failure = error
            self._fail_everything(EngineError(f"The generation engine stopped: {error}"))
            self._flush()

    def _step(self, block: bool) -> None:
        self._take_inbox(block=block)
        self._drop_cancelled()
        computed = self.prompt_tokens_computed
        started = time.perf_counter()
        self._prefill()
        prefilled = self.prompt_tokens_computed != computed
        prefill_done = time.perf_counter()
        if prefilled:
            self.prefill_steps += 1
            self.prefill_seconds += prefill_done - started
        decoded = len(self._batch) > 0
        if decoded:
            self._decode()
            self.decode_seconds += time.perf_counter() - prefill_done
        self._flush()
        self.steps += 1
        # MLX keeps freed buffers for reuse; under steady load it never sees an idle moment, so
        # it lets go of them after prompt work (large, odd-sized temporaries) and every
        # CACHE_CLEAR_STEPS decode steps, as mlx-lm's own generation loops do. On NVIDIA GPUs a
        # release waits for the device to drain, yet keeping the buffers after prompt work was
        # slower over HTTP at 64 streams (bench/NOTES.md, "H200: a decode step on the device's
        # own clock").
        periodic = decoded and self.decode_steps % CACHE_CLEAR_STEPS == 0
        if not self._has_work() or prefilled or periodic:
            mx.clear_cache()
        if not self._has_work():
            if not self._heap_released:
                release_free_heap()
                self._heap_released = True
        else:
            self._heap_released = False

    def _warm_up(self) -> None:
        """Runs the shapes requests will meet (prompt lengths, batch sizes, sampling paths) once.

        First use of a shape compiles kernels (seconds on a GPU); doing it here keeps that off
        every user's request. Two prompts of different lengths are prefilled together (padded
        and masked); one prompt fills a whole prefill chunk; then a batch of short prompts grows
        to each power of two up to `max_running`, decoding two steps at each size.
        The synthetic sequences go through the normal prefill and decode path and leave no
        trace: they are dropped, and counters and the prefix cache are reset afterwards.
        """
        sequences: list[Sequence] = []

        def add(length: int, sampling: SamplingParams | None = None) -> Sequence:
            index = len(sequences)
            sampling = sampling or WARM_UP_SAMPLING[index % 2]
            request = GenerationRequest(
                request_id=f"warm-up-{index}",
                prompt_tokens=[(7 * index + i) % self.vocab_size for i in range(length)],
                max_tokens=1 << 30,
                sampling=sampling,
            )
            sequence = Sequence(request, None)
            sequences.append(sequence)
            self._waiting.append(sequence)
            with self._lock:
                self._queued += 1
            return sequence

        def run(steps: int) -> None:
            while self._waiting or self._prefilling:
                self._step(block=False)
            for _ in range(steps):
                self._step(block=False)

        # Prompts of several tokens arriving together (one padded, masked prefill pass), each
        # with other sampling features. A kernel compiles once whatever the batch size, so the
        # larger batches below only sample greedily or with top-p (fewer large temporaries).
        lengths = (17, 40, 23, 31)[: self.config.max_running]
        group = [add(n, sampling) for n, sampling in zip(lengths, WARM_UP_SAMPLING, strict=False)]
        run(2)
        for sequence in group:
            sequence.cancelled = True
        self._step(block=False)
        add(self.config.prefill_chunk + 3)
        run(2)
        size = 1
        while size < self.config.max_running:
            size = min(size * 2, self.config.max_running)
            for _ in range(size - len(self._batch)):
                add(2)
            run(2)
        for sequence in sequences:
            sequence.cancelled = True
        self._step(block=False)
        # Matmuls pick kernels by their number of rows (tokens in the batch); prompts of these
        # lengths reach the classes a small `max_running` never decodes at.
        for length in WARM_UP_PROMPT_ROWS:
            if length <= self.config.prefill_chunk:
                tokens = mx.zeros((1, length), dtype=mx.int32)
                evaluate(self.model(tokens, cache=make_prompt_cache(self.model)))
        self._outbox = []
        self.prefix_cache.clear()
        self.prefix_cache.hits = self.prefix_cache.misses = 0
        self.decode_steps = self.decode_rows = self.max_decode_rows = 0
        self.prompt_tokens_computed = self.prefill_steps = self.prompts_prefilled = 0
        self.prefill_seconds = self.decode_seconds = 0.0
        self._batch.wait_seconds = self._batch.launch_seconds = 0.0

    def _has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or (self._batch and len(self._batch)))

    def _take_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = item
            if kind == "submit":
                self._by_id[payload.request_id] = payload
                self._waiting.append(payload)
            elif kind == "cancel":
                sequence = self._by_id.get(payload)
                if sequence is not None:
                    sequence.cancelled = True
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _drop_cancelled(self) -> None:
        if any(s.cancelled for s in self._waiting):
            for sequence in [s for s in self._waiting if s.cancelled]:
                self._waiting.remove(sequence)
                self._dequeued(1)
                self._finish(sequence, "cancelled")
        for sequence in [s for s in self._prefilling if s.cancelled]:
            self._prefilling.remove(sequence)
            sequence.prompt_cache = None
            self._finish(sequence, "cancelled")
        cancelled = [row for row, s in enumerate(self._batch.sequences) if s.cancelled]
        if cancelled:
            for row in cancelled:
                self._finish(self._batch.sequences[row], "cancelled")
            gone = set(cancelled)
            self._batch.keep([r for r in range(len(self._batch)) if r not in gone])

    def _dequeued(self, count: int) -> None:
        with self._lock:
            self._queued -= count

    def _prefill(self) -> None:
        """Spends up to one chunk of prompt tokens; sequences whose prompt is done join.

        Prompts that fit go through the model together (`_prefill_together`); a long prompt,
        or one whose cache can't be merged into a batch, goes alone, a chunk at a time.
        """
        budget = self.config.prefill_chunk
        ready: list[tuple[Sequence, list[Any], SampleOutput, SamplingBatch]] = []
        while budget > 0:
            if not self._prefilling:
                room = self.config.max_running - len(self._batch) - len(ready)
                if not self._waiting or room <= 0:
                    break
                if not self._start_prefill(self._waiting.popleft()):
                    continue
            sequence = self._prefilling[0]
            if self._groupable(sequence):
                if sequence.prompt_len - sequence.prefilled > budget:
                    break  # it fits a whole step: it leads the next step's group
                budget -= self._prefill_together(budget, len(ready))
                continue
            try:
                done = self._prefill_chunk(sequence, budget)
            except Exception as error:  # e.g. out of memory: fail this request only
                logger.exception("prefill failed for %s", sequence.request_id)
                self._prefilling.remove(sequence)
                sequence.prompt_cache = None
                self._fail(sequence, error)
                mx.clear_cache()  # give back what the failed step held, for the next ones
                continue
            budget -= done[0]
            if done[1] is not None:
                self._prefilling.remove(sequence)
                ready.append((sequence, *done[1]))
        if ready:
            columns = list(zip(*ready, strict=True))
            self._join(list(columns[0]), lambda: self._batch.add(*columns))  # type: ignore[arg-type]

    def _groupable(self, sequence: Sequence) -> bool:
        """Whether a started prompt can be prefilled in a group: it is not part-way through a
        chunked prefill, its remaining tokens fit one step, and its cache merges into a batch
        cache (any empty cache does; a cached prefix only as plain attention KV)."""
        cache = sequence.prompt_cache
        return (
            not sequence.prefill_alone
            and sequence.prefilled == sequence.cached_tokens
            and sequence.prompt_len >= 2
            and sequence.prompt_len - sequence.prefilled <= self.config.prefill_chunk
            and cache is not None
            and (sequence.cached_tokens == 0 or all(type(layer) is KVCache for layer in cache))
        )

    def _join(self, sequences: list[Sequence], join: Callable[[], None]) -> None:
        """Runs `join` (sequences joining the batch); on failure every row fails, not the engine."""
        self.prompts_prefilled += len(sequences)
        try:
            join()
        except Exception as error:
            # The batch may be half extended, so its rows fail too; the engine goes on.
            logger.exception("joining the batch failed")
            for sequence in [*self._batch.sequences, *sequences]:
                self._fail(sequence, error)
            self._batch.keep([])
            mx.clear_cache()
        for sequence in sequences:
            sequence.prompt_cache = None

    def _prefill_together(self, budget: int, joining: int) -> int:
        """Prefills the started prompt and the waiting prompts after it that fit in `budget`
        together, in one batched forward pass; returns the tokens spent.

        Many users arriving at once is the common case; one forward pass for all of them
        (right-padded, as mlx-lm's batch prefill does) costs about what one prompt alone does on
        a GPU. A prompt that reuses a cached prefix joins with its cache and only its new tokens
        (a chat's next turn: one forward pass per user would dominate). The first prompt that
        does not fit, or can't be grouped, is left started for `_prefill`. `joining` sequences
        already wait to join the batch this step.
        """
        group = [self._prefilling.pop(0)]
        used = group[0].prompt_len - group[0].prefilled
        room = self.config.max_running - len(self._batch) - joining
        while self._waiting and len(group) < room:
            sequence = self._waiting.popleft()
            if not self._start_prefill(sequence):
                continue
            new_tokens = sequence.prompt_len - sequence.prefilled
            if not self._groupable(sequence) or used + new_tokens > budget:
                break  # stays started: prefilled alone, or first of the next group
            self._prefilling.remove(sequence)
            group.append(sequence)
            used += new_tokens
        try:
            prefilled = self._prefill_group(group)
        except Exception:
            # One prompt may be the cause (out of memory on a long one): prefilled one by one,
            # a chunk at a time, so only that request fails and the running batch is untouched.
            logger.exception("batched prefill failed; prefilling these prompts one by one")
            for sequence in group:  # their own caches are untouched: the merge copied them
                sequence.prefilled = sequence.cached_tokens
                sequence.tokens = list(sequence.request.prompt_tokens[: sequence.cached_tokens])
                sequence.prefill_alone = True
            self._prefilling.extend(group)
            mx.clear_cache()
            return 0
        self._join(group, lambda: self._batch.add_batch(group, *prefilled))
        return used

    def _prefill_group(
        self, group: list[Sequence]
    ) -> tuple[list[Any], SampleOutput, SamplingBatch]:
        # What each prompt still needs: all of it, or what follows the cached prefix. Rows are
        # left-aligned on their caches by the merge, right-padded here.
        cache = merge_caches([s.prompt_cache for s in group])  # type: ignore[misc]
        if self._head is not None:
            logits = self._padded_pass(
                cache, [s.request.prompt_tokens[s.prefilled :] for s in group]
            )
            assert logits is not None  # every row has its last token to run
        else:  # the body (its KV cache only), then every last token in a pass of their own
            self._padded_pass(cache, [s.request.prompt_tokens[s.prefilled : -1] for s in group])
            last = mx.array([s.request.prompt_tokens[-1:] for s in group])
            logits = self.model(last, cache=cache)[:, -1, :]
        sampling = SamplingBatch.concat(
            [
                SamplingBatch.for_sequence(
                    s.request.sampling, s.request.prompt_tokens, self.vocab_size
                )
                for s in group
            ]
        )
        grammars = [s.request.grammar for s in group]
        if any(g is not None for g in grammars) and self._batch.grammar_masker is not None:
            logits = self._batch.grammar_masker(logits, grammars)
        first = sampling.sample(logits)
        evaluate([layer.state for layer in cache], first.arrays(), wait=False)
        self.prompt_tokens_computed += sum(s.prompt_len - s.prefilled for s in group)
        for sequence in group:
            sequence.tokens = list(sequence.request.prompt_tokens)
            sequence.prefilled = len(sequence.tokens)
        return cache, first, sampling

    def _padded_pass(self, cache: list[Any], bodies: list[list[int]]) -> mx.array | None:
        """Runs the rows' tokens, right-padded, into the merged `cache`, whose KV it evaluates;
        with an output head found, returns the logits at each row's last token (lazy)."""
        lengths = [len(b) for b in bodies]
        longest = max(lengths)
        if longest == 0:
            return None
        for layer in cache:
            layer.prepare(lengths=lengths, right_padding=[longest - n for n in lengths])
        padded = mx.array([b + [0] * (longest - len(b)) for b in bodies])
        logits = None
        if self._head is not None:
            logits = self._head.logits_at(padded, cache, [n - 1 for n in lengths])
        else:
            self.model(padded, cache=cache)
        # Waited for here, as before the output head: a failure (out of memory on a long
        # prompt) surfaces in this step, where the group is retried prompt by prompt.
        evaluate([layer.state for layer in cache])
        for layer in cache:
            layer.finalize()  # right padding becomes left padding, as decoding expects
        return logits

    def _start_prefill(self, sequence: Sequence) -> bool:
        """Moves a waiting sequence to prefilling (with any cached prefix); False if it failed."""
        self._dequeued(1)
        prompt = sequence.request.prompt_tokens
        try:
            cache, cached = self.prefix_cache.fetch(prompt)
            sequence.prompt_cache = cache if cache is not None else make_prompt_cache(self.model)
        except Exception as error:  # e.g. no memory for its cache: fail it alone
            logger.exception("prefill failed to start for %s", sequence.request_id)
            self._fail(sequence, error)
            return False
        sequence.prefilled = sequence.cached_tokens = cached
        sequence.tokens = list(prompt[:cached])
        self._prefilling.append(sequence)
        return True

    def _prefill_chunk(
        self, sequence: Sequence, budget: int
    ) -> tuple[int, tuple[list[Any], SampleOutput, SamplingBatch] | None]:
        """Runs up to `budget` prompt tokens; the chunk that ends the prompt also samples.

        Only the KV cache of a chunk is evaluated, never its logits at every position (the
        output projection over the vocabulary for each of them would dominate the prefill):
        the last chunk takes the logits of its last token alone (`OutputHead`), or, for a model
        whose head was not found, the last token runs alone after the body.
        """
        prompt = sequence.request.prompt_tokens
        cache = sequence.prompt_cache
        assert cache is not None
        head = self._head
        end = len(prompt) if head is not None else len(prompt) - 1
        if sequence.prefilled < end:
            chunk = prompt[sequence.prefilled : min(sequence.prefilled + budget, end)]
            inputs = mx.array(chunk)[None]
            last: mx.array | None = None
            if head is not None and sequence.prefilled + len(chunk) == len(prompt):
                last = head.logits_at(inputs, cache, [len(chunk) - 1])
            else:
                self.model(inputs, cache=cache)
            evaluate([layer.state for layer in cache])  # a failure surfaces in this step
            self.prompt_tokens_computed += len(chunk)
            sequence.prefilled += len(chunk)
            sequence.tokens.extend(chunk)
            if last is None:
                return len(chunk), None
            spent = len(chunk)
        else:
            last = self.model(mx.array(prompt[-1:])[None], cache=cache)[:, -1, :]
            self.prompt_tokens_computed += 1
            sequence.prefilled += 1
            sequence.tokens.append(prompt[-1])
            spent = 1
        sampling = SamplingBatch.for_sequence(sequence.request.sampling, prompt, self.vocab_size)
        grammar = sequence.request.grammar
        if grammar is not None and self._batch.grammar_masker is not None:
            last = self._batch.grammar_masker(last, [grammar])
        first = sampling.sample(last)
        evaluate([layer.state for layer in cache], first.arrays(), wait=False)
        return spent, (cache, first, sampling)

    def _decode(self) -> None:
        rows = len(self._batch)
        self.decode_steps += 1
        self.decode_rows += rows
        self.max_decode_rows = max(self.max_decode_rows, rows)
        try:
            read = self._batch.step()
        except Exception as error:
            # One step computes every row, so a failure fails them all; the engine goes on.
            logger.exception("decode step failed")
            for sequence in self._batch.sequences:
                self._fail(sequence, error)
            self._batch.keep([])
            mx.clear_cache()
            return
        finished: dict[int, FinishReason] = {}
        for row, token in enumerate(read):
            reason = self._accept(token)
            if reason is not None:
                finished[row] = reason
        if finished:
            for row, reason in finished.items():
                sequence = self._batch.sequences[row]
                if reason == "stop" or reason == "length":
                    try:
                        kept = self._batch.extract_cache(row)
                        # Copied ahead of the next step (not waited for): a lazy slice would
                        # hold the whole batch's KV buffer alive, many times the bytes the
                        # prefix cache counts against its budget.
                        evaluate([layer.state for layer in kept], wait=False)
                        self.prefix_cache.store(sequence.tokens, kept)
                    except Exception:  # a cache that can't be kept costs reuse, not the request
                        logger.exception("storing the prefix of %s failed", sequence.request_id)
                self._finish(sequence, reason)
            self._batch.keep([r for r in range(len(self._batch)) if r not in finished])

    def _accept(self, token: ReadToken) -> FinishReason | None:
        sequence = token.sequence
        request = sequence.request
        if sequence.cancelled:
            return "cancelled"
        sequence.generated += 1
        sequence.tokens.append(token.token_id)
        if token.token_id in request.stop_token_ids:
            return "stop"
        self._outbox.append(
            (sequence.stream, TokenEvent(token.token_id, token.logprob, token.top_logprobs))
        )
        if request.grammar is not None and request.grammar.is_finished():
            return "stop"
        if sequence.generated >= request.max_tokens:
            return "length"
        return None

    def _finish(self, sequence: Sequence, reason: FinishReason) -> None:
        self._by_id.pop(sequence.request_id, None)
        # The end-of-sequence token counts as generated, as OpenAI and vLLM count it.
        event = FinishEvent(reason, sequence.prompt_len, sequence.generated, sequence.cached_tokens)
        self._outbox.append((sequence.stream, event))

    def _fail(self, sequence: Sequence, error: Exception) -> None:
        self._by_id.pop(sequence.request_id, None)
        wrapped = error if isinstance(error, EngineError) else EngineError(str(error))
        self._outbox.append((sequence.stream, ErrorEvent(wrapped)))

    def _fail_everything(self, error: Exception) -> None:
        for sequence in list(self._by_id.values()):
            self._fail(sequence, error)
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                self._fail(payload, error)

    def _flush(self) -> None:
        """Hands this step's events on, all requests' at once (see `deliver_to_loops`)."""
        if not self._outbox:
            return
        grouped: dict[Any, list[EngineEvent]] = {}
        for stream, event in self._outbox:
            if stream is not None:  # None: a warm-up sequence, nobody listens
                grouped.setdefault(stream, []).append(event)
        self._outbox = []
        if grouped:
            self._deliver(list(grouped.items()))


def deliver_to_loops(deliveries: list[tuple[RequestStream, list[EngineEvent]]]) -> None:
    """Pushes events into their `RequestStream`s: one wake-up of each event loop per step.

    One thread-safe call per step (not one per request) matters with many streams: each
    call writes to the loop's wake-up socket and schedules a callback.
    """
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, list[EngineEvent]]]]
    by_loop = {}
    for stream, events in deliveries:
        by_loop.setdefault(stream.loop, []).append((stream, events))
    for loop, own in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody left to read them
            loop.call_soon_threadsafe(_push_all, own)


def _push_all(deliveries: list[tuple[RequestStream, list[EngineEvent]]]) -> None:
    for stream, events in deliveries:
        stream.push(events)
