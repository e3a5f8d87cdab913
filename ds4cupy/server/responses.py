"""The OpenAI Responses wire protocol (POST /v1/responses), kept apart from the engine.

Requests map onto the same internal chat messages the chat endpoint renders (ds4cupy.text.chat):

- `instructions` and leading system / developer items -> the system message;
- `input`: a string (one user message) or items: messages (user / assistant / system / developer, content as a
  string or input_text / output_text parts), `function_call` (an assistant tool call), `function_call_output` (a
  tool message), `reasoning` (its reasoning_text content, else its summary, becomes the reasoning of the assistant
  turn it belongs to). Consecutive reasoning / assistant message / function_call items form one assistant turn;
- `tools`: function tools {type: "function", name, description, parameters}; `tool_choice` auto / none / required /
  {type: "function", name} (required and a named function are enforced by the tool-call grammar, as for chat); `reasoning.effort` (none turns thinking off; the default is on, as for chat);
  `max_output_tokens`, `temperature`, `top_p`; `text.format` text only;
- `previous_response_id`: the stored conversation of an earlier response (kept in memory, `ResponseStore`, unless it
  was made with `store: false`) goes before `input`; `instructions` are not carried over, as in OpenAI's API.

Results: a `response` object with output items (reasoning with reasoning_text content, message with output_text,
function_call), or the event stream (response.created, response.in_progress, response.output_item.added /
.content_part.added / .reasoning_text.delta / .output_text.delta / .function_call_arguments.delta and their .done
events / .output_item.done, response.completed or response.incomplete), every event with its sequence_number.
Usage reports `input_tokens_details.cached_tokens`. Errors use OpenAI's shape.
"""
from __future__ import annotations

import collections
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

from .validation import list_items
from .validation import (DEFAULT_MIN_P, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P, SamplingFields,
                         ThinkingChoice, invalid, is_int, optional_bool, optional_number, select_thinking)

STORE_CAPACITY = 256                 # responses kept for previous_response_id (least recently made dropped first)
TEXT_PARTS = ("input_text", "output_text", "text", "refusal")
REFUSED_FIELDS = ("conversation", "prompt", "max_tool_calls")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ------------------------------------------------------------------------------------------------------ requests

@dataclass
class ResponsesRequest:
    """A validated POST /v1/responses body, mapped onto the internal chat request; `echo` holds the fields the
    response object repeats."""
    messages: list[dict]
    new_messages: list[dict]             # the part of `messages` this request added (stored for later requests)
    model: str | None = None
    stream: bool = False
    max_tokens: int | None = None
    sampling: SamplingFields = field(default_factory=SamplingFields)
    tools: list[dict] = field(default_factory=list)
    tool_choice: str | dict = "auto"
    thinking: ThinkingChoice = field(default_factory=lambda: ThinkingChoice(True))
    store: bool = True
    previous_response_id: str | None = None
    echo: dict = field(default_factory=dict)

    @property
    def offered_tools(self) -> list[dict]:
        return [] if self.tool_choice == "none" else self.tools


def _parts_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"'{where}' must be a string or a list of content parts", where, "invalid_type")
    texts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind not in TEXT_PARTS:
            raise invalid(f"'{at}': only text content is supported, got {kind!r}", at, "unsupported_content")
        text = part.get("refusal") if kind == "refusal" else part.get("text")
        if not isinstance(text, str):
            raise invalid(f"'{at}.text' must be a string", f"{at}.text", "invalid_type")
        texts.append(text)
    return "".join(texts)


def _reasoning_text(item: Mapping, where: str) -> str:
    """A reasoning item's text: its reasoning_text content, else its summary."""
    for key, kind in (("content", "reasoning_text"), ("summary", "summary_text")):
        parts = item.get(key)
        if parts:
            if not isinstance(parts, list):
                raise invalid(f"'{where}.{key}' must be a list", f"{where}.{key}", "invalid_type")
            texts = [p.get("text") for p in parts if isinstance(p, Mapping) and p.get("type") == kind]
            if not all(isinstance(t, str) for t in texts):
                raise invalid(f"'{where}.{key}[].text' must be strings", f"{where}.{key}", "invalid_type")
            return "\n\n".join(texts)
    return ""


def parse_input(value: Any, param: str = "input") -> list[dict]:
    """`input` as internal chat messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise invalid(f"'{param}' must be a string or a list of items", param, "invalid_type")
    out: list[dict] = []
    turn: dict | None = None                 # the assistant turn being gathered

    def assistant() -> dict:
        nonlocal turn
        if turn is None:
            turn = {"role": "assistant", "content": ""}
            out.append(turn)
        return turn

    for i, item in enumerate(value):
        where = f"{param}[{i}]"
        if not isinstance(item, Mapping):
            raise invalid(f"'{where}' must be an object", where, "invalid_type")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise invalid(f"'{where}.role' must be user, assistant, system or developer, got {role!r}",
                              f"{where}.role", "invalid_value")
            text = _parts_text(item.get("content"), f"{where}.content")
            if role == "assistant":
                t = assistant()
                if t.get("tool_calls"):          # text after the turn's calls starts a new turn
                    turn = None
                    t = assistant()
                t["content"] += text
                continue
            turn = None
            out.append({"role": "system" if role == "developer" else role, "content": text})
        elif kind == "reasoning":
            text = _reasoning_text(item, where)
            t = assistant()
            if t["content"] or t.get("tool_calls"):
                turn = None
                t = assistant()
            if text:
                t["reasoning_content"] = t.get("reasoning_content", "") + text
        elif kind == "function_call":
            name, call_id, args = item.get("name"), item.get("call_id"), item.get("arguments", "{}")
            if not isinstance(name, str) or not name:
                raise invalid(f"'{where}.name' must be a non-empty string", f"{where}.name", "invalid_value")
            if not isinstance(call_id, str) or not call_id:
                raise invalid(f"'{where}.call_id' must be a non-empty string", f"{where}.call_id", "invalid_value")
            if not isinstance(args, str):
                raise invalid(f"'{where}.arguments' must be a JSON string", f"{where}.arguments", "invalid_type")
            assistant().setdefault("tool_calls", []).append(
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}})
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str) or not call_id:
                raise invalid(f"'{where}.call_id' must be a non-empty string", f"{where}.call_id", "invalid_value")
            turn = None
            out.append({"role": "tool", "tool_call_id": call_id, "content": _parts_text(output, f"{where}.output")})
        else:
            raise invalid(f"'{where}': items of type {kind!r} are not supported (message, function_call, "
                          f"function_call_output, reasoning)", where, "unsupported_item")
    return out


def parse_tools(value: Any) -> list[dict]:
    tools = []
    for where, tool in list_items(value, "tools"):
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, Mapping) else None
            raise invalid(f"'{where}': only function tools are supported, got {kind!r}", where, "unsupported_tool")
        name, params, description = tool.get("name"), tool.get("parameters"), tool.get("description")
        if not isinstance(name, str) or not name:
            raise invalid(f"'{where}.name' must be a non-empty string", f"{where}.name", "invalid_value")
        if params is not None and not isinstance(params, Mapping):
            raise invalid(f"'{where}.parameters' must be a JSON schema object", f"{where}.parameters", "invalid_type")
        if description is not None and not isinstance(description, str):
            raise invalid(f"'{where}.description' must be a string", f"{where}.description", "invalid_type")
        function = {"name": name}
        if description:
            function["description"] = description
        if params is not None:
            function["parameters"] = dict(params)
        tools.append({"type": "function", "function": function})
    return tools


def parse_tool_choice(value: Any, tools: list[dict]) -> str | dict:
    if value is None:
        return "auto" if tools else "none"
    if value in ("auto", "none", "required"):
        if value == "required" and not tools:
            raise invalid("'tool_choice' is \"required\" but no 'tools' were given", "tool_choice", "invalid_value")
        return value
    if isinstance(value, Mapping) and value.get("type") == "function":
        name = value.get("name")
        if name not in {t["function"]["name"] for t in tools}:
            raise invalid(f"'tool_choice.name' must name one of the given tools, got {name!r}", "tool_choice.name",
                          "invalid_value")
        return {"type": "function", "function": {"name": name}}
    raise invalid("'tool_choice' must be auto, none, required or {\"type\": \"function\", \"name\"}", "tool_choice",
                  "invalid_value")


def _refuse_unsupported(body: Mapping) -> None:
    for name in REFUSED_FIELDS:
        if body.get(name) is not None:
            raise invalid(f"'{name}' is not supported", name, "unsupported_parameter")
    if body.get("background"):
        raise invalid("'background' responses are not supported", "background", "unsupported_parameter")
    if body.get("top_logprobs"):
        raise invalid("'top_logprobs' is not supported", "top_logprobs", "unsupported_parameter")
    text = body.get("text")
    if text is not None:
        fmt = text.get("format") if isinstance(text, Mapping) else None
        if not isinstance(text, Mapping) or (fmt is not None and (not isinstance(fmt, Mapping)
                                                                  or fmt.get("type", "text") != "text")):
            raise invalid("only text.format {\"type\": \"text\"} is supported", "text.format", "unsupported_value")


def parse_responses_request(body: Any, *, ctx: int, store: "ResponseStore | None" = None) -> ResponsesRequest:
    """Validate a Responses body; `store` resolves previous_response_id."""
    if not isinstance(body, Mapping):
        raise invalid("the request body must be a JSON object", None, "invalid_type")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid(f"'model' must be a string, got {type(model).__name__}", "model", "invalid_type")
    _refuse_unsupported(body)
    if body.get("input") is None:
        raise invalid("'input' is required", "input", "missing_required_parameter")
    new = parse_input(body["input"])
    if not new:
        raise invalid("'input' must not be empty", "input", "empty_array")
    previous_id = body.get("previous_response_id")
    history: list[dict] = []
    if previous_id is not None:
        if not isinstance(previous_id, str):
            raise invalid("'previous_response_id' must be a string", "previous_response_id", "invalid_type")
        history = (store.get(previous_id) if store is not None else None) or []
        if not history:
            raise invalid(f"Previous response with id '{previous_id}' not found.", "previous_response_id",
                          "previous_response_not_found")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise invalid("'instructions' must be a string", "instructions", "invalid_type")
    messages = _with_system(instructions, history + new)

    max_tokens = body.get("max_output_tokens")
    if max_tokens is not None and (not is_int(max_tokens) or max_tokens < 1):
        raise invalid(f"'max_output_tokens' must be an integer >= 1, got {max_tokens!r}", "max_output_tokens",
                      "invalid_value")
    reasoning = body.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, Mapping):
        raise invalid("'reasoning' must be an object", "reasoning", "invalid_type")
    effort = (reasoning or {}).get("effort")
    thinking = select_thinking({"reasoning_effort": effort} if effort is not None else {}, model, ctx)
    tools = parse_tools(body.get("tools"))
    sampling = SamplingFields(
        temperature=optional_number(body, "temperature", DEFAULT_TEMPERATURE, 0.0, 2.0),
        top_p=optional_number(body, "top_p", DEFAULT_TOP_P, 0.0, 1.0, low_open=True), top_k=DEFAULT_TOP_K,
        min_p=DEFAULT_MIN_P)
    store_flag = optional_bool(body, "store")
    parallel = optional_bool(body, "parallel_tool_calls")
    metadata = body.get("metadata")
    echo = {"instructions": instructions, "max_output_tokens": max_tokens, "metadata": metadata or {},
            "parallel_tool_calls": True if parallel is None else parallel, "previous_response_id": previous_id,
            "reasoning": {"effort": effort, "summary": (reasoning or {}).get("summary")},
            "temperature": sampling.temperature, "top_p": sampling.top_p, "text": {"format": {"type": "text"}},
            "tools": list(body.get("tools") or []), "truncation": body.get("truncation") or "disabled",
            "user": body.get("user")}
    request = ResponsesRequest(messages=messages, new_messages=history + new, model=model,
                               stream=bool(optional_bool(body, "stream")), max_tokens=max_tokens, sampling=sampling,
                               tools=tools, tool_choice=parse_tool_choice(body.get("tool_choice"), tools),
                               thinking=thinking, store=True if store_flag is None else store_flag,
                               previous_response_id=previous_id, echo=echo)
    echo["tool_choice"] = body.get("tool_choice") or "auto"
    return request


def _with_system(instructions: str | None, messages: list[dict]) -> list[dict]:
    """`instructions` and the leading system messages as one system message, first."""
    lead = 0
    while lead < len(messages) and messages[lead]["role"] == "system":
        lead += 1
    texts = ([instructions] if instructions else []) + [m["content"] for m in messages[:lead] if m["content"]]
    return ([{"role": "system", "content": "\n\n".join(texts)}] if texts else []) + messages[lead:]


# --------------------------------------------------------------------------------------------------------- store

class ResponseStore:
    """The conversations of recent responses (their input and output as chat messages), for previous_response_id.
    Used from the event loop only."""

    def __init__(self, capacity: int = STORE_CAPACITY):
        self.capacity = capacity
        self._items: collections.OrderedDict[str, list[dict]] = collections.OrderedDict()

    def put(self, response_id: str, messages: list[dict]) -> None:
        self._items[response_id] = messages
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> list[dict] | None:
        return self._items.get(response_id)


# ----------------------------------------------------------------------------------------------------- responses

def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int, reasoning_tokens: int) -> dict:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": cached_tokens},
            "output_tokens": completion_tokens, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": prompt_tokens + completion_tokens}


def response_object(response_id: str, model: str, created_at: int, request: ResponsesRequest, *, status: str,
                    output: list[dict], usage_: dict | None, incomplete_reason: str | None = None,
                    error: dict | None = None) -> dict:
    return {"id": response_id, "object": "response", "created_at": created_at, "status": status,
            "error": error, "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
            "model": model, "output": output, "usage": usage_, "store": request.store, **request.echo}


class OutputAssembler:
    """Turns the Generator's deltas into output items (reasoning, message, function_call, in the order they come)
    and, for a stream, into the item / part / delta events. Payloads carry no sequence_number (the handler adds
    it); `events` lists (event name, payload)."""

    def __init__(self) -> None:
        self.items: list[dict] = []
        self._open: dict | None = None
        self.reasoning_tokens = 0

    @property
    def tool_calls(self) -> list[dict]:
        return [i for i in self.items if i["type"] == "function_call"]

    def _index(self) -> int:
        return len(self.items) - 1

    def _add(self, item: dict, events: list) -> dict:
        self._close(events)
        self.items.append(item)
        events.append(("response.output_item.added", {"type": "response.output_item.added",
                                                      "output_index": self._index(), "item": _copy(item)}))
        if item["type"] in ("reasoning", "message"):
            self._open = item
            part = {"type": "reasoning_text", "text": ""} if item["type"] == "reasoning" else \
                {"type": "output_text", "text": "", "annotations": []}
            item["content"].append(part)
            events.append(("response.content_part.added", {"type": "response.content_part.added",
                                                           "item_id": item["id"], "output_index": self._index(),
                                                           "content_index": 0, "part": dict(part)}))
        return item

    def _close(self, events: list) -> None:
        item, self._open = self._open, None
        if item is None:
            return
        part = item["content"][0]
        name = "response.reasoning_text.done" if item["type"] == "reasoning" else "response.output_text.done"
        done = {"type": name, "item_id": item["id"], "output_index": self.items.index(item), "content_index": 0,
                "text": part["text"]}
        if item["type"] == "message":
            done["logprobs"] = []
        events.append((name, done))
        events.append(("response.content_part.done", {"type": "response.content_part.done", "item_id": item["id"],
                                                      "output_index": self.items.index(item), "content_index": 0,
                                                      "part": dict(part)}))
        item["status"] = "completed"
        events.append(("response.output_item.done", {"type": "response.output_item.done",
                                                     "output_index": self.items.index(item), "item": _copy(item)}))

    def feed(self, d: Any) -> list[tuple[str, dict]]:
        events: list = []
        if getattr(d, "reasoning", None):
            self.reasoning_tokens += 1
            if self._open is None or self._open["type"] != "reasoning":
                self._add({"type": "reasoning", "id": new_id("rs"), "summary": [], "content": [],
                           "status": "in_progress"}, events)
            self._open["content"][0]["text"] += d.reasoning
            events.append(("response.reasoning_text.delta", {"type": "response.reasoning_text.delta",
                                                             "item_id": self._open["id"],
                                                             "output_index": self._index(), "content_index": 0,
                                                             "delta": d.reasoning}))
        if getattr(d, "content", None):
            if self._open is None or self._open["type"] != "message":
                self._add({"type": "message", "id": new_id("msg"), "status": "in_progress", "role": "assistant",
                           "content": []}, events)
            self._open["content"][0]["text"] += d.content
            events.append(("response.output_text.delta", {"type": "response.output_text.delta",
                                                          "item_id": self._open["id"], "output_index": self._index(),
                                                          "content_index": 0, "delta": d.content, "logprobs": []}))
        for call in getattr(d, "tool_calls", None) or ():
            args = call.get("arguments") or "{}"
            item = self._add({"type": "function_call", "id": new_id("fc"), "call_id": call.get("id") or new_id("call"),
                              "name": call.get("name", ""), "arguments": "", "status": "in_progress"}, events)
            item["arguments"] = args
            index = self._index()
            events.append(("response.function_call_arguments.delta", {
                "type": "response.function_call_arguments.delta", "item_id": item["id"], "output_index": index,
                "delta": args}))
            events.append(("response.function_call_arguments.done", {
                "type": "response.function_call_arguments.done", "item_id": item["id"], "output_index": index,
                "name": item["name"], "arguments": args}))
            item["status"] = "completed"
            events.append(("response.output_item.done", {"type": "response.output_item.done", "output_index": index,
                                                         "item": _copy(item)}))
        return events

    def finish(self, incomplete: bool) -> list[tuple[str, dict]]:
        events: list = []
        self._close(events)
        if incomplete:
            for item in self.items:
                if item["type"] == "message":
                    item["status"] = "incomplete"
        return events

    def as_messages(self) -> list[dict]:
        """The output as one internal assistant message (for the response store)."""
        turn: dict[str, Any] = {"role": "assistant", "content": ""}
        for item in self.items:
            if item["type"] == "reasoning":
                turn["reasoning_content"] = turn.get("reasoning_content", "") + item["content"][0]["text"]
            elif item["type"] == "message":
                turn["content"] += item["content"][0]["text"]
            else:
                turn.setdefault("tool_calls", []).append({"id": item["call_id"], "type": "function", "function": {
                    "name": item["name"], "arguments": item["arguments"]}})
        return [turn]


def _copy(item: dict) -> dict:
    return json.loads(json.dumps(item))
