"""A toy architecture that mlx-lm does not know, for tests of user-registered model files.

`write_toy_model(folder)` writes the model file `toy_lm.py` (serving `model_type: toy_lm`),
and a model folder with config.json, random weights and the real Qwen3 tokenizer. Register the
file (`model_registry.register_file(paths.model_file)`, or `--custom-model` on the CLI) and
load the folder like any other model. Generated text is noise: the weights are random.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import mlx.core as mx
from mlx.utils import tree_flatten
from model_factory import copy_qwen3_tokenizer

TOY_MODEL_TYPE = "toy_lm"

# Covers every id of the Qwen3 tokenizer, special tokens included.
TOY_CONFIG: dict[str, object] = {
    "model_type": TOY_MODEL_TYPE,
    "vocab_size": 151936,
    "hidden_size": 16,
    "intermediate_size": 32,
    "rope_theta": 10000.0,
    "eos_token_id": 151645,
}

# The model file itself: embedding, one single-head attention layer (so mlx-lm's KV caches,
# batched ones included, work unchanged), one MLP, and an output head tied to the embedding.
TOY_MODEL_SOURCE = '''\
"""toy_lm: embedding, one attention layer, one MLP, tied output head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs, create_attention_mask, scaled_dot_product_attention


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    rope_theta: float = 10000.0


class Block(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        dim = args.hidden_size
        self.norm = nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.rope = nn.RoPE(dim, base=args.rope_theta)
        self.up = nn.Linear(dim, args.intermediate_size, bias=False)
        self.down = nn.Linear(args.intermediate_size, dim, bias=False)

    def __call__(self, x: mx.array, mask: Any, cache: Any) -> mx.array:
        B, L, D = x.shape
        q, k, v = mx.split(self.qkv(self.norm(x)).reshape(B, L, 1, 3 * D), 3, axis=-1)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # one head: (B, 1, L, D)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        a = scaled_dot_product_attention(q, k, v, cache=cache, scale=D**-0.5, mask=mask)
        h = x + self.out(a.transpose(0, 2, 1, 3).reshape(B, L, D))
        return h + self.down(nn.gelu(self.up(h)))


class Model(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.embed = nn.Embedding(args.vocab_size, args.hidden_size)
        self.block = Block(args)
        self.norm = nn.RMSNorm(args.hidden_size)

    def __call__(
        self, inputs: mx.array, cache: Any = None, input_embeddings: mx.array | None = None
    ) -> mx.array:
        h = input_embeddings if input_embeddings is not None else self.embed(inputs)
        layer_cache = cache[0] if cache else None
        h = self.block(h, create_attention_mask(h, layer_cache), layer_cache)
        return self.embed.as_linear(self.norm(h))

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        return weights

    @property
    def layers(self) -> list[nn.Module]:
        return [self.block]
'''


@dataclass(frozen=True)
class ToyModelPaths:
    model_file: Path  # toy_lm.py: pass to register_file / --custom-model
    model_dir: Path  # config.json, model.safetensors, tokenizer files


def write_toy_model_file(destination: Path) -> Path:
    """Writes only `toy_lm.py` into `destination`."""
    destination.mkdir(parents=True, exist_ok=True)
    path = destination / f"{TOY_MODEL_TYPE}.py"
    path.write_text(TOY_MODEL_SOURCE)
    return path


def write_toy_model(destination: Path, seed: int = 0) -> ToyModelPaths:
    """Writes `destination/toy_lm.py` and the model folder `destination/model`."""
    model_file = write_toy_model_file(destination)
    model_dir = destination / "model"
    model_dir.mkdir(parents=True, exist_ok=True)

    # The weights come from the model file itself, so their names and shapes always match it.
    module = _import_file(model_file)
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(TOY_CONFIG))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(model_dir / "model.safetensors"), weights)
    (model_dir / "config.json").write_text(json.dumps(TOY_CONFIG, indent=2))
    copy_qwen3_tokenizer(model_dir)
    return ToyModelPaths(model_file=model_file, model_dir=model_dir)


def _import_file(path: Path) -> ModuleType:
    name = f"toy_model_source_{id(path)}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module
