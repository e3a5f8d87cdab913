"""Incremental parser of DeepSeek-V4 output text: reasoning, content and DSML tool calls.

Fed text piece by piece (as tokens are decoded), it splits what the model writes into

* reasoning: everything before `</think>` when the prompt ended with `<think>` (thinking=True);
* content: the answer;
* tool calls: each `<｜DSML｜invoke name="f">` ... `</｜DSML｜invoke>` inside a `<｜DSML｜tool_calls>` block becomes
  an OpenAI tool call with an id and JSON arguments (`string="true"` values as JSON strings, `string="false"`
  values parsed as JSON, kept as a string when they are not valid JSON).

Text that might be the start of a marker is held back until it is decided, so the concatenated deltas do not depend
on how the text was split. Malformed DSML never raises: the raw text of what cannot be parsed is given as content.
Whitespace just before a `<｜DSML｜tool_calls>` block (the "\\n\\n" the template writes) is not part of the content.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Callable

THINK_END = "</think>"
DSML = "｜DSML｜"
TOOL_CALLS_OPEN = f"<{DSML}tool_calls>"
TOOL_CALLS_CLOSE = f"</{DSML}tool_calls>"
INVOKE_OPEN = f"<{DSML}invoke"
INVOKE_CLOSE = f"</{DSML}invoke>"

_INVOKE_RE = re.compile(
    r'\s*<' + re.escape(DSML) + r'invoke\s+name="([^"]*)"\s*>\s*(.*?)\s*</' + re.escape(DSML) + r'invoke>\s*\Z',
    re.DOTALL)
_PARAM_RE = re.compile(
    r'<' + re.escape(DSML) + r'parameter\s+name="([^"]*)"\s+string="(true|false)"\s*>(.*?)</'
    + re.escape(DSML) + r'parameter>', re.DOTALL)


@dataclass
class ParsedDelta:
    """What one feed() added. tool_calls: complete calls as {index, id, name, arguments} (arguments: JSON text)."""
    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


def new_tool_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def parse_invoke(text: str) -> tuple[str, str] | None:
    """(name, JSON arguments) of one complete `<｜DSML｜invoke ...>...</｜DSML｜invoke>` text, or None if malformed."""
    m = _INVOKE_RE.match(text)
    if not m or not m.group(1):
        return None
    name, body = m.group(1), m.group(2)
    args: dict = {}
    pos = 0
    for pm in _PARAM_RE.finditer(body):
        if body[pos:pm.start()].strip():
            return None                      # stray text between parameters
        key, is_string, raw = pm.group(1), pm.group(2), pm.group(3)
        if key in args:
            return None                      # duplicate parameter
        if is_string == "true":
            args[key] = raw
        else:
            try:
                args[key] = json.loads(raw)
            except ValueError:
                args[key] = raw              # not JSON after all: keep the text
        pos = pm.end()
    if body[pos:].strip():
        return None
    return name, json.dumps(args, ensure_ascii=False)


def _held_suffix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `markers`."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best


class OutputParser:
    """feed(text) -> ParsedDelta; finish() -> ParsedDelta with whatever was held back.

    Totals so far: .reasoning, .content, .tool_calls (OpenAI shape: {"id", "type": "function",
    "function": {"name", "arguments"}}).
    """

    def __init__(self, thinking: bool = False, parse_tools: bool = True,
                 id_factory: Callable[[], str] = new_tool_call_id):
        self.parse_tools = parse_tools
        self.id_factory = id_factory
        self._state = "reasoning" if thinking else "content"
        self._buf = ""            # undecided text of the current state
        self._block_start = ""    # raw text that opened the current tool_calls block (for degrading)
        self.reasoning = ""
        self.content = ""
        self.tool_calls: list[dict] = []
        self.finished = False

    @property
    def state(self) -> str:
        """"reasoning", "content" or "tool_calls"."""
        return self._state

    def feed(self, text: str) -> ParsedDelta:
        if self.finished:
            raise RuntimeError("OutputParser.feed() after finish()")
        out = ParsedDelta()
        self._buf += text
        self._advance(out, final=False)
        self._commit(out)
        return out

    def finish(self) -> ParsedDelta:
        """Flush held text (an unterminated tool_calls block is given back as content)."""
        out = ParsedDelta()
        if not self.finished:
            self._advance(out, final=True)
            self.finished = True
            self._commit(out)
        return out

    # -- internals --

    def _commit(self, out: ParsedDelta) -> None:
        self.reasoning += out.reasoning
        self.content += out.content

    def _advance(self, out: ParsedDelta, final: bool) -> None:
        while True:
            if self._state == "reasoning":
                i = self._buf.find(THINK_END)
                if i >= 0:
                    out.reasoning += self._buf[:i]
                    self._buf = self._buf[i + len(THINK_END):]
                    self._state = "content"
                    continue
                keep = 0 if final else _held_suffix(self._buf, (THINK_END,))
                out.reasoning += self._buf[:len(self._buf) - keep]
                self._buf = self._buf[len(self._buf) - keep:]
                return
            if self._state == "content":
                if not self.parse_tools:
                    out.content += self._buf
                    self._buf = ""
                    return
                i = self._buf.find(TOOL_CALLS_OPEN)
                if i >= 0:
                    head = self._buf[:i]
                    body = head.rstrip()
                    out.content += body
                    self._block_start = head[len(body):] + TOOL_CALLS_OPEN
                    self._buf = self._buf[i + len(TOOL_CALLS_OPEN):]
                    self._state = "tool_calls"
                    continue
                if final:
                    out.content += self._buf
                    self._buf = ""
                    return
                # hold a partial marker and the whitespace run in front of it
                keep = _held_suffix(self._buf, (TOOL_CALLS_OPEN,))
                head = self._buf[:len(self._buf) - keep]
                stripped = head.rstrip()
                out.content += stripped
                self._buf = self._buf[len(stripped):]
                return
            # tool_calls: take complete invokes one at a time
            stripped = self._buf.lstrip()
            if stripped.startswith(TOOL_CALLS_CLOSE):
                self._buf = stripped[len(TOOL_CALLS_CLOSE):]
                self._block_start = ""
                self._state = "content"
                continue
            if stripped.startswith(INVOKE_OPEN):
                j = stripped.find(INVOKE_CLOSE)
                if j >= 0:
                    end = j + len(INVOKE_CLOSE)
                    parsed = parse_invoke(stripped[:end])
                    if parsed is None:
                        self._degrade(out)
                        continue
                    name, arguments = parsed
                    call_id = self.id_factory()
                    index = len(self.tool_calls)
                    self.tool_calls.append({"id": call_id, "type": "function",
                                            "function": {"name": name, "arguments": arguments}})
                    out.tool_calls.append({"index": index, "id": call_id, "name": name, "arguments": arguments})
                    self._buf = stripped[end:]
                    self._block_start = ""
                    continue
                if final:
                    self._degrade(out)
                    continue
                return
            # neither an invoke nor the block end: wait while it may still become one, else degrade
            if not final and (stripped == "" or INVOKE_OPEN.startswith(stripped)
                              or TOOL_CALLS_CLOSE.startswith(stripped)):
                return
            self._degrade(out)

    def _degrade(self, out: ParsedDelta) -> None:
        """The rest of a tool_calls block is not DSML we understand: give its raw text as content."""
        out.content += self._block_start + self._buf
        self._buf = ""
        self._block_start = ""
        self._state = "content"
        self.parse_tools = False          # no second attempt: the rest is plain content


def parse_completion(text: str, thinking: bool = False, parse_tools: bool = True,
                     id_factory: Callable[[], str] = new_tool_call_id) -> dict:
    """Whole-text convenience: {"reasoning_content", "content", "tool_calls"} (EOS text, if present, removed)."""
    text = text.split("<｜end▁of▁sentence｜>", 1)[0]
    p = OutputParser(thinking=thinking, parse_tools=parse_tools, id_factory=id_factory)
    p.feed(text)
    p.finish()
    return {"reasoning_content": p.reasoning, "content": p.content, "tool_calls": p.tool_calls}
