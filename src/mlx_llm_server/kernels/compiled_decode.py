"""Decode steps of Llama-family transformer blocks as two compiled functions each.

A decode step is host-bound on a fast GPU: building the graph op by op in Python (about 30
operations a block, each through `nn.Module` attribute lookups) and encoding one kernel each
takes longer than the GPU needs to run them (see bench/NOTES.md, "Serving on NVIDIA"). Here
everything in a block but the KV-cache update and the attention itself is traced once per batch
size with `mx.compile`: the norms, projections, rope, residuals and the MLP replay as one graph,
and compilation fuses their elementwise work into fewer kernels.

The swap is in place and exact: the same modules and weights run the same operations (bit for
bit on the CPU; `tests/test_compiled_decode.py`), only when one token a row is fed and the cache
is a plain or batched KV cache; prompts (many tokens a row) and every other cache type take the
block's own path. It applies to the blocks of the architectures listed in `_BLOCK_MODULES`,
whose blocks compute `h = x + attn(norm(x)); h + mlp(norm(h))` with q/k/v/o projections,
optional q/k RMSNorm, rope and a gated MLP.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache, KVCache

from .head_rope import head_rope_for, norm_and_rope, reference_head_rope
from .quantized_linear import norm_linear, residual_linear, swiglu_linear

__all__ = ["CompiledDecodeBlock", "compile_decode_blocks", "set_submit_every"]

_BLOCK_MODULES = frozenset(
    {
        "mlx_lm.models.llama",
        "mlx_lm.models.qwen2",
        "mlx_lm.models.qwen3",
        "mlx_llm_server.custom_models.qwen3",
    }
)
_CACHES = (KVCache, BatchKVCache)


class CompiledDecodeBlock(nn.Module):
    """Wraps one transformer block; its decode steps run through two compiled functions."""

    def __init__(
        self,
        block: nn.Module,
        max_rows: int | None = None,
        head_rope: bool = True,
        index: int = 0,
    ) -> None:
        super().__init__()
        self.block = block
        self.max_rows = max_rows  # larger decode batches take the block's own path
        self.index = index  # the block's place in the model, for `set_submit_every`
        attention, mlp = block.self_attn, block.mlp
        # On NVIDIA GPUs: q/k norms and RoPE as one kernel node (kernels/head_rope.py).
        fused_heads = head_rope_for(attention) if head_rope else None
        self.uses_head_rope = fused_heads is not None

        def before_attention(x: mx.array, offset: mx.array) -> tuple[mx.array, ...]:
            batch, length, _ = x.shape
            norm = block.input_layernorm
            if "qkv_proj" in attention:  # fused q/k/v (kernels/fused_projections.py)
                # With folded norms on (`--folded-norm-rows`), the 4-bit kernel applies it.
                qkv = norm_linear(attention.qkv_proj, x, norm)
                if fused_heads is not None and fused_heads.supports(qkv):
                    return fused_heads(qkv, offset)
                return reference_head_rope(attention, qkv, offset)
            normed = norm(x)
            queries = attention.q_proj(normed).reshape(batch, length, attention.n_heads, -1)
            keys = attention.k_proj(normed).reshape(batch, length, attention.n_kv_heads, -1)
            values = attention.v_proj(normed).reshape(batch, length, attention.n_kv_heads, -1)
            return norm_and_rope(attention, queries, keys, values, offset)

        def after_attention(x: mx.array, attended: mx.array) -> mx.array:
            batch, _, length, _ = attended.shape
            # (B, heads, 1, D) holds (B, 1, heads x D) row for row: o_proj takes it as it is.
            if length != 1:
                attended = attended.transpose(0, 2, 1, 3).reshape(batch, length, -1)
            # On NVIDIA GPUs the fused 4-bit kernel adds the residuals and computes the SwiGLU
            # (with folded norms on, the norm before it too; kernels/quantized_linear.py).
            h = residual_linear(attention.o_proj, attended, x)
            norm = block.post_attention_layernorm
            if "gate_up_proj" in mlp and "down_proj" in mlp:
                return residual_linear(mlp.down_proj, swiglu_linear(mlp.gate_up_proj, h, norm), h)
            return h + mlp(norm(h))

        self._before: Callable[..., Any] = mx.compile(before_attention)
        self._after: Callable[..., Any] = mx.compile(after_attention)

    def __getattr__(self, name: str) -> Any:
        # The model may read its blocks' own settings (e.g. llama's `use_sliding`).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "block":
                raise
            return getattr(self.block, name)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        if (
            x.shape[1] != 1
            or type(cache) not in _CACHES
            or (self.max_rows is not None and x.shape[0] > self.max_rows)
        ):
            return self.block(x, mask, cache)
        queries, keys, values = self._before(x, _offset_array(cache.offset))
        keys, values = cache.update_and_fetch(keys, values)
        attention = self.block.self_attn
        attend = getattr(attention, "attend", None)
        if attend is not None:  # the model's own choice of attention kernel
            attended = attend(queries, keys, values, mask, cache)
        else:
            attended = mx.fast.scaled_dot_product_attention(
                queries, keys, values, scale=attention.scale, mask=mask
            )
        out = self._after(x, attended)
        if _submit_every and (self.index + 1) % _submit_every == 0 and x.shape[0] <= _submit_rows:
            _submit(out)
        return out


# Hand the device the step's first blocks while Python still builds the rest (0: off). Without
# it MLX sees the step only at the engine's `mx.async_eval` of the sampled tokens; that call
# returns with at most ~10 command buffers queued (MLX's back-pressure), under a millisecond
# of one-row work, so the device idles while the host builds the next step (bench/NOTES.md,
# "H200: a decode step on the device's own clock").
_submit_every = 0
_submit_rows = 0
_submit: Callable[[mx.array], None] = mx.async_eval


def set_submit_every(
    blocks: int, max_rows: int = 64, submit: Callable[[mx.array], None] | None = None
) -> None:
    """Decode steps of up to ``max_rows`` rows start evaluating after every ``blocks`` blocks
    (0: only when the whole step is asked for), through ``submit`` (default `mx.async_eval`;
    the engine passes its own, which retries once when the device is out of memory)."""
    global _submit_every, _submit_rows, _submit
    _submit_every, _submit_rows = max(blocks, 0), max_rows
    _submit = submit or mx.async_eval


_last_offset: tuple[int, mx.array] | None = None


def _offset_array(offset: int | mx.array) -> mx.array:
    """A plain cache's position as an array input, so one trace serves every step; the blocks of
    a step share one (each new array is a host-to-device copy)."""
    global _last_offset
    if not isinstance(offset, int):
        return offset
    if _last_offset is None or _last_offset[0] != offset:
        _last_offset = (offset, mx.array(offset, dtype=mx.int32))
    return _last_offset[1]


def _eligible(block: nn.Module) -> bool:
    if type(block).__module__ not in _BLOCK_MODULES:
        return False
    attention = getattr(block, "self_attn", None)
    mlp = getattr(block, "mlp", None)
    needed = ("o_proj", "rope", "n_heads", "n_kv_heads", "scale")
    projections = ("q_proj", "k_proj", "v_proj")
    return (
        attention is not None
        and mlp is not None
        and all(hasattr(attention, name) for name in needed)
        and ("qkv_proj" in attention or all(hasattr(attention, name) for name in projections))
        and hasattr(block, "input_layernorm")
        and hasattr(block, "post_attention_layernorm")
    )


def compile_decode_blocks(
    model: nn.Module, max_rows: int | None = None, head_rope: bool = True
) -> int:
    """Wraps every eligible transformer block of `model` in place; returns how many.

    Decode steps of up to `max_rows` rows (every step when None) run compiled; `head_rope`
    lets blocks use the fused q/k-norm and RoPE kernel where it applies.
    """
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, list):
        return 0
    wrapped = 0
    for index, block in enumerate(layers):
        if isinstance(block, CompiledDecodeBlock) or not _eligible(block):
            continue
        layers[index] = CompiledDecodeBlock(block, max_rows, head_rope, index)
        wrapped += 1
    return wrapped
