"""Prometheus metrics (prometheus-client): HTTP requests, latencies, tokens, engine state.

Engine figures are read when `/metrics` is scraped (a custom collector over `EngineStats`), so
the engine thread pays nothing for them; per-request latencies are observed by the service.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .engine.types import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5)

EngineStatsSource = Callable[[], list[tuple[str, EngineStats]]]


class _EngineCollector(Collector):
    def __init__(self, source: EngineStatsSource, own_mlx: bool) -> None:
        self._source = source
        self._own_mlx = own_mlx

    def collect(self) -> Iterator[Metric]:
        gauges = {
            "waiting": ("mlx_llm_queue_depth", "Requests waiting for a batch slot"),
            "running": ("mlx_llm_running_sequences", "Sequences prefilling or decoding"),
            "kv_cache_bytes": ("mlx_llm_kv_cache_bytes", "KV cache memory of running sequences"),
            "prefix_cache_bytes": ("mlx_llm_prefix_cache_bytes", "Memory held by the prefix cache"),
            "prefix_cache_entries": ("mlx_llm_prefix_cache_entries", "Prefix cache entries"),
            "max_decode_rows": ("mlx_llm_max_batch_size", "Largest decode batch so far"),
        }
        counters = {
            "prefix_cache_hits": ("mlx_llm_prefix_cache_hits", "Prompts that reused cached KV"),
            "prefix_cache_misses": ("mlx_llm_prefix_cache_misses", "Prompts with no cached prefix"),
            "decode_steps": ("mlx_llm_decode_steps", "Decode steps run"),
            "decode_rows": ("mlx_llm_decode_rows", "Tokens decoded, summed over steps"),
            "prompt_tokens_computed": (
                "mlx_llm_prompt_tokens_computed",
                "Prompt tokens run through the model (prefix cache hits excluded)",
            ),
            "prefill_steps": (
                "mlx_llm_engine_prefill_steps",
                "Engine steps that ran prompt work (prompts arriving together share one)",
            ),
            "prompts_prefilled": (
                "mlx_llm_engine_prompts_prefilled",
                "Prompts whose prefill ended and that joined the decode batch",
            ),
            "prefill_seconds": (
                "mlx_llm_engine_prefill_seconds",
                "Engine time in prompt work, waiting on the device included",
            ),
            "decode_seconds": (
                "mlx_llm_engine_decode_seconds",
                "Engine time in decode steps, waiting on the device included",
            ),
            "decode_wait_seconds": (
                "mlx_llm_engine_decode_wait_seconds",
                "Of the decode time, the engine blocked on the device for sampled tokens",
            ),
            "decode_launch_seconds": (
                "mlx_llm_engine_decode_launch_seconds",
                "Of the decode time, the engine in MLX queuing steps on the device",
            ),
        }
        stats = self._source()
        for field, (name, help_text) in gauges.items():
            family = GaugeMetricFamily(name, help_text, labels=["model"])
            for model, s in stats:
                family.add_metric([model], getattr(s, field))
            yield family
        for field, (name, help_text) in counters.items():
            counter = CounterMetricFamily(name, help_text, labels=["model"])
            for model, s in stats:
                counter.add_metric([model], getattr(s, field))
            yield counter
        yield from _mlx_memory([s for _, s in stats], self._own_mlx)


def _mlx_memory(stats: list[EngineStats], own_mlx: bool) -> Iterator[Metric]:
    """MLX's allocator counters (weights, KV caches, temporaries, its cache): this process's
    where engines run in it, plus those of engines in processes of their own."""
    active, peak, cache = 0, 0, 0
    if own_mlx:
        import mlx.core as mx  # here, so that importing this module stays free of MLX

        active, peak, cache = mx.get_active_memory(), mx.get_peak_memory(), mx.get_cache_memory()
    readings = {
        "mlx_llm_mlx_active_memory_bytes": (
            active + sum(s.process_active_bytes for s in stats),
            "Memory held by MLX arrays",
        ),
        "mlx_llm_mlx_peak_memory_bytes": (
            peak + sum(s.process_peak_bytes for s in stats),
            "Most MLX memory held at once",
        ),
        "mlx_llm_mlx_cache_memory_bytes": (
            cache + sum(s.process_cache_bytes for s in stats),
            "MLX's buffer cache",
        ),
    }
    for name, (value, help_text) in readings.items():
        yield GaugeMetricFamily(name, help_text, value=value)


class ServerMetrics:
    def __init__(self, engine_stats: EngineStatsSource, own_mlx: bool = True) -> None:
        """`own_mlx`: engines run in this process, so its MLX allocator is read (never touched
        otherwise: on a GPU that would open a device context here for nothing)."""
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mlx_llm_http_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "mlx_llm_time_to_first_token_seconds",
            "From request to first generated token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inter_token = Histogram(
            "mlx_llm_inter_token_seconds",
            "Between consecutive generated tokens of one request",
            ["model"],
            buckets=_TOKEN_GAP_BUCKETS,
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "mlx_llm_request_duration_seconds",
            "From request to last token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "mlx_llm_prompt_tokens", "Prompt tokens", ["model"], registry=self.registry
        )
        self.completion_tokens = Counter(
            "mlx_llm_completion_tokens", "Generated tokens", ["model"], registry=self.registry
        )
        self.request_errors = Counter(
            "mlx_llm_request_errors",
            "Requests that failed inside the engine (a stream then ends with an error event)",
            ["model"],
            registry=self.registry,
        )
        # Set when scraped: 0 once the engine thread has stopped (/health answers 503 then).
        self.engine_up = Gauge(
            "mlx_llm_engine_up",
            "1 while the engine thread serves",
            ["model"],
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(engine_stats, own_mlx))
        # process_resident_memory_bytes and friends, as the default registry would have them.
        ProcessCollector(registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Latencies of one request, observed as its tokens arrive (monotonic clock)."""

    def __init__(self, metrics: ServerMetrics | None, model: str, started: float) -> None:
        self._metrics = metrics
        self._model = model
        self._started = started
        self._last: float | None = None
        # The model's series, looked up once: `labels()` costs as much as the observation, and
        # this runs on the event loop for every streamed token.
        self._inter_token = None if metrics is None else metrics.inter_token.labels(model)

    def token(self, now: float) -> None:
        if self._metrics is None:
            return
        if self._last is None:
            self._metrics.time_to_first_token.labels(self._model).observe(now - self._started)
        else:
            self._inter_token.observe(now - self._last)  # type: ignore[union-attr]
        self._last = now

    def failed(self) -> None:
        if self._metrics is not None:
            self._metrics.request_errors.labels(self._model).inc()

    def finished(self, now: float, prompt_tokens: int, completion_tokens: int) -> None:
        if self._metrics is None:
            return
        self._metrics.request_duration.labels(self._model).observe(now - self._started)
        self._metrics.prompt_tokens.labels(self._model).inc(prompt_tokens)
        self._metrics.completion_tokens.labels(self._model).inc(completion_tokens)
