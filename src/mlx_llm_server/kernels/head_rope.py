"""A decode step's queries, keys and values from the fused q/k/v projection, in one kernel.

In a compiled decode block (kernels/compiled_decode.py), what lies between the q/k/v matmul and
the KV-cache update is otherwise eleven graph nodes a layer: a reshape, three slices, the
per-head RMSNorm of queries and of keys (Qwen3), three transposes and two RoPEs. A one-row step
on a fast GPU is bound by the host's work per graph node (bench/NOTES.md, "H200: compiled
decode blocks"), so this kernel does all of it as one node: each warp takes one head of one
row, normalises it (queries and keys, when the model has q/k norms), rotates it by its row's
position (plain RoPE over the two halves of each head, as Hugging Face does) and writes it to
its own output; the values are copied. With one position a row, (B, heads, 1, D) has the layout
of (B, 1, heads, D), so no transpose is needed.

Reference semantics: `reference_head_rope`, the model's own operations. The kernel rounds where
they do (the norm's output before RoPE), so they differ only by float32 summation order.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .quantized_linear import cuda_gpu_is_default, kernel_name

__all__ = ["HeadRope", "head_rope_for", "norm_and_rope", "reference_head_rope", "split_heads"]

_WARPS = 4  # heads a block

_SOURCE = r"""
  constexpr int HALF = D / 2;
  constexpr int PER = HALF / 32;
  constexpr int TOTAL = HQ + 2 * HKV;
  const int lane = threadIdx.x & 31;
  const int head = blockIdx.x * W + (threadIdx.x >> 5);
  const int b = blockIdx.y;
  if (head >= TOTAL) return;
  const T* src = qkv + ((size_t)b * TOTAL + head) * D + lane * PER;
  if (head >= HQ + HKV) {  // a value head: copied as it is
    T* dst = v_out + ((size_t)b * HKV + (head - HQ - HKV)) * D + lane * PER;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      dst[i] = src[i];
      dst[HALF + i] = src[HALF + i];
    }
    return;
  }
  const bool is_query = head < HQ;
  float x1[PER], x2[PER];
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    x1[i] = static_cast<float>(src[i]);
    x2[i] = static_cast<float>(src[HALF + i]);
  }
  if (QK_NORM) {
    float ss = 0.0f;
#pragma unroll
    for (int i = 0; i < PER; ++i) ss += x1[i] * x1[i] + x2[i] * x2[i];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
    const float inv = rsqrt(ss / D + EPS);
    const T* w = (is_query ? q_weight : k_weight) + lane * PER;
#pragma unroll
    for (int i = 0; i < PER; ++i) {  // as MLX's RMSNorm: w * T(x * inv), rounded to T
      x1[i] = static_cast<float>(w[i] * static_cast<T>(x1[i] * inv));
      x2[i] = static_cast<float>(w[HALF + i] * static_cast<T>(x2[i] * inv));
    }
  }
  const float position = SCALE * static_cast<float>(offset[PER_ROW ? b : 0]);
  T* dst = is_query ? q_out + ((size_t)b * HQ + head) * D + lane * PER
                    : k_out + ((size_t)b * HKV + (head - HQ)) * D + lane * PER;
#pragma unroll
  for (int i = 0; i < PER; ++i) {  // as MLX's RoPE (non-traditional)
    const float d = static_cast<float>(lane * PER + i) / static_cast<float>(HALF);
    const float theta = position * exp2(-d * LOG2_BASE);
    const float c = cos(theta);
    const float s = sin(theta);
    dst[i] = static_cast<T>(x1[i] * c - x2[i] * s);
    dst[HALF + i] = static_cast<T>(x1[i] * s + x2[i] * c);
  }
"""


@cache
def _kernel(
    heads: int,
    kv_heads: int,
    head_dim: int,
    qk_norm: bool,
    eps: float,
    base: float,
    scale: float,
    per_row: bool,
    dtype: mx.Dtype,
) -> Any:
    bf16 = dtype == mx.bfloat16
    consts = (
        f"using T = {'__nv_bfloat16' if bf16 else '__half'};\n"
        f"constexpr int HQ = {heads};\nconstexpr int HKV = {kv_heads};\n"
        f"constexpr int D = {head_dim};\nconstexpr int W = {_WARPS};\n"
        f"constexpr bool QK_NORM = {'true' if qk_norm else 'false'};\n"
        f"constexpr bool PER_ROW = {'true' if per_row else 'false'};\n"
        f"constexpr float EPS = {eps!r}f;\nconstexpr float SCALE = {scale!r}f;\n"
        f"constexpr float LOG2_BASE = {math.log2(base)!r}f;\n"
    )
    key = f"{heads}_{kv_heads}_{head_dim}_{int(qk_norm)}_{int(per_row)}_{'bf16' if bf16 else 'f16'}"
    inputs = ["qkv", "offset"] + (["q_weight", "k_weight"] if qk_norm else [])
    source = consts + _SOURCE
    return mx.fast.cuda_kernel(
        name=kernel_name(f"head_rope_{key}", source),  # the digest covers eps, base and scale
        input_names=inputs,
        output_names=["q_out", "k_out", "v_out"],
        source=source,
    )


class HeadRope:
    """Splits a fused q/k/v projection's output (B, 1, (Hq + 2 Hkv) D) of one decode position
    into queries (B, Hq, 1, D), keys and values (B, Hkv, 1, D), with the attention module's
    q/k norms and RoPE applied; `offset` is the position, a scalar or one a row (int32)."""

    def __init__(self, attention: nn.Module, head_dim: int) -> None:
        self.attention = attention
        self.heads, self.kv_heads, self.head_dim = attention.n_heads, attention.n_kv_heads, head_dim
        rope = attention.rope
        self.base, self.scale = float(rope.base), float(rope.scale)
        self.qk_norm = hasattr(attention, "q_norm") and hasattr(attention, "k_norm")
        self.weights = [attention.q_norm.weight, attention.k_norm.weight] if self.qk_norm else []
        eps = float(attention.q_norm.eps) if self.qk_norm else 0.0
        if self.qk_norm and float(attention.k_norm.eps) != eps:
            raise ValueError("q_norm and k_norm differ in eps")
        self.eps = eps

    def supports(self, qkv: mx.array) -> bool:
        """One position a row, half-precision activations, norm weights of the same type."""
        return (
            qkv.ndim == 3
            and qkv.shape[1] == 1
            and qkv.dtype in (mx.bfloat16, mx.float16)
            and all(weight.dtype == qkv.dtype for weight in self.weights)
        )

    def __call__(self, qkv: mx.array, offset: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        rows = qkv.shape[0]
        if offset.dtype != mx.int32:
            offset = offset.astype(mx.int32)
        kernel = _kernel(
            self.heads,
            self.kv_heads,
            self.head_dim,
            self.qk_norm,
            self.eps,
            self.base,
            self.scale,
            offset.ndim > 0 and offset.size > 1,
            qkv.dtype,
        )
        total = self.heads + 2 * self.kv_heads
        queries, keys, values = kernel(
            inputs=[qkv, offset, *self.weights],
            grid=(32 * _WARPS * -(-total // _WARPS), rows, 1),
            threadgroup=(32 * _WARPS, 1, 1),
            output_shapes=[
                (rows, self.heads, 1, self.head_dim),
                (rows, self.kv_heads, 1, self.head_dim),
                (rows, self.kv_heads, 1, self.head_dim),
            ],
            output_dtypes=[qkv.dtype] * 3,
        )
        return queries, keys, values

    def reference(self, qkv: mx.array, offset: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """The same with the attention module's own operations (`reference_head_rope`)."""
        return reference_head_rope(self.attention, qkv, offset)


def head_rope_for(attention: nn.Module) -> HeadRope | None:
    """The kernel for `attention` on an NVIDIA GPU, if it has a fused q/k/v projection and plain
    RoPE over whole heads (None otherwise: the block keeps its own operations)."""
    if not cuda_gpu_is_default() or "qkv_proj" not in attention:
        return None
    rope = getattr(attention, "rope", None)
    heads = attention.n_heads + 2 * attention.n_kv_heads
    head_dim = attention.qkv_proj.weight.shape[0] // heads
    weight = getattr(getattr(attention, "q_norm", None), "weight", None)
    if (
        type(rope) is not nn.RoPE
        or rope.traditional
        or rope.dims != head_dim
        or head_dim % 64 != 0
        or (weight is not None and weight.shape != (head_dim,))
    ):
        return None
    return HeadRope(attention, head_dim)


def split_heads(attention: nn.Module, qkv: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """A fused q/k/v output (B, L, (Hq + 2 Hkv) D) as queries, keys and values (B, L, H, D)."""
    batch, length, _ = qkv.shape
    q_heads, kv_heads = attention.n_heads, attention.n_kv_heads
    heads = qkv.reshape(batch, length, q_heads + 2 * kv_heads, -1)
    return (
        heads[:, :, :q_heads],
        heads[:, :, q_heads : q_heads + kv_heads],
        heads[:, :, q_heads + kv_heads :],
    )


def norm_and_rope(
    attention: nn.Module, queries: mx.array, keys: mx.array, values: mx.array, offset: mx.array
) -> tuple[mx.array, mx.array, mx.array]:
    """The attention module's own q/k norms (if any) and RoPE on (B, L, H, D) heads; returns
    them in attention's (B, H, L, D) order."""
    if hasattr(attention, "q_norm") and hasattr(attention, "k_norm"):
        queries, keys = attention.q_norm(queries), attention.k_norm(keys)
    queries = attention.rope(queries.transpose(0, 2, 1, 3), offset=offset)
    keys = attention.rope(keys.transpose(0, 2, 1, 3), offset=offset)
    return queries, keys, values.transpose(0, 2, 1, 3)


def reference_head_rope(
    attention: nn.Module, qkv: mx.array, offset: mx.array
) -> tuple[mx.array, mx.array, mx.array]:
    """What `HeadRope` computes, with the attention module's own operations."""
    return norm_and_rope(attention, *split_heads(attention, qkv), offset)
