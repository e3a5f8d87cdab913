"""Tokenizer: GGUF fields as llama.cpp writes them, the GGUF-built tokenizer == HF tokenizers on the real
DeepSeek-V4 tokenizer.json, the demo BPE, and the incremental decoder."""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from ds4cupy.text.tokenizer import (DEEPSEEK_V4_ADDED_TOKENS, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_USER_DEFINED,
                               IncrementalDecoder, Tokenizer, TokenizerError, demo_tokenizer_json,
                               tokenizer_gguf_fields)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TOKENIZER_JSON = DATA / "tokenizer" / "tokenizer.json"

needs_real = pytest.mark.skipif(not TOKENIZER_JSON.is_file(),
                                reason=f"real DeepSeek-V4 tokenizer.json not found at {TOKENIZER_JSON}")


def _values(fields):
    return {k: v for k, (_, v) in fields.items()}


@pytest.fixture(scope="module")
def real_fields():
    return tokenizer_gguf_fields(TOKENIZER_JSON)


@pytest.fixture(scope="module")
def ours(real_fields):
    return Tokenizer.from_gguf_fields(_values(real_fields[1]))


@pytest.fixture(scope="module")
def hf():
    import tokenizers
    return tokenizers.Tokenizer.from_file(str(TOKENIZER_JSON))


@pytest.fixture(scope="module")
def real_json():
    return json.loads(TOKENIZER_JSON.read_text(encoding="utf-8"))


FIXED_CORPUS = [
    "Hello, world! How are you today?",
    "def fibonacci(n: int) -> list[int]:\n    a, b = 0, 1\n    for _ in range(n):\n        yield a\n        a, b = b, a+b\n",
    "#include <stdio.h>\nint main(void){printf(\"%d\\n\", 42);return 0;}",
    "你好，世界！今天天气很好。我们一起去公园散步吧。",
    "こんにちは、世界。カタカナとひらがなのテスト。ｶﾀｶﾅ半角",
    "한국어 텍스트와 Русский текст и العربية",
    "Emoji: 😀👍🏽🎉❤️🚀✨ 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "digits 1 12 123 1234 12345 123456789 3.14159 1e-6 ١٢٣ ½ ² ⅷ",
    "   leading spaces\n\n\n\ttabs\t\tand\r\nCRLF   \n  trailing   ",
    "\n\n\n\n",
    "  ",
    "a  b   c    d",
    "URL: https://example.com/path?q=1&r=two#frag — em dash… ellipsis «quotes» „German“",
    "mixed中文English混合123数字",
    "Ǆǅǆ ǈ ﬁ ligatures ＡＢＣ fullwidth ｜ bar",
    "<think>reasoning</think>answer<｜end▁of▁sentence｜>",
    "</｜DSML｜invoke><｜DSML｜parameter name=\"x\" string=\"true\">v</｜DSML｜parameter>",
    "<<think>>think</think></think><think",
    "x<｜User｜>y<｜Assistant｜>z<｜begin▁of▁sentence｜><｜▁pad▁｜>",
]


def _random_corpus(rng: random.Random, real_json, n: int) -> list[str]:
    specials = [t["content"] for t in real_json["added_tokens"]]
    pieces = ["the", " quick", " brown", "fox", "  ", "\n", "\n\n", "\t", "123", "4567", "你好", "世界", "カタカナ",
              "ひらがな", "😀", "🎉", "é", "ß", "()", "{}", "=>", "->", "::", "\"", "'", "`", ",", ".", "!", "?",
              "def", "return", " x", "_", "-", "0", "中", "ｱ", "\r\n"]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 30)):
            r = rng.random()
            if r < 0.15:
                parts.append(rng.choice(specials))
            elif r < 0.3:
                parts.append(chr(rng.choice([rng.randint(0x20, 0x7e), rng.randint(0xa0, 0x2fff),
                                             rng.randint(0x3000, 0x9fff), rng.randint(0x1f300, 0x1faff)])))
            else:
                parts.append(rng.choice(pieces))
        out.append("".join(parts))
    return out


@needs_real
def test_real_fields_llama_cpp_layout(real_fields, real_json):
    n_vocab, f = real_fields
    assert n_vocab == 129280
    kinds = {k: kind for k, (kind, _) in f.items()}
    assert kinds == {"tokenizer.ggml.model": "str", "tokenizer.ggml.pre": "str", "tokenizer.ggml.tokens": "strs",
                     "tokenizer.ggml.token_type": "i32s", "tokenizer.ggml.merges": "strs",
                     "tokenizer.ggml.bos_token_id": "u32", "tokenizer.ggml.eos_token_id": "u32",
                     "tokenizer.ggml.padding_token_id": "u32"}
    v = _values(f)
    assert v["tokenizer.ggml.model"] == "gpt2"
    assert len(v["tokenizer.ggml.tokens"]) == len(v["tokenizer.ggml.token_type"]) == 129280
    assert len(v["tokenizer.ggml.merges"]) == len(real_json["model"]["merges"]) == 127741
    assert all(m.count(" ") == 1 for m in v["tokenizer.ggml.merges"][:1000])
    assert (v["tokenizer.ggml.bos_token_id"], v["tokenizer.ggml.eos_token_id"],
            v["tokenizer.ggml.padding_token_id"]) == (0, 1, 1)     # pad = EOS (tokenizer_config.json)
    toks, types = v["tokenizer.ggml.tokens"], v["tokenizer.ggml.token_type"]
    # vocabulary strings are the GPT-2 byte-to-unicode forms, added tokens are raw text
    assert toks[:3] == ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"]
    vocab = real_json["model"]["vocab"]
    for tok, i in list(vocab.items())[:5000]:
        assert toks[i] == tok
    expected = {128803: "<｜User｜>", 128804: "<｜Assistant｜>", 128821: "<think>", 128822: "</think>",
                128825: "｜DSML｜", 128828: "<｜latest_reminder｜>", 128829: "<｜action｜>", 128830: "<｜query｜>",
                128831: "<｜authority｜>", 128832: "<｜domain｜>", 128836: "<｜title｜>", 128845: "<｜read_url｜>"}
    for i, text in expected.items():
        assert toks[i] == text
    assert types[128803] == TOKEN_CONTROL and types[0] == TOKEN_CONTROL     # <｜...｜> looks special
    assert types[128821] == TOKEN_USER_DEFINED and types[128825] == TOKEN_USER_DEFINED
    assert types[100] == TOKEN_NORMAL
    assert sum(t == TOKEN_NORMAL for t in types) == 128000 - 3


@needs_real
def test_added_token_table_matches_real_file(real_json):
    real = [(t["content"], t["special"]) for t in real_json["added_tokens"] if "place" not in t["content"]]
    assert list(DEEPSEEK_V4_ADDED_TOKENS) == real


@needs_real
def test_same_ids_as_hf_on_varied_corpus(ours, hf, real_json, seed):
    rng = random.Random(seed)
    every_added = "".join(f"a{t['content']}b " for t in real_json["added_tokens"])
    corpus = FIXED_CORPUS + [every_added] + _random_corpus(rng, real_json, 300)
    for text in corpus:
        want = hf.encode(text, add_special_tokens=False).ids
        got = ours.encode(text)
        assert got == want, f"seed {seed}: ids differ for {text!r}"
        assert ours.decode(got) == text == hf.decode(want, skip_special_tokens=False)


@needs_real
def test_special_ids_and_reference_example(ours):
    assert ours.n_vocab == 129280 and ours.bos_id == 0 and ours.eos_id == 1
    assert ours.special_id("<｜User｜>") == 128803 and ours.special_id("</think>") == 128822
    # third-party test quoted in model.md §4
    ids = ours.encode("<｜User｜>你好<｜Assistant｜><think>推理</think>答案<｜end▁of▁sentence｜>")
    assert ids == [128803, 30594, 128804, 128821, 36101, 128822, 7624, 1]
    with pytest.raises(TokenizerError, match="not-a-token"):
        ours.special_id("<not-a-token>")


@needs_real
@pytest.mark.slow
def test_round_trip_through_a_gguf_file(tmp_path, real_fields, hf):
    """Write the fields with gguf's writer, read them back with GGUFReader, build the tokenizer from that alone."""
    import gguf
    n_vocab, fields = real_fields
    path = tmp_path / "tok.gguf"
    w = gguf.GGUFWriter(str(path), "deepseek4")
    for key, (kind, value) in fields.items():
        if kind == "str":
            w.add_string(key, value)
        elif kind == "u32":
            w.add_uint32(key, value)
        elif kind == "i32":
            w.add_int32(key, value)
        else:
            w.add_array(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in r.fields.items() if k.startswith("tokenizer.")}
    tok = Tokenizer.from_gguf_fields(meta)
    assert tok.n_vocab == n_vocab
    text = "Round trip: 你好 😀 <｜User｜>hi<｜Assistant｜></think>ok<｜end▁of▁sentence｜>"
    assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids


def test_demo_tokenizer_has_every_special_and_round_trips(seed):
    n_vocab, fields = tokenizer_gguf_fields(None)
    v = _values(fields)
    assert v["tokenizer.ggml.model"] == "gpt2"
    assert 300 <= n_vocab <= 2048 and n_vocab % 64 == 0
    assert len(v["tokenizer.ggml.tokens"]) == n_vocab
    tok = Tokenizer.from_gguf_fields(v)
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    for text, _ in DEEPSEEK_V4_ADDED_TOKENS:
        i = tok.special_id(text)
        assert tok.encode(f"x{text}y").count(i) == 1
    rng = random.Random(seed)
    fake = {"added_tokens": [{"content": t} for t, _ in DEEPSEEK_V4_ADDED_TOKENS]}
    for text in FIXED_CORPUS + _random_corpus(rng, fake, 100):
        assert tok.decode(tok.encode(text)) == text
    # the BPE actually merges: ordinary English is much shorter than its bytes
    text = "The robot learned to paint the sky and the sea."
    assert len(tok.encode(text)) < len(text.encode()) * 0.6


def test_demo_training_is_deterministic_and_fast():
    t0 = time.perf_counter()
    a = demo_tokenizer_json.__wrapped__()
    elapsed = time.perf_counter() - t0
    b = demo_tokenizer_json.__wrapped__()
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert elapsed < 5.0


@needs_real
def test_incremental_decoder_never_emits_half_a_character(ours):
    text = "emoji 😀🎉👨‍👩‍👧 CJK 龘龘 kana ｶﾞ and bytes é ß — done"
    ids = ours.encode(text)
    dec = IncrementalDecoder(ours)
    pieces = [dec.feed(i) for i in ids]
    assert "".join(pieces) + dec.flush() == text
    assert all("\ufffd" not in p for p in pieces)
    # some token ends mid-character, so at least one feed had to hold its bytes back
    assert any(p == "" and ours.token_bytes(i) for p, i in zip(pieces, ids))


def test_incremental_decoder_flush_marks_truncated_character():
    tok = Tokenizer.demo()
    ids = tok.encode("😀")
    assert len(ids) > 1, "demo vocab is expected to split an emoji into several byte tokens"
    dec = IncrementalDecoder(tok)
    assert "".join(dec.feed(i) for i in ids[:-1]) == ""
    assert dec.flush() == "\ufffd"


def test_bad_metadata_errors_name_the_value():
    with pytest.raises(TokenizerError, match="'llama'"):
        Tokenizer.from_gguf_fields({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"],
                                    "tokenizer.ggml.merges": []})
    with pytest.raises(TokenizerError, match="no tokenizer"):
        Tokenizer.from_gguf_fields({})
    with pytest.raises(TokenizerError, match="merges\\[0\\]"):
        Tokenizer.from_gguf_fields({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"],
                                    "tokenizer.ggml.merges": ["ab"]})
    with pytest.raises(TokenizerError, match="nope.json"):
        tokenizer_gguf_fields("/nonexistent/nope.json")
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        Tokenizer.demo().decode([10 ** 6])


def test_added_tokens_are_matched_even_when_typed_normal():
    """ds4 finds the specials by string; a file whose token_type marks them NORMAL (or has none) still works."""
    _, fields = tokenizer_gguf_fields(None)
    v = _values(fields)
    want = Tokenizer.from_gguf_fields(v)
    text = "<｜User｜>hi<｜Assistant｜><think>x</think>y<｜end▁of▁sentence｜>"
    for types in ([TOKEN_NORMAL] * len(v["tokenizer.ggml.tokens"]), None):
        w = dict(v)
        if types is None:
            w.pop("tokenizer.ggml.token_type")
        else:
            w["tokenizer.ggml.token_type"] = types
        tok = Tokenizer.from_gguf_fields(w)
        assert tok.encode(text) == want.encode(text)
        assert tok.special_id("</think>") == want.special_id("</think>")
