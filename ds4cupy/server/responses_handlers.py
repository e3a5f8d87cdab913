"""Route handler of OpenAI's Responses API: POST /v1/responses.

A request is validated and mapped by responses.py (previous_response_id resolved from the server's ResponseStore),
rendered and tokenized like a chat request, and run as the same GenerationJob (serving.py); its events become a
`response` object or the Responses event stream (response.created / in_progress at once, the output item events as
tokens arrive, response.completed or response.incomplete at the end, an `error` event on an engine failure;
`: keepalive` comments while the engine is quiet). With `store` (the default) the conversation is kept for later
requests that name this response as their previous_response_id.
"""
from __future__ import annotations

from typing import Any

from aiohttp import web

from . import responses
from .protocol import now
from .serving import (STATE, JobRun, check_model, collect, job_error, json_response, prepare_prompt, read_json_body,
                      start_job, stream_frames, tool_choice_grammar)
from .sse import SSE_KEEPALIVE, sse_named_event
from .worker import JobFailed, JobFinished, TokenDelta


async def handle_responses(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await read_json_body(request, state.settings.max_body_bytes)
    req = responses.parse_responses_request(body, ctx=state.settings.ctx, store=state.responses)
    check_model(state, req.model)
    grammar = tool_choice_grammar(req.offered_tools, req.tool_choice, req.thinking.enabled,
                                  req.echo["parallel_tool_calls"])
    prompt = await prepare_prompt(state, req.messages, req.offered_tools, req.thinking, req.max_tokens, grammar)
    run = start_job(state, request, prompt, request_id=responses.new_id("resp"), sampling=req.sampling, stop=[],
                    thinking=req.thinking.enabled, parse_tools=bool(req.offered_tools), model=req.model,
                    grammar=None if grammar is None else grammar[0])
    return await (stream_response(run, req) if req.stream else collect_response(run, req))


class _Result:
    """The response object of one run as it grows, and what ends it."""

    def __init__(self, run: JobRun, req: responses.ResponsesRequest):
        self.run, self.req = run, req
        self.created_at = now()
        self.output = responses.OutputAssembler()

    def obj(self, status: str, usage: dict | None = None, incomplete: str | None = None, error=None) -> dict:
        return responses.response_object(self.run.job.request_id, self.run.model, self.created_at, self.req,
                                         status=status, output=self.output.items, usage_=usage,
                                         incomplete_reason=incomplete, error=error)

    def final(self, event: JobFinished) -> tuple[str, dict, list]:
        """(status, the finished response object, the closing item events)."""
        incomplete = event.finish_reason == "length"
        closing = self.output.finish(incomplete)
        usage = responses.usage(event.prompt_tokens, event.completion_tokens, event.cached_tokens,
                                self.output.reasoning_tokens)
        status = "incomplete" if incomplete else "completed"
        obj = self.obj(status, usage, "max_output_tokens" if incomplete else None)
        if self.req.store:
            self.run.state.responses.put(obj["id"], self.req.new_messages + self.output.as_messages())
        return status, obj, closing


async def collect_response(run: JobRun, req: responses.ResponsesRequest) -> web.Response:
    result = _Result(run, req)
    finished = await collect(run, result.output.feed)
    _, obj, _ = result.final(finished)
    response = json_response(obj)
    response.headers.update(run.headers)
    return response


async def stream_response(run: JobRun, req: responses.ResponsesRequest) -> web.StreamResponse:
    result = _Result(run, req)
    sequence = 0

    def frames(events: list) -> list[bytes]:
        nonlocal sequence
        out = []
        for name, payload in events:
            out.append(sse_named_event(name, {**payload, "sequence_number": sequence}))
            sequence += 1
        return out

    opening = frames([("response.created", {"type": "response.created", "response": result.obj("in_progress")}),
                      ("response.in_progress", {"type": "response.in_progress",
                                                "response": result.obj("in_progress")})])

    def frames_for(event: Any) -> list[bytes]:
        if isinstance(event, TokenDelta):
            return frames(result.output.feed(event.delta))
        if isinstance(event, JobFinished):
            status, obj, closing = result.final(event)
            name = f"response.{status}"
            return frames(closing + [(name, {"type": name, "response": obj})])
        if isinstance(event, JobFailed):
            err = job_error(event)
            return frames([("error", {"type": "error", "code": err.code, "message": err.message, "param": None})])
        return []                                     # started, prefill progress, cancelled: nothing to say

    return await stream_frames(run, frames_for, SSE_KEEPALIVE, opening)
