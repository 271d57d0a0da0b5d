"""Compiled decode blocks compute what the model's own blocks compute, bit for bit on the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.cache import make_prompt_cache
from model_factory import build_tiny_qwen3

from mlx_llm_server.engine.batch import merge_caches
from mlx_llm_server.kernels import compiled_decode
from mlx_llm_server.kernels.compiled_decode import (
    CompiledDecodeBlock,
    compile_decode_blocks,
    set_submit_every,
)
from mlx_llm_server.kernels.fused_projections import fuse_projections
from mlx_llm_server.models.loader import load

PROMPTS = [list(range(100, 131)), list(range(2000, 2007)), list(range(7000, 7019))]


@pytest.fixture(scope="module")
def models(tiny_qwen3_dir: Path) -> tuple[object, object]:
    stock = load(str(tiny_qwen3_dir)).model
    fast = load(str(tiny_qwen3_dir)).model
    assert compile_decode_blocks(fast) == len(fast.model.layers)
    assert all(isinstance(block, CompiledDecodeBlock) for block in fast.model.layers)
    assert compile_decode_blocks(fast) == 0  # already wrapped
    # What the model reads of its blocks still reads through (e.g. llama's `use_sliding`).
    block = fast.model.layers[0]
    assert block.input_layernorm is block.block.input_layernorm
    assert block.self_attn.n_heads == stock.model.layers[0].self_attn.n_heads
    return stock, fast


def build_kernel_sized_qwen3(destination: Path) -> Path:
    """A tiny Qwen3 in the fused 4-bit kernel's sizes: every K (hidden, heads x head_dim,
    intermediate) a multiple of 256."""
    return build_tiny_qwen3(
        destination,
        hidden_size=256,
        head_dim=64,
        intermediate_size=512,
        vocab_size=8192,
        eos_token_id=2,
    )


def load_4bit(folder: Path) -> Any:
    """The model in ``folder``, bf16, quantized to 4 bits as the published checkpoints are."""
    model = load(str(folder)).model
    model.set_dtype(mx.bfloat16)
    nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    return model


def decode_alone(model: object, prompt: list[int], steps: int) -> list[mx.array]:
    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt]), cache=cache)  # type: ignore[operator]
    outputs = []
    for _ in range(steps):
        token = mx.argmax(logits[:, -1, :], axis=-1, keepdims=True)
        logits = model(token, cache=cache)  # type: ignore[operator]
        outputs.append(logits)
    mx.eval(outputs)
    return outputs


def decode_batched(model: object, prompts: list[list[int]], steps: int) -> list[mx.array]:
    """Prompts prefilled one by one, then decoded together in a left-padded batch cache."""
    caches, firsts = [], []
    for prompt in prompts:
        cache = make_prompt_cache(model)
        logits = model(mx.array([prompt]), cache=cache)  # type: ignore[operator]
        caches.append(cache)
        firsts.append(mx.argmax(logits[:, -1, :], axis=-1))
    cache = merge_caches(caches)
    token = mx.concatenate(firsts)[:, None]
    outputs = []
    for _ in range(steps):
        logits = model(token, cache=cache)  # type: ignore[operator]
        outputs.append(logits)
        token = mx.argmax(logits[:, -1, :], axis=-1, keepdims=True)
    mx.eval(outputs)
    return outputs


def assert_decodes_like(
    ours: object, stock: object, prompt: list[int], alone_steps: int, batched_steps: int
) -> None:
    """Bit for bit: `prompt` decoded alone, then all PROMPTS in a padded batch."""
    for mine, theirs in zip(
        decode_alone(ours, prompt, alone_steps),
        decode_alone(stock, prompt, alone_steps),
        strict=True,
    ):
        assert mx.array_equal(mine, theirs)
    for mine, theirs in zip(
        decode_batched(ours, PROMPTS, batched_steps),
        decode_batched(stock, PROMPTS, batched_steps),
        strict=True,
    ):
        assert mx.array_equal(mine, theirs)


def test_one_sequence_decodes_bit_for_bit(models: tuple[object, object]) -> None:
    stock, fast = models
    for ours, theirs in zip(
        decode_alone(fast, PROMPTS[0], 12), decode_alone(stock, PROMPTS[0], 12), strict=True
    ):
        assert mx.array_equal(ours, theirs)


def test_a_padded_batch_decodes_bit_for_bit(models: tuple[object, object]) -> None:
    stock, fast = models
    for ours, theirs in zip(
        decode_batched(fast, PROMPTS, 10), decode_batched(stock, PROMPTS, 10), strict=True
    ):
        assert mx.array_equal(ours, theirs)
    # Another batch size: traced again, still exact.
    for ours, theirs in zip(
        decode_batched(fast, PROMPTS[:2], 4), decode_batched(stock, PROMPTS[:2], 4), strict=True
    ):
        assert mx.array_equal(ours, theirs)


def test_blocks_handed_to_the_device_in_groups_decode_bit_for_bit(
    models: tuple[object, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `set_submit_every`, a step's blocks start evaluating in groups as they are built;
    the result stays exact, and steps above the row limit (and prompts) are left whole."""
    stock, fast = models
    submitted: list[tuple[int, ...]] = []

    def submit(out: mx.array) -> None:
        submitted.append(tuple(out.shape))
        mx.async_eval(out)

    monkeypatch.setattr(compiled_decode, "_submit_every", 0)  # restored after the test
    layers = len(fast.model.layers)  # type: ignore[attr-defined]
    assert layers >= 2
    set_submit_every(1, max_rows=2, submit=submit)
    assert_decodes_like(fast, stock, PROMPTS[2], alone_steps=5, batched_steps=4)
    # One row: every block of the 5 steps ...
    assert submitted.count((1, 1, submitted[0][-1])) == 5 * layers
    # ... and the three-row batch: never (above max_rows); prompts: never (many tokens a row).
    assert all(shape[0] == 1 and shape[1] == 1 for shape in submitted)
    submitted.clear()
    set_submit_every(layers, max_rows=64, submit=submit)
    decode_batched(fast, PROMPTS, 3)
    assert len(submitted) == 3  # one group a step: the last block's output
    set_submit_every(0)
    decode_batched(fast, PROMPTS, 2)
    assert len(submitted) == 3


def test_blocks_with_fused_projections_decode_bit_for_bit(
    models: tuple[object, object], tiny_qwen3_dir: Path
) -> None:
    """As the server runs them on an NVIDIA GPU: q/k/v and gate/up fused, then compiled."""
    stock, _ = models
    fused = load(str(tiny_qwen3_dir)).model
    assert fuse_projections(fused, force=True) > 0
    assert compile_decode_blocks(fused) == len(fused.model.layers)
    assert "qkv_proj" in fused.model.layers[0].self_attn
    assert_decodes_like(fused, stock, PROMPTS[1], alone_steps=8, batched_steps=6)


def test_fused_heads_go_through_the_head_kernel_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on an NVIDIA GPU: compiled blocks of a model with fused q/k/v hand the projection's
    output to the q/k-norm + RoPE kernel (kernels/head_rope.py). Its MLX reference stands in for
    the CUDA kernel here, which bench/gpu_step_anatomy.py part 9 checks on the device; decoding
    stays exact, alone and in a padded batch (one position a row each)."""
    import mlx_llm_server.kernels.head_rope as head_rope

    calls: list[tuple[int, ...]] = []

    def stand_in(self: head_rope.HeadRope, qkv: mx.array, offset: mx.array) -> object:
        calls.append((qkv.shape[0], offset.size))
        return self.reference(qkv, offset)

    monkeypatch.setattr(head_rope, "cuda_gpu_is_default", lambda: True)
    monkeypatch.setattr(head_rope.HeadRope, "__call__", stand_in)
    # The tiny model is float32; the kernel takes half precision.
    monkeypatch.setattr(head_rope.HeadRope, "supports", lambda self, qkv: qkv.shape[1] == 1)
    folder = build_tiny_qwen3(tmp_path / "wide-heads", head_dim=64)  # the kernel's head sizes
    stock = load(str(folder)).model
    fused = load(str(folder)).model
    assert fuse_projections(fused, force=True) > 0
    assert compile_decode_blocks(fused) == len(fused.model.layers)
    assert all(block.uses_head_rope for block in fused.model.layers)
    assert_decodes_like(fused, stock, PROMPTS[0], alone_steps=6, batched_steps=6)
    layers = len(fused.model.layers)
    # Traced once a layer alone (one position) and once in the batch (a position a row).
    assert calls.count((1, 1)) == layers and calls.count((3, 3)) == layers
    # Off, the blocks keep their own operations.
    plain = load(str(folder)).model
    fuse_projections(plain, force=True)
    compile_decode_blocks(plain, head_rope=False)
    assert not any(block.uses_head_rope for block in plain.model.layers)


def test_head_kernel_is_left_out_without_a_cuda_gpu(models: tuple[object, object]) -> None:
    _, fast = models
    assert not any(block.uses_head_rope for block in fast.model.layers)  # type: ignore[attr-defined]


def test_blocks_of_other_architectures_are_left_alone(tmp_path: Path) -> None:
    class Block(nn.Module):  # not one of the listed architectures, whatever its attributes
        def __call__(self, x: mx.array, mask: object = None, cache: object = None) -> mx.array:
            return x

    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = [Block(), Block()]

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Inner()

    model = Model()
    assert compile_decode_blocks(model) == 0
    assert all(type(block) is Block for block in model.model.layers)


def test_fused_epilogues_decode_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on an NVIDIA GPU: a 4-bit model's gate/up rows are interleaved at load, and compiled
    blocks hand o_proj and down_proj their residual and gate_up_proj its SwiGLU, for the fused
    kernel to do as it stores (and, turned on here, the norms before q/k/v and gate/up). The kernel's MLX reference (`apply_epilogue` on the stock matmul)
    stands in for the CUDA kernel, which bench/gpu_step_anatomy.py part 10 checks on the device;
    decoding stays exact against the plain quantized model, alone and in a padded batch."""
    import mlx_llm_server.kernels.quantized_linear as ql

    calls: list[tuple[str, tuple[int, ...]]] = []

    def stand_in(x, *args, epilogue="none", residual=None, norm=None):  # type: ignore[no-untyped-def]
        calls.append((epilogue + ("+norm" if norm is not None else ""), x.shape[:-1]))
        return ql.reference_fused_matmul(x, *args, epilogue=epilogue, residual=residual, norm=norm)

    monkeypatch.setattr(ql, "_cuda_build", lambda: True)
    monkeypatch.setattr(ql, "_on_gpu", lambda: True)
    monkeypatch.setattr(ql, "fused_quantized_matmul", stand_in)
    monkeypatch.setattr(ql, "_folded_norm_rows", 8)  # off by default; on here to check it
    folder = build_kernel_sized_qwen3(tmp_path / "kernel-sized")
    stock, fast = load_4bit(folder), load_4bit(folder)
    assert fuse_projections(fast, force=True) > 0
    gate_up = fast.model.layers[0].mlp.gate_up_proj
    assert gate_up.gate_up_interleaved and gate_up.weight.shape[0] == 2 * 512
    ql.accelerate_quantized_layers(fast, force=True)
    assert fast.model.layers[0].mlp.gate_up_proj.gate_up_interleaved  # kept by the swap
    assert compile_decode_blocks(fast) == len(fast.model.layers)
    # Prompts take the block's own path: the SwiGLU after the matmul, from interleaved rows.
    assert_decodes_like(fast, stock, PROMPTS[1], alone_steps=6, batched_steps=6)
    layers = len(fast.model.layers)
    # Traced once a layer alone and once in the batch of three. One row of these small layers
    # takes the stock op but for the SwiGLU (the norm before it folded in); three rows: the
    # q/k/v matmul with its norm, o_proj reading attention's (B, heads, 1, D) output as it is
    # and adding the residual, the norm + SwiGLU, and down_proj adding its residual.
    assert calls.count(("swiglu+norm", (1, 1))) == layers
    assert not [call for call in calls if call[0] != "swiglu+norm" and call[1][:2] == (1, 1)]
    for call in ("none+norm", (3, 1)), ("residual", (3, 4, 1)), ("swiglu+norm", (3, 1)):
        assert calls.count(call) == layers
    assert calls.count(("residual", (3, 1))) == layers
    assert ("swiglu", (1, len(PROMPTS[1]))) in calls  # a prompt, through the model's own MLP

    # Off: gate/up stay concatenated and every add is its own operation.
    ql.set_fused_epilogues(False)
    try:
        calls.clear()
        plain = load_4bit(folder)
        fuse_projections(plain, force=True)
        assert not getattr(plain.model.layers[0].mlp.gate_up_proj, "gate_up_interleaved", False)
        ql.accelerate_quantized_layers(plain, force=True)
        compile_decode_blocks(plain)
        assert_decodes_like(plain, stock, PROMPTS[1], alone_steps=2, batched_steps=2)
        assert calls and all(kind == "none" for kind, _ in calls)  # nothing folded in either
    finally:
        ql.set_fused_epilogues(True)


def test_dense_weights_decode_like_dequantize_and_matmul(
    tmp_path: Path, fused_kernel_rows: list[int]
) -> None:
    """As on an NVIDIA GPU with `--dense-weights`: prompts and batched decode steps of at least
    the given rows multiply with the dense copies, through compiled blocks and the model's own;
    bit for bit what dequantize + matmul gives on the same 4-bit weights. One row keeps the
    4-bit kernel."""
    import mlx_llm_server.kernels.quantized_linear as ql

    folder = build_kernel_sized_qwen3(tmp_path / "kernel-sized")

    def served() -> Any:
        model = load_4bit(folder)
        fuse_projections(model, force=True)
        ql.accelerate_quantized_layers(model, force=True)
        compile_decode_blocks(model)
        return model

    dense, reference = served(), served()
    assert ql.keep_dense_weights(dense, 3) == ql.dense_weight_bytes(dense) > 0
    for _, module in reference.named_modules():
        if isinstance(module, ql.AcceleratedQuantizedLinear | ql.AcceleratedQuantizedEmbedding):
            module.force_path = "dequant"
    for mine, theirs in zip(
        decode_batched(dense, PROMPTS, 5), decode_batched(reference, PROMPTS, 5), strict=True
    ):
        assert mx.array_equal(mine, theirs)
    assert not fused_kernel_rows  # prompts and 3-row steps: all on the dense copies
    decode_alone(dense, PROMPTS[1], 2)
    assert fused_kernel_rows and set(fused_kernel_rows) == {1}  # one row: the 4-bit kernel
