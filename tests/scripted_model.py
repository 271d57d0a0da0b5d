"""A model that always answers with a given token script: exact outputs over real HTTP.

`scripted_lm` answers every chat prompt with its script: the token after position t is
script[t - (last `<|im_start|>` position) - 2], so after `<|im_start|>assistant\n` it writes
script[0], script[1], ... and then end-of-sequence. The position comes from the token ids it
keeps in its KV cache, so batching, left padding, filtering and the prefix cache are all real.
It runs through the real loading path (a model file registered with `--custom-model`) with the
real tokenizer: only the weights are a lookup table. Tests use it to force token sequences that
split multibyte characters, stop strings, think tags or tool calls.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from model_factory import copy_qwen3_tokenizer

SCRIPTED_MODEL_TYPE = "scripted_lm"
VOCAB_SIZE = 151936
EOS_TOKEN_ID = 151645
IM_START_ID = 151644

SCRIPTED_MODEL_SOURCE = '''\
"""scripted_lm: writes its script after the last `<|im_start|>` and the role line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs
from mlx_lm.models.cache import KVCache

IM_START_ID = 151644
EOS_TOKEN_ID = 151645


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int
    script_length: int


class Model(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.script = mx.zeros((args.script_length,), dtype=mx.int32)

    def __call__(self, inputs: mx.array, cache: Any = None, **_: Any) -> mx.array:
        b, length = inputs.shape
        ids = inputs.astype(mx.float32).reshape(b, 1, length, 1)
        if cache is not None:
            ids, _ = cache[0].update_and_fetch(ids, ids)
        seen = ids[:, 0, :, 0].astype(mx.int32)  # (B, T): every token so far, this chunk last
        positions = mx.arange(seen.shape[1])
        starts = mx.where(seen == IM_START_ID, positions, -1)
        last_start = mx.cummax(starts, axis=1)[:, -length:]
        index = positions[-length:] - last_start - 2
        inside = (index >= 0) & (index < self.args.script_length)
        following = mx.where(
            inside, self.script[mx.clip(index, 0, self.args.script_length - 1)], EOS_TOKEN_ID
        )
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
    destination.mkdir(parents=True, exist_ok=True)
    model_file = destination / f"{SCRIPTED_MODEL_TYPE}.py"
    model_file.write_text(SCRIPTED_MODEL_SOURCE)
    model_dir = destination / "model"
    model_dir.mkdir(exist_ok=True)
    weights = {"script": mx.array(script, dtype=mx.int32)}
    mx.save_safetensors(str(model_dir / "model.safetensors"), weights)
    config = {
        "model_type": SCRIPTED_MODEL_TYPE,
        "vocab_size": VOCAB_SIZE,
        "script_length": len(script),
        "eos_token_id": EOS_TOKEN_ID,
    }
    (model_dir / "config.json").write_text(json.dumps(config))
    copy_qwen3_tokenizer(model_dir)
    return model_file, model_dir
