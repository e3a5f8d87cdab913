"""What every route handler shares: settings and state, request reading, prompt preparation, the job run.

- `ServerSettings` (what the app serves and how) and `ServerState` (settings, tokenizer, renderer, worker, metrics,
  the one-thread "prep" executor, the Responses store), reached from a request as `request.app[STATE]`;
- `read_json_body` (413 past the limit, 400 for malformed JSON), `http_error`, `error_response` (in the shape of the API of the path),
  `json_response`, `sse_response`, `check_model` (404 for a name the server does not serve);
- `prepare_prompt`: render + tokenize on the prep thread (arrival order kept, the event loop never blocks on a long
  prompt), refuse prompts that leave no room in the context, name the checkpoint where the last user turn starts;
- `start_job` / `JobRun`: submit a `GenerationJob` and iterate its events (None when a keepalive is due), cancelling
  the job when the client goes away; `collect` waits for a non-streaming job, `stream_frames` is the SSE loop of
  every streaming endpoint (each API gives its framing); `job_error` is a failed job's error.

The OpenAI handlers (app.py), the Anthropic ones (anthropic_handlers.py) and the Responses ones
(responses_handlers.py) are built from these.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
import uuid
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable

import orjson
from aiohttp import web

from ..text.constraints import GrammarError, check_grammar
from . import anthropic, protocol
from .controls import GenerationControls, chat_grammar
from .guards import DEFAULT_BODY_TIMEOUT_S
from .metrics import ServerMetrics
from .protocol import ProtocolError
from .responses import ResponseStore
from .transport import DEFAULT_HEADER_TIMEOUT_S
from .worker import (EngineWorker, EventChannel, GenerationJob, JobCancelled, JobFailed, JobFinished, JobStarted,
                     PrefillProgress, TokenDelta)

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
    responses: ResponseStore = field(default_factory=ResponseStore)     # for /v1/responses previous_response_id

    def next_request_id(self, prefix: str) -> str:
        self.request_counter += 1
        return f"{prefix}-{self.request_counter:06d}{uuid.uuid4().hex[:12]}"


STATE = web.AppKey("ds4cupy_state", ServerState)


# ------------------------------------------------------------------------------------------------------- responses

def json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")


def error_response(err: ProtocolError, path: str = "") -> web.Response:
    """The error in the shape of the API `path` belongs to: Anthropic's under /v1/messages, else OpenAI's."""
    body = anthropic.error_body(err) if path.startswith(anthropic.PATH_PREFIX) else err.body()
    return json_response(body, status=err.status)


_STATUS_ERROR_TYPES = {401: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
                       413: "invalid_request_error", 500: "server_error", 503: "server_error"}


def http_error(status: int, message: str, code: str | None = None, param: str | None = None) -> ProtocolError:
    return ProtocolError(status, message, type=_STATUS_ERROR_TYPES.get(status, "invalid_request_error"),
                         param=param, code=code)


# ------------------------------------------------------------------------------------------------------ requests

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


def tool_choice_grammar(tools: list[dict], tool_choice: Any, thinking: bool, parallel: bool) -> tuple[str, str] | None:
    """The grammar that enforces a tool_choice of "required" or one named function (as chat does: controls.py), as
    (grammar, field), or None when the model is free."""
    req = SimpleNamespace(offered_tools=tools, tool_choice=tool_choice, thinking=protocol.ThinkingChoice(thinking))
    return chat_grammar(req, GenerationControls(parallel_tool_calls=parallel))


def start_job(state: ServerState, request: web.Request, prompt: PreparedPrompt, *, request_id: str, sampling: Any,
              stop: list[str], thinking: bool, parse_tools: bool, model: str | None, controls: Any = None,
              grammar: str | None = None) -> JobRun:
    """Submit the job for a prepared prompt; the JobRun carries its events and its queue position."""
    job = GenerationJob(request_id=request_id, prompt_ids=prompt.ids, max_tokens=prompt.max_tokens,
                        sampling=sampling, stop=list(stop), thinking=thinking, parse_tools=parse_tools,
                        checkpoints=prompt.checkpoints, controls=controls, grammar=grammar, channel=EventChannel())
    run = JobRun(state, request, job, model=reported_model(state, model))
    run.queue_position = state.worker.submit(job)
    return run


def reported_model(state: ServerState, requested: str | None) -> str:
    """The `model` field of responses: the requested name (one of ours: check_model ran), else the served name."""
    return requested if requested is not None else state.settings.model_name


def check_model(state: ServerState, requested: str | None) -> None:
    """404 model_not_found for a name that is neither the served name nor an alias (no name: the served model)."""
    names = state.settings.model_names
    if requested is not None and requested not in names:
        raise http_error(404, f"The model '{requested}' does not exist; this server serves {', '.join(names)}",
                         "model_not_found", "model")


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


def sse_response(extra_headers: dict | None = None) -> web.StreamResponse:
    return web.StreamResponse(status=200, headers={
        "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no", **(extra_headers or {})})


async def stream_frames(run: JobRun, frames_for: Callable[[Any], list[bytes]], keepalive: bytes,
                        opening: list[bytes] = ()) -> web.StreamResponse:
    """The SSE loop of every streaming endpoint (OpenAI through app.stream_sse, Anthropic Messages, Responses): the
    `opening` frames at once, then `frames_for(event)` for each worker event (JobStarted, PrefillProgress, TokenDelta,
    JobFinished, JobFailed, JobCancelled); `keepalive` while the engine is quiet; the job is cancelled if the client
    leaves before it ends."""
    response = sse_response(run.headers)
    done = False
    try:
        await response.prepare(run.request)
        for frame in opening:
            await response.write(frame)
        run.wrote()
        async for event in run.events():
            frames = [keepalive] if event is None else frames_for(event)
            for frame in frames:
                await response.write(frame)
            if frames:
                run.wrote()
            done = done or isinstance(event, (JobFinished, JobFailed, JobCancelled))
        await response.write_eof()
    except ConnectionResetError:
        log.info("request %s: client disconnected, generation cancelled", run.job.request_id)
    finally:
        if not done:
            run.cancel()
    return response
