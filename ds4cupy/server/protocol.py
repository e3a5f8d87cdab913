"""The OpenAI chat / completions wire protocol, kept apart from the engine.

This module knows JSON bodies and nothing about sessions or threads:

- request validation: `parse_chat_request` and `parse_completion_request` turn a decoded JSON body into a
  `ChatRequest` / `CompletionRequest` or raise `ProtocolError` (an OpenAI error object plus its HTTP status);
- response and chunk builders for chat and text completions, `usage` objects, the model list.

What the other APIs share with this one (the error value, typed field readers, sampling fields, thinking-mode
selection) is in validation.py, SSE framing in sse.py; both are re-exported here under their old names.
Bad input stops here: nothing that fails validation ever reaches the worker. Every field a body may hold is in
request_fields' table (honoured, no effect, or default only); anything else is refused. The generation controls
(logprobs, penalties, structured output, ...) are parsed by controls.py.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import orjson

from .request_fields import field_problems
from .sse import SSE_DONE, SSE_KEEPALIVE, json_bytes, sse_event  # noqa: F401  (re-exported)
from .validation import list_items
from .validation import (DEFAULT_MIN_P, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P,  # noqa: F401
                         NON_THINKING_ALIAS, REASONING_EFFORTS, THINK_MAX_MIN_CTX, THINKING_ALIAS, ProtocolError,
                         SamplingFields, ThinkingChoice, error_body, invalid, select_thinking)
from .validation import is_int as _is_int
from .validation import optional_bool as _optional_bool
from .validation import optional_int as _optional_int
from .validation import optional_number as _optional_number

DEFAULT_MODEL_NAME = "deepseek-v4-flash"
# /v1/completions wraps the prompt as one chat turn under this system prompt (ds4's behaviour).
COMPLETIONS_SYSTEM_PROMPT = "You are a helpful assistant"
MAX_STOP_STRINGS = 16
MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")


# ---------------------------------------------------------------------------------------------- field validators

def _parse_stop(body: Mapping) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise invalid("'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(value) > MAX_STOP_STRINGS:
        raise invalid(f"'stop' holds at most {MAX_STOP_STRINGS} strings, got {len(value)}", "stop", "invalid_value")
    if any(s == "" for s in value):
        raise invalid("'stop' strings must not be empty", "stop", "invalid_value")
    return list(value)


def _parse_max_tokens(body: Mapping) -> int | None:
    """max_completion_tokens (the newer name) wins over max_tokens; both must be >= 1 when given."""
    chosen = None
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not _is_int(value):
            raise invalid(f"'{name}' must be an integer, got {type(value).__name__}", name, "invalid_type")
        if value <= 0:
            raise invalid(f"'{name}' must be >= 1, got {value}", name, "invalid_value")
        chosen = value
    return chosen


def _parse_model(body: Mapping) -> str | None:
    value = body.get("model")
    if value is not None and not isinstance(value, str):
        raise invalid(f"'model' must be a string, got {type(value).__name__}", "model", "invalid_type")
    return value


def _parse_n(body: Mapping) -> None:
    n = _optional_int(body, "n", low=1)
    if n is not None and n != 1:
        raise invalid("only n=1 is supported (one session, no batching)", "n", "unsupported_value")


# ------------------------------------------------------------------------------------------------------ sampling

def _parse_sampling(body: Mapping) -> SamplingFields:
    top_k = _optional_int(body, "top_k", low=0)
    seed = _optional_int(body, "seed")
    return SamplingFields(
        temperature=_optional_number(body, "temperature", DEFAULT_TEMPERATURE, 0.0, 2.0),
        top_p=_optional_number(body, "top_p", DEFAULT_TOP_P, 0.0, 1.0, low_open=True),
        top_k=DEFAULT_TOP_K if top_k is None else top_k,
        min_p=_optional_number(body, "min_p", DEFAULT_MIN_P, 0.0, 1.0),
        seed=None if seed is None else seed % 2**64,     # OpenAI allows any integer; the sampler wants >= 0
    )


# ------------------------------------------------------------------------------------------------------ messages

def _content_text(content: Any, param: str, allow_none: bool) -> str | None:
    """OpenAI content: a string, null (assistant with tool calls) or a list of {"type": "text", "text"} parts."""
    if content is None:
        if allow_none:
            return None
        raise invalid(f"'{param}' must not be null", param, "invalid_value")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") not in ("text", "input_text", "output_text"):
                raise invalid(f"'{param}[{j}]': only text content parts are supported", f"{param}[{j}]",
                              "unsupported_content")
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid(f"'{param}[{j}].text' must be a string", f"{param}[{j}].text", "invalid_type")
            texts.append(text)
        return "".join(texts)
    raise invalid(f"'{param}' must be a string or a list of text parts", param, "invalid_type")


def _parse_tool_calls(value: Any, param: str) -> list[dict]:
    if not isinstance(value, list):
        raise invalid(f"'{param}' must be a list", param, "invalid_type")
    calls = []
    for j, call in enumerate(value):
        where = f"{param}[{j}]"
        if not isinstance(call, Mapping):
            raise invalid(f"'{where}' must be an object", where, "invalid_type")
        function = call.get("function")
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
            raise invalid(f"'{where}.function.name' must be a non-empty string", f"{where}.function.name",
                          "invalid_value")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, Mapping):          # lenient: some clients send the object itself
            arguments = orjson.dumps(arguments).decode()
        if not isinstance(arguments, str):
            raise invalid(f"'{where}.function.arguments' must be a JSON string", f"{where}.function.arguments",
                          "invalid_type")
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise invalid(f"'{where}.id' must be a string", f"{where}.id", "invalid_type")
        calls.append({"id": call_id or f"call_{j}", "type": "function",
                      "function": {"name": function["name"], "arguments": arguments}})
    return calls


def parse_messages(value: Any) -> list[dict]:
    """Validate OpenAI chat messages and return plain dicts for ds4cupy.text.chat (content flattened to strings)."""
    if value is None:
        raise invalid("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(value, list):
        raise invalid("'messages' must be a list", "messages", "invalid_type")
    if not value:
        raise invalid("'messages' must not be empty", "messages", "empty_array")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise invalid(f"'{where}' must be an object", where, "invalid_type")
        role = message.get("role")
        if role not in MESSAGE_ROLES:
            raise invalid(f"'{where}.role' must be one of {', '.join(MESSAGE_ROLES)}; got {role!r}",
                          f"{where}.role", "invalid_value")
        out: dict[str, Any] = {"role": role}
        has_tool_calls = role == "assistant" and message.get("tool_calls") not in (None, [])
        content = _content_text(message.get("content"), f"{where}.content",
                                allow_none=role == "assistant")
        out["content"] = content if content is not None else ""
        if role == "assistant":
            if has_tool_calls:
                out["tool_calls"] = _parse_tool_calls(message["tool_calls"], f"{where}.tool_calls")
            reasoning = message.get("reasoning_content", message.get("reasoning"))
            if reasoning is not None:
                if not isinstance(reasoning, str):
                    raise invalid(f"'{where}.reasoning_content' must be a string", f"{where}.reasoning_content",
                                  "invalid_type")
                out["reasoning_content"] = reasoning
        if role == "tool":
            tool_call_id = message.get("tool_call_id")
            if tool_call_id is not None and not isinstance(tool_call_id, str):
                raise invalid(f"'{where}.tool_call_id' must be a string", f"{where}.tool_call_id", "invalid_type")
            if tool_call_id is not None:
                out["tool_call_id"] = tool_call_id
        name = message.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise invalid(f"'{where}.name' must be a string", f"{where}.name", "invalid_type")
            out["name"] = name
        messages.append(out)
    return messages


def parse_tools(value: Any) -> list[dict]:
    """Validate `tools`: a list of {"type": "function", "function": {"name", "description"?, "parameters"?}}."""
    tools = []
    for where, tool in list_items(value, "tools"):
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
            raise invalid(f"'{where}' must be an object of type \"function\"", where, "invalid_value")
        function = tool.get("function")
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
            raise invalid(f"'{where}.function.name' must be a non-empty string", f"{where}.function.name",
                          "invalid_value")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise invalid(f"'{where}.function.description' must be a string", f"{where}.function.description",
                          "invalid_type")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, Mapping):
            raise invalid(f"'{where}.function.parameters' must be a JSON schema object",
                          f"{where}.function.parameters", "invalid_type")
        if function.get("strict") is not None and not isinstance(function["strict"], bool):
            raise invalid(f"'{where}.function.strict' must be a boolean", f"{where}.function.strict", "invalid_type")
        tools.append({"type": "function", "function": dict(function)})
    return tools


def parse_tool_choice(value: Any, tools: list[dict]) -> str | dict:
    """"auto" (default with tools), "none", "required", or {"type": "function", "function": {"name"}} naming one of
    the tools. "none" offers no tools; "required" and a named function are enforced by a grammar (controls.py)."""
    if value is None:
        return "auto" if tools else "none"
    if isinstance(value, str):
        if value not in ("auto", "none", "required"):
            raise invalid("'tool_choice' must be \"auto\", \"none\", \"required\" or a function object",
                          "tool_choice", "invalid_value")
        if value == "required" and not tools:
            raise invalid("'tool_choice' is \"required\" but no 'tools' were given", "tool_choice", "invalid_value")
        return value
    if isinstance(value, Mapping):
        function = value.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str) or name not in {t["function"]["name"] for t in tools}:
            raise invalid("'tool_choice.function.name' must name one of the given tools", "tool_choice",
                          "invalid_value")
        return {"type": "function", "function": {"name": name}}
    raise invalid("'tool_choice' must be a string or an object", "tool_choice", "invalid_type")


# ------------------------------------------------------------------------------------------------------ requests

@dataclass
class ChatRequest:
    """A validated POST /v1/chat/completions body."""
    messages: list[dict]
    model: str | None = None
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    sampling: SamplingFields = field(default_factory=SamplingFields)
    stop: list[str] = field(default_factory=list)
    tools: list[dict] = field(default_factory=list)
    tool_choice: str | dict = "none"
    thinking: ThinkingChoice = field(default_factory=lambda: ThinkingChoice(True))

    @property
    def offered_tools(self) -> list[dict]:
        """The tools rendered into the prompt: none when tool_choice is "none"."""
        return [] if self.tool_choice == "none" else self.tools


@dataclass
class CompletionRequest:
    """A validated POST /v1/completions body. The prompt is wrapped as one chat turn (see COMPLETIONS_SYSTEM_PROMPT)."""
    prompt: str
    model: str | None = None
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    sampling: SamplingFields = field(default_factory=SamplingFields)
    stop: list[str] = field(default_factory=list)
    thinking: ThinkingChoice = field(default_factory=lambda: ThinkingChoice(False))

    def messages(self) -> list[dict]:
        return [{"role": "system", "content": COMPLETIONS_SYSTEM_PROMPT}, {"role": "user", "content": self.prompt}]


def _require_object(body: Any) -> Mapping:
    if not isinstance(body, Mapping):
        raise invalid("the request body must be a JSON object", None, "invalid_type")
    return body


def _parse_stream(body: Mapping) -> tuple[bool, bool]:
    stream = bool(_optional_bool(body, "stream"))
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, Mapping):
            raise invalid("'stream_options' must be an object", "stream_options", "invalid_type")
        value = options.get("include_usage")
        if value is not None and not isinstance(value, bool):
            raise invalid("'stream_options.include_usage' must be a boolean", "stream_options.include_usage",
                          "invalid_type")
        include_usage = bool(value)
    return stream, include_usage


def _refuse_unsupported(body: Mapping, endpoint: str) -> None:
    """Fields the server does not know, or cannot honour at the value given, are refused (request_fields)."""
    _parse_n(body)
    for name, code, message in field_problems(body, endpoint):
        raise invalid(message, name, code)


def parse_chat_request(body: Any, *, ctx: int) -> ChatRequest:
    """Validate a chat completions body; `ctx` is the server's context length (it gates Think Max)."""
    body = _require_object(body)
    model = _parse_model(body)
    messages = parse_messages(body.get("messages"))
    stream, include_usage = _parse_stream(body)
    _refuse_unsupported(body, "chat")
    tools = parse_tools(body.get("tools"))
    return ChatRequest(
        messages=messages, model=model, stream=stream, include_usage=include_usage,
        max_tokens=_parse_max_tokens(body), sampling=_parse_sampling(body), stop=_parse_stop(body),
        tools=tools, tool_choice=parse_tool_choice(body.get("tool_choice"), tools),
        thinking=select_thinking(body, model, ctx),
    )


def parse_completion_request(body: Any, *, ctx: int) -> CompletionRequest:
    """Validate a text completions body. `prompt` is a string (or a list holding one string). Thinking is off unless
    the request turns it on (the reasoning text is then not returned: completions have only `text`)."""
    body = _require_object(body)
    model = _parse_model(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if prompt is None:
        raise invalid("'prompt' is required", "prompt", "missing_required_parameter")
    if not isinstance(prompt, str):
        raise invalid("'prompt' must be a string (one prompt per request)", "prompt", "invalid_type")
    if prompt == "":
        raise invalid("'prompt' must not be empty", "prompt", "invalid_value")
    stream, include_usage = _parse_stream(body)
    _refuse_unsupported(body, "completions")
    return CompletionRequest(
        prompt=prompt, model=model, stream=stream, include_usage=include_usage,
        max_tokens=_parse_max_tokens(body), sampling=_parse_sampling(body), stop=_parse_stop(body),
        thinking=select_thinking(body, model, ctx, default=model == THINKING_ALIAS),
    )


def context_exceeded(prompt_tokens: int, ctx: int) -> ProtocolError:
    """The prompt leaves no room for a single generated token."""
    return ProtocolError(
        400, f"This model's maximum context length is {ctx} tokens. However, your prompt has {prompt_tokens} tokens "
             f"(at least one more is needed for the reply).", param="messages", code="context_length_exceeded")


# ----------------------------------------------------------------------------------------------------- responses

def usage_object(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """OpenAI usage with prompt_tokens_details.cached_tokens: the prompt tokens served from the live session's KV."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def tool_call_delta(delta: Mapping) -> dict:
    """One streamed OpenAI tool-call delta from the Generator's {index, id, name, arguments} delta (keys that are None
    are left out, so the first delta carries id/type/name and later ones only argument text)."""
    out: dict[str, Any] = {"index": int(delta.get("index", 0))}
    if delta.get("id"):
        out["id"] = delta["id"]
        out["type"] = "function"
    function: dict[str, Any] = {}
    if delta.get("name"):
        function["name"] = delta["name"]
    if delta.get("arguments") is not None:
        function["arguments"] = delta["arguments"]
    if function:
        out["function"] = function
    return out


class ToolCallAccumulator:
    """Joins streamed tool-call deltas into complete OpenAI tool calls (for non-streaming responses)."""

    def __init__(self) -> None:
        self._calls: dict[int, dict] = {}

    def add(self, delta: Mapping) -> None:
        index = int(delta.get("index", 0))
        call = self._calls.setdefault(index, {"id": None, "type": "function",
                                              "function": {"name": "", "arguments": ""}})
        if delta.get("id"):
            call["id"] = delta["id"]
        if delta.get("name"):
            call["function"]["name"] += delta["name"]
        if delta.get("arguments"):
            call["function"]["arguments"] += delta["arguments"]

    def calls(self) -> list[dict]:
        out = []
        for index in sorted(self._calls):
            call = self._calls[index]
            out.append({**call, "id": call["id"] or f"call_{index}"})
        return out


def _envelope(kind: str, response_id: str, model: str, created: int, choices: list, **extra) -> dict:
    """The fields every OpenAI completion object and chunk share, then `extra` (usage)."""
    return {"id": response_id, "object": kind, "created": created, "model": model, "choices": choices, **extra}


def _chunk(kind: str, response_id: str, model: str, created: int, choice: dict, include_usage: bool) -> dict:
    """A streamed chunk; with stream_options.include_usage every chunk but the last carries "usage": null."""
    return _envelope(kind, response_id, model, created, [choice], **({"usage": None} if include_usage else {}))


def chat_completion(response_id: str, model: str, created: int, *, content: str, reasoning: str,
                    tool_calls: list[dict], finish_reason: str, usage: dict, extras: Mapping | None = None,
                    **top_level) -> dict:
    """A non-streaming chat.completion object; `extras` are more choice fields (logprobs, token_ids), `top_level`
    more response fields (prompt_token_ids)."""
    message: dict[str, Any] = {"role": "assistant", "content": content if (content or not tool_calls) else None}
    if reasoning:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = tool_calls
    return _envelope("chat.completion", response_id, model, created,
                     [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason,
                       **(extras or {})}], usage=usage, **top_level)


def chat_chunk(response_id: str, model: str, created: int, delta: dict, finish_reason: str | None = None,
               include_usage: bool = False, extras: Mapping | None = None) -> dict:
    """One chat.completion.chunk carrying `delta` (role / content / reasoning_content / tool_calls); `extras` are
    more choice fields (logprobs, token_ids)."""
    return _chunk("chat.completion.chunk", response_id, model, created,
                  {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason, **(extras or {})},
                  include_usage)


def chat_usage_chunk(response_id: str, model: str, created: int, usage: dict) -> dict:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage object."""
    return _envelope("chat.completion.chunk", response_id, model, created, [], usage=usage)


def text_completion(response_id: str, model: str, created: int, *, text: str, finish_reason: str,
                    usage: dict, extras: Mapping | None = None, **top_level) -> dict:
    """A non-streaming text_completion object (`extras`, `top_level`: as for chat_completion)."""
    return _envelope("text_completion", response_id, model, created,
                     [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason, **(extras or {})}],
                     usage=usage, **top_level)


def text_chunk(response_id: str, model: str, created: int, text: str, finish_reason: str | None = None,
               include_usage: bool = False, extras: Mapping | None = None) -> dict:
    """One streamed text_completion chunk (`extras`: more choice fields)."""
    return _chunk("text_completion", response_id, model, created,
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason, **(extras or {})},
                  include_usage)


def text_usage_chunk(response_id: str, model: str, created: int, usage: dict) -> dict:
    """The last chunk of a text stream with stream_options.include_usage."""
    return _envelope("text_completion", response_id, model, created, [], usage=usage)


def model_card(name: str, created: int, ctx: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "ds4cupy", "context_length": ctx}


def model_list(names: list[str], created: int, ctx: int) -> dict:
    """GET /v1/models: the served model and its aliases."""
    return {"object": "list", "data": [model_card(n, created, ctx) for n in names]}


def now() -> int:
    return int(time.time())
