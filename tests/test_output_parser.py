"""OutputParser: reasoning/content split, DSML tool calls, split-invariance, malformed input degrading to content."""
from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from ds4cupy.text.output_parser import OutputParser, parse_completion, parse_invoke

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VECTORS = DATA / "chat_template_vectors"
D = "｜DSML｜"


def _ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def run_pieces(pieces, thinking=True, parse_tools=True):
    """Feed pieces; return (reasoning, content, streamed tool-call deltas, final tool_calls) from the deltas."""
    p = OutputParser(thinking=thinking, parse_tools=parse_tools, id_factory=_ids())
    reasoning, content, calls = "", "", []
    for piece in pieces:
        d = p.feed(piece)
        reasoning += d.reasoning
        content += d.content
        calls += d.tool_calls
    d = p.finish()
    reasoning += d.reasoning
    content += d.content
    calls += d.tool_calls
    assert (reasoning, content) == (p.reasoning, p.content)
    return reasoning, content, calls, p.tool_calls


def tool_block(*invokes):
    return f"\n\n<{D}tool_calls>\n" + "\n".join(invokes) + f"\n</{D}tool_calls>"


def invoke(name, *params):
    body = "\n".join(f'<{D}parameter name="{k}" string="{s}">{v}</{D}parameter>' for k, s, v in params)
    return f'<{D}invoke name="{name}">\n{body}\n</{D}invoke>'


FULL = ("Let me think about </thin tags and 😀 emoji.</think>Answer: the weather is 22°C.\n\nDone."
        + tool_block(invoke("get_weather", ("location", "true", "Beijing"), ("days", "false", "3"),
                            ("opts", "false", '{"unit": "celsius", "hourly": [1, 2]}')),
                     invoke("search", ("query", "true", "multi\nline <b>text</b> \"quoted\""))))


def test_whole_text():
    reasoning, content, calls, final = run_pieces([FULL])
    assert reasoning == "Let me think about </thin tags and 😀 emoji."
    assert content == "Answer: the weather is 22°C.\n\nDone."
    assert [c["name"] for c in calls] == ["get_weather", "search"]
    assert [c["index"] for c in calls] == [0, 1]
    assert json.loads(calls[0]["arguments"]) == {"location": "Beijing", "days": 3,
                                                "opts": {"unit": "celsius", "hourly": [1, 2]}}
    assert json.loads(calls[1]["arguments"]) == {"query": "multi\nline <b>text</b> \"quoted\""}
    assert final[0] == {"id": calls[0]["id"], "type": "function",
                        "function": {"name": "get_weather", "arguments": calls[0]["arguments"]}}
    assert len({c["id"] for c in calls}) == 2


def test_every_single_split_point_gives_the_same_result():
    want = run_pieces([FULL])
    for i in range(len(FULL) + 1):
        assert run_pieces([FULL[:i], FULL[i:]]) == want, i


def test_random_multi_splits_and_char_by_char(seed):
    want = run_pieces([FULL])
    assert run_pieces(list(FULL)) == want
    rng = random.Random(seed)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(FULL)), rng.randint(1, 40)))
        pieces = [FULL[a:b] for a, b in zip([0] + cuts, cuts + [len(FULL)])]
        assert run_pieces(pieces) == want


def test_token_boundaries_of_the_demo_tokenizer():
    from ds4cupy.text.tokenizer import IncrementalDecoder, Tokenizer
    tok = Tokenizer.demo()
    ids = tok.encode(FULL)
    dec = IncrementalDecoder(tok)
    pieces = [dec.feed(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == FULL
    assert run_pieces(pieces) == run_pieces([FULL])


def test_content_whitespace_is_released_when_no_block_follows():
    text = "Hello\n\nWorld  \n"
    r, c, calls, _ = run_pieces(list(text), thinking=False)
    assert (r, c, calls) == ("", text, [])


def test_chat_mode_and_no_tool_parsing():
    r, c, calls, _ = run_pieces([FULL], thinking=False)
    assert r == "" and c.startswith("Let me think about </thin tags") and "</think>Answer" in c
    r, c, calls, _ = run_pieces([FULL], thinking=True, parse_tools=False)
    assert calls == [] and c.endswith(f"</{D}tool_calls>") and f"<{D}invoke" in c


def test_unfinished_reasoning_is_reasoning():
    r, c, calls, _ = run_pieces(["still thinking </thi"])
    assert (r, c, calls) == ("still thinking </thi", "", [])


def test_string_false_values_are_json_and_bad_json_stays_text():
    name, args = parse_invoke(invoke("f", ("a", "false", "true"), ("b", "false", "null"), ("c", "false", "[1, 2"),
                                     ("d", "true", "42")))
    assert name == "f"
    assert json.loads(args) == {"a": True, "b": None, "c": "[1, 2", "d": "42"}
    assert parse_invoke(invoke("g")) == ("g", "{}")


MALFORMED = [
    tool_block(f'<{D}invoke name="">\n</{D}invoke>'),                                     # empty name
    tool_block(f'<{D}invoke name="f">\nstray text\n</{D}invoke>'),                       # stray text
    tool_block(invoke("f", ("a", "maybe", "1"))),                                        # bad string flag
    tool_block(invoke("f", ("a", "true", "1"), ("a", "true", "2"))),                     # duplicate parameter
    f"\n\n<{D}tool_calls>\nnot dsml at all",                                               # garbage in block
    f"\n\n<{D}tool_calls>\n<{D}invoke name=\"f\">\n<{D}parameter name=\"a\" string=\"true\">cut off",  # truncated
]


@pytest.mark.parametrize("tail", MALFORMED)
def test_malformed_dsml_degrades_to_content(tail):
    text = "reason</think>Before." + tail
    r, c, calls, final = run_pieces([text])
    assert r == "reason"
    assert calls == [] and final == []
    assert c.startswith("Before.") and c.endswith(tail.lstrip()[-5:])
    assert f"<{D}tool_calls>" in c
    for i in range(len(text) + 1):       # and the same whatever the split
        assert run_pieces([text[:i], text[i:]]) == (r, c, calls, final)


def test_good_call_then_malformed_keeps_the_good_one():
    text = "r</think>" + tool_block(invoke("ok", ("x", "true", "1")), f'<{D}invoke name="bad">\nzz\n</{D}invoke>')
    r, c, calls, final = run_pieces([text])
    assert [x["name"] for x in calls] == ["ok"] and f'invoke name="bad"' in c


def test_fuzz_never_raises(seed):
    rng = random.Random(seed)
    atoms = ["</think>", f"<{D}tool_calls>", f"</{D}tool_calls>", f"<{D}invoke", f"</{D}invoke>", ' name="f">',
             f"<{D}parameter", f"</{D}parameter>", ' string="true">', ' string="false">', "\n", "\n\n", "x", "{",
             "1", "\"", "<", "｜", "😀"]
    for _ in range(300):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 40)))
        thinking = rng.random() < 0.5
        whole = run_pieces([text], thinking=thinking)
        cut = rng.randint(0, len(text))
        assert run_pieces([text[:cut], text[cut:]], thinking=thinking) == whole, text
        assert run_pieces(list(text), thinking=thinking) == whole, text


@pytest.mark.skipif(not VECTORS.is_dir(), reason=f"chat template vectors not found at {VECTORS}")
def test_official_parse_checks():
    """The parse assertions of DeepSeek's test_encoding_dsv4.py on slices of the gold prompts."""
    m = "<｜Assistant｜><think>"
    eos = "<｜end▁of▁sentence｜>"
    c1 = json.loads((VECTORS / "case1_thinking_tools.json").read_text(encoding="utf-8"))["expected_prompt"]
    start = c1.find(m) + len(m)
    first = parse_completion(c1[start:c1.find("<｜User｜>", start)], thinking=True)
    assert first["reasoning_content"] == ("The user wants to know the weather in Beijing. "
                                          "I should use the get_weather tool.")
    assert first["content"] == ""
    assert len(first["tool_calls"]) == 1
    assert first["tool_calls"][0]["function"]["name"] == "get_weather"
    assert json.loads(first["tool_calls"][0]["function"]["arguments"]) == {"location": "Beijing", "unit": "celsius"}
    last = parse_completion(c1[c1.rfind(m) + len(m):], thinking=True)
    assert last["reasoning_content"] == "Got the weather data. Let me format a nice response."
    assert "22°C" in last["content"] and last["tool_calls"] == [] and eos not in last["content"]
    c2 = json.loads((VECTORS / "case2_thinking_drop_thinking.json").read_text(encoding="utf-8"))["expected_prompt"]
    out = parse_completion(c2[c2.rfind(m) + len(m):], thinking=True)
    assert out == {"reasoning_content": "The user asks about the capital of France. It is Paris.",
                   "content": "The capital of France is Paris.", "tool_calls": []}
