"""Tokenizer: DeepSeek-V4's byte-level BPE, built from GGUF metadata with the `tokenizers` library.

Two directions:

* `tokenizer_gguf_fields(tokenizer_json)` produces the `tokenizer.ggml.*` metadata the way llama.cpp's converter
  writes it (model "gpt2", tokens as GPT-2 byte-to-unicode strings, merges "a b", token types, bos/eos/padding ids),
  either from DeepSeek's real `tokenizer.json` or, with None, from the built-in demo tokenizer: a small byte-level BPE
  trained here, deterministically, on `ds4cupy/data/demo_corpus.txt`, that holds every DeepSeek-V4 added token.
* `Tokenizer.from_gguf_fields(metadata)` rebuilds an encoder/decoder from that metadata alone: BPE from vocab and
  merges, the DeepSeek-V3/V4 pre-tokenizer (three Split regexes then ByteLevel), added tokens matched by string.

`IncrementalDecoder` turns a stream of ids into text without ever emitting half a UTF-8 character.
"""
from __future__ import annotations

import codecs
import functools
import json
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.models import BPE


class TokenizerError(ValueError):
    """Unusable tokenizer metadata or input. The message names the key or value at fault."""


# --- DeepSeek-V4 token facts -------------------------------------------------------------------------------------

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"

# Every added token of the DeepSeek-V4 tokenizer except the ~1,200 multimodal/reserved place-holders, in id order,
# with the tokenizer.json "special" flag. (Real ids: BOS/EOS/PAD 0-2, the rest 128800-128846 and 129262-129279.)
DEEPSEEK_V4_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    (BOS, True), (EOS, True), (PAD, True),
    ("<｜fim▁hole｜>", False), ("<｜fim▁begin｜>", False), ("<｜fim▁end｜>", False),
    ("<｜User｜>", False), ("<｜Assistant｜>", False), ("<|EOT|>", False),
    ("<｜tool▁calls▁begin｜>", False), ("<｜tool▁calls▁end｜>", False),
    ("<｜tool▁call▁begin｜>", False), ("<｜tool▁call▁end｜>", False),
    ("<｜tool▁outputs▁begin｜>", False), ("<｜tool▁outputs▁end｜>", False),
    ("<｜tool▁output▁begin｜>", False), ("<｜tool▁output▁end｜>", False), ("<｜tool▁sep｜>", False),
    ("<｜begin▁of▁repo▁name｜>", False), ("<｜end▁of▁repo▁name｜>", False),
    ("<｜begin▁of▁file▁name｜>", False), ("<｜end▁of▁file▁name｜>", False),
    ("<｜begin▁of▁file｜>", False), ("<｜end▁of▁file｜>", False),
    ("<think>", False), ("</think>", False), ("｜DSML｜", False),
    ("<｜begin▁sys｜>", False), ("<｜end▁sys｜>", False), ("<｜latest_reminder｜>", False),
    ("<｜action｜>", False), ("<｜query｜>", False), ("<｜authority｜>", False), ("<｜domain｜>", False),
    ("<｜task｜>", False), ("<｜political｜>", False), ("<｜entity｜>", False), ("<｜title｜>", False),
    ("<｜safety｜>", False), ("<｜answer｜>", False), ("<｜search｜>", False),
    ("<dsml:", False), ("</dsml:", False), ("<｜search▁begin｜>", False), ("<｜search▁end｜>", False),
    ("<｜extracted_url｜>", False), ("<｜read_url｜>", False), ("<｜end_of_query｜>", True),
    ("<｜rl_image_pad｜>", True), ("<｜rl_image_start｜>", True),
    ("<｜image2｜>", False), ("<｜/table>｜", False), ("<｜table｜>", False), ("<｜/td｜>", False),
    ("<｜td｜>", False), ("<｜/tr｜>", False), ("<｜tr｜>", False),
    ("<｜/polygon｜>", True), ("<｜polygon｜>", True), ("<｜/point｜>", True), ("<｜point｜>", True),
    ("<｜/box｜>", True), ("<｜box｜>", True), ("<｜/ref｜>", True), ("<｜ref｜>", True), ("<｜image｜>", True),
)

# The DeepSeek-V3/V4 pre-tokenizer (tokenizer.json "pre_tokenizer"): three isolating splits, then ByteLevel.
_SPLIT_DIGITS = r"\p{N}{1,3}"
_SPLIT_CJK_KANA = "[一-龥぀-ゟ゠-ヿ]+"
_SPLIT_WORDS = (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"
                r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                r"| ?[\p{P}\p{S}]+[\r\n]*"
                r"|\s*[\r\n]+"
                r"|\s+(?!\S)"
                r"|\s+")

# llama.cpp token types (gguf.TokenType)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

GGUF_PRE = "deepseek-v3"
# tokenizer.ggml.pre values seen on DeepSeek-V3/V4 files; all mean the same pre-tokenizer for this engine
KNOWN_PRE = ("deepseek-v3", "deepseek-llm", "joyai-llm", "default")

DEMO_CORPUS = Path(__file__).resolve().parents[1] / "data" / "demo_corpus.txt"
DEMO_BPE_VOCAB = 1024   # byte alphabet + merges + BOS/EOS/PAD, before the other added tokens
DEMO_VOCAB_MULTIPLE = 64


def deepseek_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """The exact DeepSeek-V3/V4 pre-tokenizer: digit runs (1-3), CJK/kana runs, words/punctuation, then ByteLevel."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_DIGITS), behavior="isolated", invert=False),
        pre_tokenizers.Split(Regex(_SPLIT_CJK_KANA), behavior="isolated", invert=False),
        pre_tokenizers.Split(Regex(_SPLIT_WORDS), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by ByteLevel BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@functools.lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


def token_text_to_bytes(token: str) -> bytes:
    """The bytes a vocabulary string stands for: byte-level decoded, or the raw UTF-8 of the string when any of its
    characters is outside the byte map (added tokens such as `<｜User｜>`), as the ByteLevel decoder does."""
    table = unicode_to_byte()
    out = bytearray()
    for ch in token:
        b = table.get(ch)
        if b is None:
            return token.encode("utf-8")
        out.append(b)
    return bytes(out)


def _looks_special(token: str) -> bool:
    """llama.cpp's heuristic: `<|...|>` and `<｜...｜>` added tokens are control tokens even when not flagged."""
    return (token.startswith("<|") and token.endswith("|>")) or (token.startswith("<｜") and token.endswith("｜>"))


# --- writer side: tokenizer.ggml.* fields --------------------------------------------------------------------------

def _fields_from_tokenizer_json(data: Mapping, pad_token: str | None) -> tuple[int, dict[str, tuple[str, object]]]:
    """Fields from a parsed tokenizer.json. Ids without a token (up to data["ds4cupy_n_vocab"] when given) become
    unused "[PAD<id>]" entries, as llama.cpp writes them."""
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerError(f"tokenizer.json model.type is {model.get('type')!r}; only byte-level 'BPE' is supported")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {int(t["id"]): t for t in data.get("added_tokens", [])}
    id_to_token: dict[int, str] = {i: t for t, i in vocab.items()}
    for i, t in added.items():
        id_to_token[i] = t["content"]
    n_vocab = max(max(id_to_token) + 1, int(data.get("ds4cupy_n_vocab", 0)))
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        tok = id_to_token.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
        elif i in added:
            tokens.append(tok)
            types.append(TOKEN_CONTROL if added[i].get("special") or _looks_special(tok) else TOKEN_USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(TOKEN_NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    by_text = {t: i for i, t in enumerate(tokens)}
    for name in (BOS, EOS):
        if name not in by_text:
            raise TokenizerError(f"tokenizer has no {name!r} token; not a DeepSeek-V4 tokenizer")
    pad_id = by_text.get(pad_token or EOS, by_text[EOS])
    fields: dict[str, tuple[str, object]] = {
        "tokenizer.ggml.model": ("str", "gpt2"),
        "tokenizer.ggml.pre": ("str", GGUF_PRE),
        "tokenizer.ggml.tokens": ("strs", tokens),
        "tokenizer.ggml.token_type": ("i32s", types),
        "tokenizer.ggml.merges": ("strs", merges),
        "tokenizer.ggml.bos_token_id": ("u32", by_text[BOS]),
        "tokenizer.ggml.eos_token_id": ("u32", by_text[EOS]),
        "tokenizer.ggml.padding_token_id": ("u32", pad_id),
    }
    return n_vocab, fields


def _pad_token_from_config(tokenizer_json: Path) -> str | None:
    """pad_token of a tokenizer_config.json next to tokenizer.json (DeepSeek sets it to EOS), if there is one."""
    cfg = tokenizer_json.with_name("tokenizer_config.json")
    if not cfg.is_file():
        return None
    pad = json.loads(cfg.read_text(encoding="utf-8")).get("pad_token")
    if isinstance(pad, dict):
        pad = pad.get("content")
    return pad if isinstance(pad, str) else None


def tokenizer_gguf_fields(tokenizer_json: str | Path | None) -> tuple[int, dict[str, tuple[str, object]]]:
    """(n_vocab, {gguf key: (kind, value)}) for the tokenizer.ggml.* metadata, kinds among str/u32/i32/strs/i32s.

    `tokenizer_json` is a HF tokenizer.json (DeepSeek-V4's own), or None for the built-in demo tokenizer.
    """
    if tokenizer_json is None:
        return _fields_from_tokenizer_json(demo_tokenizer_json(), EOS)
    path = Path(tokenizer_json)
    if not path.is_file():
        raise TokenizerError(f"tokenizer file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read tokenizer file {str(path)!r}: {e}") from e
    return _fields_from_tokenizer_json(data, _pad_token_from_config(path))


@functools.lru_cache(maxsize=1)
def demo_tokenizer_json() -> dict:
    """The demo tokenizer as a tokenizer.json dict: a small byte-level BPE trained (deterministically, single pass,
    about a second) on demo_corpus.txt with the DeepSeek pre-tokenizer, holding every DeepSeek-V4 added token.
    Ids: BOS 0, EOS 1, PAD 2, then the byte alphabet and merges, then the other added tokens, then unused padding
    entries up to a multiple of 64."""
    from tokenizers import trainers

    text = DEMO_CORPUS.read_text(encoding="utf-8")
    tok = _HFTokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = deepseek_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=DEMO_BPE_VOCAB, min_frequency=2, show_progress=False,
        special_tokens=[AddedToken(BOS, special=True, normalized=False),
                        AddedToken(EOS, special=True, normalized=False),
                        AddedToken(PAD, special=True, normalized=False)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # one "sentence" per line keeps the counts independent of chunking and threads
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    next_id = max(vocab.values()) + 1
    for content, special in DEEPSEEK_V4_ADDED_TOKENS[3:]:
        data["added_tokens"].append({"id": next_id, "content": content, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": special})
        next_id += 1
    while next_id % DEMO_VOCAB_MULTIPLE:
        next_id += 1            # unused ids, written as "[PAD<id>]" entries
    data["ds4cupy_n_vocab"] = next_id
    return data


# --- reader side: Tokenizer -------------------------------------------------------------------------------------

class Tokenizer:
    """DeepSeek-V4 tokenizer rebuilt from `tokenizer.ggml.*` metadata.

    encode(text) -> ids (added tokens such as `<｜User｜>` are matched by string; no BOS is added: the chat renderer
    writes it as text); decode(ids) -> str; special_id("<think>") -> id; bos_id / eos_id; n_vocab.
    """

    def __init__(self, tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int] | None = None,
                 bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None):
        self.tokens: list[str] = list(tokens)
        n = len(self.tokens)
        if n == 0:
            raise TokenizerError("tokenizer.ggml.tokens is empty")
        if token_types is None or len(token_types) == 0:
            token_types = [TOKEN_NORMAL] * n
        token_types = [int(t) for t in token_types]
        if len(token_types) != n:
            raise TokenizerError(f"tokenizer.ggml.token_type has {len(token_types)} entries, tokens has {n}")
        # like ds4, match DeepSeek-V4's added tokens by string even in a file that types them as normal tokens
        known = dict(DEEPSEEK_V4_ADDED_TOKENS)
        for i, t in enumerate(self.tokens):
            if token_types[i] == TOKEN_NORMAL and t in known:
                token_types[i] = TOKEN_CONTROL if known[t] or _looks_special(t) else TOKEN_USER_DEFINED
        self.token_types = token_types
        vocab: dict[str, int] = {}
        for i, t in enumerate(self.tokens):
            vocab.setdefault(t, i)
        pairs = []
        for k, m in enumerate(merges):
            a, sep, b = m.partition(" ")
            if not sep or not a or not b:
                raise TokenizerError(f"tokenizer.ggml.merges[{k}] = {m!r} is not of the form 'a b'")
            pairs.append((a, b))
        self._vocab, self._pairs = vocab, pairs      # kept for the plain-text encoder (built on first use)
        self._hf = _bpe_tokenizer(vocab, pairs)
        control = [AddedToken(t, special=True, normalized=False, single_word=False, lstrip=False, rstrip=False)
                   for t, ty in zip(self.tokens, token_types) if ty == TOKEN_CONTROL and t]
        user = [AddedToken(t, special=False, normalized=False, single_word=False, lstrip=False, rstrip=False)
                for t, ty in zip(self.tokens, token_types) if ty == TOKEN_USER_DEFINED and t]
        _hf_call("tokenizer.ggml.tokens", lambda: control and self._hf.add_special_tokens(control))
        _hf_call("tokenizer.ggml.tokens", lambda: user and self._hf.add_tokens(user))
        self._special_ids = {t: i for i, (t, ty) in enumerate(zip(self.tokens, token_types))
                             if ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED) and t}
        self._is_control = [ty == TOKEN_CONTROL for ty in token_types]
        self._bytes: list[bytes] | None = None
        self.n_vocab = n
        self.bos_id = self._resolve_id(bos_id, BOS, "bos")
        self.eos_id = self._resolve_id(eos_id, EOS, "eos")
        self.pad_id = pad_id if pad_id is not None and 0 <= pad_id < n else self.eos_id

    def _resolve_id(self, given: int | None, text: str, what: str) -> int:
        # ds4 finds specials by string; the metadata id is only a fallback
        if text in self._special_ids:
            return self._special_ids[text]
        if given is not None and 0 <= int(given) < self.n_vocab:
            return int(given)
        raise TokenizerError(f"the vocabulary has no {text!r} ({what}) token and no valid {what} id")

    @classmethod
    def from_gguf_fields(cls, fields: Mapping[str, object]) -> "Tokenizer":
        """Build from a {key: value} metadata dict (arrays as Python lists), as ModelFile gives it."""
        model = fields.get("tokenizer.ggml.model")
        if model is None:
            raise TokenizerError("the model file has no tokenizer.ggml.model metadata (no tokenizer stored)")
        if model != "gpt2":
            raise TokenizerError(f"tokenizer.ggml.model is {model!r}; only 'gpt2' (byte-level BPE) is supported")
        tokens = fields.get("tokenizer.ggml.tokens")
        merges = fields.get("tokenizer.ggml.merges")
        if tokens is None or len(tokens) == 0:
            raise TokenizerError("tokenizer.ggml.tokens is missing or empty")
        if merges is None:
            raise TokenizerError("tokenizer.ggml.merges is missing")
        # tokenizer.ggml.pre is not consulted: this engine runs DeepSeek-V4 only, whose files name its one
        # pre-tokenizer in several ways (KNOWN_PRE); the DeepSeek-V3/V4 splits are always used

        def _opt_int(key):
            v = fields.get(key)
            return None if v is None else int(v)

        return cls([str(t) for t in tokens], [str(m) for m in merges], fields.get("tokenizer.ggml.token_type"),
                   bos_id=_opt_int("tokenizer.ggml.bos_token_id"), eos_id=_opt_int("tokenizer.ggml.eos_token_id"),
                   pad_id=_opt_int("tokenizer.ggml.padding_token_id"))

    @classmethod
    def from_tokenizer_json(cls, tokenizer_json: str | Path | None) -> "Tokenizer":
        """Convenience: the same Tokenizer a GGUF written from this tokenizer.json (None: the demo) would give."""
        _, fields = tokenizer_gguf_fields(tokenizer_json)
        return cls.from_gguf_fields({k: v for k, (_, v) in fields.items()})

    @classmethod
    def demo(cls) -> "Tokenizer":
        return _demo_tokenizer()

    # -- encoding / decoding --

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; added tokens written in the text are matched as single tokens. No BOS is added.
        (Runs through `encode_batch`, which releases the GIL: a long text does not stall other threads.)"""
        if not isinstance(text, str):
            raise TokenizerError(f"encode() takes a str, got {type(text).__name__}")
        return self._hf.encode_batch([text], add_special_tokens=False)[0].ids

    def to_tokenizer_json(self) -> str:
        """This tokenizer as a Hugging Face tokenizer.json text: `tokenizers.Tokenizer.from_str` of it encodes and
        decodes exactly as encode() / decode() (same vocabulary, merges, pre-tokenizer, added tokens)."""
        return self._hf.to_str()

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of `text` as plain text: added-token strings in it (`<｜User｜>`, `<think>`, ...) are split into
        ordinary byte-level tokens like any other text, so the result never holds an added/control token."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode_plain() takes a str, got {type(text).__name__}")
        if not text:
            return []
        ids = self._plain_hf.encode_batch([text], add_special_tokens=False)[0].ids
        if ids and self._added_mask[np.asarray(ids)].any():     # the BPE merges themselves reached an added token
            bad = sorted({self.tokens[i] for i in ids if self._added_mask[i]})
            raise TokenizerError(f"plain-text encoding produced the added token(s) {bad}: the vocabulary's merges "
                                 f"build them, so text cannot be kept apart from control tokens")
        return ids

    def encode_parts(self, parts: Iterable[tuple[str, bool]]) -> list[int]:
        """Token ids of a prompt given as (text, is_template) parts (ds4cupy.text.chat.render_prompt). Added-token
        strings become added tokens only inside template parts; message text is always plain text. The text between
        two added tokens is encoded in one piece, so a prompt whose message text holds no added-token string gives
        exactly `encode("".join(texts))`."""
        ids: list[int] = []
        run: list[str] = []
        for text, is_template in parts:
            if not is_template:
                run.append(text)
                continue
            pos = 0
            for m in self._added_pattern.finditer(text):
                run.append(text[pos:m.start()])
                ids.extend(self.encode_plain("".join(run)))
                run = []
                ids.append(self._special_ids[m.group(0)])
                pos = m.end()
            run.append(text[pos:])
        ids.extend(self.encode_plain("".join(run)))
        return ids

    @functools.cached_property
    def _plain_hf(self) -> _HFTokenizer:
        return _bpe_tokenizer(self._vocab, self._pairs)

    @functools.cached_property
    def _added_pattern(self) -> re.Pattern:
        """Every added token's text, longest first: at each position the longest match wins (as in `tokenizers`)."""
        texts = sorted(self._special_ids, key=len, reverse=True)
        return re.compile("|".join(re.escape(t) for t in texts)) if texts else re.compile(r"(?!x)x")

    @functools.cached_property
    def _added_mask(self) -> np.ndarray:
        mask = np.zeros(self.n_vocab, bool)
        mask[list(self._special_ids.values())] = True
        return mask

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most bytes one token stands for: a text of B bytes has at least B / max_token_bytes tokens."""
        return max(len(token_text_to_bytes(t)) for t in self.tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id stands for (may be part of a UTF-8 character)."""
        if self._bytes is None:
            self._bytes = [token_text_to_bytes(t) for t in self.tokens]
        if not 0 <= token_id < self.n_vocab:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (0..{self.n_vocab - 1})")
        return self._bytes[token_id]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids` (invalid or incomplete UTF-8 becomes U+FFFD). skip_special drops control tokens."""
        data = b"".join(self.token_bytes(int(i)) for i in ids
                        if not (skip_special and self._is_control[int(i)]))
        return data.decode("utf-8", errors="replace")

    def special_id(self, text: str) -> int:
        """Id of an added token by its text, e.g. special_id("<｜User｜>")."""
        try:
            return self._special_ids[text]
        except KeyError:
            raise TokenizerError(f"token {text!r} is not an added/special token of this vocabulary") from None

    def has_special(self, text: str) -> bool:
        return text in self._special_ids

    def is_control(self, token_id: int) -> bool:
        return self._is_control[token_id]

    def id_to_token(self, token_id: int) -> str:
        return self.tokens[token_id]

    def __len__(self) -> int:
        return self.n_vocab

    def __repr__(self) -> str:
        return f"Tokenizer(n_vocab={self.n_vocab}, bos={self.bos_id}, eos={self.eos_id})"


def _hf_call(key: str, build):
    """Run a `tokenizers` call on file-provided data; any refusal (including a Rust panic) becomes a TokenizerError
    naming the metadata key."""
    try:
        return build()
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:      # noqa: BLE001 - pyo3 panics derive from BaseException
        raise TokenizerError(f"{key}: the tokenizers library refused the vocabulary ({type(e).__name__}: "
                             f"{str(e)[:200]})") from None


def _bpe_tokenizer(vocab: dict[str, int], pairs: list[tuple[str, str]]) -> _HFTokenizer:
    """A byte-level BPE with the DeepSeek pre-tokenizer and no added tokens."""
    hf = _hf_call("tokenizer.ggml.merges", lambda: _HFTokenizer(BPE(vocab, pairs, unk_token=None, fuse_unk=False,
                                                                     byte_fallback=False)))
    hf.pre_tokenizer = deepseek_pre_tokenizer()
    hf.decoder = decoders.ByteLevel()
    return hf


@functools.lru_cache(maxsize=1)
def _demo_tokenizer() -> Tokenizer:
    return Tokenizer.from_tokenizer_json(None)


class IncrementalDecoder:
    """Turns ids into text one at a time; bytes of an unfinished UTF-8 character are held until it completes.

    feed(id) -> the newly completed text (possibly ""); flush() -> what is held (incomplete bytes become U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        if self.skip_special and self.tokenizer.is_control(token_id):
            return ""
        return self._utf8.decode(self.tokenizer.token_bytes(token_id), final=False)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)

    def reset(self) -> None:
        self._utf8.reset()
