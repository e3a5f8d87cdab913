"""Server-sent events framing for the three APIs.

OpenAI's chat / completions streams are `data:` lines only and end with `data: [DONE]`; Anthropic's Messages and
OpenAI's Responses streams name every event (`event: <type>` then its `data:` line). A comment line keeps an idle
connection open. orjson never writes a raw newline, so one data line per event suffices.
"""
from __future__ import annotations

from typing import Any, Mapping

import orjson

SSE_DONE = b"data: [DONE]\n\n"
SSE_KEEPALIVE = b": keepalive\n\n"


def sse_event(payload: Mapping) -> bytes:
    """One unnamed SSE event: `data: <json>` and a blank line."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def sse_named_event(event: str, payload: Mapping) -> bytes:
    """One named SSE event: `event: <name>`, `data: <json>`, a blank line."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def json_bytes(payload: Any) -> bytes:
    return orjson.dumps(payload)
