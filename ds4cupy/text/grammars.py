"""Grammars for what a request makes the model write, in llguidance's Lark dialect (compiled by text.constraints).

    json_grammar(schema, strict=..., thinking=...)                 response_format json_object / json_schema
    tool_calls_grammar(tools, choice=..., parallel=..., thinking=...)  tool_choice "required" / a named function /
                                                                   "auto" with strict tools or no parallel calls

With `thinking` the prompt ended with `<think>`: anything up to the first `</think>` is free reasoning, the constraint
applies to what follows (the answer the output parser reads as content).

JSON is the schema compiled by llguidance's own JSON-schema compiler (`%json`), with at most JSON_WHITESPACE between
tokens (JSON values inside DSML arguments: exactly json.dumps' layout, as the chat encoding renders them). `strict` refuses schemas using keywords the compiler cannot enforce; without it they are ignored (OpenAI's
non-strict mode enforces nothing, this enforces what it can).

Tool calls are DeepSeek-V4's DSML, exactly as ds4cupy.text.chat renders an assistant's calls and
ds4cupy.text.output_parser reads them back:

    \\n\\n<｜DSML｜tool_calls>
    <｜DSML｜invoke name="NAME">
    <｜DSML｜parameter name="KEY" string="true">raw text</｜DSML｜parameter>
    <｜DSML｜parameter name="KEY" string="false">JSON</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜tool_calls>

The arguments follow the tool's `parameters` schema: its declared properties in schema order, the required ones
always, each a raw string (string="true") when its schema is a plain string (length bounds and enum/const are
enforced on the raw text), else a JSON value (string="false") compiled from its sub-schema (with the schema's
`$defs`). Undeclared parameters are never generated (as in OpenAI's strict function calling). The function's
`strict: true` turns on strict schema compilation.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from .constraints import GrammarError
from .output_parser import DSML, TOOL_CALLS_CLOSE, TOOL_CALLS_OPEN

# whitespace allowed between JSON tokens of an answer (llama.cpp's json-schema-to-grammar rule): nothing, one space,
# or one newline and up to 20 blanks of indentation; compact and pretty-printed JSON fit, and a model cannot loop on
# blanks
JSON_WHITESPACE = r"(?: |\n[ \t]{0,20})?"
# JSON inside DSML arguments is written as text.chat renders it (json.dumps: ", " and ": ", no other whitespace)
DSML_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
THINK_RULE = r"think[lazy]: /(?s:.*)<\/think>/"
INVOKE_HEAD = f"<{DSML}invoke name="
INVOKE_CLOSE = f"</{DSML}invoke>"
PARAM_HEAD = f"<{DSML}parameter name="
PARAM_CLOSE = f"</{DSML}parameter>"
# keys of a string schema that a raw (string="true") value can honour
RAW_STRING_KEYS = frozenset({"type", "description", "title", "enum", "const", "minLength", "maxLength", "default",
                             "examples", "$comment"})
# keys of a tool's `parameters` schema handled by the DSML grammar itself
OBJECT_KEYS = frozenset({"type", "properties", "required", "additionalProperties", "description", "title", "$defs",
                         "definitions", "$schema", "$id", "$comment"})
TOOL_CHOICES = ("required", "auto")


def _literal(text: str) -> str:
    """A Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


def _json_rule(name: str, schema: Any, strict: bool, defs: Mapping | None = None, dsml: bool = False) -> str:
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, Mapping):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
    body = dict(schema)
    for key, value in (defs or {}).items():
        body.setdefault(key, value)
    layout = DSML_JSON_OPTIONS if dsml else {"whitespace_pattern": JSON_WHITESPACE}
    body["x-guidance"] = {**layout, "lenient": not strict}
    return f"{name}: %json {json.dumps(body, ensure_ascii=False)}"


def _start(body: str, thinking: bool) -> list[str]:
    return [f"start: think {body}", THINK_RULE] if thinking else [f"start: {body}"]


def json_grammar(schema: Mapping | None, *, strict: bool = False, thinking: bool = False,
                 tools: Sequence[Mapping] | None = None, parallel: bool = True) -> str:
    """The answer is one JSON value valid under `schema` (None: any JSON object, response_format json_object). With
    `tools` (tool_choice "auto") the answer may instead be a block of DSML calls of those tools."""
    schema = {"type": "object"} if schema is None else schema
    if not tools:
        return "\n".join(_start("answer", thinking) + [_json_rule("answer", schema, strict)]) + "\n"
    rules, block = _calls_rules(tools, "required", parallel)
    return "\n".join(_start("answer", thinking) + [
        "answer: json_answer | NL? calls_block", r"NL: /\n{1,2}/", f"calls_block: {block}",
        _json_rule("json_answer", schema, strict)] + rules) + "\n"


# ------------------------------------------------------------------------------------------------------ tool calls

def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not name or any(c in name for c in '"\n<>'):
        raise GrammarError(f"{what} {name!r} cannot be written in DSML (empty, or holds '\"', '<', '>' or a newline)")
    return name


def _param_open(key: str, raw: bool) -> str:
    """The literal `<｜DSML｜parameter name="KEY" string="true|false">`."""
    return _literal(f'{PARAM_HEAD}"{key}" string="{"true" if raw else "false"}">')


def _raw_value_rule(rule: str, schema: Mapping) -> str:
    """The raw text of a string="true" parameter, followed by the parameter's closing tag."""
    close = _literal(PARAM_CLOSE)
    choices = schema.get("enum") if "enum" in schema else ([schema["const"]] if "const" in schema else None)
    if choices is not None:
        if not choices or not all(isinstance(c, str) for c in choices):
            raise GrammarError(f"string enum/const must list strings, got {choices!r}")
        return f"{rule}: ({' | '.join(_literal(c) for c in choices)}) {close}"
    low, high = schema.get("minLength", 0), schema.get("maxLength")
    for key, value in (("minLength", low), ("maxLength", high)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise GrammarError(f"'{key}' must be an integer >= 0, got {value!r}")
    if high is not None and high < low:
        raise GrammarError(f"'maxLength' {high} is below 'minLength' {low}")
    repeat = "*" if (low == 0 and high is None) else f"{{{low},{'' if high is None else high}}}"
    # lazy: the value ends at the first closing tag, so it never contains one
    return f"{rule}[lazy]: /(?s:.{repeat})<\\/{PARAM_CLOSE[2:]}/"


def _is_raw_string(schema: Any) -> bool:
    return (isinstance(schema, Mapping) and schema.get("type") == "string" and set(schema) <= RAW_STRING_KEYS)


def _invoke_rules(prefix: str, function: Mapping, strict: bool) -> list[str]:
    """Rules `{prefix}` (one whole invoke of this function) and its parameters."""
    name = _check_name(function.get("name"), "tool name")
    params = function.get("parameters")
    params = {} if params is None else params
    if not isinstance(params, Mapping):
        raise GrammarError(f"tool {name!r}: 'parameters' must be a JSON schema object")
    if params.get("type", "object") != "object":
        raise GrammarError(f"tool {name!r}: 'parameters' must have type \"object\", got {params.get('type')!r}")
    unknown = sorted(set(params) - OBJECT_KEYS)
    if unknown and strict:
        raise GrammarError(f"tool {name!r}: 'parameters' keywords {unknown} cannot be enforced on DSML arguments")
    properties = params.get("properties") or {}
    required = params.get("required") or []
    if not isinstance(properties, Mapping) or not isinstance(required, list):
        raise GrammarError(f"tool {name!r}: 'properties' must be an object and 'required' a list")
    properties = dict(properties)
    for key in required:                       # required but undeclared: any JSON value
        properties.setdefault(key, {})
    defs = {k: params[k] for k in ("$defs", "definitions") if k in params}
    head = _literal(f'{INVOKE_HEAD}"{name}">\n')
    close = _literal(INVOKE_CLOSE)
    if not properties:
        return [f'{prefix}: {head} "\\n" {close}']
    rules, parts = [], []
    for j, (key, schema) in enumerate(properties.items()):
        _check_name(key, f"tool {name!r} parameter name")
        rule = f"{prefix}_p{j}"
        value = f"{rule}_v"
        if _is_raw_string(schema):
            rules.append(f"{rule}: {_param_open(key, True)} {value}")
            rules.append(_raw_value_rule(value, schema))
        else:
            rules.append(f"{rule}: {_param_open(key, False)} {value} {_literal(PARAM_CLOSE)}")
            rules.append(_json_rule(value, schema, strict, defs, dsml=True))
        line = f'{rule} "\\n"'
        parts.append(f"({line})" if key in required else f"({line})?")
    return [f"{prefix}: {head} {' '.join(parts)} {close}"] + rules


def _function_of(tool: Mapping) -> Mapping:
    function = tool.get("function", tool) if isinstance(tool, Mapping) else None
    if not isinstance(function, Mapping):
        raise GrammarError(f"a tool must be an object with a 'function', got {tool!r}")
    return function


def _calls_rules(tools: Sequence[Mapping], choice: str, parallel: bool) -> tuple[list[str], str]:
    """(rules, the Lark expression of a whole `<｜DSML｜tool_calls>` block) for calls of `tools`."""
    functions = [_function_of(t) for t in tools]
    if not functions:
        raise GrammarError("a tool-call grammar needs at least one tool")
    names = [f.get("name") for f in functions]
    if choice not in TOOL_CHOICES:
        if choice not in names:
            raise GrammarError(f"tool_choice names {choice!r}, which is not among the tools {names}")
        functions = [functions[names.index(choice)]]
        parallel = False
    rules: list[str] = []
    for i, function in enumerate(functions):
        rules += _invoke_rules(f"call{i}", function, strict=function.get("strict") is True)
    rules.append(f"call: {' | '.join(f'call{i}' for i in range(len(functions)))}")
    calls = 'call ("\\n" call)*' if parallel else "call"
    block = f'{_literal(TOOL_CALLS_OPEN)} "\\n" {calls} "\\n" {_literal(TOOL_CALLS_CLOSE)}'
    return rules, block


def tool_calls_grammar(tools: Sequence[Mapping], *, choice: str = "required", parallel: bool = True,
                       thinking: bool = False) -> str:
    """DSML tool calls. choice: "required" (one or more calls; exactly one without `parallel`), "auto" (free text,
    optionally ending in a block of calls), or the name of one tool (exactly one call of it). Tools are OpenAI
    {"type": "function", "function": {...}} objects (or the function objects themselves)."""
    rules, block = _calls_rules(tools, choice, parallel)
    if choice == "auto":
        # plain text that never opens a block, or text up to the (lazy) block opener and then the calls
        marker = TOOL_CALLS_OPEN
        rest = block[len(_literal(TOOL_CALLS_OPEN)):]
        head = _start("answer", thinking) + [
            "answer: PLAIN | lead block",
            f"PLAIN: /(?s:.*)/ & ~/(?s:.*){marker}(?s:.*)/",
            f"lead[lazy]: /(?s:.*){marker}/",
            f"block: {rest}",
        ]
    else:
        head = _start("answer", thinking) + [f"answer: NL? {block}", r"NL: /\n{1,2}/"]
    return "\n".join(head + rules) + "\n"
