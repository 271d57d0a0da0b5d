from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from model_factory import build_tiny_qwen3, qwen3_tokenizer_dir


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Qwen3 with the real Qwen3 tokenizer, saved as a model folder."""
    return build_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="session")
def qwen3_tokenizer_path() -> Path:
    return qwen3_tokenizer_dir()


@pytest.fixture
def fused_kernel_rows(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The accelerated 4-bit layers as on an NVIDIA GPU, the fused kernel's MLX reference
    standing in for the CUDA kernel (bench/ checks the kernel on the device); the list gets the
    rows of every call the kernel takes."""
    import mlx_llm_server.kernels.quantized_linear as ql

    rows: list[int] = []

    def stand_in(x, *args, **options):  # type: ignore[no-untyped-def]
        rows.append(x.size // x.shape[-1])
        return ql.reference_fused_matmul(x, *args, **options)

    monkeypatch.setattr(ql, "_cuda_build", lambda: True)
    monkeypatch.setattr(ql, "_on_gpu", lambda: True)
    monkeypatch.setattr(ql, "fused_quantized_matmul", stand_in)
    yield rows
    ql._dense_min_rows = ql.DENSE_MIN_ROWS  # `keep_dense_weights` sets it


from collections.abc import Iterator  # noqa: E402

from server_process import ServerProcess, serving  # noqa: E402

TINY_CONTEXT = 1024


@pytest.fixture(scope="session")
def tiny_server(
    tiny_qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """The real server on a real port, serving the tiny Qwen3 as `tiny-qwen3`."""
    log = tmp_path_factory.mktemp("logs") / "tiny-server.log"
    with serving(tiny_server_args(tiny_qwen3_dir), log) as server:
        yield server


def tiny_server_args(tiny_qwen3_dir: Path, *options: str) -> list[str]:
    """The options of `tiny_server`, and any more."""
    return [
        "--model-name",
        str(tiny_qwen3_dir),
        "--served-model-name",
        "tiny-qwen3",
        "--context-length",
        str(TINY_CONTEXT),
        "--max-tokens",
        "64",
        "--log-level",
        "warning",
        *options,
    ]


SCRIPT_TEXT = "Hello 쀍龘🎉 한국어 日本語の文字 中文 𠜎 STOP done."


@pytest.fixture(scope="session")
def script_tokens(qwen3_tokenizer_path: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer_path)
    return list(tokenizer.encode(SCRIPT_TEXT, add_special_tokens=False))


def serve_script(
    folder: Path, tokens: list[int], model_id: str, *options: str
) -> Iterator[ServerProcess]:
    """Runs the real server on a scripted model (a registered model file) answering `tokens`."""
    from scripted_model import write_scripted_model

    model_file, model_dir = write_scripted_model(folder, tokens)
    with serving(
        [
            "--model-name",
            str(model_dir),
            "--served-model-name",
            model_id,
            "--custom-model",
            str(model_file),
            "--log-level",
            "warning",
            *options,
        ],
        folder / "server.log",
    ) as server:
        yield server


@pytest.fixture(scope="session")
def scripted_server(
    script_tokens: list[int], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """The real server answering every prompt with SCRIPT_TEXT, through a registered model file."""
    yield from serve_script(tmp_path_factory.mktemp("scripted"), script_tokens, "scripted")


AGENT_SCRIPT = (
    "<think>\nThe user wants the weather, so I call the tool.\n</think>\n\n"
    "Let me look that up.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
    "</tool_call>"
)


@pytest.fixture(scope="session")
def agent_server(
    qwen3_tokenizer_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """The real server whose model thinks, says a sentence, then calls `get_weather`."""
    from transformers import AutoTokenizer

    tokens = list(AutoTokenizer.from_pretrained(qwen3_tokenizer_path).encode(AGENT_SCRIPT))
    folder = tmp_path_factory.mktemp("agent")
    yield from serve_script(folder, tokens, "agent", "--max-running", "8")
