"""The command line as a user meets it: help, defaults, and models that cannot be found."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mlx_llm_server.cli import DEFAULT_MODEL, DEFAULT_PORT, build_parser, model_specs
from mlx_llm_server.model_setup import COMPILED_DECODE_ROWS_CUDA, compiled_decode_rows


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mlx_llm_server", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_defaults_are_the_specified_ones() -> None:
    args = build_parser().parse_args([])
    [spec] = model_specs(args)
    assert spec.name == spec.model_id == DEFAULT_MODEL == "mlx-community/Qwen3-8B-4bit"
    assert args.port == DEFAULT_PORT == 9044
    assert args.host == "127.0.0.1"
    assert args.staged_matmul_rows == 33  # the staged kernel from 33 rows, by layer width
    assert args.fused_head_rope and args.fused_epilogues  # both NVIDIA-only, on by default
    assert not build_parser().parse_args(["--no-fused-epilogues"]).fused_epilogues
    assert args.folded_norm_rows == 8  # faster at 1, 2 and 8 rows since it got cheaper
    assert build_parser().parse_args(["--folded-norm-rows", "0"]).folded_norm_rows == 0
    # Handing the device a step's blocks in groups: off (one stream over HTTP lost with it).
    assert args.submit_every_blocks == 0
    assert args.event_loop == "auto"  # uvicorn's choice: uvloop where installed
    assert build_parser().parse_args(["--event-loop", "asyncio"]).event_loop == "asyncio"
    assert build_parser().parse_args(["--submit-every-blocks", "6"]).submit_every_blocks == 6
    # Dense copies of the weights cost ~3.5x their memory: only when asked for.
    assert not args.dense_weights and args.dense_weights_rows == 33
    dense = build_parser().parse_args(["--dense-weights", "--dense-weights-rows", "16"])
    assert dense.dense_weights and dense.dense_weights_rows == 16


def test_dense_weight_rows_must_be_positive() -> None:
    result = run_cli("--dense-weights-rows", "0")
    assert result.returncode == 2
    assert "--dense-weights-rows: must be at least 1, not 0" in result.stderr
    result = run_cli("--submit-every-blocks", "-1")
    assert result.returncode == 2
    assert "--submit-every-blocks: must be at least 0, not -1" in result.stderr


def test_dense_weights_that_would_crowd_the_device_stop_start_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mlx.core as mx

    import mlx_llm_server.kernels.quantized_linear as ql
    from mlx_llm_server.model_setup import check_dense_weights_fit

    monkeypatch.setattr(ql, "dense_weight_bytes", lambda model: 30 * 10**9)
    monkeypatch.setattr(mx, "get_active_memory", lambda: 10 * 10**9)
    monkeypatch.setattr(mx, "device_info", lambda: {"total_memory": 48 * 10**9})
    with pytest.raises(ValueError, match=r"--dense-weights needs 30\.0 GB more device memory"):
        check_dense_weights_fit(object())
    monkeypatch.setattr(mx, "device_info", lambda: {"total_memory": 80 * 10**9})
    check_dense_weights_fit(object())  # 40 of 80 GB: fits
    monkeypatch.setattr(mx, "device_info", lambda: {"device_name": "cpu"})
    check_dense_weights_fit(object())  # no size known: not checked


def test_compiled_decode_rows_default_by_device() -> None:
    parser = build_parser()
    args = parser.parse_args([])
    assert compiled_decode_rows(args, cuda_gpu=True) == COMPILED_DECODE_ROWS_CUDA == 64
    assert compiled_decode_rows(args, cuda_gpu=False) == 0  # the CPU and Apple silicon: stock
    assert compiled_decode_rows(parser.parse_args(["--compiled-decode"]), cuda_gpu=False) is None
    off = parser.parse_args(["--compiled-decode-rows", "0"])
    assert compiled_decode_rows(off, cuda_gpu=True) == 0
    assert compiled_decode_rows(parser.parse_args(["--compiled-decode-rows", "8"]), False) == 8


def test_help_lists_the_options() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for option in ("--model-name", "--port", "--host", "--log-level", "--max-tokens"):
        assert option in result.stdout


def test_missing_local_model_is_one_sentence_and_non_zero() -> None:
    result = run_cli("--model-name", "/no/such/model/folder")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "/no/such/model/folder" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_hub_model_offline_says_how_to_start_the_built_in_one() -> None:
    result = run_cli("--model-name", "mlx-community/not-cached-anywhere-4bit")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "smollm2" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_several_models_with_ids() -> None:
    args = build_parser().parse_args(
        ["--model-name", "small=smollm2", "--model-name", "/models/qwen", "--load-on-demand"]
    )
    specs = model_specs(args)
    assert [(s.model_id, s.name, s.lazy) for s in specs] == [
        ("small", "smollm2", False),
        ("/models/qwen", "/models/qwen", True),
    ]


def test_cuda_defaults_apply_on_cuda_only_and_yield_to_the_user(monkeypatch: object) -> None:
    import mlx.core as mx

    from mlx_llm_server import model_setup as cli

    mp = monkeypatch  # pytest's MonkeyPatch
    for name in ("MLX_CUDA_USE_CUDNN_SDPA", "MLX_MAX_OPS_PER_BUFFER"):
        mp.delenv(name, raising=False)  # type: ignore[attr-defined]
    mp.setattr(mx.cuda, "is_available", lambda: False)  # type: ignore[attr-defined]
    cli.apply_cuda_defaults()
    assert "MLX_CUDA_USE_CUDNN_SDPA" not in os.environ
    assert "MLX_MAX_OPS_PER_BUFFER" not in os.environ  # Metal and CPU keep MLX's own
    mp.setattr(mx.cuda, "is_available", lambda: True)  # type: ignore[attr-defined]
    cli.apply_cuda_defaults()
    assert os.environ["MLX_CUDA_USE_CUDNN_SDPA"] == "0"
    assert os.environ["MLX_MAX_OPS_PER_BUFFER"] == "10"
    mp.setenv("MLX_CUDA_USE_CUDNN_SDPA", "1")  # type: ignore[attr-defined]
    mp.setenv("MLX_MAX_OPS_PER_BUFFER", "30")  # type: ignore[attr-defined]
    cli.apply_cuda_defaults()
    assert os.environ["MLX_CUDA_USE_CUDNN_SDPA"] == "1"
    assert os.environ["MLX_MAX_OPS_PER_BUFFER"] == "30"


def test_buffer_cache_is_capped_never_raised() -> None:
    import mlx.core as mx

    from mlx_llm_server import model_setup as cli

    own = mx.set_cache_limit(1 << 40)  # MLX's limit as it stood, and room to cap
    try:
        assert cli.limit_buffer_cache(cli.DEFAULT_BUFFER_CACHE_GB) == 4 * 2**30
        assert mx.set_cache_limit(1 << 20) == 4 * 2**30
        # Below the cap already (MLX's CPU default is tens of MB): left as it is.
        assert cli.limit_buffer_cache(4.0) == 1 << 20
        assert mx.set_cache_limit(own) == 1 << 20
    finally:
        mx.set_cache_limit(own)


def test_prefill_chunk_is_larger_on_cuda_unless_given(monkeypatch: pytest.MonkeyPatch) -> None:
    import mlx.core as mx

    from mlx_llm_server import cli

    monkeypatch.setattr(mx.cuda, "is_available", lambda: False)
    assert cli.engine_config(build_parser().parse_args([])).prefill_chunk == 512
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    assert cli.engine_config(build_parser().parse_args([])).prefill_chunk == 2048
    given = build_parser().parse_args(["--prefill-chunk", "256"])
    assert cli.engine_config(given).prefill_chunk == 256


def test_engine_process_default_by_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import mlx.core as mx

    from mlx_llm_server.cli import engine_process

    parser = build_parser()
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    assert engine_process(parser.parse_args([]))
    assert not engine_process(parser.parse_args(["--no-engine-process"]))
    monkeypatch.setattr(mx.cuda, "is_available", lambda: False)
    assert not engine_process(parser.parse_args([]))  # a CPU, Apple silicon: one process
    assert engine_process(parser.parse_args(["--engine-process"]))
