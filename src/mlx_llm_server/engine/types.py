"""Plain data types crossing the engine's boundary. No MLX, no web framework."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )


@dataclass
class GenerationRequest:
    request_id: str
    prompt_tokens: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: frozenset[int] = frozenset()
    # A per-sequence constraint on the next token (see text/grammar.py), or None.
    grammar: Any = None


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one request."""

    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None


@dataclass(frozen=True)
class FinishEvent:
    """The last event of a request that ended without an error."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class ErrorEvent:
    """The last event of a request that failed; the engine goes on serving the others."""

    error: Exception


EngineEvent = TokenEvent | FinishEvent | ErrorEvent


@dataclass(frozen=True)
class EngineStats:
    waiting: int
    running: int
    prefix_cache_bytes: int
    prefix_cache_entries: int
    kv_cache_bytes: int
    prefix_cache_hits: int = 0
    prefix_cache_misses: int = 0
    decode_steps: int = 0
    decode_rows: int = 0  # sum of batch sizes over decode steps
    max_decode_rows: int = 0
    prompt_tokens_computed: int = 0  # prompt tokens run through the model (cache hits excluded)
    prefill_steps: int = 0  # engine steps that ran prompt work
    prompts_prefilled: int = 0  # prompts whose prefill ended and that joined the batch
    # Engine-thread seconds in prompt work and in decode steps (each waits on the device too).
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_wait_seconds: float = 0.0  # of decode_seconds, blocked on the device for tokens
    decode_launch_seconds: float = 0.0  # of decode_seconds, in MLX queuing steps on the device
    # MLX's allocator in the engine's own process (`--engine-process`); 0 for an engine on a
    # thread of the server's process, whose MLX the server reads itself.
    process_active_bytes: int = 0
    process_peak_bytes: int = 0
    process_cache_bytes: int = 0
