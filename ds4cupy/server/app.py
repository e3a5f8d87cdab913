"""The aiohttp application: routes, middleware, the OpenAI handlers, BackgroundServer (shared pieces: serving.py).

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models (+ /v1/models/{name}), GET /health,
GET /metrics here; POST /v1/messages (+ /count_tokens) from anthropic_handlers.py, POST /v1/responses from
responses_handlers.py. Handlers validate with their protocol module (`protocol` for OpenAI chat), render and
tokenize the prompt on a one-thread "prep" executor (so arrival order is kept and the event loop never blocks on a
long prompt), submit a `GenerationJob` to the `EngineWorker`, then turn its events into a JSON response or an SSE
stream. While a job waits or prefills, the stream gets keepalives; a chat stream's first chunk (the assistant role)
leaves together with the first generated token, so a client's time to first chunk is the queue wait plus the
prefill. A client that goes away cancels its job.

Every route goes through the same middlewares (outermost first): error objects for every failure (Anthropic's shape
under /v1/messages, else OpenAI's; 405 with `Allow`; 500s with a generic message and a request id, details in the
log), CORS preflights (guards.cors), the API key (/v1/* and /metrics unless metrics_public; Bearer or x-api-key),
refusal while draining or when the model file changed (503), and the body guard (JSON only, size and time limits:
guards.body_guard). Prompts longer than ctx x the tokenizer's longest token in bytes are refused before tokenizing;
message text is tokenized as plain text (text.chat.render_prompt).

Model names: the served name (--served-model-name, default deepseek-v4-flash), its extra aliases, and the thinking
aliases deepseek-chat (thinking off) and deepseek-reasoner (on); any other name is a 404 model_not_found.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import logging
import threading
import uuid
from typing import Any, Callable

from aiohttp import web

from . import controls as ctl
from . import anthropic_handlers, protocol, responses_handlers
from .guards import body_guard, cors
from .metrics import ServerMetrics
from .prefill_pacing import PrefillPacer
from .prefix_cache import PrefixCache
from .protocol import ProtocolError
from .scheduler import BatchScheduler, StreamBatch
from .serving import (DEFAULT_KEEPALIVE_S, DEFAULT_MAX_BODY_BYTES, DEFAULT_SHUTDOWN_GRACE_S,  # noqa: F401
                      STATE, JobRun, PromptRenderer, ServerSettings, ServerState, check_model, collect,
                      error_response, http_error, job_error, json_response, prepare_prompt, read_json_body,
                      render_chat_prompt, reported_model, stream_frames, turn_start_ids)
from .transport import GuardedRunner
from .worker import (MODEL_FILE_CHANGED, SHUTTING_DOWN, EngineWorker, EventChannel, GenerationJob, JobCancelled,
                     JobFailed, JobFinished, TokenDelta, real_generator_factory)

log = logging.getLogger("ds4cupy.server")

# ------------------------------------------------------------------------------------------------------ middleware

def _endpoint_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def openai_errors_middleware(request: web.Request, handler):
    """Every failure leaves as an error object (Anthropic's shape under /v1/messages, else OpenAI's); every request
    is counted by endpoint and status."""
    state = request.app[STATE]
    state.in_flight += 1
    try:
        response = await handler(request)
    except ProtocolError as err:
        response = error_response(err, request.path)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status)
        response = error_response(http_error(exc.status, exc.reason if exc.status != 404 else
                                             f"no route for {request.method} {request.path}", code), request.path)
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
                                                  f"the server log)", "internal_error"), request.path)
    finally:
        state.in_flight -= 1
    state.metrics.record_request(_endpoint_label(request), response.status)
    return response


@web.middleware
async def api_key_middleware(request: web.Request, handler):
    """With --api-key, /v1/* and /metrics (unless metrics_public) need `Authorization: Bearer <key>` or
    `x-api-key: <key>` (Anthropic's clients; 401 otherwise). /health stays open."""
    settings = request.app[STATE].settings
    key = settings.api_key
    if key and (request.path.startswith("/v1/") or (request.path == "/metrics" and not settings.metrics_public)):
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        x_key = request.headers.get("x-api-key")
        if not ((scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode()))
                or (x_key is not None and hmac.compare_digest(x_key.strip().encode(), key.encode()))):
            raise http_error(401, "Incorrect API key provided." if header or x_key is not None else
                             "You didn't provide an API key (Authorization: Bearer <key> or x-api-key: <key>).",
                             "invalid_api_key")
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
    """The OpenAI endpoints' SSE framing over serving.stream_frames (which owns the loop, the keepalive comments and
    the cancellation): the `opening` chunks go together with the first token delta's chunk (so that no chunk leaves
    before the prefill is done), one chunk per later delta (delta_chunk returns None for a delta with nothing to
    send), the `closing` chunks and [DONE] when the job finishes, an error event and [DONE] on an engine failure."""
    held = list(opening)

    def events(chunks: list[dict]) -> list[bytes]:
        nonlocal held
        out = [protocol.sse_event(c) for c in held + chunks]
        held = []
        return out

    def frames_for(event) -> list[bytes]:
        if isinstance(event, TokenDelta):
            chunk = delta_chunk(event.delta)
            return events([] if chunk is None else [chunk])
        if isinstance(event, JobFinished):
            return events(closing(event)) + [protocol.SSE_DONE]
        if isinstance(event, JobFailed):
            return [protocol.sse_event(job_error(event).body()), protocol.SSE_DONE]
        return []

    return await stream_frames(run, frames_for, protocol.SSE_KEEPALIVE)


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
               make_generator=None, prefill_chunk: int | PrefillPacer | None = None,
               prefix_cache: PrefixCache | None = None, file_problem: Callable[[], str | None] | None = None,
               batch: StreamBatch | None = None) -> web.Application:
    """Build the application around one session. `render` (messages, tools, thinking) -> prompt and `make_generator`
    (job -> Generator) default to ds4cupy.text.chat and ds4cupy.text.generate; tests pass fakes. `prefix_cache` keeps
    the stored session states (default: host memory only, PrefixCache's default budget). `file_problem` () -> reason
    or None says when the model can no longer serve from its file (loader.Model.file_problem): /health and requests
    then say 503. `batch` (server.scheduler.StreamBatch, its first session `session`): serve several requests at once
    (--max-batch); None: one at a time. `prefill_chunk`: tokens a prefill call, or a server.prefill_pacing.PrefillPacer
    (the CLI's default); None: the worker's fixed default."""
    metrics = ServerMetrics()
    worker_kwargs = {} if prefill_chunk is None else {"prefill_chunk": prefill_chunk}
    if batch is not None and batch.sessions[0] is not session:
        raise ValueError("create_app: the batch's first session must be `session`")
    worker_class, engine = (EngineWorker, session) if batch is None else (BatchScheduler, batch)
    worker = worker_class(engine, make_generator or real_generator_factory(tokenizer), metrics=metrics,
                          precheck=file_problem, cache=prefix_cache, **worker_kwargs)
    metrics.queue_depth = lambda: worker.queue_depth
    metrics.engine_busy = lambda: worker.busy
    metrics.batch_streams = lambda: worker.running_count
    metrics.max_batch = worker.max_batch
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
    app.router.add_post("/v1/messages", anthropic_handlers.handle_messages)
    app.router.add_post("/v1/messages/count_tokens", anthropic_handlers.handle_count_tokens)
    app.router.add_post("/v1/responses", responses_handlers.handle_responses)
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
