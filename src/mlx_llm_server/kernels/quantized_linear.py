"""Faster 4-bit affine quantized matmul on NVIDIA GPUs.

MLX's CUDA backend (0.32) makes batched decode with quantized models barely faster than one
stream: given (B, 1, K) activations, ``mx.quantized_matmul`` runs one GEMV per batch entry, and
on a 2-D input it still runs one GEMV per row below 8 rows. This module adds a tensor-core
kernel, compiled at first use through ``mx.fast.cuda_kernel``, that reads each 4-bit weight tile
once for all rows (from 33 rows, on the wider layers, in a variant whose warps share the
activations through shared memory, ``FusedConfig.nw``), and a drop-in replacement for
``nn.QuantizedLinear`` that picks per call between that kernel, the stock op on the rows
flattened to 2-D, dequantize + matmul, and a dense copy of the weights where
``keep_dense_weights`` made one (``choose_path``; the figures behind it are in bench/NOTES.md,
"4-bit matmul on NVIDIA", "NVIDIA, night runs", "H200: fused projections and the staged
kernel", "H200: two weight tiles a warp in the staged kernel" and "H200: dense copies of the
weights for batched steps").

The parameters stay exactly as MLX stores them (affine, 4 bits, ``weight``/``scales``/
``biases``), so checkpoints load unchanged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeVar

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

__all__ = [
    "EPILOGUES",
    "GATE_UP_RUN",
    "NORM_MAX_ROWS",
    "STAGED_MIN_ROWS",
    "AcceleratedQuantizedEmbedding",
    "AcceleratedQuantizedLinear",
    "FusedConfig",
    "accelerate_quantized_layers",
    "apply_epilogue",
    "choose_path",
    "cuda_gpu_is_default",
    "dense_weight_bytes",
    "dequantize_matmul",
    "fused_epilogues_apply",
    "fused_quantized_matmul",
    "fused_supported",
    "interleave_gate_up",
    "keep_dense_weights",
    "kept_dense_bytes",
    "kernel_name",
    "kernel_source",
    "launch_shape",
    "norm_linear",
    "reference_fused_matmul",
    "residual_linear",
    "set_folded_norm_rows",
    "set_fused_epilogues",
    "set_staged_min_rows",
    "split_gate_up",
    "swiglu_linear",
]

# K is walked in chunks of 256 (each lane reads 2 x 16 bytes of packed weights per row).
_K_CHUNK = 256
_GROUP_SIZES = (32, 64)


@dataclass(frozen=True)
class FusedConfig:
    """Tile shape of the fused kernel.

    mt: 8-row tiles of the activations per block (the kernel's MMA "n" side).
    rt: 16-row tiles of the weight matrix per warp (reuse of each activation fragment).
    kw: warps per block, each summing a share of K (reduced in shared memory).
    nw: warps per block that own different 16 rt-row weight tiles and share one copy of the
        activations staged in shared memory. With 1, every warp reads its activation
        fragments from global memory itself: at 64 rows those re-reads, one per 16 rt output
        features, move 15x the weights' bytes through L2 (rt 1) and bound the kernel.
    """

    mt: int
    rt: int
    kw: int
    nw: int = 1


# Device helpers. The MMA computes W (16 output features) x X^T (8 activation rows), so the
# batch sits on the narrow side and a single row wastes no weight bandwidth.
_HEADER = r"""
__device__ __forceinline__ void qlx_mma(float* c, uint32_t a0, uint32_t a1, uint32_t a2,
                                        uint32_t a3, uint32_t b0, uint32_t b1, bool bf16) {
  if (bf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ uint32_t qlx_fma2(uint32_t a, uint32_t b, uint32_t c, bool bf16) {
  uint32_t d;
  if (bf16) {
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  } else {
    asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  }
  return d;
}

// One packed word holds q0..q7 (q_i in bits 4i..4i+3). out[i] = (w(q_i), w(q_{i+4})) as a
// 16-bit pair, w(q) = scale * q + bias rounded once. q is made exact first: OR-ing it into the
// mantissa of 128 (bf16) / 1024 (f16) gives 128 + q, and subtracting 128 is exact.
__device__ __forceinline__ void qlx_dequant8(uint32_t w, uint32_t s2, uint32_t b2,
                                             uint32_t* out, bool bf16) {
  const uint32_t magic = bf16 ? 0x43004300u : 0x64006400u;
  const uint32_t one = bf16 ? 0x3F803F80u : 0x3C003C00u;
  const uint32_t neg = bf16 ? 0xC300C300u : 0xE400E400u;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t p = ((w >> (4 * i)) & 0x000F000Fu) | magic;
    out[i] = qlx_fma2(qlx_fma2(p, one, neg, bf16), s2, b2, bf16);
  }
}

// Eight consecutive activations e0..e7, paired like the weights: (e0,e4) (e1,e5) (e2,e6) (e3,e7).
__device__ __forceinline__ void qlx_xpairs(uint4 v, uint32_t* out) {
  out[0] = __byte_perm(v.x, v.z, 0x5410);
  out[1] = __byte_perm(v.x, v.z, 0x7632);
  out[2] = __byte_perm(v.y, v.w, 0x5410);
  out[3] = __byte_perm(v.y, v.w, 0x7632);
}

__device__ __forceinline__ uint32_t qlx_word(const uint4& v, int j) {
  return j == 0 ? v.x : (j == 1 ? v.y : (j == 2 ? v.z : v.w));
}
"""

# Kernel body. Grid: x over N / (16 RT) blocks, y over ceil(M / (8 MT)). Each warp owns rows
# n0 + 16 rt + g (+8) of the fragment and every KW-th chunk of 256 K. In a chunk, lane (g, t)
# loads 2 x 16 bytes per row, words [16 h + 4 t, 16 h + 4 t + 4) for h = 0, 1, which keeps each
# 16-byte load in one quantization group (32 values) and every warp load fully coalesced. The
# MMA's K order is permuted (same on both operands), which leaves the sum unchanged.
_SOURCE = r"""
  constexpr int ROWS = 16 * RT;
  constexpr int COLS = 8 * MT;
  constexpr int LD = ROWS + 4;  // padded smem row: conflict-free fragment stores
  // x holds M rows of K values, (..., K) or any row-contiguous shape of that size (attention's
  // (B, heads, 1, D) output), read in place: no reshape nodes in the graph.
  const int K = w_shape[1] * 8;
  int M = 1;
#pragma unroll
  for (int i = 0; i < 9; ++i) M *= i < x_ndim ? x_shape[i] : 1;
  M /= K;
  const int N = w_shape[0];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int n0 = blockIdx.x * ROWS;
  const int m0 = blockIdx.y * COLS;
  const int nchunks = K / 256;
  const int kwords = K / 8;
  const int ngroups = K / GS;
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales);
  const uint16_t* bp = reinterpret_cast<const uint16_t*>(biases);
  const uint4* xv = reinterpret_cast<const uint4*>(x);

  float acc[RT][MT][4];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[rt][mt][i] = 0.0f;

  // Activation rows past M are clamped to a valid row (a broadcast read) and zeroed below.
  int xrow[MT];
  bool xok[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int m = m0 + mt * 8 + g;
    xok[mt] = m < M;
    xrow[mt] = xok[mt] ? m : M - 1;
  }
/*NORM_SETUP*/

  uint4 wc[RT][2][2];
  uint16_t sc[RT][2][2], bc[RT][2][2];
  int c = warp;

#define QLX_LOAD(C, WV, SV, BV)                                                      \
  _Pragma("unroll") for (int rt = 0; rt < RT; ++rt)                                  \
  _Pragma("unroll") for (int hi = 0; hi < 2; ++hi) {                                 \
    const size_t row = (size_t)(n0 + rt * 16 + g + 8 * hi);                          \
    const uint4* wr = reinterpret_cast<const uint4*>(w + row * kwords + (C) * 32);   \
    _Pragma("unroll") for (int h = 0; h < 2; ++h) {                                  \
      WV[rt][hi][h] = wr[h * 4 + t];                                                 \
      const int grp = ((C) * 256 + h * 128 + 32 * t) / GS;                           \
      SV[rt][hi][h] = sp[row * ngroups + grp];                                       \
      BV[rt][hi][h] = bp[row * ngroups + grp];                                       \
    }                                                                                \
  }

  if (c < nchunks) {
    QLX_LOAD(c, wc, sc, bc)
  }
  for (; c < nchunks; c += KW) {
    // Issue the next chunk's loads before this chunk's math to keep memory busy.
    uint4 wn[RT][2][2];
    uint16_t sn[RT][2][2], bn[RT][2][2];
    const bool more = c + KW < nchunks;
    if (more) {
      QLX_LOAD(c + KW, wn, sn, bn)
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t s2[RT][2], b2[RT][2];
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int hi = 0; hi < 2; ++hi) {
          s2[rt][hi] = (uint32_t)sc[rt][hi][h] * 0x10001u;
          b2[rt][hi] = (uint32_t)bc[rt][hi][h] * 0x10001u;
        }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        // uint4 index of x[row][c * 256 + h * 128 + 32 t + 8 j]
        const int xcol = c * 32 + h * 16 + 4 * t + j;
        uint32_t xp[MT][4];
/*NORM_WEIGHT*/
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          uint4 v = xv[(size_t)xrow[mt] * (K / 8) + xcol];
          if (!xok[mt]) v = make_uint4(0u, 0u, 0u, 0u);
/*NORM_X*/
          qlx_xpairs(v, xp[mt]);
        }
#pragma unroll
        for (int rt = 0; rt < RT; ++rt) {
          uint32_t d0[4], d1[4];
          qlx_dequant8(qlx_word(wc[rt][0][h], j), s2[rt][0], b2[rt][0], d0, BF16);
          qlx_dequant8(qlx_word(wc[rt][1][h], j), s2[rt][1], b2[rt][1], d1, BF16);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            qlx_mma(acc[rt][mt], d0[0], d1[0], d0[1], d1[1], xp[mt][0], xp[mt][1], BF16);
            qlx_mma(acc[rt][mt], d0[2], d1[2], d0[3], d1[3], xp[mt][2], xp[mt][3], BF16);
          }
        }
      }
    }
    if (more) {
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int hi = 0; hi < 2; ++hi)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            wc[rt][hi][h] = wn[rt][hi][h];
            sc[rt][hi][h] = sn[rt][hi][h];
            bc[rt][hi][h] = bn[rt][hi][h];
          }
    }
  }
#undef QLX_LOAD

  // Sum the KW warps' partials in a fixed order (deterministic), then store coalesced.
  extern __shared__ float qlx_red[];
  float* mine = qlx_red + warp * (COLS * LD);
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int mm = mt * 8 + 2 * t + (i & 1);
        const int nn = rt * 16 + g + 8 * (i >> 1);
        mine[mm * LD + nn] = acc[rt][mt][i];
      }
  __syncthreads();
"""


# How the unstaged kernel stores its block of sums (after the KW partials are in `qlx_red`), by
# epilogue. "residual" adds a (..., N) input as it stores: `residual + x @ W.T`, one graph node
# instead of two. "swiglu" takes a fused gate/up layer whose rows alternate in runs of 8 gate and
# 8 up features (`interleave_gate_up`), so each 16-row tile holds both halves of 8 outputs, and
# stores silu(gate) * up (N / 2 features): one node instead of three (matmul, split, product).
# Both round as MLX does: the matmul's output to T first, then each operation in T (MLX's
# sigmoid is 1 / (1 + exp|x|), mirrored for x >= 0).
_STORE_LOOP = r"""
  for (int idx = threadIdx.x; idx < ROWS * COLS; idx += 32 * KW) {
    const int mm = idx / ROWS;
    const int nn = idx - mm * ROWS;
    if (m0 + mm >= M) {
      break;
    }
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < KW; ++k) s += qlx_red[k * (COLS * LD) + mm * LD + nn];
/*NORM_SCALE*/
    const size_t o = (size_t)(m0 + mm) * N + n0 + nn;
    y[o] = STORED;
  }
"""
_STORES = {
    "none": _STORE_LOOP.replace("STORED", "static_cast<T>(s)"),
    "residual": _STORE_LOOP.replace("STORED", "static_cast<T>(s) + residual[o]"),
    "swiglu": r"""
  constexpr int OUTS = ROWS / 2;
  for (int idx = threadIdx.x; idx < OUTS * COLS; idx += 32 * KW) {
    const int mm = idx / OUTS;
    const int p = idx - mm * OUTS;
    if (m0 + mm >= M) {
      break;
    }
    const int nn = (p >> 3) * 16 + (p & 7);  // the gate row; its up row is 8 further
    float sg = 0.0f, su = 0.0f;
#pragma unroll
    for (int k = 0; k < KW; ++k) {
      sg += qlx_red[k * (COLS * LD) + mm * LD + nn];
      su += qlx_red[k * (COLS * LD) + mm * LD + nn + 8];
    }
/*NORM_SCALE_PAIR*/
    const T gate = static_cast<T>(sg);
    const T up = static_cast<T>(su);
    const T one = static_cast<T>(1.0f);
    const T e = one / (one + hexp(__habs(gate)));
    const T sigmoid = gate < static_cast<T>(0.0f) ? e : one - e;
    y[(size_t)(m0 + mm) * (N / 2) + n0 / 2 + p] = gate * sigmoid * up;
  }
""",
}
EPILOGUES = tuple(_STORES)
GATE_UP_RUN = 8  # the "swiglu" epilogue's run length: half the kernel's 16-row weight tile

# An RMSNorm folded into the unstaged kernel's activation loads (`norm`), for blocks of up to 8
# rows (MT 1): each block first sums the squares of its rows' whole K, all rows in one pass
# (cheap at a few rows, an extra read of the activations per 16 output features at many), then
# multiplies every activation it loads by the norm's weight (one packed multiply a pair) and
# its sums by the row's 1 / rms as it stores. MLX's RMSNorm rounds x / rms to T before the
# weight; here x * w is rounded instead: the same function, different bf16 roundings. (The
# first version rounded as MLX does, at ~40 more instructions per 8 activations loaded; a
# one-row step lost with it, bench/NOTES.md, "H200: the fused kernel's epilogues".)
NORM_MAX_ROWS = 8
_folded_norm_rows = 0  # the server turns it on (`--folded-norm-rows`)
_NORM_SNIPPETS = {
    "/*NORM_SETUP*/": r"""
  __shared__ float qlx_part[KW * COLS];
  __shared__ float qlx_inv[COLS];
  {
    float ss[COLS];
#pragma unroll
    for (int r = 0; r < COLS; ++r) ss[r] = 0.0f;
    for (int q = threadIdx.x; q < K / 8; q += 32 * KW) {
#pragma unroll
      for (int r = 0; r < COLS; ++r) {
        if (m0 + r < M) {
          uint4 v = xv[(size_t)(m0 + r) * (K / 8) + q];
          const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            const float f = static_cast<float>(e[i]);
            ss[r] += f * f;
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < COLS; ++r) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) ss[r] += __shfl_xor_sync(0xffffffffu, ss[r], off);
      if (lane == 0) qlx_part[warp * COLS + r] = ss[r];
    }
    __syncthreads();
    if (threadIdx.x < COLS) {
      float total = 0.0f;
      for (int k = 0; k < KW; ++k) total += qlx_part[k * COLS + threadIdx.x];
      qlx_inv[threadIdx.x] = rsqrt(total / K + EPS);
    }
    __syncthreads();
  }
""",
    "/*NORM_WEIGHT*/": r"""
        const uint4 nwv = reinterpret_cast<const uint4*>(norm_weight)[xcol];
""",
    "/*NORM_X*/": r"""
          {
            T2* e = reinterpret_cast<T2*>(&v);
            const T2* nw = reinterpret_cast<const T2*>(&nwv);
#pragma unroll
            for (int i = 0; i < 4; ++i) e[i] = __hmul2(e[i], nw[i]);
          }
""",
    "/*NORM_SCALE*/": r"""
    s *= qlx_inv[mm];
""",
    "/*NORM_SCALE_PAIR*/": r"""
    sg *= qlx_inv[mm];
    su *= qlx_inv[mm];
""",
}


# Staged kernel body. Block: NW x KW warps; warp (nw, kw) owns output rows n0 + 16 nw + g (+8)
# and every KW-th chunk of 256 K, as in the body above, but the block's COLS activation rows
# of the KW chunks in flight are copied once into shared memory (cp.async, two stages: the next
# chunks load while these are multiplied) and all NW warps read their fragments from there.
# Within a row of 32 16-byte words, word q sits at q ^ (bit 3 of q | (row & 1) << 1): the 8
# lanes of a quarter-warp then read 8 different bank groups. Rows past M are zero-filled.
_STAGED_SOURCE = r"""
  constexpr int ROWS = 16 * RT * NW;
  constexpr int COLS = 8 * MT;
  constexpr int LD = ROWS + 4;
  constexpr int NT = 32 * NW * KW;
  constexpr int STAGE = KW * COLS * 32;  // 16-byte words a stage holds
  const int K = w_shape[1] * 8;
  int M = 1;
#pragma unroll
  for (int i = 0; i < 9; ++i) M *= i < x_ndim ? x_shape[i] : 1;
  M /= K;
  const int N = w_shape[0];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nw = warp % NW;
  const int kw = warp / NW;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int n0 = blockIdx.x * ROWS + nw * 16 * RT;
  const int m0 = blockIdx.y * COLS;
  const int nchunks = K / 256;
  const int iters = (nchunks + KW - 1) / KW;
  const int kwords = K / 8;
  const int ngroups = K / GS;
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales);
  const uint16_t* bp = reinterpret_cast<const uint16_t*>(biases);
  const uint4* xv = reinterpret_cast<const uint4*>(x);
  extern __shared__ uint4 qlx_smem[];

  float acc[RT][MT][4];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[rt][mt][i] = 0.0f;

#define QLX_STAGE(IT, BUF)                                                                 \
  for (int idx = threadIdx.x; idx < STAGE; idx += NT) {                                    \
    const int q = idx & 31;                                                                \
    const int r = (idx >> 5) % COLS;                                                       \
    const int s = idx / (32 * COLS);                                                       \
    const int cc = (IT) * KW + s;                                                          \
    const bool ok = cc < nchunks && m0 + r < M;                                            \
    const uint4* src = xv + (ok ? (size_t)(m0 + r) * (K / 8) + cc * 32 + q : 0);         \
    const int qs = q ^ (((q >> 3) & 1) | ((r & 1) << 1));                                  \
    const uint32_t dst = (uint32_t)__cvta_generic_to_shared(                               \
        qlx_smem + (BUF) * STAGE + (s * COLS + r) * 32 + qs);                              \
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),   \
                 "r"(ok ? 16 : 0));                                                        \
  }                                                                                        \
  asm volatile("cp.async.commit_group;\n" ::);

#define QLX_LOAD(C, WV, SV, BV)                                                      \
  _Pragma("unroll") for (int rt = 0; rt < RT; ++rt)                                  \
  _Pragma("unroll") for (int hi = 0; hi < 2; ++hi) {                                 \
    const size_t row = (size_t)(n0 + rt * 16 + g + 8 * hi);                          \
    const uint4* wr = reinterpret_cast<const uint4*>(w + row * kwords + (C) * 32);   \
    _Pragma("unroll") for (int h = 0; h < 2; ++h) {                                  \
      WV[rt][hi][h] = wr[h * 4 + t];                                                 \
      const int grp = ((C) * 256 + h * 128 + 32 * t) / GS;                           \
      SV[rt][hi][h] = sp[row * ngroups + grp];                                       \
      BV[rt][hi][h] = bp[row * ngroups + grp];                                       \
    }                                                                                \
  }

  uint4 wc[RT][2][2];
  uint16_t sc[RT][2][2], bc[RT][2][2];
  if (kw < nchunks) {
    QLX_LOAD(kw, wc, sc, bc)
  }
  QLX_STAGE(0, 0)
  for (int it = 0; it < iters; ++it) {
    if (it + 1 < iters) {
      QLX_STAGE(it + 1, (it + 1) & 1)
      asm volatile("cp.async.wait_group 1;\n" ::);
    } else {
      asm volatile("cp.async.wait_group 0;\n" ::);
    }
    __syncthreads();
    const int c = it * KW + kw;
    if (c < nchunks) {
      uint4 wn[RT][2][2];
      uint16_t sn[RT][2][2], bn[RT][2][2];
      const bool more = c + KW < nchunks;
      if (more) {
        QLX_LOAD(c + KW, wn, sn, bn)
      }
      const uint4* xs = qlx_smem + (it & 1) * STAGE + kw * COLS * 32;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint32_t s2[RT][2], b2[RT][2];
#pragma unroll
        for (int rt = 0; rt < RT; ++rt)
#pragma unroll
          for (int hi = 0; hi < 2; ++hi) {
            s2[rt][hi] = (uint32_t)sc[rt][hi][h] * 0x10001u;
            b2[rt][hi] = (uint32_t)bc[rt][hi][h] * 0x10001u;
          }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int q = h * 16 + 4 * t + j;
          const int qs = q ^ (((q >> 3) & 1) | ((g & 1) << 1));
          // Each activation fragment read from shared memory serves all RT weight tiles.
          uint32_t d0[RT][4], d1[RT][4];
#pragma unroll
          for (int rt = 0; rt < RT; ++rt) {
            qlx_dequant8(qlx_word(wc[rt][0][h], j), s2[rt][0], b2[rt][0], d0[rt], BF16);
            qlx_dequant8(qlx_word(wc[rt][1][h], j), s2[rt][1], b2[rt][1], d1[rt], BF16);
          }
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            uint32_t xp[4];
            qlx_xpairs(xs[(mt * 8 + g) * 32 + qs], xp);
#pragma unroll
            for (int rt = 0; rt < RT; ++rt) {
              qlx_mma(acc[rt][mt], d0[rt][0], d1[rt][0], d0[rt][1], d1[rt][1], xp[0], xp[1],
                      BF16);
              qlx_mma(acc[rt][mt], d0[rt][2], d1[rt][2], d0[rt][3], d1[rt][3], xp[2], xp[3],
                      BF16);
            }
          }
        }
      }
      if (more) {
#pragma unroll
        for (int rt = 0; rt < RT; ++rt)
#pragma unroll
          for (int hi = 0; hi < 2; ++hi)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              wc[rt][hi][h] = wn[rt][hi][h];
              sc[rt][hi][h] = sn[rt][hi][h];
              bc[rt][hi][h] = bn[rt][hi][h];
            }
      }
    }
    __syncthreads();
  }
#undef QLX_LOAD
#undef QLX_STAGE

  // The stages are free now: sum the KW partials in a fixed order there, store coalesced.
  float* red = reinterpret_cast<float*>(qlx_smem);
  float* mine = red + kw * (COLS * LD);
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int mm = mt * 8 + 2 * t + (i & 1);
        const int nn = (nw * RT + rt) * 16 + g + 8 * (i >> 1);
        mine[mm * LD + nn] = acc[rt][mt][i];
      }
  __syncthreads();
  const int nb = blockIdx.x * ROWS;
"""


def _staged_store(epilogue: str) -> str:
    """The staged kernel's store: the unstaged kernel's, over its own names for the block's
    partial sums, thread count and first output feature."""
    store = _STORES[epilogue].replace("/*NORM_SCALE*/", "").replace("/*NORM_SCALE_PAIR*/", "")
    return store.replace("qlx_red", "red").replace("32 * KW", "NT").replace("n0", "nb")


def kernel_name(stem: str, *sources: str) -> str:
    """A JIT kernel's name: ``stem`` and a digest of its source. MLX keeps compiled PTX on disk
    under the name alone, so a name that did not change with the source would hand a newer
    version of this code the older kernel."""
    digest = hashlib.sha1("\0".join(sources).encode()).hexdigest()[:12]
    return f"{stem}_{digest}"


def _minify(code: str) -> str:
    """Drop comments and indentation: MLX copies the whole source into every call's graph node."""
    lines = []
    for line in code.splitlines():
        line = line.split("//", 1)[0].strip()
        if line:
            lines.append(line)
    return "\n".join(lines) + "\n"


_HEADER_MIN = _minify(_HEADER)


def kernel_source(
    cfg: FusedConfig,
    group_size: int,
    dtype: mx.Dtype,
    epilogue: str = "none",
    norm_eps: float | None = None,
) -> tuple[str, str]:
    """Header and body of one fused-kernel variant, as handed to ``mx.fast.cuda_kernel``.

    The tile shape, group size, dtype, epilogue (``EPILOGUES``) and a folded RMSNorm's epsilon
    (``norm_eps``; MT 1) are compile-time constants baked into the body (no template arguments
    to convert and hash per call); the folded norm is the unstaged kernel's.
    """
    if epilogue not in _STORES:
        raise ValueError(f"no {epilogue!r} epilogue")
    if norm_eps is not None and (cfg.nw > 1 or cfg.mt != 1):
        raise ValueError(f"no folded RMSNorm for {cfg}")
    bf16 = dtype == mx.bfloat16
    consts = (
        f"using T = {'__nv_bfloat16' if bf16 else '__half'};\n"
        f"using T2 = {'__nv_bfloat162' if bf16 else '__half2'};\n"
        f"constexpr int MT = {cfg.mt};\nconstexpr int RT = {cfg.rt};\n"
        f"constexpr int KW = {cfg.kw};\nconstexpr int GS = {group_size};\n"
        f"constexpr bool BF16 = {'true' if bf16 else 'false'};\n"
    )
    consts += f"constexpr int NW = {cfg.nw};\n"
    if cfg.nw > 1:
        return _HEADER_MIN, consts + _minify(_STAGED_SOURCE + _staged_store(epilogue))
    body = _SOURCE + _STORES[epilogue]
    for marker, snippet in _NORM_SNIPPETS.items():
        body = body.replace(marker, "" if norm_eps is None else snippet)
    if norm_eps is not None:
        consts += f"constexpr float EPS = {norm_eps!r}f;\n"
    return _HEADER_MIN, consts + _minify(body)


def _shared_bytes(cfg: FusedConfig) -> int:
    reduction = cfg.kw * (8 * cfg.mt) * (16 * cfg.rt * cfg.nw + 4) * 4
    if cfg.nw == 1:
        return reduction
    stages = 2 * cfg.kw * (8 * cfg.mt) * 512  # two stages of KW chunks x rows x 256 K x 2 B
    return max(stages, reduction)


@cache
def _kernel(
    cfg: FusedConfig,
    group_size: int,
    dtype: mx.Dtype,
    epilogue: str = "none",
    norm_eps: float | None = None,
) -> object:
    header, source = kernel_source(cfg, group_size, dtype, epilogue, norm_eps)
    tag = "bf16" if dtype == mx.bfloat16 else "f16"
    if epilogue != "none":
        tag += f"_{epilogue}"
    inputs = ["x", "w", "scales", "biases"]
    if norm_eps is not None:
        tag += "_norm"
        inputs.append("norm_weight")
    if epilogue == "residual":
        inputs.append("residual")
    stem = f"qlx_qmm4_m{cfg.mt}_r{cfg.rt}_k{cfg.kw}_n{cfg.nw}_g{group_size}_{tag}"
    return mx.fast.cuda_kernel(
        name=kernel_name(stem, header, source),
        input_names=inputs,
        output_names=["y"],
        source=source,
        header=header,
        ensure_row_contiguous=True,
        shared_memory=_shared_bytes(cfg),
    )


def fused_supported(
    in_dims: int, out_dims: int, group_size: int, bits: int, dtype: mx.Dtype, rt: int = 1
) -> bool:
    """Whether the fused kernel handles this layer (else callers use the stock op)."""
    return (
        bits == 4
        and group_size in _GROUP_SIZES
        and dtype in (mx.bfloat16, mx.float16)
        and in_dims % _K_CHUNK == 0
        and out_dims % (16 * rt) == 0
    )


# (x shape, N, group size, dtype, config) -> kernel and launch arguments; building these
# per call costs more host time than the small-batch matmul itself takes on the GPU.
_PLANS: dict[tuple, tuple] = {}
_MAX_PLANS = 4096


def _plan(
    m: int,
    n: int,
    k: int,
    group_size: int,
    dtype: mx.Dtype,
    config: FusedConfig | None,
    epilogue: str,
    norm_eps: float | None,
) -> tuple:
    cfg = config or _default_fused_config(m, n, k)
    if config is None and norm_eps is not None and cfg.nw > 1:
        cfg = _unstaged_config(m, n, k)  # the folded norm is the unstaged kernel's
    if norm_eps is not None and m > NORM_MAX_ROWS:
        raise ValueError(f"a folded RMSNorm takes at most {NORM_MAX_ROWS} rows, not {m}")
    if n % (16 * cfg.rt * cfg.nw):
        raise ValueError(f"{cfg} needs a multiple of {16 * cfg.rt * cfg.nw} output features")
    grid, threadgroup = launch_shape(cfg, m, n)
    return _kernel(cfg, group_size, dtype, epilogue, norm_eps), grid, threadgroup


def launch_shape(
    cfg: FusedConfig, m: int, n: int
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Grid (in threads, as ``mx.fast.cuda_kernel`` takes it) and block for ``m`` rows of an
    ``n``-feature layer: one block per 16 rt nw output features and 8 mt rows."""
    threads = 32 * cfg.kw * cfg.nw
    grid = ((n // (16 * cfg.rt * cfg.nw)) * threads, -(-m // (8 * cfg.mt)), 1)
    return grid, (threads, 1, 1)


def fused_quantized_matmul(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array,
    group_size: int,
    config: FusedConfig | None = None,
    epilogue: str = "none",
    residual: mx.array | None = None,
    norm: tuple[mx.array, float] | None = None,
) -> mx.array:
    """``x @ dequantize(w).T`` for 4-bit affine weights, on the fused CUDA kernel.

    ``x`` is (..., K) with at least one row and the dtype of ``scales``; ``w`` is (N, K / 8)
    uint32. Check ``fused_supported`` first. ``epilogue`` (see ``_STORES``): "residual" returns
    ``residual + x @ W.T`` for a ``residual`` of the output's shape and dtype (``x`` may then be
    any row-contiguous array of its rows, e.g. attention's (B, heads, 1, D)); "swiglu" returns
    silu(gate) * up, (..., N / 2), for rows laid out by ``interleave_gate_up``. ``norm``, an
    RMSNorm's (weight, eps), is applied to ``x`` first, inside the kernel (up to 8 rows).
    """
    n, k = w.shape[0], w.shape[1] * 8
    if residual is not None:
        out_shape = tuple(residual.shape)
    else:
        out_shape = (*x.shape[:-1], n // 2 if epilogue == "swiglu" else n)
    norm_eps = None if norm is None else norm[1]
    key = (x.shape, n, group_size, scales.dtype, config, epilogue, norm_eps)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        m = x.size // k
        plan = _PLANS[key] = _plan(m, n, k, group_size, scales.dtype, config, epilogue, norm_eps)
    kernel, grid, threadgroup = plan
    inputs = [x, w, scales, biases]
    if norm is not None:
        inputs.append(norm[0])
    if epilogue == "residual":
        inputs.append(residual)
    return kernel(
        inputs=inputs,
        grid=grid,
        threadgroup=threadgroup,
        output_shapes=[out_shape],
        output_dtypes=[scales.dtype],
    )[0]


def apply_epilogue(y: mx.array, epilogue: str, residual: mx.array | None = None) -> mx.array:
    """What an epilogue does to a plain matmul's output ``y``, with MLX's own operations."""
    if epilogue == "residual":
        assert residual is not None
        return residual + y
    if epilogue == "swiglu":
        gate, up = split_gate_up(y)
        return nn.silu(gate) * up
    return y


def reference_fused_matmul(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array,
    group_size: int,
    config: FusedConfig | None = None,
    epilogue: str = "none",
    residual: mx.array | None = None,
    norm: tuple[mx.array, float] | None = None,
) -> mx.array:
    """What ``fused_quantized_matmul`` computes, with MLX's own operations (the stock matmul):
    for checks on the device, and to stand in for the kernel where there is no CUDA GPU."""
    if residual is not None:
        x = _rows_like(x, residual)
    if norm is not None:
        x = mx.fast.rms_norm(x, norm[0], norm[1])
    y = mx.quantized_matmul(x, w, scales, biases, group_size=group_size, bits=4)
    return apply_epilogue(y, epilogue, residual)


def interleave_gate_up(gate: mx.array, up: mx.array) -> mx.array:
    """The rows of two (I, ...) arrays in alternating runs of ``GATE_UP_RUN``: gate rows 0-7,
    up rows 0-7, gate rows 8-15, ... (the layout the "swiglu" epilogue reads)."""
    rest = gate.shape[1:]
    runs = [part.reshape(-1, GATE_UP_RUN, *rest) for part in (gate, up)]
    return mx.stack(runs, axis=1).reshape(-1, *rest)


def split_gate_up(y: mx.array) -> tuple[mx.array, mx.array]:
    """The gate and up halves, (..., I) each, of an interleaved layer's output (..., 2 I)."""
    *lead, n = y.shape
    runs = y.reshape(*lead, n // (2 * GATE_UP_RUN), 2, GATE_UP_RUN)
    return runs[..., 0, :].reshape(*lead, n // 2), runs[..., 1, :].reshape(*lead, n // 2)


def dequantize_matmul(
    x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int
) -> mx.array:
    """Dequantize to the activation dtype, then a dense matmul (tensor cores via cuBLAS)."""
    wd = mx.dequantize(w, scales, biases, group_size=group_size, bits=4)
    return x @ wd.T


# Path per layer and number of rows, from the H100 measurements in bench/NOTES.md ("4-bit
# matmul on NVIDIA", "step anatomy"). "stock" means mx.quantized_matmul with the rows flattened
# to 2-D: given (B, 1, K) decode activations, MLX's CUDA backend runs one GEMV per batch entry.
# In a decode step of 2-64 rows the fused kernel wins on every layer: the stock tiled kernel
# launches one block per 128 output features (32 blocks for a 4096-wide layer, 8 for a k/v
# projection, on 132 SMs), and layers run one after another, so most of the GPU idles; whole
# Qwen3-8B steps at 8 / 32 / 64 rows took 8.1 / 10.8 / 15.4 ms fused against 17.7 / 28.7 /
# 31.2 ms. (Timing each layer alone, with independent calls overlapping on the device, had hidden
# this and favoured the stock kernel.) At one row a fused call's extra host time outweighs what
# it saves on all but the output head.
_FUSED_MAX_ROWS = 64  # a decode step's rows (the engine runs 64 by default)
_FUSED_ONE_ROW_MIN_WEIGHTS = 128 * 2**20  # one row: output-head-sized layers only
_one_row_min_weights = _FUSED_ONE_ROW_MIN_WEIGHTS
_DEQUANT_MIN_ROWS = 192  # dequantize + cuBLAS from here (prefill) ...
_DEQUANT_MIN_WEIGHTS = 4096 * 4096  # ... for layers this large


def _mt_for(m: int) -> int:
    for mt in (1, 2, 4):
        if m <= 8 * mt:
            return mt
    return 8


# Up to 8 rows (one row tile), by layer shape: the fastest of eight (rt, kw) shapes in dependent
# one-row calls with each layer's epilogue and folded norm on an H200 (bench/gpu_one_row_tiles.py;
# bench/NOTES.md, "H200: decode blocks handed over in groups, one-row tile shapes, a cheaper
# folded norm"). More warps a block for the long
# K of down_proj (54.8 -> 35.3 us), two weight tiles a warp for gate/up and the head (54.4 ->
# 44.7, 164.3 -> 150.7) and both for o_proj (23.1 -> 18.8); q/k/v kept rt 1, kw 4.
def _one_tile_config(n: int, k: int) -> FusedConfig:
    if k >= 8192:
        return FusedConfig(mt=1, rt=1, kw=8)  # down_proj
    if n >= 16384 and n % 32 == 0:
        return FusedConfig(mt=1, rt=2, kw=4)  # fused gate/up, the output head
    if 4096 <= n < 6144 and n % 32 == 0:
        return FusedConfig(mt=1, rt=2, kw=8)  # o_proj
    return FusedConfig(mt=1, rt=1, kw=4)


def _unstaged_config(m: int, n: int, k: int = 0) -> FusedConfig:
    """The unstaged kernel's fastest measured tile shape for ``m`` rows of an (n, k) layer (H100;
    up to 8 rows, H200)."""
    mt = _mt_for(m)
    if mt == 1:
        return _one_tile_config(n, k)
    if mt == 4 and n % 32 == 0:
        return FusedConfig(mt=4, rt=2, kw=8)
    return FusedConfig(mt=mt, rt=1, kw=4)


# Default of `--staged-matmul-rows`. From 33 rows the tile shapes by layer width below made a
# decode block's four matmuls 342 -> 290 us at 48 rows and 373 -> 299 at 64 (H200), and
# 64-stream decode steps over HTTP 19.9 -> 16.2-16.6 ms, before o/down took their shape too
# (another ~30 us a block); at 32 rows the default unstaged shapes were as fast or faster
# (bench/NOTES.md, "H200: two weight tiles a warp in the staged kernel"). An earlier staged
# policy without the epilogues had lost over HTTP (33.7-38.5 against 22.1 ms steps, "H200:
# compiled decode blocks").
STAGED_MIN_ROWS = 33
_staged_min_rows = STAGED_MIN_ROWS

# (smallest N, config) from `_staged_min_rows` rows, widest layers first: the staged kernel,
# or for o/down an unstaged shape other than the default; None keeps the default. The fastest
# shapes of dependent calls with each layer's epilogue at 48 and 64 rows on an H200
# (bench/gpu_tile_reuse.py; bench/NOTES.md).
_BATCHED_BY_WIDTH: tuple[tuple[int, FusedConfig | None], ...] = (
    (65536, FusedConfig(mt=4, rt=1, kw=1, nw=8)),  # an output head
    (16384, FusedConfig(mt=8, rt=2, kw=1, nw=4)),  # fused gate/up
    (4097, FusedConfig(mt=4, rt=2, kw=2, nw=2)),  # fused q/k/v, gate or up alone
    # o and down: the unstaged kernel with two tiles a warp over 32-row blocks (their four
    # warps split K), 130-135 -> 101 us for the pair at 48-64 rows.
    (4096, FusedConfig(mt=4, rt=2, kw=4, nw=1)),
    (0, None),  # narrower (k/v unfused): too few blocks for any but the default shape
)


def _default_fused_config(m: int, n: int, k: int = 0) -> FusedConfig:
    """Tile shape for ``m`` rows of an ``n``-feature layer of ``k`` inputs: the unstaged kernel's
    default below ``_staged_min_rows``, then the shape measured fastest for the layer's width."""
    if m >= _staged_min_rows:
        for min_width, cfg in _BATCHED_BY_WIDTH:
            if n >= min_width:
                if cfg is not None and n % (16 * cfg.rt * cfg.nw) == 0:
                    return cfg
                break
    return _unstaged_config(m, n, k)


def set_staged_min_rows(rows: int) -> None:
    """Fused calls of at least ``rows`` rows take the staged kernel (above 64: never)."""
    global _staged_min_rows
    _staged_min_rows = rows
    _PLANS.clear()


def set_one_row_fused(every_layer: bool) -> None:
    """One-row calls take the fused kernel on every layer, not the output head alone.

    For decode steps that replay compiled graphs (kernels/compiled_decode.py): there the
    kernel's host cost per call, which outweighs its faster weight reads in a graph built op by
    op, is paid once at tracing (one-row steps 5.9 -> 5.5 ms on an H200, bench/NOTES.md).
    """
    global _one_row_min_weights
    _one_row_min_weights = 0 if every_layer else _FUSED_ONE_ROW_MIN_WEIGHTS


# Default of `--dense-weights-rows`: calls of this many rows or more multiply with a layer's dense
# copy of its weights where `--dense-weights` keeps one (bench/NOTES.md, "H200: dense copies of
# the weights for batched steps": a 64-row block's matmuls 226 -> 163 us, a 32-row one's 144 ->
# 153).
DENSE_MIN_ROWS = 33
_dense_min_rows = DENSE_MIN_ROWS


def choose_path(m: int, n: int, k: int, dense: bool = False) -> str:
    """'dense', 'fused', 'dequant' or 'stock' for a supported (N=n, K=k) layer called on ``m``
    rows; 'dense' only where the layer keeps a dense copy of its weights (``dense``)."""
    weights = n * k
    if dense and m >= _dense_min_rows:
        return "dense"
    if m >= _DEQUANT_MIN_ROWS and weights >= _DEQUANT_MIN_WEIGHTS:
        return "dequant"
    if m > _FUSED_MAX_ROWS or (m == 1 and weights < _one_row_min_weights):
        return "stock"
    return "fused"


@cache
def _cuda_build() -> bool:
    cuda = getattr(mx, "cuda", None)
    try:
        return bool(cuda is not None and cuda.is_available())
    except Exception:  # a backend without the query
        return False


def _on_gpu() -> bool:
    return mx.default_device().type == mx.gpu


def _fast_layer(module: nn.Module) -> bool:
    """Static half of the fused-path test, done once per layer (the host time per call counts)."""
    w = module["weight"]
    return (
        _cuda_build()
        and module.mode == "affine"
        and module.get("biases") is not None
        and fused_supported(
            w.shape[1] * 32 // module.bits,
            w.shape[0],
            module.group_size,
            module.bits,
            module["scales"].dtype,
        )
    )


def _path(module: nn.Module, x: mx.array) -> tuple[str, bool]:
    """The path of one call, and whether the stock op gets the rows flattened to 2-D."""
    if module.force_path is not None:
        return module.force_path, False
    if not (module._cuda and _on_gpu()):
        return "stock", False
    k = x.shape[-1]
    m = x.size // k
    path = "stock"
    if module._fast and x.dtype == module["scales"].dtype:
        path = choose_path(m, module["weight"].shape[0], k, module._dense_weight is not None)
    # Several batch entries: one 2-D call instead of a GEMV per entry.
    return path, path == "stock" and x.ndim > 2 and m > x.shape[-2]


def _quantized_matmul(
    module: nn.Module, x: mx.array, path: str | None = None, flatten: bool = False
) -> mx.array:
    w, scales, biases = module["weight"], module["scales"], module.get("biases")
    if path is None:
        path, flatten = _path(module, x)
    if path == "fused":
        return fused_quantized_matmul(x, w, scales, biases, module.group_size)
    if path == "dense":
        # As (rows, K): given (B, 1, K) a batched matmul would run one product per entry.
        dense = module._dense_weight
        if dense is None:
            raise ValueError("this layer keeps no dense copy of its weights")
        shape = x.shape
        y = x.reshape(-1, shape[-1]) @ dense.T
        return y.reshape(*shape[:-1], dense.shape[0]) if len(shape) != 2 else y
    if path == "dequant":
        wd = mx.dequantize(
            w, scales, biases, group_size=module.group_size, bits=module.bits, mode=module.mode
        )
        return x @ wd.T
    shape = x.shape
    if flatten:
        x = x.reshape(-1, shape[-1])
    y = mx.quantized_matmul(
        x,
        w,
        scales=scales,
        biases=biases,
        transpose=True,
        group_size=module.group_size,
        bits=module.bits,
        mode=module.mode,
    )
    return y.reshape(*shape[:-1], w.shape[0]) if flatten else y


_epilogues_enabled = True


def set_fused_epilogues(enabled: bool) -> None:
    """Whether fused-kernel calls add residuals and compute SwiGLU as they store (the default),
    and `fuse_projections` lays gate/up rows out for it; off, those stay separate operations."""
    global _epilogues_enabled
    _epilogues_enabled = enabled


def set_folded_norm_rows(rows: int) -> None:
    """Calls of up to ``rows`` rows (at most ``NORM_MAX_ROWS``; 0: none) fold the RMSNorm
    before them into the fused kernel (`norm_linear`, `swiglu_linear` with a norm)."""
    global _folded_norm_rows
    if not 0 <= rows <= NORM_MAX_ROWS:
        raise ValueError(f"folded norms take 0-{NORM_MAX_ROWS} rows, not {rows}")
    _folded_norm_rows = rows


def fused_epilogues_apply(layer: nn.Module) -> bool:
    """Whether calls of ``layer`` (a quantized linear layer) can take the fused epilogues."""
    return (
        _epilogues_enabled
        and isinstance(layer, nn.QuantizedLinear)
        and "bias" not in layer
        and _cuda_build()
        and _fast_layer(layer)
    )


class AcceleratedQuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` with the same parameters and a faster matmul on NVIDIA GPUs.

    ``force_path`` pins one path ('fused', 'dequant' or 'stock', the latter exactly the stock
    layer) for tests and benchmarks; ``None`` picks per call (see ``choose_path``).
    ``gate_up_interleaved``: the rows are a fused gate/up layer's, laid out by
    ``interleave_gate_up`` (see ``swiglu``).
    """

    force_path: str | None = None
    gate_up_interleaved: bool = False
    _cuda: bool = False  # CUDA build: flatten batched rows for the stock op
    _fast: bool = False  # and the fused kernel / dequantize paths apply
    _dense_weight: mx.array | None = None  # `keep_dense_weights`; not a parameter

    @classmethod
    def from_quantized(cls, layer: nn.QuantizedLinear) -> AcceleratedQuantizedLinear:
        extra: dict[str, Any] = {"bias": layer.bias} if "bias" in layer else {}
        if getattr(layer, "gate_up_interleaved", False):
            extra["gate_up_interleaved"] = True
        return _adopt(cls.__new__(cls), layer, extra)

    def __call__(self, x: mx.array) -> mx.array:
        y = _quantized_matmul(self, x)
        if "bias" in self:
            y = y + self["bias"]
        return y

    def _norm_args(self, x: mx.array, norm: nn.Module | None) -> tuple[mx.array, float] | None:
        """An RMSNorm's (weight, eps) if the kernel can fold it into this call, else None."""
        if norm is None or type(norm) is not nn.RMSNorm or not _epilogues_enabled:
            return None
        weight = norm["weight"]
        if weight.dtype != x.dtype or x.size // x.shape[-1] > _folded_norm_rows:
            return None
        return weight, float(norm.eps)

    def _fused(self, x: mx.array, **options: Any) -> mx.array:
        """This layer's weights through `fused_quantized_matmul`, with its ``options``."""
        w, scales, biases = self["weight"], self["scales"], self["biases"]
        return fused_quantized_matmul(x, w, scales, biases, self.group_size, **options)

    def add_to(self, x: mx.array, residual: mx.array) -> mx.array:
        """``residual + self(x)``; on the fused kernel the add happens as it stores. ``x`` may
        hold the rows in another shape (attention's (B, heads, 1, D)): the kernel reads it as
        it is, any other path gets it reshaped."""
        rows = _rows_like(x, residual)
        if "bias" in self or not _epilogues_enabled:
            return residual + self(rows)
        path, flatten = _path(self, rows)
        if (
            path == "fused"
            and residual.dtype == x.dtype
            and residual.shape == (*rows.shape[:-1], self["weight"].shape[0])
        ):
            return self._fused(x, epilogue="residual", residual=residual)
        return residual + _quantized_matmul(self, rows, path, flatten)

    def normed(self, x: mx.array, norm: nn.Module) -> mx.array:
        """``self(norm(x))``; on the fused kernel, up to ``set_folded_norm_rows`` rows, an
        RMSNorm is folded in."""
        path, _ = _path(self, x)
        args = self._norm_args(x, norm) if path == "fused" and "bias" not in self else None
        if args is None:
            return self(norm(x))
        return self._fused(x, norm=args)

    def swiglu(self, x: mx.array, norm: nn.Module | None = None) -> mx.array:
        """silu(gate) * up of an interleaved gate/up layer, of ``norm(x)`` if a norm is given:
        on the fused kernel as it stores, up to 64 rows, one row included (there one node
        instead of three outweighs the fused call's host cost); else after the matmul."""
        path, flatten = _path(self, x)
        one_row = x.size == x.shape[-1]
        if path == "stock" and one_row and self.force_path is None and self._fast and _on_gpu():
            path = "fused" if x.dtype == self["scales"].dtype else path
        if path == "fused" and _epilogues_enabled and "bias" not in self:
            args = self._norm_args(x, norm)
            if args is None and norm is not None:
                x = norm(x)
            return self._fused(x, epilogue="swiglu", norm=args)
        x = x if norm is None else norm(x)
        y = self(x) if "bias" in self else _quantized_matmul(self, x, path, flatten)
        return apply_epilogue(y, "swiglu")


class AcceleratedQuantizedEmbedding(nn.QuantizedEmbedding):
    """``nn.QuantizedEmbedding`` whose ``as_linear`` (tied output head) uses the faster path."""

    force_path: str | None = None
    _cuda: bool = False  # CUDA build: flatten batched rows for the stock op
    _fast: bool = False  # and the fused kernel / dequantize paths apply
    _dense_weight: mx.array | None = None  # `keep_dense_weights`; not a parameter

    @classmethod
    def from_quantized(cls, layer: nn.QuantizedEmbedding) -> AcceleratedQuantizedEmbedding:
        sizes = {"num_embeddings": layer.num_embeddings, "dims": layer.dims}
        return _adopt(cls.__new__(cls), layer, sizes)

    def as_linear(self, x: mx.array) -> mx.array:
        return _quantized_matmul(self, x)


_Accelerated = TypeVar("_Accelerated", bound=nn.Module)


def _adopt(new: _Accelerated, layer: nn.Module, extra: dict[str, Any]) -> _Accelerated:
    """Gives an uninitialised accelerated layer the stock layer's quantized weights and settings
    (shared, not copied) plus `extra`, frozen as the stock layer is."""
    nn.Module.__init__(new)
    new.group_size, new.bits, new.mode = layer.group_size, layer.bits, layer.mode
    new.weight, new.scales, new.biases = layer.weight, layer.scales, layer.get("biases")
    for name, value in extra.items():
        setattr(new, name, value)
    new.freeze()
    new._cuda = _cuda_build()
    new._fast = _fast_layer(new)
    return new


def cuda_gpu_is_default() -> bool:
    """True when MLX runs on an NVIDIA GPU by default (the CUDA build, GPU device)."""
    return _cuda_build() and mx.default_device().type == mx.gpu


def _eligible(module: nn.Module) -> bool:
    return (
        module.mode == "affine"
        and module.bits == 4
        and module.group_size in _GROUP_SIZES
        and module.get("biases") is not None
    )


def accelerate_quantized_layers(model: nn.Module, force: bool = False) -> int:
    """Swap the model's 4-bit affine quantized layers for the accelerated ones, in place.

    Only acts when the default device is a CUDA GPU, unless ``force`` (Apple silicon was not
    measured, and the CPU is the test backend). Returns the number of layers replaced:
    ``QuantizedLinear`` layers, plus ``QuantizedEmbedding`` layers, whose ``as_linear`` serves
    a tied output head. Parameters are shared with the old layers, not copied.
    """
    if not force and not cuda_gpu_is_default():
        return 0
    swaps: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        if type(module) is nn.QuantizedLinear and _eligible(module):
            swaps.append((path, AcceleratedQuantizedLinear.from_quantized(module)))
        elif type(module) is nn.QuantizedEmbedding and _eligible(module):
            swaps.append((path, AcceleratedQuantizedEmbedding.from_quantized(module)))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return len(swaps)


def _dense_candidates(model: nn.Module) -> list[nn.Module]:
    """The accelerated 4-bit layers a dense copy would serve: every linear one, and embeddings
    only where no `lm_head` exists (a tied output head multiplies with the embedding)."""
    named = model.named_modules()
    untied = any(name.rsplit(".", 1)[-1] == "lm_head" for name, _ in named)
    found: dict[int, nn.Module] = {}  # by identity: a module may sit at two paths
    for _, module in named:
        linear = isinstance(module, AcceleratedQuantizedLinear)
        tied_head = isinstance(module, AcceleratedQuantizedEmbedding) and not untied
        if (linear or tied_head) and module._fast:
            found[id(module)] = module
    return list(found.values())


def dense_weight_bytes(model: nn.Module) -> int:
    """Bytes that ``keep_dense_weights`` would keep for ``model``."""
    total = 0
    for module in _dense_candidates(model):
        rows, words = module["weight"].shape
        total += rows * words * (32 // module.bits) * module["scales"].dtype.size
    return total


def keep_dense_weights(model: nn.Module, min_rows: int = DENSE_MIN_ROWS) -> int:
    """Gives the accelerated 4-bit layers of ``model`` a dense copy of their weights, exactly
    ``mx.dequantize`` of them in the dtype of their scales, with which calls of at least
    ``min_rows`` rows multiply (one cuBLAS product, no dequantizing per call); fewer rows keep
    the 4-bit paths. Memory for speed: about 3.5x the 4-bit weights' bytes more. Returns the
    bytes kept. The copies are not parameters: checkpoints and ``model.parameters()`` stay 4-bit.
    """
    global _dense_min_rows
    if min_rows < 1:
        raise ValueError(f"dense weights need a row count of at least 1, not {min_rows}")
    _dense_min_rows = min_rows
    kept = 0
    for module in _dense_candidates(model):
        dense = mx.dequantize(
            module["weight"],
            module["scales"],
            module["biases"],
            group_size=module.group_size,
            bits=module.bits,
            mode=module.mode,
        ).astype(module["scales"].dtype)
        mx.eval(dense)  # one layer at a time: no peak of every layer's temporaries
        object.__setattr__(module, "_dense_weight", dense)  # outside the parameter tree
        kept += dense.nbytes
    return kept


def kept_dense_bytes(model: nn.Module) -> int:
    """Bytes of the dense copies ``keep_dense_weights`` gave ``model``'s layers (0: none)."""
    kept = {
        id(module): module._dense_weight.nbytes
        for _, module in model.named_modules()
        if isinstance(module, _DENSE_TYPES) and module._dense_weight is not None
    }
    return sum(kept.values())


_DENSE_TYPES = (AcceleratedQuantizedLinear, AcceleratedQuantizedEmbedding)


def _rows_like(x: mx.array, residual: mx.array) -> mx.array:
    """``x`` as (..., K) rows matching ``residual``'s leading dimensions."""
    return x if x.shape[:-1] == residual.shape[:-1] else x.reshape(*residual.shape[:-1], -1)


def residual_linear(layer: nn.Module, x: mx.array, residual: mx.array) -> mx.array:
    """``residual + layer(x)``: one fused-kernel node where ``layer`` is accelerated. ``x`` may
    hold the rows in another shape, e.g. attention's (B, heads, 1, D) for (B, 1, heads x D)."""
    add_to = getattr(layer, "add_to", None)
    return add_to(x, residual) if add_to is not None else residual + layer(_rows_like(x, residual))


def norm_linear(layer: nn.Module, x: mx.array, norm: nn.Module) -> mx.array:
    """``layer(norm(x))``: one fused-kernel node where the kernel can fold the norm in."""
    normed = getattr(layer, "normed", None)
    return normed(x, norm) if normed is not None else layer(norm(x))


def swiglu_linear(layer: nn.Module, x: mx.array, norm: nn.Module | None = None) -> mx.array:
    """silu(gate) * up from a fused gate/up layer, of ``norm(x)`` if a norm is given:
    interleaved rows (``gate_up_interleaved``), else the two halves concatenated
    (kernels/fused_projections.py)."""
    if getattr(layer, "gate_up_interleaved", False):
        swiglu = getattr(layer, "swiglu", None)
        if swiglu is not None:
            return swiglu(x, norm)
        return apply_epilogue(layer(x if norm is None else norm(x)), "swiglu")
    gate, up = mx.split(layer(x if norm is None else norm(x)), 2, axis=-1)
    return nn.silu(gate) * up
