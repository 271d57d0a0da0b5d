"""Qwen3 dense models (`model_type: qwen3`), the reference architecture of this package.

Qwen3 is Qwen2 with two changes: the q/k/v/o projections carry no bias, and queries and keys
go through an RMSNorm over each head (`q_norm`, `k_norm`) before RoPE, which keeps attention
logits in range without the bias terms. The parameter names mirror the Hugging Face ones, so
the `mlx-community/Qwen3-*` checkpoints (quantized ones included) load unchanged.

This file is also the worked example of docs/adding-a-model.md: a module named after the
`model_type` that defines `ModelArgs` and `Model` the way mlx-lm's own model files do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs, create_attention_mask, scaled_dot_product_attention
from mlx_lm.models.cache import BatchKVCache
from mlx_lm.models.rope_utils import initialize_rope

from ..kernels import decode_attention
from ..kernels.fused_projections import concatenate_gate_up, concatenate_linears
from ..kernels.quantized_linear import swiglu_linear


@dataclass
class ModelArgs(BaseModelArgs):
    """The fields of config.json this architecture reads; `from_dict` drops the others."""

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    rms_norm_eps: float
    vocab_size: int
    num_key_value_heads: int
    max_position_embeddings: int
    head_dim: int
    tie_word_embeddings: bool
    rope_theta: float | None = None
    rope_scaling: dict[str, Any] | None = None
    rope_parameters: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        # transformers >= 5 writes rope_theta and rope_scaling nested under rope_parameters;
        # older configs have them at the top level. Accept both, as mlx-lm does.
        if self.rope_parameters:
            if self.rope_theta is None:
                self.rope_theta = self.rope_parameters.get("rope_theta")
            if self.rope_scaling is None:
                self.rope_scaling = self.rope_parameters
        if self.rope_theta is None:
            raise ValueError("rope_theta is missing from the model config.")


class Attention(nn.Module):
    # Set by kernels.decode_attention.enable_batch_decode_attention on NVIDIA GPUs.
    batch_decode_kernel: bool = False

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        dim = args.hidden_size
        self.n_heads = args.num_attention_heads
        # Grouped-query attention: fewer key/value heads than query heads. The fused attention
        # kernel broadcasts them, so they are never repeated here.
        self.n_kv_heads = args.num_key_value_heads
        # head_dim is explicit in Qwen3 configs and need not be hidden_size / n_heads.
        head_dim = args.head_dim
        self.scale = head_dim**-0.5

        self.q_proj = nn.Linear(dim, self.n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * head_dim, dim, bias=False)

        # The Qwen3 addition: per-head RMSNorm of queries and keys (not values).
        self.q_norm = nn.RMSNorm(head_dim, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(head_dim, eps=args.rms_norm_eps)

        # Plain RoPE unless config.json asks for a scaled variant (yarn, linear, dynamic, ...).
        # traditional=False: Hugging Face rotates the two halves of each head, not pairs.
        self.rope = initialize_rope(
            head_dim,
            base=args.rope_theta,
            traditional=False,
            scaling_config=args.rope_scaling,
            max_position_embeddings=args.max_position_embeddings,
        )

    def fuse_projections(self) -> bool:
        """Replaces q/k/v_proj by one `qkv_proj` (kernels/fused_projections.py)."""
        if "qkv_proj" in self:
            return False
        fused = concatenate_linears([self.q_proj, self.k_proj, self.v_proj])
        if fused is None:
            return False
        self.qkv_proj = fused
        del self.q_proj, self.k_proj, self.v_proj
        return True

    def __call__(
        self, x: mx.array, mask: mx.array | str | None = None, cache: Any = None
    ) -> mx.array:
        B, L, _ = x.shape

        # (B, L, heads * head_dim) -> (B, L, heads, head_dim). q_norm/k_norm normalise each
        # head over head_dim, after the split into heads and before RoPE.
        if "qkv_proj" in self:
            heads = self.qkv_proj(x).reshape(B, L, self.n_heads + 2 * self.n_kv_heads, -1)
            kv_end = self.n_heads + self.n_kv_heads
            queries = heads[:, :, : self.n_heads]
            keys, values = heads[:, :, self.n_heads : kv_end], heads[:, :, kv_end:]
        else:
            queries = self.q_proj(x).reshape(B, L, self.n_heads, -1)
            keys = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
            values = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1)

        # -> (B, heads, L, head_dim)
        queries = self.q_norm(queries).transpose(0, 2, 1, 3)
        keys = self.k_norm(keys).transpose(0, 2, 1, 3)
        values = values.transpose(0, 2, 1, 3)

        if cache is not None:
            # New tokens sit at positions offset..offset+L. A batched cache keeps one offset per
            # row (negative while a left-padded row is still in its padding), and RoPE takes it.
            queries = self.rope(queries, offset=cache.offset)
            keys = self.rope(keys, offset=cache.offset)
            keys, values = cache.update_and_fetch(keys, values)
        else:
            queries = self.rope(queries)
            keys = self.rope(keys)

        output = self.attend(queries, keys, values, mask, cache)
        output = output.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(output)

    def attend(
        self, queries: mx.array, keys: mx.array, values: mx.array, mask: Any, cache: Any
    ) -> mx.array:
        """Attention over (B, heads, L, head_dim) inputs, keys and values already cached (also
        called by kernels/compiled_decode.py, which compiles what comes before and after)."""
        if (
            self.batch_decode_kernel
            and type(cache) is BatchKVCache
            and decode_attention.decode_attention_supported(queries, keys)
        ):
            # A decode step of a left-padded batch: each row skips its padding (no mask).
            return decode_attention.batch_decode_attention(
                queries, keys, values, cache.left_padding, self.scale
            )
        # mlx-lm's helper picks the quantized path for a quantized KV cache, else the fused
        # kernel; the mask (causal, plus left padding for a batch) comes from the cache.
        return scaled_dot_product_attention(
            queries, keys, values, cache=cache, scale=self.scale, mask=mask
        )


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)

    def fuse_projections(self) -> bool:
        """Replaces gate/up_proj by one `gate_up_proj` (kernels/fused_projections.py)."""
        if "gate_up_proj" in self:
            return False
        fused = concatenate_gate_up(self.gate_proj, self.up_proj)
        if fused is None:
            return False
        self.gate_up_proj = fused
        del self.gate_proj, self.up_proj
        return True

    def __call__(self, x: mx.array) -> mx.array:
        if "gate_up_proj" in self:
            return self.down_proj(swiglu_linear(self.gate_up_proj, x))
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(
        self, x: mx.array, mask: mx.array | str | None = None, cache: Any = None
    ) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen3Model(nn.Module):
    """The decoder stack; weights live under `model.` as in the Hugging Face checkpoints."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.vocab_size = args.vocab_size
        self.num_hidden_layers = args.num_hidden_layers
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(
        self,
        inputs: mx.array,
        cache: list[Any] | None = None,
        input_embeddings: mx.array | None = None,
    ) -> mx.array:
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)

        if cache is None:
            cache = [None] * len(self.layers)
        # One mask serves every layer: all layers see the same positions. With a cache it is
        # the cache's own (BatchKVCache adds the left padding), else "causal" or none.
        mask = create_attention_mask(h, cache[0])

        for layer, layer_cache in zip(self.layers, cache, strict=True):
            h = layer(h, mask, layer_cache)

        return self.norm(h)


class Model(nn.Module):
    """What mlx-lm loads and generates with: token ids (B, L) in, logits (B, L, vocab) out."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Qwen3Model(args)
        # Small Qwen3 checkpoints tie the output projection to the embedding and ship no
        # lm_head weight; the large ones have their own.
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(
        self,
        inputs: mx.array,
        cache: list[Any] | None = None,
        input_embeddings: mx.array | None = None,
    ) -> mx.array:
        out = self.model(inputs, cache, input_embeddings)
        if self.args.tie_word_embeddings:
            # as_linear also works when the embedding is quantized (QuantizedEmbedding).
            return self.model.embed_tokens.as_linear(out)
        return self.lm_head(out)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Adapts checkpoint weights to this module's parameters before they are loaded."""
        if self.args.tie_word_embeddings:
            # Some tied checkpoints still carry a copy of lm_head; there is no module for it.
            weights.pop("lm_head.weight", None)
        # Rotary tables are computed, never loaded (some conversions keep inv_freq buffers).
        return {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}

    def shard(self, group: mx.distributed.Group | None = None) -> None:
        """Tensor parallelism for `mlx_lm.utils.sharded_load`: split heads and MLP columns."""
        from mlx.nn.layers.distributed import shard_linear

        group = group or mx.distributed.init()
        n = group.size()
        for layer in self.model.layers:
            attn = layer.self_attn
            # Each rank computes a slice of the heads; o_proj sums the slices back.
            attn.q_proj = shard_linear(attn.q_proj, "all-to-sharded", group=group)
            attn.k_proj = shard_linear(attn.k_proj, "all-to-sharded", group=group)
            attn.v_proj = shard_linear(attn.v_proj, "all-to-sharded", group=group)
            attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
            attn.n_heads //= n
            attn.n_kv_heads //= n

            mlp = layer.mlp
            mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
            mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=group)
            mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)

    @property
    def layers(self) -> list[TransformerBlock]:
        # make_prompt_cache builds one KV cache per entry of this list.
        return self.model.layers
