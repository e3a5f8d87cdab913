"""NumPy emulation of one launch of kernels/attention_mma.cu's attn_prefill_mma, or with splits=(NS, rps) of
kernels/attention_decode_mma.cu's attn_partial_mma (the same body over one split of the key list) and attention.cu's
attn_combine (a helper of tests/test_attention_mma_layout.py; no GPU).

It runs the kernel's steps block by block with the kernel's role and address formulas (warp = (head group, dim slice),
the cp.async chunk swizzle, the in-place hi / lo conversion, ldmatrix lane addresses, the partial-score buffer, the
fragment registers of the softmax and PV, the epilogue's stores), while ldmatrix (plain and .trans) and
mma.m16n8k16 follow the PTX ISA's fragment definitions, written here independently of the kernel. So a lane holding
a different key or dim than the kernel's bookkeeping assumes shows up as a wrong result, an output written twice or
not at all, or a partial score read before it is written.

Arithmetic as the kernel's: float32 everywhere; the hi / lo fp16 split (cvt.rn = NumPy's float32 -> float16); an mma
sums its 16 exact products and the accumulator in float64 and rounds to float32 once (the tensor cores truncate
inside an mma instead: a few float32 ulps, which this emulation does not model); exp in float32 (the kernel's __expf
is within ~2 ulps of it). Shared-memory bank conflicts of every ldmatrix, 16-byte and 8-byte access are counted.
variant="hi" drops the lo terms (fp16 operands with an 11-bit significand: the control that shows what the split buys).

Also the inputs both test files use (make_inputs, make_block_scaled_inputs) and the float64 evaluation of the
attention they are checked against (ref_attention).
"""
from __future__ import annotations

import numpy as np

from ds4cupy.engines import numerics as nm

F32, F64, U32 = np.float32, np.float64, np.uint32
TK, HG, NSL, MAXB, PLD = 16, 32, 4, 8, 24            # AM_TK, AM_HG, AM_NS, AM_MAXB, AM_PLD

W8 = np.arange(8)[:, None]                            # warp index, [8, 1]
LANE = np.arange(32)[None, :]                         # lane index, [1, 32]
GQ, TQ = LANE >> 2, LANE & 3                          # mma fragment coordinates
KQ, KR = LANE >> 3, LANE & 7                          # ldmatrix: matrix of the lane's address, row within it


# ---- inputs and the float64 reference (shared with tests/test_gpu_attention_mma.py) --------------------------------
def make_inputs(rng, S, H, d, W, pos0, mode, ratio, K, n_rot, qscale=2.0):
    """Random inputs as the session holds them: every position's KV row (hist), the window ring with the rows of the
    W positions before pos0 (slots of positions that never existed: NaN, never read), this chunk's rows (cur),
    compressed rows (rows past the last query's visible ones: NaN) and indexer picks with -1, future rows, repeats."""
    P_end = pos0 + S
    hist = rng.standard_normal((P_end, d)).astype(np.float32)
    ring = np.full((W, d), np.nan, np.float32)
    for p in range(max(0, pos0 - W), pos0):
        ring[p % W] = hist[p]
    q = (rng.standard_normal((S, H, d)) * qscale).astype(np.float32)
    sinks = rng.standard_normal(H).astype(np.float32)
    comp = idx = None
    if mode:
        nvis_last = P_end // ratio
        comp = rng.standard_normal((nvis_last + 4, d)).astype(np.float32)
        comp[nvis_last:] = np.nan
    if mode == 2:
        idx = np.empty((S, K), np.int32)
        for t in range(S):
            nv = (pos0 + t + 1) // ratio
            pick = list(rng.permutation(nv)[:K - 3]) + [-1, nv + int(rng.integers(0, 3)), int(rng.integers(0, nv))
                                                       if nv else -1]
            idx[t] = np.array(pick + [-1] * (K - len(pick)), np.int32)[rng.permutation(K)]
    freqs = nm.rope_freqs(n_rot, 10000.0, None)
    return dict(q=q, hist=hist, ring=ring, cur=hist[pos0:], comp=comp, idx=idx, pos0=pos0, W=W, ratio=ratio,
                mode=mode, sinks=sinks, n_rot=n_rot, freqs=freqs)


def ref_attention(q, hist, comp, idx, pos0, W, ratio, mode, sinks, n_rot, freqs, **_):
    """float64: the key list as a count per key (window, visible compressed rows, indexer entries with repeats), the
    softmax with the sink in the denominator, the inverse rope on the last n_rot dims."""
    S, H, d = q.shape
    pos = pos0 + np.arange(S)
    keys = hist.astype(np.float64)
    allp = np.arange(len(hist))
    cnt = ((allp[None] <= pos[:, None]) & (allp[None] > pos[:, None] - W)).astype(np.float64)
    if mode:
        nvis = (pos + 1) // ratio
        c2 = np.zeros((S, comp.shape[0]))
        for t in range(S):
            if mode == 1:
                c2[t, :nvis[t]] = 1
            else:
                for w in idx[t]:
                    if 0 <= w < nvis[t]:
                        c2[t, w] += 1
        keys = np.concatenate([keys, np.nan_to_num(comp.astype(np.float64))])
        cnt = np.concatenate([cnt, c2], axis=1)
    sc = (q.astype(np.float64).reshape(S * H, d) @ keys.T).reshape(S, H, -1) * d ** -0.5
    sc = np.where(cnt[:, None, :] > 0, sc, -np.inf)
    m = np.maximum(sc.max(-1), sinks[None].astype(np.float64))
    e = np.exp(sc - m[..., None]) * cnt[:, None, :]
    o = (e.reshape(S * H, -1) @ keys).reshape(S, H, d) / (e.sum(-1) + np.exp(sinks[None] - m))[..., None]
    if n_rot:
        c, s = np.cos(pos[:, None] * freqs[None]), np.sin(pos[:, None] * freqs[None])
        a, b = o[..., d - n_rot::2].copy(), o[..., d - n_rot + 1::2].copy()
        o[..., d - n_rot::2] = a * c[:, None] + b * s[:, None]
        o[..., d - n_rot + 1::2] = b * c[:, None] - a * s[:, None]
    return o


BLOCK_MAGNITUDES = np.arange(-12, 13)       # key rows of magnitude 2^k, one class per block of 8 dims


def make_block_scaled_inputs(rng, S, H, d, W, pos0, ratio):
    """make_inputs (mode 1, no rope) with key rows of magnitude 2^k, k in BLOCK_MAGNITUDES, each row nonzero only in
    block k of 8 dims (so output block k comes from rows of that magnitude only): the window's rows take the 9
    smallest classes, the compressed rows the 16 largest (the largest row exponent grows along the key list); q is
    ~1e-5, so every score is near 0 and every row weighs about the same."""
    assert d >= 8 * len(BLOCK_MAGNITUDES)
    x = make_inputs(rng, S, H, d, W, pos0, 1, ratio, 0, 0, qscale=1e-5)
    hist, comp = x["hist"], x["comp"]
    nv = comp.shape[0] - 4
    for rows, klass in ((hist, lambda i: i % 9), (comp[:nv], lambda i: 9 + i % 16)):
        for i in range(rows.shape[0]):
            k = klass(i)
            keep = np.zeros(d, bool)
            keep[8 * k: 8 * k + 8] = True
            rows[i] = np.where(keep, rows[i] * np.float32(2.0 ** BLOCK_MAGNITUDES[k]), 0.0)
    x["ring"][:] = np.nan
    for p in range(max(0, pos0 - W), pos0):
        x["ring"][p % W] = hist[p]
    x["cur"] = hist[pos0:]
    return x

# ---- helpers of mma_f16.cuh -----------------------------------------------------------------------------------------
def split_exp(amax):
    e = (np.asarray(amax, F32).view(U32) >> 23) & 0xFF
    return np.clip(e.astype(np.int64), 15, 254)


def split_inv(e):
    return (np.asarray(268 - e).astype(U32) << 23).view(F32)


def split_scale(e):
    return (np.asarray(e - 14).astype(U32) << 23).view(F32)


def split(v, variant="exact"):
    v = np.asarray(v, F32)
    hi = (v.view(U32) & U32(0xFFFFE000)).view(F32)
    lo = (v - hi).astype(F32)
    return hi, (np.zeros_like(lo) if variant == "hi" else lo)


def pack(lo, hi):
    """pack_f16x2: fp16(lo) in bits 0-15, fp16(hi) in 16-31 (round to nearest even)."""
    a = np.asarray(lo, F32).astype(np.float16).view(np.uint16).astype(U32)
    b = np.asarray(hi, F32).astype(np.float16).view(np.uint16).astype(U32)
    return a | (b << U32(16))


def halves(r):
    r = np.asarray(r, U32)
    lo = (r & U32(0xFFFF)).astype(np.uint16).view(np.float16).astype(F64)
    hi = (r >> U32(16)).astype(np.uint16).view(np.float16).astype(F64)
    return lo, hi


def pow2(k):
    k = np.asarray(k)
    return np.where(k < -126, F32(0), (np.clip(k + 127, 1, 254).astype(U32) << 23).view(F32)).astype(F32)


# ---- PTX semantics --------------------------------------------------------------------------------------------------
class Smem:
    """The dynamic shared memory (bytes) and a bank-conflict counter."""

    def __init__(self, nbytes: int):
        self.b = np.zeros(nbytes, np.uint8)
        self.conflicts = 0

    def _check(self, addr, width: int, group: int):
        """Accesses of `width` bytes by groups of `group` consecutive lanes (one shared-memory wavefront each): the
        (address / width) mod (128 / width) slots of a group must differ."""
        a = np.asarray(addr).reshape(-1, group)
        slots = (a // width) % (128 // width)
        for row in slots:
            if len(set(row.tolist())) != group:
                self.conflicts += 1

    def ld16(self, addr, group=8):
        self._check(addr, 16, group)
        return self.b[np.asarray(addr)[..., None] + np.arange(16)]

    def st16(self, addr, data, group=8):
        self._check(addr, 16, group)
        self.b[np.asarray(addr)[..., None] + np.arange(16)] = data

    def ldsm_x4(self, addr, trans: bool):
        """addr [8, 32]: lane 8 q + i gives row i of matrix q. Returns regs [8, 32, 4] (u32 of 2 halves): matrix q,
        plain: row lane / 4, columns 2 (lane % 4), + 1; .trans: rows 2 (lane % 4), + 1 of column lane / 4."""
        for q in range(4):
            self._check(addr[:, 8 * q: 8 * q + 8], 16, 8)
        raw = self.b[np.asarray(addr)[..., None] + np.arange(16)]           # [8, 32, 16] bytes
        mats = np.ascontiguousarray(raw).view(np.uint16).reshape(8, 4, 8, 8)  # [warp, matrix, row, half]
        w = np.arange(8)[:, None]
        regs = np.zeros((8, 32, 4), U32)
        for q in range(4):
            if trans:
                lo, hi = mats[w, q, 2 * TQ, GQ], mats[w, q, 2 * TQ + 1, GQ]
            else:
                lo, hi = mats[w, q, GQ, 2 * TQ], mats[w, q, GQ, 2 * TQ + 1]
            regs[:, :, q] = lo.astype(U32) | (hi.astype(U32) << U32(16))
        return regs


def mma(c, a, b0, b1):
    """mma.m16n8k16.row.col f32.f16.f16.f32 per warp: c [8, 32, 4] float32, a [8, 32, 4] u32, b0 / b1 [8, 32] u32."""
    w = np.arange(8)[:, None]
    A = np.zeros((8, 16, 16))
    B = np.zeros((8, 16, 8))
    for i, (ro, co) in enumerate([(0, 0), (8, 0), (0, 8), (8, 8)]):
        lo, hi = halves(a[:, :, i])
        A[w, GQ + ro, 2 * TQ + co] = lo
        A[w, GQ + ro, 2 * TQ + co + 1] = hi
    for reg, ko in ((b0, 0), (b1, 8)):
        lo, hi = halves(reg)
        B[w, 2 * TQ + ko, GQ] = lo
        B[w, 2 * TQ + ko + 1, GQ] = hi
    D = A @ B
    out = np.empty_like(c)
    for i, (ro, co) in enumerate([(0, 0), (0, 1), (8, 0), (8, 1)]):
        out[:, :, i] = (c[:, :, i].astype(F64) + D[w, GQ + ro, 2 * TQ + co]).astype(F32)
    return out


def quad_max(x):          # shfl_xor 1, 2 max over the 4 lanes of a quad, x [8, 32]
    return np.repeat(x.reshape(8, 8, 4).max(axis=-1), 4, axis=1)


def xor_lane(x, m):
    return x[:, np.arange(32) ^ m]


# ---- the kernel -----------------------------------------------------------------------------------------------------
def attn_prefill_mma(q, ring, cur, comp, idx, pos0, W, ratio, mode, sinks, n_rot, freqs, variant="exact",
                     stats=None, splits=None):
    """out [S, H, d] as attn_prefill_mma computes it. stats (a dict) receives 'conflicts' (bank conflicts counted)
    and 'written' (how often each output element was stored).
    splits = (NS, rps): attention_decode_mma.cu's attn_partial_mma instead (the same body over the entries
    [s rps, min(R, (s + 1) rps)) of split s, split 0 always, none past the list end); returns its partials
    (part_ml [S, H, NS, 2], part_o [S, H, NS, d], NaN where not stored), and stats' 'written' counts the part_o
    stores, 'ml_written' the part_ml ones [S, H, NS]."""
    S, H, d = q.shape
    assert d % 32 == 0 and d <= 512
    K = idx.shape[1] if mode == 2 else 0
    scale = F32(d ** -0.5)
    nb = d // 16
    row_bytes = 4 * d
    smem = Smem(2 * TK * row_bytes)
    out = np.full((S, H, d), np.nan, F32)
    written = np.zeros((S, H, d), np.int64)
    if splits is not None:
        part_ml = np.full((S, H, splits[0], 2), np.nan, F32)
        part_o = np.full((S, H, splits[0], d), np.nan, F32)
        written = np.zeros((S, H, splits[0], d), np.int64)
        ml_written = np.zeros((S, H, splits[0]), np.int64)
    hg, ds = W8 & 1, W8 >> 1
    for bx in range((H + HG - 1) // HG):
        for t in range(S):
            P = pos0 + t
            lo_ = max(0, P - W + 1)
            nwin = P - lo_ + 1
            nvis = (P + 1) // ratio if ratio > 0 else 0
            R = nwin + (nvis if mode == 1 else (K if mode == 2 else 0))
            for s_, j0, j1 in split_ranges(R, splits):
                # the split's entries as a shifted list, as attn_partial_mma shifts its AmKeys (j0 = 0: the whole list)
                lo_s, nwin_s, R_s = lo_ + j0, nwin - j0, j1 - j0
                ntiles = (R_s + TK - 1) // TK

                def row(j):
                    if j >= R_s:
                        return None
                    if j < nwin_s:
                        p = lo_s + j
                        return cur[p - pos0] if p >= pos0 else ring[p % W]
                    w = j - nwin_s
                    if mode == 2:
                        w = int(idx[t, w])
                    return comp[w] if 0 <= w < nvis else None

                hA = bx * HG + 16 * hg + GQ                   # [8, 32]
                hB = hA + 8
                # ---- the query fragments
                x = np.zeros((MAXB, 8, 32, 8), F32)
                for i in range(MAXB):
                    b = ds + NSL * i                          # [8, 1]
                    c = 16 * b + 2 * TQ                       # [8, 32]
                    for k, (hrow, co) in enumerate([(hA, 0), (hA, 1), (hB, 0), (hB, 1),
                                                    (hA, 8), (hA, 9), (hB, 8), (hB, 9)]):
                        ok = (b < nb) & (hrow < H)
                        x[i, :, :, k] = np.where(ok, q[t, np.minimum(hrow, H - 1), np.minimum(c + co, d - 1)], 0)
                ax = np.abs(x)
                ma = quad_max(ax[..., [0, 1, 4, 5]].max(axis=(0, 3)))
                mb = quad_max(ax[..., [2, 3, 6, 7]].max(axis=(0, 3)))
                ea, eb = split_exp(ma), split_exp(mb)
                sq = [split_scale(ea), split_scale(eb)]
                inv = np.stack([split_inv(ea), split_inv(ea), split_inv(eb), split_inv(eb)] * 2, axis=-1)   # per k
                h, lq = split(x * inv, variant)
                qh = np.stack([pack(h[..., 2 * k], h[..., 2 * k + 1]) for k in range(4)], axis=-1)  # [MAXB, 8, 32, 4]
                ql = np.stack([pack(lq[..., 2 * k], lq[..., 2 * k + 1]) for k in range(4)], axis=-1)

                o = np.zeros((MAXB, 2, 8, 32, 4), F32)
                m_r = [np.full((8, 32), -np.inf, F32) for _ in range(2)]
                l_r = [np.zeros((8, 32), F32) for _ in range(2)]
                E_run = np.full((8, 32), 15, np.int64)
                rmax = np.zeros((2, TK), U32)
                kval = np.zeros((2, TK), bool)

                def issue(it, st):
                    for r in range(TK):
                        src = row(it * TK + r)
                        data = np.zeros(d, F32) if src is None else np.asarray(src, F32)
                        chunks = np.ascontiguousarray(data).view(np.uint8).reshape(d // 4, 16)
                        c = np.arange(d // 4)
                        phys = (c & ~7) | ((c & 7) ^ (r & 7))
                        base = (st * TK + r) * row_bytes
                        smem.b[base + 16 * phys[:, None] + np.arange(16)] = chunks
                        kval[st, r] = src is not None
                        rmax[st, r] = 0

                issue(0, 0)
                for it in range(ntiles):
                    st = it & 1
                    if it + 1 < ntiles:
                        issue(it + 1, st ^ 1)
                    tile = st * TK * row_bytes
                    # ---- conversion: thread tid = (row cr = tid & 15, group cg = tid >> 4)
                    tid = np.arange(256)
                    cr, cg = tid & 15, tid >> 4
                    act = cg < d // 32
                    cr, cg = cr[act], cg[act]
                    g_base = tile + cr * row_bytes + 128 * cg                       # [units]
                    v = np.stack([smem.ld16(g_base + 16 * (k ^ (cr & 7))).view(F32) for k in range(8)], axis=1)
                    amax = np.abs(v).reshape(len(cr), 32).max(axis=1)
                    for r_, a_ in zip(cr, amax):
                        rmax[st, r_] = max(rmax[st, r_], np.asarray(a_, F32).view(U32))
                    inv_r = split_inv(split_exp(rmax[st, cr].view(F32)))
                    for m in range(4):
                        xs = np.concatenate([v[:, 2 * m], v[:, 2 * m + 1]], axis=1) * inv_r[:, None]   # [units, 8]
                        hh, ll = split(xs, variant)
                        for part_, vals in ((2 * m, hh), (2 * m + 1, ll)):
                            words = np.stack([pack(vals[:, 2 * k], vals[:, 2 * k + 1]) for k in range(4)], axis=1)
                            smem.st16(g_base + 16 * (part_ ^ (cr & 7)), words.view(np.uint8))
                    # ---- QK^T
                    sc = np.zeros((2, 8, 32, 4), F32)
                    rowk = tile + (KR + 8 * (KQ >> 1)) * row_bytes
                    for i in range(MAXB):
                        b = ds + NSL * i
                        valid = (b < nb)[:, 0]
                        if not valid.any():
                            continue
                        bb = np.minimum(b, nb - 1)
                        ch = 2 * (2 * bb + (KQ & 1))
                        kh = smem.ldsm_x4(rowk + 16 * ((ch & ~7) | ((ch & 7) ^ KR)), False)
                        kl = smem.ldsm_x4(rowk + 16 * (((ch + 1) & ~7) | (((ch + 1) & 7) ^ KR)), False)
                        for n in range(2):
                            p = np.zeros((8, 32, 4), F32)
                            p = mma(p, ql[i], kh[..., 2 * n], kh[..., 2 * n + 1])
                            p = mma(p, qh[i], kl[..., 2 * n], kl[..., 2 * n + 1])
                            p = mma(p, qh[i], kh[..., 2 * n], kh[..., 2 * n + 1])
                            sc[n] = np.where(valid[:, None, None], sc[n] + p, sc[n])
                    ej = [[split_exp(rmax[st, 8 * n + 2 * TQ + c].view(F32)) for c in range(2)] for n in range(2)]
                    part = np.full((NSL, 2, 16, PLD), np.nan, F32)
                    count = np.zeros((NSL, 2, 16, PLD), np.int64)
                    ds_b, hg_b = np.broadcast_to(ds, (8, 32)), np.broadcast_to(hg, (8, 32))
                    for n in range(2):
                        w = [(sc[n][:, :, c] * sq[c >> 1]) * split_scale(ej[n][c & 1]) * scale for c in range(4)]
                        for hh in range(2):
                            rr = np.broadcast_to(GQ + 8 * hh, (8, 32))
                            col = np.broadcast_to(8 * n + 2 * TQ, (8, 32))
                            smem_addr = (((ds_b * 2 + hg_b) * 16 + rr) * PLD + col) * 4
                            Smem._check(smem, smem_addr, 8, 16)
                            for cc in range(2):
                                part[ds_b, hg_b, rr, col + cc] = w[2 * hh + cc]
                                np.add.at(count, (ds_b, hg_b, rr, col + cc), 1)
                    assert (count[:, :, :, :TK] == 1).all() and (count[:, :, :, TK:] == 0).all(), "partial scores"
                    # ---- online softmax
                    s = np.zeros((2, 4, 8, 32), F32)
                    for n in range(2):
                        for hh in range(2):
                            rr = np.broadcast_to(GQ + 8 * hh, (8, 32))
                            for cc in range(2):
                                col = np.broadcast_to(8 * n + 2 * TQ + cc, (8, 32))
                                a = part[0, hg_b, rr, col]
                                for z in range(1, NSL):
                                    a = (a + part[z, hg_b, rr, col]).astype(F32)
                                s[n, 2 * hh + cc] = np.where(kval[st, col], a, -np.inf)
                    assert not np.isnan(s).any()
                    mx = []
                    for hh in range(2):
                        v_ = np.maximum(np.maximum(s[0, 2 * hh], s[0, 2 * hh + 1]), np.maximum(s[1, 2 * hh],
                                                                                                  s[1, 2 * hh + 1]))
                        mx.append(np.maximum(quad_max(v_), m_r[hh]))
                    if np.isneginf(mx[0]).any():
                        assert np.isneginf(mx[0]).all() and np.isneginf(mx[1]).all()
                        continue
                    E_new = np.maximum(E_run, split_exp(rmax[st].max().view(F32)))
                    ef = pow2(E_run - E_new)
                    corr = []
                    for hh in range(2):
                        with np.errstate(invalid="ignore"):
                            ce = np.exp((m_r[hh] - mx[hh]).astype(F32)).astype(F32)
                        ce = np.where(np.isneginf(m_r[hh]), F32(0), ce)
                        l_r[hh] = (l_r[hh] * ce).astype(F32)
                        corr.append((ce * ef).astype(F32))
                        m_r[hh] = mx[hh]
                    E_run = E_new
                    ph = np.zeros((8, 32, 4), U32)
                    pl = np.zeros((8, 32, 4), U32)
                    for n in range(2):
                        f0, f1 = pow2(ej[n][0] - E_new + 14), pow2(ej[n][1] - E_new + 14)
                        for hh in range(2):
                            p0 = np.exp((s[n, 2 * hh] - m_r[hh]).astype(F32)).astype(F32)
                            p1 = np.exp((s[n, 2 * hh + 1] - m_r[hh]).astype(F32)).astype(F32)
                            l_r[hh] = (l_r[hh] + (p0 + p1)).astype(F32)
                            h0, l0 = split(p0 * f0, variant)
                            h1, l1 = split(p1 * f1, variant)
                            ph[:, :, 2 * n + hh] = pack(h0, h1)
                            pl[:, :, 2 * n + hh] = pack(l0, l1)
                    # ---- PV
                    rowv = tile + (KR + 8 * (KQ & 1)) * row_bytes
                    for i in range(MAXB):
                        b = ds + NSL * i
                        valid = (b < nb)[:, 0]
                        if not valid.any():
                            continue
                        bb = np.minimum(b, nb - 1)
                        ch = 2 * (2 * bb + (KQ >> 1))
                        vh = smem.ldsm_x4(rowv + 16 * ((ch & ~7) | ((ch & 7) ^ KR)), True)
                        vl = smem.ldsm_x4(rowv + 16 * (((ch + 1) & ~7) | (((ch + 1) & 7) ^ KR)), True)
                        for n in range(2):
                            p = np.zeros((8, 32, 4), F32)
                            p = mma(p, pl, vh[..., 2 * n], vh[..., 2 * n + 1])
                            p = mma(p, ph, vl[..., 2 * n], vl[..., 2 * n + 1])
                            p = mma(p, ph, vh[..., 2 * n], vh[..., 2 * n + 1])
                            for c in range(4):
                                new = (o[i, n, :, :, c].astype(F64) * corr[c >> 1] + p[:, :, c]).astype(F32)
                                o[i, n, :, :, c] = np.where(valid[:, None], new, o[i, n, :, :, c])
                if splits is not None:          # attn_partial_mma: the split's (m, l) and o in true units
                    for hh, hrow in enumerate((hA, hB)):
                        l1 = (l_r[hh] + xor_lane(l_r[hh], 1)).astype(F32)
                        l2 = (l1 + xor_lane(l1, 2)).astype(F32)
                        ok = (np.broadcast_to(ds, (8, 32)) == 0) & (TQ == 0) & (hrow < H)
                        part_ml[t, hrow[ok], s_, 0] = m_r[hh][ok]
                        part_ml[t, hrow[ok], s_, 1] = l2[ok]
                        np.add.at(ml_written, (t, hrow[ok], s_), 1)
                    for i in range(MAXB):
                        b = np.broadcast_to(ds + NSL * i, (8, 32))
                        for n in range(2):
                            col = 16 * b + 8 * n + 2 * TQ
                            for hh, hrow in enumerate((hA, hB)):
                                ok = (b < nb) & (hrow < H)
                                hr, cl = hrow[ok], col[ok]
                                for cc in range(2):
                                    part_o[t, hr, s_, cl + cc] = np.ldexp(o[i, n, :, :, 2 * hh + cc], E_run - 155)[ok]
                                    np.add.at(written, (t, hr, s_, cl + cc), 1)
                    continue
                # ---- sink, normalisation, inverse rope, stores
                fac = []
                for hh, hrow in enumerate((hA, hB)):
                    l1 = (l_r[hh] + xor_lane(l_r[hh], 1)).astype(F32)
                    l2 = (l1 + xor_lane(l1, 2)).astype(F32)
                    sink = np.where(hrow < H, sinks[np.minimum(hrow, H - 1)], F32(0)).astype(F32)
                    M = np.maximum(sink, m_r[hh])
                    w = np.where(np.isneginf(m_r[hh]), F32(0), np.exp((m_r[hh] - M).astype(F32))).astype(F32)
                    invL = (F32(1) / (np.exp((sink - M).astype(F32)) + l2 * w).astype(F32)).astype(F32)
                    fac.append((w * invL).astype(F32))
                b0 = d - n_rot
                for i in range(MAXB):
                    b = np.broadcast_to(ds + NSL * i, (8, 32))
                    for n in range(2):
                        col = 16 * b + 8 * n + 2 * TQ                                   # [8, 32]
                        rot = col >= b0
                        ang = P * freqs[np.clip((col - b0) >> 1, 0, max(n_rot // 2 - 1, 0))] if n_rot else 0 * col
                        cs = np.where(rot, np.cos(ang).astype(F32), F32(1))
                        sn = np.where(rot, -np.sin(ang).astype(F32), F32(0))                # inverse: -angle
                        for hh, hrow in enumerate((hA, hB)):
                            a = np.ldexp((o[i, n, :, :, 2 * hh] * fac[hh]).astype(F32), E_run - 155).astype(F32)
                            c2 = np.ldexp((o[i, n, :, :, 2 * hh + 1] * fac[hh]).astype(F32), E_run - 155).astype(F32)
                            ya = np.where(rot, (a * cs).astype(F32) - (c2 * sn).astype(F32), a).astype(F32)
                            yb = np.where(rot, (a * sn).astype(F32) + (c2 * cs).astype(F32), c2).astype(F32)
                            ok = (b < nb) & (hrow < H)
                            hr, cl = hrow[ok], col[ok]
                            out[t, hr, cl], out[t, hr, cl + 1] = ya[ok], yb[ok]
                            np.add.at(written, (t, hr, cl), 1)
                            np.add.at(written, (t, hr, cl + 1), 1)
    if stats is not None:
        stats["conflicts"] = smem.conflicts
        stats["written"] = written
        if splits is not None:
            stats["ml_written"] = ml_written
    return out if splits is None else (part_ml, part_o)


def split_ranges(R, splits):
    """(s, first entry, end) of the blocks that do work: the whole list of R entries (splits None: the prefill
    kernel), else split s of rps entries for every s < NS with s rps < R, and split 0 always."""
    if splits is None:
        return [(0, 0, R)]
    ns, rps = splits
    return [(s, s * rps, min(R, (s + 1) * rps)) for s in range(ns) if s == 0 or s * rps < R]


def attn_combine(part_ml, part_o, sinks, pos0, W, ratio, mode, K, rps, n_rot, freqs):
    """attention.cu's attn_combine in float64: the splits holding keys at each query's position merged with the
    sink, then the inverse rope."""
    S, H, ns, d = part_o.shape
    out = np.zeros((S, H, d))
    for t in range(S):
        P = pos0 + t
        R = min(P + 1, W) + ((P + 1) // ratio if mode == 1 else (K if mode == 2 else 0))
        used = max(1, min(ns, -(-R // rps)))
        m = part_ml[t, :, :used, 0].astype(F64)
        l = part_ml[t, :, :used, 1].astype(F64)
        M = np.maximum(sinks.astype(F64), m.max(axis=1))
        with np.errstate(invalid="ignore"):
            w = np.where(np.isneginf(m), 0.0, np.exp(m - M[:, None]))
        L = np.exp(sinks - M) + (l * w).sum(axis=1)
        out[t] = (part_o[t, :, :used].astype(F64) * w[..., None]).sum(axis=1) / L[:, None]
    if n_rot:
        pos = pos0 + np.arange(S)
        c, s = np.cos(pos[:, None] * freqs[None]), np.sin(pos[:, None] * freqs[None])
        a, b = out[..., d - n_rot::2].copy(), out[..., d - n_rot + 1::2].copy()
        out[..., d - n_rot::2] = a * c[:, None] + b * s[:, None]
        out[..., d - n_rot + 1::2] = b * c[:, None] - a * s[:, None]
    return out
