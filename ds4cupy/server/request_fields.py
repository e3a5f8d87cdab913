"""Every request field the OpenAI endpoints know, and what the server does with it: nothing is silently ignored.

Each field is one of
* "honoured": validated and acted on (protocol.py parses sampling, messages, tools and thinking; controls.py the
  generation controls: logprobs, penalties, logit_bias, structured output, ...);
* "no effect": bookkeeping fields whose definition does not change the generated output (an end-user id, metadata
  for stored completions, a billing tier, a prompt-cache routing key); accepted so that clients which always send
  them work, and documented here as having no effect;
* "default only": a feature the server does not have, accepted only at its default value (n=1, echo=false, ...) and
  refused with a 400 otherwise.

A field not in the table is refused with a 400 naming it (`unrecognized_request_argument`), as OpenAI does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

HONOURED, NO_EFFECT, DEFAULT_ONLY = "honoured", "no effect", "default only"


@dataclass(frozen=True)
class FieldRule:
    handling: str
    accepted: tuple = ()      # "default only": the values accepted (None always is)
    why: str = ""             # "default only": what the server lacks


def _honoured(*names: str) -> dict[str, FieldRule]:
    return {n: FieldRule(HONOURED) for n in names}


def _no_effect(*names: str) -> dict[str, FieldRule]:
    return {n: FieldRule(NO_EFFECT) for n in names}


_SAMPLING = ("model", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature", "top_p",
             "top_k", "min_p", "seed", "stop", "reasoning_effort", "thinking", "think", "chat_template_kwargs")
_CONTROLS = ("logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "min_tokens",
             "ignore_eos", "return_token_ids", "cache_prompt")
_BOOKKEEPING = ("user", "metadata", "service_tier", "prompt_cache_key", "safety_identifier")
_ONE_CHOICE = {"n": FieldRule(DEFAULT_ONLY, (1,), "one choice per request (n=1)")}

CHAT_FIELDS: dict[str, FieldRule] = {
    **_honoured("messages", *_SAMPLING, *_CONTROLS, "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
                "response_format"),
    **_no_effect(*_BOOKKEEPING),
    **_ONE_CHOICE,
    "store": FieldRule(DEFAULT_ONLY, (False,), "completions are not stored"),
    "modalities": FieldRule(DEFAULT_ONLY, (["text"],), "text output only"),
    "audio": FieldRule(DEFAULT_ONLY, (), "no audio output"),
    "prediction": FieldRule(DEFAULT_ONLY, (), "no predicted outputs"),
    "web_search_options": FieldRule(DEFAULT_ONLY, (), "no web search"),
    "functions": FieldRule(DEFAULT_ONLY, (), "the deprecated 'functions'; use 'tools'"),
    "function_call": FieldRule(DEFAULT_ONLY, (), "the deprecated 'function_call'; use 'tool_choice'"),
}

COMPLETION_FIELDS: dict[str, FieldRule] = {
    **_honoured("prompt", *_SAMPLING, *_CONTROLS),
    **_no_effect(*_BOOKKEEPING),
    **_ONE_CHOICE,
    "best_of": FieldRule(DEFAULT_ONLY, (1,), "one candidate per request (best_of=1)"),
    "echo": FieldRule(DEFAULT_ONLY, (False,), "the prompt is not echoed"),
    "suffix": FieldRule(DEFAULT_ONLY, (), "no insertion (suffix)"),
}

ENDPOINT_FIELDS = {"chat": CHAT_FIELDS, "completions": COMPLETION_FIELDS}


def field_problems(body: Mapping[str, Any], endpoint: str) -> list[tuple[str, str, str]]:
    """[(field, code, message)] for every field of `body` the endpoint refuses, in body order."""
    table = ENDPOINT_FIELDS[endpoint]
    problems = []
    for name, value in body.items():
        rule = table.get(name)
        if rule is None:
            problems.append((name, "unrecognized_request_argument", f"Unrecognized request argument supplied: "
                                                                    f"{name!r}"))
        elif rule.handling == DEFAULT_ONLY and value is not None and not any(
                value == ok and type(value) is type(ok) for ok in rule.accepted):
            problems.append((name, "unsupported_value", f"'{name}' is not supported ({rule.why}); got {value!r}"))
    return problems
