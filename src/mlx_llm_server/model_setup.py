"""Building a served model on the thread (or process) that will run it.

`build_model` loads the weights and puts this server's layers and kernels in place; the engine
thread runs it, in this process or in an engine process of its own (`engine/remote.py`), whose
`ChildSetup` first sets that process up as `cli.main` sets up the server's.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

from .engine.engine import EngineModel
from .engine.remote import ChildModel, ModelFacts
from .models.loader import LoadedModel, load, resolve_model_path
from .models.registry import model_registry
from .pool import ModelSpec, estimate_nbytes

logger = logging.getLogger(__name__)


def check_dense_weights_fit(model: object) -> None:
    """Stops start-up with one sentence when `--dense-weights` would not leave the device a
    quarter of its memory (for the KV caches and a step's temporaries)."""
    import mlx.core as mx

    from .kernels.quantized_linear import dense_weight_bytes

    info = mx.device_info()
    total = info.get("memory_size", info.get("total_memory"))  # Metal's name, CUDA's
    if not isinstance(total, int):
        return
    needed = dense_weight_bytes(model)  # type: ignore[arg-type]
    if mx.get_active_memory() + needed > 0.75 * total:
        raise ValueError(
            f"--dense-weights needs {needed / 1e9:.1f} GB more device memory; with the model's "
            f"{mx.get_active_memory() / 1e9:.1f} GB that leaves less than a quarter of the "
            f"device's {total / 1e9:.1f} GB: run without it"
        )


# Decode steps of up to this many rows (the default batch: all) replay compiled blocks on NVIDIA
# GPUs. Over HTTP on H200s they took one-row steps from 6.6 to 5.0 ms and from 8.2-8.5 to
# 7.3-7.7 (with the fused kernel on every layer), and 64-row steps from 22.1 to 19.8 ms on one
# machine, no change (22.3 ms) on another (bench/NOTES.md).
COMPILED_DECODE_ROWS_CUDA = 64


def compiled_decode_rows(args: argparse.Namespace, cuda_gpu: bool) -> int | None:
    """The largest decode batch that runs compiled: None for every batch, 0 for none."""
    if args.compiled_decode:
        return None
    if args.compiled_decode_rows is not None:
        return max(args.compiled_decode_rows, 0)
    return COMPILED_DECODE_ROWS_CUDA if cuda_gpu else 0


# MLX settings for its CUDA backend, read once at first use; a user's own values win.
# cuDNN's attention builds a graph for every new prompt shape on the request path (0.1-1.4 s
# each on an H100); without it, prompts take the composed path and new lengths cost nothing
# extra. MLX hands the device its queued kernels every 30 operations on an H100/H200; every 10
# lets the device start a step's first layers while the host still queues the rest: 64-stream
# decode steps 16-17 -> 12-13 ms over HTTP, one stream within its run-to-run spread (bench/NOTES.md).
CUDA_DEFAULTS = {"MLX_CUDA_USE_CUDNN_SDPA": "0", "MLX_MAX_OPS_PER_BUFFER": "10"}


def apply_cuda_defaults() -> None:
    import mlx.core as mx

    if mx.cuda.is_available():
        for name, value in CUDA_DEFAULTS.items():
            os.environ.setdefault(name, value)


# MLX keeps freed buffers for reuse up to nearly the whole device. A serving batch frees buffers
# of a new size whenever a row joins or leaves (every layer's KV cache is rebuilt), so that
# cache filled an 80 GB GPU in a minute of 64 users and allocations failed; at 4 GB it holds a
# step's temporaries and gives back the rest.
DEFAULT_BUFFER_CACHE_GB = 4.0


def limit_buffer_cache(gigabytes: float) -> int:
    """Caps MLX's buffer cache at `gigabytes` unless its own limit is lower; returns the limit."""
    import mlx.core as mx

    wanted = int(gigabytes * 2**30)
    previous = mx.set_cache_limit(wanted)
    if previous < wanted:
        mx.set_cache_limit(previous)
        return previous
    return wanted


def build_model(spec: ModelSpec, args: argparse.Namespace) -> tuple[LoadedModel, EngineModel]:
    """Loads `spec`'s model with the server's options; call it on the engine thread."""
    from .engine.batch import evaluate
    from .kernels.compiled_decode import compile_decode_blocks, set_submit_every
    from .kernels.decode_attention import enable_batch_decode_attention
    from .kernels.fused_projections import fuse_projections
    from .kernels.quantized_linear import (
        accelerate_quantized_layers,
        cuda_gpu_is_default,
        keep_dense_weights,
        set_folded_norm_rows,
        set_fused_epilogues,
        set_one_row_fused,
        set_staged_min_rows,
    )
    from .text.grammar import apply_grammar_masks

    path = resolve_model_path(spec.name)  # downloads show the hub's progress bars
    logger.info(
        "%s: loading %s (%.2f GB of weights)",
        spec.model_id,
        path,
        estimate_nbytes(path) / 1e9,
    )
    model = load(spec.name, context_length=args.context_length)
    # One matmul for q/k/v and one for gate/up on NVIDIA GPUs (models that offer it:
    # Qwen3), gate/up rows laid out for the SwiGLU epilogue where it is on.
    set_fused_epilogues(args.fused_epilogues)
    set_folded_norm_rows(args.folded_norm_rows)
    if fuse_projections(model.model):
        logger.info("%s: q/k/v and gate/up projections fused", spec.model_id)
    # Faster batched 4-bit matmuls on NVIDIA GPUs; a no-op elsewhere.
    set_staged_min_rows(args.staged_matmul_rows)
    replaced = accelerate_quantized_layers(model.model)
    if replaced:
        logger.info("%s: %d quantized layers use the batched GPU path", spec.model_id, replaced)
    if args.dense_weights and not replaced:
        logger.warning("--dense-weights applies to 4-bit models on NVIDIA GPUs only")
    elif args.dense_weights:
        check_dense_weights_fit(model.model)
        kept = keep_dense_weights(model.model, args.dense_weights_rows)
        logger.info(
            "%s: dense weights (%.2f GB) for matmuls of %d rows or more",
            spec.model_id,
            kept / 1e9,
            args.dense_weights_rows,
        )
    # Batched decode attention without a padding mask (models that offer it: Qwen3).
    if enable_batch_decode_attention(model.model):
        logger.info("%s: batched decode attention uses the GPU kernel", spec.model_id)
    # After the swap above: the compiled functions trace whatever layers are in place.
    cuda_gpu = cuda_gpu_is_default()
    max_rows = compiled_decode_rows(args, cuda_gpu)
    if max_rows != 0:
        compiled = compile_decode_blocks(model.model, max_rows, args.fused_head_rope)
        if compiled:
            logger.info(
                "%s: %d blocks decode %s rows through compiled graphs",
                spec.model_id,
                compiled,
                "any number of" if max_rows is None else f"up to {max_rows}",
            )
            # Replayed, the fused kernel's host cost is paid once: it wins at one row.
            set_one_row_fused(cuda_gpu)
            set_submit_every(args.submit_every_blocks, submit=lambda out: evaluate(out, wait=False))
    return model, EngineModel(model.model, model.vocab_size, grammar_masker=apply_grammar_masks)


def model_weight_bytes(model: LoadedModel) -> int:
    """The parameters' bytes and any dense copies (`--dense-weights`) in device memory."""
    from mlx.utils import tree_flatten

    from .kernels.quantized_linear import kept_dense_bytes

    assert model.model is not None
    params = model.model.parameters()
    return sum(v.nbytes for _, v in tree_flatten(params)) + kept_dense_bytes(model.model)


@dataclass(frozen=True)
class ChildSetup:
    """What an engine process runs first (`--engine-process`): the process set up as the
    server's own (`cli.main`), then the model built. Pickled to get there."""

    spec: ModelSpec
    args: argparse.Namespace

    def __call__(self) -> ChildModel:
        args = self.args
        logging.basicConfig(
            level=args.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        apply_cuda_defaults()
        limit_buffer_cache(args.buffer_cache_gb)
        for file in args.custom_model:
            model_registry.register_file(file)
        model, engine_model = build_model(self.spec, args)
        compiler: list[object] = []

        def grammar_matcher(portable: object) -> object:
            from .text.grammar import GrammarCompiler, PortableGrammar

            assert isinstance(portable, PortableGrammar)
            if not compiler:  # built on first use, as the server's own (about a second)
                hf = getattr(model.tokenizer, "_tokenizer", model.tokenizer)
                compiler.append(GrammarCompiler(hf, model.vocab_size, model.eos_token_ids))
            return portable.matcher(compiler[0])  # type: ignore[arg-type]

        return ChildModel(engine_model, ModelFacts(model_weight_bytes(model)), grammar_matcher)
