"""Python launchers for the non-quantized kernel families (norm_rope, hc, attention, compressor, indexer, router,
embed). Each function takes CuPy arrays that already live on the device (float32 activations, int32 ids), writes into
the output arrays it is given (nothing is allocated here unless the docstring says so) and launches on the current
CuPy stream. No function synchronises with the host, so a decode step built from them can be captured as a CUDA
graph. Per-token values (position, token ids, expert ids) are device arrays: `d_pos` is an int32 device array whose
element 0 is the position of the first row of the call.

Kernel semantics, shapes and the reference function each matches are in the header comments of
ds4cupy/kernels/<family>.cu. CuPy is imported lazily (this module imports on CPU-only machines).
"""
from __future__ import annotations

import numpy as np

from ..numerics import fp4_row_bytes
from .compile import get_kernel, sm_count

# dtype codes shared with the kernels (common.cuh load_w, embed.cu)
DT_F32, DT_F16, DT_BF16, DT_Q8_0 = 0, 1, 2, 8
_DT_BY_NAME = {"F32": DT_F32, "F16": DT_F16, "BF16": DT_BF16, "Q8_0": DT_Q8_0}

# qat modes of row_finish (common.cuh)
QAT_NONE, QAT_FP8, QAT_HADAMARD_FP4 = 0, 1, 2

NULL = np.uint64(0)


def dtype_code(qtype) -> int:
    """Kernel dtype code for a GGUF type (GGMLQuantizationType or its name)."""
    name = getattr(qtype, "name", str(qtype))
    if name not in _DT_BY_NAME:
        raise ValueError(f"no plain kernel path for tensor type {name} (F32, F16, BF16, Q8_0 only)")
    return _DT_BY_NAME[name]


def _p(a):
    return NULL if a is None else a


def _i32(v):
    return np.int32(v)


def _i64(v):
    return np.int64(v)


def _f32(v):
    return np.float32(v)


def _check(a, dtype, name):
    import cupy
    if not isinstance(a, cupy.ndarray):
        raise TypeError(f"{name} must be a cupy.ndarray, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{name} must be {np.dtype(dtype).name}, got {a.dtype}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")


# ---- norm_rope.cu ----------------------------------------------------------------------------------------------------
def rms_norm_rows(x, w, out, eps: float = 1e-6) -> None:
    """out[r] = rms_norm(x[r], w) over the last axis (w None: no weight). x, out: [rows, n] (out may be x)."""
    n = x.shape[-1]
    rows = x.size // n
    get_kernel("norm_rope", "rms_norm_rows")((rows,), (256,), (x, _i64(n), _p(w), out, _i64(n), _i32(n), _f32(eps)))


def rms_norm_qkv(xq, wq, qr, xkv, wkv, kv, freqs, d_pos, n_rot: int, qat: bool, eps: float = 1e-6) -> None:
    """qr = rms_norm(xq, wq); kv = fp8_nope(rope(rms_norm(xkv, wkv), pos)) (fp8 only when qat). Rows [S, .]; xq / xkv
    may be strided row views of one buffer (row stride taken from the arrays)."""
    S, nq = qr.shape
    nkv = kv.shape[1]
    xqs = xq.strides[0] // 4
    xkvs = xkv.strides[0] // 4
    get_kernel("norm_rope", "rms_norm_qkv")(
        (S, 2), (256,),
        (xq, _i64(xqs), wq, qr, _i32(nq), xkv, _i64(xkvs), wkv, kv, _i32(nkv), _i32(n_rot), freqs, d_pos,
         _i32(1 if qat else 0), _f32(eps)), shared_mem=4 * max(nq, nkv))


def heads_prep(x, norm: bool, n_rot: int, freqs, d_pos, qat: int, eps: float = 1e-6) -> None:
    """In place on x [S, H, d]: optional weightless per-head RMS, rope (freqs None: none) at d_pos[0] + t, qat mode."""
    S, H, d = x.shape
    get_kernel("norm_rope", "heads_prep")(
        (S * H,), (128,), (x, _i32(H), _i32(d), _i32(1 if norm else 0), _i32(n_rot), _p(freqs), d_pos, _i32(qat),
                           _f32(eps)), shared_mem=12 * d)


def rope_rows(x, n_rot: int, freqs, d_pos, inverse: bool = False) -> None:
    """numerics.rope_apply in place on x [S, per_tok, d] (or [S, d]) at positions d_pos[0] + s."""
    if x.ndim == 2:
        S, per, d = x.shape[0], 1, x.shape[1]
    else:
        S, per, d = x.shape
    get_kernel("norm_rope", "rope_rows")((S * per,), (64,), (x, _i32(per), _i32(d), _i32(n_rot), freqs, d_pos,
                                                             _i32(1 if inverse else 0)))


def qat_rows(x, mode: int, nq: int = 0) -> None:
    """In place on x [rows, d]: mode 1 fp8_sim(x[:, :nq], 64); 2 fp4_sim(hadamard(x), 32); 3 fp4_sim(x, 32)."""
    d = x.shape[-1]
    rows = x.size // d
    get_kernel("norm_rope", "qat_rows")((rows,), (128,), (x, _i32(d), _i32(nq), _i32(mode)), shared_mem=12 * d)


# ---- hc.cu -----------------------------------------------------------------------------------------------------------
def hc_nsplit(K: int, T: int) -> int:
    """Split-K factor for hc_mix: for decode enough blocks to spread the weight read over many SMs (one split per 256
    inputs, at most 64), for prefill a few splits per token."""
    return max(1, min(64, K // 256)) if T < 64 else max(1, min(4, K // 1024))


def hc_mix(X, fn, fn_dtype: int, rows: int, part, nsplit: int) -> None:
    """part[t, s, :rows] = split-K partial fn @ X[t]; part[t, s, rows] = partial sum of squares.
    X: [T, n, D] float32, fn: raw [rows, n*D] F32/F16/BF16, part: [T, nsplit, rows+1] float32."""
    T = X.shape[0]
    K = X.size // T
    if rows > 32:
        raise ValueError("hc_mix supports at most 32 mix rows")
    get_kernel("hc", "hc_mix")((nsplit, T), (256,), (X, _i64(K), fn, _i32(fn_dtype), _i32(rows), _i32(nsplit), part))


def hc_split_collapse(X, part, nsplit: int, rows: int, scale, base, iters: int, eps_hc: float, eps_rms: float,
                      head: bool, u, coef, norm_w=None, xn=None) -> None:
    """hc_pre (head=False: Sinkhorn split, coef [T, n + n*n] = post, comb) or hc_head (head=True) collapse into
    u [T, D]. With xn [T, D] also xn = rms_norm(u, norm_w) (eps_rms) in the same launch, bit-identical to
    rms_norm_rows."""
    T, n, D = X.shape
    if n * n > 32:
        raise ValueError(f"hc_split_collapse supports at most 5 hyper-connection streams, got {n}")
    # spread the decode collapse over a few SMs, unless the fused norm needs the whole row in one block
    nblk = max(1, min(8, (D + 1023) // 1024)) if T < 64 and xn is None else 1
    get_kernel("hc", "hc_split_collapse")(
        (nblk, T), (256,), (X, part, _i32(n), _i32(D), _i32(rows), _i32(nsplit), scale, base, _i32(iters), _f32(eps_hc),
                       _f32(eps_rms), _i32(1 if head else 0), u, _p(coef), _p(norm_w), _p(xn)))


HC_STEP_TILE = 4096     # hc.cu: elements (n streams x cd columns) one hc_step block stages


def hc_step_nsplit(n: int, D: int, T: int) -> int:
    """hc_step's blocks per token: hc_nsplit's, or more where a block's n x ceil(D / nsplit) columns would not fit
    its shared tile."""
    ns = hc_nsplit(n * D, T)
    while n * -(-D // ns) > HC_STEP_TILE:
        ns += 1
    return ns


HC_TAIL_V = 5           # hc.cu: float4 column groups per stream a tail thread holds (hc_step_n4_*)


def hc_step_kernel(n: int, D: int, rows: int, fn_dtype: int, arrays=()) -> str:
    """hc_step's kernel for this shape: the specialised hc_step_n4_r{24,4}_f16 (4 streams, the mix or the head, F16 fn,
    D a multiple of 4 that its vectorised tail covers, 16-byte aligned arrays), else the general hc_step."""
    if (n == 4 and fn_dtype == DT_F16 and rows in (24, 4) and D % 4 == 0 and D <= 4 * HC_TAIL_V * (256 - 32)
            and all(a is None or a.data.ptr % 16 == 0 for a in arrays)):
        return f"hc_step_n4_r{rows}_f16"
    return "hc_step"


def hc_step(X, y, coef_in, fn, fn_dtype: int, rows: int, part, nsplit: int, counter, scale, base, iters: int,
            eps_hc: float, eps_rms: float, head: bool, u, coef_out, norm_w, xn, sk=None) -> None:
    """One launch for hc_post(X, y, coef_in) (skipped when y is None) + hc_mix + hc_split_collapse with the fused
    block norm (xn = rms_norm(u, norm_w)); head=True is the output head's collapse (coef_out unused).
    X [T, n, D] (updated in place by the post), part [T, nsplit, rows + 1] with nsplit from hc_step_nsplit,
    counter uint32 [>= T] zeroed once when allocated (every launch leaves it zero).
    sk float64 [>= T * (rows + 2)] (head=False only): the Sinkhorn is deferred, coef_out gets post only and sk the
    Sinkhorn's inputs; hc_sinkhorn_deferred(sk, ...) then writes comb (switch HC_SIDE_SINKHORN)."""
    T, n, D = X.shape
    if rows > 32 or n * n > 32:
        raise ValueError(f"hc_step supports at most 32 mix rows and 5 streams, got rows={rows}, n={n}")
    if n * -(-D // nsplit) > HC_STEP_TILE:
        raise ValueError(f"hc_step: nsplit={nsplit} leaves {n * -(-D // nsplit)} elements a block (max "
                         f"{HC_STEP_TILE}); use hc_step_nsplit")
    _check(counter, "uint32", "counter")
    if counter.size < T:
        raise ValueError(f"hc_step: counter holds {counter.size} entries for {T} tokens")
    if sk is not None:
        _check(sk, "float64", "sk")
        if head or sk.size < T * (rows + 2):
            raise ValueError(f"hc_step: sk needs head=False and {T * (rows + 2)} doubles, got head={head}, {sk.size}")
    get_kernel("hc", hc_step_kernel(n, D, rows, fn_dtype, (X, u, xn, norm_w)))(
        (nsplit, T), (256,), (X, _p(y), _p(coef_in), _i32(n), _i32(D), fn, _i32(fn_dtype), _i32(rows), _i32(nsplit),
                              part, counter, scale, base, _i32(iters), _f32(eps_hc), _f32(eps_rms),
                              _i32(1 if head else 0), u, _p(coef_out), _p(norm_w), xn, _p(sk)))


def hc_sinkhorn_deferred(sk, rows: int, n: int, scale, base, iters: int, eps_hc: float, coef, T: int) -> None:
    """The Sinkhorn an hc_step launched with sk left out: coef[t, n:] = comb from sk [T, rows + 2] (float64),
    bit-identical to hc_step's own. coef [T, n + n*n] float32 (its post part written by that hc_step)."""
    _check(sk, "float64", "sk")
    if n * n > 32 or sk.size < T * (rows + 2) or coef.size < T * (n + n * n):
        raise ValueError(f"hc_sinkhorn_deferred: n={n}, sk {sk.size} / coef {coef.size} values for {T} tokens")
    get_kernel("hc", "hc_sinkhorn_deferred")((T,), (32,), (sk, _i32(rows), _i32(n), scale, base, _i32(iters),
                                                         _f32(eps_hc), coef, _i32(T)))


def hc_post(X, y, coef) -> None:
    """In place: X[t, k] = post[k] * y[t] + sum_j comb[j, k] X[t, j]. X [T, n, D], y [T, D], coef [T, n + n*n]."""
    T, n, D = X.shape
    get_kernel("hc", "hc_post")(((D + 255) // 256, T), (256,), (X, y, coef, _i32(n), _i32(D)))


# ---- embed.cu --------------------------------------------------------------------------------------------------------
def embed_hc(ids, table, dtype: int, X) -> None:
    """X[t, :, :] = token_embd[ids[t]] for every stream. ids int32 [T] (device), table: raw rows [V, row_bytes]
    (uint8) or an F32/F16/BF16 element array [V, D]; X [T, n, D]."""
    T, n, D = X.shape
    row_bytes = table.nbytes // table.shape[0]
    get_kernel("embed", "embed_hc")(((D + 255) // 256, T), (256,), (ids, table, _i32(dtype), _i64(row_bytes), _i32(D),
                                                                    _i32(n), X))


# ---- router.cu -------------------------------------------------------------------------------------------------------
def router_select(logits, bias, tid2eid, ids, k: int, norm: bool, scale: float, out_ids, out_w) -> None:
    """Expert ids / weights per token into device arrays out_ids int32 [T, k], out_w float32 [T, k]."""
    T, E = logits.shape
    if E > 2048 or k > 64:
        raise ValueError("router_select supports at most 2048 experts and 64 picks")
    get_kernel("router", "router_select")((T,), (256,), (logits, _p(bias), _p(tid2eid), ids, _i32(E), _i32(k),
                                                         _i32(1 if norm else 0), _f32(scale), out_ids, out_w))


# ---- attention.cu ----------------------------------------------------------------------------------------------------
def attention(q, ring, cur, comp, idx, d_pos, window: int, ratio: int, mode: int, sinks, n_rot: int, freqs,
              part_ml, part_o, out, nsplit: int = 1, rows_per_split: int | None = None) -> None:
    """Sparse attention with sinks + inverse rope (attention.cu). q [S, H, d]; ring [W, d]; cur [S, d]; comp [N, d]
    or None; idx int32 [S, K] or None; mode 0 window only, 1 dense compressed, 2 indexed. part_ml [S, H, nsplit, 2],
    part_o [S, H, nsplit, d] scratch; out [S, H, d]. Split s takes key-list entries [s*rows_per_split, ...);
    nsplit * rows_per_split must cover the longest key list of any position (attention_rows): by default the rows
    are divided evenly over nsplit splits for the key lists of this call's positions up to len(ring) + len(comp)."""
    S, H, d = q.shape
    if d % 32 or d > 512:
        raise ValueError(f"head_dim {d} must be a multiple of 32 and <= 512")
    hpb = 8 if H % 8 == 0 else (4 if H % 4 == 0 else 1)
    check_combine_splits("attention", d, nsplit)
    K = idx.shape[1] if idx is not None else 0
    if rows_per_split is None:
        longest = ring.shape[0] + (K if mode == 2 else (comp.shape[0] if mode == 1 else 0))
        rows_per_split = -(-longest // nsplit)
    get_kernel("attention", "attn_partial")(
        ((H + hpb - 1) // hpb, nsplit, S), (hpb * 32,),
        (q, ring, cur, _p(comp), _p(idx), _i32(K), d_pos, _i32(H), _i32(d), _i32(window), _i32(ratio), _i32(mode),
         _f32(d ** -0.5), _i32(rows_per_split), part_ml, part_o))
    attention_combine(part_ml, part_o, sinks, n_rot, freqs, d_pos, window, ratio, mode, K, nsplit, rows_per_split, out)


def check_combine_splits(op: str, d: int, nsplit: int) -> None:
    """attn_combine keeps d outputs and one weight per split in 48 KiB of shared memory."""
    if 4 * (d + nsplit) > 48 * 1024:
        raise ValueError(f"{op}: {nsplit} splits of the key list do not fit attn_combine's shared memory "
                         f"(at most {12 * 1024 - d}); use more rows per split")


def attention_combine(part_ml, part_o, sinks, n_rot: int, freqs, d_pos, window: int, ratio: int, mode: int, K: int,
                      nsplit: int, rows_per_split: int, out) -> None:
    """attn_combine: out [S, H, d] from the nsplit splits' partials part_ml [S, H, nsplit, 2] / part_o [S, H, nsplit, d]
    (attn_partial's layout, written by attention.cu's or attention_decode_mma.cu's partial kernel), the sinks and
    the inverse rope."""
    S, H, d = out.shape
    get_kernel("attention", "attn_combine")(
        (H, S), (256,), (part_ml, part_o, sinks, _i32(H), _i32(d), _i32(nsplit), _i32(n_rot), freqs, d_pos,
                         _i32(window), _i32(ratio), _i32(mode), _i32(K), _i32(rows_per_split), out),
        shared_mem=4 * (d + nsplit))


def attention_rows(window: int, ratio: int, mode: int, top_k: int, ctx: int) -> int:
    """The longest key list any position < ctx can have: window rows plus compressed rows (all visible ones for
    mode 1, the top-k for mode 2)."""
    return window + (ctx // ratio if mode == 1 else (top_k if mode == 2 else 0))


def kv_ring_store(cur, ring, d_pos) -> None:
    """ring[p % W] = cur[t] for the last min(S, W) rows (p = d_pos[0] + t)."""
    S, d = cur.shape
    W = ring.shape[0]
    get_kernel("attention", "kv_ring_store")((min(S, W),), (128,), (cur, ring, d_pos, _i32(S), _i32(W), _i32(d)))


# ---- compressor.cu ---------------------------------------------------------------------------------------------------
def compressor_step(C, Z, ape, st_kv, st_sc, d_pos, ratio: int, norm_w, n_rot: int, freqs, qat: int, out,
                    eps: float = 1e-6) -> None:
    """Feed S tokens to a compressor: emit every row whose window closes in this call into out[w] (then rms_norm,
    rope at w*ratio, qat), then store the tokens' rows in the state ring. C, Z [S, cw]; ape [ratio, cw]; st_kv, st_sc
    [lanes*ratio, cw]; out [Ncap, hd]."""
    S, cw = C.shape
    overlap = ratio == 4
    lanes = 2 if overlap else 1
    hd = cw // lanes
    get_kernel("compressor", "compressor_emit")(
        (S // ratio + 2,), (256,),
        (C, Z, ape, st_kv, st_sc, d_pos, _i32(S), _i32(ratio), _i32(hd), _i32(1 if overlap else 0), norm_w,
         _f32(eps), _i32(n_rot), freqs, _i32(qat), out), shared_mem=12 * hd)
    get_kernel("compressor", "compressor_store")(
        (min(S, lanes * ratio),), (256,), (C, Z, ape, st_kv, st_sc, d_pos, _i32(S), _i32(ratio), _i32(cw),
                                           _i32(lanes)))


def compressor_step_fp4(C, Z, ape, st_kv, st_sc, d_pos, norm_w, n_rot: int, freqs, out, eps: float = 1e-6) -> None:
    """compressor_step for the indexer compressor with QAT (ratio 4, overlap, Hadamard + fp4_sim) storing each emitted
    row packed (switch INDEXER_FP4): out uint8 [Ncap, numerics.fp4_row_bytes(hd)], row w = numerics.fp4_pack of the
    float row compressor_step would write (compressor.cu compressor_emit_fp4)."""
    S, cw = C.shape
    hd = cw // 2
    if hd % 32:
        raise ValueError(f"compressor_step_fp4: row width {hd} must be a multiple of 32")
    _check(out, "uint8", "out")
    if out.ndim != 2 or out.shape[1] != fp4_row_bytes(hd):
        raise ValueError(f"compressor_step_fp4: out must be uint8 [rows, {fp4_row_bytes(hd)}], got {out.shape}")
    get_kernel("compressor", "compressor_emit_fp4")(
        (S // 4 + 2,), (256,),
        (C, Z, ape, st_kv, st_sc, d_pos, _i32(S), _i32(4), _i32(hd), _i32(1), norm_w, _f32(eps), _i32(n_rot), freqs,
         out), shared_mem=12 * hd)
    get_kernel("compressor", "compressor_store")(
        (min(S, 8),), (256,), (C, Z, ape, st_kv, st_sc, d_pos, _i32(S), _i32(4), _i32(cw), _i32(2)))


# ---- indexer.cu ------------------------------------------------------------------------------------------------------
def indexer_scores(q, wts, k, d_pos, ratio: int, scores, nblk: int) -> None:
    """scores[t, s] = sum_h wts[t,h] c^-1/2 HI^-1/2 relu(q[t,h] . k[s]) for s < (P+1)//ratio. q [S, HI, c],
    wts [S, HI], k [N, c], scores [S, stride]. `nblk` blocks per query share the row tiles of 32 (indexer.cu); size it
    from the session's ctx (indexer_blocks), never from the position, so a captured decode graph serves any depth."""
    S, HI, c = q.shape
    if HI > 64 or c > 128 or c % 32:
        raise ValueError(f"indexer_scores takes HI <= 64 heads of c <= 128 dims with c % 32 == 0, got HI={HI}, c={c}")
    get_kernel("indexer", "indexer_scores")(
        (nblk, S), (256,), (q, wts, k, d_pos, _i32(HI), _i32(c), _i32(ratio), _f32(c ** -0.5 * HI ** -0.5), scores,
                            _i64(scores.shape[1])))


def indexer_scores_fp4(q, wts, k, d_pos, ratio: int, scores, nblk: int) -> None:
    """indexer_scores with the keys packed (switch INDEXER_FP4, QAT on): k uint8 [N, numerics.fp4_row_bytes(c)] (rows
    of compressor_step_fp4 / numerics.fp4_pack), q [S, HI, c] fp4_sim'd (any other q is scored as fp4_sim(q)). Exact
    integer block dot products (indexer.cu indexer_scores_fp4: where and by how much it can differ from indexer_scores).
    Same grid rule as indexer_scores: nblk from indexer_blocks(ctx // ratio, S)."""
    S, HI, c = q.shape
    if HI > 64 or c not in (32, 64, 128):
        raise ValueError(f"indexer_scores_fp4 takes HI <= 64 heads of c in (32, 64, 128) dims, got HI={HI}, c={c}")
    _check(k, "uint8", "k")
    rb = fp4_row_bytes(c)
    if k.ndim != 2 or k.shape[1] != rb or k.data.ptr % 16:
        raise ValueError(f"indexer_scores_fp4: k must be a 16-byte aligned uint8 [rows, {rb}], got {k.shape}")
    get_kernel("indexer", "indexer_scores_fp4")(
        (nblk, S), (256,), (q, wts, k, d_pos, _i32(HI), _i32(c), _i32(ratio), _f32(c ** -0.5 * HI ** -0.5), scores,
                            _i64(scores.shape[1])))


def indexer_blocks(max_rows: int, S: int) -> int:
    """Blocks per query for indexer_scores: every 32-row tile of `max_rows` (the most rows any position of the
    session can see) gets a block, up to two waves of the GPU over all S queries."""
    import cupy
    sms = sm_count(cupy.cuda.Device().id)
    return max(1, min((max_rows + 31) // 32, (2 * sms + S - 1) // S))



def indexer_topk(scores, d_pos, ratio: int, out) -> None:
    """out[t] = the top-K rows of scores[t, :(P+1)//ratio] (ascending row order, -1 padding). out int32 [S, K]."""
    S, K = out.shape
    get_kernel("indexer", "indexer_topk")((S,), (1024,), (scores, _i64(scores.shape[1]), d_pos, _i32(ratio), _i32(K),
                                                          out))


TOPKM_BINS = 2048          # topk_multi.cu's histogram bins per query


def topk_multi_blocks(max_rows: int, S: int) -> int:
    """Blocks per query G for indexer_topk_multi: one per 512 of `max_rows` (the most rows any position of the
    session can see: size it from ctx, never the position), up to two waves of the GPU over all S queries (264 on an
    H200 for one query from 135,168 rows up, i.e. ctx >= 540K)."""
    import cupy
    sms = sm_count(cupy.cuda.Device().id)
    return max(1, min((max_rows + 511) // 512, (2 * sms + S - 1) // S))


def topk_multi_meta_size(S: int, nblk: int) -> int:
    """int32 elements of indexer_topk_multi's `meta` scratch for S queries of nblk blocks."""
    return S * (2 + 2 * nblk)


def indexer_topk_multi(scores, d_pos, ratio: int, out, hist, meta, nblk: int) -> None:
    """indexer_topk over nblk blocks per query (switch TOPK_MULTI, kernels/topk_multi.cu): the same int32 output bit
    for bit (top-K of ord_key, ties -> lower index, ascending, -1 padding). hist: uint32 [>= S * 2048], all zero
    before the first call (each call leaves it zero); meta: int32 [>= topk_multi_meta_size(S, nblk)], any content.
    nblk from topk_multi_blocks(ctx // ratio, S). Eight launches, no host sync (graph-capturable)."""
    S, K = out.shape
    _check(out, "int32", "out")
    _check(scores, "float32", "scores")
    _check(hist, "uint32", "hist")
    _check(meta, "int32", "meta")
    if K < 1 or nblk < 1:
        raise ValueError(f"indexer_topk_multi: K = {K} and nblk = {nblk} must be >= 1")
    if hist.size < S * TOPKM_BINS or meta.size < topk_multi_meta_size(S, nblk):
        raise ValueError(f"indexer_topk_multi: hist needs {S * TOPKM_BINS} elements (has {hist.size}), meta "
                         f"{topk_multi_meta_size(S, nblk)} (has {meta.size})")
    stride = _i64(scores.shape[1])
    hk, sk = get_kernel("topk_multi", "topkm_hist"), get_kernel("topk_multi", "topkm_scan")
    for level in range(3):
        hk((nblk, S), (256,), (scores, stride, d_pos, _i32(ratio), _i32(K), _i32(level), meta, hist))
        sk((S,), (1024,), (d_pos, _i32(ratio), _i32(K), _i32(level), meta, hist))
    get_kernel("topk_multi", "topkm_count")((nblk, S), (256,), (scores, stride, d_pos, _i32(ratio), _i32(K), _i32(S),
                                                                 meta))
    get_kernel("topk_multi", "topkm_write")((nblk, S), (256,), (scores, stride, d_pos, _i32(ratio), _i32(K), _i32(S),
                                                                 meta, out))


def pos_advance(d_pos, n: int) -> None:
    """d_pos[0] += n on the device."""
    get_kernel("embed", "pos_advance")((1,), (1,), (d_pos, _i32(n)))
