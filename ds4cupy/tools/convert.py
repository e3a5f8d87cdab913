"""Convert a transformers DeepseekV4 directory (config.json + *.safetensors) to a ds4-layout GGUF.

Reads the checkpoint as `save_pretrained` writes it (transformers 5 saves DeepSeek's own names, e.g.
`layers.0.attn.wq_a.weight`, `ffn.experts.3.w1.weight`) and also the module names of a transformers state dict
(`layers.0.self_attn.q_a_proj.weight`, fused `mlp.experts.gate_up_proj`), with or without a `model.` prefix. Every
parameter is mapped to its ds4 tensor, values are kept exact (no rescaling), and the conversion fails, naming the
tensors, if any checkpoint tensor is left over or any ds4 tensor is missing. `mtp.*` tensors (the multi-token
prediction block, which transformers does not instantiate either) are skipped.
"""
from __future__ import annotations

import argparse
import json
import re
import struct
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import GGMLQuantizationType as T

from ..format.config import ConfigError, ModelConfig
from ..format.gguf_write import write_gguf
from ..format.layout import ds4_type, model_specs


class ConvertError(ValueError):
    """The directory cannot be converted; the message names the file, key or tensor at fault."""


# ---- safetensors, read without torch -------------------------------------------------------------------------------
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class SafetensorsTensor:
    """One tensor of a .safetensors file, read lazily from a memory map."""

    def __init__(self, path: Path, name: str, dtype: str, shape: tuple[int, ...], start: int, end: int) -> None:
        self.path, self.name, self.dtype, self.shape, self.start, self.end = path, name, dtype, shape, start, end

    def raw(self) -> np.ndarray:
        """The stored values as a NumPy array (BF16 as its uint16 bits), shape `self.shape`."""
        mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        return mm[self.start:self.end].view(_ST_DTYPES[self.dtype]).reshape(self.shape)

    def float32(self) -> np.ndarray:
        """Values as float32 [shape]; exact for F32, F16 and BF16 sources."""
        a = self.raw()
        if self.dtype == "BF16":
            return (a.astype(np.uint32) << 16).view(np.float32)
        return a.astype(np.float32)

    def __repr__(self) -> str:
        return f"{self.name} {self.dtype}{list(self.shape)} ({self.path.name})"


def read_safetensors_index(path: Path) -> list[SafetensorsTensor]:
    """The tensor table of one .safetensors file (header only; data stays on disk)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
        raise ConvertError(f"{path}: not a readable safetensors file ({e})") from None
    size = path.stat().st_size
    base = 8 + n
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype")
        if dtype not in _ST_DTYPES:
            hint = " (FP8/FP4 checkpoints such as DeepSeek's own release are not supported yet)" \
                if str(dtype).startswith(("F8", "F4", "E")) else ""
            raise ConvertError(f"{path.name}: tensor {name!r} has dtype {dtype}, which convert cannot read{hint}")
        a, b = info["data_offsets"]
        if base + b > size:
            raise ConvertError(f"{path.name}: tensor {name!r} ends at byte {base + b} but the file has {size} bytes "
                               f"(truncated file?)")
        out.append(SafetensorsTensor(path, name, dtype, tuple(int(x) for x in info["shape"]), base + a, base + b))
    return out


# ---- config.json -> ModelConfig ------------------------------------------------------------------------------------
_LAYER_TYPE_OF_RATIO = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}


def _rope_settings(hf: dict[str, Any], n_rot_fraction: float) -> dict[str, Any]:
    """Main and compress rope bases and the compress YaRN parameters from the HF config (nested or legacy form)."""
    rp = hf.get("rope_parameters") or {}
    if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        main, comp = rp["main"], rp["compress"]
    else:
        flat = {k: v for k, v in {**(hf.get("rope_scaling") or {}), **rp}.items() if k not in ("main", "compress")}
        main = {"rope_type": "default", "rope_theta": hf.get("rope_theta", 10000.0)}
        comp = {**flat, "rope_theta": hf.get("compress_rope_theta", 160000.0)}
    main_type = main.get("rope_type", main.get("type", "default"))
    if main_type != "default":
        raise ConvertError(f"config.json: the main (sliding-window) rope must be plain, found rope_type {main_type!r}")
    comp_type = comp.get("rope_type", comp.get("type", "default"))
    out = {"rope_freq_base": float(main.get("rope_theta", 10000.0)),
           "compress_rope_freq_base": float(comp.get("rope_theta", 160000.0))}
    for label, d in (("main", main), ("compress", comp)):
        f = d.get("partial_rotary_factor")
        if f is not None and abs(float(f) - n_rot_fraction) > 1e-9:
            raise ConvertError(f"config.json: rope_parameters.{label}.partial_rotary_factor is {f}, but the rope "
                               f"dimension fraction of the heads is {n_rot_fraction}")
    if comp_type == "yarn":
        orig = comp.get("original_max_position_embeddings")
        if not orig:
            raise ConvertError("config.json: yarn rope without original_max_position_embeddings")
        factor = comp.get("factor")
        if factor is None:
            factor = hf.get("max_position_embeddings", 0) / orig
        attn_factor = comp.get("attention_factor", 1.0)
        if attn_factor is not None and float(attn_factor) != 1.0:
            raise ConvertError(f"config.json: yarn attention_factor must be 1.0 (DeepSeek-V4 does not scale cos/sin), "
                               f"found {attn_factor}")
        if comp.get("truncate", True) is False:
            raise ConvertError("config.json: yarn truncate=false is not DeepSeek-V4's rope (it truncates the ramp)")
        out.update(rope_scaling_factor=float(factor), rope_orig_ctx=int(orig),
                   yarn_beta_fast=float(comp.get("beta_fast", 32.0)), yarn_beta_slow=float(comp.get("beta_slow", 1.0)))
    elif comp_type == "default":
        out.update(rope_scaling_factor=1.0, rope_orig_ctx=0)
    else:
        raise ConvertError(f"config.json: compress rope_type {comp_type!r} is not supported (default or yarn)")
    return out


def hf_config_to_model_config(hf: dict[str, Any], name: str = "deepseek-v4") -> ModelConfig:
    """ModelConfig for a transformers DeepseekV4 config.json dict (modern or legacy keys, as transformers reads them)."""
    if hf.get("model_type") != "deepseek_v4":
        raise ConvertError(f"config.json: model_type is {hf.get('model_type')!r}, expected 'deepseek_v4'")

    def get(key: str, default: Any = None) -> Any:
        if key not in hf and default is None:
            raise ConvertError(f"config.json: key {key!r} is missing")
        return hf.get(key, default)

    n_layer = int(get("num_hidden_layers", 43))
    for key, want in (("scoring_func", "sqrtsoftplus"), ("hidden_act", "silu"), ("attention_bias", False),
                      ("mlp_bias", False)):
        if key in hf and hf[key] != want:
            raise ConvertError(f"config.json: {key} is {hf[key]!r}; DeepSeek-V4 (and ds4) need {want!r}")

    rates = dict(hf.get("compress_rates") or {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128})
    if "compress_rate_csa" in hf:
        rates["compressed_sparse_attention"] = hf["compress_rate_csa"]
    if "compress_rate_hca" in hf:
        rates["heavily_compressed_attention"] = hf["compress_rate_hca"]
    if rates.get("compressed_sparse_attention") != 4:
        raise ConvertError(f"config.json: compress_rates.compressed_sparse_attention is "
                           f"{rates.get('compressed_sparse_attention')!r}; the CSA ratio must be 4 (overlapping "
                           f"windows and the indexer are defined for ratio 4 only)")
    hca = rates.get("heavily_compressed_attention")
    if not isinstance(hca, int) or hca <= 0 or hca == 4:
        raise ConvertError(f"config.json: compress_rates.heavily_compressed_attention is {hca!r}; it must be a "
                           f"positive ratio other than 4 (ratio 4 means CSA in the ds4 layout)")
    types = hf.get("layer_types")
    if types is None and hf.get("compress_ratios") is not None:
        try:
            types = [_LAYER_TYPE_OF_RATIO[r] for r in hf["compress_ratios"]]
        except KeyError as e:
            raise ConvertError(f"config.json: compress_ratios holds {e.args[0]!r}; only 0, 4 and 128 are known") from None
    if types is None:
        raise ConvertError("config.json: neither layer_types nor compress_ratios is given")
    types = list(types)[:n_layer]
    if len(types) != n_layer:
        raise ConvertError(f"config.json: layer_types has {len(types)} entries for {n_layer} layers")
    ratio_of = {"sliding_attention": 0, "compressed_sparse_attention": 4, "heavily_compressed_attention": hca}
    try:
        ratios = [ratio_of[t] for t in types]
    except KeyError as e:
        raise ConvertError(f"config.json: unknown layer type {e.args[0]!r} in layer_types") from None
    ratios += [0] * int(hf.get("num_nextn_predict_layers", 1) or 0)   # the MTP block(s): window-only

    mlp_types = hf.get("mlp_layer_types")
    if mlp_types is None:
        n_hash = int(hf.get("num_hash_layers", 3))
        mlp_types = ["hash_moe"] * min(n_layer, n_hash) + ["moe"] * max(0, n_layer - n_hash)
    mlp_types = list(mlp_types)[:n_layer]
    n_hash = sum(t == "hash_moe" for t in mlp_types)
    if mlp_types != ["hash_moe"] * n_hash + ["moe"] * (n_layer - n_hash):
        raise ConvertError(f"config.json: mlp_layer_types must be hash_moe layers first, then moe; found {mlp_types}")

    head_dim = int(get("head_dim", 512))
    if hf.get("partial_rotary_factor") is not None:
        n_rot = int(head_dim * float(hf["partial_rotary_factor"]))
    else:
        n_rot = int(hf.get("qk_rope_head_dim", head_dim // 8))
    rope = _rope_settings(hf, n_rot / head_dim)
    try:
        return ModelConfig(
            name=name, n_layer=n_layer, n_embd=int(get("hidden_size")), n_vocab=int(get("vocab_size")),
            n_head=int(get("num_attention_heads")), n_head_kv=int(hf.get("num_key_value_heads", 1)),
            head_dim=head_dim, n_rot=n_rot, q_lora_rank=int(get("q_lora_rank")),
            o_lora_rank=int(get("o_lora_rank")), o_groups=int(get("o_groups")),
            n_expert=int(get("n_routed_experts")), n_expert_used=int(get("num_experts_per_tok")),
            n_ff_exp=int(get("moe_intermediate_size")), n_expert_shared=int(hf.get("n_shared_experts", 1)),
            n_hash_layer=n_hash, sliding_window=int(get("sliding_window")),
            indexer_n_head=int(get("index_n_heads", 64)), indexer_head_dim=int(get("index_head_dim", 128)),
            indexer_top_k=int(get("index_topk", 512)), hc_mult=int(hf.get("hc_mult", 4)),
            hc_sinkhorn_iters=int(hf.get("hc_sinkhorn_iters", 20)), hc_eps=float(hf.get("hc_eps", 1e-6)),
            expert_weights_scale=float(hf.get("routed_scaling_factor", 1.5)),
            expert_weights_norm=bool(hf.get("norm_topk_prob", True)), rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
            n_ctx_train=int(hf.get("max_position_embeddings", 1048576)), compress_ratios=ratios,
            swiglu_clamp=[float(hf.get("swiglu_limit", 10.0))] * n_layer, **rope)
    except ConfigError as e:
        raise ConvertError(f"config.json describes a model ds4cupy cannot run: {e}") from None


# ---- tensor names --------------------------------------------------------------------------------------------------
# Checkpoint (DeepSeek / save_pretrained) spellings -> transformers module names, applied in order to the part after
# `layers.N.`. Facts from transformers' deepseek_v4 checkpoint conversion mapping.
_LAYER_RENAMES = [
    (r"^attn\.", "self_attn."), (r"^ffn\.", "mlp."),
    (r"^self_attn\.indexer\.compressor\.", "self_attn.compressor.indexer."),
    (r"^self_attn\.indexer\.weights_proj\.", "self_attn.compressor.indexer.scorer.weights_proj."),
    (r"^self_attn\.indexer\.wq_b\.", "self_attn.compressor.indexer.q_b_proj."),
    (r"^attn_norm\.", "input_layernorm."), (r"^ffn_norm\.", "post_attention_layernorm."),
    (r"^hc_attn_(fn|base|scale)$", r"attn_hc.\1"), (r"^hc_ffn_(fn|base|scale)$", r"ffn_hc.\1"),
    (r"\.attn_sink$", ".sinks"), (r"\.norm\.weight$", ".kv_norm.weight"), (r"\.ape$", ".position_bias"),
    (r"\.wq_a\.", ".q_a_proj."), (r"^self_attn\.wq_b\.", "self_attn.q_b_proj."), (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."), (r"\.wo_a\.", ".o_a_proj."), (r"\.wo_b\.", ".o_b_proj."),
    (r"\.q_norm\.", ".q_a_norm."), (r"^mlp\.gate\.bias$", "mlp.gate.e_score_correction_bias"),
    (r"^mlp\.shared_experts\.w1\.", "mlp.shared_experts.gate_proj."),
    (r"^mlp\.shared_experts\.w2\.", "mlp.shared_experts.down_proj."),
    (r"^mlp\.shared_experts\.w3\.", "mlp.shared_experts.up_proj."),
]
_TOP_RENAMES = {"embed.weight": "embed_tokens.weight", "head.weight": "lm_head.weight",
                "hc_head_fn": "hc_head.hc_fn", "hc_head_base": "hc_head.hc_base", "hc_head_scale": "hc_head.hc_scale"}

# transformers module name -> ds4 tensor name
_TOP_TO_DS4 = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight", "hc_head.hc_fn": "output_hc_fn.weight",
               "hc_head.hc_base": "output_hc_base.weight", "hc_head.hc_scale": "output_hc_scale.weight"}
_LAYER_TO_DS4 = {
    "attn_hc.fn": "hc_attn_fn.weight", "attn_hc.scale": "hc_attn_scale.weight", "attn_hc.base": "hc_attn_base.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight", "self_attn.q_a_norm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight", "self_attn.kv_proj.weight": "attn_kv.weight",
    "self_attn.kv_norm.weight": "attn_kv_a_norm.weight", "self_attn.sinks": "attn_sinks.weight",
    "self_attn.o_a_proj.weight": "attn_output_a.weight", "self_attn.o_b_proj.weight": "attn_output_b.weight",
    "self_attn.compressor.position_bias": "attn_compressor_ape.weight",
    "self_attn.compressor.kv_proj.weight": "attn_compressor_kv.weight",
    "self_attn.compressor.gate_proj.weight": "attn_compressor_gate.weight",
    "self_attn.compressor.kv_norm.weight": "attn_compressor_norm.weight",
    "self_attn.compressor.indexer.q_b_proj.weight": "indexer.attn_q_b.weight",
    "self_attn.compressor.indexer.scorer.weights_proj.weight": "indexer.proj.weight",
    "self_attn.compressor.indexer.position_bias": "indexer_compressor_ape.weight",
    "self_attn.compressor.indexer.kv_proj.weight": "indexer_compressor_kv.weight",
    "self_attn.compressor.indexer.gate_proj.weight": "indexer_compressor_gate.weight",
    "self_attn.compressor.indexer.kv_norm.weight": "indexer_compressor_norm.weight",
    "ffn_hc.fn": "hc_ffn_fn.weight", "ffn_hc.scale": "hc_ffn_scale.weight", "ffn_hc.base": "hc_ffn_base.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight", "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.gate.tid2eid": "ffn_gate_tid2eid.weight",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.experts.down_proj": "ffn_down_exps.weight",
}
_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_EXPERT_PART = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}
_EXPERT_DS4 = {"gate": "ffn_gate_exps.weight", "up": "ffn_up_exps.weight", "down": "ffn_down_exps.weight"}


def module_name(key: str) -> str:
    """The transformers module name of a checkpoint key (prefix `model.` dropped, DeepSeek spellings renamed)."""
    k = key[len("model."):] if key.startswith("model.") else key
    if k in _TOP_RENAMES:
        return _TOP_RENAMES[k]
    m = re.match(r"^layers\.(\d+)\.(.+)$", k)
    if not m:
        return k
    rest = m.group(2)
    for pat, rep in _LAYER_RENAMES:
        rest = re.sub(pat, rep, rest)
    return f"layers.{m.group(1)}.{rest}"


class _Source:
    """How to produce one ds4 tensor's float values (or int ids) from checkpoint tensors."""

    def __init__(self, make: Callable[[], np.ndarray], shape: tuple[int, ...], origin: str) -> None:
        self.make, self.shape, self.origin = make, shape, origin


def map_checkpoint(tensors: list[SafetensorsTensor], cfg: ModelConfig, tie_embeddings: bool = False
                   ) -> tuple[dict[str, _Source], list[str]]:
    """{ds4 name: _Source} for every ds4 tensor, and the skipped `mtp.*` keys. Errors name leftovers and gaps."""
    sources: dict[str, _Source] = {}
    experts: dict[tuple[int, str], dict[int, SafetensorsTensor]] = {}
    leftovers: list[str] = []
    skipped: list[str] = []
    by_module: dict[str, SafetensorsTensor] = {}
    for t in tensors:
        mod = module_name(t.name)
        if mod.startswith("mtp.") or t.name.startswith("mtp."):
            skipped.append(t.name)
            continue
        if mod in by_module:
            raise ConvertError(f"tensors {by_module[mod].name!r} and {t.name!r} both map to {mod!r}")
        by_module[mod] = t

    def put(ds4: str, src: _Source) -> None:
        if ds4 in sources:
            raise ConvertError(f"ds4 tensor {ds4!r} would come from both {sources[ds4].origin} and {src.origin}")
        sources[ds4] = src

    for mod, t in by_module.items():
        if mod in _TOP_TO_DS4:
            put(_TOP_TO_DS4[mod], _Source(t.float32, t.shape, t.name))
            continue
        m = re.match(r"^layers\.(\d+)\.(.+)$", mod)
        if not m or int(m.group(1)) >= cfg.n_layer:
            leftovers.append(t.name)
            continue
        il, rest = int(m.group(1)), m.group(2)
        p = f"blk.{il}."
        em = _EXPERT_RE.match(rest)
        if em:
            experts.setdefault((il, _EXPERT_PART[em.group(2)]), {})[int(em.group(1))] = t
        elif rest == "mlp.experts.gate_up_proj":
            if len(t.shape) != 3 or t.shape[1] % 2:
                raise ConvertError(f"{t.name}: expected [experts, 2*ff, hidden], found {list(t.shape)}")
            ff = t.shape[1] // 2
            shape = (t.shape[0], ff, t.shape[2])
            put(p + "ffn_gate_exps.weight", _Source(lambda t=t, ff=ff: t.float32()[:, :ff], shape, t.name + "[gate]"))
            put(p + "ffn_up_exps.weight", _Source(lambda t=t, ff=ff: t.float32()[:, ff:], shape, t.name + "[up]"))
        elif rest == "mlp.gate.tid2eid":
            put(p + "ffn_gate_tid2eid.weight", _Source(lambda t=t: _expert_ids(t, cfg.n_expert), t.shape, t.name))
        elif rest in _LAYER_TO_DS4:
            put(p + _LAYER_TO_DS4[rest], _Source(t.float32, t.shape, t.name))
        else:
            leftovers.append(t.name)

    for (il, part), per_expert in sorted(experts.items()):
        ids = sorted(per_expert)
        if ids != list(range(cfg.n_expert)):
            missing = sorted(set(range(cfg.n_expert)) - set(ids))
            extra = sorted(set(ids) - set(range(cfg.n_expert)))
            raise ConvertError(f"layer {il} {part} experts: expected ids 0..{cfg.n_expert - 1}, missing {missing}, "
                               f"unexpected {extra}")
        parts = [per_expert[e] for e in ids]
        shapes = {x.shape for x in parts}
        if len(shapes) != 1:
            raise ConvertError(f"layer {il} {part} experts have different shapes: {sorted(shapes)}")

        def stack(parts: list[SafetensorsTensor] = parts) -> np.ndarray:
            out = np.empty((len(parts),) + parts[0].shape, np.float32)
            for i, x in enumerate(parts):
                out[i] = x.float32()
            return out

        put(f"blk.{il}.{_EXPERT_DS4[part]}", _Source(stack, (len(parts),) + parts[0].shape,
                                                       f"{parts[0].name} .. {parts[-1].name}"))

    if tie_embeddings and "output.weight" not in sources and "token_embd.weight" in sources:
        e = sources["token_embd.weight"]
        sources["output.weight"] = _Source(e.make, e.shape, e.origin + " (tied)")
    if leftovers:
        raise ConvertError(f"{len(leftovers)} checkpoint tensor(s) have no ds4 counterpart: "
                           f"{', '.join(leftovers[:12])}{' ...' if len(leftovers) > 12 else ''}")
    specs = {s.name: s for s in model_specs(cfg)}
    missing = [n for n, s in specs.items() if s.required and n not in sources]
    if missing:
        raise ConvertError(f"{len(missing)} ds4 tensor(s) are missing from the checkpoint: "
                           f"{', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}")
    for n, src in sources.items():
        if n not in specs:
            raise ConvertError(f"{src.origin} maps to {n!r}, which the config's ds4 layout does not have (layer "
                               f"kinds in config.json do not match the checkpoint)")
        if tuple(src.shape) != specs[n].shape:
            raise ConvertError(f"{src.origin}: shape {list(src.shape)} does not match ds4 tensor {n!r} "
                               f"{list(specs[n].shape)} expected from config.json")
    return sources, skipped


def _expert_ids(t: SafetensorsTensor, n_expert: int) -> np.ndarray:
    """tid2eid as int32, checked to hold valid expert ids."""
    ids = t.raw()
    if not np.issubdtype(ids.dtype, np.integer):
        raise ConvertError(f"{t.name}: expected integer expert ids, found dtype {t.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= n_expert):
        raise ConvertError(f"{t.name}: expert ids must lie in [0, {n_expert}), found {ids.min()}..{ids.max()}")
    return ids.astype(np.int32)


# ---- block types ---------------------------------------------------------------------------------------------------
TYPE_CHOICES = ("f32", "f16", "bf16", "q8_0")
EXPERT_CHOICES = ("same", "f32", "f16", "bf16", "q8_0")
_PLAIN = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16}


def output_type(spec, dense: str, experts: str) -> T:
    """Block type of a ds4 tensor: vectors F32, tid2eid I32, matrices by --type, experts by --experts.

    q8_0 for matrices means ds4's own mix (Q8_0 for the big projections, F16 for HC, compressor, indexer, router and
    the embedding); a row length that is not a multiple of 32 falls back to F16.
    """
    if spec.kind == "vector":
        return T.F32
    if spec.kind == "index":
        return T.I32
    choice = dense if spec.kind == "dense" or experts == "same" else experts
    if choice in _PLAIN:
        return _PLAIN[choice]
    t = ds4_type(spec, "q8_0") if spec.kind == "dense" else T.Q8_0
    if t == T.Q8_0 and spec.shape[-1] % 32:
        return T.F16
    return t


def convert(hf_dir: str | Path, out: str | Path, dtype: str = "f32", experts: str = "same",
            tokenizer_json: str | Path | None = None, progress: bool | None = False) -> Path:
    """Convert a transformers DeepseekV4 directory to a ds4-layout GGUF at `out`; returns the path.

    dtype: f32 | f16 | bf16 | q8_0 for the matrices (f32 keeps every value exact); experts: same | f32 | f16 | bf16 |
    q8_0. The tokenizer is `tokenizer_json`, else HF_DIR/tokenizer.json, else the built-in demo tokenizer; its token
    list is padded to config vocab_size with unused entries.
    """
    from ..format import quants
    from .make_model import tokenizer_fields

    if dtype not in TYPE_CHOICES:
        raise ConvertError(f"--type {dtype!r}: expected one of {', '.join(TYPE_CHOICES)}")
    if experts not in EXPERT_CHOICES:
        raise ConvertError(f"--experts {experts!r}: expected one of {', '.join(EXPERT_CHOICES)}")
    hf_dir = Path(hf_dir)
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise ConvertError(f"{hf_dir}: no config.json (expected a transformers save_pretrained directory)")
    try:
        hf = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConvertError(f"{cfg_path}: cannot read ({e})") from None
    cfg = hf_config_to_model_config(hf, name=hf_dir.resolve().name)
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ConvertError(f"{hf_dir}: no *.safetensors files")
    tensors = [t for f in files for t in read_safetensors_index(f)]
    sources, skipped = map_checkpoint(tensors, cfg, bool(hf.get("tie_word_embeddings", False)))

    if tokenizer_json is None and (hf_dir / "tokenizer.json").is_file():
        tokenizer_json = hf_dir / "tokenizer.json"
    try:
        _, tok_meta = tokenizer_fields(tokenizer_json, cfg.n_vocab)
    except ValueError as e:
        raise ConvertError(f"tokenizer: {e}; give the model a vocab_size of at least the tokenizer's size, or "
                           f"pass a smaller tokenizer with --tokenizer") from None

    entries, fallbacks = [], []
    for spec in model_specs(cfg):
        if spec.name not in sources:
            continue  # an optional tensor the checkpoint does not have (router bias of hash layers)
        qtype = output_type(spec, dtype, experts)
        if "q8_0" in (dtype, experts) and qtype == T.F16 and spec.shape[-1] % 32 and spec.kind != "vector":
            fallbacks.append(spec.name)
        src = sources[spec.name]

        def make(src: _Source = src, qtype: T = qtype) -> np.ndarray:
            x = src.make()
            return x if qtype == T.I32 else quants.quantize(np.asarray(x, np.float32), qtype)

        entries.append((spec.name, make, qtype, spec.shape))
    meta = dict(cfg.metadata())
    meta.update(tok_meta)
    meta["ds4cupy.converted_from"] = ("str", f"transformers {hf.get('transformers_version', '?')} deepseek_v4")
    path = write_gguf(out, meta, entries, name=f"{cfg.name} (converted, {dtype})", progress=progress)
    if fallbacks:
        print(f"note: {len(fallbacks)} tensor(s) have rows that are not a multiple of 32 and were stored as F16 "
              f"instead of Q8_0: {', '.join(fallbacks[:6])}{' ...' if len(fallbacks) > 6 else ''}", file=sys.stderr)
    if skipped:
        print(f"note: skipped {len(skipped)} mtp.* tensor(s) (the MTP block is not converted)", file=sys.stderr)
    return path


# ---- command line ----------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", metavar="HF_DIR",
                   help="a transformers DeepseekV4 directory: config.json and *.safetensors as save_pretrained "
                        "writes them (bf16/f16/f32 weights)")
    p.add_argument("--out", required=True, metavar="FILE.gguf", help="output GGUF path")
    p.add_argument("--type", dest="dtype", choices=TYPE_CHOICES, default="f32",
                   help="block type of the matrices: f32 keeps every value exact (for parity tests against "
                        "transformers); f16, bf16; q8_0 = ds4's mix (Q8_0 projections, F16 HC / compressor / indexer "
                        "/ router / embedding). Norms, sinks, HC scale/base and router bias stay F32 (default: f32)")
    p.add_argument("--experts", choices=EXPERT_CHOICES, default="same",
                   help="block type of the routed experts; same = as --type (default: same)")
    p.add_argument("--tokenizer", metavar="TOKENIZER_JSON", default=None,
                   help="tokenizer.json to embed (default: HF_DIR/tokenizer.json if present, else the built-in demo "
                        "tokenizer); padded with unused tokens up to the config's vocab_size")


def main(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    out_dir = Path(args.out).parent
    if not out_dir.is_dir():
        print(f"error: --out {args.out}: directory {out_dir} does not exist", file=sys.stderr)
        return 1
    try:
        path = convert(args.hf_dir, args.out, dtype=args.dtype, experts=args.experts,
                       tokenizer_json=args.tokenizer, progress=None)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.monotonic() - t0:.1f} s")
    return 0
