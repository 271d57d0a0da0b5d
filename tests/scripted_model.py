"""A model that always answers with a given token script: exact outputs over real HTTP.

`scripted_lm` maps each input token to the next token of its script (any token not in the
script starts it; the last one is followed by end-of-sequence), so a test can force token
sequences that split multibyte characters, stop strings, think tags or tool calls. It runs
through the real loading path (a model file registered with `--custom-model`), the real
tokenizer and real KV caches (batched ones too): only the weights are a lookup table.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import mlx.core as mx
from model_factory import copy_qwen3_tokenizer

SCRIPTED_MODEL_TYPE = "scripted_lm"
VOCAB_SIZE = 151936
EOS_TOKEN_ID = 151645

SCRIPTED_MODEL_SOURCE = '''\
"""scripted_lm: next token = table[current token]; a single-head cache keeps batching real."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs
from mlx_lm.models.cache import KVCache


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int


class Model(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.table = mx.zeros((args.vocab_size,), dtype=mx.int32)

    def __call__(self, inputs: mx.array, cache: Any = None, **_: Any) -> mx.array:
        if cache is not None:
            # Store one value per position so cache lengths, padding and filtering are real.
            b, length = inputs.shape
            kv = inputs.astype(mx.float32).reshape(b, 1, length, 1)
            cache[0].update_and_fetch(kv, kv)
        following = self.table[inputs]
        vocab = mx.arange(self.args.vocab_size)
        return mx.where(following[..., None] == vocab, 100.0, -100.0)

    def make_cache(self) -> list[Any]:
        return [KVCache()]

    @property
    def layers(self) -> list[Any]:
        return [self]
'''


def write_scripted_model(destination: Path, script: list[int]) -> tuple[Path, Path]:
    """Writes `scripted_lm.py` and a model folder answering `script`; returns both paths."""
    if len(set(script)) != len(script):
        raise ValueError("a script's tokens must be distinct")
    destination.mkdir(parents=True, exist_ok=True)
    model_file = destination / f"{SCRIPTED_MODEL_TYPE}.py"
    model_file.write_text(SCRIPTED_MODEL_SOURCE)
    model_dir = destination / "model"
    model_dir.mkdir(exist_ok=True)
    table = [script[0]] * VOCAB_SIZE
    for current, following in itertools.pairwise(script):
        table[current] = following
    table[script[-1]] = EOS_TOKEN_ID
    mx.save_safetensors(
        str(model_dir / "model.safetensors"), {"table": mx.array(table, dtype=mx.int32)}
    )
    config = {
        "model_type": SCRIPTED_MODEL_TYPE,
        "vocab_size": VOCAB_SIZE,
        "eos_token_id": EOS_TOKEN_ID,
    }
    (model_dir / "config.json").write_text(json.dumps(config))
    copy_qwen3_tokenizer(model_dir)
    return model_file, model_dir
