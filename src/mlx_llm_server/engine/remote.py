"""The engine in a process of its own (`--engine-process`).

In one process, the engine thread and the event loop take turns on one interpreter lock: at 64
streams the loop's per-token work (text, chunks, socket writes) holds it while the engine would
build its next step, and the device waits (bench/NOTES.md, "H200: what a 64-stream decode step
waits for over HTTP"). vLLM splits its API server from its engine core for the same reason.

`EngineProcess` stands where an `Engine` would for the service and the pool (submit, cancel,
stats, running, failure, stop). Its child process runs a real `Engine` on its own interpreter:
requests go down a pipe, and each engine step's events for every request come back as one
message, which a reader thread hands to the event loops as the engine itself would.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, NoReturn

from ..errors import EngineError, ServerError, ServerOverloadedError, ServiceUnavailableError
from .engine import Engine, EngineConfig, EngineModel, RequestStream, deliver_to_loops
from .types import EngineEvent, EngineStats, ErrorEvent, GenerationRequest, TokenEvent

logger = logging.getLogger(__name__)

# How often an idle child reports its counters (busy, every step's message carries them).
STATS_INTERVAL_SECONDS = 0.5
_STOP_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class ModelFacts:
    """What the parent learns from the child once the model serves."""

    weight_bytes: int
    warm_up_seconds: float = 0.0


@dataclass
class ChildModel:
    """What the child's setup builds: the engine's model, facts for the parent, and how a
    request's portable grammar (`PortableGrammar`) becomes a matcher in the child."""

    engine_model: EngineModel
    facts: ModelFacts
    grammar_matcher: Callable[[Any], Any] | None = None


# Runs in the child; pickled to get there, so a module-level class or function.
ChildSetup = Callable[[], ChildModel]


def _empty_stats() -> EngineStats:
    return EngineStats(
        waiting=0, running=0, prefix_cache_bytes=0, prefix_cache_entries=0, kv_cache_bytes=0
    )


class EngineProcess:
    """The parent's side: an `Engine`'s face over a pipe to the child that runs it."""

    def __init__(self, config: EngineConfig | None = None, name: str = "mlx-engine") -> None:
        self.config = config or EngineConfig()
        self.name = name
        self.failure: BaseException | None = None
        self.warm_up_seconds = 0.0
        self.pid: int | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._streams: dict[str, RequestStream] = {}
        self._closed = False  # the child is gone and every stream was ended
        self._lock = threading.Lock()  # guards _streams and _closed
        # Messages for the child, written by a thread of their own: a write to a full pipe
        # (the child busy) must block neither the event loop nor the reader thread.
        self._outbox: queue.SimpleQueue[tuple[str, Any] | None] = queue.SimpleQueue()
        self._stats = _empty_stats()
        self._ready = threading.Event()
        self._stopping = False

    @property
    def running(self) -> bool:
        process = self._process
        alive = process is not None and process.is_alive()
        return alive and self._ready.is_set() and self.failure is None

    def start(self, setup: ChildSetup) -> Future[ModelFacts]:
        """Starts the child, which runs `setup` and warms the engine up; the future resolves
        once it takes requests, or holds the error that stopped it."""
        # "spawn": a fork would copy the parent's threads' locks in whatever state they are.
        context = multiprocessing.get_context("spawn")
        mine, theirs = context.Pipe(duplex=True)
        process = context.Process(
            target=serve_in_child, args=(theirs, self.config, setup), name=self.name, daemon=True
        )
        process.start()
        theirs.close()
        self._process, self._conn, self.pid = process, mine, process.pid
        started: Future[ModelFacts] = Future()
        threading.Thread(
            target=self._read, args=(started,), name=f"{self.name}-reader", daemon=True
        ).start()
        threading.Thread(target=self._write, name=f"{self.name}-writer", daemon=True).start()
        return started

    def stop(self, timeout: float = _STOP_TIMEOUT_SECONDS) -> None:
        self._stopping = True
        self._outbox.put(("stop", None))
        self._outbox.put(None)  # the writer's end
        process = self._process
        if process is not None:
            # A child still starting reads no messages (and ignores SIGTERM): it is killed.
            process.join(timeout if self._ready.is_set() else 0.0)
            if process.is_alive():
                process.kill()
                process.join()
        if self._conn is not None:
            self._conn.close()

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queues a request; raises ServerOverloadedError when the queue is full."""
        if not self.running:
            raise ServiceUnavailableError("The generation engine is not running.")
        stream = RequestStream(self, request.request_id, asyncio.get_running_loop())
        if request.grammar is not None:
            request = dataclasses.replace(request, grammar=request.grammar.portable())
        with self._lock:
            if self._closed:
                raise ServiceUnavailableError("The generation engine is not running.")
            # The child's own queue count lags behind the pipe, so the limit is kept here.
            if len(self._streams) >= self.config.max_running + self.config.max_queued:
                raise ServerOverloadedError(
                    "The server is at capacity; retry shortly.", retry_after_seconds=1
                )
            self._streams[request.request_id] = stream
        self._outbox.put(("submit", request))
        return stream

    def cancel(self, request_id: str) -> None:
        self._outbox.put(("cancel", request_id))

    def stats(self) -> EngineStats:
        return self._stats

    # Writer and reader threads ----------------------------------------------------------

    def _write(self) -> None:
        assert self._conn is not None
        while (message := self._outbox.get()) is not None:
            try:
                self._conn.send(message)
            except (OSError, ValueError):
                return  # the child is gone: the reader ends what waits for it

    def _read(self, started: Future[ModelFacts]) -> None:
        assert self._conn is not None
        try:
            while True:
                kind, payload = self._conn.recv()
                if kind == "events":
                    deliveries, self._stats = payload
                    self._dispatch(deliveries)
                elif kind == "stats":
                    self._stats = payload
                elif kind == "ready":
                    self.warm_up_seconds = payload.warm_up_seconds
                    self._ready.set()
                    started.set_result(payload)
                elif kind == "failed":
                    if not started.done():
                        started.set_exception(payload)
                    else:
                        logger.error("generation engine stopped: %s", payload)
                        self.failure = payload
        except (EOFError, OSError):
            pass  # the child is gone
        if not started.done():
            code = None
            if self._process is not None:
                self._process.join(5.0)
                code = self._process.exitcode
            started.set_exception(
                RuntimeError(f"the engine process exited while starting (status {code})")
            )
        if not self._stopping and self.failure is None:
            logger.error("the engine process exited")
            self.failure = EngineError("The engine process exited.")
        if isinstance(self.failure, EngineError):
            self._fail_waiting(self.failure)
        else:
            reason = self.failure if self.failure is not None else "the server is stopping"
            self._fail_waiting(EngineError(f"The generation engine stopped: {reason}"))

    def _dispatch(self, deliveries: list[tuple[str, list[Any]]]) -> None:
        out: list[tuple[RequestStream, list[EngineEvent]]] = []
        with self._lock:
            for request_id, packed in deliveries:
                stream = self._streams.get(request_id)
                if stream is None:
                    continue
                events = [TokenEvent(item) if isinstance(item, int) else item for item in packed]
                if not isinstance(events[-1], TokenEvent):
                    del self._streams[request_id]
                out.append((stream, events))
        deliver_to_loops(out)

    def _fail_waiting(self, error: EngineError) -> None:
        with self._lock:
            waiting, self._streams, self._closed = self._streams, {}, True
        deliver_to_loops([(stream, [ErrorEvent(error)]) for stream in waiting.values()])


# The child -----------------------------------------------------------------------------


def _pack(deliveries: list[tuple[Any, list[EngineEvent]]]) -> list[tuple[str, list[Any]]]:
    """A step's events as the pipe carries them: a plain token is its id (most events)."""
    return [
        (
            request_id,
            [e.token_id if isinstance(e, TokenEvent) and e.logprob is None else e for e in events],
        )
        for request_id, events in deliveries
    ]


def _portable_error(error: BaseException) -> BaseException:
    """The error itself if it crosses the pipe, else its message in a RuntimeError."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def serve_in_child(conn: Connection, config: EngineConfig, setup: ChildSetup) -> None:
    """The child process: a real engine fed from the pipe. Ends when the parent says stop or
    goes away (the pipe closes), never leaving a process behind."""
    # The parent decides when this process stops (after letting running requests finish on
    # a graceful stop); Ctrl-C in a terminal or a service manager signal every process of the
    # group, which would otherwise end this one first. A gone parent closes the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sending = threading.Lock()
    reported = threading.Event()

    def send(message: tuple[str, Any]) -> None:
        with sending:
            conn.send(message)

    def report_failure() -> None:
        """Once, as soon as the engine thread has died (before the events it ended with)."""
        if engine.failure is not None and not reported.is_set():
            reported.set()
            send(("failed", EngineError(f"The generation engine stopped: {engine.failure}")))

    def deliver(deliveries: list[tuple[Any, list[EngineEvent]]]) -> None:
        with contextlib.suppress(OSError, ValueError):  # the parent is gone: stopping
            report_failure()
            send(("events", (_pack(deliveries), _stats_with_memory(engine))))

    engine = Engine(config, deliver=deliver)
    built: list[ChildModel] = []

    def engine_setup() -> EngineModel:
        built.append(setup())
        return built[0].engine_model

    try:
        engine.start(engine_setup).result()
    except BaseException as error:
        with contextlib.suppress(OSError, ValueError):
            send(("failed", _portable_error(error)))
        _exit(1)
    child = built[0]
    send(("ready", dataclasses.replace(child.facts, warm_up_seconds=engine.warm_up_seconds)))
    done = threading.Event()
    threading.Thread(
        target=_report, args=(engine, send, report_failure, done), name="engine-stats", daemon=True
    ).start()
    try:
        while True:
            kind, payload = conn.recv()
            if kind == "submit":
                _submit(engine, child, payload, deliver)
            elif kind == "cancel":
                engine.cancel(payload)
            elif kind == "stop":
                break
    except (EOFError, OSError):
        pass  # the parent is gone
    done.set()
    engine.stop()
    _exit(0)


def _submit(
    engine: Engine,
    child: ChildModel,
    request: GenerationRequest,
    deliver: Callable[[list[tuple[Any, list[EngineEvent]]]], None],
) -> None:
    try:
        if request.grammar is not None:
            if child.grammar_matcher is None:
                raise EngineError("This model has no grammar support.")
            request = dataclasses.replace(request, grammar=child.grammar_matcher(request.grammar))
        # The parent keeps the queue's limit: what it let through is queued here.
        engine.enqueue(request, request.request_id, limit=False)
    except ServerError as error:
        deliver([(request.request_id, [ErrorEvent(error)])])
    except Exception as error:
        deliver([(request.request_id, [ErrorEvent(EngineError(str(error)))])])


def _stats_with_memory(engine: Engine) -> EngineStats:
    import mlx.core as mx

    return dataclasses.replace(
        engine.stats(),
        process_active_bytes=mx.get_active_memory(),
        process_peak_bytes=mx.get_peak_memory(),
        process_cache_bytes=mx.get_cache_memory(),
    )


def _report(
    engine: Engine,
    send: Callable[[tuple[str, Any]], None],
    report_failure: Callable[[], None],
    done: threading.Event,
) -> None:
    """Counters while idle, and the engine thread's death if no step reported it."""
    while not done.wait(STATS_INTERVAL_SECONDS):
        try:
            send(("stats", _stats_with_memory(engine)))
            report_failure()
        except (OSError, ValueError):
            return


def _exit(code: int) -> NoReturn:
    # As the server itself ends: MLX's runtime can abort in the interpreter's teardown once
    # its threads have run (cli.exit_without_teardown).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
