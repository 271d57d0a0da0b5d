"""The reference Qwen3 architecture and the model registry.

Our `custom_models/qwen3.py` must compute what mlx-lm's own `qwen3` computes on the same
weights (plain, cached, batched and quantized), and the registry must hand it, or a file a user
registers, to mlx-lm's loader.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import batch_generate, generate_step, stream_generate
from mlx_lm.models import qwen3 as mlx_lm_qwen3
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache
from mlx_lm.utils import load_model, load_tokenizer
from model_factory import TINY_QWEN3_CONFIG
from toy_model import TOY_MODEL_TYPE, ToyModelPaths, write_toy_model, write_toy_model_file

from mlx_llm_server.custom_models import qwen3 as our_qwen3
from mlx_llm_server.engine.output_head import OutputHead
from mlx_llm_server.models.registry import ModelRegistry, model_registry

# float32 on the CPU: both implementations run the same kernels in the same order, so they
# should agree to rounding; this bound still catches any real difference (a missing norm,
# a wrong RoPE offset or mask moves logits by far more).
ATOL = 1e-5

# A small vocabulary keeps the numerical tests fast; loading tests use the real one.
SMALL_CONFIG: dict[str, Any] = {**TINY_QWEN3_CONFIG, "vocab_size": 512}

CONFIG_VARIANTS: dict[str, dict[str, Any]] = {
    "tied": SMALL_CONFIG,
    "untied": {**SMALL_CONFIG, "tie_word_embeddings": False},
    # transformers >= 5 nests rope_theta and the scaling under rope_parameters.
    "rope_parameters_yarn": {
        **{k: v for k, v in SMALL_CONFIG.items() if k != "rope_theta"},
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 1000000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 1024,
        },
    },
    "rope_scaling_linear": {**SMALL_CONFIG, "rope_scaling": {"type": "linear", "factor": 2.0}},
}


def build_pair(config: dict[str, Any], seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """mlx-lm's Qwen3 with random weights, and ours with the very same weights."""
    mx.random.seed(seed)
    reference = mlx_lm_qwen3.Model(mlx_lm_qwen3.ModelArgs.from_dict(config))
    ours = our_qwen3.Model(our_qwen3.ModelArgs.from_dict(config))
    # strict: every parameter name and shape must match the mlx-lm (= checkpoint) layout.
    ours.load_weights(list(tree_flatten(reference.parameters())), strict=True)
    mx.eval(reference.parameters(), ours.parameters())
    return reference, ours


def assert_close(actual: mx.array, expected: mx.array, atol: float = ATOL) -> None:
    assert actual.shape == expected.shape
    diff = mx.abs(actual - expected).max().item()
    assert diff <= atol, f"max abs difference {diff:.3g} > {atol:.1g}"


PROMPT = mx.array([[3, 17, 101, 7, 255, 42, 9, 300]])


@pytest.fixture(params=list(CONFIG_VARIANTS), ids=list(CONFIG_VARIANTS))
def config(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "rope_parameters_yarn" and not hasattr(
        mlx_lm_qwen3.ModelArgs, "rope_parameters"
    ):
        pytest.skip("the reference (mlx-lm < 0.32, on Python 3.10) reads no rope_parameters")
    return CONFIG_VARIANTS[request.param]


# ------------------------------------------------------------------ numerical equality


def test_parameter_names_match_mlx_lm(config: dict[str, Any]) -> None:
    reference, ours = build_pair(config)
    ref_shapes = {k: v.shape for k, v in tree_flatten(reference.parameters())}
    our_shapes = {k: v.shape for k, v in tree_flatten(ours.parameters())}
    assert our_shapes == ref_shapes
    assert "model.layers.0.self_attn.q_norm.weight" in our_shapes
    assert "model.layers.0.self_attn.q_proj.bias" not in our_shapes
    assert ("lm_head.weight" in our_shapes) == (not config["tie_word_embeddings"])


def test_prompt_logits_match(config: dict[str, Any]) -> None:
    reference, ours = build_pair(config)
    expected = reference(PROMPT)
    actual = ours(PROMPT)
    assert actual.shape == (1, PROMPT.shape[1], config["vocab_size"])
    assert_close(actual, expected)
    # The engine's one-pass prefill finds this module's head, tied or not.
    assert OutputHead.find(ours) is not None


def test_input_embeddings_match() -> None:
    reference, ours = build_pair(SMALL_CONFIG)
    embeddings = reference.model.embed_tokens(PROMPT)
    assert_close(ours(PROMPT, input_embeddings=embeddings), reference(PROMPT))


def test_kv_cache_decode_matches(config: dict[str, Any]) -> None:
    reference, ours = build_pair(config)
    ref_cache, our_cache = make_prompt_cache(reference), make_prompt_cache(ours)
    assert len(our_cache) == config["num_hidden_layers"]

    expected, actual = reference(PROMPT, cache=ref_cache), ours(PROMPT, cache=our_cache)
    assert_close(actual, expected)
    tokens = PROMPT
    for _ in range(4):
        # Greedy decoding, one token at a time, on the reference's choice.
        next_token = mx.argmax(expected[:, -1:, :], axis=-1)
        tokens = mx.concatenate([tokens, next_token], axis=1)
        expected = reference(next_token, cache=ref_cache)
        actual = ours(next_token, cache=our_cache)
        assert_close(actual, expected)
    assert our_cache[0].offset == tokens.shape[1]

    # And the cache changes nothing: the last step equals a full pass without one.
    assert_close(actual[:, -1], ours(tokens)[:, -1], atol=1e-4)


def left_padded_batch(prompts: list[list[int]], pad: int = 0) -> tuple[mx.array, list[int]]:
    width = max(len(p) for p in prompts)
    padding = [width - len(p) for p in prompts]
    return mx.array([[pad] * n + p for n, p in zip(padding, prompts, strict=True)]), padding


def test_left_padded_batch_matches(config: dict[str, Any]) -> None:
    reference, ours = build_pair(config)
    prompts = [[5, 9, 33, 2, 100, 7], [11, 4], [250, 1, 8, 60]]
    batch, padding = left_padded_batch(prompts)

    def batch_cache() -> list[BatchKVCache]:
        return [BatchKVCache(padding) for _ in range(config["num_hidden_layers"])]

    ref_cache, our_cache = batch_cache(), batch_cache()
    expected, actual = reference(batch, cache=ref_cache), ours(batch, cache=our_cache)
    for row, n in enumerate(padding):
        # Logits at padding positions are garbage in both; only real tokens must agree.
        assert_close(actual[row, n:], expected[row, n:])

    steps = []
    for _ in range(3):
        next_tokens = mx.argmax(expected[:, -1:, :], axis=-1)
        steps.append(next_tokens)
        expected = reference(next_tokens, cache=ref_cache)
        actual = ours(next_tokens, cache=our_cache)
        assert_close(actual, expected)

    # Padding is masked out: each row equals the same prompt run alone, unpadded.
    generated = mx.concatenate(steps, axis=1)
    for row, prompt in enumerate(prompts):
        alone = mx.concatenate([mx.array([prompt]), generated[row : row + 1]], axis=1)
        assert_close(actual[row, -1], ours(alone)[0, -1], atol=1e-4)


def test_4bit_quantized_matches(config: dict[str, Any]) -> None:
    reference, ours = build_pair(config)
    # Same float weights, same quantization: identical packed weights and scales.
    nn.quantize(reference, group_size=64, bits=4)
    nn.quantize(ours, group_size=64, bits=4)
    assert isinstance(ours.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert isinstance(ours.model.embed_tokens, nn.QuantizedEmbedding)

    assert_close(ours(PROMPT), reference(PROMPT))
    ref_cache, our_cache = make_prompt_cache(reference), make_prompt_cache(ours)
    expected, actual = reference(PROMPT, cache=ref_cache), ours(PROMPT, cache=our_cache)
    for _ in range(3):
        next_token = mx.argmax(expected[:, -1:, :], axis=-1)
        expected = reference(next_token, cache=ref_cache)
        actual = ours(next_token, cache=our_cache)
        assert_close(actual, expected)


def test_shard_on_one_process_changes_nothing() -> None:
    """`shard` swaps in the distributed layers; with a group of one they compute the same."""
    _, ours = build_pair(SMALL_CONFIG)
    before = ours(PROMPT)
    ours.shard(mx.distributed.init())
    assert_close(ours(PROMPT), before)


def test_batch_generate_matches_mlx_lm(tiny_qwen3_dir: Path) -> None:
    """mlx-lm's continuous batching engine runs ours exactly as it runs its own."""
    ours, _ = load_model(tiny_qwen3_dir, get_model_classes=model_registry.get_model_classes)
    reference, _ = load_model(tiny_qwen3_dir)
    tokenizer = load_tokenizer(tiny_qwen3_dir)
    prompts = [tokenizer.encode(text) for text in ("Hello there", "A longer prompt, to pad")]

    def run(model: nn.Module) -> list[list[int]]:
        response = batch_generate(model, tokenizer, prompts, max_tokens=5, return_token_ids=True)
        assert response.token_ids is not None
        return response.token_ids

    assert run(ours) == run(reference)


# ------------------------------------------------------------------ loading via the registry


def test_registry_serves_qwen3_with_our_module() -> None:
    assert "qwen3" in model_registry.model_types()
    model_class, args_class = model_registry.get_model_classes({"model_type": "qwen3"})
    assert model_class is our_qwen3.Model
    assert args_class is our_qwen3.ModelArgs


def test_load_model_builds_ours(tiny_qwen3_dir: Path) -> None:
    model, config = load_model(tiny_qwen3_dir, get_model_classes=model_registry.get_model_classes)
    assert isinstance(model, our_qwen3.Model)
    assert config["model_type"] == "qwen3"
    reference, _ = load_model(tiny_qwen3_dir)
    assert isinstance(reference, mlx_lm_qwen3.Model)
    assert_close(model(PROMPT), reference(PROMPT))


def test_load_quantized_checkpoint(tmp_path: Path) -> None:
    """A checkpoint as mlx_lm.convert -q writes it: packed weights and a `quantization` key."""
    config = {**SMALL_CONFIG, "quantization": {"group_size": 64, "bits": 4}}
    reference, _ = build_pair(SMALL_CONFIG)
    nn.quantize(reference, group_size=64, bits=4)
    mx.save_safetensors(
        str(tmp_path / "model.safetensors"), dict(tree_flatten(reference.parameters()))
    )
    (tmp_path / "config.json").write_text(json.dumps(config))

    model, _ = load_model(tmp_path, get_model_classes=model_registry.get_model_classes)
    assert isinstance(model, our_qwen3.Model)
    assert isinstance(model.model.layers[1].mlp.down_proj, nn.QuantizedLinear)
    assert_close(model(PROMPT), reference(PROMPT))


def test_sanitize_drops_tied_head_and_rotary_buffers() -> None:
    model = our_qwen3.Model(our_qwen3.ModelArgs.from_dict(SMALL_CONFIG))
    weights = {
        "lm_head.weight": mx.zeros((1,)),
        "model.layers.0.self_attn.rotary_emb.inv_freq": mx.zeros((1,)),
        "model.norm.weight": mx.zeros((1,)),
    }
    assert list(model.sanitize(weights)) == ["model.norm.weight"]


def test_model_args_need_rope_theta() -> None:
    config = {k: v for k, v in SMALL_CONFIG.items() if k != "rope_theta"}
    with pytest.raises(ValueError, match="rope_theta"):
        our_qwen3.ModelArgs.from_dict(config)


# ------------------------------------------------------------------ a user's architecture


@pytest.fixture(scope="module")
def toy_paths(tmp_path_factory: pytest.TempPathFactory) -> ToyModelPaths:
    return write_toy_model(tmp_path_factory.mktemp("toy"))


def test_toy_model_registers_loads_and_generates(toy_paths: ToyModelPaths) -> None:
    # toy_lm.py uses `from __future__ import annotations` on its ModelArgs dataclass, which
    # only imports if register_file puts the module in sys.modules while it runs.
    registry = ModelRegistry()
    assert registry.register_file(toy_paths.model_file) == TOY_MODEL_TYPE
    assert TOY_MODEL_TYPE in registry.model_types()

    model, config = load_model(toy_paths.model_dir, get_model_classes=registry.get_model_classes)
    assert type(model).__name__ == "Model"
    assert type(model).__module__ == f"mlx_llm_server_user_{TOY_MODEL_TYPE}"
    assert config["model_type"] == TOY_MODEL_TYPE

    prompt = mx.array([1, 2, 3, 4])
    tokens = [int(token) for token, _ in generate_step(prompt, model, max_tokens=6)]
    assert len(tokens) == 6
    assert all(0 <= t < config["vocab_size"] for t in tokens)

    # Greedy decoding is deterministic, and with a cache equals decoding without one.
    again = [int(token) for token, _ in generate_step(prompt, model, max_tokens=6)]
    assert again == tokens
    sequence = prompt.tolist()
    for _ in range(6):
        sequence.append(int(mx.argmax(model(mx.array([sequence]))[0, -1]).item()))
    assert sequence[4:] == tokens


def test_toy_model_streams_text_and_batches(toy_paths: ToyModelPaths) -> None:
    registry = ModelRegistry()
    registry.register_file(toy_paths.model_file)
    model, _ = load_model(toy_paths.model_dir, get_model_classes=registry.get_model_classes)
    tokenizer = load_tokenizer(toy_paths.model_dir)

    responses = list(stream_generate(model, tokenizer, "Hello", max_tokens=4))
    assert 1 <= len(responses) <= 4
    assert responses[-1].generation_tokens == len(responses)

    prompts = [tokenizer.encode("Hi"), tokenizer.encode("Something much longer than that")]
    batched = batch_generate(model, tokenizer, prompts, max_tokens=3, return_token_ids=True)
    assert batched.token_ids is not None
    for prompt, token_ids in zip(prompts, batched.token_ids, strict=True):
        alone = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=3)]
        # A row stops early at an end-of-sequence token, which the batch does not return.
        assert token_ids == alone[: len(token_ids)]


def test_register_file_with_global_registry(tmp_path: Path) -> None:
    model_file = write_toy_model_file(tmp_path)
    try:
        model_registry.register_file(model_file)
        model_class, _ = model_registry.get_model_classes({"model_type": TOY_MODEL_TYPE})
        assert model_class.__name__ == "Model"
    finally:
        model_registry.unregister(TOY_MODEL_TYPE)
    assert TOY_MODEL_TYPE not in model_registry.model_types()


# ------------------------------------------------------------------ registry errors


def test_register_module_without_model_raises() -> None:
    registry = ModelRegistry()
    module = types.ModuleType("half_done")
    module.ModelArgs = our_qwen3.ModelArgs  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="Model"):
        registry.register("half_done", module)
    module = types.ModuleType("no_args")
    module.Model = our_qwen3.Model  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="ModelArgs"):
        registry.register("no_args", module)
    assert registry.model_types() == []


def test_register_file_without_model_raises(tmp_path: Path) -> None:
    path = tmp_path / "not_a_model.py"
    path.write_text("VALUE = 1\n")
    registry = ModelRegistry()
    with pytest.raises(TypeError, match="defines no Model"):
        registry.register_file(path)
    assert registry.model_types() == []
    assert "mlx_llm_server_user_not_a_model" not in sys.modules


def test_unknown_model_type_falls_through_to_mlx_lm() -> None:
    registry = ModelRegistry()
    with pytest.raises(ValueError, match="not supported"):
        registry.get_model_classes({"model_type": "no_such_architecture"})
    # A type mlx-lm knows and the registry does not is mlx-lm's own.
    model_class, _ = registry.get_model_classes({"model_type": "llama"})
    assert model_class.__module__ == "mlx_lm.models.llama"
    # And with the registry emptied, qwen3 is mlx-lm's again.
    model_class, _ = registry.get_model_classes({"model_type": "qwen3"})
    assert model_class is mlx_lm_qwen3.Model
