"""Route handlers of Anthropic's Messages API: POST /v1/messages and POST /v1/messages/count_tokens.

A request is validated and mapped by anthropic.py, rendered and tokenized like a chat request, and run as the same
GenerationJob (serving.py); its events become a `message` object or the Messages event stream. The stream sends
`ping` events while the request waits or prefills, `message_start` once the engine has taken the job (its usage
then says how many prompt tokens came from the cache), the content block events as tokens arrive, and
`message_delta` + `message_stop` at the end; an engine failure mid-stream is an `error` event.
"""
from __future__ import annotations

from typing import Any

from aiohttp import web

from . import anthropic
from .serving import (STATE, JobRun, check_model, collect, job_error, json_response, prepare_prompt, read_json_body,
                      start_job, stream_frames, tool_choice_grammar)
from .sse import sse_named_event
from .worker import JobFailed, JobFinished, JobStarted, TokenDelta


async def handle_messages(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await read_json_body(request, state.settings.max_body_bytes)
    req = anthropic.parse_messages_request(body, ctx=state.settings.ctx)
    check_model(state, req.model)
    grammar = tool_choice_grammar(req.offered_tools, req.tool_choice, req.generates_reasoning, req.parallel_tool_use)
    prompt = await prepare_prompt(state, req.messages, req.offered_tools, req.thinking, req.max_tokens, grammar)
    run = start_job(state, request, prompt, request_id=state.next_request_id("msg"), sampling=req.sampling,
                    stop=req.stop, thinking=req.generates_reasoning, parse_tools=bool(req.offered_tools),
                    model=req.model, grammar=None if grammar is None else grammar[0])
    return await (stream_message(run) if req.stream else collect_message(run))


async def handle_count_tokens(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_json_body(request, state.settings.max_body_bytes)
    req = anthropic.parse_messages_request(body, ctx=state.settings.ctx, count_only=True)
    check_model(state, req.model)
    prompt = await prepare_prompt(state, req.messages, req.offered_tools, req.thinking, None)
    return json_response({"input_tokens": len(prompt.ids)})


def _usage(event: JobFinished) -> dict:
    return anthropic.usage(event.prompt_tokens, event.completion_tokens, event.cached_tokens)


async def collect_message(run: JobRun) -> web.Response:
    content = anthropic.MessageAssembler()
    finished = await collect(run, content.feed)
    content.finish()
    stop = anthropic.stop_reason(finished.finish_reason, finished.stop_string, content.has_tool_calls)
    response = json_response(anthropic.message(run.job.request_id, run.model, content.blocks, stop,
                                               _usage(finished)))
    response.headers.update(run.headers)
    return response


async def stream_message(run: JobRun) -> web.StreamResponse:
    content = anthropic.MessageAssembler()
    frame = sse_named_event

    def frames_for(event: Any) -> list[bytes]:
        if isinstance(event, JobStarted):
            usage = anthropic.usage(event.prompt_tokens, 0, event.cached_tokens)
            return [frame("message_start", anthropic.message_start(run.job.request_id, run.model, usage)),
                    frame("ping", anthropic.PING)]
        if isinstance(event, TokenDelta):
            return [frame(name, payload) for name, payload in content.feed(event.delta)]
        if isinstance(event, JobFinished):
            stop = anthropic.stop_reason(event.finish_reason, event.stop_string, content.has_tool_calls)
            return [frame(name, payload) for name, payload in content.finish()] + [
                frame("message_delta", anthropic.message_delta(stop, _usage(event))),
                frame("message_stop", anthropic.MESSAGE_STOP)]
        if isinstance(event, JobFailed):
            return [frame("error", anthropic.error_body(job_error(event)))]
        return []                                     # prefill progress, cancelled: nothing to say

    return await stream_frames(run, frames_for, frame("ping", anthropic.PING))
