"""From a model name on the command line to a model and tokenizer in memory.

A name is a built-in alias (`smollm2`), a `.gguf` file, a local folder in Hugging Face layout,
or a hub id (downloaded once into the hub cache, as mlx-lm does). Architectures resolve through
`model_registry` first, so registered modules take precedence over mlx-lm's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_tokenizer
from mlx_lm.utils import load_config
from mlx_lm.utils import load_model as mlx_lm_load_model

from .builtin import BuiltinModelError, resolve_builtin
from .gguf import gguf_config, gguf_tokenizer, load_gguf, preferred_dtype, read_gguf_header
from .registry import model_registry

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT_LENGTH = 4096
# What a model folder needs besides weights; the same set mlx-lm downloads.
_HUB_PATTERNS = [
    "*.json",
    "model*.safetensors",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
]


class ModelLoadError(Exception):
    """A model could not be found or loaded; the message is one sentence for the user."""


@dataclass
class LoadedModel:
    name: str
    model: nn.Module | None  # None where the weights live in another process
    tokenizer: TokenizerWrapper
    config: dict[str, Any]
    context_length: int
    vocab_size: int
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)


def resolve_model_path(name: str) -> Path:
    """The local path holding `name`, downloading from the hub when needed."""
    try:
        builtin = resolve_builtin(name)
    except BuiltinModelError as error:
        raise ModelLoadError(str(error)) from None
    if builtin is not None:
        return builtin
    path = Path(name).expanduser()
    if path.exists():
        return path
    if name.endswith(".gguf") or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelLoadError(f"Model '{name}' was not found: no such file or folder.")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=_HUB_PATTERNS))
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(
            f"Model '{name}' is not a local folder and could not be downloaded from the "
            f"Hugging Face hub ({reason}); offline, the built-in model runs with "
            "`mlx-llm-server --model-name smollm2`."
        ) from None


def load(name: str, *, context_length: int | None = None) -> LoadedModel:
    """The model's weights, tokenizer and configuration."""
    return _load(name, context_length, weights=True)


def load_tokenizer_only(name: str, *, context_length: int | None = None) -> LoadedModel:
    """What `load` gives without the weights (`model` is None): for a process that serves HTTP
    while another one runs the model."""
    return _load(name, context_length, weights=False)


def _load(name: str, context_length: int | None, weights: bool) -> LoadedModel:
    path = resolve_model_path(name)
    model: nn.Module | None = None
    try:
        if path.is_file() and path.suffix == ".gguf":
            if weights:
                # On a CPU, dequantized weights are faster (float32 with OpenBLAS, else bfloat16).
                model, tokenizer, config = load_gguf(path, dtype=preferred_dtype(path))
            else:
                header = read_gguf_header(path)
                config, tokenizer = gguf_config(header), gguf_tokenizer(header.metadata)
        else:
            if weights:
                model, config = mlx_lm_load_model(
                    path, get_model_classes=model_registry.get_model_classes
                )
            else:
                config = load_config(path)
            tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(f"Model '{name}' could not be loaded from {path}: {error}") from None
    text_config = config.get("text_config", {})
    vocab_size = int(
        config.get("vocab_size") or text_config.get("vocab_size") or len(tokenizer.vocab)
    )
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        config=config,
        context_length=context_length or model_context_length(config, tokenizer),
        vocab_size=vocab_size,
        eos_token_ids=frozenset(tokenizer.eos_token_ids),
    )


def model_context_length(config: dict[str, Any], tokenizer: TokenizerWrapper) -> int:
    for source in (config, config.get("text_config", {})):
        for key in ("max_position_embeddings", "max_sequence_length", "n_ctx", "seq_length"):
            value = source.get(key)
            if isinstance(value, int) and value > 0:
                return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10_000_000:
        return limit
    return DEFAULT_CONTEXT_LENGTH
