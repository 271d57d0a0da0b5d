"""Between the wire and the engine: one request from validated JSON to OpenAI's responses.

All 4xx errors are raised here, before any response starts: which model, the chat template, the
token count against the context, sampling settings, tools and grammars. The engine sees only
`GenerationRequest`s; the client sees only protocol models. A request with `n` choices (or
several prompts) becomes several engine requests that decode in the same batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import pydantic_core
from jinja2 import TemplateError

from . import protocol as wire
from .choice import ChoiceAssembler, ChoiceOptions, ChoiceUpdate
from .engine.engine import Engine, RequestStream
from .engine.remote import EngineProcess
from .engine.types import (
    EngineEvent,
    ErrorEvent,
    FinishEvent,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)
from .errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    ServerError,
    ServerOverloadedError,
)
from .metrics import RequestTimer, ServerMetrics
from .models.loader import LoadedModel
from .text.reasoning import THINK_END, THINK_START, prompt_ends_in_reasoning
from .text.tool_calls import ToolCallFormat, detect_tool_format, to_template_messages

if TYPE_CHECKING:
    from .pool import ModelPool

logger = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """A loaded model, its engine, and what requests need to know about it."""

    model_id: str
    loaded: LoadedModel
    engine: Engine | EngineProcess
    created: int = field(default_factory=wire.now)
    default_max_tokens: int = 2048
    default_template_kwargs: dict[str, Any] = field(default_factory=dict)
    weight_bytes: int = 0  # the model's parameters and any dense copies, in device memory
    _grammar_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _grammar: Any = field(default=None, repr=False)

    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer (mlx-lm's wrapper adds nothing the text layer needs)."""
        return getattr(self.loaded.tokenizer, "_tokenizer", self.loaded.tokenizer)

    @cached_property
    def chat_template(self) -> str | None:
        template = getattr(self.tokenizer, "chat_template", None)
        return template if isinstance(template, str) else None

    @cached_property
    def tool_format(self) -> ToolCallFormat | None:
        return detect_tool_format(self.chat_template)

    @cached_property
    def reasoning(self) -> bool:
        """Whether the model writes `<think>…</think>` (both are single tokens of its vocabulary)."""
        vocab = self.tokenizer.get_vocab()
        return THINK_START in vocab and THINK_END in vocab

    def grammar_compiler(self) -> Any:
        """Built on first use (about a second): most requests never need one."""
        with self._grammar_lock:
            if self._grammar is None:
                from .text.grammar import GrammarCompiler

                self._grammar = GrammarCompiler(
                    self.tokenizer, self.loaded.vocab_size, self.loaded.eos_token_ids
                )
            return self._grammar

    def render_chat(
        self, request: wire.ChatCompletionRequest, template_kwargs: dict[str, Any], tools: Any
    ) -> tuple[list[int], str]:
        messages = to_template_messages(
            [_message_dict(m) for m in request.messages]  # type: ignore[arg-type]
        )
        try:
            if self.chat_template:
                text = self.tokenizer.apply_chat_template(
                    messages,
                    tools=tools,
                    add_generation_prompt=True,
                    tokenize=False,
                    **template_kwargs,
                )
            else:
                text = _plain_prompt(messages)
        except TemplateError as error:
            raise InvalidRequestError(f"The chat template rejected the messages: {error}") from None
        return list(self.tokenizer.encode(text, add_special_tokens=False)), text

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt))
        if any(t >= self.loaded.vocab_size for t in prompt):
            raise InvalidRequestError(
                f"Token ids must be below the vocabulary size {self.loaded.vocab_size}.",
                param="prompt",
            )
        return list(prompt)


def _message_dict(message: wire.ChatMessage) -> dict[str, Any]:
    out = message.model_dump(exclude_none=True, include={"role", "name", "tool_call_id"})
    if message.role == "developer":
        out["role"] = "system"
    out["content"] = message.text()
    if message.tool_calls:
        out["tool_calls"] = [call.model_dump() for call in message.tool_calls]
    if message.reasoning_content is not None:
        out["reasoning_content"] = message.reasoning_content
    return out


def _plain_prompt(messages: list[dict[str, Any]]) -> str:
    """For models without a chat template: one `role: text` line per message."""
    lines = [f"{m['role']}: {m.get('content') or ''}" for m in messages]
    return "\n".join([*lines, "assistant:"])


def sampling_from(
    request: wire.SamplingFields, *, logprobs: bool, top_logprobs: int, seed: int | None
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
        seed=seed,
        logit_bias=bias,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


def _check_logit_bias(request: wire.SamplingFields, vocab_size: int) -> None:
    # Refused as OpenAI does, rather than ignored: a bias on no token is a mistake.
    for key in request.logit_bias or {}:
        if int(key) >= vocab_size:
            raise InvalidRequestError(
                f"Invalid key in 'logit_bias': {key}. Token ids must be below {vocab_size}.",
                param="logit_bias",
            )


def _choice_request(
    served: ServedModel,
    request: wire.SamplingFields,
    request_id: str,
    index: int,
    prompt: list[int],
    max_tokens: int,
    *,
    logprobs: bool,
    top_logprobs: int,
) -> GenerationRequest:
    """The engine request of choice `index` of `request`."""
    sampling = sampling_from(
        request,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        seed=_choice_seed(request.seed, index),
    )
    return GenerationRequest(
        request_id=request_id,
        prompt_tokens=prompt,
        max_tokens=max_tokens,
        sampling=sampling,
        stop_token_ids=served.loaded.eos_token_ids,
    )


def _choice_seed(seed: int | None, index: int) -> int | None:
    # Choices of one request differ from each other, yet each is reproducible.
    return None if seed is None else seed + index


@dataclass
class Choice:
    request: GenerationRequest
    assembler: ChoiceAssembler
    prompt_index: int = 0
    echo: str = ""


@dataclass
class Generation:
    """The engine requests of one API request, and how their events become choices."""

    served: ServedModel
    request_id: str
    choices: list[Choice]
    prompt_tokens: list[int]  # per distinct prompt
    timer: RequestTimer
    streams: list[RequestStream] = field(default_factory=list)
    finishes: list[FinishEvent | None] = field(default_factory=list)
    pending_update: ChoiceUpdate = field(default_factory=ChoiceUpdate)

    def start(self) -> None:
        """Submits every choice to the engine: the last check that can refuse (429)."""
        try:
            for choice in self.choices:
                self.streams.append(self.served.engine.submit(choice.request))
        except ServerOverloadedError:
            self.cancel()
            raise
        self.finishes = [None] * len(self.choices)

    def cancel(self) -> None:
        for stream in self.streams:
            stream.cancel()

    async def events(self) -> AsyncIterator[tuple[int, list[EngineEvent]]]:
        """Each choice's events in the batches they arrive in, interleaved across choices."""
        if len(self.streams) == 1:
            async for batch in self.streams[0].batches():
                yield 0, batch
            return
        queue: asyncio.Queue[tuple[int, list[EngineEvent] | None]] = asyncio.Queue()

        async def pump(index: int, stream: RequestStream) -> None:
            async for batch in stream.batches():
                queue.put_nowait((index, batch))
            queue.put_nowait((index, None))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            remaining = len(tasks)
            while remaining:
                index, item = await queue.get()
                if item is None:
                    remaining -= 1
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()

    def on_events(self, index: int, events: list[EngineEvent]) -> ChoiceUpdate:
        """Feeds a batch of one choice's events; their updates merged into one.

        An engine error is raised after the text before it was taken in, so the caller can
        still send that text (it is in `pending_update`) before the error.
        """
        merged = ChoiceUpdate()
        self.pending_update = merged
        for event in events:
            update = self.on_event(index, event)
            if update:
                _accumulate(merged, update)
        return merged

    def on_event(self, index: int, event: EngineEvent) -> ChoiceUpdate | None:
        """Feeds one engine event to its choice; raises the engine's error."""
        choice = self.choices[index]
        if isinstance(event, TokenEvent):
            self.timer.token(time.monotonic())
            update = choice.assembler.add(event)
            if choice.assembler.stopped:
                self.streams[index].cancel()
            return update
        if isinstance(event, FinishEvent):
            self.finishes[index] = event
            return None
        assert isinstance(event, ErrorEvent)
        self.timer.failed()
        raise event.error if isinstance(event.error, ServerError) else ServerError(str(event.error))

    def finish(self, index: int) -> tuple[ChoiceUpdate, str]:
        return self.choices[index].assembler.finish(self.finishes[index])

    def usage(self) -> wire.CompletionUsage:
        prompt = sum(len(p) for p in self.prompt_tokens)
        completion = sum(
            c.assembler.completion_tokens(f)
            for c, f in zip(self.choices, self.finishes, strict=True)
        )
        cached = sum(f.cached_tokens for f in self.finishes if f is not None and f.cached_tokens)
        cached = min(cached, prompt)
        self.timer.finished(time.monotonic(), prompt, completion)
        return wire.CompletionUsage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=wire.PromptTokensDetails(cached_tokens=cached),
        )


class ChatService:
    def __init__(self, pool: ModelPool, metrics: ServerMetrics | None = None) -> None:
        self.pool = pool
        self.metrics = metrics

    async def prepare_chat(self, request: wire.ChatCompletionRequest) -> Generation:
        """Everything that can fail with a 4xx, done before a response starts."""
        started = time.monotonic()
        served = await self.pool.get(request.model)
        _check_logit_bias(request, served.loaded.vocab_size)
        top_logprobs = request.top_logprobs or 0
        if top_logprobs and not request.logprobs:
            raise InvalidRequestError(
                "top_logprobs requires logprobs to be true.", param="top_logprobs"
            )
        tool_choice = request.tool_choice
        tools = [t.model_dump(exclude_none=True) for t in request.tools or []]
        if tool_choice is not None and tool_choice != "none" and not tools:
            raise InvalidRequestError("tool_choice needs tools.", param="tool_choice")
        if isinstance(tool_choice, wire.NamedToolChoice) and tool_choice.function.name not in {
            t["function"]["name"] for t in tools
        }:
            raise InvalidRequestError(
                f"tool_choice names '{tool_choice.function.name}', which is not among the tools.",
                param="tool_choice",
            )
        use_tools = bool(tools) and tool_choice != "none"
        forced_tool = use_tools and (
            tool_choice == "required" or isinstance(tool_choice, wire.NamedToolChoice)
        )
        response_format = request.response_format
        constrained = forced_tool or (
            response_format is not None and response_format.type != "text"
        )
        if use_tools and served.tool_format is None:
            raise InvalidRequestError(
                "This model's chat template declares no tool-call format.", param="tools"
            )
        template_kwargs = {**served.default_template_kwargs, **(request.chat_template_kwargs or {})}
        if constrained and served.reasoning:
            # A grammar starts at the first generated token, so thinking is switched off.
            template_kwargs["enable_thinking"] = False

        def render() -> tuple[list[int], str, Any]:
            prompt, text = served.render_chat(
                request, template_kwargs, tools if use_tools else None
            )
            return prompt, text, self._grammar(served, request, tools, forced_tool)

        prompt, prompt_text, grammar = await asyncio.to_thread(render)
        max_tokens = self._token_budget(served, len(prompt), request.token_limit(), "messages")
        options = ChoiceOptions(
            stops=request.stop_list(),
            reasoning=served.reasoning,
            starts_in_reasoning=served.reasoning and prompt_ends_in_reasoning(prompt_text),
            tool_format=served.tool_format if use_tools else None,
            tools=tools if use_tools else None,
            logprobs=request.logprobs,
        )
        request_id = wire.completion_id()
        choices = []
        for index in range(request.n):
            generation = _choice_request(
                served,
                request,
                f"{request_id}-{index}",
                index,
                prompt,
                max_tokens,
                logprobs=request.logprobs,
                top_logprobs=top_logprobs,
            )
            generation.grammar = grammar() if grammar else None
            choices.append(Choice(generation, ChoiceAssembler(served.tokenizer, options)))
        timer = RequestTimer(self.metrics, served.model_id, started)
        return Generation(served, request_id, choices, [prompt], timer)

    @staticmethod
    def _grammar(
        served: ServedModel,
        request: wire.ChatCompletionRequest,
        tools: list[dict[str, Any]],
        forced_tool: bool,
    ) -> Callable[[], Any] | None:
        """A factory of per-choice grammar matchers, or None; raises 400 for a bad schema."""
        fmt = request.response_format
        if not forced_tool and (fmt is None or fmt.type == "text"):
            return None
        from .text.grammar import GrammarError, GrammarMatcher

        compiler = served.grammar_compiler()
        try:
            if forced_tool:
                choice = request.tool_choice
                forced = choice.function.name if isinstance(choice, wire.NamedToolChoice) else None
                compiled = compiler.compile_tool_call(
                    tools, forced, parallel_tool_calls=request.parallel_tool_calls is not False
                )
            elif fmt is not None and fmt.type == "json_object":
                compiled = compiler.compile_json_object()
            else:
                assert fmt is not None
                if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                    raise InvalidRequestError(
                        "response_format json_schema needs json_schema.schema.",
                        param="response_format",
                    )
                compiled = compiler.compile_json_schema(
                    fmt.json_schema.schema_, strict=bool(fmt.json_schema.strict)
                )
        except GrammarError as error:
            param = "tools" if forced_tool else "response_format"
            raise InvalidRequestError(str(error), param=param) from None
        return lambda: GrammarMatcher(compiled)

    async def prepare_completion(self, request: wire.CompletionRequest) -> Generation:
        started = time.monotonic()
        served = await self.pool.get(request.model)
        _check_logit_bias(request, served.loaded.vocab_size)
        if request.suffix:
            raise InvalidRequestError("suffix is not supported.", param="suffix")
        if request.best_of is not None and request.best_of != request.n:
            raise InvalidRequestError("best_of other than n is not supported.", param="best_of")
        if request.echo and request.logprobs is not None:
            raise InvalidRequestError(
                "echo together with logprobs is not supported.", param="logprobs"
            )
        prompts = await asyncio.to_thread(
            lambda: [served.encode_prompt(p) for p in request.prompts()]
        )
        options = ChoiceOptions(stops=request.stop_list(), logprobs=request.logprobs is not None)
        request_id = wire.completion_id("cmpl")
        choices = []
        for prompt_index, prompt in enumerate(prompts):
            if not prompt:
                raise InvalidRequestError("A prompt must not be empty.", param="prompt")
            max_tokens = self._token_budget(served, len(prompt), request.max_tokens, "prompt", 16)
            echo = ""
            if request.echo:
                echo = served.tokenizer.decode(prompt)
            for index in range(request.n):
                generation = _choice_request(
                    served,
                    request,
                    f"{request_id}-{len(choices)}",
                    index,
                    prompt,
                    max_tokens,
                    logprobs=request.logprobs is not None,
                    top_logprobs=request.logprobs or 0,
                )
                assembler = ChoiceAssembler(served.tokenizer, options)
                choices.append(Choice(generation, assembler, prompt_index, echo))
        timer = RequestTimer(self.metrics, served.model_id, started)
        return Generation(served, request_id, choices, prompts, timer)

    @staticmethod
    def _token_budget(
        served: ServedModel, prompt_len: int, requested: int | None, param: str, default: int = 0
    ) -> int:
        context = served.loaded.context_length
        if prompt_len >= context or (requested is not None and prompt_len + requested > context):
            raise ContextLengthExceededError(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt_len + (requested or 0)} tokens ({prompt_len} in the {param}, "
                f"{requested or 0} in the completion). Please reduce the length of the {param} "
                "or completion.",
                param=param,
            )
        limit = requested or default or served.default_max_tokens
        return min(limit, context - prompt_len)


# Chat responses --------------------------------------------------------------------------


def _merge_tool_calls(deltas: list[Any]) -> list[wire.ToolCall]:
    calls: dict[int, dict[str, str]] = {}
    for delta in deltas:
        call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
        call["id"] = delta.id or call["id"]
        call["name"] = delta.name or call["name"]
        call["arguments"] += delta.arguments_delta
    return [
        wire.ToolCall(
            id=c["id"], function=wire.FunctionCall(name=c["name"], arguments=c["arguments"])
        )
        for _, c in sorted(calls.items())
    ]


async def chat_completion(generation: Generation) -> wire.ChatCompletion:
    collected = [ChoiceUpdate() for _ in generation.choices]
    try:
        async for index, events in generation.events():
            _accumulate(collected[index], generation.on_events(index, events))
    finally:
        generation.cancel()
    choices = []
    for index, total in enumerate(collected):
        tail, reason = generation.finish(index)
        _accumulate(total, tail)
        calls = _merge_tool_calls(total.tool_calls) if total.tool_calls else None
        message = wire.ResponseMessage(
            content=total.content if total.content or not calls else None,
            reasoning_content=total.reasoning or None,
            reasoning=total.reasoning or None,
            tool_calls=calls,
        )
        logprobs = (
            wire.ChoiceLogprobs(content=total.logprobs)
            if generation.choices[index].assembler.options.logprobs
            else None
        )
        choices.append(
            wire.Choice(index=index, message=message, finish_reason=reason, logprobs=logprobs)
        )
    return wire.ChatCompletion(
        id=generation.request_id,
        created=wire.now(),
        model=generation.served.model_id,
        choices=choices,
        usage=generation.usage(),
    )


def _accumulate(total: ChoiceUpdate, update: ChoiceUpdate) -> None:
    total.content += update.content
    total.reasoning += update.reasoning
    total.tool_calls.extend(update.tool_calls)
    total.logprobs.extend(update.logprobs)


def _chat_delta(update: ChoiceUpdate) -> wire.ChoiceDelta:
    tool_calls = None
    if update.tool_calls:
        tool_calls = [
            wire.ToolCallDelta(
                index=d.index,
                id=d.id,
                type="function" if d.id else None,
                function=wire.ToolCallFunctionDelta(name=d.name, arguments=d.arguments_delta),
            )
            for d in update.tool_calls
        ]
    return wire.ChoiceDelta(
        content=update.content or None,
        reasoning_content=update.reasoning or None,
        reasoning=update.reasoning or None,
        tool_calls=tool_calls,
    )


class ContentChunks:
    """The bytes of content-only chunks, which most of a stream is, from one rendering.

    `render(text)` gives a chunk whose only varying part is `text`, as the wire models render
    it; the text's place in it is found once through a marker, and each chunk after that only
    serialises its text (with pydantic's own serializer): under 1 us a token instead of ~5 us
    of building and dumping models (`bench/token_path.py`), on the event loop that shares the
    interpreter lock with the engine thread.
    """

    _MARK = "\0"  # renders as "\u0000", which nothing else in a chunk contains

    def __init__(self, render: Callable[[str], bytes]) -> None:
        sample = render(self._MARK)
        mark = pydantic_core.to_json(self._MARK)
        start = sample.rindex(mark)
        self._head, self._tail = sample[:start], sample[start + len(mark) :]

    def __call__(self, text: str) -> bytes:
        return self._head + pydantic_core.to_json(text) + self._tail


async def chat_stream(
    generation: Generation, include_usage: bool, logprobs: bool
) -> AsyncIterator[bytes]:
    """Server-sent events: the role, increments, each choice's finish, then [DONE]."""
    created = wire.now()

    def chunk(choices: list[wire.ChunkChoice], usage: wire.CompletionUsage | None = None) -> bytes:
        body = wire.ChatCompletionChunk(
            id=generation.request_id,
            created=created,
            model=generation.served.model_id,
            choices=choices,
            usage=usage,
        )
        return _sse(body.model_dump_json(exclude_none=True))

    def piece(index: int, update: ChoiceUpdate, reason: str | None = None) -> bytes:
        chosen = (
            wire.ChoiceLogprobs(content=update.logprobs) if logprobs and update.logprobs else None
        )
        return chunk(
            [
                wire.ChunkChoice(
                    index=index, delta=_chat_delta(update), finish_reason=reason, logprobs=chosen
                )
            ]
        )

    templates: dict[int, ContentChunks] = {}

    def content_piece(index: int, text: str) -> bytes:
        template = templates.get(index)
        if template is None:
            template = ContentChunks(lambda t: piece(index, ChoiceUpdate(content=t)))
            templates[index] = template
        return template(text)

    try:
        for index in range(len(generation.choices)):
            yield chunk(
                [
                    wire.ChunkChoice(
                        index=index, delta=wire.ChoiceDelta(role="assistant", content="")
                    )
                ]
            )
        try:
            async for index, events in generation.events():
                update = generation.on_events(index, events)
                if update.content and not (
                    update.reasoning or update.tool_calls or update.logprobs
                ):
                    yield content_piece(index, update.content)
                elif update:
                    yield piece(index, update)
        except ServerError as error:
            # The stream has started: the error goes as an event, and the stream still ends well.
            if generation.pending_update:
                yield piece(index, generation.pending_update)
            yield _sse(json.dumps(error.to_dict()))
            yield _sse("[DONE]")
            return
        for index in range(len(generation.choices)):
            tail, reason = generation.finish(index)
            yield piece(index, tail, reason)
        usage = generation.usage()
        if include_usage:
            yield chunk([], usage)
        yield _sse("[DONE]")
    finally:
        generation.cancel()


# Text completions ------------------------------------------------------------------------


class _CompletionLogprobs:
    """OpenAI's legacy logprobs layout: parallel lists of tokens, logprobs and offsets."""

    def __init__(self, tokenizer: Any, start_offset: int) -> None:
        self.tokenizer = tokenizer
        self.offset = start_offset
        self.value = wire.CompletionLogprobs(
            tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[]
        )

    def add(self, entries: list[wire.TokenLogprob], text: str) -> wire.CompletionLogprobs:
        part = wire.CompletionLogprobs(
            tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[]
        )
        for entry in entries:
            for target in (self.value, part):
                target.tokens.append(entry.token)
                target.token_logprobs.append(entry.logprob)
                target.top_logprobs.append({t.token: t.logprob for t in entry.top_logprobs})
                target.text_offset.append(self.offset)
        self.offset += len(text)
        return part


async def text_completion(generation: Generation, logprobs: bool) -> wire.Completion:
    texts = [c.echo for c in generation.choices]
    tracks = [_CompletionLogprobs(generation.served.tokenizer, len(t)) for t in texts]
    try:
        async for index, events in generation.events():
            update = generation.on_events(index, events)
            tracks[index].add(update.logprobs, update.content)
            texts[index] += update.content
    finally:
        generation.cancel()
    choices = []
    for index in range(len(generation.choices)):
        tail, reason = generation.finish(index)
        tracks[index].add(tail.logprobs, tail.content)
        texts[index] += tail.content
        choices.append(
            wire.CompletionChoice(
                index=index,
                text=texts[index],
                finish_reason=reason,
                logprobs=tracks[index].value if logprobs else None,
            )
        )
    return wire.Completion(
        id=generation.request_id,
        created=wire.now(),
        model=generation.served.model_id,
        choices=choices,
        usage=generation.usage(),
    )


async def text_stream(
    generation: Generation, include_usage: bool, logprobs: bool
) -> AsyncIterator[bytes]:
    created = wire.now()
    tracks = [
        _CompletionLogprobs(generation.served.tokenizer, len(c.echo)) for c in generation.choices
    ]

    def chunk(index: int, text: str, reason: str | None, part: Any) -> bytes:
        body = wire.Completion(
            id=generation.request_id,
            created=created,
            model=generation.served.model_id,
            choices=[
                wire.CompletionChoice(
                    index=index,
                    text=text,
                    finish_reason=reason,
                    logprobs=part if logprobs else None,
                )
            ],
        )
        return _sse(body.model_dump_json(exclude_none=True))

    try:
        for index, choice in enumerate(generation.choices):
            if choice.echo:
                yield chunk(index, choice.echo, None, None)
        try:
            async for index, events in generation.events():
                update = generation.on_events(index, events)
                if update:
                    part = tracks[index].add(update.logprobs, update.content)
                    yield chunk(index, update.content, None, part)
        except ServerError as error:
            yield _sse(json.dumps(error.to_dict()))
            yield _sse("[DONE]")
            return
        for index in range(len(generation.choices)):
            tail, reason = generation.finish(index)
            yield chunk(index, tail.content, reason, tracks[index].add(tail.logprobs, tail.content))
        usage = generation.usage()
        if include_usage:
            body = wire.Completion(
                id=generation.request_id,
                created=created,
                model=generation.served.model_id,
                choices=[],
                usage=usage,
            )
            yield _sse(body.model_dump_json(exclude_none=True))
        yield _sse("[DONE]")
    finally:
        generation.cancel()


def _sse(data: str) -> bytes:
    return f"data: {data}\n\n".encode()
