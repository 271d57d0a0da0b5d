"""Attention for a batched decode step on NVIDIA GPUs: one new token a row, rows left-padded.

A running batch keeps every row's keys right-aligned in one buffer, so a row that joined later
starts after some left padding. mlx-lm hands that to attention as a boolean mask, and MLX's CUDA
backend (0.32) has no fused kernel for an array mask: it falls back to a matmul, a masked
softmax and a second matmul, 473 us a layer for 64 rows of 640 positions on an H100 against
182 us for its fused kernel without a mask (bench/NOTES.md, "NVIDIA, night runs"). This kernel
takes each row's padding instead of a mask and starts that row's loop after it, so padded
positions cost nothing; the query heads that share a key/value head (grouped-query attention)
are done together, so each key and value is read once for all of them.

Reference semantics (`reference_decode_attention`): softmax(q k^T * scale) v over positions
[left_padding[b], kL) of row b, float32 accumulation, the query dtype out.
"""

from __future__ import annotations

import math
from functools import cache

import mlx.core as mx
import mlx.nn as nn

from .quantized_linear import cuda_gpu_is_default, kernel_name

__all__ = [
    "batch_decode_attention",
    "decode_attention_supported",
    "enable_batch_decode_attention",
    "reference_decode_attention",
]

_WARPS = 8  # warps per block; each takes every 8th tile of its row's positions
# Positions a warp takes at a time: their keys and values are loaded together and their scores
# reduced together, so a warp waits on memory once per tile, not once per position. On an H200,
# 64 rows of 264 positions: 91.7 us a call one at a time (661 GB/s), 58.3 us four at a time,
# 61.1 eight; 64-stream engine steps 14.2 -> 12.4 ms (bench/NOTES.md, "H200: a decode step on
# the device's own clock").
POSITIONS_PER_WARP = 4

_HEADER = r"""
__device__ __forceinline__ float qla_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float qla_float(__half x) { return __half2float(x); }

// N consecutive half-precision values at p (aligned to their size) as floats, in one load
// where they fill 4, 8 or 16 bytes.
template <typename TT, int N>
__device__ __forceinline__ void qla_load(const TT* p, float* out) {
  if (N * sizeof(TT) == 16) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const TT* e = reinterpret_cast<const TT*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = qla_float(e[i]);
  } else if (N * sizeof(TT) == 8) {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    const TT* e = reinterpret_cast<const TT*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = qla_float(e[i]);
  } else if (N * sizeof(TT) == 4) {
    const uint32_t raw = *reinterpret_cast<const uint32_t*>(p);
    const TT* e = reinterpret_cast<const TT*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = qla_float(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = qla_float(p[i]);
  }
}
"""

# Block (kv_head, row): each lane holds D / 32 of the head dims, warps stride over the row's
# positions P at a time, each warp keeping an online softmax (running max, sum, output) per
# query head of the group; the warps' partial results are merged through shared memory at the
# end.
_SOURCE = r"""
  constexpr int PER = D / 32;
  const int kv_head = blockIdx.x;
  const int b = blockIdx.y;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int kL = k_shape[2];
  const int hq = q_shape[1];
  const int start = left_padding[b];

  float qv[G][PER];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const T* qp = q + b * q_strides[0] + (kv_head * G + g) * q_strides[1] + lane * PER;
    qla_load<T, PER>(qp, qv[g]);
#pragma unroll
    for (int i = 0; i < PER; ++i) qv[g][i] *= SCALE_LOG2;
  }
  float m[G], l[G], o[G][PER];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -1e30f;
    l[g] = 0.0f;
#pragma unroll
    for (int i = 0; i < PER; ++i) o[g][i] = 0.0f;
  }
  const T* kp = k + b * k_strides[0] + kv_head * k_strides[1] + lane * PER;
  const T* vp = v + b * v_strides[0] + kv_head * v_strides[1] + lane * PER;
  for (int base = start + warp * P; base < kL; base += W * P) {
    float kf[P][PER], vf[P][PER];
    bool ok[P];
#pragma unroll
    for (int p = 0; p < P; ++p) {
      ok[p] = base + p < kL;
      const size_t pos = (size_t)(ok[p] ? base + p : base);  // past the end: read, then skipped
      qla_load<T, PER>(kp + pos * k_strides[2], kf[p]);
      qla_load<T, PER>(vp + pos * v_strides[2], vf[p]);
    }
    float s[P][G];
#pragma unroll
    for (int p = 0; p < P; ++p)
#pragma unroll
      for (int g = 0; g < G; ++g) {
        s[p][g] = 0.0f;
#pragma unroll
        for (int i = 0; i < PER; ++i) s[p][g] += qv[g][i] * kf[p][i];
      }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
#pragma unroll
      for (int p = 0; p < P; ++p)
#pragma unroll
        for (int g = 0; g < G; ++g) s[p][g] += __shfl_xor_sync(0xffffffffu, s[p][g], off);
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float nm = m[g];
#pragma unroll
      for (int p = 0; p < P; ++p)
        if (ok[p]) nm = fmaxf(nm, s[p][g]);
      const float f = exp2f(m[g] - nm);
      l[g] *= f;
#pragma unroll
      for (int i = 0; i < PER; ++i) o[g][i] *= f;
#pragma unroll
      for (int p = 0; p < P; ++p) {
        if (!ok[p]) continue;
        const float e = exp2f(s[p][g] - nm);
        l[g] += e;
#pragma unroll
        for (int i = 0; i < PER; ++i) o[g][i] += e * vf[p][i];
      }
      m[g] = nm;
    }
  }

  __shared__ float sm_m[W][G];
  __shared__ float sm_l[W][G];
  __shared__ float sm_o[W][G][D];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (lane == 0) {
      sm_m[warp][g] = m[g];
      sm_l[warp][g] = l[g];
    }
#pragma unroll
    for (int i = 0; i < PER; ++i) sm_o[warp][g][lane * PER + i] = o[g][i];
  }
  __syncthreads();
  for (int t = threadIdx.x; t < G * D; t += W * 32) {
    const int g = t / D;
    const int d = t - g * D;
    float mx_ = -1e30f;
#pragma unroll
    for (int w = 0; w < W; ++w) mx_ = fmaxf(mx_, sm_m[w][g]);
    float total = 0.0f, acc = 0.0f;
#pragma unroll
    for (int w = 0; w < W; ++w) {
      const float f = exp2f(sm_m[w][g] - mx_);
      total += sm_l[w][g] * f;
      acc += sm_o[w][g][d] * f;
    }
    out[((size_t)b * hq + kv_head * G + g) * D + d] = static_cast<T>(total > 0.0f ? acc / total : 0.0f);
  }
"""


def _minify(code: str) -> str:
    lines = [line.strip() for line in code.splitlines()]
    return "\n".join(line for line in lines if line) + "\n"


@cache
def _kernel(head_dim: int, group: int, scale: float, dtype: mx.Dtype, positions: int) -> object:
    bf16 = dtype == mx.bfloat16
    consts = (
        f"using T = {'__nv_bfloat16' if bf16 else '__half'};\n"
        f"constexpr int D = {head_dim};\nconstexpr int G = {group};\n"
        f"constexpr int W = {_WARPS};\nconstexpr int P = {positions};\n"
        f"constexpr float SCALE_LOG2 = {scale * math.log2(math.e)!r}f;\n"
    )
    tag = "bf16" if bf16 else "f16"
    source = consts + _minify(_SOURCE)
    return mx.fast.cuda_kernel(
        # The digest covers the scale.
        name=kernel_name(f"batch_decode_attention_d{head_dim}_g{group}_{tag}", _HEADER, source),
        input_names=["q", "k", "v", "left_padding"],
        output_names=["out"],
        source=source,
        header=_HEADER,
        ensure_row_contiguous=False,
    )


def decode_attention_supported(queries: mx.array, keys: mx.array) -> bool:
    """Shapes and dtypes the kernel handles: one query position, head dims a multiple of 32
    up to 256, whole groups of query heads per key head, half-precision activations."""
    heads, kv_heads, head_dim = queries.shape[1], keys.shape[1], queries.shape[-1]
    return (
        queries.shape[2] == 1
        and head_dim % 32 == 0
        and head_dim <= 256
        and heads % kv_heads == 0
        and heads // kv_heads * head_dim <= 1024  # the warps' partial outputs: 32 KB of smem
        and queries.dtype in (mx.bfloat16, mx.float16)
        and keys.dtype == queries.dtype
    )


def batch_decode_attention(
    queries: mx.array, keys: mx.array, values: mx.array, left_padding: mx.array, scale: float
) -> mx.array:
    """Attention of one query position a row over positions [left_padding[b], kL) of row b.

    ``queries`` (B, Hq, 1, D); ``keys``/``values`` (B, Hkv, kL, D), read in place (a view of the
    cache buffer is fine: strides are passed; the head dim must be contiguous and each head
    start where a whole head could, as in KV caches and RoPE outputs, since a lane reads its
    D / 32 values in one load); ``left_padding`` (B,) int32. Returns (B, Hq, 1, D) in the query dtype.
    Check ``decode_attention_supported`` first.
    """
    rows, heads, _, head_dim = queries.shape
    kv_heads = keys.shape[1]
    if left_padding.dtype != mx.int32:
        left_padding = left_padding.astype(mx.int32)
    kernel = _kernel(head_dim, heads // kv_heads, float(scale), queries.dtype, POSITIONS_PER_WARP)
    return kernel(  # type: ignore[operator, no-any-return]
        inputs=[queries, keys, values, left_padding],
        grid=(kv_heads * 32 * _WARPS, rows, 1),
        threadgroup=(32 * _WARPS, 1, 1),
        output_shapes=[(rows, heads, 1, head_dim)],
        output_dtypes=[queries.dtype],
    )[0]


def reference_decode_attention(
    queries: mx.array, keys: mx.array, values: mx.array, left_padding: mx.array, scale: float
) -> mx.array:
    """What ``batch_decode_attention`` computes, with MLX's own attention and a boolean mask."""
    positions = mx.arange(keys.shape[2])
    mask = positions[None, None, None, :] >= left_padding[:, None, None, None]
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)


def enable_batch_decode_attention(model: nn.Module, force: bool = False) -> int:
    """Turns the kernel on in every attention module that offers it (`batch_decode_kernel`);
    only on a CUDA GPU unless ``force``. Returns how many modules use it."""
    if not force and not cuda_gpu_is_default():
        return 0
    count = 0
    for _, module in model.named_modules():
        if hasattr(module, "batch_decode_kernel"):
            module.batch_decode_kernel = True
            count += 1
    return count
