"""ModelConfig: every DeepSeek-V4 hyperparameter, read from (and written to) GGUF metadata.

Keys follow antirez/ds4's `deepseek4.*` contract (see docs/ARCHITECTURE.md and ds4's config_validate_model), but
nothing is hard-coded to the Flash shape: every dimension comes from the file, so tiny test models and the real
model go through the same code. `ModelConfig.flash()` and `ModelConfig.tiny()` are the two presets the generator uses.
"""
from __future__ import annotations

import dataclasses
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Mapping

ARCH = "deepseek4"


def _f32(v: float) -> float:
    """The float32 value nearest v (inf beyond float32's range, NaN stays NaN)."""
    v = float(v)
    try:
        return float(struct.unpack("<f", struct.pack("<f", v))[0])
    except OverflowError:
        return math.copysign(math.inf, v)


class ConfigError(ValueError):
    """Missing or inconsistent model metadata. The message names the key, the expected and the found value."""


# (attribute, GGUF key without the "deepseek4." prefix, kind, required). kind: int | float | bool | ints | floats
_KEYS: list[tuple[str, str, str, bool]] = [
    ("n_layer", "block_count", "int", True),
    ("n_ctx_train", "context_length", "int", False),
    ("n_embd", "embedding_length", "int", True),
    ("n_vocab", "vocab_size", "int", True),
    ("n_head", "attention.head_count", "int", True),
    ("n_head_kv", "attention.head_count_kv", "int", True),
    ("head_dim", "attention.key_length", "int", True),
    ("value_dim", "attention.value_length", "int", True),
    ("n_rot", "rope.dimension_count", "int", True),
    ("q_lora_rank", "attention.q_lora_rank", "int", True),
    ("o_lora_rank", "attention.output_lora_rank", "int", True),
    ("o_groups", "attention.output_group_count", "int", True),
    ("n_expert", "expert_count", "int", True),
    ("n_expert_used", "expert_used_count", "int", True),
    ("n_ff_exp", "expert_feed_forward_length", "int", True),
    ("n_expert_shared", "expert_shared_count", "int", True),
    ("n_hash_layer", "hash_layer_count", "int", True),
    ("n_expert_groups", "expert_group_count", "int", False),
    ("n_expert_groups_used", "expert_group_used_count", "int", False),
    ("sliding_window", "attention.sliding_window", "int", True),
    ("indexer_n_head", "attention.indexer.head_count", "int", True),
    ("indexer_head_dim", "attention.indexer.key_length", "int", True),
    ("indexer_top_k", "attention.indexer.top_k", "int", True),
    ("hc_mult", "hyper_connection.count", "int", True),
    ("hc_sinkhorn_iters", "hyper_connection.sinkhorn_iterations", "int", True),
    ("hc_eps", "hyper_connection.epsilon", "float", True),
    ("rope_freq_base", "rope.freq_base", "float", True),
    ("compress_rope_freq_base", "attention.compress_rope_freq_base", "float", True),
    ("rope_scaling_factor", "rope.scaling.factor", "float", False),
    ("rope_orig_ctx", "rope.scaling.original_context_length", "int", False),
    ("yarn_beta_fast", "rope.scaling.yarn_beta_fast", "float", False),
    ("yarn_beta_slow", "rope.scaling.yarn_beta_slow", "float", False),
    ("expert_weights_scale", "expert_weights_scale", "float", True),
    ("expert_weights_norm", "expert_weights_norm", "bool", True),
    ("rms_eps", "attention.layer_norm_rms_epsilon", "float", True),
    ("compress_ratios", "attention.compress_ratios", "ints", True),
    ("swiglu_clamp", "swiglu_clamp_exp", "floats", True),
]

# Accepted ranges, (low, high) inclusive for integers; for floats the low end is open (value > low). The maxima are
# sane bounds 10-1000x above DeepSeek-V4-Flash (43 layers, 4096 wide, 256 experts, 1M context): they keep a corrupt
# or hostile file from asking for absurd work or memory, never a real model out.
_RANGES: dict[str, tuple[Any, Any]] = {
    "n_layer": (1, 1024), "n_ctx_train": (64, 1 << 24), "n_embd": (1, 1 << 16), "n_vocab": (2, 1 << 22),
    "n_head": (1, 1024), "n_head_kv": (1, 1024), "head_dim": (1, 1 << 13), "value_dim": (1, 1 << 13),
    "n_rot": (2, 1 << 13), "q_lora_rank": (1, 1 << 16), "o_lora_rank": (1, 1 << 16), "o_groups": (1, 1024),
    "n_expert": (1, 1 << 12), "n_expert_used": (1, 1 << 12), "n_ff_exp": (1, 1 << 17), "n_expert_shared": (0, 1),
    "n_hash_layer": (0, 1024), "n_expert_groups": (0, 1 << 12), "n_expert_groups_used": (0, 1 << 12),
    "sliding_window": (4, 1 << 20), "indexer_n_head": (0, 1024), "indexer_head_dim": (0, 1 << 13),
    "indexer_top_k": (0, 1 << 16), "hc_mult": (1, 16), "hc_sinkhorn_iters": (1, 1000), "rope_orig_ctx": (0, 1 << 24),
    # floats: (exclusive low, inclusive high)
    "hc_eps": (0.0, 0.1), "rms_eps": (0.0, 0.1), "rope_freq_base": (1.0, 1e10), "compress_rope_freq_base": (1.0, 1e10),
    "rope_scaling_factor": (0.0, 1024.0), "yarn_beta_fast": (0.0, 1e4), "yarn_beta_slow": (0.0, 1e4),
    "expert_weights_scale": (0.0, 1e3),
}
MIN_RATIO, MAX_RATIO = 2, 1 << 16      # compression ratios: 0 (none) or at least 2 tokens per compressed row
MAX_SWIGLU_CLAMP = 1e4
MAX_EXTRA_LAYERS = 16                   # per-layer arrays may carry a few entries past block_count (ds4: the MTP layer)


_KIND_TEXT = {"int": "an integer value", "float": "a number", "bool": "a bool", "ints": "an array of integers",
              "floats": "an array of numbers"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _convert(v: Any, kind: str) -> Any:
    """A GGUF metadata value as the Python type `kind` asks for, or None when its type does not fit (a float for an
    integer key, a string for a number, ...). Range checks come later (validate)."""
    if kind == "int":
        return v if _is_int(v) else None
    if kind == "float":
        return float(v) if _is_int(v) or isinstance(v, float) else None
    if kind == "bool":
        return v if isinstance(v, bool) else (bool(v) if _is_int(v) and v in (0, 1) else None)
    if not isinstance(v, list):
        return None
    if kind == "ints":
        return list(v) if all(_is_int(x) for x in v) else None
    return [float(x) for x in v] if all(_is_int(x) or isinstance(x, float) for x in v) else None


def _range_text(low, high, open_low: bool = False) -> str:
    if high is None:
        return f">= {low}"
    return f"a value in ({low:g}, {high:g}]" if open_low else f"an integer in [{low}, {high}]"


@dataclass
class ModelConfig:
    n_layer: int
    n_embd: int
    n_vocab: int
    n_head: int
    head_dim: int
    n_rot: int
    q_lora_rank: int
    o_lora_rank: int
    o_groups: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_hash_layer: int
    sliding_window: int
    indexer_n_head: int
    indexer_head_dim: int
    indexer_top_k: int
    compress_ratios: list[int]
    swiglu_clamp: list[float]
    n_head_kv: int = 1
    value_dim: int = 0  # 0: same as head_dim (K = V)
    n_expert_shared: int = 1
    n_expert_groups: int = 0
    n_expert_groups_used: int = 0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rope_freq_base: float = 10000.0
    compress_rope_freq_base: float = 160000.0
    rope_scaling_factor: float = 16.0
    rope_orig_ctx: int = 65536
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    expert_weights_scale: float = 1.5
    expert_weights_norm: bool = True
    rms_eps: float = 1e-6
    n_ctx_train: int = 1048576
    name: str = field(default="deepseek-v4", compare=False)

    def __post_init__(self) -> None:
        if not self.value_dim:
            self.value_dim = self.head_dim
        self.compress_ratios = [int(r) for r in self.compress_ratios]
        # GGUF stores these as float32: keep exactly the float32 values so a config survives a write/read unchanged
        for attr, _, kind, _ in _KEYS:
            if kind == "float":
                setattr(self, attr, _f32(getattr(self, attr)))
        self.swiglu_clamp = [_f32(c) for c in self.swiglu_clamp]
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------------------------
    @property
    def nope_dim(self) -> int:
        return self.head_dim - self.n_rot

    @property
    def hc_dim(self) -> int:
        """Width of the flattened hyper-connection state (hc_mult streams of n_embd)."""
        return self.hc_mult * self.n_embd

    @property
    def hc_mix(self) -> int:
        """Rows of the hc_*_fn projection: pre (n) + post (n) + comb (n*n)."""
        return 2 * self.hc_mult + self.hc_mult * self.hc_mult

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def o_group_in(self) -> int:
        """Input width of one output group: the heads of a group concatenated."""
        return self.q_dim // self.o_groups

    def ratio(self, layer: int) -> int:
        return self.compress_ratios[layer]

    def compressor_width(self, layer: int) -> int:
        """coff * head_dim: ratio-4 (CSA) compressors project to two overlapping lanes."""
        r = self.ratio(layer)
        return (2 if r == 4 else 1) * self.head_dim if r else 0

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.n_hash_layer

    def rope_base(self, layer: int) -> float:
        return self.compress_rope_freq_base if self.ratio(layer) else self.rope_freq_base

    def uses_yarn(self, layer: int) -> bool:
        return self.ratio(layer) != 0 and self.rope_orig_ctx > 0 and self.rope_scaling_factor != 1.0

    # ---- validation ----------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Every value in its range (_RANGES: finite, positive where it must be, below sane maxima) and consistent with
        the others; raises ConfigError naming the key, the expected and the found value."""
        def need(cond: bool, key: str, expected: Any, found: Any) -> None:
            if not cond:
                raise ConfigError(f"{ARCH}.{key}: expected {expected}, found {found!r}")

        for attr, key, kind, _ in _KEYS:
            v = getattr(self, attr)
            low, high = _RANGES.get(attr, (None, None))
            if kind == "int":
                need(isinstance(v, int) and not isinstance(v, bool), key, "an integer", v)
                need(v >= (0 if low is None else low) and (high is None or v <= high), key,
                     _range_text(0 if low is None else low, high), v)
            elif kind == "float":
                need(isinstance(v, float) and math.isfinite(v), key, "a finite number", v)
                need(v > low and v <= high, key, _range_text(low, high, open_low=True), v)
        need(self.n_head_kv == 1, "attention.head_count_kv", 1, self.n_head_kv)
        need(self.value_dim == self.head_dim, "attention.value_length",
             f"attention.key_length ({self.head_dim}); K and V share one row", self.value_dim)
        need(0 < self.n_rot <= self.head_dim and self.n_rot % 2 == 0, "rope.dimension_count",
             f"an even number in (0, {self.head_dim}]", self.n_rot)
        need(self.nope_dim % 64 == 0, "attention.key_length",
             f"key_length - rope.dimension_count ({self.n_rot}) a multiple of 64 (FP8 KV blocks)", self.head_dim)
        need(self.q_dim % self.o_groups == 0, "attention.output_group_count",
             f"a divisor of head_count*key_length ({self.q_dim})", self.o_groups)
        need(self.n_expert_used <= self.n_expert, "expert_used_count", f"<= expert_count ({self.n_expert})",
             self.n_expert_used)
        need(self.n_expert_shared in (0, 1), "expert_shared_count", "0 or 1", self.n_expert_shared)
        need(self.n_expert_groups == 0, "expert_group_count", 0, self.n_expert_groups)
        need(self.n_expert_groups_used == 0, "expert_group_used_count", 0, self.n_expert_groups_used)
        need(self.n_hash_layer <= self.n_layer, "hash_layer_count", f"<= block_count ({self.n_layer})",
             self.n_hash_layer)
        need(self.sliding_window <= self.n_ctx_train, "attention.sliding_window",
             f"<= context_length ({self.n_ctx_train})", self.sliding_window)
        need(self.rope_orig_ctx <= self.n_ctx_train, "rope.scaling.original_context_length",
             f"<= context_length ({self.n_ctx_train})", self.rope_orig_ctx)
        need(self.yarn_beta_fast >= self.yarn_beta_slow, "rope.scaling.yarn_beta_fast",
             f">= rope.scaling.yarn_beta_slow ({self.yarn_beta_slow})", self.yarn_beta_fast)
        need(isinstance(self.expert_weights_norm, bool), "expert_weights_norm", "a bool", self.expert_weights_norm)
        need(self.n_layer <= len(self.compress_ratios) <= self.n_layer + MAX_EXTRA_LAYERS, "attention.compress_ratios",
             f"block_count ({self.n_layer}) to block_count + {MAX_EXTRA_LAYERS} entries", len(self.compress_ratios))
        for i, r in enumerate(self.compress_ratios):
            need(isinstance(r, int) and (r == 0 or MIN_RATIO <= r <= MAX_RATIO), f"attention.compress_ratios[{i}]",
                 f"0 (no compression) or an integer in [{MIN_RATIO}, {MAX_RATIO}]", r)
        need(self.n_layer <= len(self.swiglu_clamp) <= self.n_layer + MAX_EXTRA_LAYERS, "swiglu_clamp_exp",
             f"block_count ({self.n_layer}) to block_count + {MAX_EXTRA_LAYERS} entries", len(self.swiglu_clamp))
        for i, c in enumerate(self.swiglu_clamp):
            need(isinstance(c, float) and math.isfinite(c) and 0 < c <= MAX_SWIGLU_CLAMP, f"swiglu_clamp_exp[{i}]",
                 _range_text(0.0, MAX_SWIGLU_CLAMP, open_low=True), c)
        if any(self.ratio(i) == 4 for i in range(self.n_layer)):
            d = self.indexer_head_dim
            need(d >= 32 and d % 32 == 0 and d & (d - 1) == 0, "attention.indexer.key_length",
                 "a power of two, multiple of 32 (Hadamard + FP4 blocks)", d)
            need(d >= self.n_rot, "attention.indexer.key_length", f">= rope.dimension_count ({self.n_rot})", d)
            need(self.indexer_n_head > 0, "attention.indexer.head_count", "> 0", self.indexer_n_head)
            need(self.indexer_top_k > 0, "attention.indexer.top_k", "> 0", self.indexer_top_k)

    # ---- GGUF metadata -------------------------------------------------------------------------------------------
    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> "ModelConfig":
        """Build from a {key: python value} mapping of GGUF metadata (keys with the `deepseek4.` prefix)."""
        arch = meta.get("general.architecture")
        if arch is not None and arch != ARCH:
            raise ConfigError(f"general.architecture: expected {ARCH!r}, found {arch!r}")
        kwargs: dict[str, Any] = {}
        for attr, key, kind, required in _KEYS:
            full = f"{ARCH}.{key}"
            if full not in meta:
                if required:
                    raise ConfigError(f"{full}: expected {_KIND_TEXT[kind]}, found nothing (key missing)")
                continue
            v = meta[full]
            converted = _convert(v, kind)
            if converted is None:
                shown = v if not isinstance(v, (list, str)) or len(v) <= 8 else f"{type(v).__name__} of {len(v)}"
                raise ConfigError(f"{full}: expected {_KIND_TEXT[kind]}, found {shown!r}")
            kwargs[attr] = converted
        name = meta.get("general.name", "deepseek-v4")
        kwargs["name"] = name if isinstance(name, str) else "deepseek-v4"
        return cls(**kwargs)

    def metadata(self) -> dict[str, tuple[str, Any]]:
        """{key: (gguf value kind, value)} for a GGUFWriter. Kinds: u32, f32, bool, u32s, f32s."""
        out: dict[str, tuple[str, Any]] = {}
        for attr, key, kind, _ in _KEYS:
            v = getattr(self, attr)
            gk = {"int": "u32", "float": "f32", "bool": "bool", "ints": "u32s", "floats": "f32s"}[kind]
            if attr == "rope_orig_ctx":
                gk = "u64"  # ds4 reads rope.scaling.original_context_length as a 64-bit integer
            out[f"{ARCH}.{key}"] = (gk, v)
        return out

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---- presets -------------------------------------------------------------------------------------------------
    @classmethod
    def flash(cls, n_layers: int = 43, n_vocab: int = 129280) -> "ModelConfig":
        """The real DeepSeek-V4-Flash shapes; `n_layers` < 43 keeps the first layers (benchmarks on smaller GPUs)."""
        ratios = [0 if i < 2 else (4 if i % 2 == 0 else 128) for i in range(n_layers)] + [0]
        return cls(
            name=f"deepseek-v4-flash-shape-{n_layers}l", n_layer=n_layers, n_embd=4096, n_vocab=n_vocab, n_head=64,
            head_dim=512, n_rot=64, q_lora_rank=1024, o_lora_rank=1024, o_groups=8, n_expert=256, n_expert_used=6,
            n_ff_exp=2048, n_hash_layer=min(3, n_layers), sliding_window=128, indexer_n_head=64,
            indexer_head_dim=128, indexer_top_k=512, compress_ratios=ratios, swiglu_clamp=[10.0] * n_layers)

    @classmethod
    def tiny(cls, n_vocab: int) -> "ModelConfig":
        """A few layers of every kind: window-only, CSA (ratio 4, indexer), HCA (ratio 16), two hash layers.

        Dimensions are the smallest that every block format allows: rows of 256 for the K-quants and IQ2_XXS, nope
        dims a multiple of 64 for FP8 KV blocks, an indexer head of 64 (power of two for the Hadamard transform).
        """
        n_layers = 5
        return cls(
            name="ds4cupy-tiny", n_layer=n_layers, n_embd=256, n_vocab=n_vocab, n_head=4, head_dim=96, n_rot=32,
            q_lora_rank=64, o_lora_rank=64, o_groups=2, n_expert=8, n_expert_used=3, n_ff_exp=256,
            n_hash_layer=2, sliding_window=32, indexer_n_head=4, indexer_head_dim=64, indexer_top_k=6,
            compress_ratios=[0, 4, 16, 4, 16, 0], swiglu_clamp=[10.0] * n_layers, n_ctx_train=65536)
