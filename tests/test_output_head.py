"""A prompt's last token runs in its body's forward pass: logits at chosen positions only.

`OutputHead` gathers one position per row in front of the model's output head (an untied
`lm_head`, or a tied embedding's `as_linear`); these tests hold it to the model's own full logits
on the real tiny Qwen3, quantized or not, and hold the engine to mlx-lm's tokens with one forward
pass per prompt group where the head is found and the two-pass prefill where it is not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.cache import make_prompt_cache
from model_factory import build_tiny_qwen3
from test_engine import arrive_together, engine_on, reference_tokens

from mlx_llm_server.engine.batch import merge_caches
from mlx_llm_server.engine.output_head import OutputHead
from mlx_llm_server.models.loader import load


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen3(tmp_path_factory.mktemp("untied"), seed=3, tie_word_embeddings=False)


def loaded_model(folder: Path, quantized: bool = False) -> nn.Module:
    model = load(str(folder)).model
    assert model is not None
    if quantized:
        nn.quantize(model, group_size=32, bits=4)
    return model


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "4-bit"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gathered_logits_match_the_full_ones_and_the_model_is_left_as_it_was(
    tiny_qwen3_dir: Path, untied_dir: Path, tied: bool, quantized: bool
) -> None:
    model = loaded_model(tiny_qwen3_dir if tied else untied_dir, quantized)
    head_before = model.get("lm_head")
    head = OutputHead.find(model)
    assert head is not None and head.tied == tied
    # Three rows of different lengths, right-padded, each read at its own last token.
    rows = [list(range(100, 109)), list(range(2000, 2004)), list(range(7000, 7007))]
    lengths = [len(r) for r in rows]
    longest = max(lengths)
    padded = mx.array([r + [0] * (longest - len(r)) for r in rows])
    full = model(padded, cache=make_prompt_cache(model))
    cache = merge_caches([make_prompt_cache(model) for _ in rows])
    gathered = head.logits_at(padded, cache, [n - 1 for n in lengths])
    assert gathered.shape == (3, full.shape[-1])
    for row, length in enumerate(lengths):
        expected = full[row, length - 1]
        scale = mx.abs(expected).max().item()
        assert mx.abs(gathered[row] - expected).max().item() <= 1e-4 * scale
    assert cache[0].keys.shape[2] >= longest  # every token went into the cache
    # Nothing of the gather stays behind: the same head module, no shadowing attribute.
    assert model.get("lm_head") is head_before
    if tied:
        assert "as_linear" not in vars(model["model"]["embed_tokens"])
    assert model(padded[:1, :3]).shape == (1, 3, full.shape[-1])


class _HeadElsewhere(nn.Module):
    """A model whose output head is neither `lm_head` nor the embedding's `as_linear`."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.model = inner.model
        self.output = nn.Linear(inner.args.hidden_size, 32, bias=False)
        self.layers = inner.layers

    def __call__(self, inputs: mx.array, cache: Any = None) -> mx.array:
        return self.output(self.model(inputs, cache))


def test_a_head_that_is_not_found_falls_back(tiny_qwen3_dir: Path) -> None:
    model = _HeadElsewhere(loaded_model(tiny_qwen3_dir))
    assert OutputHead.find(model) is None
    # The model is left able to run as before the probe.
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, 32)


class _CountedBlock(nn.Module):
    """Counts the forward passes through the model's first transformer block."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.block(*args, **kwargs)


@pytest.mark.parametrize("one_pass", [True, False], ids=["head-found", "two-passes"])
def test_prompts_prefill_exactly_in_one_pass_a_group(tiny_qwen3_dir: Path, one_pass: bool) -> None:
    """Three short prompts share a step (one forward pass with the head found, two without) and
    a long one is chunked, its last chunk sampling; every sequence is mlx-lm's own."""
    engine = engine_on(tiny_qwen3_dir, max_running=8, prefill_chunk=64)
    assert engine._head is not None
    if not one_pass:
        engine._head = None
    assert engine.model is not None
    counted = _CountedBlock(engine.model["model"]["layers"][0])
    engine.model["model"]["layers"][0] = counted
    short = [list(range(400 + 50 * i, 420 + 50 * i)) for i in range(3)]

    def prefill_passes(prompts: list[list[int]]) -> int:
        """Forward passes of prompt work while the prompts generate one token each."""
        counted.calls, steps = 0, engine.decode_steps
        outputs.extend(arrive_together(engine, prompts, 1))
        return counted.calls - (engine.decode_steps - steps)  # less the decode steps'

    outputs: list[list[int]] = []
    assert prefill_passes(short) == (1 if one_pass else 2)
    long = list(range(3000, 3150))  # 150 tokens: chunks of 64, 64 and 22
    assert prefill_passes([long]) == (3 if one_pass else 4)
    engine.model["model"]["layers"][0] = counted.block
    for prompt, output in zip([*short, long], outputs, strict=True):
        assert output == reference_tokens(tiny_qwen3_dir, prompt, 1)
    longer = arrive_together(engine, [*short, long], 9)
    for prompt, output in zip([*short, long], longer, strict=True):
        assert output == reference_tokens(tiny_qwen3_dir, prompt, 9)
