"""What every API the server speaks shares: the error value, typed field readers, sampling fields, thinking mode.

- `ProtocolError`: a refused request (HTTP status, message, type, param, code); each API renders it in its own
  error shape (OpenAI's here as `error_body`, Anthropic's in anthropic.py);
- `invalid(...)`: the 400 naming the offending parameter;
- typed readers for optional body fields (`optional_number`, `optional_int`, `optional_bool`) that name the field
  and the bad value;
- `SamplingFields` (what the worker's sampler needs) and `ThinkingChoice` / `select_thinking` (ds4's rules for the
  thinking mode, which the OpenAI, Anthropic and Responses fields all map onto).

JSON in, values or ProtocolError out: nothing here knows HTTP or the engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

# Model aliases understood as in ds4: "deepseek-chat" selects the non-thinking mode, "deepseek-reasoner" thinking.
NON_THINKING_ALIAS = "deepseek-chat"
THINKING_ALIAS = "deepseek-reasoner"
# ds4 uses Think Max only when the context can hold its long reasoning (ds4-peer.md §5).
THINK_MAX_MIN_CTX = 393216
# Sampling defaults (ds4 and the model card): temperature 1, top_p 1, min_p 0.05, no top_k.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
DEFAULT_TOP_K = 0
DEFAULT_MIN_P = 0.05
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")


# ---------------------------------------------------------------------------------------------------------- errors

class ProtocolError(Exception):
    """A request the server refuses, with the HTTP status and the fields of OpenAI's error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error schema: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> ProtocolError:
    """A 400 invalid_request_error naming the offending parameter."""
    return ProtocolError(400, message, param=param, code=code)


# ---------------------------------------------------------------------------------------------- field validators

def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def optional_number(body: Mapping, name: str, default: float, low: float, high: float,
                     low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not is_number(value):
        raise invalid(f"'{name}' must be a number, got {type(value).__name__}", name, "invalid_type")
    value = float(value)
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise invalid(f"'{name}' must be in {bracket}{low:g}, {high:g}], got {value:g}", name, "invalid_value")
    return value


def optional_int(body: Mapping, name: str, low: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not is_int(value):
        raise invalid(f"'{name}' must be an integer, got {type(value).__name__}", name, "invalid_type")
    if low is not None and value < low:
        raise invalid(f"'{name}' must be >= {low}, got {value}", name, "invalid_value")
    return value


def optional_bool(body: Mapping, name: str) -> bool | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise invalid(f"'{name}' must be a boolean, got {type(value).__name__}", name, "invalid_type")
    return value


# ------------------------------------------------------------------------------------------------------ sampling

@dataclass
class SamplingFields:
    """The sampling parameters of one request, already validated (mapped onto ds4cupy.text.sampling.SamplingParams)."""
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K
    min_p: float = DEFAULT_MIN_P
    seed: int | None = None


# ------------------------------------------------------------------------------------------------------ thinking

@dataclass
class ThinkingChoice:
    """Which chat encoding the request asks for: thinking on/off, and Think Max (a long-context mode)."""
    enabled: bool
    think_max: bool = False

    @property
    def thinking_mode(self) -> str:
        return "thinking" if self.enabled else "chat"

    @property
    def reasoning_effort(self) -> str | None:
        return "max" if (self.enabled and self.think_max) else None


def select_thinking(body: Mapping, model_name: str | None, ctx: int, default: bool = True) -> ThinkingChoice:
    """ds4's rules (ds4-peer.md §5): thinking defaults on; the model alias "deepseek-chat", `thinking: {type:
    disabled}` (or `thinking: false`), `think: false` and `reasoning_effort: "none"` turn it off; explicit fields win
    over the alias. `reasoning_effort: "max"` selects Think Max only when the server context is at least
    THINK_MAX_MIN_CTX tokens, else plain thinking."""
    enabled = default
    if model_name == NON_THINKING_ALIAS:
        enabled = False
    elif model_name == THINKING_ALIAS:
        enabled = True
    think_max = False

    effort = body.get("reasoning_effort")
    if effort is not None:
        if not isinstance(effort, str):
            raise invalid("'reasoning_effort' must be a string", "reasoning_effort", "invalid_type")
        if effort not in REASONING_EFFORTS:
            raise invalid(f"'reasoning_effort' must be one of {', '.join(REASONING_EFFORTS)}; got {effort!r}",
                          "reasoning_effort", "invalid_value")
        enabled = effort != "none"
        think_max = effort == "max" and ctx >= THINK_MAX_MIN_CTX

    think = optional_bool(body, "think")
    if think is not None:
        enabled = think

    thinking = body.get("thinking")
    if thinking is not None:
        if isinstance(thinking, bool):
            enabled = thinking
        elif isinstance(thinking, Mapping):
            kind = thinking.get("type")
            if kind not in ("enabled", "disabled"):
                raise invalid("'thinking.type' must be \"enabled\" or \"disabled\"", "thinking.type", "invalid_value")
            enabled = kind == "enabled"
        else:
            raise invalid("'thinking' must be an object {\"type\": \"enabled\"|\"disabled\"} or a boolean",
                          "thinking", "invalid_type")
    return ThinkingChoice(enabled=enabled, think_max=enabled and think_max)


def list_items(value, field: str) -> list[tuple[str, object]]:
    """(path, item) for each item of an optional list field ('tools' -> 'tools[0]', ...); None is an empty list."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid(f"'{field}' must be a list", field, "invalid_type")
    return [(f"{field}[{i}]", item) for i, item in enumerate(value)]
