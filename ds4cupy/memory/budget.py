"""How many bytes a model needs on the GPU, per category, for a given context length.

`kv_layout(cfg, ctx)` is the single source of truth for the KV cache: the CUDA backend allocates exactly the buffers
it lists (through `DeviceMemory`), and `Budget` sums the same list. The layout follows antirez/ds4's GPU cache
(ds4-peer.md §3), generalised to any config:

- raw window ring, every layer: float32 [raw_cap, head_dim], raw_cap = round_up(sliding_window + min(chunk, ctx), 256)
  (a prefill chunk sees its own rows plus the window before it), capped at round_up(sliding_window + ctx, 256);
- compressed rows, layers with ratio r != 0: float32 [ctx // r + 2, head_dim];
- indexer rows, ratio-4 layers: float32 [ctx // 4 + 2, indexer_head_dim]; with index_fp4 (switch INDEXER_FP4 and
  QAT on: engines/cuda/session.py) uint8 [ctx // 4 + 2, numerics.fp4_row_bytes(indexer_head_dim)] instead, the packed
  e2m1 codes + block exponents (68 bytes a row for Flash's 128 dims instead of 512: 17 instead of 128 bytes a token
  per CSA layer, 21 CSA layers: 2,331 bytes a token less, 13,760 -> 11,429);
- compressor state (model.md §2.5 kv_state / score_state), coff = 2 for ratio 4 else 1:
  main  float32 [coff * r, coff * head_dim] twice (kv, score); indexer float32 [8, 2 * indexer_head_dim] twice.

Weights are split into four categories (experts / dense / embed_head / small) from the tensor names; scratch and
graph buffers are estimates the CUDA backend may override with its real numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple

import numpy as np

from ..format.config import ModelConfig

GiB = 1 << 30
MiB = 1 << 20

DEFAULT_CHUNK = 2048          # prefill chunk (ds4: DS4_METAL_PREFILL_CHUNK)
RAW_ALIGN = 256               # raw ring rows rounded up to this (ds4: align256)
DEFAULT_GRAPH_BYTES = 64 * MiB
DEFAULT_RESERVE_BYTES = 1 * GiB  # CUDA modules, cuBLAS workspace, allocator slack

WEIGHT_CATEGORIES = ("experts", "dense", "embed_head", "small")
KV_CATEGORIES = ("raw", "comp", "index", "state")
CATEGORY_LABELS = {
    "experts": "routed experts",
    "dense": "dense attention + shared expert",
    "embed_head": "embedding + head",
    "small": "small (norms, HC, index)",
    "raw": "raw window rings",
    "comp": "compressed rows",
    "index": "indexer rows",
    "state": "compressor state",
}


class KVBuffer(NamedTuple):
    layer: int
    name: str            # raw | comp | index | comp_kv_state | comp_score_state | index_kv_state | index_score_state
    shape: tuple
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    @property
    def category(self) -> str:
        return "state" if self.name.endswith("_state") else self.name


def fp4_row_bytes(c: int) -> int:
    """Bytes of a packed FP4 row of c values: engines.numerics.fp4_row_bytes (the same formula; memory sits below
    engines and cannot import it; tests/test_indexer_fp4.py checks they agree)."""
    return c // 2 + (c // 32 + 3) // 4 * 4


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def raw_cap(cfg: ModelConfig, ctx: int, chunk: int = DEFAULT_CHUNK) -> int:
    """Rows of each layer's raw window ring."""
    if ctx <= 0:
        raise ValueError(f"ctx must be > 0, got {ctx}")
    w = cfg.sliding_window
    return min(_round_up(w + min(chunk, ctx), RAW_ALIGN), _round_up(w + ctx, RAW_ALIGN))


def kv_layout(cfg: ModelConfig, ctx: int, chunk: int = DEFAULT_CHUNK, index_fp4: bool = False) -> list[KVBuffer]:
    """Every KV-cache buffer of a session of `ctx` tokens: (layer, name, shape, dtype), float32 throughout except the
    indexer rows with index_fp4 (packed uint8 rows, the module docstring)."""
    f32 = np.dtype(np.float32)
    hd, idim = cfg.head_dim, cfg.indexer_head_dim
    cap = raw_cap(cfg, ctx, chunk)
    out: list[KVBuffer] = []
    for il in range(cfg.n_layer):
        out.append(KVBuffer(il, "raw", (cap, hd), f32))
        r = cfg.ratio(il)
        if not r:
            continue
        coff = 2 if r == 4 else 1
        out.append(KVBuffer(il, "comp", (ctx // r + 2, hd), f32))
        out.append(KVBuffer(il, "comp_kv_state", (coff * r, coff * hd), f32))
        out.append(KVBuffer(il, "comp_score_state", (coff * r, coff * hd), f32))
        if r == 4:
            out.append(KVBuffer(il, "index", (ctx // 4 + 2, fp4_row_bytes(idim)), np.dtype(np.uint8)) if index_fp4
                       else KVBuffer(il, "index", (ctx // 4 + 2, idim), f32))
            out.append(KVBuffer(il, "index_kv_state", (8, 2 * idim), f32))
            out.append(KVBuffer(il, "index_score_state", (8, 2 * idim), f32))
    return out


def kv_bytes_per_token(cfg: ModelConfig, index_fp4: bool = False) -> float:
    """KV bytes that grow with the context: compressed + indexer rows (flash: 13,760 B/token, ds4's 13.76 KB; with
    index_fp4 the indexer rows packed: 11,429 B/token)."""
    per = 0.0
    for il in range(cfg.n_layer):
        r = cfg.ratio(il)
        if r:
            per += cfg.head_dim * 4 / r
        if r == 4:
            per += (fp4_row_bytes(cfg.indexer_head_dim) if index_fp4 else cfg.indexer_head_dim * 4) / 4
    return per


def kv_fixed_bytes(cfg: ModelConfig, ctx: int, chunk: int = DEFAULT_CHUNK, index_fp4: bool = False) -> int:
    """KV bytes that do not grow with ctx (raw rings at their cap, compressor state, the +2 rows)."""
    return (sum(b.nbytes for b in kv_layout(cfg, ctx, chunk, index_fp4))
            - int(round(kv_bytes_per_token(cfg, index_fp4) * ctx)))


def weight_category(name: str) -> str:
    """experts | dense | embed_head | small, from a ds4 tensor name."""
    if name.endswith("_exps.weight"):
        return "experts"
    if name in ("token_embd.weight", "output.weight"):
        return "embed_head"
    base = name.rsplit(".", 1)[0]
    if base.endswith(("_norm", "_scale", "_base", "_sinks", "tid2eid", "exp_probs_b", "_ape", "hc_attn_fn",
                      "hc_ffn_fn", "output_hc_fn")):
        return "small"
    return "dense"


def scratch_bytes(cfg: ModelConfig, ctx: int, chunk: int = DEFAULT_CHUNK, logits_rows: int = 1) -> int:
    """Estimate of the activations of one prefill chunk (float32), reused layer to layer.

    HC state in/out, normed input and residual, q_a/q, kv rows, attention output and out_a, indexer q and the indexer
    score row per token over the compressed rows + its top-k ids, MoE gate/up/mid and per-expert down rows, and
    `logits_rows` rows of logits. Attention scores are assumed computed online (flash-style), not materialised.
    """
    T = min(chunk, ctx)
    f = 4
    n = 2 * T * cfg.hc_dim + 2 * T * cfg.n_embd
    n += T * cfg.q_lora_rank + 2 * T * cfg.q_dim + T * cfg.head_dim + T * cfg.o_groups * cfg.o_lora_rank
    if any(cfg.ratio(i) == 4 for i in range(cfg.n_layer)):
        n += T * cfg.indexer_n_head * cfg.indexer_head_dim + T * (ctx // 4 + 2) + T * cfg.indexer_top_k
    n += T * cfg.n_expert_used * (3 * cfg.n_ff_exp + cfg.n_embd)
    n += logits_rows * cfg.n_vocab
    return int(n * f)


@dataclass
class Budget:
    """Bytes per category. weights/kv: {category: bytes}; the rest single numbers. `describe` names the model."""
    cfg: ModelConfig
    ctx: int
    chunk: int
    weights: dict[str, int]
    kv: dict[str, int]
    scratch: int
    graph: int
    reserve: int
    weight_types: dict[str, str] = field(default_factory=dict)  # category -> "IQ2_XXS+Q2_K" style summary
    index_fp4: bool = False          # the indexer rows packed (kv_layout; the CUDA engine with INDEXER_FP4, QAT on)

    @property
    def weights_total(self) -> int:
        return sum(self.weights.values())

    @property
    def kv_total(self) -> int:
        return sum(self.kv.values())

    @property
    def total(self) -> int:
        return self.weights_total + self.kv_total + self.scratch + self.graph + self.reserve

    @property
    def kv_per_token(self) -> float:
        return kv_bytes_per_token(self.cfg, self.index_fp4)

    def categories(self) -> dict[str, int]:
        """Flat {category: bytes}: weights.*, kv.*, scratch, graph, reserve."""
        out = {f"weights.{k}": v for k, v in self.weights.items()}
        out.update({f"kv.{k}": v for k, v in self.kv.items()})
        out.update(scratch=self.scratch, graph=self.graph, reserve=self.reserve)
        return out

    def with_ctx(self, ctx: int) -> "Budget":
        """The same weights with another context length (KV and scratch recomputed)."""
        return Budget.build(self.cfg, None, ctx, self.chunk, graph=self.graph, reserve=self.reserve,
                            index_fp4=self.index_fp4, _weights=(dict(self.weights), dict(self.weight_types)))

    @classmethod
    def build(cls, cfg: ModelConfig, tensors: Iterable[tuple[str, object, int]] | None, ctx: int,
              chunk: int = DEFAULT_CHUNK, *, scratch: int | None = None, graph: int = DEFAULT_GRAPH_BYTES,
              reserve: int = DEFAULT_RESERVE_BYTES, index_fp4: bool = False, _weights=None) -> "Budget":
        """From a config, the file's tensors as (name, qtype, nbytes) and a context length. index_fp4: the KV as the
        CUDA engine stores it with packed indexer rows (switch INDEXER_FP4 with QAT on; the caller knows)."""
        if ctx <= 0:
            raise ValueError(f"ctx must be > 0, got {ctx}")
        if _weights is not None:
            weights, types = _weights
        else:
            weights = {c: 0 for c in WEIGHT_CATEGORIES}
            seen: dict[str, set] = {c: set() for c in WEIGHT_CATEGORIES}
            for name, qtype, nbytes in tensors:
                c = weight_category(name)
                weights[c] += int(nbytes)
                seen[c].add(getattr(qtype, "name", str(qtype)))
            types = {c: "+".join(sorted(v)) for c, v in seen.items() if v}
        kv = {c: 0 for c in KV_CATEGORIES}
        for b in kv_layout(cfg, ctx, chunk, index_fp4):
            kv[b.category] += b.nbytes
        if scratch is None:
            scratch = scratch_bytes(cfg, ctx, chunk)
        return cls(cfg, ctx, chunk, weights, kv, int(scratch), int(graph), int(reserve), types, index_fp4)


def preset_tensors(cfg: ModelConfig, experts: str = "q2") -> list[tuple[str, object, int]]:
    """(name, qtype, nbytes) for every required tensor of `cfg` in ds4's published types, without a file."""
    from gguf import GGML_QUANT_SIZES

    from ..format.layout import ds4_type, model_specs
    out = []
    for s in model_specs(cfg):
        if not s.required:
            continue
        t = ds4_type(s, experts)
        block, size = GGML_QUANT_SIZES[t]
        n = math.prod(s.shape)
        if s.shape[-1] % block:
            raise ValueError(f"{s.name}: row of {s.shape[-1]} is not a multiple of {t.name}'s block {block}")
        out.append((s.name, t, n // block * size))
    return out


def preset_budget(cfg: ModelConfig, experts: str = "q2", ctx: int = 4096, chunk: int = DEFAULT_CHUNK,
                  **kw) -> Budget:
    """Budget of a generated model (ds4 types, `experts` preset q2/q4/...) with no file at hand."""
    return Budget.build(cfg, preset_tensors(cfg, experts), ctx, chunk, **kw)
