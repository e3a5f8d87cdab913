"""Q8_0 weights repacked into planes (Q8_0R, ds4cupy.engines.cuda.q8_0r) on the GPU: the repack against the NumPy
definition of the layout (bit for bit, every path of the in-place algorithm), its inverse, and every quant_ops
consumer (matvec, matvec_xgroup, MatvecGroup, matmul, dequantize, moe_gate_up, moe_down) against
ds4cupy.format.quants.dequantize + float64 products on fresh random blocks, at every launch geometry, and against
the GGUF-layout kernels on the same weights; then a tiny model with Q8_0 experts repacked vs not.

Shapes: odd row counts (not multiples of any CTA's rows), cols = 32 x odd where the slab alignment allows
(slab_rows * cols / 32 % 8 == 0: then rows are multiples of 8), several slabs per matrix.
"""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from ds4cupy.format import quants as Q
from gpu_util import GPU_MARKS
from seeding import current_test_seed

pytestmark = GPU_MARKS

# as tests/test_gpu_quant_ops.py: float32 accumulation over <= 4096 products gives ~sqrt(n) 2^-24 of the result's norm
# (~4e-6 at 4096); 1e-5 still catches any wrong element, scale or layout (errors of order 1). Two float32 results,
# each within RTOL of the float64 product, are within 2 RTOL of each other.
RTOL = 1e-5
GEOMETRIES = [(nr, wpr) for nr in (1, 2, 4) for wpr in (1, 2, 4, 8)]


def fresh_rng():
    seed = current_test_seed()       # fixed per test (tests/seeding.py), named in failure messages
    return np.random.default_rng(seed), seed


def rel_err(y, ref):
    y = np.asarray(y, dtype=np.float64)
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def ops():
    from ds4cupy.engines.cuda import quant_ops
    return quant_ops


def q8r_weight(shape, rng, slab_rows=None, std=0.05):
    """(repacked cupy array, its Q8_0R marker, GGUF cupy array of the same blocks, float64 dequantized reference)."""
    import cupy
    raw = Q.random_blocks(T.Q8_0, shape, rng, std)
    gguf = cupy.asarray(raw)
    w = gguf.copy()
    s = slab_rows or shape[-2]
    assert ops().repack_q8_0(w, shape[-1], s) is w
    return w, ops().Q8_0R(s), gguf, Q.dequantize(raw, T.Q8_0, shape).astype(np.float64)


# ---- the repack ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,slab,staging", [
    ((37, 256), None, None),            # one slab, one batch
    ((96, 160), 24, None),              # 4 slabs of 24 rows x 5 blocks, one batch
    ((96, 160), 24, 2 * 24 * 170),      # batches of 2 slabs
    ((96, 160), 24, 3 * 24 * 170 - 1),  # batches of 2 slabs (3 do not fit)
    ((5, 40, 288), None, 40 * 306),     # an expert stack, one slab (expert) per batch
    ((72, 1056), None, 5 * 1122),       # slab larger than the staging buffer: in place, chunks of 5 rows
    ((72, 1056), 24, 1122),             # 3 slabs in place, chunks of 1 row
    ((2, 16, 96), 8, 8 * 102 - 1),      # 4 slabs in place, chunks of 7 rows
])
def test_repack_bit_exact_and_round_trip(shape, slab, staging):
    import cupy
    from ds4cupy.engines.cuda import q8_0r
    rng, seed = fresh_rng()
    raw = Q.random_blocks(T.Q8_0, shape, rng, 0.3)
    w = cupy.asarray(raw)
    ptr = w.data.ptr
    kw = {} if staging is None else {"staging_bytes": staging}
    out = q8_0r.repack_q8_0(w, shape[-1], slab, **kw)
    assert out is w and w.data.ptr == ptr and w.shape == raw.shape
    packed = cupy.asnumpy(w)
    assert np.array_equal(packed, q8_0r.repack_q8_0_np(raw, slab)), f"{shape} slab={slab} seed={seed}"
    back = q8_0r.unpack_q8_0(w, shape[-1], slab)
    assert np.array_equal(cupy.asnumpy(back), raw), f"seed={seed}"
    assert np.array_equal(cupy.asnumpy(w), packed)          # unpack does not touch its input


def test_repack_on_a_stream_and_errors():
    import cupy
    from ds4cupy.engines.cuda import q8_0r
    rng, seed = fresh_rng()
    raw = Q.random_blocks(T.Q8_0, (40, 96), rng, 0.3)
    w = cupy.asarray(raw)
    cupy.cuda.Device().synchronize()            # the upload ran on the default stream; s does not wait for it
    s = cupy.cuda.Stream(non_blocking=True)
    q8_0r.repack_q8_0(w, 96, 8, stream=s)
    s.synchronize()
    assert np.array_equal(cupy.asnumpy(w), q8_0r.repack_q8_0_np(raw, 8)), f"seed={seed}"
    with pytest.raises(ValueError, match="slab_rows=7"):
        q8_0r.repack_q8_0(cupy.asarray(raw), 96, 7)
    with pytest.raises(ValueError, match="16-byte aligned"):
        q8_0r.repack_q8_0(cupy.asarray(raw), 96, 20)          # 20 x 3 blocks
    with pytest.raises(ValueError, match="102 bytes"):
        q8_0r.repack_q8_0(cupy.asarray(raw), 128)
    with pytest.raises(ValueError, match="uint8"):
        q8_0r.repack_q8_0(cupy.zeros((40, 102), cupy.float32), 96)


def test_dequantize_bit_exact():
    import cupy
    rng, seed = fresh_rng()
    for shape, slab in (((40, 1056), None), ((96, 160), 24), ((37, 256), None)):
        w, qt, _, ref = q8r_weight(shape, rng, slab, std=0.3)
        y = ops().dequantize(w, qt, shape[-1])
        assert np.array_equal(cupy.asnumpy(y), ref.astype(np.float32)), f"{shape} seed={seed}"


# ---- decode products -------------------------------------------------------------------------------------------
MATVEC_SHAPES = [((40, 1056), None), ((72, 32 * 127), None), ((37, 768), None), ((1000, 288), None),
                 ((96, 160), 24), ((8, 32), None)]


@pytest.mark.parametrize("shape,slab", MATVEC_SHAPES)
def test_matvec(shape, slab):
    import cupy
    qo = ops()
    rng, seed = fresh_rng()
    rows, cols = shape
    w, qt, gguf, ref_w = q8r_weight(shape, rng, slab)
    x = rng.standard_normal(cols).astype(np.float32)
    ref = ref_w @ x.astype(np.float64)
    xd = cupy.asarray(x)
    old = cupy.asnumpy(qo.matvec(gguf, T.Q8_0, xd))
    for geometry in [None] + GEOMETRIES:
        out = cupy.full(rows, np.nan, np.float32)
        y = cupy.asnumpy(qo.matvec(w, qt, xd, out=out, geometry=geometry))
        assert not np.isnan(y).any(), f"{shape} {geometry}: rows not written, seed={seed}"
        assert rel_err(y, ref) <= RTOL, f"{shape} slab={slab} {geometry} seed={seed}"
        assert rel_err(y, old) <= 2 * RTOL, f"vs GGUF layout: {shape} {geometry} seed={seed}"


def test_matvec_on_a_stream():
    import cupy
    rng, seed = fresh_rng()
    w, qt, _, ref_w = q8r_weight((24, 512), rng)
    x = rng.standard_normal(512).astype(np.float32)
    out = cupy.full(24, np.nan, dtype=np.float32)
    xd = cupy.asarray(x)
    cupy.cuda.Device().synchronize()            # uploads and repack ran on the default stream
    stream = cupy.cuda.Stream(non_blocking=True)
    y = ops().matvec(w, qt, xd, out=out, stream=stream)
    stream.synchronize()
    assert y is out and rel_err(cupy.asnumpy(out), ref_w @ x) <= RTOL, f"seed={seed}"


@pytest.mark.parametrize("groups,rows_per,cols", [(4, 24, 160), (3, 3, 256), (8, 64, 1056), (2, 40, 32 * 127)])
def test_matvec_xgroup(groups, rows_per, cols):
    """Row block g of one matrix (slab g) times its own input x[g]: the grouped attention output projection."""
    import cupy
    qo = ops()
    rng, seed = fresh_rng()
    w, qt, gguf, ref_w = q8r_weight((groups * rows_per, cols), rng, rows_per)
    x = rng.standard_normal((groups, cols)).astype(np.float32)
    ref = np.einsum("grc,gc->gr", ref_w.reshape(groups, rows_per, cols), x.astype(np.float64)).reshape(-1)
    xd = cupy.asarray(x)
    old = cupy.asnumpy(qo.matvec_xgroup(gguf, T.Q8_0, xd))
    for geometry in [None] + [g for g in GEOMETRIES if rows_per % g[0] == 0]:
        out = cupy.full(groups * rows_per, np.nan, dtype=np.float32)
        y = cupy.asnumpy(qo.matvec_xgroup(w, qt, xd, out=out, geometry=geometry))
        assert rel_err(y, ref) <= RTOL, f"{groups}x{rows_per}x{cols} {geometry} seed={seed}"
        assert rel_err(y, old) <= 2 * RTOL, f"vs GGUF layout: {geometry} seed={seed}"
    if rows_per % 2:
        with pytest.raises(ValueError, match="rows per warp"):
            qo.matvec_xgroup(w, qt, xd, geometry=(2, 1))


@pytest.mark.parametrize("common_slab", [False, True])
def test_matvec_group(common_slab):
    """Matrices of different heights in one launch: each one slab (slab_rows 0 in the kernel), or a common slab."""
    import cupy
    qo = ops()
    rng, seed = fresh_rng()
    cols = 96
    made = [q8r_weight((r, cols), rng, 8 if common_slab else None) for r in (8, 136, 40)]
    x = rng.standard_normal(cols).astype(np.float32)
    for geometry in [None] + GEOMETRIES:
        group = qo.MatvecGroup([m[0] for m in made], [m[1] for m in made], cols, geometry=geometry)
        y = group.run(cupy.asarray(x))
        assert y.shape == (184,)
        for part, m in zip(group.split(cupy.asnumpy(y)), made):
            assert rel_err(part, m[3] @ x) <= RTOL, f"common_slab={common_slab} {geometry} seed={seed}"
    if common_slab:      # one marker for all
        y = qo.MatvecGroup([m[0] for m in made], qo.Q8_0R(8), cols).run(cupy.asarray(x))
        assert rel_err(cupy.asnumpy(y)[8:144], made[1][3] @ x) <= RTOL
    with pytest.raises(ValueError, match="one layout"):
        qo.MatvecGroup([made[0][0], made[1][2]], [made[0][1], T.Q8_0], cols)


# ---- int8 activations (optional path, not exact) ---------------------------------------------------------------
# quantize_q8x rounds each activation to its block's grid: |x - xq xd| <= (1/2 + 127 * 2^-24) xd. With those
# activations the dp4a products are exact integers scaled in float32, so against dequant(W) @ (xq * xd) the bound is
# the float path's RTOL; against the exact dequant(W) @ x each row carries at most sum_b sum_i |W_ri| * XQ_ERR * xd_b
# more (llama.cpp's q8_1 error level; typically ~0.5 % of |y| for Gaussian activations, printed).
XQ_ERR = 0.5 + 127 * 2.0 ** -24


@pytest.mark.parametrize("shape", [(1056,), (3, 160), (8, 4096)])
def test_quantize_q8x_bit_exact(shape):
    import cupy
    qo = ops()
    rng, seed = fresh_rng()
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 10, shape[:-1] + (1,))).astype(np.float32)
    x[..., 32:64] = 0                                    # an all-zero block: scale 0, quants 0
    xa = qo.quantize_q8x(cupy.asarray(x))
    xq, xd = qo.quantize_q8x_np(x)
    assert np.array_equal(cupy.asnumpy(xa.xq), xq) and np.array_equal(cupy.asnumpy(xa.xd), xd), f"seed={seed}"
    back = xq.astype(np.float64) * np.repeat(xd.astype(np.float64), 32, axis=-1)
    assert np.all(np.abs(back - x) <= XQ_ERR * np.repeat(xd, 32, axis=-1)), f"seed={seed}"
    assert np.abs(xq).max() <= 127 and (xd[..., 1] == 0).all() and (xq[..., 32:64] == 0).all()


def _q8x_check(y, w_ref, x, xa, what):
    """y (from int8 activations xa of x) against dequant(W) @ (xq xd) at RTOL and the exact product within the bound."""
    import cupy
    xq, xd = cupy.asnumpy(xa.xq), cupy.asnumpy(xa.xd).astype(np.float64)
    xhat = xq.astype(np.float64) * np.repeat(xd, 32, axis=-1)
    exact = np.einsum("grc,gc->gr", w_ref, x.astype(np.float64)).reshape(-1)
    quant = np.einsum("grc,gc->gr", w_ref, xhat).reshape(-1)
    assert rel_err(y, quant) <= RTOL, what
    bound = np.einsum("grc,gc->gr", np.abs(w_ref), np.repeat(xd, 32, axis=-1) * XQ_ERR).reshape(-1)
    assert np.all(np.abs(y - exact) <= bound + RTOL * np.linalg.norm(exact)), what
    return rel_err(y, exact)


@pytest.mark.parametrize("shape,slab", [((40, 1056), None), ((96, 160), 24), ((1000, 288), None)])
def test_matvec_int8_activations(shape, slab):
    import cupy
    qo = ops()
    rng, seed = fresh_rng()
    w, qt, gguf, ref_w = q8r_weight(shape, rng, slab)
    x = rng.standard_normal(shape[1]).astype(np.float32)
    xa = qo.quantize_q8x(cupy.asarray(x))
    for geometry in [None] + [g for g in GEOMETRIES if g[0] <= 2]:
        y = cupy.asnumpy(qo.matvec(w, qt, xa, out=cupy.full(shape[0], np.nan, np.float32), geometry=geometry))
        err = _q8x_check(y, ref_w[None], x[None], qo.Q8Activations(xa.xq[None], xa.xd[None]),
                         f"{shape} {geometry} seed={seed}")
    print(f"int8 activations {shape}: relative error vs the exact product {err:.1e}")
    with pytest.raises(ValueError, match="Q8_0R weights"):
        qo.matvec(gguf, T.Q8_0, xa)
    with pytest.raises(ValueError, match="1 or 2 rows per warp"):
        qo.matvec(w, qt, xa, geometry=(4, 1))


def test_matvec_xgroup_and_group_int8_activations():
    import cupy
    qo = ops()
    rng, seed = fresh_rng()
    groups, rows_per, cols = 4, 24, 160
    w, qt, _, ref_w = q8r_weight((groups * rows_per, cols), rng, rows_per)
    x = rng.standard_normal((groups, cols)).astype(np.float32)
    xa = qo.quantize_q8x(cupy.asarray(x))
    for geometry in [None, (1, 1), (2, 2), (1, 8)]:
        y = cupy.asnumpy(qo.matvec_xgroup(w, qt, xa, geometry=geometry))
        _q8x_check(y, ref_w.reshape(groups, rows_per, cols), x, xa, f"xgroup {geometry} seed={seed}")
    made = [q8r_weight((r, cols), rng) for r in (8, 136, 40)]
    x1 = x[0]
    xa1 = qo.quantize_q8x(cupy.asarray(x1))
    for geometry in [None, (1, 2), (2, 1)]:
        group = qo.MatvecGroup([m[0] for m in made], [m[1] for m in made], cols, geometry=geometry)
        y = cupy.asnumpy(group.run(xa1))
        ref = np.concatenate([m[3] for m in made])
        _q8x_check(y, ref[None], x1[None], qo.Q8Activations(xa1.xq[None], xa1.xd[None]), f"group {geometry}")


# ---- prefill -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 3, 17, 70])
def test_matmul(n):
    import cupy
    qo = ops()
    rng, seed = fresh_rng()
    for shape, slab in (((67, 768), None), ((72, 224), 24), ((40, 1056), None)):
        w, qt, gguf, ref_w = q8r_weight(shape, rng, slab)
        x = rng.standard_normal((n, shape[1])).astype(np.float32)
        xd = cupy.asarray(x)
        y = cupy.asnumpy(qo.matmul(w, qt, xd, precise=True))    # matmul.cu (tensor cores: test_gpu_matmul_mma)
        assert y.shape == (n, shape[0])
        assert rel_err(y, x.astype(np.float64) @ ref_w.T) <= RTOL, f"{shape} n={n} seed={seed}"
        y_gguf = cupy.asnumpy(qo.matmul(gguf, T.Q8_0, xd, precise=True))
        assert rel_err(y, y_gguf) <= 2 * RTOL, f"vs GGUF {shape} seed={seed}"
        if slab:   # a row slice on slab boundaries is a repacked matrix itself (the prefill's per-group products)
            ys = cupy.asnumpy(qo.matmul(w[slab:2 * slab], qt, xd, precise=True))
            assert rel_err(ys, x.astype(np.float64) @ ref_w[slab:2 * slab].T) <= RTOL, f"slice seed={seed}"


# ---- MoE -----------------------------------------------------------------------------------------------------------
def moe_reference(gate, up, down, x, ids, weights, clamp):
    """model.md §2.8 in float64: per (token, expert) SwiGLU with clamp, weight before down, sum over experts.
    gate, up: [E, ff, D], down: [E, D, ff], x: [n, D], ids/weights: [n, k]. Returns (mid [n, k, ff], y [n, D])."""
    n, k = ids.shape
    mid = np.zeros((n, k, gate.shape[1]))
    y = np.zeros((n, down.shape[1]))
    for t in range(n):
        for j in range(k):
            e = ids[t, j]
            g = np.minimum(gate[e] @ x[t], clamp)
            u = np.clip(up[e] @ x[t], -clamp, clamp)
            mid[t, j] = g / (1.0 + np.exp(-g)) * u * weights[t, j]
            y[t] += down[e] @ mid[t, j]
    return mid, y


@pytest.mark.parametrize("n", [1, 5])
def test_moe_routed(n):
    import cupy
    qo = ops()
    rng, seed = fresh_rng()
    E, D, ff, k = 5, 288, 96, 3            # gate/up rows of 9 blocks (ff = 96 rows per expert), down of 3 (D = 288)
    gate, qt_gu, gate_g, gate_ref = q8r_weight((E, ff, D), rng)
    up, _, up_g, up_ref = q8r_weight((E, ff, D), rng)
    down, qt_d, down_g, down_ref = q8r_weight((E, D, ff), rng)
    x = rng.standard_normal((n, D)).astype(np.float32)
    ids = np.stack([rng.choice(E, size=k, replace=False) for _ in range(n)]).astype(np.int32)
    weights = rng.uniform(0.1, 1.5, size=(n, k)).astype(np.float32)
    clamp = float(np.median(np.abs(up_ref[ids[0, 0]] @ x[0])))     # both clamps bite (as test_gpu_quant_ops)
    mid_ref, y_ref = moe_reference(gate_ref, up_ref, down_ref, x.astype(np.float64), ids, weights, clamp)
    xd, idd, wd = cupy.asarray(x), cupy.asarray(ids), cupy.asarray(weights)
    mid_old = cupy.asnumpy(qo.moe_gate_up(gate_g, up_g, T.Q8_0, xd, idd, wd, clamp=clamp))
    for geometry in [None] + [g for g in GEOMETRIES if g[0] <= 2]:
        mid = qo.moe_gate_up(gate, up, qt_gu, xd, idd, wd, clamp=clamp, geometry=geometry)
        assert mid.shape == (n, k, ff)
        assert rel_err(cupy.asnumpy(mid), mid_ref) <= RTOL, f"gate/up {geometry} seed={seed}"
        assert rel_err(cupy.asnumpy(mid), mid_old) <= 2 * RTOL, f"gate/up vs GGUF {geometry} seed={seed}"
        y = qo.moe_down(down, qt_d, mid, idd, geometry=geometry)
        assert rel_err(cupy.asnumpy(y), y_ref) <= RTOL, f"down {geometry} seed={seed}"
    with pytest.raises(ValueError, match="1 or 2 rows per warp"):
        qo.moe_down(down, qt_d, mid, idd, geometry=(4, 1))
    bad = cupy.asarray(np.array([[1, 7, 0]] * n, dtype=np.int32))     # an id outside [0, E): NaN, not a wild read
    mid_bad = cupy.asnumpy(qo.moe_gate_up(gate, up, qt_gu, xd, bad, wd, clamp=clamp))
    assert np.isfinite(mid_bad[:, 0]).all() and np.isnan(mid_bad[:, 1]).all()


def test_moe_shared_expert_and_accumulate():
    import cupy
    qo = ops()
    rng, seed = fresh_rng()
    D, ff, n = 256, 96 * 5, 3
    gate, qt, _, gate_ref = q8r_weight((ff, D), rng)
    up, _, _, up_ref = q8r_weight((ff, D), rng)
    down, qt_d, _, down_ref = q8r_weight((D, ff), rng)
    x = rng.standard_normal((n, D)).astype(np.float32)
    clamp = 0.3
    mid_ref, y_ref = moe_reference(gate_ref[None], up_ref[None], down_ref[None], x.astype(np.float64),
                                   np.zeros((n, 1), np.int64), np.ones((n, 1)), clamp)
    mid = qo.moe_gate_up(gate, up, qt, cupy.asarray(x), clamp=clamp)
    assert rel_err(cupy.asnumpy(mid), mid_ref) <= RTOL, f"seed={seed}"
    base = rng.standard_normal((n, D)).astype(np.float32)
    out = cupy.asarray(base)
    qo.moe_down(down, qt_d, mid, out=out, accumulate=True)
    assert rel_err(cupy.asnumpy(out) - base, y_ref) <= 1e-4 + RTOL, f"seed={seed}"  # base adds one f32 rounding


def test_wrapper_errors_name_bad_values():
    import cupy
    qo = ops()
    rng, _ = fresh_rng()
    w, qt, _, _ = q8r_weight((40, 96), rng)
    x = cupy.zeros(96, np.float32)
    with pytest.raises(ValueError, match=r"Q8_0R\(slab_rows=16\)"):
        qo.matvec(w, qo.Q8_0R(16), x)                     # 16 does not divide 40
    with pytest.raises(ValueError, match=r"Q8_0R\(slab_rows=5\)"):
        qo.matvec(w, qo.Q8_0R(5), x)                      # divides, but 5 x 3 blocks is not 16-byte aligned
    with pytest.raises(ValueError, match="102 bytes"):
        qo.matvec(w, qt, cupy.zeros(128, np.float32))
    with pytest.raises(ValueError, match=r"shape \(40,\)"):
        qo.matvec(w, qt, x, out=cupy.zeros(41, np.float32))


# ---- a whole model -------------------------------------------------------------------------------------------------
def test_tiny_model_repacked_equals_gguf_layout(tmp_path, monkeypatch):
    """ModelConfig.tiny with Q8_0 experts: every Q8_0 tensor but the embedding repacked (attention, grouped output
    projection with one slab per group, shared and routed experts, head) gives the logits of the GGUF layout up to
    float32 summation order (QAT off; the bound of test_gpu_model, 1e-3 x max |logit|, any layout error gives O(1)),
    the same greedy tokens, through a chunked prefill (matmul, per-group slices) and graph-captured decode steps
    (matvec, xgroup, MoE)."""
    from ds4cupy.engines.cuda.q8_0r import Q8_0R
    from ds4cupy.engines.cuda.session import CudaModel
    from ds4cupy.format.config import ModelConfig
    from ds4cupy.format.model_file import ModelFile
    from ds4cupy.tools.make_model import tokenizer_fields, write_random_model
    n_vocab, _ = tokenizer_fields(None)
    cfg = ModelConfig.tiny(n_vocab)
    mf = ModelFile(write_random_model(tmp_path / "tiny-q8.gguf", cfg, experts="q8_0", seed=5))
    rep = CudaModel.from_file(mf, qat=False, memory="device", chunk=64)
    monkeypatch.setenv("DS4CUPY_REPACK_Q8_0", "0")
    old = CudaModel.from_file(mf, qat=False, memory="device", chunk=64)
    packed = {n: t for n, t in rep.qtype.items() if isinstance(t, Q8_0R)}
    assert not any(isinstance(t, Q8_0R) for t in old.qtype.values())
    assert rep.qtype["token_embd.weight"] == old.qtype["token_embd.weight"]
    q8 = {n for n, t in old.qtype.items() if t == T.Q8_0} - {"token_embd.weight"}
    assert set(packed) == q8, sorted(q8 - set(packed))
    assert packed["blk.0.attn_output_a.weight"] == Q8_0R(cfg.o_lora_rank)
    assert packed["blk.0.ffn_gate_exps.weight"] == Q8_0R(cfg.n_ff_exp)
    a, b = rep.new_session(1024), old.new_session(1024)
    ids = np.random.default_rng(current_test_seed()).integers(0, n_vocab, 150)
    la, lb = a.prefill(ids), b.prefill(ids)
    worst = 0.0
    for step in range(25):
        rel = float(np.max(np.abs(la - lb)) / np.max(np.abs(lb)))
        worst = max(worst, rel)
        assert rel <= 1e-3, f"step {step}: max|diff| = {rel:.2e} * max|logit|"
        tok = int(np.argmax(lb))
        assert int(np.argmax(la)) == tok, f"greedy token differs at step {step}"
        la, lb = a.decode(tok), b.decode(tok)
    print(f"repacked vs GGUF layout: worst max|diff| / max|logit| {worst:.1e} over 25 logit vectors")
