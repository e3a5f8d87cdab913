"""The non-quantized CUDA kernels (ds4cupy/cuda/ops.py) against NumPy oracles: ds4cupy.engines.numerics and small functions
below that follow docs/model.md §2 / ds4cupy.engines.reference line by line. Fresh random inputs every run, tiny dims and the
Flash dims. Tolerances (each justified where it is used):
- QAT rounding (fp8_sim, fp4_sim, hadamard + fp4_sim): bit-exact; the kernels compute the scale from the exponent and
  the Hadamard in double in NumPy's butterfly order.
- plain float32 arithmetic whose summation order differs from NumPy's: relative 1e-5 of the output's magnitude
  (float32 epsilon 1.2e-7 times sums of up to 16384 terms, with margin).
- composite ops that round to FP8 after float32 arithmetic: a 1-ulp difference before rounding can move a value across
  an FP8 rounding boundary, so at most 1 % of the elements may differ, each by at most one FP8 step.
"""
from __future__ import annotations

import numpy as np
import pytest

from ds4cupy.engines import numerics as nm
from gpu_util import GPU_MARKS, gpu_available

cp = pytest.importorskip("cupy") if gpu_available() else None

pytestmark = GPU_MARKS

F32 = np.float32
# (name, dims): tiny = ModelConfig.tiny, flash = DeepSeek-V4-Flash
DIMS = {
    "tiny": dict(D=256, H=4, hd=96, n_rot=32, q_lora=64, W=32, HI=4, ci=64, E=8, k=3, n=4),
    "flash": dict(D=4096, H=64, hd=512, n_rot=64, q_lora=1024, W=128, HI=64, ci=128, E=256, k=6, n=4),
}


@pytest.fixture
def rng(seed):
    return np.random.default_rng(seed)


def dev(a, dtype=None):
    return cp.asarray(np.ascontiguousarray(a if dtype is None else np.asarray(a, dtype)))


def host(a):
    return cp.asnumpy(a)


def d_pos(p):
    return cp.asarray(np.array([p], np.int32))


def freqs_for(n_rot, yarn: bool):
    return nm.rope_freqs(n_rot, 160000.0 if yarn else 10000.0, (16.0, 65536, 32.0, 1.0) if yarn else None)


def rel_close(got, ref, rel=1e-5):
    scale = max(float(np.max(np.abs(ref))), 1e-30)
    err = float(np.max(np.abs(got.astype(np.float64) - ref)))
    assert err <= rel * scale, f"max abs err {err:.3e} > {rel:g} * {scale:.3e}"


def fp8_close(got, ref, frac=0.01):
    """Equal except a few elements one FP8 step apart (see module docstring)."""
    diff = got != ref
    assert diff.mean() <= frac, f"{diff.mean():.4f} of the elements differ"
    if diff.any():
        r = np.abs(ref[diff]).astype(np.float64)
        step = np.exp2(np.floor(np.log2(np.maximum(r, 1e-30))) - 3)      # e4m3 step at the value
        assert np.all(np.abs(got[diff] - ref[diff]) <= step * 1.0001 + 1e-30)


# ---- QAT rounding: bit-exact ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("d,nq", [(96, 64), (512, 448)])
def test_fp8_rows_bit_exact(rng, d, nq):
    x = (rng.standard_normal((300, d)) * np.exp(rng.uniform(-12, 12, (300, 1)))).astype(F32)
    x[:5, :nq] *= 1e-9                       # blocks under the 1e-4 amax floor
    x[5, :64] = 448.0 * 2.0 ** rng.integers(-5, 5)   # exact power-of-two scale boundary
    g = dev(x)
    from ds4cupy.engines.cuda import ops
    ops.qat_rows(g, ops.QAT_FP8, nq)
    ref = x.copy()
    ref[:, :nq] = nm.fp8_sim(x[:, :nq], 64)
    np.testing.assert_array_equal(host(g), ref)


@pytest.mark.parametrize("d", [64, 128])
def test_fp4_and_hadamard_rows_bit_exact(rng, d):
    from ds4cupy.engines.cuda import ops
    x = (rng.standard_normal((400, d)) * np.exp(rng.uniform(-10, 10, (400, 1)))).astype(F32)
    x[0, :32] = 6.0 * np.arange(32) / 8.0     # grid points and exact ties
    g = dev(x)
    ops.qat_rows(g, 3)
    np.testing.assert_array_equal(host(g), nm.fp4_sim(x, 32))
    g = dev(x)
    ops.qat_rows(g, ops.QAT_HADAMARD_FP4)
    np.testing.assert_array_equal(host(g), nm.fp4_sim(nm.hadamard(x), 32))


# ---- norms and rope ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["tiny", "flash"])
def test_rms_norm_rows(rng, size):
    from ds4cupy.engines.cuda import ops
    D = DIMS[size]["D"]
    x = (rng.standard_normal((7, D)) * 3 + 0.5).astype(F32)
    w = rng.uniform(0.5, 1.5, D).astype(F32)
    out = cp.empty((7, D), cp.float32)
    ops.rms_norm_rows(dev(x), dev(w), out)
    rel_close(host(out), nm.rms_norm(x, w), 1e-6)       # double sum of squares like NumPy: ~1 ulp
    g = dev(x)
    ops.rms_norm_rows(g, None, g)                         # in place, no weight
    rel_close(host(g), nm.rms_norm(x), 1e-6)


@pytest.mark.parametrize("size,yarn", [("tiny", False), ("tiny", True), ("flash", True), ("flash", False)])
def test_rope_rows_forward_inverse(rng, size, yarn):
    from ds4cupy.engines.cuda import ops
    dm = DIMS[size]
    S, H, d, r = 9, dm["H"], dm["hd"], dm["n_rot"]
    p0 = int(rng.integers(0, 200000))
    fr = freqs_for(r, yarn)
    x = rng.standard_normal((S, H, d)).astype(F32)
    cos, sin = nm.rope_cos_sin(fr, np.arange(p0, p0 + S))
    g = dev(x)
    ops.rope_rows(g, r, dev(fr), d_pos(p0))
    rel_close(host(g), nm.rope_apply(x, cos, sin), 1e-6)   # same float32 roundings; cos/sin may differ by 1 ulp
    ops.rope_rows(g, r, dev(fr), d_pos(p0), inverse=True)
    rel_close(host(g), x, 1e-6)


@pytest.mark.parametrize("size", ["tiny", "flash"])
@pytest.mark.parametrize("qat", [False, True])
def test_rms_norm_qkv(rng, size, qat):
    from ds4cupy.engines.cuda import ops
    dm = DIMS[size]
    S, nq, hd, r = 11, dm["q_lora"], dm["hd"], dm["n_rot"]
    p0 = int(rng.integers(0, 5000))
    fr = freqs_for(r, True)
    both = (rng.standard_normal((S, nq + hd)) * 2).astype(F32)      # q_a and kv outputs side by side in one buffer
    wq = rng.uniform(0.5, 1.5, nq).astype(F32)
    wkv = rng.uniform(0.5, 1.5, hd).astype(F32)
    g = dev(both)
    qr = cp.empty((S, nq), cp.float32)
    kv = cp.empty((S, hd), cp.float32)
    ops.rms_norm_qkv(g[:, :nq], dev(wq), qr, g[:, nq:], dev(wkv), kv, dev(fr), d_pos(p0), r, qat)
    rel_close(host(qr), nm.rms_norm(both[:, :nq], wq), 1e-6)
    cos, sin = nm.rope_cos_sin(fr, np.arange(p0, p0 + S))
    ref = nm.rope_apply(nm.rms_norm(both[:, nq:], wkv), cos, sin)
    if qat:
        ref[:, :hd - r] = nm.fp8_sim(ref[:, :hd - r], 64)
        fp8_close(host(kv), ref)
    else:
        rel_close(host(kv), ref, 1e-6)


@pytest.mark.parametrize("size", ["tiny", "flash"])
def test_heads_prep_q_and_indexer_q(rng, size):
    from ds4cupy.engines.cuda import ops
    dm = DIMS[size]
    S, H, d, r, HI, ci = 5, dm["H"], dm["hd"], dm["n_rot"], dm["HI"], dm["ci"]
    p0 = int(rng.integers(0, 70000))
    fr = freqs_for(r, True)
    cos, sin = nm.rope_cos_sin(fr, np.arange(p0, p0 + S))
    q = (rng.standard_normal((S, H, d)) * 4).astype(F32)
    g = dev(q)
    ops.heads_prep(g, True, r, dev(fr), d_pos(p0), ops.QAT_NONE)
    rel_close(host(g), nm.rope_apply(nm.rms_norm(q), cos, sin), 1e-6)
    qi = rng.standard_normal((S, HI, ci)).astype(F32)
    g = dev(qi)
    ops.heads_prep(g, False, r, dev(fr), d_pos(p0), ops.QAT_HADAMARD_FP4)
    ref = nm.fp4_sim(nm.hadamard(nm.rope_apply(qi, cos, sin)), 32)
    got = host(g)
    # the rope output equals NumPy's up to cos/sin ulps, so FP4 codes agree except on (rare) boundary cases
    assert (got != ref).mean() < 0.002
    rel_close(got, ref, 0.35)


# ---- mHC ---------------------------------------------------------------------------------------------------------------
def np_hc_pre(X, fn, scale, base, n, iters, eps_hc, eps):
    flat = X.reshape(X.shape[0], -1).astype(F32)
    mix = (flat @ fn.T) * (1.0 / np.sqrt(np.mean(np.square(flat, dtype=np.float64), axis=-1, keepdims=True) + eps))
    pre, post, comb = nm.hc_split_sinkhorn(mix, scale, base, n, iters, eps_hc)
    return np.einsum("sn,snd->sd", pre, X).astype(F32), post, comb


@pytest.mark.parametrize("size", ["tiny", "flash"])
@pytest.mark.parametrize("fn_type", ["F16", "F32", "BF16"])
@pytest.mark.parametrize("T", [1, 37])
def test_hc_pre_post_head(rng, size, fn_type, T):
    from ds4cupy.engines.cuda import ops
    n, D = DIMS[size]["n"], DIMS[size]["D"]
    rows = 2 * n + n * n
    X = (rng.standard_normal((T, n, D)) * rng.uniform(0.5, 2, (T, n, 1))).astype(F32)
    fn32 = (rng.standard_normal((rows, n * D)) * 0.05).astype(F32)
    if fn_type == "F16":
        fn_raw = fn32.astype(np.float16)
        fn32 = fn_raw.astype(F32)
    elif fn_type == "BF16":
        fn_raw = (fn32.view(np.uint32) >> 16).astype(np.uint16)
        fn32 = (fn_raw.astype(np.uint32) << 16).view(F32)
    else:
        fn_raw = fn32
    scale = rng.uniform(0.5, 2.0, 3).astype(F32)
    base = rng.standard_normal(rows).astype(F32)
    u_ref, post_ref, comb_ref = np_hc_pre(X, fn32, scale, base, n, 20, 1e-6, 1e-6)

    nsplit = ops.hc_nsplit(n * D, T)
    gX = dev(X)
    part = cp.empty((T, nsplit, rows + 1), cp.float32)
    u = cp.empty((T, D), cp.float32)
    coef = cp.empty((T, n + n * n), cp.float32)
    ops.hc_mix(gX, dev(fn_raw), ops.dtype_code(fn_type), rows, part, nsplit)
    ops.hc_split_collapse(gX, part, nsplit, rows, dev(scale), dev(base), 20, 1e-6, 1e-6, False, u, coef)
    # the mix is a float32 dot over n*D terms (relative 1e-6 .. 1e-5); the Sinkhorn is smooth, so the coefficients
    # move by the same relative amount
    c = host(coef)
    np.testing.assert_allclose(c[:, :n], post_ref, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(c[:, n:].reshape(T, n, n), comb_ref, rtol=2e-5, atol=2e-6)
    rel_close(host(u), u_ref, 2e-5)
    # the fused block norm: bit-identical to rms_norm_rows of the collapse's u, for both the pre and head modes
    w = rng.uniform(0.5, 1.5, D).astype(F32)
    u2, xn = cp.empty((T, D), cp.float32), cp.full((T, D), np.nan, cp.float32)
    ops.hc_split_collapse(gX, part, nsplit, rows, dev(scale), dev(base), 20, 1e-6, 1e-6, False, u2, coef, dev(w), xn)
    xn_ref = cp.empty((T, D), cp.float32)
    ops.rms_norm_rows(u2, dev(w), xn_ref, 1e-6)
    np.testing.assert_array_equal(host(u2), host(u))
    np.testing.assert_array_equal(host(xn), host(xn_ref))

    y = rng.standard_normal((T, D)).astype(F32)
    ops.hc_post(gX, dev(y), coef)
    X_ref = (c[:, :n, None] * y[:, None, :] + np.einsum("sjk,sjd->skd", c[:, n:].reshape(T, n, n), X)).astype(F32)
    rel_close(host(gX), X_ref, 1e-6)

    # hc_head: 4 rows, sigmoid collapse, no Sinkhorn
    fnh = (rng.standard_normal((n, n * D)) * 0.05).astype(F32)
    sh = rng.uniform(0.5, 2, 1).astype(F32)
    bh = rng.standard_normal(n).astype(F32)
    Xh = X
    flat = Xh.reshape(T, -1)
    m = (flat @ fnh.T) / np.sqrt(np.mean(np.square(flat, dtype=np.float64), axis=-1, keepdims=True) + 1e-6)
    pre = nm.sigmoid(m * sh[0] + bh) + 1e-6
    yh_ref = np.einsum("sn,snd->sd", pre, Xh).astype(F32)
    gX = dev(Xh)
    parth = cp.empty((T, nsplit, n + 1), cp.float32)
    ops.hc_mix(gX, dev(fnh), ops.DT_F32, n, parth, nsplit)
    ops.hc_split_collapse(gX, parth, nsplit, n, dev(sh), dev(bh), 0, 1e-6, 1e-6, True, u, None)
    rel_close(host(u), yh_ref, 2e-5)
    yn = cp.empty((T, D), cp.float32)
    ops.rms_norm_rows(u, dev(w), yn, 1e-6)
    ops.hc_split_collapse(gX, parth, nsplit, n, dev(sh), dev(bh), 0, 1e-6, 1e-6, True, u, None, dev(w), u)  # in place
    np.testing.assert_array_equal(host(u), host(yn))


@pytest.mark.parametrize("size", ["tiny", "flash"])
@pytest.mark.parametrize("T", [1, 37, 70])
@pytest.mark.parametrize("post", [True, False])
def test_hc_step_equals_three_launches(rng, size, T, post):
    """hc_step (hc_post + hc_mix + hc_split_collapse + block norm in one launch, decode and prefill) against the
    launches it replaces, for the pre and head modes, twice in a row (its arrival counters must come back to zero).
    Tolerances: X after the post is the same arithmetic (relative 1e-6: FMA contraction may differ between the two
    kernels); the mix sums run over other element subsets, so the coefficients and the collapse carry the float32
    summation-order differences of test_hc_pre_post_head (relative 2e-5)."""
    from ds4cupy.engines.cuda import ops
    n, D = DIMS[size]["n"], DIMS[size]["D"]
    X = (rng.standard_normal((T, n, D)) * rng.uniform(0.5, 2, (T, n, 1))).astype(F32)
    y = rng.standard_normal((T, D)).astype(F32) if post else None
    coef_prev = rng.uniform(0.1, 1.0, (T, n + n * n)).astype(F32)
    w = rng.uniform(0.5, 1.5, D).astype(F32)
    counter = cp.zeros(T, cp.uint32)
    for head in (False, True):
        rows = n if head else 2 * n + n * n
        fn = (rng.standard_normal((rows, n * D)) * 0.05).astype(np.float16)
        scale = rng.uniform(0.5, 2.0, 3).astype(F32)
        base = rng.standard_normal(rows).astype(F32)
        iters = 0 if head else 20
        # the three launches
        gX = dev(X)
        if post:
            ops.hc_post(gX, dev(y), dev(coef_prev))
        ns = ops.hc_nsplit(n * D, T)
        part = cp.empty((T, ns, rows + 1), cp.float32)
        ops.hc_mix(gX, dev(fn), ops.DT_F16, rows, part, ns)
        u_ref, xn_ref = cp.empty((T, D), cp.float32), cp.empty((T, D), cp.float32)
        coef_ref = None if head else cp.empty((T, n + n * n), cp.float32)
        ops.hc_split_collapse(gX, part, ns, rows, dev(scale), dev(base), iters, 1e-6, 1e-6, head, u_ref, coef_ref,
                              dev(w), xn_ref)
        # one launch, twice (the second from the same inputs must give the same bits)
        outs = []
        for _ in range(2):
            hX = dev(X)
            ns2 = ops.hc_step_nsplit(n, D, T)
            part2 = cp.full((T, ns2, rows + 1), np.nan, cp.float32)
            u, xn = cp.full((T, D), np.nan, cp.float32), cp.full((T, D), np.nan, cp.float32)
            coef = None if head else cp.full((T, n + n * n), np.nan, cp.float32)
            ops.hc_step(hX, dev(y) if post else None, dev(coef_prev) if post else None, dev(fn), ops.DT_F16, rows,
                        part2, ns2, counter, dev(scale), dev(base), iters, 1e-6, 1e-6, head, u, coef, dev(w), xn)
            assert int(counter.sum()) == 0, "hc_step left its arrival counters non-zero"
            outs.append([host(a) for a in (hX, u, xn) + (() if head else (coef,))])
        for a, b in zip(*outs):
            np.testing.assert_array_equal(a, b)
        got = outs[0]
        # the general kernel (n, rows, dtype at run time) against the specialised one the engine picks for these
        # shapes: the same arithmetic up to the norm's double sum of squares (grouped by other threads), so X, u and
        # the coefficients are bit-identical and xn agrees to a float32 rounding
        assert ops.hc_step_kernel(n, D, rows, ops.DT_F16, (hX,)) == f"hc_step_n4_r{rows}_f16"
        gX2, u2, xn2 = dev(X), cp.full((T, D), np.nan, cp.float32), cp.full((T, D), np.nan, cp.float32)
        coef2 = None if head else cp.full((T, n + n * n), np.nan, cp.float32)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ops, "hc_step_kernel", lambda *a: "hc_step")
            ops.hc_step(gX2, dev(y) if post else None, dev(coef_prev) if post else None, dev(fn), ops.DT_F16, rows,
                        part2, ns2, counter, dev(scale), dev(base), iters, 1e-6, 1e-6, head, u2, coef2, dev(w), xn2)
        np.testing.assert_array_equal(host(gX2), got[0])
        np.testing.assert_array_equal(host(u2), got[1])
        rel_close(host(xn2), got[2], 1e-6)
        if not head:
            np.testing.assert_array_equal(host(coef2), got[3])
        rel_close(got[0], host(gX), 1e-6)
        rel_close(got[1], host(u_ref), 2e-5)
        rel_close(got[2], host(xn_ref), 2e-5)
        if not head:
            np.testing.assert_allclose(got[3], host(coef_ref), rtol=2e-5, atol=2e-6)


# ---- embedding -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ttype", ["F16", "F32", "BF16", "Q8_0"])
def test_embed_hc(rng, ttype):
    from ds4cupy.engines.cuda import ops
    V, D, n, T = 1000, 256, 4, 13
    e32 = rng.standard_normal((V, D)).astype(F32)
    if ttype == "F16":
        raw = e32.astype(np.float16)
        ref = raw.astype(F32)
    elif ttype == "BF16":
        raw = (e32.view(np.uint32) >> 16).astype(np.uint16)
        ref = (raw.astype(np.uint32) << 16).view(F32)
    elif ttype == "F32":
        raw, ref = e32, e32
    else:
        blocks = e32.reshape(V, D // 32, 32)
        d = (np.abs(blocks).max(-1, keepdims=True) / 127).astype(np.float16)
        qs = np.round(blocks / np.maximum(d.astype(F32), 1e-30)).astype(np.int8)
        raw = np.concatenate([d.view(np.uint8).reshape(V, D // 32, 2), qs.view(np.uint8)], axis=-1).reshape(V, -1)
        ref = (d.astype(F32) * qs.astype(F32)).reshape(V, D)
    ids = rng.integers(0, V, T).astype(np.int32)
    X = cp.empty((T, n, D), cp.float32)
    ops.embed_hc(dev(ids), dev(raw), ops.dtype_code(ttype), X)
    np.testing.assert_array_equal(host(X), np.repeat(ref[ids][:, None, :], n, axis=1))


# ---- router ----------------------------------------------------------------------------------------------------------
def np_router(logits, bias, tid2eid, ids, k, scale):
    sc = np.sqrt(nm.softplus(logits.astype(np.float64))).astype(np.float64)
    if tid2eid is not None:
        sel = tid2eid[ids].astype(np.int64)
    else:
        biased = sc + (bias if bias is not None else 0.0)
        sel = np.argsort(-biased, axis=-1, kind="stable")[:, :k]
    w = np.take_along_axis(sc, sel, axis=-1)
    w = (w / w.sum(axis=-1, keepdims=True) * scale).astype(F32)
    return sel, w


@pytest.mark.parametrize("size", ["tiny", "flash"])
@pytest.mark.parametrize("kind", ["bias", "nobias", "hash"])
def test_router_select(rng, size, kind):
    from ds4cupy.engines.cuda import ops
    E, k, T, V = DIMS[size]["E"], DIMS[size]["k"], 29, 500
    logits = (rng.standard_normal((T, E)) * 2).astype(F32)
    logits[0, :] = logits[0, 0]                  # all tied: lower indices win
    bias = rng.standard_normal(E).astype(F32) * 0.5 if kind == "bias" else None
    tid = np.stack([rng.permutation(E)[:k] for _ in range(V)]).astype(np.int32) if kind == "hash" else None
    ids = rng.integers(0, V, T).astype(np.int32)
    oi = cp.empty((T, k), cp.int32)
    ow = cp.empty((T, k), cp.float32)
    ops.router_select(dev(logits), None if bias is None else dev(bias), None if tid is None else dev(tid), dev(ids),
                      k, True, 1.5, oi, ow)
    sel, w = np_router(logits, bias, tid, ids, k, 1.5)
    gi, gw = host(oi), host(ow)
    # same picks (order of the selection) and weights: softplus in double, float sqrt, double normalisation
    np.testing.assert_array_equal(gi, sel)
    np.testing.assert_allclose(gw, w, rtol=1e-6)


# ---- attention ---------------------------------------------------------------------------------------------------------
def np_attention(q, kv_hist, pos, W, comp, vis_mask, sinks, fr):
    """Reference attention (ReferenceModel.attention): q [S,H,d] at positions pos; kv_hist [P_end, d] every raw row;
    comp [N, d]; vis_mask [S, N] or None."""
    S, H, d = q.shape
    allpos = np.arange(kv_hist.shape[0])
    win = (allpos[None, :] <= pos[:, None]) & (allpos[None, :] > pos[:, None] - W)
    keys, mask = kv_hist, win
    if comp is not None:
        keys = np.concatenate([kv_hist, comp])
        mask = np.concatenate([win, vis_mask], axis=1)
    scores = np.einsum("shd,kd->shk", q, keys) * (d ** -0.5)
    scores = np.where(mask[:, None, :], scores, -np.inf)
    m = np.maximum(scores.max(axis=-1), sinks[None, :])
    e = np.exp(scores - m[:, :, None])
    den = e.sum(-1) + np.exp(sinks[None, :] - m)
    o = (np.einsum("shk,kd->shd", e, keys) / den[:, :, None]).astype(F32)
    cos, sin = nm.rope_cos_sin(fr, pos)
    return nm.rope_apply(o, cos, sin, inverse=True)


@pytest.mark.parametrize("size", ["tiny", "flash"])
@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("S,p0,nsplit", [(1, 0, 1), (1, 777, 8), (1, 301, 3), (40, 0, 1), (33, 250, 2)])
def test_attention(rng, size, mode, S, p0, nsplit):
    from ds4cupy.engines.cuda import ops
    dm = DIMS[size]
    H, d, r, W = dm["H"], dm["hd"], dm["n_rot"], dm["W"]
    ratio = 4 if mode == 2 else 16
    K = 5 if mode == 2 else 0
    fr = freqs_for(r, True)
    P_end = p0 + S
    hist = rng.standard_normal((P_end, d)).astype(F32)
    ring = np.zeros((W, d), F32)
    for p in range(max(0, p0 - W), p0):
        ring[p % W] = hist[p]
    q = (rng.standard_normal((S, H, d)) * 2).astype(F32)
    sinks = rng.standard_normal(H).astype(F32)
    pos = np.arange(p0, P_end)
    N = P_end // ratio
    comp = rng.standard_normal((max(N, 1), d)).astype(F32) if mode else None
    vis = None
    idx = None
    if mode:
        vis = np.arange(comp.shape[0])[None, :] < ((pos + 1) // ratio)[:, None]
    if mode == 2:
        idx = np.full((S, K), -1, np.int32)
        for t in range(S):
            nv = int((pos[t] + 1) // ratio)
            pick = rng.permutation(nv)[:K] if nv else np.zeros(0, int)
            idx[t, :len(pick)] = pick
            m = np.zeros(comp.shape[0], bool)
            m[pick] = True
            vis[t] &= m
    ref = np_attention(q, hist, pos, W, comp if mode else None, vis, sinks, fr)
    part_ml = cp.empty((S, H, nsplit, 2), cp.float32)
    part_o = cp.empty((S, H, nsplit, d), cp.float32)
    out = cp.empty((S, H, d), cp.float32)
    ops.attention(dev(q), dev(ring), dev(hist[p0:]), None if comp is None else dev(comp),
                  None if idx is None else dev(idx), d_pos(p0), W, ratio if mode else 0, mode, dev(sinks), r,
                  dev(fr), part_ml, part_o, out, nsplit)
    rel_close(host(out), ref, 1e-5)


def test_kv_ring_store(rng):
    from ds4cupy.engines.cuda import ops
    W, d = 8, 64
    ring0 = rng.standard_normal((W, d)).astype(F32)
    for S, p0 in [(3, 6), (20, 5), (1, 100)]:
        cur = rng.standard_normal((S, d)).astype(F32)
        g = dev(ring0)
        ops.kv_ring_store(dev(cur), g, d_pos(p0))
        ref = ring0.copy()
        for t in range(S):
            ref[(p0 + t) % W] = cur[t]
        np.testing.assert_array_equal(host(g), ref)


# ---- compressor ----------------------------------------------------------------------------------------------------------
def np_compress_all(C, Z, ape, ratio, hd, norm_w, fr, qat):
    """ReferenceModel.compress fed every token at once (from position 0): the emitted rows."""
    overlap = ratio == 4
    rows = []
    prev_kv = prev_sc = None
    cur_kv, cur_sc = [], []
    for p in range(C.shape[0]):
        cur_kv.append(C[p])
        cur_sc.append(Z[p] + ape[p % ratio])
        if (p + 1) % ratio:
            continue
        ck, cs = np.stack(cur_kv), np.stack(cur_sc)
        if overlap:
            if prev_kv is None:
                pk, ps = np.zeros((ratio, hd), F32), np.full((ratio, hd), -np.inf, F32)
            else:
                pk, ps = prev_kv[:, :hd], prev_sc[:, :hd]
            skv, ssc = np.concatenate([pk, ck[:, hd:]]), np.concatenate([ps, cs[:, hd:]])
            prev_kv, prev_sc = ck, cs
        else:
            skv, ssc = ck, cs
        cur_kv, cur_sc = [], []
        e = np.exp(ssc - ssc.max(axis=0, keepdims=True))
        row = (e / e.sum(axis=0, keepdims=True) * skv).sum(axis=0).astype(F32)
        row = nm.rms_norm(row, norm_w)
        cos, sin = nm.rope_cos_sin(fr, np.array([p + 1 - ratio]))
        row = nm.rope_apply(row[None], cos, sin)[0]
        if qat == 1:
            row = row.copy()
            row[:hd - (2 * cos.shape[1])] = nm.fp8_sim(row[:hd - 2 * cos.shape[1]], 64)
        elif qat == 2:
            row = nm.fp4_sim(nm.hadamard(row), 32)
        rows.append(row)
    return np.stack(rows) if rows else np.zeros((0, hd), F32)


@pytest.mark.parametrize("case", [
    # (hd, ratio, n_rot, qat)
    ("tiny-main-csa", 96, 4, 32, 0), ("tiny-main-csa-fp8", 96, 4, 32, 1), ("tiny-hca", 96, 16, 32, 0),
    ("tiny-index", 64, 4, 32, 2), ("flash-main-csa", 512, 4, 64, 1), ("flash-hca", 512, 128, 64, 0),
    ("flash-hca-fp8", 512, 128, 64, 1), ("flash-index", 128, 4, 64, 2)], ids=lambda c: c[0])
def test_compressor_chunked_equals_reference(rng, case):
    from ds4cupy.engines.cuda import ops
    _, hd, ratio, r, qat = case
    overlap = ratio == 4
    lanes = 2 if overlap else 1
    cw = lanes * hd
    n_tok = 3 * ratio + 7 if ratio > 16 else 61
    C = rng.standard_normal((n_tok, cw)).astype(F32)
    Z = (rng.standard_normal((n_tok, cw)) * 2).astype(F32)
    ape = rng.standard_normal((ratio, cw)).astype(F32)
    norm_w = rng.uniform(0.5, 1.5, hd).astype(F32)
    fr = freqs_for(r, True)
    ref = np_compress_all(C, Z, ape, ratio, hd, norm_w, fr, qat)
    # feed the GPU in uneven chunks: decode-like singles, a chunk crossing several windows, one ending mid-window
    sizes, p = [], 0
    for s in [1, 2, ratio + 3, 1, 1, 2 * ratio, 5, 1]:
        if p >= n_tok:
            break
        s = min(s, n_tok - p)
        sizes.append(s)
        p += s
    if p < n_tok:
        sizes.append(n_tok - p)
    st_kv = cp.zeros((lanes * ratio, cw), cp.float32)
    st_sc = cp.zeros((lanes * ratio, cw), cp.float32)
    out = cp.full((n_tok // ratio + 1, hd), np.nan, cp.float32)
    gC, gZ, gape, gw, gfr = dev(C), dev(Z), dev(ape), dev(norm_w), dev(fr)
    p = 0
    for s in sizes:
        ops.compressor_step(gC[p:p + s], gZ[p:p + s], gape, st_kv, st_sc, d_pos(p), ratio, gw, r, gfr, qat, out)
        p += s
    got = host(out)[: ref.shape[0]]
    assert ref.shape[0] == n_tok // ratio
    if qat == 0:
        rel_close(got, ref, 2e-6)
    elif qat == 1:
        fp8_close(got[:, :hd - r], ref[:, :hd - r])      # FP8 nope dims
        rel_close(got[:, hd - r:], ref[:, hd - r:], 2e-6)  # rope dims: plain float32
    else:
        # FP4 after a Hadamard: a 1-ulp input change flips a code only at a boundary; codes are 1/8..1/2 apart
        assert (got != ref).mean() < 0.01
        rel_close(got, ref, 0.5)


# ---- indexer ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["tiny", "flash"])
@pytest.mark.parametrize("S,p0,N,K,nblk", [(1, 211, 53, 6, 16), (37, 0, 12, 6, 16), (20, 3000, 755, 512, 3),
                                            (1, 4099, 1025, 512, 16), (1, 65535, 16384, 512, 1),
                                            (1, 65535, 16384, 512, 264), (2, 262141, 65536, 512, 7)])
def test_indexer_scores_topk(rng, size, S, p0, N, K, nblk):
    """Scores for every visible row whatever the block count (a grid sized from ctx walks the rows the position
    makes visible), and the exact top-K with the lower-index tie rule over up to 65,536 rows."""
    from ds4cupy.engines.cuda import ops
    HI, ci = DIMS[size]["HI"], DIMS[size]["ci"]
    if size == "tiny" and K == 512:
        K = 6
    N = max(N, (p0 + S) // 4)
    q = rng.standard_normal((S, HI, ci)).astype(F32)
    wts = rng.standard_normal((S, HI)).astype(F32)
    k = rng.standard_normal((N, ci)).astype(F32)
    pos = np.arange(p0, p0 + S)
    nvis = (pos + 1) // 4
    ref = np.einsum("sh,shc->sc", wts * (ci ** -0.5) * (HI ** -0.5),
                    np.maximum(np.einsum("shd,cd->shc", q, k), 0.0))
    scores = cp.full((S, N), np.nan, cp.float32)
    ops.indexer_scores(dev(q), dev(wts), dev(k), d_pos(p0), 4, scores, nblk=nblk)
    got = host(scores)
    for t in range(S):
        if nvis[t]:
            rel_close(got[t, :nvis[t]], ref[t, :nvis[t]], 1e-5)
    # force exact ties in the last row, many of them at the K-th largest value, to check the lower-index rule
    if nvis[-1] > K + 2:
        nv = int(nvis[-1])
        row = got[-1]
        row[1] = row[2] = row[0]
        row[rng.choice(nv, min(nv - K, 40), replace=False)] = np.sort(row[:nv])[-K]
        scores = dev(got)
    out = cp.empty((S, K), cp.int32)
    ops.indexer_topk(scores, d_pos(p0), 4, out)
    sel = host(out)
    for t in range(S):
        nv = int(nvis[t])
        if nv <= K:
            exp = np.arange(nv)
        else:
            exp = np.sort(np.argsort(-got[t, :nv], kind="stable")[:K])
        np.testing.assert_array_equal(sel[t, :len(exp)], exp)
        assert np.all(sel[t, len(exp):] == -1)
