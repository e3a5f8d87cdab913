"""tool_choice enforced on the Anthropic and Responses APIs as on chat (the tool-call grammar of controls.py): the
random-weights demo model, which never writes a tool call by itself, answers with a valid call of the named / any
tool. One request per API (the tools block makes a prompt of several hundred tokens on the reference backend)."""
from __future__ import annotations

import json

import pytest

import anthropic  # test extra: missing is an error, not a skip
import openai
import jsonschema

import ds4cupy
from ds4cupy.server import BackgroundServer, ServerSettings, create_app

CTX = 2048
TIMEOUT = 120.0
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
          "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"name": "get_weather", "description": "Weather forecast", "input_schema": SCHEMA},
         {"name": "get_time", "description": "Local time", "input_schema": {"type": "object", "properties": {}}}]


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    """Small matrices: one BLAS thread is faster, and several spin against each other on a shared machine."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def server():
    from ds4cupy.tools.demo import demo_model_path
    model = ds4cupy.load(demo_model_path(), backend="reference")
    app = create_app(model.tokenizer, model.new_session(ctx=CTX), ServerSettings(ctx=CTX))
    with BackgroundServer(app) as srv:
        yield srv
    model.close()


def test_anthropic_tool_choice_tool_is_enforced(server):
    claude = anthropic.Anthropic(base_url=server.url, api_key="x", timeout=TIMEOUT, max_retries=0)
    msg = claude.messages.create(model="deepseek-v4-flash", max_tokens=300, tools=TOOLS, extra_body={"temperature": 0},
                                 tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
                                 messages=[{"role": "user", "content": "Weather in Rome?"}])
    calls = [b for b in msg.content if b.type == "tool_use"]
    assert msg.stop_reason == "tool_use" and len(calls) == 1 and calls[0].name == "get_weather"
    jsonschema.validate(calls[0].input, SCHEMA)


def test_responses_tool_choice_required_is_enforced(server):
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=TIMEOUT, max_retries=0)
    functions = [{"type": "function", "name": t["name"], "description": t["description"],
                  "parameters": t["input_schema"]} for t in TOOLS]
    # greedy and one call: with parallel calls allowed the random-weights model may keep calling until the token limit
    # (status "incomplete"; unseeded sampling made that happen in about 1 run of 3)
    r = oai.responses.create(model="deepseek-chat", input="Weather in Rome?", tools=functions,
                             tool_choice="required", parallel_tool_calls=False, max_output_tokens=300, temperature=0)
    calls = [i for i in r.output if i.type == "function_call"]
    assert r.status == "completed" and calls and all(c.name in ("get_weather", "get_time") for c in calls)
    for c in calls:
        jsonschema.validate(json.loads(c.arguments), TOOLS[0 if c.name == "get_weather" else 1]["input_schema"])
