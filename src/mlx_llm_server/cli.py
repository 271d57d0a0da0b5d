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
from .engine.remote import EngineProcess
from .kernels.quantized_linear import DENSE_MIN_ROWS, NORM_MAX_ROWS, STAGED_MIN_ROWS
from .metrics import ServerMetrics
from .model_setup import (
    COMPILED_DECODE_ROWS_CUDA,
    DEFAULT_BUFFER_CACHE_GB,
    ChildSetup,
    apply_cuda_defaults,
    build_model,
    limit_buffer_cache,
    model_weight_bytes,
)
from .models.loader import LoadedModel, ModelLoadError, load_tokenizer_only, resolve_model_path
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
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run each model's engine in a process of its own, so the HTTP side's work never "
        "holds the engine's interpreter lock (default: on NVIDIA GPUs)",
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


# On an H200 at 64 streams over HTTP the engine's own process took 4,367-4,379 tokens/s against
# 4,095-4,241 on a thread of the server's (one stream unchanged within its spread). On a 2-core
# CPU, where the two processes share the cores, it cost 3-7% at 64 streams of a model that costs
# nothing, and ~0.1 ms a token at one stream (bench/NOTES.md).
ENGINE_PROCESS_CUDA = True


def engine_process(args: argparse.Namespace) -> bool:
    """Whether each model's engine runs in a process of its own."""
    if args.engine_process is not None:
        return bool(args.engine_process)
    import mlx.core as mx

    return ENGINE_PROCESS_CUDA and mx.cuda.is_available()


def model_starter(
    args: argparse.Namespace, template_kwargs: dict[str, object]
) -> Callable[[ModelSpec], ServedModel]:
    def start(spec: ModelSpec) -> ServedModel:
        """Starts an engine (on a thread, or in a process of its own) that loads the model;
        blocks until it serves."""
        if engine_process(args):
            engine: Engine | EngineProcess = EngineProcess(
                engine_config(args), name=f"engine-{spec.model_id}"
            )
            started = engine.start(ChildSetup(spec, args))
            try:
                # This process only needs the tokenizer and the configuration: loaded while
                # the engine process loads the weights and warms up.
                loaded = load_tokenizer_only(spec.name, context_length=args.context_length)
            except BaseException:
                engine.stop()
                raise
            weight_bytes = started.result().weight_bytes
        else:
            engine = Engine(engine_config(args))
            built: list[LoadedModel] = []

            def setup() -> EngineModel:
                model, engine_model = build_model(spec, args)
                built.append(model)
                return engine_model

            engine.start(setup).result()
            loaded = built[0]
            weight_bytes = model_weight_bytes(loaded)
        logger.info(
            "%s: context %d tokens, warm-up %.1fs",
            spec.model_id,
            loaded.context_length,
            engine.warm_up_seconds,
        )
        return ServedModel(
            spec.model_id,
            loaded,
            engine,
            default_max_tokens=args.max_tokens,
            default_template_kwargs=dict(template_kwargs),
            weight_bytes=weight_bytes,
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


# Prompt tokens per engine step. On an H100 a step of 2,048 prompt tokens costs little more than
# one of 512 (the matrix products are compute-bound there), so 64 users arriving at once wait a
# quarter of the steps: 1,014 against 746 tokens/s, TTFT p99 1.8 against 3.4 s (bench/NOTES.md).
# Elsewhere a step's cost grows with its tokens, and a large step would stall running streams.
PREFILL_CHUNK = 512
CUDA_PREFILL_CHUNK = 2048


def default_prefill_chunk() -> int:
    import mlx.core as mx

    return CUDA_PREFILL_CHUNK if mx.cuda.is_available() else PREFILL_CHUNK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.bundled_blas:
        _restart_with_openblas(argv)
    apply_cuda_defaults()
    if not engine_process(args):  # else the engine process caps its own
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
    state.metrics = ServerMetrics(
        lambda: [(m.model_id, m.engine.stats()) for m in pool.ready()],
        own_mlx=not engine_process(args),
    )
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
