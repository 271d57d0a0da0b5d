"""q/k/v and gate/up fused into one matmul each: the same numbers as the separate layers."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.cache import make_prompt_cache

from mlx_llm_server.kernels.compiled_decode import compile_decode_blocks
from mlx_llm_server.kernels.fused_projections import concatenate_linears, fuse_projections
from mlx_llm_server.kernels.quantized_linear import (
    AcceleratedQuantizedLinear,
    accelerate_quantized_layers,
)
from mlx_llm_server.models.loader import load


def _logits(model: nn.Module) -> tuple[mx.array, mx.array]:
    """A prompt's logits, then one decode step's on its cache."""
    cache = make_prompt_cache(model)
    prompt = model(mx.array([[11, 200, 3001, 7, 99, 150000]]), cache=cache)
    step = model(mx.array([[42]]), cache=cache)
    return prompt, step


def _model(model_dir: Path, quantized: bool) -> nn.Module:
    model = load(str(model_dir)).model
    if quantized:
        model.set_dtype(mx.bfloat16)
        nn.quantize(model, group_size=32, bits=4)
        mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("quantized", [False, True])
def test_fused_qwen3_computes_what_the_separate_layers_do(
    tiny_qwen3_dir: Path, quantized: bool
) -> None:
    model = _model(tiny_qwen3_dir, quantized)
    before = _logits(model)
    layers = len(model.model.layers)

    assert fuse_projections(model, force=True) == 2 * layers
    block = model.model.layers[0]
    assert "qkv_proj" in block.self_attn and "q_proj" not in block.self_attn
    assert "gate_up_proj" in block.mlp and "up_proj" not in block.mlp
    if quantized:
        assert type(block.self_attn.qkv_proj) is nn.QuantizedLinear
    # Bit for bit on this machine: every output feature is the same dot product as before.
    for a, b in zip(before, _logits(model), strict=True):
        assert mx.array_equal(a, b).item()
    # Already fused: nothing more to do. The compiled blocks trace the fused layers (their
    # exactness: tests/test_compiled_decode.py).
    assert fuse_projections(model, force=True) == 0
    assert compile_decode_blocks(model) == layers


def test_fused_layers_take_the_accelerated_path(tiny_qwen3_dir: Path) -> None:
    model = _model(tiny_qwen3_dir, quantized=True)
    before = _logits(model)
    accelerate_quantized_layers(model, force=True)
    # Accelerated layers fuse too (the result is a plain layer), and are swapped again.
    assert fuse_projections(model, force=True) > 0
    assert accelerate_quantized_layers(model, force=True) == 2 * len(model.model.layers)
    assert isinstance(model.model.layers[1].mlp.gate_up_proj, AcceleratedQuantizedLinear)
    for a, b in zip(before, _logits(model), strict=True):
        assert mx.array_equal(a, b).item()


def test_nothing_is_fused_off_a_cuda_gpu_unless_forced(tiny_qwen3_dir: Path) -> None:
    model = _model(tiny_qwen3_dir, quantized=False)
    assert fuse_projections(model) == 0
    assert "q_proj" in model.model.layers[0].self_attn


def test_only_layers_that_compute_alike_are_concatenated() -> None:
    mx.random.seed(3)
    plain = [nn.Linear(64, 32, bias=False), nn.Linear(64, 16, bias=False)]
    fused = concatenate_linears(plain)
    assert fused is not None and fused.weight.shape == (48, 64)
    x = mx.random.normal((3, 64))
    expected = mx.concatenate([layer(x) for layer in plain], axis=-1)
    assert mx.allclose(fused(x), expected).item()

    assert concatenate_linears([nn.Linear(64, 32), nn.Linear(64, 32)]) is None  # biases
    assert (
        concatenate_linears([nn.Linear(64, 32, bias=False), nn.Linear(32, 32, bias=False)]) is None
    )
    q32 = nn.QuantizedLinear(64, 32, bias=False, group_size=32, bits=4)
    q64 = nn.QuantizedLinear(64, 32, bias=False, group_size=64, bits=4)
    assert concatenate_linears([q32, q64]) is None  # quantized differently
    assert concatenate_linears([q32, plain[0]]) is None
    assert concatenate_linears([]) is None
