"""Write a model with random weights in the exact ds4 GGUF layout (tensor names, dims, block types, metadata).

The weights are random but numerically sane: projections have std 1/sqrt(fan_in) so activations keep their scale
through the layers, norm weights sit near 1, hyper-connection mixes, sinks, compressor position biases and router
biases are random but moderate, and every hash-layer tid2eid row holds distinct experts. The same seed gives the same
bytes. Presets: `tiny` (every layer kind, seconds on a CPU) and `flash` (DeepSeek-V4-Flash shapes, `--layers N`).
"""
from __future__ import annotations

import argparse
import sys
import time
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as T

from ..format.config import ModelConfig
from ..format.gguf_write import write_gguf
from ..format.layout import TensorSpec, ds4_file_tensors

# Bump when the generated values change for a given seed (the demo model's cache name includes it).
GENERATOR_VERSION = 1
CLI_EXPERT_TYPES = ("q2", "q4", "q8_0", "f16")
FLASH_VOCAB = 129280


def tensor_rng(seed: int, name: str) -> np.random.Generator:
    """A generator for one tensor, so each tensor's values depend only on (seed, name)."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def weight_std(spec: TensorSpec, cfg: ModelConfig) -> float:
    """The standard deviation a random matrix/expert stack gets (shape[-1] is the input width)."""
    n = spec.name
    if n == "token_embd.weight":
        return 1.0
    if n.endswith("compressor_ape.weight"):
        return 0.5  # learned position bias added to the gate logits
    if n.endswith(("hc_attn_fn.weight", "hc_ffn_fn.weight")) or n == "output_hc_fn.weight":
        return 0.5 / np.sqrt(spec.shape[-1])  # HC mixes of std ~0.5: sigmoids and softmaxes stay in their range
    return 1.0 / np.sqrt(spec.shape[-1])


def random_vector(spec: TensorSpec, rng: np.random.Generator) -> np.ndarray:
    """float32[shape] values for a norm / sink / HC scale+base / router bias."""
    n, shape = spec.name, spec.shape
    if n.endswith(("_scale.weight",)) and ("hc_" in n):
        v = rng.uniform(0.5, 1.5, shape)           # hc_*_scale, output_hc_scale
    elif n.endswith("_base.weight"):
        v = rng.normal(0.0, 0.5, shape)            # hc_*_base, output_hc_base
    elif n.endswith("attn_sinks.weight"):
        v = rng.normal(0.0, 1.0, shape)
    elif n.endswith("exp_probs_b.bias"):
        v = rng.normal(0.0, 0.2, shape)
    elif "norm" in n:
        v = rng.normal(1.0, 0.1, shape)
    else:
        raise ValueError(f"no random recipe for vector tensor {n!r}")
    return v.astype(np.float32)


def random_tid2eid(n_vocab: int, n_used: int, n_expert: int, rng: np.random.Generator) -> np.ndarray:
    """int32[n_vocab, n_used]: for every token id, n_used DISTINCT expert ids in [0, n_expert)."""
    out = np.empty((n_vocab, n_used), np.int32)
    step = max(1, (1 << 22) // n_expert)
    for a in range(0, n_vocab, step):
        b = min(n_vocab, a + step)
        keys = rng.random((b - a, n_expert), dtype=np.float32)
        out[a:b] = np.argpartition(keys, n_used - 1, axis=1)[:, :n_used]
    return out


def random_model_tensors(cfg: ModelConfig, experts: str = "q2", seed: int = 0
                         ) -> list[tuple[str, Callable[[], np.ndarray], T, tuple[int, ...]]]:
    """The file's tensors in ds4 order as (name, make_data, block type, NumPy shape); data is made on demand.

    The tensors of layout.ds4_file_tensors: every spec of layout.model_specs in ds4 types, the optional router bias
    (`exp_probs_b.bias`) only on non-hash layers, as in ds4's files.
    """
    from ..format import quants

    out = []
    for spec, qtype in ds4_file_tensors(cfg, experts):

        def make(spec: TensorSpec = spec, qtype: T = qtype) -> np.ndarray:
            rng = tensor_rng(seed, spec.name)
            if spec.kind == "vector":
                return random_vector(spec, rng)
            if spec.kind == "index":
                return random_tid2eid(cfg.n_vocab, cfg.n_expert_used, cfg.n_expert, rng)
            return quants.random_blocks(qtype, spec.shape, rng, weight_std(spec, cfg))

        out.append((spec.name, make, qtype, spec.shape))
    return out


def tokenizer_fields(tokenizer_json: str | Path | None, n_vocab: int | None = None) -> tuple[int, dict]:
    """(n_vocab, {key: (kind, value)}) of a tokenizer.json, or of the built-in demo tokenizer for None.

    With `n_vocab` larger than the tokenizer, the token list is padded with unused "[PAD<id>]" entries (as llama.cpp
    writes ids without a token), so the file's vocabulary matches a model's embedding rows.
    """
    from ..text.tokenizer import TOKEN_UNUSED, tokenizer_gguf_fields

    n_tok, fields = tokenizer_gguf_fields(None if tokenizer_json is None else str(tokenizer_json))
    if n_vocab is None or n_vocab == n_tok:
        return n_tok, fields
    src = "the built-in demo tokenizer" if tokenizer_json is None else str(tokenizer_json)
    if n_vocab < n_tok:
        raise ValueError(f"{src} has {n_tok} tokens, more than the model's vocab_size {n_vocab}")
    fields = dict(fields)
    tokens = list(fields["tokenizer.ggml.tokens"][1]) + [f"[PAD{i}]" for i in range(n_tok, n_vocab)]
    types = list(fields["tokenizer.ggml.token_type"][1]) + [TOKEN_UNUSED] * (n_vocab - n_tok)
    fields["tokenizer.ggml.tokens"] = ("strs", tokens)
    fields["tokenizer.ggml.token_type"] = ("i32s", types)
    return n_vocab, fields


def write_random_model(path: str | Path, cfg: ModelConfig, experts: str = "q2", seed: int = 0,
                       tokenizer_json: str | Path | None = None, progress: bool | None = False,
                       name: str | None = None) -> Path:
    """Write `cfg` with random weights (deterministic by `seed`) as a ds4-layout GGUF; returns the path.

    The tokenizer (tokenizer.json, or the built-in demo BPE for None) may have fewer tokens than cfg.n_vocab: the
    rest are written as unused "[PAD<id>]" tokens.
    """
    _, tok_meta = tokenizer_fields(tokenizer_json, cfg.n_vocab)
    meta = dict(cfg.metadata())
    meta.update(tok_meta)
    meta["ds4cupy.random_weights"] = ("bool", True)
    meta["ds4cupy.random_seed"] = ("u32", int(seed))
    meta["ds4cupy.generator_version"] = ("u32", GENERATOR_VERSION)
    label = name or f"{cfg.name} (random weights, seed {seed}, {experts} experts)"
    return write_gguf(path, meta, random_model_tensors(cfg, experts, seed), name=label, progress=progress)


def preset_config(preset: str, n_vocab: int, layers: int | None = None) -> ModelConfig:
    """The ModelConfig of a generator preset: `tiny` with the tokenizer's vocabulary size `n_vocab`, or `flash` with
    the real vocabulary (129280, or `n_vocab` if the tokenizer is larger)."""
    if preset == "tiny":
        if layers is not None:
            raise ValueError("--layers applies to --preset flash only (tiny has a fixed set of layer kinds)")
        return ModelConfig.tiny(n_vocab)
    if preset == "flash":
        n = 43 if layers is None else layers
        if not 1 <= n <= 43:
            raise ValueError(f"--layers must be between 1 and 43, found {n}")
        return ModelConfig.flash(n, n_vocab=max(n_vocab, FLASH_VOCAB))
    raise ValueError(f"unknown preset {preset!r}; expected tiny or flash")


# ---- command line ----------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=("tiny", "flash"), default="tiny",
                   help="tiny: 5 small layers covering window-only, CSA (ratio 4) and HCA (ratio 16) attention and "
                        "hash routing, for tests on a CPU; flash: the real DeepSeek-V4-Flash shapes (default: tiny)")
    p.add_argument("--layers", type=int, default=None, metavar="N",
                   help="flash only: keep the first N of the 43 layers (about 3 GB per layer with q2 experts)")
    p.add_argument("--experts", choices=CLI_EXPERT_TYPES, default="q2",
                   help="routed expert block types: q2 = IQ2_XXS gate/up + Q2_K down (ds4's q2 files), q4 = Q4_K, "
                        "q8_0, f16 (default: q2)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same bytes (default: 0)")
    p.add_argument("--tokenizer", metavar="TOKENIZER_JSON", default=None,
                   help="a tokenizer.json to embed (default: the built-in demo BPE with every DeepSeek-V4 special "
                        "token). tiny takes its vocabulary size from the tokenizer; flash keeps the real 129280 and "
                        "pads the token list with unused [PAD<id>] entries")
    p.add_argument("--name", default=None, help="general.name to write (default says preset, seed and random weights)")
    p.add_argument("--out", required=True, metavar="FILE", help="output GGUF path")


def main(args: argparse.Namespace) -> int:
    if args.seed < 0 or args.seed >= 2**32:
        print(f"error: --seed must be in [0, 2^32), found {args.seed}", file=sys.stderr)
        return 2
    if args.tokenizer is not None and not Path(args.tokenizer).is_file():
        print(f"error: --tokenizer {args.tokenizer}: no such file", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.parent and not out.parent.exists():
        print(f"error: --out {out}: directory {out.parent} does not exist", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    try:
        n_vocab, _ = tokenizer_fields(args.tokenizer)   # TokenizerError (a ValueError) names the file and problem
        cfg = preset_config(args.preset, n_vocab, args.layers)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_random_model(out, cfg, experts=args.experts, seed=args.seed, tokenizer_json=args.tokenizer,
                       progress=None, name=args.name)
    size = out.stat().st_size
    print(f"wrote {out}: {cfg.name}, {cfg.n_layer} layers, vocab {cfg.n_vocab}, {args.experts} experts, seed "
          f"{args.seed}, {size / 1e6:.1f} MB in {time.monotonic() - t0:.1f} s (random weights)")
    return 0
