"""Serving GGUF files (llama.cpp's format) with mlx-lm's model classes.

`mx.load` reads GGUF natively: F32 and F16 tensors arrive as they are, and Q4_0, Q4_1 and Q8_0
arrive as MLX affine-quantized weight/scales/biases with group size 32, which MLX's quantized
layers run directly. This module adds what serving needs on top of that:

- an HF-style config built from the `{arch}.*` metadata,
- mlx-lm parameter names for llama, qwen2 and qwen3, with llama's q/k rows un-permuted
  (llama.cpp's converter interleaves them for its rope kernel),
- a Hugging Face fast tokenizer rebuilt from the vocabulary, merges and chat template that the
  file carries, so no tokenizer files are needed.

The file's tensor types are read from its header before `mx.load` runs, because MLX fails on
most other types with a message that names neither tensor nor type, silently drops a few, and
gets Q4_K wrong (see `_UNSUPPORTED_REASONS`).
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import mmap
import re
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm import tokenizer_utils
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers import models as tokenizer_models
from transformers import PreTrainedTokenizerFast

from .registry import model_registry

logger = logging.getLogger(__name__)

__all__ = [
    "GGUFHeader",
    "GGUFTensorInfo",
    "UnsupportedGGUFError",
    "gguf_config",
    "gguf_tokenizer",
    "load_gguf",
    "openblas_loaded",
    "preferred_dtype",
    "read_gguf_header",
]


class UnsupportedGGUFError(ValueError):
    """The file uses a tensor type, architecture or tokenizer this loader cannot serve."""


# ggml's tensor type ids (ggml.h, `enum ggml_type`).
GGML_TYPE_NAMES: dict[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    6: "Q5_0",
    7: "Q5_1",
    8: "Q8_0",
    9: "Q8_1",
    10: "Q2_K",
    11: "Q3_K",
    12: "Q4_K",
    13: "Q5_K",
    14: "Q6_K",
    15: "Q8_K",
    16: "IQ2_XXS",
    17: "IQ2_XS",
    18: "IQ3_XXS",
    19: "IQ1_S",
    20: "IQ4_NL",
    21: "IQ3_S",
    22: "IQ2_S",
    23: "IQ4_XS",
    24: "I8",
    25: "I16",
    26: "I32",
    27: "I64",
    28: "F64",
    29: "IQ1_M",
    30: "BF16",
    34: "TQ1_0",
    35: "TQ2_0",
    39: "MXFP4",
}

# Types `mx.load` returns as MLX affine-quantized triples (group size 32), and their bits.
QUANTIZED_TYPES: dict[str, int] = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
GGUF_GROUP_SIZE = 32
# Types that arrive as plain arrays. Q2_K and Q6_K are dequantized to float16 by MLX (checked
# against gguf-py's reference dequantization); BF16 is read from the file here, because MLX
# converts it to float16, which overflows past 65504.
FLOAT_TYPES = ("F32", "F16", "BF16", "Q2_K", "Q6_K")
SUPPORTED_TYPES = (*FLOAT_TYPES, *QUANTIZED_TYPES)

_UNSUPPORTED_REASONS: dict[str, str] = {
    # mlx 0.32's gguflib applies each 64-weight pair's first sub-block scale and min to both
    # halves, so half of every Q4_K tensor comes out wrong without any error.
    "Q4_K": "MLX's GGUF reader dequantizes it incorrectly",
}
_DEFAULT_REASON = "MLX's GGUF reader cannot load it"

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")


# --- the header ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # MLX order: GGUF lists dimensions innermost first
    type_id: int
    offset: int  # absolute offset of the data in the file

    @property
    def type_name(self) -> str:
        return GGML_TYPE_NAMES.get(self.type_id, f"type {self.type_id}")


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]


_SCALAR_FORMATS: dict[int, str] = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NUMPY_DTYPES: dict[int, str] = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING, _ARRAY = 8, 9
_LENGTH = struct.Struct("<Q")


class _Reader:
    def __init__(self, buffer: mmap.mmap) -> None:
        self.buffer = buffer
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        start = self.pos
        self.pos += length
        return self.buffer[start : self.pos].decode("utf-8", errors="replace")

    def strings(self, count: int) -> list[str]:
        # The hot loop of the header (vocabularies of 150k tokens and as many merges).
        buffer, pos, out = self.buffer, self.pos, []
        unpack_length = _LENGTH.unpack_from
        for _ in range(count):
            (length,) = unpack_length(buffer, pos)
            pos += 8
            out.append(buffer[pos : pos + length].decode("utf-8", errors="replace"))
            pos += length
        self.pos = pos
        return out

    def value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if item_type == _STRING:
                return self.strings(count)
            if item_type in _NUMPY_DTYPES:
                dtype = np.dtype(_NUMPY_DTYPES[item_type])
                items = np.frombuffer(self.buffer, dtype, count, self.pos)
                self.pos += count * dtype.itemsize
                return items.tolist()
            return [self.value(item_type) for _ in range(count)]
        if value_type in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[value_type])
        raise UnsupportedGGUFError(f"unknown GGUF metadata value type {value_type}")


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Metadata and tensor directory of a GGUF file (versions 2 and 3), without tensor data."""
    path = Path(path)
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        reader = _Reader(buffer)
        if buffer[:4] != b"GGUF":
            raise UnsupportedGGUFError(f"{path} is not a GGUF file")
        reader.pos = 4
        version = reader.unpack("<I")
        if version not in (2, 3):
            raise UnsupportedGGUFError(
                f"{path}: GGUF version {version} is not supported (2 and 3 are; a huge number "
                "means a big-endian file)"
            )
        tensor_count, kv_count = reader.unpack("<Q"), reader.unpack("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = reader.string()
            metadata[key] = reader.value(reader.unpack("<I"))
        infos = []
        for _ in range(tensor_count):
            name = reader.string()
            ndim = reader.unpack("<I")
            dims = struct.unpack_from(f"<{ndim}Q", buffer, reader.pos)
            reader.pos += 8 * ndim
            type_id, offset = reader.unpack("<I"), reader.unpack("<Q")
            infos.append((name, tuple(reversed(dims)), type_id, offset))
        alignment = int(metadata.get("general.alignment", 32))
        data_start = -(-reader.pos // alignment) * alignment
    tensors = {
        name: GGUFTensorInfo(name, shape, type_id, data_start + offset)
        for name, shape, type_id, offset in infos
    }
    return GGUFHeader(version, metadata, tensors)


def _check_tensor_types(path: Path, header: GGUFHeader) -> None:
    unsupported: dict[str, list[str]] = {}
    for info in header.tensors.values():
        if info.type_name not in SUPPORTED_TYPES:
            unsupported.setdefault(info.type_name, []).append(info.name)
    if not unsupported:
        return
    lines = [
        f"tensor {names[0]!r}{f' (and {len(names) - 1} more)' if len(names) > 1 else ''} has "
        f"type {type_name}, which is not supported: "
        f"{_UNSUPPORTED_REASONS.get(type_name, _DEFAULT_REASON)}"
        for type_name, names in unsupported.items()
    ]
    raise UnsupportedGGUFError(
        f"{path.name}: " + "; ".join(lines) + f". Supported tensor types: "
        f"{', '.join(SUPPORTED_TYPES)}. Use a Q8_0, Q4_0 or F16 GGUF of the model (llama.cpp's "
        "llama-quantize writes them), or an MLX-converted copy."
    )


# --- the config ----------------------------------------------------------------------------


def gguf_config(header: GGUFHeader) -> dict[str, Any]:
    """An HF-style config dict (as in a model folder's config.json) from the GGUF metadata."""
    meta = header.metadata
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedGGUFError(
            f"GGUF architecture {arch!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise UnsupportedGGUFError(f"GGUF metadata lacks {arch}.{key}")
        return value

    hidden_size = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    embedding = header.tensors.get("token_embd.weight")
    vocab_size = meta.get(f"{arch}.vocab_size")
    if vocab_size is None:
        vocab_size = embedding.shape[0] if embedding else len(meta["tokenizer.ggml.tokens"])
    config: dict[str, Any] = {
        "model_type": arch,
        "hidden_size": hidden_size,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", hidden_size // heads)),
        "rms_norm_eps": _float32(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32(get("rope.freq_base", 10000.0)),
        "vocab_size": int(vocab_size),
        "max_position_embeddings": int(get("context_length")),
        "tie_word_embeddings": "output.weight" not in header.tensors,
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in header.tensors
        config["mlp_bias"] = "blk.0.ffn_up.bias" in header.tensors
    if (rope_scaling := _rope_scaling(arch, meta)) is not None:
        config["rope_scaling"] = rope_scaling
    for key in ("bos", "eos", "padding"):
        if (token_id := meta.get(f"tokenizer.ggml.{key}_token_id")) is not None:
            config["pad_token_id" if key == "padding" else f"{key}_token_id"] = int(token_id)
    return config


def _float32(value: float) -> float:
    # GGUF stores these as float32: 1e-05 reads back as 9.999999747378752e-06 otherwise.
    return float(str(np.float32(value)))


def _rope_scaling(arch: str, meta: dict[str, Any]) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    factor = float(meta.get(f"{arch}.rope.scaling.factor", 1.0))
    if kind == "linear":
        return {"type": "linear", "factor": factor}
    if kind == "yarn":
        scaling: dict[str, Any] = {"type": "yarn", "factor": factor}
        if (original := meta.get(f"{arch}.rope.scaling.original_context_length")) is not None:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    raise UnsupportedGGUFError(f"rope scaling type {kind!r} is not supported")


def _llama3_rope_scaling(factors: mx.array, config: dict[str, Any]) -> dict[str, Any]:
    """The llama3 `rope_scaling` that llama.cpp's converter turned into `rope_freqs.weight`.

    The tensor holds per-frequency divisors; mlx-lm needs the parameters they came from, so
    the Llama 3.1/3.2 values are assumed and checked against the tensor.
    """
    observed = np.array(factors.astype(mx.float32))
    dims = config["head_dim"]
    base = config["rope_theta"]
    scaling = {
        "rope_type": "llama3",
        "factor": float(observed.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    # Llama3RoPE's frequencies divided by the unscaled ones, as in mlx-lm's rope_utils.
    freqs = base ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    wavelens = 2 * np.pi * freqs
    factor = scaling["factor"]
    low, high, old = 1.0, 4.0, 8192.0
    smooth = (old / wavelens - low) / (high - low)
    expected = np.where(wavelens > old / low, factor, 1.0)
    medium = (wavelens > old / high) & (wavelens < old / low)
    expected = np.where(medium, 1 / ((1 - smooth) / factor + smooth), expected)
    if observed.shape != expected.shape or not np.allclose(observed, expected, rtol=1e-3):
        raise UnsupportedGGUFError(
            "rope_freqs.weight does not match llama3 rope scaling with low/high frequency "
            "factors 1/4 and an original context of 8192, the only form supported"
        )
    return scaling


# --- the weights ---------------------------------------------------------------------------

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)")


def _mlx_module_name(gguf_module: str) -> str | None:
    if gguf_module in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_module]
    match = _BLOCK_PATTERN.fullmatch(gguf_module)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}"
    return None


def _unpermute_rows(array: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's `permute`, which interleaves the two rope halves of each head's rows.

    Rows are independent in the quantized layout too (groups run along a row), so the same
    row order applies to a packed weight, its scales and its biases.
    """
    rows = array.shape[0]
    return (
        array.reshape(n_heads, rows // n_heads // 2, 2, *array.shape[1:])
        .swapaxes(1, 2)
        .reshape(array.shape)
    )


def _read_bf16(path: Path, info: GGUFTensorInfo) -> mx.array:
    count = int(np.prod(info.shape))
    raw = np.fromfile(path, dtype="<u2", count=count, offset=info.offset)
    return mx.array(raw).view(mx.bfloat16).reshape(info.shape)


def _load_weights(
    path: Path, header: GGUFHeader, config: dict[str, Any]
) -> tuple[dict[str, mx.array], dict[str, int]]:
    """The weights under mlx-lm names, and the bits of each quantized module."""
    raw = mx.load(str(path))
    assert isinstance(raw, dict)
    weights: dict[str, mx.array] = {}
    bits: dict[str, int] = {}
    unknown: list[str] = []
    for key, array in raw.items():
        gguf_module, _, suffix = key.rpartition(".")
        info = header.tensors.get(
            f"{gguf_module}.weight" if suffix in ("scales", "biases") else key
        )
        if key == "rope_freqs.weight" and config["model_type"] == "llama":
            config["rope_scaling"] = _llama3_rope_scaling(array, config)
            continue
        module = _mlx_module_name(gguf_module)
        if module is None or info is None:
            unknown.append(key)
            continue
        if info.type_name == "BF16":
            array = _read_bf16(path, info)
        if info.type_name in QUANTIZED_TYPES:
            bits[module] = QUANTIZED_TYPES[info.type_name]
        if config["model_type"] == "llama" and module.endswith(("q_proj", "k_proj")):
            heads = config[
                "num_attention_heads" if module.endswith("q_proj") else "num_key_value_heads"
            ]
            array = _unpermute_rows(array, heads)
        weights[f"{module}.{suffix}"] = array
    if unknown:
        raise UnsupportedGGUFError(
            f"{path.name}: tensors with no counterpart in mlx-lm's {config['model_type']}: "
            + ", ".join(sorted(unknown)[:8])
        )
    return weights, bits


def _quantization_config(bits: dict[str, int]) -> dict[str, Any]:
    """mlx-lm's `quantization` entry: the common bits, and the modules that differ."""
    common = Counter(bits.values()).most_common(1)[0][0]
    quantization: dict[str, Any] = {"group_size": GGUF_GROUP_SIZE, "bits": common, "mode": "affine"}
    for module, module_bits in sorted(bits.items()):
        if module_bits != common:
            quantization[module] = {"group_size": GGUF_GROUP_SIZE, "bits": module_bits}
    return quantization


def _dequantize(
    weights: dict[str, mx.array], bits: dict[str, int], dtype: mx.Dtype
) -> dict[str, mx.array]:
    out: dict[str, mx.array] = {}
    for key, array in weights.items():
        module, _, suffix = key.rpartition(".")
        if module in bits and suffix in ("scales", "biases"):
            continue  # folded into the weight below
        if module in bits and suffix == "weight":
            # In float32, so scale * q + bias rounds once, in the target dtype.
            array = mx.dequantize(
                array,
                weights[f"{module}.scales"].astype(mx.float32),
                weights[f"{module}.biases"].astype(mx.float32),
                group_size=GGUF_GROUP_SIZE,
                bits=bits[module],
            )
        out[key] = array.astype(dtype)
    return out


# --- the tokenizer -------------------------------------------------------------------------

# `tokenizer.ggml.pre` names the pre-tokenizer of the original tokenizer.json (llama.cpp's
# llama-vocab.cpp keeps the same table of regexes).
_GPT2_STYLE = ("gpt-2", "gpt2", "default", "smollm", "starcoder", "refact", "codeshell")
_DIGITS_FIRST = ("smollm", "starcoder", "refact", "codeshell")
_SPLIT_REGEXES = {
    "qwen2": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
    "llama-bpe": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
}
# llama.cpp's token types (llama.h, `enum llama_token_type`).
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 2, 3, 4


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in _SPLIT_REGEXES:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_REGEXES[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre not in _GPT2_STYLE:
        logger.warning("GGUF pre-tokenizer %r is unknown here; splitting text as GPT-2 does", pre)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_FIRST:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def _split_merge(merge: str) -> tuple[str, str]:
    # As llama.cpp does: the separator is the first space after the first character.
    cut = merge.find(" ", 1)
    return merge[:cut], merge[cut + 1 :]


def _post_processor(
    tokens: list[str], bos: int | None, eos: int | None, add_bos: bool, add_eos: bool
) -> processors.PostProcessor:
    prefix = [bos] if add_bos and bos is not None else []
    suffix = [eos] if add_eos and eos is not None else []
    if not prefix and not suffix:
        return processors.ByteLevel(trim_offsets=False)
    first = " ".join([*(tokens[i] for i in prefix), "$A", *(tokens[i] for i in suffix)])
    second = " ".join(
        [*(f"{tokens[i]}:1" for i in prefix), "$B:1", *(f"{tokens[i]}:1" for i in suffix)]
    )
    return processors.TemplateProcessing(
        single=first,
        pair=f"{first} {second}",
        special_tokens=[(tokens[i], i) for i in {*prefix, *suffix}],
    )


def _chat_template(metadata: dict[str, Any]) -> str | dict[str, str] | None:
    # Files may carry named templates too (`tokenizer.chat_template.tool_use`).
    prefix = "tokenizer.chat_template."
    named = {k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)}
    default = metadata.get("tokenizer.chat_template")
    if not named:
        return default
    return {"default": default, **named} if default is not None else named


def gguf_tokenizer(metadata: dict[str, Any]) -> TokenizerWrapper:
    """The byte-level BPE tokenizer described by `tokenizer.ggml.*`, as mlx-lm's wrapper."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedGGUFError(
            f"GGUF tokenizer model {kind!r} is not supported; only byte-level BPE ('gpt2') is"
        )
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    types: list[int] = metadata.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens)
    pre = metadata.get("tokenizer.ggml.pre", "default")

    def token_id(key: str) -> int | None:
        value = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

    bos, eos, pad, unk = (token_id(k) for k in ("bos", "eos", "padding", "unknown"))

    backend = Tokenizer(
        tokenizer_models.BPE(
            vocab={token: i for i, token in enumerate(tokens)},
            merges=[_split_merge(m) for m in metadata.get("tokenizer.ggml.merges", [])],
            fuse_unk=False,
            byte_fallback=False,
            # Llama 3's tokenizer.json sets it: whole words in the vocabulary skip merging.
            ignore_merges=pre == "llama-bpe",
        )
    )
    if pre == "qwen2":
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = _post_processor(
        tokens,
        bos,
        eos,
        bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
    )
    # Control tokens are special (skipped when decoding with skip_special_tokens); user-defined
    # ones, such as Qwen3's <think>, are matched whole but kept in decoded text.
    backend.add_tokens(
        [
            AddedToken(
                token,
                special=types[i] in (_TOKEN_CONTROL, _TOKEN_UNKNOWN),
                normalized=False,
            )
            for i, token in enumerate(tokens)
            if types[i] in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNKNOWN)
        ]
    )

    context = next(
        (v for k, v in metadata.items() if k.endswith(".context_length") and isinstance(v, int)),
        None,
    )
    special_kwargs = {
        name: tokens[index]
        for name, index in (
            ("bos_token", bos),
            ("eos_token", eos),
            ("pad_token", pad),
            ("unk_token", unk),
        )
        if index is not None
    }
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=_chat_template(metadata),
        clean_up_tokenization_spaces=False,
        **({"model_max_length": context} if context else {}),
        **special_kwargs,
    )

    # Chat models may end a turn with a token other than the eos (Llama 3's <|eot_id|>).
    eos_ids = [i for i in (eos, token_id("eot"), token_id("eom")) if i is not None]
    tool_parser = tool_start = tool_end = None
    # mlx-lm's loader infers the tool-call format from the chat template; do the same.
    infer_tool_parser = getattr(tokenizer_utils, "_infer_tool_parser", None)
    if infer_tool_parser is not None and (parser_type := infer_tool_parser(tokenizer)):
        tool_module = importlib.import_module(f"mlx_lm.tool_parsers.{parser_type}")
        tool_parser = tool_module.parse_tool_call
        tool_start, tool_end = tool_module.tool_call_start, tool_module.tool_call_end
    return TokenizerWrapper(
        tokenizer,
        BPEStreamingDetokenizer,
        eos_token_ids=eos_ids,
        tool_parser=tool_parser,
        tool_call_start=tool_start,
        tool_call_end=tool_end,
    )


# --- loading -------------------------------------------------------------------------------


def openblas_loaded() -> bool:
    """Whether MLX's BLAS calls go to OpenBLAS (preloaded) rather than the wheel's own BLAS.

    Only a library in the global symbol namespace interposes MLX's `cblas_*` calls; numpy's
    bundled OpenBLAS is loaded locally, with suffixed symbols, and does not count.
    """
    try:
        return hasattr(ctypes.CDLL(None), "openblas_get_config")
    except OSError:  # no dlopen(NULL) on this platform
        return False


def preferred_dtype(
    path: str | Path,
    device: mx.Device | mx.DeviceType | None = None,
    max_bytes: int = 4 << 30,
) -> mx.Dtype | None:
    """The `dtype` to pass to `load_gguf` for speed on `device` (the default device if None).

    On MLX's CPU backend, quantized and float16 matmuls are slow (bench/NOTES.md, "Built-in
    model on CPU"): with OpenBLAS preloaded float32 is fastest by far (23x the prefill rate of
    the Q4_1 weights, 1.75x the decode rate); with the wheel's own BLAS bfloat16 is (2.4x the
    prefill rate, decode on par). Dequantized weights cost 4 (float32) or 2 (bfloat16) bytes a
    parameter: past `max_bytes`, the next smaller form is picked, then the file's own (None),
    which is also the answer on a GPU.
    """
    device = device or mx.default_device()
    if (device if isinstance(device, mx.DeviceType) else device.type) != mx.DeviceType.cpu:
        return None
    header = read_gguf_header(path)
    parameters = sum(int(np.prod(info.shape)) for info in header.tensors.values())
    candidates = [mx.float32, mx.bfloat16] if openblas_loaded() else [mx.bfloat16]
    return next((d for d in candidates if d.size * parameters <= max_bytes), None)


def load_gguf(
    path: str | Path, dtype: mx.Dtype | None = None
) -> tuple[nn.Module, TokenizerWrapper, dict[str, Any]]:
    """Loads a GGUF file as an mlx-lm model, its tokenizer and an HF-style config.

    `dtype=None` keeps the weights as the file stores them: Q4_0/Q4_1/Q8_0 tensors stay
    quantized (MLX affine, group size 32), float tensors keep their dtype. A float `dtype`
    dequantizes every tensor to it instead: on MLX's CPU backend that is much faster, at the
    cost of memory; `preferred_dtype` picks the form.
    """
    path = Path(path)
    if dtype is not None and not mx.issubdtype(dtype, mx.floating):
        raise ValueError(f"dtype must be a floating type, not {dtype}")
    header = read_gguf_header(path)
    _check_tensor_types(path, header)
    config = gguf_config(header)
    weights, bits = _load_weights(path, header, config)

    model_class, args_class = model_registry.get_model_classes(config)
    model = model_class(args_class.from_dict(config))
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    bits = {module: b for module, b in bits.items() if f"{module}.scales" in weights}

    if dtype is not None:
        weights = _dequantize(weights, bits, dtype)
    elif bits:
        config["quantization"] = _quantization_config(bits)
        if "model.embed_tokens" in bits:
            # A quantized lookup returns the scales' dtype: float16 would round each embedding,
            # where llama.cpp dequantizes rows to float32 (GGUF norms are float32 anyway).
            for suffix in ("scales", "biases"):
                key = f"model.embed_tokens.{suffix}"
                weights[key] = weights[key].astype(mx.float32)
        nn.quantize(
            model,
            group_size=GGUF_GROUP_SIZE,
            class_predicate=lambda name, _module: (
                {"group_size": GGUF_GROUP_SIZE, "bits": bits[name]} if name in bits else False
            ),
        )
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    model.eval()

    tokenizer = gguf_tokenizer(header.metadata)
    return model, tokenizer, config
