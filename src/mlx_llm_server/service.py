"""Between the wire and the engine: one request from validated JSON to OpenAI's responses.

All 4xx errors are raised here, before any stream starts: which model, the chat template, the
token count against the context, the sampling settings. The engine sees only a
`GenerationRequest`; the client sees only protocol models.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from jinja2 import TemplateError

from . import protocol as wire
from .engine.engine import Engine, RequestStream
from .engine.types import ErrorEvent, FinishEvent, GenerationRequest, SamplingParams, TokenEvent
from .errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    ServerError,
)
from .metrics import RequestTimer, ServerMetrics
from .models.loader import LoadedModel
from .text.detokenizer import IncrementalDetokenizer
from .text.stop import StopStringMatcher

logger = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """A loaded model, its engine, and the names requests may use for it."""

    model_id: str
    loaded: LoadedModel
    engine: Engine
    created: int = field(default_factory=wire.now)
    default_max_tokens: int = 2048

    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer (mlx-lm's wrapper adds nothing the text layer needs)."""
        return getattr(self.loaded.tokenizer, "_tokenizer", self.loaded.tokenizer)

    def render_chat(self, request: wire.ChatCompletionRequest) -> list[int]:
        messages = [_template_message(m) for m in request.messages]
        kwargs = dict(request.chat_template_kwargs or {})
        tokenizer = self.tokenizer
        try:
            if getattr(tokenizer, "chat_template", None):
                text = tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False, **kwargs
                )
            else:
                text = _plain_prompt(messages)
        except TemplateError as error:
            raise InvalidRequestError(f"The chat template rejected the messages: {error}") from None
        return list(tokenizer.encode(text, add_special_tokens=False))


def _template_message(message: wire.ChatMessage) -> dict[str, Any]:
    role = "system" if message.role == "developer" else message.role
    out: dict[str, Any] = {"role": role, "content": message.text()}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def _plain_prompt(messages: list[dict[str, Any]]) -> str:
    """For models without a chat template: one `role: text` line per message."""
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join([*lines, "assistant:"])


def sampling_from(
    request: wire.SamplingFields, *, logprobs: bool, top_logprobs: int
) -> SamplingParams:
    bias: dict[int, float] = {}
    for key, value in (request.logit_bias or {}).items():
        try:
            bias[int(key)] = value
        except ValueError:
            raise InvalidRequestError(
                f"logit_bias keys must be token ids, got {key!r}.", param="logit_bias"
            ) from None
    return SamplingParams(
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=request.top_k or 0,
        min_p=request.min_p or 0.0,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        repetition_penalty=request.repetition_penalty or 1.0,
        seed=request.seed,
        logit_bias=bias,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


class ChoiceText:
    """Turns one choice's token events into text: UTF-8-safe, cut at stop strings."""

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stops = StopStringMatcher(stops) if stops else None
        self.stopped = False
        self.tokens = 0

    def add(self, token_id: int) -> str:
        self.tokens += 1
        text = self._detokenizer.add_token(token_id)
        return self._filter(text)

    def finish(self) -> str:
        # A generation cut by max_tokens can end inside a character: drop its incomplete bytes
        # rather than send a replacement character.
        text = self._filter(self._detokenizer.flush().rstrip("\ufffd"))
        if self._stops is not None and not self.stopped:
            text += self._stops.flush()
        return text

    def _filter(self, text: str) -> str:
        if self._stops is None or self.stopped or not text:
            return "" if self.stopped else text
        result = self._stops.feed(text)
        self.stopped = result.stopped
        return result.text


class ChatService:
    def __init__(self, models: list[ServedModel], metrics: ServerMetrics | None = None) -> None:
        self._models = {m.model_id: m for m in models}
        self.metrics = metrics

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def model(self, name: str) -> ServedModel:
        served = self._models.get(name)
        if served is None:
            raise ModelNotFoundError(
                f"The model '{name}' does not exist or is not served here.", param="model"
            )
        return served

    async def prepare(self, request: wire.ChatCompletionRequest) -> PreparedChat:
        """Everything that can fail with a 4xx, done before a response starts."""
        started = time.monotonic()
        served = self.model(request.model)
        _refuse_unsupported(request)
        prompt = await asyncio.to_thread(served.render_chat, request)
        context = served.loaded.context_length
        requested = request.token_limit()
        if len(prompt) >= context or (requested is not None and len(prompt) + requested > context):
            raise ContextLengthExceededError(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{len(prompt) + (requested or 0)} tokens ({len(prompt)} in the messages, "
                f"{requested or 0} in the completion). Please reduce the length of the messages "
                "or completion.",
                param="messages",
            )
        max_tokens = requested or min(served.default_max_tokens, context - len(prompt))
        top_logprobs = request.top_logprobs or 0
        if top_logprobs and not request.logprobs:
            raise InvalidRequestError(
                "top_logprobs requires logprobs to be true.", param="top_logprobs"
            )
        generation = GenerationRequest(
            request_id=wire.completion_id(),
            prompt_tokens=prompt,
            max_tokens=max_tokens,
            sampling=sampling_from(request, logprobs=request.logprobs, top_logprobs=top_logprobs),
            stop_token_ids=served.loaded.eos_token_ids,
        )
        timer = RequestTimer(self.metrics, served.model_id, started)
        return PreparedChat(served, request, generation, timer)


def _refuse_unsupported(request: wire.ChatCompletionRequest) -> None:
    """Fields this server does not implement are refused, never silently ignored."""
    if request.n != 1:
        raise InvalidRequestError("Only n=1 is supported.", param="n")
    if request.tools and request.tool_choice not in (None, "none"):
        raise InvalidRequestError("Tool calling is not supported yet.", param="tools")
    if request.response_format is not None and request.response_format.type != "text":
        raise InvalidRequestError(
            "response_format other than text is not supported yet.", param="response_format"
        )


@dataclass
class PreparedChat:
    served: ServedModel
    request: wire.ChatCompletionRequest
    generation: GenerationRequest
    timer: RequestTimer

    @property
    def request_id(self) -> str:
        return self.generation.request_id

    def start(self) -> RequestStream:
        """Hands the request to the engine: the last check that can refuse it (429)."""
        return self.served.engine.submit(self.generation)

    def _usage(self, finish: FinishEvent | None, text: ChoiceText) -> wire.CompletionUsage:
        prompt_tokens = len(self.generation.prompt_tokens)
        completion = finish.completion_tokens if finish and not text.stopped else text.tokens
        cached = finish.cached_tokens if finish else 0
        self.timer.finished(time.monotonic(), prompt_tokens, completion)
        return wire.CompletionUsage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
            total_tokens=prompt_tokens + completion,
            prompt_tokens_details=wire.PromptTokensDetails(cached_tokens=cached),
        )

    def _logprob_entry(self, event: TokenEvent) -> wire.TokenLogprob:
        tokenizer = self.served.tokenizer
        from .text.detokenizer import token_bytes, token_text

        def entry(token_id: int, logprob: float) -> wire.TopLogprob:
            return wire.TopLogprob(
                token=token_text(tokenizer, token_id),
                logprob=max(logprob, -9999.0),
                bytes=list(token_bytes(tokenizer, token_id)),
            )

        main = entry(event.token_id, event.logprob if event.logprob is not None else 0.0)
        tops = [entry(t, lp) for t, lp in (event.top_logprobs or ())]
        return wire.TokenLogprob(**main.model_dump(), top_logprobs=tops)

    async def complete(self, stream: RequestStream) -> wire.ChatCompletion:
        text = ChoiceText(self.served.tokenizer, self.request.stop_list())
        parts: list[str] = []
        logprobs: list[wire.TokenLogprob] = []
        finish: FinishEvent | None = None
        try:
            async for event in stream:
                if isinstance(event, TokenEvent):
                    self.timer.token(time.monotonic())
                    parts.append(text.add(event.token_id))
                    if self.request.logprobs and not text.stopped:
                        logprobs.append(self._logprob_entry(event))
                    if text.stopped:
                        stream.cancel()
                        break
                elif isinstance(event, FinishEvent):
                    finish = event
                elif isinstance(event, ErrorEvent):
                    raise _as_server_error(event.error)
        finally:
            stream.cancel()
        parts.append(text.finish())
        reason = "stop" if text.stopped or finish is None else finish.finish_reason
        choice = wire.Choice(
            index=0,
            message=wire.ResponseMessage(content="".join(parts)),
            finish_reason=reason,
            logprobs=wire.ChoiceLogprobs(content=logprobs) if self.request.logprobs else None,
        )
        return wire.ChatCompletion(
            id=self.request_id,
            created=wire.now(),
            model=self.served.model_id,
            choices=[choice],
            usage=self._usage(finish, text),
        )

    async def stream(self, stream: RequestStream) -> AsyncIterator[bytes]:
        """Server-sent events: the role, content increments, the finish, then [DONE]."""
        text = ChoiceText(self.served.tokenizer, self.request.stop_list())
        created = wire.now()
        include_usage = bool(
            self.request.stream_options and self.request.stream_options.include_usage
        )

        def chunk(delta: wire.ChoiceDelta, **extra: Any) -> bytes:
            body = wire.ChatCompletionChunk(
                id=self.request_id,
                created=created,
                model=self.served.model_id,
                choices=[wire.ChunkChoice(index=0, delta=delta, **extra)],
            )
            return _sse(body.model_dump_json(exclude_none=True))

        finish: FinishEvent | None = None
        try:
            yield chunk(wire.ChoiceDelta(role="assistant", content=""))
            async for event in stream:
                if isinstance(event, TokenEvent):
                    self.timer.token(time.monotonic())
                    piece = text.add(event.token_id)
                    logprobs = None
                    if self.request.logprobs and not text.stopped:
                        logprobs = wire.ChoiceLogprobs(content=[self._logprob_entry(event)])
                    if piece or logprobs is not None:
                        yield chunk(wire.ChoiceDelta(content=piece), logprobs=logprobs)
                    if text.stopped:
                        stream.cancel()
                        break
                elif isinstance(event, FinishEvent):
                    finish = event
                elif isinstance(event, ErrorEvent):
                    error = _as_server_error(event.error)
                    yield _sse(json.dumps(error.to_dict()))
                    yield _sse("[DONE]")
                    return
            tail = text.finish()
            if tail:
                yield chunk(wire.ChoiceDelta(content=tail))
            reason = "stop" if text.stopped or finish is None else finish.finish_reason
            yield chunk(wire.ChoiceDelta(), finish_reason=reason)
            usage = self._usage(finish, text)
            if include_usage:
                usage_chunk = wire.ChatCompletionChunk(
                    id=self.request_id,
                    created=created,
                    model=self.served.model_id,
                    choices=[],
                    usage=usage,
                )
                yield _sse(usage_chunk.model_dump_json(exclude_none=True))
            yield _sse("[DONE]")
        finally:
            stream.cancel()


def _sse(data: str) -> bytes:
    return f"data: {data}\n\n".encode()


def _as_server_error(error: Exception) -> ServerError:
    return error if isinstance(error, ServerError) else ServerError(str(error))
