"""The models this server serves: which are loaded, loading on first use, or unloaded when idle.

Each loaded model has its own engine (and engine thread). A model marked lazy loads when a
request first names it; with an idle timeout, a model nobody used for that long is unloaded;
with a memory budget, loading a model first unloads the least recently used idle ones.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .errors import ModelNotFoundError, ServiceUnavailableError
from .service import ServedModel

logger = logging.getLogger(__name__)

ModelState = Literal["unloaded", "loading", "ready", "failed"]


@dataclass(frozen=True)
class ModelSpec:
    model_id: str  # what requests name
    name: str  # what is loaded: hub id, folder, .gguf file or built-in name
    lazy: bool = False


@dataclass
class _Entry:
    spec: ModelSpec
    state: ModelState = "unloaded"
    served: ServedModel | None = None
    loading: Future[ServedModel] | None = None
    error: str | None = None
    last_used: float = field(default_factory=time.monotonic)
    nbytes: int = 0


def estimate_nbytes(path: Path) -> int:
    """Bytes a model will take, from its weight files (before loading it)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


class ModelPool:
    def __init__(
        self,
        specs: list[ModelSpec],
        start: Callable[[ModelSpec], ServedModel],
        *,
        idle_unload_seconds: float | None = None,
        memory_budget_bytes: int | None = None,
        estimate: Callable[[ModelSpec], int] | None = None,
    ) -> None:
        self._entries = {spec.model_id: _Entry(spec) for spec in specs}
        self._start = start
        self._idle_unload_seconds = idle_unload_seconds
        self._memory_budget = memory_budget_bytes
        self._estimate = estimate
        self._lock = threading.Lock()
        self.on_ready: Callable[[ServedModel], None] | None = None

    # What the routes see -----------------------------------------------------------------

    def ids(self) -> list[str]:
        return list(self._entries)

    def status(self) -> dict[str, ModelState]:
        return {model_id: e.state for model_id, e in self._entries.items()}

    def ready(self) -> list[ServedModel]:
        return [e.served for e in self._entries.values() if e.served is not None]

    def healthy(self) -> bool:
        """Every eagerly loaded model is ready and its engine runs; lazy ones may be unloaded."""
        for entry in self._entries.values():
            if entry.spec.lazy and entry.state in ("unloaded", "loading"):
                continue
            if entry.state != "ready" or entry.served is None or not entry.served.engine.running:
                return False
        return True

    def created(self, model_id: str) -> int:
        entry = self._entries[model_id]
        return entry.served.created if entry.served else 0

    async def get(self, model_id: str) -> ServedModel:
        """The served model named by a request, loading it first if it is lazy or unloaded."""
        entry = self._entries.get(model_id)
        if entry is None:
            raise ModelNotFoundError(
                f"The model '{model_id}' does not exist or is not served here.", param="model"
            )
        entry.last_used = time.monotonic()
        if entry.served is not None:
            return entry.served
        if entry.state == "failed" and not entry.spec.lazy:
            raise ServiceUnavailableError(f"The model '{model_id}' failed to load: {entry.error}")
        try:
            return await asyncio.wrap_future(self.load(model_id))
        except ServiceUnavailableError:
            raise
        except Exception as error:
            raise ServiceUnavailableError(
                f"The model '{model_id}' could not be loaded: {error}"
            ) from None

    # Loading and unloading ---------------------------------------------------------------

    def load(self, model_id: str) -> Future[ServedModel]:
        """Starts loading (once) in a background thread; the future gives the served model."""
        with self._lock:
            entry = self._entries[model_id]
            if entry.loading is not None and entry.state == "loading":
                return entry.loading
            future: Future[ServedModel] = Future()
            if entry.served is not None:
                future.set_result(entry.served)
                return future
            entry.state, entry.loading, entry.error = "loading", future, None
        threading.Thread(
            target=self._load, args=(entry, future), name=f"load-{model_id}", daemon=True
        ).start()
        return future

    def _load(self, entry: _Entry, future: Future[ServedModel]) -> None:
        started = time.monotonic()
        try:
            self._make_room(entry)
            served = self._start(entry.spec)
        except BaseException as error:
            logger.error("model %s failed to load: %s", entry.spec.model_id, error)
            entry.state, entry.error = "failed", str(error)
            future.set_exception(error)
            return
        entry.served, entry.state = served, "ready"
        entry.nbytes = served.weight_bytes
        entry.last_used = time.monotonic()
        logger.info(
            "model %s ready in %.1fs (%.2f GB)",
            entry.spec.model_id,
            time.monotonic() - started,
            entry.nbytes / 1e9,
        )
        future.set_result(served)
        if self.on_ready is not None:
            self.on_ready(served)

    def _make_room(self, entry: _Entry) -> None:
        if self._memory_budget is None or self._estimate is None:
            return
        needed = self._estimate(entry.spec)
        with self._lock:
            loaded = sorted(
                (e for e in self._entries.values() if e.served is not None and e is not entry),
                key=lambda e: e.last_used,
            )
        used = sum(e.nbytes for e in loaded)
        for other in loaded:
            if used + needed <= self._memory_budget:
                break
            if self._idle(other):
                used -= other.nbytes
                self.unload(other.spec.model_id)
        if used + needed > self._memory_budget:
            raise ServiceUnavailableError(
                f"Loading '{entry.spec.model_id}' ({needed / 1e9:.1f} GB) would exceed the "
                f"memory budget of {self._memory_budget / 1e9:.1f} GB while other models are busy."
            )

    @staticmethod
    def _idle(entry: _Entry) -> bool:
        if entry.served is None:
            return False
        stats = entry.served.engine.stats()
        return stats.running == 0 and stats.waiting == 0

    def unload(self, model_id: str) -> None:
        with self._lock:
            entry = self._entries[model_id]
            served, entry.served, entry.state, entry.loading = entry.served, None, "unloaded", None
        if served is not None:
            served.engine.stop()
            logger.info("model %s unloaded", model_id)

    def unload_idle(self, now: float | None = None) -> list[str]:
        """Unloads lazy models unused for the idle timeout; returns their ids."""
        if self._idle_unload_seconds is None:
            return []
        now = time.monotonic() if now is None else now
        gone = []
        for model_id, entry in self._entries.items():
            idle_for = now - entry.last_used
            if entry.spec.lazy and idle_for >= self._idle_unload_seconds and self._idle(entry):
                self.unload(model_id)
                gone.append(model_id)
        return gone

    def start_eager(self) -> list[Future[ServedModel]]:
        return [self.load(m) for m, e in self._entries.items() if not e.spec.lazy]

    def stop(self) -> None:
        for model_id in list(self._entries):
            self.unload(model_id)
