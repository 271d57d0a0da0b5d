"""The engine without HTTP: rows joining and leaving a running batch keep every sequence exact.

A batch of one row decodes on its sequence's own cache (as mlx-lm's `generate_step` does) and
switches to a batch cache when others join; these tests run the real tiny Qwen3 through the
real loading path and compare every sequence with mlx-lm decoding it alone.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.models.cache import BatchKVCache

from mlx_llm_server.engine.batch import (
    Sequence,
    evaluate,
    extract_row,
    filter_rows,
)
from mlx_llm_server.engine.engine import Engine, EngineConfig, EngineModel
from mlx_llm_server.engine.types import GenerationRequest, SamplingParams, TokenEvent
from mlx_llm_server.kernels import decode_attention
from mlx_llm_server.kernels.compiled_decode import compile_decode_blocks
from mlx_llm_server.kernels.decode_attention import (
    enable_batch_decode_attention,
    reference_decode_attention,
)
from mlx_llm_server.kernels.fused_projections import fuse_projections
from mlx_llm_server.models.loader import load

PROMPTS = [list(range(300, 340)), list(range(1000, 1013)), list(range(5000, 5071))]


def reference_tokens(model_dir: Path, prompt: list[int], count: int) -> list[int]:
    """mlx-lm's own greedy decode of one sequence, alone."""
    from mlx_lm.generate import generate_step

    loaded = load(str(model_dir))
    steps = generate_step(mx.array(prompt), loaded.model, max_tokens=count)
    return [int(token) for token, _ in steps]


@pytest.fixture(scope="module")
def references(tiny_qwen3_dir: Path) -> list[list[int]]:
    return [reference_tokens(tiny_qwen3_dir, prompt, 64) for prompt in PROMPTS]


async def collect(engine: Engine, index: int, max_tokens: int, seen: list[int]) -> list[int]:
    request = GenerationRequest(
        f"r{index}-{max_tokens}", PROMPTS[index], max_tokens, SamplingParams(temperature=0.0)
    )
    tokens = []
    async for event in engine.submit(request):
        if isinstance(event, TokenEvent):
            tokens.append(event.token_id)
            seen[index] = len(tokens)
    return tokens


async def until(condition: object) -> None:
    for _ in range(2000):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.005)
    raise AssertionError("not reached")


KERNEL_MODES = ("decode-attention-kernel", "fused-projections", "compiled-fused")


@pytest.mark.parametrize("mode", ["model-blocks", "compiled-blocks", *KERNEL_MODES])
def test_rows_joining_and_leaving_decode_as_if_alone(
    tiny_qwen3_dir: Path,
    references: list[list[int]],
    mode: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """0 starts alone; 1 joins; 0 leaves, so 1 (the second row) goes on alone; 2 joins and
    leaves; 1 ends alone. With the decode-attention kernel on, its batched steps go through
    the kernel's entry point (here its MLX reference: the CUDA kernel itself runs in bench/)."""
    kernel_calls = []

    def stand_in(*args: object) -> mx.array:
        kernel_calls.append(1)
        return reference_decode_attention(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(decode_attention, "batch_decode_attention", stand_in)
    # The tiny model's float32 and 16-wide heads are not the kernel's shapes; its reference's are.
    monkeypatch.setattr(
        decode_attention, "decode_attention_supported", lambda q, k: q.shape[2] == 1
    )

    async def run() -> tuple[list[list[int]], list[bool]]:
        engine = Engine(EngineConfig(max_running=4, prefill_chunk=64))

        def setup() -> EngineModel:
            loaded = load(str(tiny_qwen3_dir))
            # As on an NVIDIA GPU: fused projections with the kernel's path; compiled blocks
            # around the model's own attention choice.
            if mode in ("fused-projections", "compiled-fused"):
                assert fuse_projections(loaded.model, force=True) > 0
            if mode in KERNEL_MODES:
                assert enable_batch_decode_attention(loaded.model, force=True) > 0
            if mode in ("compiled-blocks", "compiled-fused"):
                assert compile_decode_blocks(loaded.model) > 0
            return EngineModel(loaded.model, loaded.vocab_size)

        await asyncio.wrap_future(engine.start(setup))
        seen = [0, 0, 0]
        modes: list[bool] = []
        try:
            # Long enough that 0 is still decoding when 1's first token is seen on a busy machine.
            first = asyncio.ensure_future(collect(engine, 0, 16, seen))
            await until(lambda: seen[0] >= 2)
            modes.append(engine._batch.solo)
            second = asyncio.ensure_future(collect(engine, 1, 64, seen))
            await until(lambda: seen[1] >= 1)
            modes.append(engine._batch.solo)
            outputs = [await first]
            await until(lambda: len(engine._batch) <= 1)
            modes.append(engine._batch.solo)
            third = asyncio.ensure_future(collect(engine, 2, 8, seen))
            await until(lambda: seen[2] >= 1)
            modes.append(engine._batch.solo)
            outputs.append(await third)
            await until(lambda: len(engine._batch) <= 1)
            assert seen[1] < 64, "the second sequence ended before it was alone again"
            modes.append(engine._batch.solo)
            outputs.insert(1, await second)
        finally:
            engine.stop()
        return outputs, modes

    outputs, modes = asyncio.run(run())
    assert outputs[0] == references[0][:16]
    assert outputs[1] == references[1]
    assert outputs[2] == references[2][:8]
    # Each change between a sequence's own cache and a batch cache was exercised.
    assert modes == [True, False, True, False, True]
    assert bool(kernel_calls) == (mode in KERNEL_MODES)


def test_warm_up_runs_every_sampling_feature_and_leaves_no_trace(
    tiny_qwen3_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU each sampling feature's (and each matmul row class's) first use compiles a
    kernel: the warm-up pays for all."""
    from mlx_llm_server.engine.sampling import SamplingBatch

    seen: list[SamplingParams] = []
    original = SamplingBatch.sample

    def recording(self: SamplingBatch, logits: mx.array) -> object:
        seen.extend(self.params)
        return original(self, logits)

    rows_seen: set[int] = set()

    async def run() -> Engine:
        engine = Engine(EngineConfig(max_running=8, prefill_chunk=64))

        def setup() -> EngineModel:
            loaded = load(str(tiny_qwen3_dir))
            forward = type(loaded.model).__call__

            def recording_forward(model: object, inputs: mx.array, **kwargs: object) -> object:
                rows_seen.add(inputs.size)
                return forward(model, inputs, **kwargs)

            monkeypatch.setattr(type(loaded.model), "__call__", recording_forward)
            return EngineModel(loaded.model, loaded.vocab_size)

        await asyncio.wrap_future(engine.start(setup))
        engine.stop()
        return engine

    SamplingBatch.sample = recording  # type: ignore[method-assign]
    try:
        engine = asyncio.run(run())
    finally:
        SamplingBatch.sample = original  # type: ignore[method-assign]
    assert any(p.greedy for p in seen)
    assert any(p.top_p < 1 and p.top_k > 0 and p.min_p > 0 for p in seen)
    assert any(p.logit_bias for p in seen)
    assert any(p.logprobs and p.top_logprobs for p in seen)
    assert any(p.seed is not None for p in seen)
    assert any(p.uses_penalties for p in seen)
    stats = engine.stats()
    assert stats.running == stats.waiting == stats.prefix_cache_entries == 0
    assert stats.decode_steps == stats.prompt_tokens_computed == 0
    assert stats.prefill_steps == stats.prompts_prefilled == 0
    assert stats.prefill_seconds == stats.decode_seconds == 0
    assert stats.decode_wait_seconds == stats.decode_launch_seconds == 0
    # Quantized matmuls pick kernels by rows: the warm-up reaches 64 rows with 8 sequences.
    assert {8, 16, 32, 64} <= rows_seen


def engine_on(model_dir: Path, **config: int) -> Engine:
    """An engine driven step by step in this thread (no engine thread, no warm-up)."""
    engine = Engine(EngineConfig(**config))
    loaded = load(str(model_dir))
    engine.adopt(EngineModel(loaded.model, loaded.vocab_size))
    return engine


def arrive_together(engine: Engine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Queues the prompts at once, steps the engine until all finish; their generated tokens."""
    sequences = [
        Sequence(GenerationRequest(f"s{i}", p, max_tokens, SamplingParams(temperature=0.0)), None)
        for i, p in enumerate(prompts)
    ]
    engine._waiting.extend(sequences)
    engine._queued += len(sequences)
    for _ in range(1000):
        if not engine._has_work():
            break
        engine._step(block=False)
    assert not engine._has_work()
    return [s.tokens[s.prompt_len :] for s in sequences]


def test_next_turns_reuse_their_prefix_and_prefill_together(tiny_qwen3_dir: Path) -> None:
    """Two conversations' next turns (cached prefixes, one with a single new token) and a new
    prompt arrive together: one batched forward pass prefills them, each as if alone."""
    engine = engine_on(tiny_qwen3_dir, max_running=8, prefill_chunk=64)
    first_turns = arrive_together(engine, [PROMPTS[0], PROMPTS[1]], 5)
    next_turns = [
        PROMPTS[0] + first_turns[0] + [7, 8, 9, 10, 11],
        PROMPTS[1] + first_turns[1] + [12],
        list(range(7000, 7030)),
    ]
    groups: list[list[int]] = []
    prefill_group = engine._prefill_group

    def spy(group: list[Sequence]) -> object:
        groups.append([s.cached_tokens for s in group])
        return prefill_group(group)

    engine._prefill_group = spy  # type: ignore[method-assign]
    outputs = arrive_together(engine, next_turns, 12)
    assert engine.prefix_cache.hits == 2
    assert len(groups) == 1 and len(groups[0]) == 3
    assert groups[0][0] > len(PROMPTS[0]) and groups[0][1] > len(PROMPTS[1]) and groups[0][2] == 0
    for prompt, output in zip(next_turns, outputs, strict=True):
        assert output == reference_tokens(tiny_qwen3_dir, prompt, 12)


def test_prompts_beyond_one_step_are_prefilled_in_groups(tiny_qwen3_dir: Path) -> None:
    """Eight users at once with a step budget for three prompts: three batched passes over three
    steps, none prompt by prompt, and every sequence exact."""
    engine = engine_on(tiny_qwen3_dir, max_running=8, prefill_chunk=64)
    prompts = [list(range(400 + 50 * i, 420 + 50 * i)) for i in range(8)]
    sizes: list[int] = []
    alone: list[str] = []
    prefill_group, prefill_chunk = engine._prefill_group, engine._prefill_chunk

    def group_spy(group: list[Sequence]) -> object:
        sizes.append(len(group))
        return prefill_group(group)

    def chunk_spy(sequence: Sequence, budget: int) -> object:
        alone.append(sequence.request_id)
        return prefill_chunk(sequence, budget)

    engine._prefill_group = group_spy  # type: ignore[method-assign]
    engine._prefill_chunk = chunk_spy  # type: ignore[method-assign]
    outputs = arrive_together(engine, prompts, 6)
    assert sizes == [3, 3, 2] and alone == []
    # The counters /metrics shows: three steps of prompt work shared by eight prompts.
    stats = engine.stats()
    assert (stats.prefill_steps, stats.prompts_prefilled) == (3, 8)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output == reference_tokens(tiny_qwen3_dir, prompt, 6)


def test_out_of_device_memory_in_a_step_is_retried_without_the_buffer_cache(
    tiny_qwen3_dir: Path, references: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An allocation that fails while a step evaluates (MLX's cache holding the memory in
    buffers of other sizes) costs a cache release and a second try, not the requests."""
    engine = engine_on(tiny_qwen3_dir, max_running=4, prefill_chunk=64)
    real_async_eval, real_clear = mx.async_eval, mx.clear_cache
    calls = {"evals": 0}
    cleared_at: list[int] = []  # the number of evaluations so far, at each cache release

    def failing_once(*arrays: object) -> None:
        calls["evals"] += 1
        if calls["evals"] == 5:  # a decode step, rows running
            raise RuntimeError("cudaMallocAsync(&data, size, stream) failed: out of memory")
        real_async_eval(*arrays)

    def clear() -> None:
        cleared_at.append(calls["evals"])
        real_clear()

    monkeypatch.setattr(mx, "async_eval", failing_once)
    monkeypatch.setattr(mx, "clear_cache", clear)
    outputs = arrive_together(engine, PROMPTS[:2], 12)
    assert calls["evals"] > 5 and 5 in cleared_at  # released right after the failure
    assert outputs == [references[0][:12], references[1][:12]]


def test_other_evaluation_errors_are_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    tries = []

    def broken(*arrays: object) -> None:
        tries.append(arrays)
        raise RuntimeError("[matmul] shapes do not match")

    monkeypatch.setattr(mx, "eval", broken)
    with pytest.raises(RuntimeError, match="shapes"):
        evaluate(mx.array([1]))
    assert len(tries) == 1


def padded_batch_caches(layers: int, padding: list[int], length: int) -> list[BatchKVCache]:
    """Batch caches as decoding leaves them: rows of different lengths, left-padded alike."""
    caches = []
    for layer in range(layers):
        cache = BatchKVCache(padding)
        shape = (len(padding), 2, length + 5, 4)  # 5 slots of room past the last position
        cache.keys = mx.random.normal(shape, key=mx.random.key(2 * layer))
        cache.values = mx.random.normal(shape, key=mx.random.key(2 * layer + 1))
        cache.offset = cache.offset + length
        cache._idx = length
        caches.append(cache)
    return caches


@pytest.mark.parametrize(
    "rows", [[0, 2], [1, 2, 3], [3, 0]], ids=["trims", "keeps-pad", "reorders"]
)
def test_rows_leave_the_batch_cache_as_mlx_lm_filters_them(rows: list[int]) -> None:
    padding = [3, 0, 5, 2]
    ours, theirs = padded_batch_caches(3, padding, 9), padded_batch_caches(3, padding, 9)
    filter_rows(ours, rows)
    for layer in theirs:
        layer.filter(mx.array(rows))
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine._idx == reference._idx
        for a, b in zip(mine.state[:4], reference.state[:4], strict=True):
            assert a.shape == b.shape and mx.array_equal(a, b).item()


def test_a_row_leaves_the_batch_cache_as_mlx_lm_extracts_it() -> None:
    padding = [3, 0, 5, 2]
    caches = padded_batch_caches(2, padding, 9)
    for row in range(len(padding)):
        for mine, layer in zip(extract_row(caches, row), caches, strict=True):
            reference = layer.extract(row)
            assert mine.offset == reference.offset == 9 - padding[row]
            assert mx.array_equal(mine.keys, reference.keys).item()
            assert mx.array_equal(mine.values, reference.values).item()


def test_decode_attention_entry_point_sees_each_rows_padding(
    tiny_qwen3_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decode step of a left-padded batch through the kernel's entry point (its MLX reference
    here) gives the logits of MLX's masked attention; ignoring the padding would not."""
    from mlx_lm.models.cache import make_prompt_cache

    model = load(str(tiny_qwen3_dir)).model
    prompts = [list(range(300, 340)), list(range(1000, 1007))]  # row 1: 33 positions of padding
    singles = []
    for prompt in prompts:
        cache = make_prompt_cache(model)
        mx.eval(model(mx.array([prompt]), cache=cache))
        singles.append(cache)

    def step(kernel: bool, padding_scale: int = 1) -> mx.array:
        def stand_in(q: mx.array, k: mx.array, v: mx.array, pad: mx.array, s: float) -> mx.array:
            return reference_decode_attention(q, k, v, pad * padding_scale, s)

        monkeypatch.setattr(decode_attention, "batch_decode_attention", stand_in)
        monkeypatch.setattr(decode_attention, "decode_attention_supported", lambda q, k: True)
        for layer in model.model.layers:
            layer.self_attn.batch_decode_kernel = kernel
        batch = [type(layers[0]).merge(list(layers)) for layers in zip(*singles, strict=True)]
        logits = model(mx.array([[5], [6]]), cache=batch)
        mx.eval(logits)
        return logits

    masked = step(kernel=False)
    assert mx.allclose(step(kernel=True), masked, atol=1e-5).item()
    assert not mx.allclose(step(kernel=True, padding_scale=0), masked, atol=1e-3).item()
