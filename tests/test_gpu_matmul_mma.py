"""Prefill products on tensor cores (kernels/matmul_mma.cu through quant_ops.matmul / matmul_xgroup) against
float64 NumPy products of gguf-dequantized weights (ds4cupy.format.quants.dequantize == gguf.quants.dequantize,
tests/test_quants.py), on fresh random blocks and activations.

Tolerance RTOL_MMA = 2e-5 (relative Frobenius error of the whole product). The kernel's operands are exact up to
2^-21 of each activation block's max (hi + lo fp16 split; Q8_0 quants exact in fp16, the f16 block scale applied in
float32), so what remains is float32 accumulation: inside an mma the tensor cores truncate rather than round, a few
times 2^-23 of the 32-column partial, and the partials add in float32 FMAs; at cols <= 4096 that is ~1e-6 of the
result's norm. 2e-5 is twice the float32 kernels' bound (tests/test_gpu_quant_ops.py, 1e-5) and 10x below what
plain fp16 activations give on these shapes (~2e-4, computed in each test: a kernel that dropped the lo term or
rounded Q8_0 q * d to fp16 would fail), and any wrong element, scale or layout gives O(1).
"""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from ds4cupy.format import quants as Q
from gpu_util import GPU_MARKS
from seeding import current_test_seed

pytestmark = GPU_MARKS


@pytest.fixture(autouse=True)
def _path_on(monkeypatch):
    """Switch PREFILL_MMA on: the tensor-core path these tests check (off by default until verified on a GPU)."""
    monkeypatch.setenv("DS4CUPY_PREFILL_MMA", "1")


RTOL_MMA = 2e-5


def qo():
    from ds4cupy.engines.cuda import quant_ops
    return quant_ops


def fresh_rng():
    seed = current_test_seed()
    return np.random.default_rng(seed), seed


def rel_err(y, ref):
    return float(np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref))


def weight(fmt, rows, cols, rng, slab_rows=None, std=0.05):
    """(cupy weight array, qtype for quant_ops, float64 dequantized [rows, cols]) of random blocks; fmt "Q8_0R" is
    Q8_0 repacked with slabs of slab_rows rows (the whole matrix when None)."""
    import cupy
    base = T.Q8_0 if fmt == "Q8_0R" else fmt
    raw = Q.random_blocks(base, (rows, cols), rng, std)
    ref = Q.dequantize(raw, base, (rows, cols)).astype(np.float64)
    w = cupy.asarray(raw)
    if fmt != "Q8_0R":
        return w, base, ref
    s = slab_rows or rows
    qo().repack_q8_0(w, cols, s)
    return w, qo().Q8_0R(s), ref


def fp16_error(x, ref_w):
    """Relative error of the product with activations rounded to fp16 (what the hi + lo split avoids)."""
    ref = x.astype(np.float64) @ ref_w.T
    return rel_err(x.astype(np.float16).astype(np.float64) @ ref_w.T, ref)


def run_mma(w, t, x, rows, cols):
    """The mma kernel whatever n (use_mma would send n < 16 to matmul.cu): its bounds at n = 1, 5."""
    import cupy
    q = qo()
    n = x.shape[0]
    y = cupy.full((n, rows), np.nan, np.float32)
    rb = q._weight_geometry(w, t, cols, 2, "w")
    q._launch_mma(w, t, rb, x, cols, 0, y, rows, 0, n, rows, cols, 1, None)
    return y


FORMATS = [T.Q8_0, "Q8_0R", T.F16]
SHAPES = [(200, 1056), (67, 768), (296, 224)]   # rows not multiples of 128, cols = 32 x odd (not 768)


def fmt_id(f):
    return f if isinstance(f, str) else f.name


@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_id)
@pytest.mark.parametrize("n", [1, 17, 300])
def test_matmul_matches_float64(fmt, n):
    import cupy
    rng, seed = fresh_rng()
    for rows, cols in SHAPES:
        w, t, ref_w = weight(fmt, rows, cols, rng, slab_rows=40 if rows == 200 else None)
        x = rng.standard_normal((n, cols)).astype(np.float32)
        ref = x.astype(np.float64) @ ref_w.T
        xd = cupy.asarray(x)
        y = qo().matmul(w, t, xd)
        assert qo().use_mma(t, n) == (n >= qo().MMA_MIN_TOKENS)
        err = rel_err(cupy.asnumpy(y), ref)
        assert err <= RTOL_MMA, f"{fmt_id(fmt)} {rows}x{cols} n={n} err={err:.1e} seed={seed}"
        ym = cupy.asnumpy(run_mma(w, t, xd, rows, cols))
        err = rel_err(ym, ref)
        assert err <= RTOL_MMA, f"mma kernel {fmt_id(fmt)} {rows}x{cols} n={n} err={err:.1e} seed={seed}"
        if n > 1:
            assert fp16_error(x, ref_w) > 4 * RTOL_MMA      # the tolerance tells hi + lo from fp16 activations
        yp = cupy.asnumpy(qo().matmul(w, t, xd, precise=True))   # the float32 kernel, still reachable
        assert rel_err(yp, ref) <= 1e-5, f"precise {fmt_id(fmt)} n={n} seed={seed}"


def test_f16_rows_not_a_multiple_of_32():
    """F16 rows of 8 x odd elements: the last 32-column step is partial (zeros past the row's end)."""
    import cupy
    rng, seed = fresh_rng()
    rows, cols, n = 45, 1000, 130
    w, t, ref_w = weight(T.F16, rows, cols, rng)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    y = cupy.asnumpy(qo().matmul(w, t, cupy.asarray(x)))
    assert rel_err(y, x.astype(np.float64) @ ref_w.T) <= RTOL_MMA, f"seed={seed}"


@pytest.mark.parametrize("scale", [1e6, 1e-7])
def test_activation_range(scale):
    """Activations far outside fp16's range (1e6 > 65504) or deep in its subnormals (1e-7): the per-block power-of-two
    scale keeps them exact to 2^-21, so the bound holds unchanged; one block of zeros and one huge block per row."""
    import cupy
    rng, seed = fresh_rng()
    rows, cols, n = 130, 512, 40
    w, t, ref_w = weight(T.Q8_0, rows, cols, rng)
    x = (rng.standard_normal((n, cols)) * scale).astype(np.float32)
    x[:, 32:64] = 0.0
    x[:, 64:96] *= 1e3
    y = cupy.asnumpy(qo().matmul(w, t, cupy.asarray(x)))
    ref = x.astype(np.float64) @ ref_w.T
    assert np.isfinite(y).all()
    assert rel_err(y, ref) <= RTOL_MMA, f"scale {scale} seed={seed}"


def test_q8_0r_equals_gguf_layout_bitwise():
    """Same blocks in the two layouts: same fp16 operands and scales, same order: bit-identical products."""
    import cupy
    rng, seed = fresh_rng()
    rows, cols, n = 264, 768, 257
    raw = Q.random_blocks(T.Q8_0, (rows, cols), rng, 0.05)
    g = cupy.asarray(raw)
    r = g.copy()
    qo().repack_q8_0(r, cols, 24)
    x = cupy.asarray(rng.standard_normal((n, cols)).astype(np.float32))
    a = cupy.asnumpy(qo().matmul(g, T.Q8_0, x))
    b = cupy.asnumpy(qo().matmul(r, qo().Q8_0R(24), x))
    np.testing.assert_array_equal(a, b, err_msg=f"seed={seed}")


@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_id)
def test_bit_identical_run_to_run(fmt):
    import cupy
    rng, seed = fresh_rng()
    rows, cols, n = 300, 1024, 513
    w, t, _ = weight(fmt, rows, cols, rng)
    x = cupy.asarray(rng.standard_normal((n, cols)).astype(np.float32))
    out = cupy.full((n, rows), np.nan, np.float32)
    stream = cupy.cuda.Stream(non_blocking=True)
    a = cupy.asnumpy(qo().matmul(w, t, x))
    assert qo().matmul(w, t, x, out=out, stream=stream) is out
    stream.synchronize()
    np.testing.assert_array_equal(cupy.asnumpy(out), a, err_msg=f"seed={seed}")


@pytest.mark.parametrize("fmt", FORMATS, ids=fmt_id)
@pytest.mark.parametrize("n", [2, 17, 300])
def test_xgroup_equals_separate_products(fmt, n):
    """The grouped output projection in one launch: x [n, G * gin] (att [n, H, hd] reshaped), w [G * R, gin],
    out [n, G * R] == the G separate products x[:, g] @ w_g^T: bit for bit against the same kernel on per-group
    copies (same tiles, same order), within RTOL_MMA of float64, and the float32 fallback (n < 16 or precise)
    within 1e-5."""
    import cupy
    rng, seed = fresh_rng()
    G, R, gin = 4, 72, 224            # Q8_0R: one slab per group, 72 * 7 blocks % 8 == 0
    w, t, ref_w = weight(fmt, G * R, gin, rng, slab_rows=R)
    x = rng.standard_normal((n, G * gin)).astype(np.float32)
    xd = cupy.asarray(x)
    out = cupy.full((n, G * R), np.nan, np.float32)
    y = qo().matmul_xgroup(w, t, xd, G, out=out)
    assert y is out
    y = cupy.asnumpy(y)
    ref = np.concatenate([x[:, g * gin:(g + 1) * gin].astype(np.float64) @ ref_w[g * R:(g + 1) * R].T
                          for g in range(G)], axis=1)
    tol = RTOL_MMA if qo().use_mma(t, n) else 1e-5
    assert rel_err(y, ref) <= tol, f"{fmt_id(fmt)} n={n} seed={seed}"
    sep = np.concatenate([cupy.asnumpy(qo().matmul(w[g * R:(g + 1) * R], t,
                                                   cupy.ascontiguousarray(xd[:, g * gin:(g + 1) * gin])))
                          for g in range(G)], axis=1)
    np.testing.assert_array_equal(y, sep, err_msg=f"{fmt_id(fmt)} n={n} seed={seed}")
    yp = cupy.asnumpy(qo().matmul_xgroup(w, t, xd, G, precise=True))
    assert rel_err(yp, ref) <= 1e-5, f"precise {fmt_id(fmt)} n={n} seed={seed}"


def test_xgroup_flash_geometry():
    """The flash model's grouping (8 groups of 1024 rows, gin = 8 heads x 512) at a 300-token chunk, Q8_0R with one
    slab per group as the loader repacks it."""
    import cupy
    rng, seed = fresh_rng()
    G, R, gin, n = 8, 1024, 4096, 300
    raw = Q.random_blocks(T.Q8_0, (G * R, gin), rng, 0.02)
    w = cupy.asarray(raw)
    qo().repack_q8_0(w, gin, R)
    x = rng.standard_normal((n, G * gin)).astype(np.float32)
    y = cupy.asnumpy(qo().matmul_xgroup(w, qo().Q8_0R(R), cupy.asarray(x), G))
    for g in (0, 5, 7):     # three groups in float64 (all eight cost ~10 s of NumPy)
        wg = Q.dequantize(raw[g * R:(g + 1) * R], T.Q8_0, (R, gin)).astype(np.float64)
        ref = x[:, g * gin:(g + 1) * gin].astype(np.float64) @ wg.T
        assert rel_err(y[:, g * R:(g + 1) * R], ref) <= RTOL_MMA, f"group {g} seed={seed}"


def test_argument_errors_name_the_value():
    import cupy
    rng, _ = fresh_rng()
    w, t, _ = weight(T.Q8_0, 96, 256, rng)
    x = cupy.asarray(rng.standard_normal((20, 3 * 256)).astype(np.float32))
    with pytest.raises(ValueError, match="groups=5"):
        qo().matmul_xgroup(w, t, x, 5)                   # 768 columns do not split into 5 groups
    w7, _, _ = weight(T.Q8_0, 70, 256, rng)
    with pytest.raises(ValueError, match="70 rows.*groups=3"):
        qo().matmul_xgroup(w7, t, x, 3)
    flat = cupy.asarray(rng.standard_normal(20 * 256 + 1).astype(np.float32))
    with pytest.raises(ValueError, match="16-byte boundary"):      # the mma kernel's float4 loads (n = 20 >= 16)
        qo().matmul(w, t, flat[1:].reshape(20, 256))
