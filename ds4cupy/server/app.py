"""The aiohttp application: routes, API key and body-size checks, SSE streaming.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models (+ /v1/models/{name}), GET /health,
GET /metrics. Handlers validate with `protocol`, render and tokenize the prompt on a one-thread "prep" executor (so
arrival order is kept and the event loop never blocks on a long prompt), submit a `GenerationJob` to the
`EngineWorker`, then turn its events into a JSON response or an SSE stream. While a job waits or prefills, the stream
gets `: keepalive` comments; its first chunk (the assistant role) leaves together with the first generated token, so a
client's time to first chunk is the queue wait plus the prefill. A client that goes away cancels its job.

Every route goes through the same middlewares (outermost first): OpenAI error objects for every failure (405 with
`Allow`; 500s with a generic message and a request id, details in the log), CORS preflights (guards.cors), the API key
(/v1/* and /metrics unless metrics_public), refusal while draining or when the model file changed (503), and the body
guard (JSON only, size and time limits: guards.body_guard). Prompts longer than ctx x the tokenizer's longest token in
bytes are refused before tokenizing; message text is tokenized as plain text (text.chat.render_prompt).

Model names: the served name (--served-model-name, default deepseek-v4-flash), its extra aliases, and the thinking
aliases deepseek-chat (thinking off) and deepseek-reasoner (on); any other name is a 404 model_not_found.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import orjson
from aiohttp import web

from ..text.constraints import GrammarError, check_grammar
from . import controls as ctl
from . import protocol
from .guards import DEFAULT_BODY_TIMEOUT_S, body_guard, cors
from .metrics import ServerMetrics
from .prefix_cache import PrefixCache
from .protocol import ProtocolError
from .transport import DEFAULT_HEADER_TIMEOUT_S, GuardedRunner
from .worker import (MODEL_FILE_CHANGED, SHUTTING_DOWN, EngineWorker, EventChannel, GenerationJob, JobCancelled,
                     JobFailed, JobFinished, JobStarted, PrefillProgress, TokenDelta, real_generator_factory)

log = logging.getLogger("ds4cupy.server")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_SHUTDOWN_GRACE_S = 10.0
FALLBACK_MAX_TOKEN_BYTES = 256      # for tokenizers that do not say how long their longest token is
DEFAULT_KEEPALIVE_S = 5.0
DISCONNECT_POLL_S = 0.25

# (messages, tools, thinking) -> the prompt: text (tokenized with tokenizer.encode) or (text, is_template) parts
# (tokenized with tokenizer.encode_parts: added-token strings are control tokens only in template parts)
PromptRenderer = Callable[[list, list, protocol.ThinkingChoice], Any]


def render_chat_prompt(messages: list[dict], tools: list[dict], thinking: protocol.ThinkingChoice) -> list:
    """The DeepSeek-V4 prompt for validated messages as PromptParts (ds4cupy.text.chat.render_prompt; BOS included):
    message text stays plain text when tokenized."""
    from ..text.chat import render_prompt
    return render_prompt(messages, thinking_mode=thinking.thinking_mode, reasoning_effort=thinking.reasoning_effort,
                         tools=tools or None)


@dataclass
class ServerSettings:
    """What the app serves and how."""
    model_name: str = protocol.DEFAULT_MODEL_NAME
    ctx: int = 32768
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    keepalive_s: float = DEFAULT_KEEPALIVE_S
    demo: bool = False                   # the built-in random-weights model: said in /v1/models and /health
    metrics_public: bool = False         # /metrics without the API key
    cors_origins: tuple[str, ...] = ()   # origins allowed to call from a browser ("*": any)
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S
    aliases: tuple[str, ...] = (protocol.NON_THINKING_ALIAS, protocol.THINKING_ALIAS)
    created: int = field(default_factory=protocol.now)

    @property
    def model_names(self) -> tuple[str, ...]:
        """Every name a request may give as `model` (the served name first)."""
        return (self.model_name, *(a for a in self.aliases if a != self.model_name))


@dataclass
class ServerState:
    """Everything the handlers share: settings, tokenizer, renderer, worker, metrics, the prep executor."""
    settings: ServerSettings
    tokenizer: Any
    worker: EngineWorker
    metrics: ServerMetrics
    render: PromptRenderer
    prep: concurrent.futures.ThreadPoolExecutor
    turn_ids: frozenset[int] = frozenset()
    request_counter: int = 0
    file_problem: Callable[[], str | None] = lambda: None    # why the model cannot serve from its file, or None
    draining: bool = False               # shutting down: new requests get 503
    in_flight: int = 0                   # requests inside the handlers

    def next_request_id(self, prefix: str) -> str:
        self.request_counter += 1
        return f"{prefix}-{self.request_counter:06d}{uuid.uuid4().hex[:12]}"


STATE = web.AppKey("ds4cupy_state", ServerState)


# ------------------------------------------------------------------------------------------------------- responses

def json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")


def error_response(err: ProtocolError) -> web.Response:
    return json_response(err.body(), status=err.status)


_STATUS_ERROR_TYPES = {401: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
                       413: "invalid_request_error", 500: "server_error", 503: "server_error"}


def http_error(status: int, message: str, code: str | None = None, param: str | None = None) -> ProtocolError:
    return ProtocolError(status, message, type=_STATUS_ERROR_TYPES.get(status, "invalid_request_error"),
                         param=param, code=code)


# ------------------------------------------------------------------------------------------------------ middleware

def _endpoint_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def openai_errors_middleware(request: web.Request, handler):
    """Every failure leaves as an OpenAI error object; every request is counted by endpoint and status."""
    state = request.app[STATE]
    state.in_flight += 1
    try:
        response = await handler(request)
    except ProtocolError as err:
        response = error_response(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status)
        response = error_response(http_error(exc.status, exc.reason if exc.status != 404 else
                                             f"no route for {request.method} {request.path}", code))
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
    except ConnectionResetError:            # the client left before a non-streaming answer was ready
        log.info("%s %s: client disconnected", request.method, request.path)
        response = web.Response(status=499)  # nginx's "client closed request", for the metrics only
    except asyncio.CancelledError:
        raise
    except Exception:
        rid = f"req-{uuid.uuid4().hex[:16]}"
        log.exception("unhandled error for %s %s (request id %s)", request.method, request.path, rid)
        response = error_response(http_error(500, f"internal server error (request id {rid}; the details are in "
                                                  f"the server log)", "internal_error"))
    finally:
        state.in_flight -= 1
    state.metrics.record_request(_endpoint_label(request), response.status)
    return response


@web.middleware
async def api_key_middleware(request: web.Request, handler):
    """With --api-key, /v1/* and /metrics (unless metrics_public) need `Authorization: Bearer <key>` (401 otherwise).
    /health stays open."""
    settings = request.app[STATE].settings
    key = settings.api_key
    if key and (request.path.startswith("/v1/") or (request.path == "/metrics" and not settings.metrics_public)):
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise http_error(401, "Incorrect API key provided." if header else
                             "You didn't provide an API key (Authorization: Bearer <key>).", "invalid_api_key")
    return await handler(request)


@web.middleware
async def availability_middleware(request: web.Request, handler):
    """503 for work the server cannot do now: any /v1/ POST while draining, or while the model file has changed
    under an mmap'd model (checked before the body is read, let alone tokenized)."""
    state = request.app[STATE]
    if request.method == "POST" and request.path.startswith("/v1/"):
        if state.draining:
            raise http_error(503, "the server is shutting down", SHUTTING_DOWN)
        problem = state.file_problem()
        if problem is not None:
            raise http_error(503, problem, MODEL_FILE_CHANGED)
    return await handler(request)


# --------------------------------------------------------------------------------------------------------- helpers

async def read_json_body(request: web.Request, limit: int) -> Any:
    """The decoded body: 413 past `limit` bytes, 400 for malformed JSON."""
    if request.content_length is not None and request.content_length > limit:
        raise http_error(413, f"request body of {request.content_length} bytes exceeds the {limit}-byte limit",
                         "request_too_large")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise http_error(413, f"request body exceeds the {limit}-byte limit", "request_too_large") from None
    if len(raw) > limit:
        raise http_error(413, f"request body of {len(raw)} bytes exceeds the {limit}-byte limit", "request_too_large")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise protocol.invalid(f"malformed JSON body: {exc}", None, "invalid_json") from None


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


@dataclass
class PreparedPrompt:
    ids: list[int]
    max_tokens: int
    checkpoints: list[int]        # where the worker should snapshot: right after the last turn-start token


USER_TURN_TOKEN = "<｜User｜>"


def turn_start_ids(tokenizer) -> frozenset[int]:
    """Token ids that open a user turn (snapshot points for prefix reuse); empty when the tokenizer has none."""
    try:
        if getattr(tokenizer, "has_special", None) and tokenizer.has_special(USER_TURN_TOKEN):
            return frozenset({int(tokenizer.special_id(USER_TURN_TOKEN))})
    except (KeyError, ValueError):
        pass
    return frozenset()


def last_turn_checkpoint(ids: list[int], turn_ids: frozenset[int]) -> list[int]:
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] in turn_ids:
            return [i + 1]
    return []


def prompt_byte_bound(state: ServerState) -> int:
    """The most UTF-8 bytes a prompt that fits the context can have: ctx tokens of at most max_token_bytes each."""
    per_token = getattr(state.tokenizer, "max_token_bytes", None) or FALLBACK_MAX_TOKEN_BYTES
    return state.settings.ctx * int(per_token)


def tokenize_prompt(state: ServerState, rendered: Any) -> list[int]:
    """Token ids of a rendered prompt (text or PromptParts), refused by byte length before any tokenizing when it
    cannot fit the context."""
    texts = [rendered] if isinstance(rendered, str) else [part[0] for part in rendered]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    bound = prompt_byte_bound(state)
    if n_bytes > bound:
        raise ProtocolError(400, f"This model's maximum context length is {state.settings.ctx} tokens. However, your "
                                 f"prompt has {n_bytes} bytes, more than {state.settings.ctx} tokens can hold "
                                 f"({bound} bytes).", param="messages", code="context_length_exceeded")
    if isinstance(rendered, str):
        return list(state.tokenizer.encode(rendered))
    return list(state.tokenizer.encode_parts(rendered))


async def prepare_prompt(state: ServerState, messages: list[dict], tools: list[dict],
                         thinking: protocol.ThinkingChoice, max_tokens: int | None,
                         grammar: tuple[str, str] | None = None) -> PreparedPrompt:
    """Render + tokenize on the prep thread; refuse prompts that leave no room in the context (by byte length before
    tokenizing, then by token count). The reply budget is max_tokens clamped to the room left (generation ends with
    finish_reason "length" when the context is full). `grammar` (text, the field it comes from) is compiled there
    too: one that does not compile is a 400."""
    def work() -> list[int]:
        if grammar is not None:
            try:
                check_grammar(state.tokenizer, grammar[0])
            except GrammarError as exc:
                raise protocol.invalid(f"'{grammar[1]}' cannot be enforced: {exc}", grammar[1],
                                       "invalid_schema") from None
        return tokenize_prompt(state, state.render(messages, tools, thinking))

    loop = asyncio.get_running_loop()
    try:
        ids = await loop.run_in_executor(state.prep, work)
    except ProtocolError:
        raise
    except (ValueError, TypeError, KeyError) as exc:        # the chat encoder refused the conversation
        raise protocol.invalid(f"cannot render the conversation: {exc}", "messages", "invalid_messages") from None
    ctx = state.settings.ctx
    if not ids:
        raise protocol.invalid("the prompt rendered to no tokens", "messages", "invalid_messages")
    if len(ids) >= ctx:
        raise protocol.context_exceeded(len(ids), ctx)
    room = ctx - len(ids)
    return PreparedPrompt(ids, room if max_tokens is None else min(max_tokens, room),
                          last_turn_checkpoint(ids, state.turn_ids))


class JobRun:
    """Submits one job and iterates its events, cancelling the job if the caller stops early (disconnect, error)."""

    def __init__(self, state: ServerState, request: web.Request, job: GenerationJob, model: str):
        self.state, self.request, self.job, self.model = state, request, job, model
        self.queue_position = 0
        self.last_write = time.monotonic()

    @property
    def headers(self) -> dict:
        """Response headers: the queue position the request got on arrival (0: the engine was idle)."""
        return {"X-Queue-Position": str(self.queue_position)}

    async def events(self):
        """Yields worker events; yields None when a keepalive is due (no event for keepalive_s seconds)."""
        keepalive_s = self.state.settings.keepalive_s
        poll = min(keepalive_s, DISCONNECT_POLL_S)
        while True:
            if client_gone(self.request):
                raise ConnectionResetError("client disconnected")
            event = await self.job.channel.get(timeout=poll)
            if event is None or isinstance(event, (PrefillProgress, JobStarted)):
                if time.monotonic() - self.last_write >= keepalive_s:
                    yield None
                if event is None:
                    continue
            yield event
            if isinstance(event, (JobFinished, JobCancelled, JobFailed)):
                return

    def wrote(self) -> None:
        self.last_write = time.monotonic()

    def cancel(self) -> None:
        if not self.job.cancel.is_set():
            self.job.cancel.set()
            self.state.metrics.record_cancel()


def reported_model(state: ServerState, requested: str | None) -> str:
    """The `model` field of responses: the requested name (one of ours: check_model ran), else the served name."""
    return requested if requested is not None else state.settings.model_name


def check_model(state: ServerState, requested: str | None) -> None:
    """404 model_not_found for a name that is neither the served name nor an alias (no name: the served model)."""
    names = state.settings.model_names
    if requested is not None and requested not in names:
        raise http_error(404, f"The model '{requested}' does not exist; this server serves {', '.join(names)}",
                         "model_not_found", "model")


def parse_controls(state: ServerState, body: dict, endpoint: str) -> ctl.GenerationControls:
    controls = ctl.parse_controls(body, endpoint)
    if controls.adjust.logit_bias:
        ctl.check_token_ids(controls, int(getattr(state.tokenizer, "n_vocab", 0) or 0))
    return controls


def with_response_format(messages: list[dict], schema: dict | None) -> list[dict]:
    """The messages with `response_format` on the first (system) message, where DeepSeek-V4's encoding renders it
    (a new empty system message is put first when there is none), as text.chat.encode_messages does."""
    if schema is None:
        return messages
    if messages and messages[0].get("role") == "system":
        return [{**messages[0], "response_format": schema}] + messages[1:]
    return [{"role": "system", "content": "", "response_format": schema}] + messages


def usage_from(finished: JobFinished) -> dict:
    return protocol.usage_object(finished.prompt_tokens, finished.completion_tokens, finished.cached_tokens)


# -------------------------------------------------------------------------------------------------------- handlers

async def handle_chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await read_json_body(request, state.settings.max_body_bytes)
    chat = protocol.parse_chat_request(body, ctx=state.settings.ctx)
    check_model(state, chat.model)
    controls = parse_controls(state, body, "chat")
    chat.thinking = ctl.template_thinking(body, chat.thinking)
    grammar = ctl.chat_grammar(chat, controls)
    if grammar is not None and (controls.ignore_eos or controls.adjust.min_tokens):
        raise protocol.invalid(f"'{grammar[1]}' ends the answer with EOS: it cannot be combined with ignore_eos or "
                               f"min_tokens", "ignore_eos" if controls.ignore_eos else "min_tokens", "invalid_value")
    messages = with_response_format(chat.messages, ctl.response_format_prompt(controls.response_format))
    prompt = await prepare_prompt(state, messages, chat.offered_tools, chat.thinking, chat.max_tokens, grammar)
    job = GenerationJob(request_id=state.next_request_id("chatcmpl"), prompt_ids=prompt.ids,
                        max_tokens=prompt.max_tokens, sampling=chat.sampling, stop=chat.stop,
                        thinking=chat.thinking.enabled, parse_tools=bool(chat.offered_tools),
                        checkpoints=prompt.checkpoints, controls=controls,
                        grammar=None if grammar is None else grammar[0], channel=EventChannel())
    run = JobRun(state, request, job, model=reported_model(state, chat.model))
    run.queue_position = state.worker.submit(job)
    extras = ctl.TokenExtras(controls, state.tokenizer)
    if chat.stream:
        return await stream_chat(run, chat, extras)
    return await collect_chat(run, chat, extras)


def _chat_delta_fields(delta: Any, with_reasoning: bool = True) -> dict:
    out: dict[str, Any] = {}
    if with_reasoning and getattr(delta, "reasoning", None):
        out["reasoning_content"] = delta.reasoning
    if getattr(delta, "content", None):
        out["content"] = delta.content
    tool_calls = getattr(delta, "tool_calls", None)
    if tool_calls:
        out["tool_calls"] = [protocol.tool_call_delta(t) for t in tool_calls]
    return out


async def stream_sse(run: JobRun, opening: list[dict], delta_chunk: Callable[[Any], dict | None],
                     closing: Callable[[JobFinished], list[dict]]) -> web.StreamResponse:
    """The SSE loop of every streaming endpoint: the headers at once, keepalive comments while the engine is quiet,
    the `opening` chunks together with the first token delta's chunk (so that no chunk leaves before the prefill
    is done), one chunk per later delta (delta_chunk returns None for a delta with nothing to send), the `closing`
    chunks and [DONE] when the job finishes, an error event on an engine failure; the job is cancelled if the
    client leaves."""
    response = sse_response(run.headers)
    done = False
    held = list(opening)

    def events(chunks: list[dict]) -> bytes:
        nonlocal held
        out = b"".join(protocol.sse_event(c) for c in held + chunks)
        held = []
        return out

    try:
        await response.prepare(run.request)
        run.wrote()
        async for event in run.events():
            if event is None:
                await response.write(protocol.SSE_KEEPALIVE)
                run.wrote()
            elif isinstance(event, TokenDelta):
                chunk = delta_chunk(event.delta)
                data = events([] if chunk is None else [chunk])
                if data:
                    await response.write(data)
                    run.wrote()
            elif isinstance(event, JobFinished):
                done = True
                await response.write(events(closing(event)) + protocol.SSE_DONE)
            elif isinstance(event, JobFailed):
                done = True
                await response.write(protocol.sse_event(job_error(event).body()))
                await response.write(protocol.SSE_DONE)
            elif isinstance(event, JobCancelled):
                done = True
        await response.write_eof()
    except ConnectionResetError:
        log.info("request %s: client disconnected, generation cancelled", run.job.request_id)
    finally:
        if not done:
            run.cancel()
    return response


async def stream_chat(run: JobRun, chat: protocol.ChatRequest, extras: ctl.TokenExtras) -> web.StreamResponse:
    rid, model, created = run.job.request_id, run.model, protocol.now()
    saw_tool_calls = False

    def chunk(delta: dict, finish: str | None = None, with_extras: bool = False) -> dict:
        return protocol.chat_chunk(rid, model, created, delta, finish, include_usage=chat.include_usage,
                                   extras=extras.chat() if with_extras and extras.active else None)

    def delta_chunk(delta) -> dict | None:
        nonlocal saw_tool_calls
        extras.add(delta)
        fields = _chat_delta_fields(delta)
        saw_tool_calls = saw_tool_calls or "tool_calls" in fields
        return chunk(fields, with_extras=True) if fields else None

    def closing(event: JobFinished) -> list[dict]:
        finish = "tool_calls" if saw_tool_calls and event.finish_reason == "stop" else event.finish_reason
        usage = [protocol.chat_usage_chunk(rid, model, created, usage_from(event))] if chat.include_usage else []
        return [chunk({}, finish, with_extras=True)] + usage

    return await stream_sse(run, [chunk({"role": "assistant", "content": ""})], delta_chunk, closing)


def job_error(event: JobFailed) -> ProtocolError:
    """The OpenAI error for a failed job (500 engine error, 503 shutting down / model file changed)."""
    return http_error(getattr(event, "status", 500), event.message, getattr(event, "code", "engine_error"))


async def collect(run: JobRun, on_delta: Callable[[Any], None]) -> JobFinished:
    """Wait for a non-streaming job: every token delta goes to on_delta; the JobFinished event is returned. An engine
    failure becomes a 500; the job is cancelled if the client leaves."""
    finished: JobFinished | None = None
    try:
        async for event in run.events():
            if isinstance(event, TokenDelta):
                on_delta(event.delta)
            elif isinstance(event, JobFinished):
                finished = event
            elif isinstance(event, JobFailed):
                raise job_error(event)
            elif isinstance(event, JobCancelled):
                raise ConnectionResetError("cancelled")
    finally:
        if finished is None:
            run.cancel()
    return finished


async def collect_chat(run: JobRun, chat: protocol.ChatRequest, extras: ctl.TokenExtras) -> web.Response:
    content, reasoning = [], []
    tools = protocol.ToolCallAccumulator()

    def on_delta(d) -> None:
        extras.add(d)
        if getattr(d, "reasoning", None):
            reasoning.append(d.reasoning)
        if getattr(d, "content", None):
            content.append(d.content)
        for t in getattr(d, "tool_calls", None) or ():
            tools.add(t)

    finished = await collect(run, on_delta)
    calls = tools.calls()
    finish = "tool_calls" if calls and finished.finish_reason == "stop" else finished.finish_reason
    response = json_response(protocol.chat_completion(
        run.job.request_id, run.model, protocol.now(), content="".join(content),
        reasoning="".join(reasoning), tool_calls=calls, finish_reason=finish, usage=usage_from(finished),
        extras=extras.chat() if extras.active else None, **prompt_ids(run.job, extras)))
    response.headers.update(run.headers)
    return response


async def handle_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await read_json_body(request, state.settings.max_body_bytes)
    comp = protocol.parse_completion_request(body, ctx=state.settings.ctx)
    check_model(state, comp.model)
    controls = parse_controls(state, body, "completions")
    comp.thinking = ctl.template_thinking(body, comp.thinking)
    prompt = await prepare_prompt(state, comp.messages(), [], comp.thinking, comp.max_tokens)
    job = GenerationJob(request_id=state.next_request_id("cmpl"), prompt_ids=prompt.ids,
                        max_tokens=prompt.max_tokens, sampling=comp.sampling, stop=comp.stop,
                        thinking=comp.thinking.enabled, parse_tools=False, checkpoints=prompt.checkpoints,
                        controls=controls, channel=EventChannel())
    run = JobRun(state, request, job, model=reported_model(state, comp.model))
    run.queue_position = state.worker.submit(job)
    model, created = run.model, protocol.now()
    extras = ctl.TokenExtras(controls, state.tokenizer)

    def held() -> dict | None:
        return extras.completion() if extras.active else None

    if not comp.stream:
        text: list[str] = []

        def on_delta(d) -> None:
            extras.add(d)
            if getattr(d, "content", None):
                text.append(d.content)

        finished = await collect(run, on_delta)
        response = json_response(protocol.text_completion(job.request_id, model, created, text="".join(text),
                                                          finish_reason=finished.finish_reason,
                                                          usage=usage_from(finished), extras=held(),
                                                          **prompt_ids(job, extras)))
        response.headers.update(run.headers)
        return response
    rid = job.request_id

    def delta_chunk(delta) -> dict | None:
        extras.add(delta)
        text = getattr(delta, "content", None)
        return protocol.text_chunk(rid, model, created, text, include_usage=comp.include_usage,
                                   extras=held()) if text else None

    def closing(event: JobFinished) -> list[dict]:
        usage = [protocol.text_usage_chunk(rid, model, created, usage_from(event))] if comp.include_usage else []
        return [protocol.text_chunk(rid, model, created, "", event.finish_reason, include_usage=comp.include_usage,
                                    extras=held())] + usage

    return await stream_sse(run, [], delta_chunk, closing)


def prompt_ids(job: GenerationJob, extras: ctl.TokenExtras) -> dict:
    """vLLM's top-level `prompt_token_ids` of a non-streaming response with return_token_ids."""
    return {"prompt_token_ids": list(job.prompt_ids)} if extras.return_ids else {}


def sse_response(extra_headers: dict | None = None) -> web.StreamResponse:
    return web.StreamResponse(status=200, headers={
        "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no", **(extra_headers or {})})


async def handle_models(request: web.Request) -> web.Response:
    s = request.app[STATE].settings
    return json_response(protocol.model_list(list(s.model_names), s.created, s.ctx))


async def handle_model(request: web.Request) -> web.Response:
    s = request.app[STATE].settings
    name = request.match_info["name"]
    if name not in s.model_names:
        raise http_error(404, f"The model '{name}' does not exist", "model_not_found", "model")
    return json_response(protocol.model_card(name, s.created, s.ctx))


async def handle_health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    s = state.settings
    problem = state.file_problem()
    status = ("model file changed" if problem else "engine stopped" if not state.worker.alive
              else "shutting down" if state.draining else "ok")
    body = {"status": status, "model": s.model_name, "ctx": s.ctx, "demo_model_random_weights": s.demo,
            "queue_depth": state.worker.queue_depth, "engine_busy": state.worker.busy}
    if problem:
        body["model_file"] = problem
    return json_response(body, status=200 if status == "ok" else 503)


async def handle_metrics(request: web.Request) -> web.Response:
    return web.Response(text=request.app[STATE].metrics.render(), content_type="text/plain",
                        headers={"X-Prometheus-Format": "0.0.4"})


# ------------------------------------------------------------------------------------------------------- app setup

def create_app(tokenizer, session, settings: ServerSettings, *, render: PromptRenderer | None = None,
               make_generator=None, prefill_chunk: int | None = None,
               prefix_cache: PrefixCache | None = None, file_problem: Callable[[], str | None] | None = None
               ) -> web.Application:
    """Build the application around one session. `render` (messages, tools, thinking) -> prompt and `make_generator`
    (job -> Generator) default to ds4cupy.text.chat and ds4cupy.text.generate; tests pass fakes. `prefix_cache` keeps
    the stored session states (default: host memory only, PrefixCache's default budget). `file_problem` () -> reason
    or None says when the model can no longer serve from its file (loader.Model.file_problem): /health and requests
    then say 503."""
    metrics = ServerMetrics()
    worker_kwargs = {} if prefill_chunk is None else {"prefill_chunk": prefill_chunk}
    worker = EngineWorker(session, make_generator or real_generator_factory(tokenizer), metrics=metrics,
                          precheck=file_problem, cache=prefix_cache, **worker_kwargs)
    metrics.queue_depth = lambda: worker.queue_depth
    metrics.engine_busy = lambda: worker.busy
    metrics.cache_stats = worker.cache.stats
    state = ServerState(settings=settings, tokenizer=tokenizer, worker=worker, metrics=metrics,
                        render=render or render_chat_prompt,
                        prep=concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ds4cupy-prep"),
                        turn_ids=turn_start_ids(tokenizer))
    if file_problem is not None:
        state.file_problem = file_problem
    cors_preflight, cors_headers = cors(settings.cors_origins)
    # aiohttp's own limit sits just above ours so that we answer 413 in OpenAI's schema ourselves
    app = web.Application(middlewares=[openai_errors_middleware, cors_preflight, api_key_middleware,
                                       availability_middleware,
                                       body_guard(settings.max_body_bytes, settings.body_timeout_s)],
                          client_max_size=settings.max_body_bytes + 1)
    app.on_response_prepare.append(cors_headers)
    app[STATE] = state
    app.router.add_post("/v1/chat/completions", handle_chat_completions)
    app.router.add_post("/v1/completions", handle_completions)
    app.router.add_get("/v1/models", handle_models)
    app.router.add_get("/v1/models/{name}", handle_model)
    app.router.add_get("/health", handle_health)
    app.router.add_get("/metrics", handle_metrics)

    async def on_startup(app: web.Application) -> None:
        worker.start()

    async def on_shutdown(app: web.Application) -> None:
        worker.stop()
        worker.cache.close()               # queued disk writes finish
        state.prep.shutdown(wait=False, cancel_futures=True)

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    return app


class BackgroundServer:
    """Runs an app on its own event loop in a daemon thread (tests, notebooks). `port=0` picks a free port;
    `url` is set once listening. Use as a context manager or call start()/stop()."""

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0):
        self.app, self.host, self.port = app, host, port
        self.url: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="ds4cupy-server", daemon=True)

    def _main(self) -> None:
        self._loop = new_event_loop()
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except BaseException as exc:     # noqa: BLE001 - handed to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    async def _start(self) -> None:
        self._runner = GuardedRunner(self.app, header_timeout_s=self.app[STATE].settings.header_timeout_s)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.port = port
        self.url = f"http://{self.host}:{port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("server did not start")
        if self._error is not None:
            raise self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when uvloop is installed, else asyncio's default."""
    try:
        import uvloop
        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()
