"""Generation controls of a request beyond plain sampling, OpenAI / vLLM fields in and JSON out:

* `logprobs` / `top_logprobs` (chat: a boolean and 0..20; completions: an integer 0..20);
* `presence_penalty`, `frequency_penalty` (-2..2), `repetition_penalty` (> 0), `logit_bias` ({token id: -100..100}),
  `min_tokens`, `ignore_eos` (vLLM's), as ds4cupy.text.logit_processors defines them;
* `response_format` {"type": "text" | "json_object" | "json_schema"} and `tool_choice` "required" / a named function /
  `parallel_tool_calls` / tools with `strict: true`, enforced by a grammar (ds4cupy.text.grammars);
* `return_token_ids` (vLLM's: the generated ids on each choice), `cache_prompt` (llama.cpp's: false = no KV reuse),
  `chat_template_kwargs` ({"thinking" | "enable_thinking": bool}, vLLM's way to switch thinking).

Parsing raises protocol.ProtocolError (400) naming the field. `TokenExtras` gathers what the deltas of a job carry
(log-probabilities, ids) until a chunk is written, and renders them in OpenAI's chat and completions shapes.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from ..text.constraints import GrammarError
from ..text.grammars import json_grammar, tool_calls_grammar
from ..text.logit_processors import LOGIT_BIAS_RANGE, PENALTY_RANGE, LogitAdjustments
from ..text.logprobs import MAX_TOP_LOGPROBS
from .protocol import ChatRequest, ThinkingChoice, invalid
from .validation import optional_bool

RESPONSE_FORMATS = ("text", "json_object", "json_schema")
TEMPLATE_THINKING_KEYS = ("thinking", "enable_thinking")
LOGPROB_FLOOR = -9999.0     # JSON has no -inf; vLLM reports this floor too


@dataclass
class ResponseFormat:
    """A validated response_format: kind "text" (no constraint), "json_object" or "json_schema"."""
    kind: str = "text"
    schema: dict | None = None
    strict: bool = False
    name: str | None = None


@dataclass
class GenerationControls:
    """The controls of one request, validated (defaults change nothing)."""
    logprobs: int | None = None            # None: no logprobs; else how many top alternatives per token (0..20)
    adjust: LogitAdjustments = field(default_factory=LogitAdjustments)
    ignore_eos: bool = False
    return_token_ids: bool = False
    cache_prompt: bool = True
    response_format: ResponseFormat = field(default_factory=ResponseFormat)
    parallel_tool_calls: bool = True


# ------------------------------------------------------------------------------------------------------- parsing

def _number(body: Mapping, name: str, default: float, low: float | None, high: float | None,
            low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(f"'{name}' must be a number, got {type(value).__name__}", name, "invalid_type")
    value = float(value)
    if (low is not None and (value < low or (low_open and value == low))) or (high is not None and value > high):
        span = f"{'(' if low_open else '['}{low:g}, {'inf' if high is None else f'{high:g}'}]"
        raise invalid(f"'{name}' must be in {span}, got {value:g}", name, "invalid_value")
    return value


def _int(body: Mapping, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"'{name}' must be an integer, got {type(value).__name__}", name, "invalid_type")
    if value < low or (high is not None and value > high):
        raise invalid(f"'{name}' must be in [{low}, {'inf' if high is None else high}], got {value}", name,
                      "invalid_value")
    return value


def _bool(body: Mapping, name: str, default: bool) -> bool:
    """validation.optional_bool with a default for an absent field."""
    value = optional_bool(body, name)
    return default if value is None else value


def parse_logit_bias(value: Any) -> dict[int, float]:
    """{"token id": bias}: keys are decimal token ids, values numbers in [-100, 100]."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise invalid("'logit_bias' must be an object mapping token ids to numbers", "logit_bias", "invalid_type")
    out = {}
    for key, bias in value.items():
        where = f"logit_bias.{key}"
        token = int(key) if isinstance(key, str) and key.isdigit() else None
        if token is None:
            raise invalid(f"'logit_bias' keys must be token ids (decimal strings), got {key!r}", where,
                          "invalid_value")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) \
                or not LOGIT_BIAS_RANGE[0] <= bias <= LOGIT_BIAS_RANGE[1]:
            raise invalid(f"'{where}' must be a number in [{LOGIT_BIAS_RANGE[0]:g}, {LOGIT_BIAS_RANGE[1]:g}], "
                          f"got {bias!r}", where, "invalid_value")
        out[token] = float(bias)
    return out


def _parse_adjust(body: Mapping) -> LogitAdjustments:
    low, high = PENALTY_RANGE
    return LogitAdjustments(
        presence_penalty=_number(body, "presence_penalty", 0.0, low, high),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, low, high),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, None, low_open=True),
        logit_bias=parse_logit_bias(body.get("logit_bias")),
        min_tokens=_int(body, "min_tokens", 0) or 0)


def parse_response_format(value: Any) -> ResponseFormat:
    if value is None:
        return ResponseFormat()
    if not isinstance(value, Mapping):
        raise invalid("'response_format' must be an object", "response_format", "invalid_type")
    kind = value.get("type")
    if kind not in RESPONSE_FORMATS:
        raise invalid(f"'response_format.type' must be one of {', '.join(RESPONSE_FORMATS)}; got {kind!r}",
                      "response_format.type", "invalid_value")
    if kind != "json_schema":
        return ResponseFormat(kind)
    spec = value.get("json_schema")
    if not isinstance(spec, Mapping):
        raise invalid("'response_format.json_schema' must be an object {name, schema, strict}",
                      "response_format.json_schema", "invalid_type")
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise invalid("'response_format.json_schema.name' must be a string", "response_format.json_schema.name",
                      "invalid_type")
    schema = spec.get("schema")
    if not isinstance(schema, Mapping):
        raise invalid("'response_format.json_schema.schema' must be a JSON schema object",
                      "response_format.json_schema.schema", "invalid_type")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise invalid("'response_format.json_schema.strict' must be a boolean", "response_format.json_schema.strict",
                      "invalid_type")
    return ResponseFormat("json_schema", dict(schema), bool(strict), name)


def _chat_logprobs(body: Mapping) -> int | None:
    wanted = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not wanted:
        raise invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
    return (top or 0) if wanted else None


def parse_controls(body: Mapping, endpoint: str) -> GenerationControls:
    """The controls of a chat ("chat") or text completions ("completions") body."""
    if endpoint == "chat":
        logprobs = _chat_logprobs(body)
        response_format = parse_response_format(body.get("response_format"))
        parallel = _bool(body, "parallel_tool_calls", True)
    else:
        logprobs = _int(body, "logprobs", 0, MAX_TOP_LOGPROBS)
        response_format, parallel = ResponseFormat(), True
    controls = GenerationControls(
        logprobs=logprobs, adjust=_parse_adjust(body), ignore_eos=_bool(body, "ignore_eos", False),
        return_token_ids=_bool(body, "return_token_ids", False), cache_prompt=_bool(body, "cache_prompt", True),
        response_format=response_format, parallel_tool_calls=parallel)
    return controls


def check_token_ids(controls: GenerationControls, n_vocab: int) -> None:
    """logit_bias ids must be in the vocabulary (known only to the server, not to the protocol)."""
    for token in controls.adjust.logit_bias:
        if token >= n_vocab:
            raise invalid(f"'logit_bias' token id {token} is outside the vocabulary [0, {n_vocab})",
                          f"logit_bias.{token}", "invalid_value")


def template_thinking(body: Mapping, thinking: ThinkingChoice) -> ThinkingChoice:
    """chat_template_kwargs {"thinking" | "enable_thinking": bool} switches thinking (applied after the other
    thinking fields); any other key is refused (DeepSeek-V4's encoding has no other switch)."""
    kwargs = body.get("chat_template_kwargs")
    if kwargs is None:
        return thinking
    if not isinstance(kwargs, Mapping):
        raise invalid("'chat_template_kwargs' must be an object", "chat_template_kwargs", "invalid_type")
    for key, value in kwargs.items():
        where = f"chat_template_kwargs.{key}"
        if key not in TEMPLATE_THINKING_KEYS:
            raise invalid(f"'chat_template_kwargs' supports only {', '.join(TEMPLATE_THINKING_KEYS)}; got {key!r}",
                          where, "unsupported_value")
        if not isinstance(value, bool):
            raise invalid(f"'{where}' must be a boolean", where, "invalid_type")
        thinking = replace(thinking, enabled=value, think_max=thinking.think_max and value)
    return thinking


# ------------------------------------------------------------------------------------------------ structured output

def chat_grammar(chat: ChatRequest, controls: GenerationControls) -> tuple[str, str] | None:
    """(grammar, the field it enforces) for a chat request, or None when nothing is constrained:
    tool_choice "required" / a function -> DSML tool calls; else response_format json_* -> JSON (or, with tools
    offered, a tool-call block instead); else tools with `strict: true` or parallel_tool_calls=false -> free text or
    checked tool calls. A schema the grammar cannot be built from is a 400 naming that field (whether the grammar
    compiles is checked later, with the tokenizer: text.constraints.check_grammar)."""
    tools = chat.offered_tools
    thinking = chat.thinking.enabled
    parallel = controls.parallel_tool_calls
    choice = chat.tool_choice
    fmt = controls.response_format
    try:
        if tools and (choice == "required" or isinstance(choice, Mapping)):
            name = choice if choice == "required" else choice["function"]["name"]
            return tool_calls_grammar(tools, choice=name, parallel=parallel, thinking=thinking), "tool_choice"
        if fmt.kind != "text":
            grammar = json_grammar(fmt.schema, strict=fmt.strict, thinking=thinking, tools=tools or None,
                                   parallel=parallel)
            return grammar, "response_format"
        if tools and (not parallel or any((t.get("function") or {}).get("strict") is True for t in tools)):
            return tool_calls_grammar(tools, choice="auto", parallel=parallel, thinking=thinking), "tools"
    except GrammarError as exc:
        field = "tool_choice" if tools and choice not in ("auto", "none") else (
            "response_format" if fmt.kind != "text" else "tools")
        raise invalid(f"'{field}' cannot be enforced: {exc}", field, "invalid_schema") from None
    return None


def response_format_prompt(fmt: ResponseFormat) -> dict | None:
    """What DeepSeek-V4's encoding renders under "## Response Format" (text.chat): the schema, or {"type": "object"}
    for json_object; None for text."""
    if fmt.kind == "json_schema":
        return fmt.schema
    if fmt.kind == "json_object":
        return {"type": "object"}
    return None


# ------------------------------------------------------------------------------------------------------ rendering

def _token_text(tokenizer, token_id: int) -> tuple[str, list[int]]:
    """(token string, its bytes); a token that is not whole UTF-8 on its own is written "bytes:\\xe2\\x80" (OpenAI's
    convention), so that distinct byte tokens never share a string."""
    data = tokenizer.token_bytes(token_id)
    try:
        return data.decode("utf-8"), list(data)
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data), list(data)


def _lp(value: float) -> float:
    return max(float(value), LOGPROB_FLOOR)


class TokenExtras:
    """Per-token extras of a job (log-probabilities, ids) held until the next chunk is written, so that each
    token's entry leaves exactly once and with (or before) the text it produced."""

    def __init__(self, controls: GenerationControls, tokenizer):
        self.logprobs = controls.logprobs
        self.return_ids = controls.return_token_ids
        self.tokenizer = tokenizer
        self._ids: list[int] = []
        self._logprobs: list = []
        self._offset = 0

    @property
    def active(self) -> bool:
        return self.logprobs is not None or self.return_ids

    def add(self, delta: Any) -> None:
        if not self.active:
            return
        self._ids.append(int(delta.token_id))
        if self.logprobs is not None:
            self._logprobs.append(delta.logprob)

    def _take(self) -> tuple[list[int], list]:
        ids, logprobs = self._ids, self._logprobs
        self._ids, self._logprobs = [], []
        return ids, logprobs

    def chat(self) -> dict:
        """Choice fields for the held tokens: "logprobs" ({"content": [...], "refusal": None}) and "token_ids"."""
        ids, logprobs = self._take()
        out: dict[str, Any] = {}
        if self.logprobs is not None:
            out["logprobs"] = {"content": [self._chat_entry(lp) for lp in logprobs], "refusal": None}
        if self.return_ids:
            out["token_ids"] = ids
        return out

    def _chat_entry(self, lp) -> dict:
        text, data = _token_text(self.tokenizer, lp.token_id)
        top = []
        for token_id, value in lp.top:
            t, d = _token_text(self.tokenizer, token_id)
            top.append({"token": t, "logprob": _lp(value), "bytes": d})
        return {"token": text, "logprob": _lp(lp.logprob), "bytes": data, "top_logprobs": top}

    def completion(self) -> dict:
        """Choice fields for the held tokens in the text completions shape: "logprobs" {tokens, token_logprobs,
        top_logprobs, text_offset} (offsets count characters of the token strings) and "token_ids"."""
        ids, logprobs = self._take()
        out: dict[str, Any] = {}
        if self.logprobs is not None:
            tokens, values, tops, offsets = [], [], [], []
            for lp in logprobs:
                text, _ = _token_text(self.tokenizer, lp.token_id)
                tokens.append(text)
                values.append(_lp(lp.logprob))
                top: dict[str, float] = {}
                for t, v in lp.top:          # most likely first: a (rare) repeated string keeps its best value
                    top.setdefault(_token_text(self.tokenizer, t)[0], _lp(v))
                tops.append(top)
                offsets.append(self._offset)
                self._offset += len(text)
            out["logprobs"] = {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
                               "text_offset": offsets}
        if self.return_ids:
            out["token_ids"] = ids
        return out
