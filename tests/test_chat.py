"""encode_messages: DeepSeek's official vectors byte for byte (and their token ids), plus the rules no official
vector covers (Think-Max, OpenAI-style inputs, tasks, tool-result order, context)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from ds4cupy.text.chat import (ASSISTANT_TOKEN, BOS_TOKEN, EOS_TOKEN, THINK_MAX_PREAMBLE, ChatFormatError,
                          encode_messages, generation_prefix)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VECTORS = DATA / "chat_template_vectors"
TOKENIZER_JSON = DATA / "tokenizer" / "tokenizer.json"

needs_vectors = pytest.mark.skipif(not VECTORS.is_dir(), reason=f"chat template vectors not found at {VECTORS}")
CASES = sorted(p.name for p in VECTORS.glob("case*.json")) if VECTORS.is_dir() else []


def _case(name):
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


@needs_vectors
def test_vectors_present():
    assert len(CASES) == 4


@needs_vectors
@pytest.mark.parametrize("name", CASES)
def test_official_vector_byte_for_byte(name):
    case = _case(name)
    call = dict(case["encode_messages_call"])
    prompt = encode_messages(case["messages"], **call)
    assert prompt.encode("utf-8") == case["expected_prompt"].encode("utf-8")
    assert len(prompt.encode("utf-8")) == case["expected_prompt_utf8_bytes"]


@needs_vectors
@pytest.mark.skipif(not TOKENIZER_JSON.is_file(), reason=f"tokenizer.json not found at {TOKENIZER_JSON}")
def test_official_vector_token_ids():
    from ds4cupy.text.tokenizer import Tokenizer
    tok = Tokenizer.from_tokenizer_json(TOKENIZER_JSON)
    derived = json.loads((VECTORS / "derived_token_ids.json").read_text(encoding="utf-8"))
    assert len(derived["cases"]) == 4
    for entry in derived["cases"]:
        case = _case(entry["name"] + ".json")
        ids = tok.encode(encode_messages(case["messages"], **case["encode_messages_call"]))
        assert ids == entry["ids"], entry["name"]
        assert len(ids) == entry["num_tokens"]


@needs_vectors
def test_readme_examples():
    data = json.loads((VECTORS / "readme_examples.json").read_text(encoding="utf-8"))
    for ex in data["encode_examples"]:
        assert encode_messages(ex["messages"], **ex["encode_messages_call"]) == ex["expected_prompt"]


@needs_vectors
def test_inputs_are_not_modified():
    case = _case("case1_thinking_tools.json")
    before = copy.deepcopy(case["messages"])
    encode_messages(case["messages"], **case["encode_messages_call"])
    assert case["messages"] == before


@needs_vectors
def test_request_level_tools_equal_tools_on_the_system_message():
    case = _case("case1_thinking_tools.json")
    msgs = copy.deepcopy(case["messages"])
    tools = msgs[0].pop("tools")
    assert encode_messages(msgs, "thinking", tools=tools) == case["expected_prompt"]


@needs_vectors
def test_openai_style_inputs_render_like_plain_ones():
    case = _case("case1_thinking_tools.json")
    msgs = copy.deepcopy(case["messages"])
    msgs[1]["content"] = [{"type": "text", "text": msgs[1]["content"]}]                   # content parts
    args = msgs[2]["tool_calls"][0]["function"]["arguments"]
    msgs[2]["tool_calls"][0]["function"]["arguments"] = json.loads(args)                # arguments as an object
    msgs[4]["reasoning"] = msgs[4].pop("reasoning_content")                              # alias
    assert encode_messages(msgs, "thinking") == case["expected_prompt"]


def test_generation_prompt_modes():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert encode_messages(msgs, "chat") == f"{BOS_TOKEN}S<｜User｜>Q{ASSISTANT_TOKEN}</think>"
    assert encode_messages(msgs, "thinking") == f"{BOS_TOKEN}S<｜User｜>Q{ASSISTANT_TOKEN}<think>"
    assert encode_messages(msgs, "thinking").endswith(generation_prefix(True))
    assert encode_messages(msgs, "chat").endswith(generation_prefix(False))
    assert encode_messages(msgs, "chat", add_default_bos_token=False) == f"S<｜User｜>Q{ASSISTANT_TOKEN}</think>"


def test_think_max_preamble():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    p = encode_messages(msgs, "thinking", reasoning_effort="max")
    assert p == BOS_TOKEN + THINK_MAX_PREAMBLE + "S<｜User｜>Q<｜Assistant｜><think>"
    assert THINK_MAX_PREAMBLE.startswith("Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
                                         "You MUST be very thorough")
    assert THINK_MAX_PREAMBLE.endswith("left unchecked.\n\n")
    # only in thinking mode; "high" is the default effort
    assert encode_messages(msgs, "chat", reasoning_effort="max") == encode_messages(msgs, "chat")
    assert encode_messages(msgs, "thinking", reasoning_effort="high") == encode_messages(msgs, "thinking")
    # no system message: the preamble still sits right after BOS
    p = encode_messages([{"role": "user", "content": "Q"}], "thinking", reasoning_effort="max")
    assert p == BOS_TOKEN + THINK_MAX_PREAMBLE + "<｜User｜>Q<｜Assistant｜><think>"


def test_multi_turn_thinking_drops_old_reasoning_unless_asked():
    msgs = [{"role": "user", "content": "A"},
            {"role": "assistant", "reasoning_content": "r1", "content": "a1"},
            {"role": "user", "content": "B"}]
    dropped = encode_messages(msgs, "thinking")
    assert dropped == f"{BOS_TOKEN}<｜User｜>A<｜Assistant｜></think>a1{EOS_TOKEN}<｜User｜>B<｜Assistant｜><think>"
    kept = encode_messages(msgs, "thinking", drop_thinking=False)
    assert kept == f"{BOS_TOKEN}<｜User｜>A<｜Assistant｜><think>r1</think>a1{EOS_TOKEN}<｜User｜>B<｜Assistant｜><think>"
    chat = encode_messages(msgs, "chat")
    assert chat == f"{BOS_TOKEN}<｜User｜>A<｜Assistant｜></think>a1{EOS_TOKEN}<｜User｜>B<｜Assistant｜></think>"


def test_tasks():
    base = [{"role": "system", "content": "S"}]
    q = encode_messages(base + [{"role": "user", "content": "Q", "task": "query"}], "chat")
    assert q == f"{BOS_TOKEN}S<｜User｜>Q<｜query｜>"
    a = encode_messages(base + [{"role": "user", "content": "Q", "task": "action"}], "thinking")
    assert a == f"{BOS_TOKEN}S<｜User｜>Q<｜Assistant｜><think><｜action｜>"
    for task, token in [("authority", "<｜authority｜>"), ("domain", "<｜domain｜>"), ("title", "<｜title｜>"),
                        ("read_url", "<｜read_url｜>")]:
        assert encode_messages([{"role": "user", "content": "x", "task": task}], "chat").endswith("x" + token)
    with pytest.raises(ChatFormatError, match="'summarize'"):
        encode_messages([{"role": "user", "content": "x", "task": "summarize"}], "chat")


def test_tool_results_merge_into_one_user_turn_in_call_order():
    msgs = [{"role": "user", "content": "go"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"n\": 1}"}},
                {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{\"s\": \"x\"}"}}]},
            {"role": "tool", "tool_call_id": "c2", "content": "G"},
            {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "F"}]},
            {"role": "user", "content": "and?"}]
    p = encode_messages(msgs, "chat")
    assert p.endswith("<｜User｜><tool_result>F</tool_result>\n\n<tool_result>G</tool_result>\n\nand?"
                      "<｜Assistant｜></think>")
    assert ('<｜DSML｜parameter name="n" string="false">1</｜DSML｜parameter>' in p
            and '<｜DSML｜parameter name="s" string="true">x</｜DSML｜parameter>' in p)
    assert p.count("<｜User｜>") == 2


def test_latest_reminder_and_developer():
    msgs = [{"role": "system", "content": "S"}, {"role": "latest_reminder", "content": "R"},
            {"role": "developer", "content": "D"}]
    assert encode_messages(msgs, "chat") == f"{BOS_TOKEN}S<｜latest_reminder｜>R<｜User｜>D<｜Assistant｜></think>"


@needs_vectors
def test_thinking_mode_with_a_developer_message_as_the_last_turn():
    """A developer message is a user turn: as the last turn in thinking mode it is kept, opens the reply with
    `<think>`, and makes earlier reasoning "before the last user turn" (dropped). Official case 3 cut after its
    developer turn must render as the official prompt up to that turn's `<｜Assistant｜><think>`."""
    case = _case("case3_interleaved_thinking_search_developer.json")
    msgs = case["messages"][:3]
    assert [m["role"] for m in msgs] == ["system", "latest_reminder", "developer"]
    opener = "<｜Assistant｜><think>"
    want = case["expected_prompt"][: case["expected_prompt"].index(opener) + len(opener)]
    assert encode_messages(msgs, **case["encode_messages_call"]) == want
    assert msgs[2]["content"] in want
    history = [{"role": "user", "content": "A"}, {"role": "assistant", "reasoning_content": "r1", "content": "a1"},
               {"role": "developer", "content": "D"}]
    assert encode_messages(history, "thinking") == (f"{BOS_TOKEN}<｜User｜>A<｜Assistant｜></think>a1{EOS_TOKEN}"
                                                    f"<｜User｜>D<｜Assistant｜><think>")


def test_context_renders_only_the_new_messages():
    prefix = [{"role": "system", "content": "S"}, {"role": "user", "content": "A"},
              {"role": "assistant", "content": "a"}]
    rest = [{"role": "user", "content": "B"}]
    # (with drop_thinking in thinking mode the history re-renders differently, so it cannot be a prefix)
    for mode, drop in (("chat", True), ("thinking", False)):
        full = encode_messages(prefix + rest, mode, drop_thinking=drop)
        head = encode_messages(prefix, mode, drop_thinking=drop)
        new = encode_messages(rest, mode, context=prefix, drop_thinking=drop)
        assert not new.startswith(BOS_TOKEN)
        assert head + new == full


def test_errors_name_the_bad_value():
    with pytest.raises(ChatFormatError, match="'fast'"):
        encode_messages([{"role": "user", "content": "x"}], "fast")
    with pytest.raises(ChatFormatError, match="'robot'"):
        encode_messages([{"role": "robot", "content": "x"}], "chat")
    with pytest.raises(ChatFormatError, match="'extreme'"):
        encode_messages([{"role": "user", "content": "x"}], "thinking", reasoning_effort="extreme")
    with pytest.raises(ChatFormatError, match="developer"):
        encode_messages([{"role": "developer", "content": ""}], "chat")
    with pytest.raises(ChatFormatError, match=r"messages\[0\].content"):
        encode_messages([{"role": "user", "content": 42}], "chat")
