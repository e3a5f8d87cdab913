"""The IQ2_XXS expert gate/up on integer dot products (kernels/moe.cu, moe_gate_up_i8_iq2_xxs; switch MOE_I8) against
the float64 expert of test_gpu_quant_ops and against the float kernel it replaces (moe_gate_up_fast_iq2_xxs).

Tolerance. The activations of each 32-column sub-block are held as integers on the grid 2^(e - 23) with 2^e > their
max |x| (error <= 2^-24 relative to that max, float32's own rounding unit), the products and sums of a sub-block
are exact integers, and a sub-block's sum takes two float32 roundings: the result carries the float32 error of the
float kernel (RTOL of test_gpu_quant_ops, 1e-5 relative in norm), and the two GPU kernels agree to 5e-6.
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from gpu_util import GPU_MARKS
from test_gpu_quant_ops import RTOL, fresh_rng, make_weight, moe_reference, quant_ops, rel_err

pytestmark = GPU_MARKS


@pytest.fixture(autouse=True)
def _switch(monkeypatch):
    """Each test sets DS4CUPY_MOE_I8 itself; nothing leaks to other tests."""
    monkeypatch.delenv("DS4CUPY_MOE_I8", raising=False)


def _gate_up(monkeypatch, on: bool, *args, **kw):
    monkeypatch.setenv("DS4CUPY_MOE_I8", "1" if on else "0")
    import cupy
    mid = quant_ops().moe_gate_up(*args, **kw)
    return cupy.asnumpy(mid)


@pytest.mark.parametrize("n,E,k,D,ff", [(1, 9, 3, 512, 768), (1, 16, 6, 4096, 2048), (5, 7, 2, 1280, 37),
                                        (3, 5, 4, 256, 6)])
def test_i8_gate_up_matches_float64_and_float_kernel(monkeypatch, n, E, k, D, ff):
    """Odd shapes: ff not a multiple of the 4 rows a warp takes (37, 6: the clamped tail rows), D from one block to
    the flash 4096, several tokens, a clamp that bites on both sides."""
    import cupy
    rng, seed = fresh_rng()
    gate, gate_ref = make_weight(T.IQ2_XXS, (E, ff, D), rng)
    up, up_ref = make_weight(T.IQ2_XXS, (E, ff, D), rng)
    x = (rng.standard_normal((n, D)) * rng.uniform(0.2, 5.0, (n, 1))).astype(np.float32)
    ids = np.stack([rng.choice(E, size=k, replace=False) for _ in range(n)]).astype(np.int32)
    weights = rng.uniform(0.1, 1.5, size=(n, k)).astype(np.float32)
    clamp = float(np.median(np.abs(up_ref[ids[0, 0]] @ x[0])))
    down_ref = np.zeros((E, 1, ff))
    mid_ref, _ = moe_reference(gate_ref, up_ref, down_ref, x.astype(np.float64), ids, weights, clamp)
    args = (gate, up, T.IQ2_XXS, cupy.asarray(x), cupy.asarray(ids), cupy.asarray(weights))
    mid_i8 = _gate_up(monkeypatch, True, *args, clamp=clamp)
    mid_f32 = _gate_up(monkeypatch, False, *args, clamp=clamp)
    assert mid_i8.shape == (n, k, ff)
    assert rel_err(mid_i8, mid_ref) <= RTOL, f"seed={seed}"
    assert rel_err(mid_i8, mid_f32.astype(np.float64)) <= 5e-6, f"seed={seed}"
    assert not np.array_equal(mid_i8, mid_f32) or D <= 256, "the switch did not reach the integer kernel"


@pytest.mark.parametrize("scale", [1e-14, 1e15, 3e-39])
def test_i8_activations_of_any_range(monkeypatch, scale):
    """Activations far from 1 (the power-of-two grid follows each sub-block's max), with one sub-block of zeros and
    one of mixed 1e4 / 1e-4; up = gate and no clamp, so mid = silu(g) g stays inside float32's range for 1e-14 and
    1e15. 3e-39 (float32 subnormals, the grid's floor 2^-126): every value finite, equal to the float kernel's to
    1e-37 absolute (both are ~1e-76 rounded to zero)."""
    import cupy
    rng, seed = fresh_rng()
    E, D, ff, k = 4, 1024, 64, 2
    gate, gate_ref = make_weight(T.IQ2_XXS, (E, ff, D), rng)
    x = rng.standard_normal((1, D))
    x[0, 64:96] = 0.0
    x[0, 128:160] *= np.where(np.arange(32) % 2 == 0, 1e4, 1e-4)
    x = (x * scale).astype(np.float32)
    ids = np.array([[1, 3]], np.int32)
    weights = np.ones((1, k), np.float32)
    args = (gate, gate, T.IQ2_XXS, cupy.asarray(x), cupy.asarray(ids), cupy.asarray(weights))
    mid = _gate_up(monkeypatch, True, *args, clamp=float("inf"))[0]
    assert np.isfinite(mid).all(), f"seed={seed}"
    if scale < 1e-30:
        np.testing.assert_allclose(mid, _gate_up(monkeypatch, False, *args, clamp=float("inf"))[0], rtol=0, atol=1e-37)
        return
    g = np.stack([gate_ref[e] @ x[0].astype(np.float64) for e in ids[0]])
    ref = g / (1.0 + np.exp(-g)) * g
    assert rel_err(mid, ref) <= RTOL, f"seed={seed} scale={scale}"


def test_i8_bad_ids_and_nan_inputs(monkeypatch):
    """An id outside [0, E) gives a NaN row without reading weights. A NaN activation makes the dots that read it
    NaN, which the SwiGLU clamps turn into silu(c) * (-c) * w exactly as in the float kernel (fminf / fmaxf drop a
    NaN): the two kernels give the same bits there."""
    import cupy
    rng, seed = fresh_rng()
    E, D, ff = 5, 512, 40
    gate, _ = make_weight(T.IQ2_XXS, (E, ff, D), rng)
    x = rng.standard_normal((2, D)).astype(np.float32)
    x[1, 300] = np.nan
    ids = np.array([[0, 7], [2, 1]], np.int32)
    w = rng.uniform(0.5, 1.5, (2, 2)).astype(np.float32)
    args = (gate, gate, T.IQ2_XXS, cupy.asarray(x), cupy.asarray(ids), cupy.asarray(w))
    mid = _gate_up(monkeypatch, True, *args, clamp=10.0)
    ref = _gate_up(monkeypatch, False, *args, clamp=10.0)
    assert np.isfinite(mid[0, 0]).all() and np.isnan(mid[0, 1]).all(), f"seed={seed}"
    np.testing.assert_array_equal(mid[1], ref[1])
    assert np.all(mid[1] < 0), f"seed={seed}"


def test_i8_one_token_staged_equals_per_lane_planes(monkeypatch):
    """One token (decode): the CTA stages the activation planes in shared memory; several tokens: each lane splits its
    own sub-blocks. Both compute the same integers and exponents, so a token's rows are bit-identical either way
    (the token alone, then next to a second token)."""
    import cupy
    rng, seed = fresh_rng()
    E, D, ff, k = 6, 4096, 96, 3
    gate, _ = make_weight(T.IQ2_XXS, (E, ff, D), rng)
    up, _ = make_weight(T.IQ2_XXS, (E, ff, D), rng)
    x = (rng.standard_normal((2, D)) * np.exp(rng.uniform(-8, 8, (2, D // 32)).repeat(32, 1))).astype(np.float32)
    ids = np.stack([rng.choice(E, size=k, replace=False) for _ in range(2)]).astype(np.int32)
    w = rng.uniform(0.5, 1.5, (2, k)).astype(np.float32)
    one = _gate_up(monkeypatch, True, gate, up, T.IQ2_XXS, cupy.asarray(x[:1]), cupy.asarray(ids[:1]),
                   cupy.asarray(w[:1]), clamp=5.0)
    two = _gate_up(monkeypatch, True, gate, up, T.IQ2_XXS, cupy.asarray(x), cupy.asarray(ids), cupy.asarray(w),
                   clamp=5.0)
    assert np.isfinite(one).all(), f"seed={seed}"
    np.testing.assert_array_equal(one[0], two[0])
