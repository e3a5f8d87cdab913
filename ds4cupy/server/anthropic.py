"""The Anthropic Messages wire protocol (POST /v1/messages, /v1/messages/count_tokens), kept apart from the engine.

Requests map onto the same internal chat messages the OpenAI endpoint renders (ds4cupy.text.chat):

- `system` (a string or text blocks) -> the system message;
- user content: text blocks -> user messages, `tool_result` blocks -> tool messages (tool_call_id = tool_use_id);
- assistant content: text -> content, `thinking` -> reasoning_content, `tool_use` -> tool_calls (input as JSON
  arguments); `redacted_thinking` is dropped (there is nothing to render); a last assistant message is a prefill the
  reply continues (rendered without its end-of-sentence token);
- `tools` (custom tools: name, description, input_schema) -> function tools; `tool_choice` auto / any / tool / none
  (any and tool are enforced by the tool-call grammar, as chat's required / named function are; with
  disable_parallel_tool_use, one call);
- `stop_sequences`, `temperature` (0-1), `top_p`, `top_k`, `max_tokens` (required), `thinking` (enabled with a
  budget_tokens >= 1024 and below max_tokens, adaptive, or disabled; the default is disabled, as in Anthropic's
  API). The budget is checked, not enforced apart from max_tokens: the reasoning ends when the model ends it.

Images and documents are refused (the model reads text), as are server tools and structured output
(`output_config.format`). `cache_control` marks, `metadata`, `service_tier` and other hints are accepted and
ignored: every prompt prefix is cached anyway. Results: a `message` object, or the documented event stream
(message_start, content_block_start / content_block_delta (text_delta, thinking_delta, input_json_delta) /
content_block_stop, message_delta with stop_reason and usage, message_stop; ping while the engine is busy). Usage
reports `cache_read_input_tokens` (prompt tokens reused from a stored state) and `input_tokens` (the rest). Errors
use Anthropic's shape {"type": "error", "error": {"type", "message"}}.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from .validation import list_items
from .validation import (DEFAULT_MIN_P, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P, ProtocolError,
                         SamplingFields, ThinkingChoice, invalid, is_int, optional_bool, optional_int,
                         optional_number, select_thinking)

PATH_PREFIX = "/v1/messages"
MAX_STOP_SEQUENCES = 16
MIN_THINKING_BUDGET = 1024           # Anthropic's lower bound for thinking.budget_tokens
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
               429: "rate_limit_error", 500: "api_error", 503: "overloaded_error", 529: "overloaded_error"}
UNSUPPORTED_FIELDS = ("mcp_servers", "container")


def error_body(err: ProtocolError) -> dict:
    """Anthropic's error shape for a refused request."""
    return {"type": "error", "error": {"type": ERROR_TYPES.get(err.status, "api_error"), "message": err.message}}


# ------------------------------------------------------------------------------------------------------ requests

@dataclass
class MessagesRequest:
    """A validated POST /v1/messages body, mapped onto the internal chat request."""
    messages: list[dict]
    model: str | None = None
    stream: bool = False
    max_tokens: int | None = None
    sampling: SamplingFields = field(default_factory=SamplingFields)
    stop: list[str] = field(default_factory=list)
    tools: list[dict] = field(default_factory=list)
    tool_choice: str | dict = "none"
    thinking: ThinkingChoice = field(default_factory=lambda: ThinkingChoice(False))
    thinking_budget: int | None = None
    prefill: bool = False                # the last message is the assistant's start: the reply continues it
    parallel_tool_use: bool = True       # tool_choice.disable_parallel_tool_use inverted

    @property
    def offered_tools(self) -> list[dict]:
        return [] if self.tool_choice == "none" else self.tools

    @property
    def generates_reasoning(self) -> bool:
        """The prompt ends with <think>: the reply starts as reasoning (not when continuing an assistant prefill)."""
        return self.thinking.enabled and not self.prefill


def _text_blocks(value: Any, param: str, allowed: tuple[str, ...] = ("text",)) -> list[tuple[str, Mapping]]:
    """A content value as (type, block) pairs: a string is one text block."""
    if isinstance(value, str):
        return [("text", {"type": "text", "text": value})]
    if not isinstance(value, list):
        raise invalid(f"'{param}' must be a string or a list of content blocks", param, "invalid_type")
    out = []
    for j, block in enumerate(value):
        where = f"{param}[{j}]"
        if not isinstance(block, Mapping) or not isinstance(block.get("type"), str):
            raise invalid(f"'{where}' must be a content block object with a 'type'", where, "invalid_type")
        kind = block["type"]
        if kind not in allowed:
            what = "images and documents are" if kind in ("image", "document") else f"'{kind}' blocks are"
            raise invalid(f"'{where}': {what} not supported here (allowed: {', '.join(allowed)})", where,
                          "unsupported_content")
        if kind == "text" and not isinstance(block.get("text"), str):
            raise invalid(f"'{where}.text' must be a string", f"{where}.text", "invalid_type")
        out.append((kind, block))
    return out


def _system_text(value: Any) -> str | None:
    """`system` as one text: a string, or its text blocks joined by blank lines."""
    if value is None or isinstance(value, str):
        return value
    return "\n\n".join(b["text"] for _, b in _text_blocks(value, "system"))


def _tool_result_text(block: Mapping, where: str) -> str:
    content = block.get("content", "")
    if content is None:
        return ""
    return "\n".join(b["text"] for _, b in _text_blocks(content, f"{where}.content"))


def _user_messages(content: Any, where: str) -> list[dict]:
    out: list[dict] = []
    for j, (kind, block) in enumerate(_text_blocks(content, f"{where}.content", ("text", "tool_result"))):
        if kind == "text":
            out.append({"role": "user", "content": block["text"]})
            continue
        tid = block.get("tool_use_id")
        if not isinstance(tid, str) or not tid:
            raise invalid(f"'{where}.content[{j}].tool_use_id' must be a non-empty string",
                          f"{where}.content[{j}].tool_use_id", "invalid_value")
        out.append({"role": "tool", "tool_call_id": tid, "content": _tool_result_text(block, f"{where}.content[{j}]")})
    return out


def _assistant_message(content: Any, where: str) -> dict:
    texts, thoughts, calls = [], [], []
    blocks = _text_blocks(content, f"{where}.content", ("text", "thinking", "redacted_thinking", "tool_use"))
    for j, (kind, block) in enumerate(blocks):
        at = f"{where}.content[{j}]"
        if kind == "text":
            texts.append(block["text"])
        elif kind == "thinking":
            if not isinstance(block.get("thinking"), str):
                raise invalid(f"'{at}.thinking' must be a string", f"{at}.thinking", "invalid_type")
            thoughts.append(block["thinking"])
        elif kind == "tool_use":
            name, call_id, args = block.get("name"), block.get("id"), block.get("input", {})
            if not isinstance(name, str) or not name:
                raise invalid(f"'{at}.name' must be a non-empty string", f"{at}.name", "invalid_value")
            if not isinstance(call_id, str) or not call_id:
                raise invalid(f"'{at}.id' must be a non-empty string", f"{at}.id", "invalid_value")
            if not isinstance(args, Mapping):
                raise invalid(f"'{at}.input' must be an object", f"{at}.input", "invalid_type")
            calls.append({"id": call_id, "type": "function",
                          "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}})
    out: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if thoughts:
        out["reasoning_content"] = "".join(thoughts)
    if calls:
        out["tool_calls"] = calls
    return out


def parse_conversation(body: Mapping) -> tuple[list[dict], bool]:
    """The internal chat messages of a Messages body (system first), and whether the last one is an assistant
    prefill."""
    value = body.get("messages")
    if value is None:
        raise invalid("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(value, list) or not value:
        raise invalid("'messages' must be a non-empty list", "messages", "invalid_value")
    out: list[dict] = []
    system = _system_text(body.get("system"))
    if system:
        out.append({"role": "system", "content": system})
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise invalid(f"'{where}' must be an object", where, "invalid_type")
        role = message.get("role")
        if role == "user":
            out += _user_messages(message.get("content"), where)
        elif role == "assistant":
            out.append(_assistant_message(message.get("content"), where))
        else:
            raise invalid(f"'{where}.role' must be \"user\" or \"assistant\", got {role!r}", f"{where}.role",
                          "invalid_value")
    prefill = value[-1].get("role") == "assistant"
    if prefill:
        if out[-1].get("tool_calls"):
            raise invalid("a final assistant message (a prefill) cannot hold tool_use blocks", "messages",
                          "invalid_value")
        out[-1] = {**out[-1], "wo_eos": True}
    return out, prefill


def parse_tools(value: Any) -> list[dict]:
    """Custom tools {name, description?, input_schema} as function tools."""
    tools = []
    for where, tool in list_items(value, "tools"):
        if not isinstance(tool, Mapping):
            raise invalid(f"'{where}' must be an object", where, "invalid_type")
        if tool.get("type", "custom") != "custom":
            raise invalid(f"'{where}': server tools ({tool.get('type')!r}) are not supported; only custom tools "
                          f"(name, description, input_schema)", where, "unsupported_tool")
        name, schema = tool.get("name"), tool.get("input_schema")
        if not isinstance(name, str) or not name:
            raise invalid(f"'{where}.name' must be a non-empty string", f"{where}.name", "invalid_value")
        if not isinstance(schema, Mapping):
            raise invalid(f"'{where}.input_schema' must be a JSON schema object", f"{where}.input_schema",
                          "invalid_type")
        description = tool.get("description")
        if description is not None and not isinstance(description, str):
            raise invalid(f"'{where}.description' must be a string", f"{where}.description", "invalid_type")
        function = {"name": name, **({"description": description} if description else {}),
                    "parameters": dict(schema)}            # OpenAI's key order: the same tools render the same
        tools.append({"type": "function", "function": function})
    return tools


def parse_tool_choice(value: Any, tools: list[dict]) -> str | dict:
    """{"type": "auto" | "any" | "tool" (with "name") | "none"} -> auto / required / one function / none."""
    if value is None:
        return "auto" if tools else "none"
    if not isinstance(value, Mapping):
        raise invalid("'tool_choice' must be an object {\"type\": ...}", "tool_choice", "invalid_type")
    kind = value.get("type")
    if kind == "none":
        return "none"
    if not tools:
        raise invalid(f"'tool_choice' is {kind!r} but no 'tools' were given", "tool_choice", "invalid_value")
    if kind == "auto":
        return "auto"
    if kind == "any":
        return "required"
    if kind == "tool":
        name = value.get("name")
        if name not in {t["function"]["name"] for t in tools}:
            raise invalid(f"'tool_choice.name' must name one of the given tools, got {name!r}", "tool_choice.name",
                          "invalid_value")
        return {"type": "function", "function": {"name": name}}
    raise invalid("'tool_choice.type' must be auto, any, tool or none", "tool_choice.type", "invalid_value")


def _parse_stop_sequences(body: Mapping) -> list[str]:
    value = body.get("stop_sequences")
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise invalid("'stop_sequences' must be a list of non-empty strings", "stop_sequences", "invalid_type")
    if len(value) > MAX_STOP_SEQUENCES:
        raise invalid(f"'stop_sequences' holds at most {MAX_STOP_SEQUENCES} strings, got {len(value)}",
                      "stop_sequences", "invalid_value")
    return list(value)


def _parse_thinking(body: Mapping, model: str | None, ctx: int, max_tokens: int | None
                    ) -> tuple[ThinkingChoice, int | None]:
    thinking = body.get("thinking")
    budget = None
    if thinking is not None:
        if not isinstance(thinking, Mapping) or thinking.get("type") not in ("enabled", "adaptive", "disabled"):
            raise invalid("'thinking' must be {\"type\": \"enabled\", \"budget_tokens\": N}, {\"type\": "
                          "\"adaptive\"} or {\"type\": \"disabled\"}", "thinking", "invalid_value")
        if thinking["type"] == "adaptive":          # the model decides how much to think: thinking on
            thinking = {"type": "enabled"}
        elif thinking["type"] == "enabled":
            budget = thinking.get("budget_tokens")
            if not is_int(budget) or budget < MIN_THINKING_BUDGET:
                raise invalid(f"'thinking.budget_tokens' must be an integer >= {MIN_THINKING_BUDGET}, got {budget!r}",
                              "thinking.budget_tokens", "invalid_value")
            if max_tokens is not None and budget >= max_tokens:
                raise invalid(f"'thinking.budget_tokens' ({budget}) must be less than 'max_tokens' ({max_tokens})",
                              "thinking.budget_tokens", "invalid_value")
    return select_thinking({"thinking": thinking} if thinking is not None else {}, model, ctx, default=False), budget


def parse_messages_request(body: Any, *, ctx: int, count_only: bool = False) -> MessagesRequest:
    """Validate a Messages body (`count_only`: a count_tokens body, which has no max_tokens / sampling)."""
    if not isinstance(body, Mapping):
        raise invalid("the request body must be a JSON object", None, "invalid_type")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid(f"'model' must be a string, got {type(model).__name__}", "model", "invalid_type")
    for name in UNSUPPORTED_FIELDS:
        if body.get(name) is not None:
            raise invalid(f"'{name}' is not supported", name, "unsupported_parameter")
    output_config = body.get("output_config")
    if isinstance(output_config, Mapping) and output_config.get("format") is not None:
        raise invalid("'output_config.format' (structured output) is not supported", "output_config.format",
                      "unsupported_parameter")
    messages, prefill = parse_conversation(body)
    tools = parse_tools(body.get("tools"))
    tool_choice = parse_tool_choice(body.get("tool_choice"), tools)
    max_tokens = body.get("max_tokens")
    if not count_only:
        if max_tokens is None:
            raise invalid("'max_tokens' is required", "max_tokens", "missing_required_parameter")
        if not is_int(max_tokens) or max_tokens < 1:
            raise invalid(f"'max_tokens' must be an integer >= 1, got {max_tokens!r}", "max_tokens", "invalid_value")
    else:
        max_tokens = None
    thinking, budget = _parse_thinking(body, model, ctx, max_tokens)
    top_k = optional_int(body, "top_k", low=0)
    sampling = SamplingFields(
        temperature=optional_number(body, "temperature", DEFAULT_TEMPERATURE, 0.0, 1.0),
        top_p=optional_number(body, "top_p", DEFAULT_TOP_P, 0.0, 1.0, low_open=True),
        top_k=DEFAULT_TOP_K if top_k is None else top_k, min_p=DEFAULT_MIN_P)
    choice = body.get("tool_choice")
    parallel = not (isinstance(choice, Mapping) and choice.get("disable_parallel_tool_use") is True)
    return MessagesRequest(messages=messages, model=model, stream=bool(optional_bool(body, "stream")),
                           max_tokens=max_tokens, sampling=sampling, stop=_parse_stop_sequences(body), tools=tools,
                           tool_choice=tool_choice, thinking=thinking, thinking_budget=budget, prefill=prefill,
                           parallel_tool_use=parallel)


# ----------------------------------------------------------------------------------------------------- responses

def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """Anthropic usage: input_tokens are the prompt tokens not read from the cache (the total is input_tokens +
    cache_read_input_tokens + cache_creation_input_tokens; nothing is billed as a cache write here)."""
    return {"input_tokens": prompt_tokens - cached_tokens, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached_tokens, "output_tokens": completion_tokens}


def stop_reason(finish_reason: str, stop_string: str | None, tool_calls: bool) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) for the worker's finish reason."""
    if tool_calls and finish_reason in ("stop", "tool_calls"):
        return "tool_use", None
    if finish_reason == "length":
        return "max_tokens", None
    if stop_string is not None:
        return "stop_sequence", stop_string
    return "end_turn", None


def tool_input(arguments: str) -> dict:
    """A generated call's JSON arguments as the tool_use input object (non-object JSON is wrapped)."""
    try:
        value = json.loads(arguments) if arguments else {}
    except ValueError:
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"arguments": value}


def message(message_id: str, model: str, content: list[dict], stop: tuple[str | None, str | None],
            usage_: dict) -> dict:
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop[0], "stop_sequence": stop[1], "usage": usage_}


class MessageAssembler:
    """Turns the Generator's deltas into content blocks (thinking, text, tool_use, in the order they come) and,
    for a stream, into the content_block_* events. `events` lists (event name, payload)."""

    def __init__(self) -> None:
        self.blocks: list[dict] = []
        self._open: str | None = None          # type of the block being streamed
        self.has_tool_calls = False

    def _start(self, block: dict, events: list) -> dict:
        self._close(events)
        self.blocks.append(block)
        self._open = block["type"]
        shown = {**block, "input": {}} if block["type"] == "tool_use" else block
        events.append(("content_block_start", {"type": "content_block_start", "index": len(self.blocks) - 1,
                                               "content_block": dict(shown)}))
        return block

    def _close(self, events: list) -> None:
        if self._open is not None:
            events.append(("content_block_stop", {"type": "content_block_stop", "index": len(self.blocks) - 1}))
            self._open = None

    def _delta(self, delta: dict, events: list) -> None:
        events.append(("content_block_delta", {"type": "content_block_delta", "index": len(self.blocks) - 1,
                                               "delta": delta}))

    def feed(self, d: Any) -> list[tuple[str, dict]]:
        events: list = []
        if getattr(d, "reasoning", None):
            if self._open != "thinking":
                self._start({"type": "thinking", "thinking": "", "signature": ""}, events)
            self.blocks[-1]["thinking"] += d.reasoning
            self._delta({"type": "thinking_delta", "thinking": d.reasoning}, events)
        if getattr(d, "content", None):
            if self._open != "text":
                self._start({"type": "text", "text": ""}, events)
            self.blocks[-1]["text"] += d.content
            self._delta({"type": "text_delta", "text": d.content}, events)
        for call in getattr(d, "tool_calls", None) or ():
            self.has_tool_calls = True
            args = tool_input(call.get("arguments") or "")
            self._start({"type": "tool_use", "id": call.get("id") or f"toolu_{len(self.blocks)}",
                         "name": call.get("name", ""), "input": args}, events)
            self._delta({"type": "input_json_delta", "partial_json": json.dumps(args, ensure_ascii=False)}, events)
            self._close(events)
        return events

    def finish(self) -> list[tuple[str, dict]]:
        events: list = []
        self._close(events)
        return events


def message_start(message_id: str, model: str, usage_: dict) -> dict:
    return {"type": "message_start", "message": {**message(message_id, model, [], (None, None), usage_)}}


def message_delta(stop: tuple[str | None, str | None], usage_: dict) -> dict:
    return {"type": "message_delta", "delta": {"stop_reason": stop[0], "stop_sequence": stop[1]}, "usage": usage_}


PING = {"type": "ping"}
MESSAGE_STOP = {"type": "message_stop"}
