"""Write a model file's tokenizer as a Hugging Face tokenizer.json (for llama-benchy, `tokenizers`, transformers).

    ds4cupy export-tokenizer MODEL.gguf --out tokenizer.json

The tokenizer is rebuilt from the file's `tokenizer.ggml.*` metadata exactly as the engine uses it (BPE vocabulary
and merges, DeepSeek-V3/V4 pre-tokenizer, added tokens), written, read back with `tokenizers`, and checked to encode
a probe text (added tokens, digits, CJK, whitespace) to the engine's ids before the command reports success.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..format.model_file import ModelFile, ModelFileError
from ..text.tokenizer import Tokenizer, TokenizerError

PROBE = ("<｜begin▁of▁sentence｜>Hello, world! 1234567 世界 <｜User｜>hi<｜Assistant｜><think>x</think>"
         " ｜DSML｜ \n\n\tindent  end<｜end▁of▁sentence｜>")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a ds4-layout GGUF file with tokenizer.ggml.* metadata")
    p.add_argument("--out", default="tokenizer.json", help="where to write (default ./tokenizer.json)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")


def export_tokenizer(model_path: str | Path, out: str | Path) -> Tokenizer:
    """Write the tokenizer.json of `model_path` to `out`, check it, and return the engine's Tokenizer."""
    with ModelFile(model_path, validate=False) as mf:
        fields = mf.tokenizer_fields
    if not fields:
        raise TokenizerError(f"{model_path}: the file carries no tokenizer (tokenizer.ggml.* metadata)")
    tokenizer = Tokenizer.from_gguf_fields(fields)
    out = Path(out)
    out.write_text(tokenizer.to_tokenizer_json(), encoding="utf-8")
    from tokenizers import Tokenizer as HFTokenizer
    loaded = HFTokenizer.from_file(str(out))
    got, want = loaded.encode(PROBE, add_special_tokens=False).ids, tokenizer.encode(PROBE)
    if got != want or loaded.get_vocab_size() != tokenizer.n_vocab:
        raise TokenizerError(f"{out}: the written tokenizer does not reproduce the engine's ids "
                             f"({got[:8]}... vs {want[:8]}..., vocab {loaded.get_vocab_size()} vs {tokenizer.n_vocab})")
    return tokenizer


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"error: {out} exists (use --force to overwrite)", file=sys.stderr)
        return 1
    try:
        tokenizer = export_tokenizer(args.model, out)
    except (ModelFileError, TokenizerError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}: {tokenizer.n_vocab} ids (BOS {tokenizer.bos_id}, EOS {tokenizer.eos_id}); "
          f"tokenizers reproduces the engine's ids")
    return 0
