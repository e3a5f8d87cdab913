"""`ds4cupy export-tokenizer MODEL --out tokenizer.json`: the file `tokenizers` loads encodes and decodes as the engine
does; from DeepSeek-V4's real vocabulary it reproduces the official tokenizer.json's ids."""
from __future__ import annotations

import numpy as np
import pytest

from ds4cupy import cli
from ds4cupy.format.config import ModelConfig
from ds4cupy.format.gguf_write import write_gguf
from ds4cupy.format.model_file import ModelFile
from ds4cupy.text.tokenizer import DEEPSEEK_V4_ADDED_TOKENS, Tokenizer

from conftest import SHARED_DATA

import tokenizers  # a runtime dependency

ALPHABET = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n\t.,;:!?'\"()[]{}<>/\\-_=+*&^%$#@")
ALPHABET += list("éüßçñøåœ世界你好こんにちは안녕하세요Привет") + ["  ", "\n\n", "１２３", "😀"]
ALPHABET += [t for t, _ in DEEPSEEK_V4_ADDED_TOKENS[:40]]


def random_texts(seed: int, n: int = 40) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(ALPHABET, size=int(rng.integers(1, 120)))) for _ in range(n)]


def test_export_tiny_model(tiny_model_path, tmp_path, capsys):
    out = tmp_path / "tokenizer.json"
    assert cli.main(["export-tokenizer", str(tiny_model_path), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    with ModelFile(tiny_model_path) as mf:
        engine = Tokenizer.from_gguf_fields(mf.tokenizer_fields)
    hf = tokenizers.Tokenizer.from_file(str(out))
    assert hf.get_vocab_size() == engine.n_vocab
    for text in random_texts(1):
        ids = engine.encode(text)
        assert hf.encode(text, add_special_tokens=False).ids == ids, text
        assert hf.decode(ids, skip_special_tokens=False) == engine.decode(ids)
    # an existing file is kept unless --force
    assert cli.main(["export-tokenizer", str(tiny_model_path), "--out", str(out)]) == 1
    assert "exists" in capsys.readouterr().err
    assert cli.main(["export-tokenizer", str(tiny_model_path), "--out", str(out), "--force"]) == 0


def test_real_vocabulary_export_matches_the_official_file(tmp_path):
    """DeepSeek-V4's vocabulary as the engine rebuilds it from GGUF fields (tokenizer_gguf_fields, as make-model and
    convert write them), exported: the same ids as DeepSeek's own tokenizer.json. (The GGUF reading step is the tiny
    model's test above; reading 129,280 strings back from a file is left out to keep this test quick.)"""
    official_path = SHARED_DATA / "tokenizer" / "tokenizer.json"
    if not official_path.is_file():
        pytest.skip(f"{official_path} is not available")
    out = tmp_path / "tokenizer.json"
    out.write_text(Tokenizer.from_tokenizer_json(official_path).to_tokenizer_json(), encoding="utf-8")
    exported = tokenizers.Tokenizer.from_file(str(out))
    official = tokenizers.Tokenizer.from_file(str(official_path))
    assert exported.get_vocab_size() == official.get_vocab_size() == 129280
    for text in random_texts(2, 60):
        assert exported.encode(text, add_special_tokens=False).ids == official.encode(
            text, add_special_tokens=False).ids, text


def test_export_refuses_a_file_without_tokenizer(tmp_path, capsys):
    model = write_gguf(tmp_path / "no-tokenizer.gguf", ModelConfig.tiny(1024).metadata(), [], name="bare")
    assert cli.main(["export-tokenizer", str(model), "--out", str(tmp_path / "t.json")]) == 1
    assert "no tokenizer" in capsys.readouterr().err
