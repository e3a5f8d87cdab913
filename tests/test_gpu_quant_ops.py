"""GPU quantized products (ds4cupy.engines.cuda.quant_ops) and GPU random weights against the CPU oracles:
ds4cupy.format.quants.dequantize (== gguf.quants.dequantize, tests/test_quants.py) and float64 NumPy products."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from ds4cupy.format import quants as Q
from gpu_util import GPU_MARKS
from seeding import current_test_seed

pytestmark = GPU_MARKS

TYPES = [T.Q8_0, T.Q2_K, T.Q4_K, T.IQ2_XXS, T.MXFP4, T.NVFP4, T.F16, T.BF16, T.F32]
# float32 accumulation over <= 4096 products of O(1) terms: the rounding error grows like sqrt(n) * 2^-24 relative
# to the result's norm (~4e-6 at n = 4096 in the worst direction); 1e-5 leaves margin and still catches any wrong
# element, scale or layout (those give errors of order 1).
RTOL = 1e-5


def fresh_rng():
    seed = current_test_seed()       # fixed per test (tests/seeding.py), named in failure messages
    return np.random.default_rng(seed), seed


def rel_err(y, ref):
    y = np.asarray(y, dtype=np.float64)
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def make_weight(qtype, shape, rng, std=0.05):
    """(cupy raw array, float64 dequantized reference) for random valid blocks."""
    import cupy
    raw = Q.random_blocks(qtype, shape, rng, std)
    return cupy.asarray(raw), Q.dequantize(raw, qtype, shape).astype(np.float64)


def ids_name(t):
    return t.name


@pytest.mark.parametrize("qtype", TYPES, ids=ids_name)
@pytest.mark.parametrize("rows,cols", [(37, 1024), (300, 4096)])
def test_matvec(qtype, rows, cols):
    import cupy
    rng, seed = fresh_rng()
    w, wref = make_weight(qtype, (rows, cols), rng)
    x = rng.standard_normal(cols).astype(np.float32)
    y = quant_ops().matvec(w, qtype, cupy.asarray(x))
    ref = wref @ x.astype(np.float64)
    assert rel_err(cupy.asnumpy(y), ref) <= RTOL, f"{qtype.name} seed={seed}"


@pytest.mark.parametrize("qtype", [T.Q8_0, T.IQ2_XXS, T.BF16], ids=ids_name)
def test_matvec_out_and_stream(qtype):
    import cupy
    rng, seed = fresh_rng()
    w, wref = make_weight(qtype, (19, 512), rng)
    x = rng.standard_normal(512).astype(np.float32)
    out = cupy.full(19, np.nan, dtype=np.float32)
    xd = cupy.asarray(x)
    # the fill and the copy above run on the legacy default stream, which a non-blocking stream does not wait for:
    # without this the matvec could run first and the fill overwrite its result (seen on the H200 under load)
    cupy.cuda.Device().synchronize()
    stream = cupy.cuda.Stream(non_blocking=True)
    y = quant_ops().matvec(w, qtype, xd, out=out, stream=stream)
    stream.synchronize()
    assert y is out
    assert rel_err(cupy.asnumpy(out), wref @ x) <= RTOL, f"seed={seed}"


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_K, T.F16], ids=ids_name)
def test_matvec_group(qtype):
    import cupy
    rng, seed = fresh_rng()
    cols = 1024
    ws, refs = zip(*(make_weight(qtype, (r, cols), rng) for r in (5, 130, 33)))
    x = rng.standard_normal(cols).astype(np.float32)
    group = quant_ops().MatvecGroup(list(ws), qtype, cols)
    y = group.run(cupy.asarray(x))
    assert y.shape == (168,)
    for part, ref in zip(group.split(cupy.asnumpy(y)), refs):
        assert rel_err(part, ref @ x) <= RTOL, f"{qtype.name} seed={seed}"


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_K, T.F16], ids=ids_name)
def test_matvec_xgroup(qtype):
    """Row block g of one matrix times its own input x[g] (the grouped attention output projection)."""
    import cupy
    rng, seed = fresh_rng()
    groups, rows_per, cols = 4, 24, 768
    w, wref = make_weight(qtype, (groups * rows_per, cols), rng)
    x = rng.standard_normal((groups, cols)).astype(np.float32)
    out = cupy.full(groups * rows_per, np.nan, dtype=np.float32)
    quant_ops().matvec_xgroup(w, qtype, cupy.asarray(x), out=out)
    ref = np.einsum("grc,gc->gr", wref.reshape(groups, rows_per, cols), x.astype(np.float64)).reshape(-1)
    assert rel_err(cupy.asnumpy(out), ref) <= RTOL, f"{qtype.name} seed={seed}"
    with pytest.raises(ValueError, match="not a multiple"):
        quant_ops().matvec_xgroup(w, qtype, cupy.asarray(np.concatenate([x, x[:1]])))    # 96 rows, 5 groups


@pytest.mark.parametrize("qtype", TYPES, ids=ids_name)
@pytest.mark.parametrize("n", [1, 3, 17, 70])
def test_matmul(qtype, n):
    import cupy
    rng, seed = fresh_rng()
    rows, cols = 67, 768
    w, wref = make_weight(qtype, (rows, cols), rng)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    y = quant_ops().matmul(w, qtype, cupy.asarray(x), precise=True)   # matmul.cu (tensor cores: test_gpu_matmul_mma)
    assert y.shape == (n, rows)
    assert rel_err(cupy.asnumpy(y), x.astype(np.float64) @ wref.T) <= RTOL, f"{qtype.name} n={n} seed={seed}"


@pytest.mark.parametrize("qtype", TYPES, ids=ids_name)
def test_gpu_dequantize_bit_exact(qtype):
    import cupy
    rng, seed = fresh_rng()
    shape = (13, 512)
    raw = Q.random_blocks(qtype, shape, rng, 0.3)
    y = quant_ops().dequantize(cupy.asarray(raw), qtype, shape[1])
    assert np.array_equal(cupy.asnumpy(y), Q.dequantize(raw, qtype, shape)), f"{qtype.name} seed={seed}"


# ---- MoE -------------------------------------------------------------------------------------------------------------
def silu64(g):
    return g / (1.0 + np.exp(-g))


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
            mid[t, j] = silu64(g) * u * weights[t, j]
            y[t] += down[e] @ mid[t, j]
    return mid, y


MOE_TYPES = [(T.IQ2_XXS, T.Q2_K), (T.Q4_K, T.Q4_K), (T.Q8_0, T.Q8_0), (T.MXFP4, T.NVFP4), (T.F16, T.BF16)]


@pytest.mark.parametrize("gu_type,down_type", MOE_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n", [1, 5])
def test_moe_routed(gu_type, down_type, n):
    import cupy
    ops = quant_ops()
    rng, seed = fresh_rng()
    E, D, ff, k = 9, 512, 768, 3
    gate, gate_ref = make_weight(gu_type, (E, ff, D), rng)
    up, up_ref = make_weight(gu_type, (E, ff, D), rng)
    down, down_ref = make_weight(down_type, (E, D, ff), rng)
    x = rng.standard_normal((n, D)).astype(np.float32)
    ids = np.stack([rng.choice(E, size=k, replace=False) for _ in range(n)]).astype(np.int32)
    weights = rng.uniform(0.1, 1.5, size=(n, k)).astype(np.float32)
    # a clamp at the median |u| makes both clamps (gate above, up on both sides) bite on a good share of the rows
    clamp = float(np.median(np.abs(up_ref[ids[0, 0]] @ x[0])))
    mid_ref, y_ref = moe_reference(gate_ref, up_ref, down_ref, x.astype(np.float64), ids, weights, clamp)
    assert np.mean(np.abs(np.einsum("fd,d->f", up_ref[ids[0, 0]], x[0])) > clamp) > 0.2
    mid = ops.moe_gate_up(gate, up, gu_type, cupy.asarray(x), cupy.asarray(ids), cupy.asarray(weights), clamp=clamp)
    assert mid.shape == (n, k, ff)
    assert rel_err(cupy.asnumpy(mid), mid_ref) <= RTOL, f"gate/up {gu_type.name} seed={seed}"
    y = ops.moe_down(down, down_type, mid, cupy.asarray(ids))
    assert y.shape == (n, D)
    assert rel_err(cupy.asnumpy(y), y_ref) <= RTOL, f"down {down_type.name} seed={seed}"


@pytest.mark.parametrize("qtype", [T.Q8_0, T.BF16], ids=ids_name)
def test_moe_shared_expert_and_accumulate(qtype):
    import cupy
    ops = quant_ops()
    rng, seed = fresh_rng()
    D, ff, n = 256, 512, 3
    gate, gate_ref = make_weight(qtype, (ff, D), rng)
    up, up_ref = make_weight(qtype, (ff, D), rng)
    down, down_ref = make_weight(qtype, (D, ff), rng)
    x = rng.standard_normal((n, D)).astype(np.float32)
    clamp = 0.3
    mid_ref, y_ref = moe_reference(gate_ref[None], up_ref[None], down_ref[None], x.astype(np.float64),
                                   np.zeros((n, 1), np.int64), np.ones((n, 1)), clamp)
    mid = ops.moe_gate_up(gate, up, qtype, cupy.asarray(x), clamp=clamp)
    assert rel_err(cupy.asnumpy(mid), mid_ref) <= RTOL, f"seed={seed}"
    base = rng.standard_normal((n, D)).astype(np.float32)
    out = cupy.asarray(base)
    ops.moe_down(down, qtype, mid, out=out, accumulate=True)
    assert rel_err(cupy.asnumpy(out) - base, y_ref) <= 1e-4 + RTOL, f"seed={seed}"  # base adds one f32 rounding


def test_moe_bad_expert_id_gives_nan_not_a_crash():
    import cupy
    ops = quant_ops()
    rng, _ = fresh_rng()
    gate, _ = make_weight(T.Q8_0, (4, 64, 128), rng)
    x = cupy.asarray(rng.standard_normal((1, 128)).astype(np.float32))
    ids = cupy.asarray(np.array([[1, 7]], dtype=np.int32))
    w = cupy.ones((1, 2), dtype=np.float32)
    mid = cupy.asnumpy(ops.moe_gate_up(gate, gate, T.Q8_0, x, ids, w))
    assert np.isfinite(mid[0, 0]).all() and np.isnan(mid[0, 1]).all()


def test_wrapper_errors_name_bad_values():
    import cupy
    ops = quant_ops()
    w = cupy.zeros((4, 34 * 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="136 bytes"):
        ops.matvec(w, T.Q8_0, cupy.zeros(256, np.float32))
    with pytest.raises(ValueError, match="float32"):
        ops.matvec(w, T.Q8_0, cupy.zeros(128, np.float64))
    with pytest.raises(ValueError, match="Q4_0"):
        ops.matvec(w, T.Q4_0, cupy.zeros(128, np.float32))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        ops.matvec(w, T.Q8_0, cupy.zeros(128, np.float32), out=cupy.zeros(5, np.float32))


# ---- random weights on the GPU -------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", TYPES, ids=ids_name)
@pytest.mark.parametrize("std", [0.02, 0.5])
def test_random_tensor_valid(qtype, std, seed):
    import cupy
    from ds4cupy.engines.cuda.random_weights import random_tensor
    shape = (3, 33, 1024)
    raw = random_tensor(qtype, shape, seed, std)
    assert raw.shape == Q.raw_shape(qtype, shape) and raw.dtype == Q.PLAIN_DTYPES.get(qtype, np.uint8)
    host = cupy.asnumpy(raw)
    data = host.view(np.uint8) if qtype == T.BF16 else host
    ref = np.asarray(gq.dequantize(data, qtype), dtype=np.float32).reshape(shape)
    assert np.array_equal(ref, Q.dequantize(host, qtype, shape))
    assert np.isfinite(ref).all()
    rms = float(np.sqrt(np.mean(ref.astype(np.float64) ** 2)))
    assert abs(rms / std - 1) <= 0.2, f"{qtype.name} rms={rms} std={std} seed={seed}"
    again = cupy.asnumpy(random_tensor(qtype, shape, seed, std))
    assert np.array_equal(host, again)
    assert not np.array_equal(host, cupy.asnumpy(random_tensor(qtype, shape, seed + 1, std)))


def quant_ops():
    from ds4cupy.engines.cuda import quant_ops as ops
    return ops
