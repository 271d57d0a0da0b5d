"""`mlx-llm-server`: parse options, load the model on the engine thread, serve HTTP."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import NoReturn

import uvicorn

from .api import AppState, create_app
from .engine.engine import Engine, EngineConfig, EngineModel
from .kernels.quantized_linear import DENSE_MIN_ROWS, NORM_MAX_ROWS, STAGED_MIN_ROWS
from .metrics import ServerMetrics
from .models.loader import LoadedModel, ModelLoadError, load, resolve_model_path
from .models.registry import model_registry
from .pool import ModelPool, ModelSpec, estimate_nbytes
from .security import (
    API_KEY_ENV,
    LOOPBACK_HOSTS,
    SecurityConfig,
    load_api_keys,
    normalize_host,
    parse_origins,
)
from .service import ChatService, ServedModel

DEFAULT_MODEL = "mlx-community/Qwen3-8B-4bit"
DEFAULT_PORT = 9044

logger = logging.getLogger("mlx_llm_server")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-llm-server",
        description="An OpenAI-compatible server for large language models on MLX.",
    )
    parser.add_argument(
        "--model-name",
        action="append",
        metavar="[ID=]MODEL",
        help=f"hub id, local folder, .gguf file or built-in name; repeat to serve several, "
        f"ID= names it for requests (default: {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--served-model-name",
        default=None,
        help="the id clients use in `model` for a single model (default: the --model-name)",
    )
    parser.add_argument(
        "--load-on-demand",
        action="store_true",
        help="load every model but the first when a request first names it",
    )
    parser.add_argument(
        "--idle-unload-minutes",
        type=float,
        default=None,
        help="unload an on-demand model nobody used for this long",
    )
    parser.add_argument(
        "--memory-budget-gb",
        type=float,
        default=None,
        help="before loading a model, unload idle ones so the weights stay within this budget",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="default: %(default)s")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="default: %(default)s",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=2048,
        help="completion length when a request sets none (default: %(default)s)",
    )
    parser.add_argument(
        "--context-length",
        type=int,
        default=None,
        help="override the model's context length in tokens",
    )
    parser.add_argument(
        "--max-running",
        type=int,
        default=64,
        help="sequences decoded together in one batch (default: %(default)s)",
    )
    parser.add_argument(
        "--max-queued",
        type=int,
        default=256,
        help="requests waiting for a batch slot before 429 (default: %(default)s)",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        default=None,
        help="prompt tokens processed per engine step "
        f"(default: {CUDA_PREFILL_CHUNK} on NVIDIA GPUs, {PREFILL_CHUNK} elsewhere)",
    )
    parser.add_argument(
        "--buffer-cache-gb",
        type=float,
        default=DEFAULT_BUFFER_CACHE_GB,
        help="most memory MLX keeps in freed buffers for reuse, where MLX's own limit is higher "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--prefix-cache-mb",
        type=int,
        default=1024,
        help="memory for reusing KV state of shared prefixes, 0 to disable (default: %(default)s)",
    )
    parser.add_argument(
        "--chat-template-kwargs",
        type=_json_object,
        default={},
        metavar="JSON",
        help="defaults for every request's chat_template_kwargs, e.g. '{\"enable_thinking\": false}'",
    )
    parser.add_argument(
        "--no-thinking",
        action="store_true",
        help="switch reasoning off by default (chat_template_kwargs enable_thinking=false)",
    )
    parser.add_argument(
        "--bundled-blas",
        action="store_true",
        help="on a Linux CPU, keep MLX's bundled BLAS instead of preloading the system's OpenBLAS",
    )
    parser.add_argument(
        "--compiled-decode",
        action="store_true",
        help="decode steps of every batch size through compiled transformer blocks, on any "
        "device (measured: faster on a host-bound CPU at batch 8+; see bench/NOTES.md)",
    )
    parser.add_argument(
        "--compiled-decode-rows",
        type=int,
        default=None,
        metavar="ROWS",
        help="decode steps of up to ROWS rows run through compiled transformer blocks "
        f"(default: {COMPILED_DECODE_ROWS_CUDA} on NVIDIA GPUs, 0 elsewhere; 0 turns them off)",
    )
    parser.add_argument(
        "--submit-every-blocks",
        type=non_negative_int,
        default=0,
        metavar="BLOCKS",
        help="in compiled decode steps, hand the device every BLOCKS transformer blocks as "
        "they are built instead of the whole step at its end (default: 0, off; measured on an "
        "H200: 64 streams within 3%%, one stream over HTTP much slower, see bench/NOTES.md)",
    )
    parser.add_argument(
        "--fused-head-rope",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="in compiled decode blocks on NVIDIA GPUs, q/k norms and RoPE run as one kernel "
        "(default: on)",
    )
    parser.add_argument(
        "--fused-epilogues",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on NVIDIA GPUs, the fused 4-bit kernel adds residuals and computes the SwiGLU as "
        "it stores (default: on)",
    )
    parser.add_argument(
        "--folded-norm-rows",
        type=int,
        default=NORM_MAX_ROWS,
        choices=range(NORM_MAX_ROWS + 1),
        metavar="ROWS",
        help="on NVIDIA GPUs, in compiled decode steps of up to ROWS rows (at most "
        f"{NORM_MAX_ROWS}) the fused 4-bit kernel also applies the RMSNorm before q/k/v and "
        "gate/up (default: %(default)s; 0: never)",
    )
    parser.add_argument(
        "--staged-matmul-rows",
        type=int,
        default=STAGED_MIN_ROWS,
        metavar="ROWS",
        help="on NVIDIA GPUs, 4-bit matmuls of this many rows or more (up to 64) take the tile "
        "shapes measured fastest for their layer's width, the kernel that stages activations in "
        "shared memory on the wider layers (default: %(default)s; above 64: never)",
    )
    parser.add_argument(
        "--dense-weights",
        action="store_true",
        help="on NVIDIA GPUs, keep a dense (bf16/fp16) copy of the 4-bit weights, about 3.5x "
        "their size more device memory, for batched decode steps and prompts: faster when many "
        "users decode at once (default: off)",
    )
    parser.add_argument(
        "--dense-weights-rows",
        type=positive_int,
        default=DENSE_MIN_ROWS,
        metavar="ROWS",
        help="with --dense-weights, matmuls of this many rows or more use the dense copy "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--custom-model",
        action="append",
        default=[],
        metavar="FILE.py",
        help="register a model file named after its model_type (repeatable)",
    )
    security = parser.add_argument_group("security")
    security.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on every route but /health (repeatable; "
        f"also read from --api-key-file and ${API_KEY_ENV})",
    )
    security.add_argument(
        "--api-key-file", default=None, metavar="PATH", help="API keys, one per line"
    )
    security.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host header to accept besides loopback names and --host (repeatable; '*' "
        "accepts any, which gives up the protection against DNS rebinding)",
    )
    security.add_argument(
        "--cors-origins",
        default=None,
        metavar="ORIGINS",
        help="comma-separated origins allowed to call from a browser, or '*' (default: none)",
    )
    security.add_argument(
        "--max-body-mb",
        type=float,
        default=8.0,
        help="largest request body accepted, larger ones get 413 (default: %(default)s)",
    )
    parser.add_argument(
        "--shutdown-grace-seconds",
        type=float,
        default=30.0,
        help="on SIGTERM/SIGINT, how long running requests may take to finish "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--event-loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="the HTTP side's event loop, as uvicorn's --loop (default: auto, uvloop where "
        "installed)",
    )
    parser.add_argument(
        "--access-log-format",
        choices=["text", "json"],
        default="text",
        help="one access line per request, as text or a JSON object (default: %(default)s)",
    )
    return parser


def security_config(args: argparse.Namespace) -> SecurityConfig:
    """Raises ValueError (one sentence) for unusable keys, hosts or origins."""
    if args.max_body_mb <= 0:
        raise ValueError("--max-body-mb must be positive")
    config = SecurityConfig.for_bind_address(
        args.host,
        api_keys=load_api_keys(args.api_key, args.api_key_file),
        allowed_hosts=args.allowed_host,
        cors_origins=parse_origins(args.cors_origins),
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
    )
    if normalize_host(args.host) not in LOOPBACK_HOSTS:
        if not config.api_keys:
            logger.warning(
                "listening on %s without an API key: anyone who reaches it can use it "
                "(see --api-key)",
                args.host,
            )
        if not args.allowed_host:
            logger.warning(
                "only requests naming %s or a loopback name in their Host header are served; "
                "add the names clients use with --allowed-host",
                args.host,
            )
    return config


def exit_without_teardown(code: int) -> NoReturn:
    """Ends the process once the server has stopped and its output is flushed.

    After the engine threads have run, MLX's C++ runtime can abort while the interpreter tears
    down ("terminate called without an active exception", status -6); nothing is left to clean
    up by then, so skipping the teardown keeps the exit status the one meant.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class GracefulServer(uvicorn.Server):
    """Uvicorn's server, where a stop signal first refuses new work (503) while running
    requests finish (up to `timeout_graceful_shutdown`), and a graceful stop exits 0."""

    def __init__(self, config: uvicorn.Config, state: AppState) -> None:
        super().__init__(config)
        self.app_state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.app_state.stopping:
            logger.info(
                "stopping: new requests get 503, running ones have %ss to finish",
                self.config.timeout_graceful_shutdown,
            )
        self.app_state.stopping = True
        super().handle_exit(sig, frame)
        # Uvicorn re-raises the signal once it has shut down, so the process would die of it;
        # a stop that went as planned is a normal exit.
        captured = getattr(self, "_captured_signals", None)
        if captured is not None:
            captured.clear()


def _json_object(text: str) -> dict[str, object]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        max_running=args.max_running,
        max_queued=args.max_queued,
        prefill_chunk=args.prefill_chunk or default_prefill_chunk(),
        prefix_cache_bytes=args.prefix_cache_mb * (1 << 20),
    )


def model_specs(args: argparse.Namespace) -> list[ModelSpec]:
    names = args.model_name or [DEFAULT_MODEL]
    specs = []
    for index, item in enumerate(names):
        alias, sep, name = item.partition("=")
        # A Windows-free heuristic: `id=model` unless the left side looks like a path.
        if not sep or "/" in alias or not alias:
            alias, name = "", item
        model_id = alias or (args.served_model_name if len(names) == 1 else None) or name
        specs.append(ModelSpec(model_id, name, lazy=args.load_on_demand and index > 0))
    if len({s.model_id for s in specs}) != len(specs):
        raise ValueError("two models have the same id; name them with ID=MODEL")
    return specs


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


def model_starter(
    args: argparse.Namespace, template_kwargs: dict[str, object]
) -> Callable[[ModelSpec], ServedModel]:
    def start(spec: ModelSpec) -> ServedModel:
        """Starts an engine whose thread loads the model; blocks until it serves."""
        engine = Engine(engine_config(args))
        loaded: list[LoadedModel] = []

        def setup() -> EngineModel:
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
                logger.info(
                    "%s: %d quantized layers use the batched GPU path", spec.model_id, replaced
                )
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
                    set_submit_every(
                        args.submit_every_blocks, submit=lambda out: evaluate(out, wait=False)
                    )
            loaded.append(model)
            return EngineModel(model.model, model.vocab_size, grammar_masker=apply_grammar_masks)

        engine.start(setup).result()
        logger.info(
            "%s: context %d tokens, warm-up %.1fs",
            spec.model_id,
            loaded[0].context_length,
            engine.warm_up_seconds,
        )
        return ServedModel(
            spec.model_id,
            loaded[0],
            engine,
            default_max_tokens=args.max_tokens,
            default_template_kwargs=dict(template_kwargs),
        )

    return start


OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
)


def _restart_with_openblas(argv: Sequence[str] | None) -> None:
    """On a Linux CPU, restarts the process with the system's OpenBLAS preloaded.

    MLX's CPU wheel bundles a reference BLAS; OpenBLAS makes float32 matrix products ~30x
    faster (bench/NOTES.md). A BLAS can only be swapped before the process starts, hence the
    exec. `--bundled-blas` or MLX_LLM_SERVER_BUNDLED_BLAS=1 keeps the bundled one.
    """
    if sys.platform != "linux" or os.environ.get("MLX_LLM_SERVER_BUNDLED_BLAS"):
        return
    if "openblas" in os.environ.get("LD_PRELOAD", ""):
        return
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return
    library = next((path for path in OPENBLAS_CANDIDATES if os.path.exists(path)), None)
    if library is None:
        return
    env = {**os.environ, "LD_PRELOAD": library}
    arguments = list(sys.argv[1:] if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "mlx_llm_server", *arguments], env)


# MLX settings for its CUDA backend, read once at first use; a user's own values win.
# cuDNN's attention builds a graph for every new prompt shape on the request path (0.1-1.4 s
# each on an H100); without it, prompts take the composed path and new lengths cost nothing
# extra. MLX hands the device its queued kernels every 30 operations on an H100/H200; every 10
# lets the device start a step's first layers while the host still queues the rest: 64-stream
# decode steps 16-17 -> 12-13 ms over HTTP, one stream within its run-to-run spread (bench/NOTES.md).
CUDA_DEFAULTS = {"MLX_CUDA_USE_CUDNN_SDPA": "0", "MLX_MAX_OPS_PER_BUFFER": "10"}


# Prompt tokens per engine step. On an H100 a step of 2,048 prompt tokens costs little more than
# one of 512 (the matrix products are compute-bound there), so 64 users arriving at once wait a
# quarter of the steps: 1,014 against 746 tokens/s, TTFT p99 1.8 against 3.4 s (bench/NOTES.md).
# Elsewhere a step's cost grows with its tokens, and a large step would stall running streams.
PREFILL_CHUNK = 512
CUDA_PREFILL_CHUNK = 2048


def default_prefill_chunk() -> int:
    import mlx.core as mx

    return CUDA_PREFILL_CHUNK if mx.cuda.is_available() else PREFILL_CHUNK


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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.bundled_blas:
        _restart_with_openblas(argv)
    apply_cuda_defaults()
    limit_buffer_cache(args.buffer_cache_gb)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.access_log_format == "json":
        # Bare JSON lines: no prefix that would stop a log shipper from parsing them.
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        access = logging.getLogger("mlx_llm_server.access")
        access.addHandler(handler)
        access.propagate = False
    try:
        security = security_config(args)
        for file in args.custom_model:
            model_type = model_registry.register_file(file)
            logger.info("registered model_type %r from %s", model_type, file)
        specs = model_specs(args)
        for spec in specs:
            resolve_model_path(spec.name)  # fails fast, before the port is taken
    except (ModelLoadError, OSError, TypeError, ValueError) as error:
        print(f"mlx-llm-server: {error}", file=sys.stderr)
        return 1

    template_kwargs = dict(args.chat_template_kwargs)
    if args.no_thinking:
        template_kwargs["enable_thinking"] = False
    idle = args.idle_unload_minutes * 60 if args.idle_unload_minutes is not None else None
    budget = int(args.memory_budget_gb * 1e9) if args.memory_budget_gb is not None else None
    pool = ModelPool(
        specs,
        model_starter(args, template_kwargs),
        idle_unload_seconds=idle,
        memory_budget_bytes=budget,
        estimate=lambda spec: estimate_nbytes(resolve_model_path(spec.name)),
    )
    state = AppState(loading=[s.model_id for s in specs if not s.lazy])
    state.metrics = ServerMetrics(lambda: [(m.model_id, m.engine.stats()) for m in pool.ready()])
    state.service = ChatService(pool, state.metrics)
    app = create_app(state, security, access_log_json=args.access_log_format == "json")
    server = GracefulServer(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            # Our access line carries the request id; uvicorn's would repeat it without.
            access_log=False,
            timeout_graceful_shutdown=args.shutdown_grace_seconds,  # type: ignore[arg-type]
            loop=args.event_loop,
        ),
        state,
    )
    failure: list[BaseException] = []

    def when_loaded() -> None:
        try:
            for future in pool.start_eager():
                future.result()
        except BaseException as error:
            failure.append(error)
            server.should_exit = True
            return
        state.loading = []
        ready = ", ".join(m.model_id for m in pool.ready())
        lazy = [s.model_id for s in specs if s.lazy]
        on_demand = f"; on demand: {', '.join(lazy)}" if lazy else ""
        print(
            f"MLX LLM Server listening on http://{args.host}:{args.port}/v1 — ready: {ready}"
            f"{on_demand}",
            flush=True,
        )
        while idle is not None and not server.should_exit:
            time.sleep(min(idle / 4, 30.0))
            pool.unload_idle()

    threading.Thread(target=when_loaded, name="model-loader", daemon=True).start()
    server.run()
    state.stopping = True
    pool.stop()
    if failure:
        print(f"mlx-llm-server: {failure[0]}", file=sys.stderr)
    exit_without_teardown(1 if failure else 0)
