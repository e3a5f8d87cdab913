"""The ds4 GGUF tensor layout for a given ModelConfig: every tensor's name, shape and the block types allowed.

This mirrors antirez/ds4 `weights_bind` + `weights_validate_layout`, generalised to any dimensions. Shapes here are
NumPy order (outermost first), i.e. the reverse of GGUF `ne` order: a GGUF tensor with dims [in, out, experts] is
(experts, out, in) here, and row r of a matrix holds the `in` weights of output r.

Tensor kinds and the types each accepts:
- "vector": norms, sinks, HC scale/base, router bias: F32 (ds4), F16 and BF16 accepted.
- "dense": every 2-D projection (attention, compressor, indexer, router, HC fn, shared expert, embedding, head):
  Q8_0, F16, BF16 or F32 (ds4 writes Q8_0 or F16, `ds4cupy convert --type f32` writes F32 for exact parity).
- "experts": routed expert stacks: IQ2_XXS, Q2_K, Q4_K, Q8_0, F16, BF16, F32, MXFP4, NVFP4.
- "index": tid2eid, I32.
"""
from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as T

from .config import ModelConfig

VECTOR_TYPES = frozenset({T.F32, T.F16, T.BF16})
DENSE_TYPES = frozenset({T.Q8_0, T.F16, T.BF16, T.F32})
EXPERT_TYPES = frozenset({T.IQ2_XXS, T.Q2_K, T.Q4_K, T.Q8_0, T.F16, T.BF16, T.F32, T.MXFP4, T.NVFP4})
INDEX_TYPES = frozenset({T.I32})
KIND_TYPES = {"vector": VECTOR_TYPES, "dense": DENSE_TYPES, "experts": EXPERT_TYPES, "index": INDEX_TYPES}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # NumPy order
    kind: str               # vector | dense | experts | index
    required: bool = True

    @property
    def allowed(self) -> frozenset:
        return KIND_TYPES[self.kind]


def layer_specs(cfg: ModelConfig, il: int) -> list[TensorSpec]:
    """The tensors of block `il` (`blk.{il}.*`)."""
    p = f"blk.{il}."
    D, hd, nE, ff = cfg.n_embd, cfg.head_dim, cfg.n_expert, cfg.n_ff_exp
    s = [
        TensorSpec(p + "hc_attn_fn.weight", (cfg.hc_mix, cfg.hc_dim), "dense"),
        TensorSpec(p + "hc_attn_scale.weight", (3,), "vector"),
        TensorSpec(p + "hc_attn_base.weight", (cfg.hc_mix,), "vector"),
        TensorSpec(p + "attn_norm.weight", (D,), "vector"),
        TensorSpec(p + "attn_q_a.weight", (cfg.q_lora_rank, D), "dense"),
        TensorSpec(p + "attn_q_a_norm.weight", (cfg.q_lora_rank,), "vector"),
        TensorSpec(p + "attn_q_b.weight", (cfg.q_dim, cfg.q_lora_rank), "dense"),
        TensorSpec(p + "attn_kv.weight", (hd, D), "dense"),
        TensorSpec(p + "attn_kv_a_norm.weight", (hd,), "vector"),
        TensorSpec(p + "attn_sinks.weight", (cfg.n_head,), "vector"),
        TensorSpec(p + "attn_output_a.weight", (cfg.o_groups * cfg.o_lora_rank, cfg.o_group_in), "dense"),
        TensorSpec(p + "attn_output_b.weight", (D, cfg.o_groups * cfg.o_lora_rank), "dense"),
    ]
    ratio = cfg.ratio(il)
    if ratio:
        w = cfg.compressor_width(il)
        s += [
            TensorSpec(p + "attn_compressor_ape.weight", (ratio, w), "dense"),
            TensorSpec(p + "attn_compressor_kv.weight", (w, D), "dense"),
            TensorSpec(p + "attn_compressor_gate.weight", (w, D), "dense"),
            TensorSpec(p + "attn_compressor_norm.weight", (hd,), "vector"),
        ]
    if ratio == 4:
        ih, idim = cfg.indexer_n_head, cfg.indexer_head_dim
        s += [
            TensorSpec(p + "indexer.attn_q_b.weight", (ih * idim, cfg.q_lora_rank), "dense"),
            TensorSpec(p + "indexer.proj.weight", (ih, D), "dense"),
            TensorSpec(p + "indexer_compressor_ape.weight", (4, 2 * idim), "dense"),
            TensorSpec(p + "indexer_compressor_kv.weight", (2 * idim, D), "dense"),
            TensorSpec(p + "indexer_compressor_gate.weight", (2 * idim, D), "dense"),
            TensorSpec(p + "indexer_compressor_norm.weight", (idim,), "vector"),
        ]
    s += [
        TensorSpec(p + "hc_ffn_fn.weight", (cfg.hc_mix, cfg.hc_dim), "dense"),
        TensorSpec(p + "hc_ffn_scale.weight", (3,), "vector"),
        TensorSpec(p + "hc_ffn_base.weight", (cfg.hc_mix,), "vector"),
        TensorSpec(p + "ffn_norm.weight", (D,), "vector"),
        TensorSpec(p + "ffn_gate_inp.weight", (nE, D), "dense"),
        TensorSpec(p + "exp_probs_b.bias", (nE,), "vector", required=False),
        TensorSpec(p + "ffn_gate_exps.weight", (nE, ff, D), "experts"),
        TensorSpec(p + "ffn_up_exps.weight", (nE, ff, D), "experts"),
        TensorSpec(p + "ffn_down_exps.weight", (nE, D, ff), "experts"),
    ]
    if cfg.n_expert_shared:
        s += [
            TensorSpec(p + "ffn_gate_shexp.weight", (ff, D), "dense"),
            TensorSpec(p + "ffn_up_shexp.weight", (ff, D), "dense"),
            TensorSpec(p + "ffn_down_shexp.weight", (D, ff), "dense"),
        ]
    if cfg.is_hash_layer(il):
        s.append(TensorSpec(p + "ffn_gate_tid2eid.weight", (cfg.n_vocab, cfg.n_expert_used), "index"))
    return s


def model_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """Every tensor of the main model, in the order ds4's converter writes them."""
    D = cfg.n_embd
    s = [TensorSpec("token_embd.weight", (cfg.n_vocab, D), "dense")]
    for il in range(cfg.n_layer):
        s += layer_specs(cfg, il)
    s += [
        TensorSpec("output_hc_base.weight", (cfg.hc_mult,), "vector"),
        TensorSpec("output_hc_fn.weight", (cfg.hc_mult, cfg.hc_dim), "dense"),
        TensorSpec("output_hc_scale.weight", (1,), "vector"),
        TensorSpec("output_norm.weight", (D,), "vector"),
        TensorSpec("output.weight", (cfg.n_vocab, D), "dense"),
    ]
    return s


# The block types ds4's own files use for each tensor (what `make-model` writes by default).
DS4_DENSE_TYPE = {
    "token_embd.weight": T.F16, "output.weight": T.Q8_0, "output_hc_fn.weight": T.F16,
}
_DS4_F16_SUFFIXES = ("hc_attn_fn.weight", "hc_ffn_fn.weight", "attn_compressor_ape.weight",
                     "attn_compressor_kv.weight", "attn_compressor_gate.weight", "indexer.attn_q_b.weight",
                     "indexer.proj.weight", "indexer_compressor_ape.weight", "indexer_compressor_kv.weight",
                     "indexer_compressor_gate.weight", "ffn_gate_inp.weight")

# Expert type presets: (gate/up type, down type).
EXPERT_PRESETS = {
    "q2": (T.IQ2_XXS, T.Q2_K),
    "q4": (T.Q4_K, T.Q4_K),
    "q8_0": (T.Q8_0, T.Q8_0),
    "f16": (T.F16, T.F16),
    "f32": (T.F32, T.F32),
    "mxfp4": (T.MXFP4, T.MXFP4),
}


def ds4_type(spec: TensorSpec, experts: str = "q2") -> T:
    """The block type ds4's published files use for `spec` (the generator's default)."""
    if spec.kind == "vector":
        return T.F32
    if spec.kind == "index":
        return T.I32
    if spec.kind == "experts":
        gate_up, down = EXPERT_PRESETS[experts]
        return down if spec.name.endswith("ffn_down_exps.weight") else gate_up
    if spec.name in DS4_DENSE_TYPE:
        return DS4_DENSE_TYPE[spec.name]
    if spec.name.endswith(_DS4_F16_SUFFIXES):
        return T.F16
    return T.Q8_0


def ds4_file_tensors(cfg: ModelConfig, experts: str = "q2") -> list[tuple[TensorSpec, T]]:
    """(spec, block type) of every tensor a ds4 file of `cfg` holds, in file order: each of model_specs in ds4's
    types, the optional router bias (`exp_probs_b.bias`) only on non-hash layers, as in ds4's published files."""
    if experts not in EXPERT_PRESETS:
        raise ValueError(f"unknown expert type {experts!r}; expected one of {', '.join(EXPERT_PRESETS)}")
    return [(spec, ds4_type(spec, experts)) for spec in model_specs(cfg)
            if not (spec.name.endswith("exp_probs_b.bias") and cfg.is_hash_layer(int(spec.name.split(".")[1])))]
