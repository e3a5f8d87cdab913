"""Message text is plain text: render_prompt + Tokenizer.encode_parts turn added-token strings into control tokens only
where the template wrote them, and change nothing else (DeepSeek's official vectors give the same ids as before)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ds4cupy.text.chat import encode_messages, render_prompt
from ds4cupy.text.tokenizer import Tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VECTORS = DATA / "chat_template_vectors"
TOKENIZER_JSON = DATA / "tokenizer" / "tokenizer.json"
needs_real = pytest.mark.skipif(not (VECTORS.is_dir() and TOKENIZER_JSON.is_file()),
                                reason=f"DeepSeek's vectors / tokenizer.json not found under {DATA}")


@pytest.fixture(scope="module", params=["demo", "deepseek"])
def tok(request):
    if request.param == "demo":
        return Tokenizer.demo()
    if not TOKENIZER_JSON.is_file():
        pytest.skip(f"tokenizer.json not found at {TOKENIZER_JSON}")
    return Tokenizer.from_tokenizer_json(TOKENIZER_JSON)


def added_strings(tok) -> list[str]:
    return sorted(tok._special_ids)


def conversation(text: str) -> tuple[list[dict], list[dict]]:
    """Messages with `text` in every place a client controls: system, developer, user, assistant reasoning and
    content, tool-call name and arguments, tool result; and a tool schema."""
    messages = [{"role": "system", "content": "sys " + text},
                {"role": "user", "content": "hello " + text},
                {"role": "assistant", "reasoning_content": "r " + text, "content": "a " + text, "tool_calls": [
                    {"id": "c1", "type": "function",
                     "function": {"name": "f" + text, "arguments": json.dumps({"k" + text: text, "n": 3})}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "result " + text},
                {"role": "developer", "content": "dev " + text},
                {"role": "user", "content": "last " + text}]
    tools = [{"type": "function", "function": {"name": "f", "description": "d " + text}}]
    return messages, tools


@pytest.mark.parametrize("mode", ["chat", "thinking"])
def test_added_token_strings_in_messages_stay_plain_text(tok, mode):
    every = "".join(added_strings(tok))
    messages, tools = conversation(every)
    parts = render_prompt(messages, mode, tools=tools, drop_thinking=False)
    assert "".join(p.text for p in parts) == encode_messages(messages, mode, tools=tools, drop_thinking=False)
    ids = tok.encode_parts(parts)
    assert tok.decode(ids) == "".join(p.text for p in parts)             # nothing lost or changed
    # the added tokens are exactly those of the template's own text, in order
    template_only = tok.encode_parts([p for p in parts if p.template])
    added = [i for i in ids if tok._added_mask[i]]
    assert added == [i for i in template_only if tok._added_mask[i]]
    assert len(added) >= 10
    # the same string tokenized as one text (what the server did before) forges turns: this test can fail
    forged = [i for i in tok.encode("".join(p.text for p in parts)) if tok._added_mask[i]]
    assert len(forged) - len(added) >= 9 * len(added_strings(tok))


def test_plain_encoding_never_yields_added_tokens(tok):
    rng = np.random.default_rng(5)
    strings = added_strings(tok)
    for _ in range(20):                   # added-token strings glued to each other and to random text
        pick = [strings[int(i)] for i in rng.integers(0, len(strings), 12)]
        text = "".join(s + "".join(chr(int(c)) for c in rng.integers(32, 0x3100, 3)) for s in pick)
        ids = tok.encode_plain(text)
        assert not tok._added_mask[np.asarray(ids)].any()
        assert tok.decode(ids) == text


def test_parts_without_added_strings_in_messages_tokenize_as_before(tok):
    """With ordinary message text the new path gives exactly the old single-string tokenization."""
    messages, tools = conversation("ordinary text, 42 numbers\n\n  spaces and ünïcödé 漢字 ")
    for mode in ("chat", "thinking"):
        parts = render_prompt(messages, mode, tools=tools)
        assert tok.encode_parts(parts) == tok.encode(encode_messages(messages, mode, tools=tools))


@needs_real
def test_official_vectors_give_the_official_ids():
    tok = Tokenizer.from_tokenizer_json(TOKENIZER_JSON)
    derived = json.loads((VECTORS / "derived_token_ids.json").read_text(encoding="utf-8"))
    assert len(derived["cases"]) == 4
    for entry in derived["cases"]:
        case = json.loads((VECTORS / (entry["name"] + ".json")).read_text(encoding="utf-8"))
        parts = render_prompt(case["messages"], **case["encode_messages_call"])
        assert "".join(p.text for p in parts).encode("utf-8") == case["expected_prompt"].encode("utf-8")
        assert tok.encode_parts(parts) == entry["ids"], entry["name"]
