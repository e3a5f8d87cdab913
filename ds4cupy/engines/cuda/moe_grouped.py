"""The MoE of a prefill chunk as grouped GEMMs on tensor cores: launchers for kernels/moe_grouped.cu.

quant_ops.moe_gate_up / moe_down (kernels/moe.cu) run one (token, expert) pair at a time, so a chunk of S tokens
streams S * k expert matrices; here the pairs are sorted by expert on the device and every expert's tokens go through
one GEMM on the tensor cores (mma.sync), reading each selected expert's weights about once per chunk:

    routing = alloc_routing(max_pairs, n_expert)          # once: fixed device buffers (graph-capturable calls)
    r = route(ids, n_expert, routing)                      # ids int32 [n, k] -> expert-sorted pairs + tile table
    mid = gate_up(gate, up, qtype, x, r, weights, clamp, out=mid)        # float32 [n, k, ff] (moe_gate_up's mid)
    yp = down(down_w, qtype2, mid, r, out=yp)                            # float32 [n * k, D], one row per pair
    y = sum_slots(yp, k, out=y)                                          # y[t] = sum_j yp[t k + j], j in order
    shared expert: gate_up(g, u, qt, x, None, None, clamp, out=mids); down(d, qt, mids, None, out=y, accumulate=True)

No call synchronises with the host or allocates (given out=); results are bit-identical run to run (no float atomics).
An expert id outside [0, n_expert) gives NaN rows, as moe.cu does, and no weight is read for it.
Formats: IQ2_XXS, Q2_K, Q4_K, Q8_0 (GROUPED_TYPES) and Q8_0 repacked into planes (Q8_0R, the engine's default for
Q8_0 tensors); others keep the moe.cu path.

Precision: float32-accurate, like the per-pair float32 kernels up to summation order (~1e-6 relative; the
kernels/moe_grouped.cu header): the mma operands are the blocks' integer codes (exact in fp16) and the activations
split into hi + lo fp16 terms under a power-of-two scale per 32 columns (2^-21 relative; any range, no fp16 overflow);
sub-block scales and mins are applied in float32. tests/test_moe_grouped.py emulates that arithmetic in NumPy
(scripts/emulate_moe_grouped.py: the tiny models' logits move by <= 5.4e-7 of max |logit|).

Switch MOE_GROUPED_PIPE (engines/cuda/switches.py, off by default until it has run on a GPU) launches the
moe_grouped_pipe_* kernels instead: the same tiles and arithmetic (bit-identical results), with the next k-step's
weight bytes and activations loaded while the current one is multiplied, in two shared tiles (dynamic shared memory,
pipe_smem_bytes); gate_up / down take pipe=True / False to pick one regardless of the switch.

PrefillMoE is what CudaSession uses: buffers for its chunk, the per-layer choice, and the routed + shared MoE of a
layer in one call.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from gguf import GGMLQuantizationType as T

from ...format import quants
from . import switches
from .compile import get_kernel
from .q8_0r import Q8_0R
from .quant_ops import _aligned16, _f32, _out, _stream, _weight_geometry

GROUPED_TYPES = {T.IQ2_XXS: "iq2_xxs", T.Q2_K: "q2_k", T.Q4_K: "q4_k", T.Q8_0: "q8_0"}
TILE_TOKENS = 64          # MG_BN: pairs per tile
GATE_UP_ROWS = 128        # ff rows per gate/up CTA (128 gate + 128 up)
DOWN_ROWS = 256           # output rows per down CTA
K_STEP = 32               # MG_BK: columns per k-step (the reduction length must be a multiple)
MAX_EXPERT = 512          # MG_MAX_EXPERT (shared arrays of moe_grouped_route)
# S >= MIN_TOKENS uses the grouped path (CudaSession). Below ~32 tokens a flash chunk has S * k <= 192 pairs over 256
# experts, so the decode kernels read nearly every selected expert once anyway, and they are tuned for that; above it
# experts repeat and the per-pair path reads them again per pair. To be re-measured on the H200
# (scripts/bench_moe_prefill.py --tokens 16,32,64).
MIN_TOKENS = 32
_THREADS = 256


def grouped_supported(qtype) -> bool:
    """True when the grouped kernels decode this block type (GROUPED_TYPES, or Q8_0 repacked: a Q8_0R marker)."""
    if isinstance(qtype, Q8_0R):
        return True
    try:
        return quants.qtype_of(qtype) in GROUPED_TYPES
    except Exception:
        return False


def pipe_smem_bytes(t) -> int:
    """Dynamic shared memory of a moe_grouped_pipe_* kernel: two MgTile<DEC> of kernels/moe_grouped.cu (codes [256,
    40] fp16, activations hi and lo [64, 40] fp16, per sub-block scale (and min) of 256 rows, per token scale (and
    sub-block sums)); the kernel traps when launched with less."""
    sb = 16 if t == T.Q2_K else 32                       # sub-block columns
    nsb = K_STEP // sb
    nsbm = nsb if t in (T.Q2_K, T.Q4_K) else 1           # formats with a min
    tile = 2 * 256 * 40 + 2 * 2 * 64 * 40 + 4 * 256 * (nsb + nsbm) + 4 * 64 * (1 + nsbm)
    return 2 * tile


def _use_pipe(pipe: bool | None) -> bool:
    return switches.enabled("MOE_GROUPED_PIPE") if pipe is None else bool(pipe)


def _gemm_kernel(which: str, t, pipe: bool):
    """(kernel, dynamic shared bytes) of moe_grouped[_pipe]_{which}_{type}; the pipelined ones get the opt-in above
    48 KiB of dynamic shared memory."""
    if not pipe:
        return get_kernel("moe_grouped", f"moe_grouped_{which}_{_suffix(t)}"), 0
    kern = get_kernel("moe_grouped", f"moe_grouped_pipe_{which}_{_suffix(t)}")
    smem = pipe_smem_bytes(t)
    if kern.max_dynamic_shared_size_bytes < smem:
        kern.max_dynamic_shared_size_bytes = smem
    return kern, smem


def _suffix(t) -> str:
    return "q8_0r" if isinstance(t, Q8_0R) else GROUPED_TYPES[t]


def _row_arg(t, rb: int) -> np.int64:
    """The kernels' row_stride argument: bytes between GGUF rows, or the slab rows of a Q8_0R stack."""
    return np.int64(t.slab_rows if isinstance(t, Q8_0R) else rb)


def _gtype(qtype):
    """The GGMLQuantizationType of qtype, or the Q8_0R marker itself; ValueError without grouped kernels."""
    if isinstance(qtype, Q8_0R):
        return qtype
    t = quants.qtype_of(qtype)
    if t not in GROUPED_TYPES:
        raise ValueError(f"no grouped MoE kernels for {t.name} (supported: "
                         f"{', '.join(x.name for x in GROUPED_TYPES)}); use quant_ops.moe_gate_up / moe_down")
    return t


def _reduction_step(t) -> int:
    return K_STEP if isinstance(t, Q8_0R) else max(quants.BLOCK_SIZES[t][0], K_STEP)


def _check_reduction(t, cols: int, what: str) -> None:
    step = _reduction_step(t)
    if cols <= 0 or cols % step:
        raise ValueError(f"{what}: the grouped {t.name} kernels need a length that is a positive multiple of {step}, "
                         f"got {cols}")


def max_tiles(n_pairs: int, n_expert: int) -> int:
    """Tiles of TILE_TOKENS pairs the routing can produce at most: sum over buckets of ceil(count / 64) <=
    n_pairs // 64 + (number of non-empty buckets), buckets = experts + the bad-id bucket."""
    if n_pairs <= 0:
        return 0
    return n_pairs // TILE_TOKENS + min(n_expert + 1, n_pairs)


# ---- routing ---------------------------------------------------------------------------------------------------------
class Routing(NamedTuple):
    """Device buffers of the routing, sized for max_pairs pairs and n_expert experts (alloc_routing)."""
    offsets: object     # int32 [n_expert + 2]
    sorted: object      # int32 [max_pairs]
    tiles: object       # int32 [max_tiles(max_pairs, n_expert), 3]
    n_tiles: object     # int32 [1]
    max_pairs: int
    n_expert: int


class Routed(NamedTuple):
    """The result of route(): which buffers, for how many tokens and slots."""
    routing: Routing
    n_tokens: int
    k: int

    @property
    def n_pairs(self) -> int:
        return self.n_tokens * self.k

    @property
    def grid_tiles(self) -> int:
        return max_tiles(self.n_pairs, self.routing.n_expert)


def alloc_routing(max_pairs: int, n_expert: int, alloc=None) -> Routing:
    """Routing buffers for up to max_pairs pairs. alloc(shape, dtype) -> device array (default cupy.empty; the engine
    passes its memory arena)."""
    if max_pairs <= 0:
        raise ValueError(f"max_pairs must be positive, got {max_pairs}")
    if not 0 < n_expert <= MAX_EXPERT:
        raise ValueError(f"the grouped MoE routing takes 1..{MAX_EXPERT} experts, got n_expert={n_expert}")
    if alloc is None:
        import cupy
        alloc = cupy.empty
    mt = max_tiles(max_pairs, n_expert)
    return Routing(alloc((n_expert + 2,), np.int32), alloc((max_pairs,), np.int32), alloc((mt, 3), np.int32),
                   alloc((1,), np.int32), int(max_pairs), int(n_expert))


def route(ids, n_expert: int, routing: Routing, stream=None) -> Routed:
    """Sort the pairs p = t * k + j of ids (int32 [n, k] on the device) by expert: a stable counting sort into
    routing.sorted, bucket starts into routing.offsets (bucket n_expert: ids outside [0, n_expert)), the tile table
    and its length into routing.tiles / routing.n_tiles. One launch, no host sync."""
    import cupy
    if not isinstance(ids, cupy.ndarray) or ids.dtype != np.int32 or ids.ndim != 2 or not ids.flags.c_contiguous:
        raise ValueError(f"ids must be a C-contiguous cupy int32 array [n, k], got "
                         f"{getattr(ids, 'dtype', type(ids).__name__)} {getattr(ids, 'shape', '')}")
    n, k = (int(s) for s in ids.shape)
    if n * k == 0:
        raise ValueError(f"ids must hold at least one pair, got shape {ids.shape}")
    if n_expert != routing.n_expert:
        raise ValueError(f"the routing buffers are for {routing.n_expert} experts, got n_expert={n_expert}")
    if n * k > routing.max_pairs:
        raise ValueError(f"{n} tokens x {k} experts = {n * k} pairs exceed the routing buffers ({routing.max_pairs})")
    with _stream(stream):
        get_kernel("moe_grouped", "moe_grouped_route")(
            (1,), (512,), (ids, np.int32(n * k), np.int32(n_expert), np.int32(TILE_TOKENS), routing.offsets,
                           routing.sorted, routing.tiles, routing.n_tiles))
    return Routed(routing, n, k)


# ---- GEMMs -----------------------------------------------------------------------------------------------------------
def _stack(w, t, cols: int, what: str, shared: bool):
    """(n_expert, rows, row_stride) of an expert stack [E, rows, row_bytes] (routed) or a matrix [rows, row_bytes]."""
    if shared:
        if getattr(w, "ndim", 0) != 2:
            raise ValueError(f"{what}: the shared expert (routed=None) is a matrix [rows, row_bytes], got shape "
                             f"{getattr(w, 'shape', None)}")
        rb = _weight_geometry(w, t, cols, 2, what)
        return 1, int(w.shape[0]), rb
    rb = _weight_geometry(w, t, cols, 3, what)
    return int(w.shape[0]), int(w.shape[1]), rb


def _grid_y(routed: Routed | None, n: int) -> int:
    g = routed.grid_tiles if routed is not None else -(-n // TILE_TOKENS)
    if g > 65535:
        raise ValueError(f"{g} token tiles exceed one launch (65535); split the chunk")
    return g


def _tile_args(routed: Routed | None):
    null = np.uint64(0)
    if routed is None:
        return null, null, null
    r = routed.routing
    return r.tiles, r.n_tiles, r.sorted


def gate_up(gate, up, qtype, x, routed: Routed | None = None, weights=None, clamp: float = 10.0, out=None,
            stream=None, pipe: bool | None = None):
    """mid[n, k, ff] = silu(min(gate_e . x_t, c)) * clamp(up_e . x_t, -c, c) * w[t, j] for every pair of `routed`
    (route()'s result for ids [n, k]); moe_gate_up's result to float32 summation level. routed=None: the shared expert
    (gate, up: [ff, row_bytes], every token, weight 1, mid [n, 1, ff]). x: float32 [n, D]; weights: float32 [n, k].
    pipe: the pipelined kernels (True), the plain ones (False), or switch MOE_GROUPED_PIPE (None)."""
    t = _gtype(qtype)
    x = _aligned16(_f32(x, "x"), "x")
    if x.ndim != 2:
        raise ValueError(f"x must be [n, D], got shape {x.shape}")
    n, cols = x.shape
    _check_reduction(t, cols, "x")
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {gate.shape} and {up.shape}")
    shared = routed is None
    n_expert, ff, rb = _stack(gate, t, cols, "gate", shared)
    _stack(up, t, cols, "up", shared)
    if shared:
        if weights is not None:
            raise ValueError("weights without routing: the shared expert has weight 1")
        k, n_pairs = 1, n
    else:
        if routed.n_tokens != n:
            raise ValueError(f"the routing is for {routed.n_tokens} tokens, x has {n}")
        if n_expert != routed.routing.n_expert:
            raise ValueError(f"the routing is for {routed.routing.n_expert} experts, the stack has {n_expert}")
        k, n_pairs = routed.k, routed.n_pairs
        if weights is None:
            raise ValueError("routed experts need weights float32 [n, k]")
        _f32(weights, "weights", (n, k))
    mid = _out(out, (n, k, ff), "out")
    kern, smem = _gemm_kernel("gate_up", t, _use_pipe(pipe))
    tiles, n_tiles, sorted_ = _tile_args(routed)
    with _stream(stream):
        kern((-(-ff // GATE_UP_ROWS), _grid_y(routed, n)), (_THREADS,),
             (gate, up, np.int64(ff * rb), _row_arg(t, rb), tiles, n_tiles, sorted_,
              weights if weights is not None else np.uint64(0), np.int32(k), np.int32(n_expert), np.int32(n_pairs),
              x, np.int32(cols), mid, np.int32(ff), np.float32(clamp)), shared_mem=smem)
    return mid


def down(down_w, qtype, mid, routed: Routed | None = None, out=None, accumulate: bool = False, stream=None,
         pipe: bool | None = None):
    """Routed: yp[p, D] = down_e . mid[p] for every pair p = t * k + j (float32 [n * k, D]; sum_slots adds a
    token's k rows). routed=None: the shared expert, down_w [D, row_bytes], mid [n, 1, ff] (or [n, ff]):
    out[t] (+)= down . mid[t] (accumulate=True adds onto out, which must be given). pipe: as gate_up."""
    t = _gtype(qtype)
    mid = _aligned16(_f32(mid, "mid"), "mid")
    if mid.ndim not in (2, 3):
        raise ValueError(f"mid must be [n, k, ff] or [n, ff], got shape {mid.shape}")
    ff = int(mid.shape[-1])
    _check_reduction(t, ff, "mid")
    shared = routed is None
    n_expert, D, rb = _stack(down_w, t, ff, "down", shared)
    if shared:
        n_pairs = int(np.prod(mid.shape[:-1]))
        if mid.ndim == 3 and mid.shape[1] != 1:
            raise ValueError(f"the shared expert's mid must hold one row per token, got shape {mid.shape}")
    else:
        n_pairs = routed.n_pairs
        if int(np.prod(mid.shape[:-1])) != n_pairs:
            raise ValueError(f"mid must hold {routed.n_tokens} x {routed.k} rows (the routing's pairs), got shape "
                             f"{mid.shape}")
        if n_expert != routed.routing.n_expert:
            raise ValueError(f"the routing is for {routed.routing.n_expert} experts, the stack has {n_expert}")
        if accumulate:
            raise ValueError("accumulate=True is for the shared expert; routed pairs write one row each (sum_slots)")
    if accumulate and out is None:
        raise ValueError("accumulate=True needs out= (the array to add into)")
    y = _out(out, (n_pairs, D), "out")
    kern, smem = _gemm_kernel("down", t, _use_pipe(pipe))
    tiles, n_tiles, sorted_ = _tile_args(routed)
    with _stream(stream):
        kern((-(-D // DOWN_ROWS), _grid_y(routed, n_pairs)), (_THREADS,),
             (down_w, np.int64(D * rb), _row_arg(t, rb), tiles, n_tiles, sorted_, np.int32(n_expert),
              np.int32(n_pairs), mid, np.int32(ff), y, np.int32(D), np.int32(1 if accumulate else 0)),
             shared_mem=smem)
    return y


def sum_slots(yp, k: int, out=None, stream=None):
    """y[t, :] = yp[t k, :] + yp[t k + 1, :] + ... + yp[t k + k - 1, :], added in that order (float32 [n, D])."""
    yp = _aligned16(_f32(yp, "yp"), "yp")
    if yp.ndim != 2 or k <= 0 or yp.shape[0] % k or yp.shape[1] % 4:
        raise ValueError(f"yp must be [n * k, D] with k={k} dividing its rows and D a multiple of 4, got shape "
                         f"{yp.shape}")
    n, D = yp.shape[0] // k, int(yp.shape[1])
    y = _aligned16(_out(out, (n, D), "out"), "out")
    total = n * (D // 4)
    with _stream(stream):
        get_kernel("moe_grouped", "moe_grouped_sum")((max(1, min(-(-total // _THREADS), 8192)),), (_THREADS,),
                                                     (yp, np.int32(k), y, np.int32(n), np.int32(D)))
    return y


# ---- the engine's use ------------------------------------------------------------------------------------------------
def enabled_by_env() -> bool:
    """Switch MOE_GROUPED (engines/cuda/switches.py: DS4CUPY_MOE_GROUPED=1 / 0; off by default until it has run on a
    GPU)."""
    return switches.enabled("MOE_GROUPED")


class PrefillMoE:
    """CudaSession's grouped MoE: routing buffers and the per-pair output rows for chunks of up to max_tokens tokens,
    which layers can use it (block types), and one layer's routed + shared experts.

    Layer il uses it when its routed gate/up/down types are GROUPED_TYPES (or Q8_0R) with reduction lengths that are
    whole k-steps; the shared expert goes through the grouped kernels when its types are supported too, else through
    moe.cu. Every grouped format is float32-accurate (no fp16 operand path remains), so there is no range condition
    and `vectors` (the layer vectors, kept for CudaSession's call) is not read."""

    def __init__(self, config, qtypes: dict, vectors: dict, max_tokens: int, alloc=None):
        import cupy
        c = config
        self.config = c
        self.max_tokens = int(max_tokens)
        self.routed_ok, self.shared_ok = [], []
        on = enabled_by_env() and self.max_tokens >= MIN_TOKENS and 0 < c.n_expert <= MAX_EXPERT
        for il in range(c.n_layer):
            p = f"blk.{il}."
            ok = on and self._fits(qtypes, p + "ffn_{}_exps.weight")
            self.routed_ok.append(ok)
            self.shared_ok.append(ok and c.n_expert_shared > 0 and self._fits(qtypes, p + "ffn_{}_shexp.weight"))
        self.routing = self.yp = None
        if any(self.routed_ok):
            alloc = alloc or cupy.empty
            pairs = self.max_tokens * c.n_expert_used
            self.routing = alloc_routing(pairs, c.n_expert, alloc)
            self.yp = alloc((pairs * c.n_embd,), np.float32)

    def _fits(self, qtypes: dict, pattern: str) -> bool:
        """Block types with grouped kernels, and reduction lengths (n_embd for gate/up, n_ff_exp for down) that are
        whole k-steps of them."""
        c = self.config
        for s, cols in (("gate", c.n_embd), ("up", c.n_embd), ("down", c.n_ff_exp)):
            qt = qtypes.get(pattern.format(s))
            if qt is None or not grouped_supported(qt) or cols % _reduction_step(_gtype(qt)):
                return False
        return True

    def use(self, il: int, S: int) -> bool:
        return S >= MIN_TOKENS and self.routed_ok[il]

    def run(self, w: dict, qtypes: dict, il: int, xn, eids, ew, mid, mids, y):
        """y[S, D] = the layer's MoE of xn[S, D] for router output eids / ew [S, k] (device). mid [S, k, ff] and
        mids [S, 1, ff] are the caller's scratch; the shared expert (if any) is added onto the routed sum."""
        c = self.config
        p = f"blk.{il}."
        S, k, D = xn.shape[0], c.n_expert_used, c.n_embd
        r = route(eids, c.n_expert, self.routing)
        gq = qtypes[p + "ffn_gate_exps.weight"]
        gate_up(w[p + "ffn_gate_exps.weight"], w[p + "ffn_up_exps.weight"], gq, xn, r, ew, c.swiglu_clamp[il],
                out=mid)
        yp = self.yp[: S * k * D].reshape(S * k, D)
        down(w[p + "ffn_down_exps.weight"], qtypes[p + "ffn_down_exps.weight"], mid, r, out=yp)
        sum_slots(yp, k, out=y)
        if c.n_expert_shared:
            from . import quant_ops as qo
            sg, su, sd = (p + f"ffn_{s}_shexp.weight" for s in ("gate", "up", "down"))
            if self.shared_ok[il]:
                gate_up(w[sg], w[su], qtypes[sg], xn, None, None, c.swiglu_clamp[il], out=mids)
                down(w[sd], qtypes[sd], mids, None, out=y, accumulate=True)
            else:
                qo.moe_gate_up(w[sg], w[su], qtypes[sg], xn, clamp=c.swiglu_clamp[il], out=mids)
                qo.moe_down(w[sd], qtypes[sd], mids, out=y, accumulate=True)
        return y


__all__ = ["GROUPED_TYPES", "TILE_TOKENS", "MIN_TOKENS", "MAX_EXPERT", "K_STEP", "grouped_supported", "max_tiles",
           "Routing", "Routed", "alloc_routing", "route", "gate_up", "down", "sum_slots", "enabled_by_env",
           "pipe_smem_bytes",
           "PrefillMoE"]
