"""`mlx-llm-server`: parse options, load the model on the engine thread, serve HTTP."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import Future

import uvicorn

from .api import AppState, create_app
from .engine.engine import Engine, EngineConfig, EngineModel
from .metrics import ServerMetrics
from .models.loader import LoadedModel, ModelLoadError, load, resolve_model_path
from .models.registry import model_registry
from .service import ChatService, ServedModel

DEFAULT_MODEL = "mlx-community/Qwen3-8B-4bit"
DEFAULT_PORT = 9044

logger = logging.getLogger("mlx_llm_server")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-llm-server",
        description="An OpenAI-compatible server for large language models on MLX.",
    )
    parser.add_argument(
        "--model-name",
        default=DEFAULT_MODEL,
        help="hub id, local folder, .gguf file or built-in name (default: %(default)s)",
    )
    parser.add_argument(
        "--served-model-name",
        default=None,
        help="the id clients use in `model` (default: the --model-name as given)",
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
        default=512,
        help="prompt tokens processed per engine step (default: %(default)s)",
    )
    parser.add_argument(
        "--prefix-cache-mb",
        type=int,
        default=1024,
        help="memory for reusing KV state of shared prefixes, 0 to disable (default: %(default)s)",
    )
    parser.add_argument(
        "--custom-model",
        action="append",
        default=[],
        metavar="FILE.py",
        help="register a model file named after its model_type (repeatable)",
    )
    return parser


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        max_running=args.max_running,
        max_queued=args.max_queued,
        prefill_chunk=args.prefill_chunk,
        prefix_cache_bytes=args.prefix_cache_mb * (1 << 20),
    )


def start_model(
    name: str, served_name: str, args: argparse.Namespace
) -> tuple[Engine, Future[EngineModel], list[LoadedModel]]:
    """Starts an engine whose thread loads the model; `loaded` is filled in by that thread."""
    engine = Engine(engine_config(args))
    loaded: list[LoadedModel] = []

    def setup() -> EngineModel:
        model = load(name, context_length=args.context_length)
        loaded.append(model)
        return EngineModel(model.model, model.vocab_size)

    return engine, engine.start(setup), loaded


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        for file in args.custom_model:
            model_type = model_registry.register_file(file)
            logger.info("registered model_type %r from %s", model_type, file)
        resolve_model_path(args.model_name)  # fails fast, before the port is taken
    except (ModelLoadError, OSError, TypeError, ValueError) as error:
        print(f"mlx-llm-server: {error}", file=sys.stderr)
        return 1

    served_name = args.served_model_name or args.model_name
    state = AppState(loading=[served_name])
    state.metrics = ServerMetrics(
        lambda: (
            [(m.model_id, m.engine.stats()) for m in state.service.models()]
            if state.service
            else []
        )
    )
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(state),
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=30,
        )
    )
    engine, started, loaded = start_model(args.model_name, served_name, args)
    failure: list[BaseException] = []

    def when_loaded() -> None:
        try:
            started.result()
        except BaseException as error:
            failure.append(error)
            server.should_exit = True
            return
        served = ServedModel(served_name, loaded[0], engine, default_max_tokens=args.max_tokens)
        state.service = ChatService([served], state.metrics)
        state.loading = []
        logger.info(
            "serving %s on http://%s:%d/v1 (context %d tokens, warm-up %.1fs)",
            served_name,
            args.host,
            args.port,
            loaded[0].context_length,
            engine.warm_up_seconds,
        )

    threading.Thread(target=when_loaded, name="model-loader", daemon=True).start()
    server.run()
    state.stopping = True
    engine.stop()
    if failure:
        print(f"mlx-llm-server: {failure[0]}", file=sys.stderr)
        return 1
    return 0
