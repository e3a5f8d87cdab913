"""DeepSeek-V4 chat encoding: messages -> the prompt string the model was trained on.

`encode_messages()` follows the semantics of DeepSeek's reference renderer `encoding/encoding_dsv4.py` (shipped with
DeepSeek-V4-Flash; written here from its behaviour, not copied):

    <｜begin▁of▁sentence｜>[Think-Max preamble]{system}[\\n\\n## Tools ...]<｜User｜>{user}<｜Assistant｜><think>|</think>
    {reasoning</think>}{content}[\\n\\n<｜DSML｜tool_calls>...]<｜end▁of▁sentence｜><｜User｜>...

* roles: system, user, assistant, developer (a user turn that may carry tools), tool (merged into the user turn as
  `<tool_result>...</tool_result>`, ordered as the calls were), latest_reminder (`<｜latest_reminder｜>{content}`);
* consecutive user/tool messages merge into one `<｜User｜>` turn, parts joined by a blank line;
* thinking_mode "chat": every assistant turn opens with `</think>`; "thinking": the last one with `<think>`, and with
  drop_thinking (the default, disabled whenever any message carries tools) reasoning before the last user message
  is dropped and developer messages before it are removed;
* reasoning_effort "max" (thinking mode only) puts the Think-Max preamble right after BOS;
* tasks: a user message with "task" in action/query/authority/domain/title/read_url ends with the task token
  (action: `<｜Assistant｜></think>|<think><｜action｜>`).

OpenAI-style inputs are accepted too: content given as a list of parts, `tool_calls` with {"function": {"name",
"arguments"}} where arguments is a JSON string (or an object), a request-level `tools=` list, and "reasoning" as an
alias of "reasoning_content".

`render_prompt()` gives the same prompt as `PromptPart`s that keep the template's own text apart from the text that
came with the messages; `Tokenizer.encode_parts` turns added-token strings into control tokens only in the former, so
a message (or a fetched page inside one) that writes `<｜Assistant｜>` cannot forge a turn.
"""
from __future__ import annotations

import copy
import json
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
LATEST_REMINDER_TOKEN = "<｜latest_reminder｜>"
TOOL_CALLS_BLOCK = "tool_calls"

TASK_TOKENS = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}

THINKING_MODES = ("chat", "thinking")
# "high" (and None) is the default thinking effort; "low"/"medium" are accepted from OpenAI clients and mean the same
REASONING_EFFORTS = (None, "high", "max", "low", "medium")

THINK_MAX_PREAMBLE = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause,"
    " rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered"
    " alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

RESPONSE_FORMAT_TEMPLATE = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"

TOOLS_TEMPLATE = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<{dsml}tool_calls>" block like the following:

<{dsml}tool_calls>
<{dsml}invoke name="$TOOL_NAME">
<{dsml}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{dsml}parameter>
...
</{dsml}invoke>
<{dsml}invoke name="$TOOL_NAME2">
...
</{dsml}invoke>
</{dsml}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {think_start}), you MUST output your complete reasoning inside {think_start}...{think_end} BEFORE any tool calls or final response.

Otherwise, output directly after {think_end} with tool calls or final response.

### Available Tool Schemas

{schemas}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""

# roles _drop_thinking keeps whatever their position
_ALWAYS_KEPT_ROLES = ("user", "system", "tool", "latest_reminder", "direct_search_results")


class ChatFormatError(ValueError):
    """A message list that cannot be rendered. The message names the message index and the bad field or value."""


def to_json(value: Any) -> str:
    """JSON as DeepSeek renders it: ", " and ": " separators, non-ASCII kept."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return json.dumps(value, ensure_ascii=True, default=str)


# --- OpenAI-style input normalisation ----------------------------------------------------------------------------

def content_to_text(content: Any, where: str = "content") -> str:
    """A message content as text: str as is, None as "", a list of OpenAI content parts as its text parts joined
    by newlines (other part types become "[Unsupported <type>]")."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Mapping):
        content = [content]
    if isinstance(content, (list, tuple)):
        texts = []
        for k, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping):
                kind = part.get("type", "text")
                if kind in ("text", "input_text", "output_text"):
                    texts.append(str(part.get("text", "")))
                else:
                    texts.append(f"[Unsupported {kind}]")
            else:
                raise ChatFormatError(f"{where}[{k}] is a {type(part).__name__}; expected a content part object")
        return "\n".join(texts)
    raise ChatFormatError(f"{where} is a {type(content).__name__}; expected a string or a list of content parts")


def _tool_result_text(content: Any) -> str:
    """Tool-result content: text, or multimodal parts where text parts are joined by blank lines."""
    if isinstance(content, list):
        parts = []
        for b in content:
            if isinstance(b, Mapping) and b.get("type", "text") == "text":
                parts.append(str(b.get("text", "")))
            elif isinstance(b, str):
                parts.append(b)
            else:
                parts.append(f"[Unsupported {b.get('type') if isinstance(b, Mapping) else type(b).__name__}]")
        return "\n\n".join(parts)
    return content_to_text(content)


def _normalize_tool(tool: Any, where: str) -> dict:
    """A tool schema as rendered: the OpenAI {"type": "function", "function": {...}} wrapper is removed."""
    if not isinstance(tool, Mapping):
        raise ChatFormatError(f"{where} is a {type(tool).__name__}; expected a tool object")
    if "function" in tool and isinstance(tool["function"], Mapping):
        return dict(tool["function"])
    if "name" in tool:
        return dict(tool)
    raise ChatFormatError(f"{where} has neither 'function' nor 'name': {tool!r}")


def _normalize_tool_call(tc: Any, where: str) -> dict:
    """A tool call as {"id", "name", "arguments": JSON string}; accepts the OpenAI shape or the flat one."""
    if not isinstance(tc, Mapping):
        raise ChatFormatError(f"{where} is a {type(tc).__name__}; expected a tool call object")
    fn = tc.get("function") if isinstance(tc.get("function"), Mapping) else tc
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise ChatFormatError(f"{where} has no function name")
    args = fn.get("arguments", "{}")
    if args is None:
        args = "{}"
    if not isinstance(args, str):
        args = to_json(args)
    return {"id": tc.get("id") or fn.get("id") or "", "name": name, "arguments": args}


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Validated deep copies in the renderer's internal shape (see the module docstring for what is accepted)."""
    if not isinstance(messages, (list, tuple)):
        raise ChatFormatError(f"messages is a {type(messages).__name__}; expected a list of message objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatFormatError(f"messages[{i}] is a {type(m).__name__}; expected an object with a 'role'")
        m = copy.deepcopy(dict(m))
        role = m.get("role")
        if role not in ("system", "user", "assistant", "developer", "tool", "latest_reminder"):
            raise ChatFormatError(f"messages[{i}].role is {role!r}; expected one of system, user, assistant, "
                                  f"developer, tool, latest_reminder")
        if role == "tool":
            if isinstance(m.get("content"), list):
                m["content"] = _tool_result_text(m["content"])
            else:
                m["content"] = content_to_text(m.get("content"), f"messages[{i}].content")
        else:
            m["content"] = content_to_text(m.get("content"), f"messages[{i}].content")
        if m.get("tools"):
            m["tools"] = [_normalize_tool(t, f"messages[{i}].tools[{k}]") for k, t in enumerate(m["tools"])]
        if m.get("tool_calls"):
            m["tool_calls"] = [_normalize_tool_call(t, f"messages[{i}].tool_calls[{k}]")
                               for k, t in enumerate(m["tool_calls"])]
        if role == "assistant" and m.get("reasoning_content") is None and isinstance(m.get("reasoning"), str):
            m["reasoning_content"] = m["reasoning"]
        task = m.get("task")
        if task is not None and task not in TASK_TOKENS:
            raise ChatFormatError(f"messages[{i}].task is {task!r}; valid tasks: {', '.join(TASK_TOKENS)}")
        out.append(m)
    return out


# --- rendering ----------------------------------------------------------------------------------------------------

class PromptPart(NamedTuple):
    """A piece of a rendered prompt. template=True: written by the template itself, so the added-token strings in it
    (`<｜User｜>`, `</think>`, `｜DSML｜`, ...) are control tokens. template=False: text that came with the request
    (message content, reasoning, tool schemas, tool names and arguments), always tokenized as plain text."""
    text: str
    template: bool


def _t(text: str) -> PromptPart:
    return PromptPart(text, True)


def _u(text: str) -> PromptPart:
    return PromptPart(text, False)


def _join(parts: Iterable[PromptPart]) -> str:
    return "".join(p.text for p in parts)


_TOOLS_HEAD, _TOOLS_TAIL = TOOLS_TEMPLATE.split("{schemas}")
_FORMAT_HEAD, _FORMAT_TAIL = RESPONSE_FORMAT_TEMPLATE.split("{schema}")


def _tools_parts(tools: Iterable[Mapping]) -> list[PromptPart]:
    head = _TOOLS_HEAD.format(dsml=DSML, think_start=THINK_START, think_end=THINK_END)
    return [_t(head), _u("\n".join(to_json(t) for t in tools)), _t(_TOOLS_TAIL)]


def render_tools(tools: Iterable[Mapping]) -> str:
    """The `## Tools` block (DSML call syntax and one JSON schema per line)."""
    return _join(_tools_parts(tools))


def _dsml_argument_parts(arguments: str) -> list[PromptPart]:
    try:
        parsed = json.loads(arguments)
    except (TypeError, ValueError):
        parsed = {"arguments": arguments}
    if not isinstance(parsed, dict):
        parsed = {"arguments": parsed}
    out: list[PromptPart] = []
    for k, (key, value) in enumerate(parsed.items()):
        is_str = isinstance(value, str)
        out += [_t(("\n" if k else "") + f'<{DSML}parameter name="'), _u(str(key)),
                _t(f'" string="{"true" if is_str else "false"}">'), _u(value if is_str else to_json(value)),
                _t(f"</{DSML}parameter>")]
    return out


def render_dsml_arguments(arguments: str) -> str:
    """A tool call's JSON arguments as DSML parameter lines: strings raw with string="true", the rest as JSON."""
    return _join(_dsml_argument_parts(arguments))


def _tool_call_parts(tool_calls: Sequence[Mapping]) -> list[PromptPart]:
    out = [_t(f"\n\n<{DSML}{TOOL_CALLS_BLOCK}>\n")]
    for k, tc in enumerate(tool_calls):
        out += [_t(("\n" if k else "") + f'<{DSML}invoke name="'), _u(tc["name"]), _t('">\n'),
                *_dsml_argument_parts(tc["arguments"]), _t(f"\n</{DSML}invoke>")]
    return out + [_t(f"\n</{DSML}{TOOL_CALLS_BLOCK}>")]


def render_tool_calls(tool_calls: Sequence[Mapping]) -> str:
    """`\\n\\n<｜DSML｜tool_calls>...</｜DSML｜tool_calls>` for normalized tool calls."""
    return _join(_tool_call_parts(tool_calls))


def _last_user_index(messages: Sequence[Mapping]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") in ("user", "developer"):
            return i
    return -1


def _merge_tool_messages(messages: Sequence[dict]) -> list[dict]:
    """Tool results and user texts become content_blocks of one user message per run of user/tool messages
    (a user message with a task starts a new turn and is never merged into)."""
    merged: list[dict] = []
    for msg in messages:
        msg = copy.deepcopy(msg)
        role = msg.get("role")
        if role == "tool":
            block = {"type": "tool_result", "tool_use_id": msg.get("tool_call_id", ""),
                     "content": msg.get("content", "")}
            if merged and merged[-1].get("role") == "user" and "content_blocks" in merged[-1]:
                merged[-1]["content_blocks"].append(block)
            else:
                merged.append({"role": "user", "content_blocks": [block]})
        elif role == "user":
            block = {"type": "text", "text": msg.get("content", "")}
            if (merged and merged[-1].get("role") == "user" and "content_blocks" in merged[-1]
                    and merged[-1].get("task") is None):
                merged[-1]["content_blocks"].append(block)
            else:
                new = {"role": "user", "content": msg.get("content", ""), "content_blocks": [block]}
                for key in ("task", "wo_eos", "mask"):
                    if key in msg:
                        new[key] = msg[key]
                merged.append(new)
        else:
            merged.append(msg)
    return merged


def _sort_tool_results(messages: list[dict]) -> list[dict]:
    """Within a user turn, tool results follow the order of the preceding assistant's tool calls."""
    order: dict[str, int] = {}
    for msg in messages:
        if msg.get("role") == "assistant" and msg.get("tool_calls"):
            order = {tc["id"]: k for k, tc in enumerate(msg["tool_calls"]) if tc.get("id")}
        elif msg.get("role") == "user" and msg.get("content_blocks"):
            results = [b for b in msg["content_blocks"] if b.get("type") == "tool_result"]
            if len(results) > 1 and order:
                ordered = iter(sorted(results, key=lambda b: order.get(b.get("tool_use_id", ""), 0)))
                msg["content_blocks"] = [next(ordered) if b.get("type") == "tool_result" else b
                                         for b in msg["content_blocks"]]
    return messages


def _drop_thinking(messages: list[dict]) -> list[dict]:
    """Before the last user message: assistant reasoning removed, developer messages removed."""
    last_user = _last_user_index(messages)
    out = []
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if role in _ALWAYS_KEPT_ROLES or i >= last_user:
            out.append(msg)
        elif role == "assistant":
            msg = dict(msg)
            msg.pop("reasoning_content", None)
            out.append(msg)
    return out


def _render_user_body(msg: Mapping) -> list[PromptPart]:
    blocks = msg.get("content_blocks")
    if not blocks:
        return [_u(msg.get("content") or "")]
    parts: list[PromptPart] = []
    for k, block in enumerate(blocks):
        if k:
            parts.append(_t("\n\n"))
        kind = block.get("type")
        if kind == "text":
            parts.append(_u(block.get("text") or ""))
        elif kind == "tool_result":
            parts += [_t("<tool_result>"), _u(_tool_result_text(block.get("content", ""))), _t("</tool_result>")]
        else:
            parts.append(_u(f"[Unsupported {kind}]"))
    return parts


def _render_message(index: int, messages: Sequence[dict], thinking_mode: str, drop_thinking: bool,
                    reasoning_effort: str | None) -> list[PromptPart]:
    msg = messages[index]
    role = msg.get("role")
    last_user = _last_user_index(messages)
    out: list[PromptPart] = []
    if index == 0 and thinking_mode == "thinking" and reasoning_effort == "max":
        out.append(_t(THINK_MAX_PREAMBLE))

    def tools_and_format() -> list[PromptPart]:
        extra: list[PromptPart] = []
        if msg.get("tools"):
            extra += [_t("\n\n"), *_tools_parts(msg["tools"])]
        if msg.get("response_format"):
            extra += [_t("\n\n" + _FORMAT_HEAD), _u(to_json(msg["response_format"])), _t(_FORMAT_TAIL)]
        return extra

    if role == "system":
        out += [_u(msg.get("content") or ""), *tools_and_format()]
    elif role == "developer":
        if not msg.get("content"):
            raise ChatFormatError(f"messages[{index}] (developer) has empty content")
        out += [_t(USER_TOKEN), _u(msg["content"]), *tools_and_format()]
    elif role == "user":
        out += [_t(USER_TOKEN), *_render_user_body(msg)]
    elif role == "latest_reminder":
        out += [_t(LATEST_REMINDER_TOKEN), _u(msg.get("content") or "")]
    elif role == "assistant":
        prev_has_task = index > 0 and messages[index - 1].get("task") is not None
        if thinking_mode == "thinking" and not prev_has_task and (not drop_thinking or index > last_user):
            out += [_u(msg.get("reasoning_content") or ""), _t(THINK_END)]
        out.append(_u(msg.get("content") or ""))
        if msg.get("tool_calls"):
            out += _tool_call_parts(msg["tool_calls"])
        if not msg.get("wo_eos", False):
            out.append(_t(EOS_TOKEN))
    else:
        raise ChatFormatError(f"messages[{index}].role {role!r} cannot be rendered here")

    # the turn hand-over: only before an assistant/latest_reminder message, or at the end
    if index + 1 < len(messages) and messages[index + 1].get("role") not in ("assistant", "latest_reminder"):
        return out
    task = msg.get("task")
    if task is not None:
        if task == "action":
            out.append(_t(ASSISTANT_TOKEN + (THINK_START if thinking_mode == "thinking" else THINK_END)
                          + TASK_TOKENS[task]))
        else:
            out.append(_t(TASK_TOKENS[task]))
    elif role in ("user", "developer"):
        out.append(_t(ASSISTANT_TOKEN))
        if thinking_mode == "thinking" and (not drop_thinking or index >= last_user):
            out.append(_t(THINK_START))
        else:
            out.append(_t(THINK_END))
    return out


def encode_messages(messages: Sequence[Mapping[str, Any]], thinking_mode: str = "chat", *,
                    context: Sequence[Mapping[str, Any]] | None = None, drop_thinking: bool = True,
                    add_default_bos_token: bool = True, reasoning_effort: str | None = None,
                    tools: Sequence[Mapping] | None = None, response_format: Any = None) -> str:
    """The prompt text of `render_prompt` (same arguments) as one string; BOS is in the text. Tokenizing this string
    with Tokenizer.encode treats added-token strings inside message text as control tokens: for requests from
    anyone but yourself, tokenize `render_prompt(...)` with Tokenizer.encode_parts instead."""
    return _join(render_prompt(messages, thinking_mode, context=context, drop_thinking=drop_thinking,
                               add_default_bos_token=add_default_bos_token, reasoning_effort=reasoning_effort,
                               tools=tools, response_format=response_format))


def render_prompt(messages: Sequence[Mapping[str, Any]], thinking_mode: str = "chat", *,
                  context: Sequence[Mapping[str, Any]] | None = None, drop_thinking: bool = True,
                  add_default_bos_token: bool = True, reasoning_effort: str | None = None,
                  tools: Sequence[Mapping] | None = None, response_format: Any = None) -> list[PromptPart]:
    """Render `messages` as DeepSeek-V4's prompt, as PromptParts: template text (control tokens allowed) and message
    text (plain text only). Tokenize with Tokenizer.encode_parts; `"".join` of the texts is `encode_messages`.

    thinking_mode: "chat" (answer after `</think>`) or "thinking" (reason after `<think>`).
    context: earlier messages already in the KV cache: they shape the rendering but are not rendered, and no BOS
        is written.
    drop_thinking: drop reasoning before the last user message (ignored, i.e. False, when any message has tools).
    reasoning_effort: None/"high" (also "low"/"medium"), or "max" for the Think-Max preamble (thinking mode only).
    tools / response_format: request-level OpenAI `tools` and `response_format`, attached to the first message when
        it is a system message, else to a new empty system message put first.
    """
    if thinking_mode not in THINKING_MODES:
        raise ChatFormatError(f"thinking_mode is {thinking_mode!r}; expected 'chat' or 'thinking'")
    if reasoning_effort not in REASONING_EFFORTS:
        raise ChatFormatError(f"reasoning_effort is {reasoning_effort!r}; expected None, 'low', 'medium', 'high' "
                              f"or 'max'")
    if reasoning_effort in ("low", "medium"):
        reasoning_effort = "high"
    context_msgs = normalize_messages(list(context)) if context else []
    msgs = normalize_messages(messages)
    if tools or response_format:
        target = (context_msgs or msgs)
        if not target or target[0].get("role") != "system":
            target.insert(0, {"role": "system", "content": ""})
        if tools:
            target[0]["tools"] = [_normalize_tool(t, f"tools[{k}]") for k, t in enumerate(tools)]
        if response_format:
            target[0]["response_format"] = response_format

    msgs = _merge_tool_messages(msgs)
    msgs = _sort_tool_results(context_msgs + msgs)[len(context_msgs):] if context_msgs else _sort_tool_results(msgs)
    if context_msgs:
        context_msgs = _sort_tool_results(_merge_tool_messages(context_msgs))
    full = context_msgs + msgs
    prompt = [_t(BOS_TOKEN)] if add_default_bos_token and not context_msgs else []

    effective_drop = drop_thinking and not any(m.get("tools") for m in full)
    if thinking_mode == "thinking" and effective_drop:
        full = _drop_thinking(full)
        n_render = len(full) - len(_drop_thinking(context_msgs))
        first = len(full) - n_render
    else:
        n_render = len(msgs)
        first = len(context_msgs)
    for i in range(first, first + n_render):
        prompt += _render_message(i, full, thinking_mode, effective_drop, reasoning_effort)
    return [p for p in prompt if p.text]


def generation_prefix(thinking: bool) -> str:
    """What a prompt ends with when the model is to answer: `<｜Assistant｜><think>` or `<｜Assistant｜></think>`."""
    return ASSISTANT_TOKEN + (THINK_START if thinking else THINK_END)
