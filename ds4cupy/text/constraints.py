"""Grammar constraints on generation: which token ids may come next, applied to the logits before sampling.

    check_grammar(tokenizer, grammar)       # GrammarError (a message for a 400) when the grammar does not compile
    c = Constraint(tokenizer, grammar)      # grammar: Lark text, see ds4cupy.text.grammars
    logits = c.apply(logits)                # a copy with every id the grammar forbids set to -inf
    c.advance(token_id)                     # ConstraintError if the grammar did not allow it
    c.done                                  # the grammar is complete: only EOS may follow

The grammar engine is llguidance (guidance-ai/llguidance: Rust, an Earley parser over a derivative-based lexer, a
~10 MB wheel with no Python dependencies). It was chosen over xgrammar after measuring both on DeepSeek-V4's
129,280-id vocabulary (scripts/bench_grammar.py; numbers in BENCHMARKS.md): both compute a token mask in tens of
microseconds (xgrammar's median is a few times lower), well under the cost of a decode step, but llguidance compiles
a schema 15-100x faster (milliseconds, so per-request schemas need no cache), its Lark dialect (`%json` inside a
grammar, lazy lexemes) expresses the DSML tool-call syntax with JSON-schema argument values directly, and
xgrammar's wheel requires torch, transformers and triton at run time, which ds4cupy does not otherwise need.

How tokens map to bytes for the grammar: every id stands for the bytes it decodes to (`Tokenizer.token_bytes`), so
added tokens that are text to the output parser (`<think>`, `</think>`, `｜DSML｜`) are matched as that text, whether
the model writes them as the added token or spells them in pieces; control and unused ids (BOS, EOS, `<｜User｜>`,
padding) are llguidance special tokens that no grammar text matches. EOS is allowed once the grammar is complete.

Where the mask is applied: on the float32 [vocab] logits the Session returned, on the host, just before the Sampler
(ds4cupy.text.generate). Both backends hand the Generator host logits (the CUDA session downloads them once per step
in `decode()`), so a constraint adds no transfer: llguidance computes the bitmask on the CPU and one masked NumPy
copy applies it to the array already on the host.
"""
from __future__ import annotations

import functools

import numpy as np

from .tokenizer import TOKEN_NORMAL, TOKEN_USER_DEFINED, Tokenizer

SPECIAL_MARKER = b"\xff"          # llguidance's prefix for the bytes of a special token


class GrammarError(ValueError):
    """A grammar (or the schema it came from) that cannot be compiled; the message says why."""


class ConstraintError(RuntimeError):
    """Generation left the grammar: a token it does not allow, or an internal matcher error."""


def _llguidance():
    try:
        import llguidance
    except ImportError as exc:        # a runtime dependency; say which package is missing
        raise GrammarError(f"structured output needs the 'llguidance' package ({exc})") from None
    return llguidance


class _VocabularyView:
    """What llguidance.TokenizerWrapper reads: token bytes (special ones marked), EOS/BOS ids, an encoder."""

    def __init__(self, tokenizer: Tokenizer):
        types = getattr(tokenizer, "token_types", None)
        if types is None or not hasattr(tokenizer, "token_bytes"):
            raise GrammarError(f"{type(tokenizer).__name__} has no token bytes/types; grammars need a Tokenizer")
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        text_types = (TOKEN_NORMAL, TOKEN_USER_DEFINED)
        self.special_token_ids = [i for i, t in enumerate(types) if t not in text_types]
        self.tokens = [(b"" if t in text_types else SPECIAL_MARKER) + tokenizer.token_bytes(i)
                       for i, t in enumerate(types)]

    def __call__(self, text) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text)


@functools.lru_cache(maxsize=4)
def grammar_vocabulary(tokenizer: Tokenizer):
    """The llguidance LLTokenizer for `tokenizer` (about 0.5 s for 129,280 ids; cached per Tokenizer object)."""
    llg = _llguidance()
    return llg.LLTokenizer(llg.TokenizerWrapper(_VocabularyView(tokenizer)))


def check_grammar(tokenizer: Tokenizer, grammar: str) -> None:
    """Raise GrammarError with llguidance's message when `grammar` does not compile against the vocabulary."""
    llg = _llguidance()
    message = llg.LLMatcher.validate_grammar(grammar, grammar_vocabulary(tokenizer))
    if message:
        raise GrammarError(message.strip())


class Constraint:
    """One generation's grammar state. apply() masks the logits of the next step; advance() consumes the sampled id."""

    def __init__(self, tokenizer: Tokenizer, grammar: str):
        llg = _llguidance()
        vocab = grammar_vocabulary(tokenizer)
        self.n_vocab = vocab.vocab_size
        self.eos_id = tokenizer.eos_id
        self._matcher = llg.LLMatcher(vocab, grammar, log_level=0)
        if self._matcher.is_error():
            raise GrammarError(self._matcher.get_error().strip())
        self._bits = np.zeros((self.n_vocab + 31) // 32, dtype=np.int32)

    def allowed(self) -> np.ndarray:
        """bool [n_vocab]: the ids the grammar allows next."""
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if self._matcher.is_error():
            raise ConstraintError(f"grammar matcher failed: {self._matcher.get_error().strip()}")
        return np.unpackbits(self._bits.view(np.uint8), count=self.n_vocab, bitorder="little").view(bool)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """float32 copy of `logits` with forbidden ids at -inf (ids past the grammar's vocabulary are forbidden)."""
        logits = np.asarray(logits, dtype=np.float32).reshape(-1)
        allowed = self.allowed()
        if logits.size != self.n_vocab:
            padded = np.zeros(logits.size, dtype=bool)
            padded[:min(logits.size, self.n_vocab)] = allowed[:logits.size]
            allowed = padded
        out = np.full(logits.size, -np.inf, dtype=np.float32)
        np.copyto(out, logits, where=allowed)          # (faster than np.where with a scalar on 129,280 ids)
        return out

    def advance(self, token_id: int) -> None:
        if not self._matcher.consume_token(int(token_id)):
            raise ConstraintError(f"token {token_id} is not allowed by the grammar: "
                                  f"{self._matcher.get_error().strip()}")

    @property
    def done(self) -> bool:
        """The grammar is complete and nothing but EOS may follow."""
        return self._matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        """What was generated so far is a complete sentence of the grammar."""
        return self._matcher.is_accepting()
