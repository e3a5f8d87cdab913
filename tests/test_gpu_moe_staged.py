"""The one-token IQ2_XXS expert gate/up with its weights staged through shared memory (kernels/moe.cu,
moe_gate_up_i8s_iq2_xxs; switch MOE_STAGED) against the kernel it replaces (moe_gate_up_i8_iq2_xxs, switch MOE_I8)
and the float64 expert of test_gpu_quant_ops.

Tolerance. The staged kernel forms the same signed weight bytes (a PRMT from nibble tables instead of a 64-bit table
and XOR), the same three dp4a sums per sub-block, the same float steps in the same lane order and the same warp sums:
its output must equal the per-lane kernel's bit for bit (tolerance 0). Against float64 it carries that kernel's float32
error (test_gpu_moe_i8's RTOL).
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from gpu_util import GPU_MARKS
from test_gpu_quant_ops import RTOL, fresh_rng, make_weight, moe_reference, quant_ops, rel_err

pytestmark = GPU_MARKS


@pytest.fixture(autouse=True)
def _switches(monkeypatch):
    """MOE_I8 on for both sides, MOE_DOWN_STAGED off (tests/test_gpu_moe_down_staged.py has its kernel); each call
    sets MOE_STAGED itself."""
    monkeypatch.setenv("DS4CUPY_MOE_I8", "1")
    monkeypatch.setenv("DS4CUPY_MOE_DOWN_STAGED", "0")
    monkeypatch.delenv("DS4CUPY_MOE_STAGED", raising=False)


def _gate_up(monkeypatch, staged: bool, gate, up, x, ids, weights, clamp):
    import cupy
    monkeypatch.setenv("DS4CUPY_MOE_STAGED", "1" if staged else "0")
    ops = quant_ops()
    rb = gate.shape[-1]
    assert ops._use_i8s(T.IQ2_XXS, x.shape[0], x.shape[1], rb, gate, up) == (staged and rb % 16 == 0), \
        "the switch did not pick the kernel under test"
    mid = ops.moe_gate_up(gate, up, T.IQ2_XXS, x, ids, weights, clamp=clamp)
    return cupy.asnumpy(mid)


def _routing(rng, E, k):
    ids = rng.choice(E, size=(1, k), replace=False).astype(np.int32)
    return ids, rng.uniform(0.1, 1.5, size=(1, k)).astype(np.float32)


@pytest.mark.parametrize("E,k,D,ff", [(16, 6, 4096, 2048), (9, 3, 2048, 37), (5, 4, 4096, 6), (12, 8, 4096, 700)])
def test_staged_equals_per_lane_kernel_bit_for_bit(monkeypatch, E, k, D, ff):
    """Flash shape (6,144 warp units over the persistent grid: each warp runs several, through both of its buffers),
    ff not a multiple of the 2 rows a unit takes (37: the clamped tail row), fewer units than warps (ff 6), cols 2,048
    (rows of 528 bytes); activations with sub-block scales over 2^-8..2^8 and a clamp that bites."""
    import cupy
    rng, seed = fresh_rng()
    gate, gate_ref = make_weight(T.IQ2_XXS, (E, ff, D), rng)
    up, up_ref = make_weight(T.IQ2_XXS, (E, ff, D), rng)
    x = (rng.standard_normal((1, D)) * np.exp2(rng.uniform(-8, 8, (1, D // 32))).repeat(32, 1)).astype(np.float32)
    ids, w = _routing(rng, E, k)
    clamp = float(np.median(np.abs(up_ref[ids[0, 0]] @ x[0])))
    args = (gate, up, cupy.asarray(x), cupy.asarray(ids), cupy.asarray(w), clamp)
    staged = _gate_up(monkeypatch, True, *args)
    per_lane = _gate_up(monkeypatch, False, *args)
    np.testing.assert_array_equal(staged, per_lane, err_msg=f"seed={seed}")
    mid_ref, _ = moe_reference(gate_ref, up_ref, np.zeros((E, 1, ff)), x.astype(np.float64), ids, w, clamp)
    assert rel_err(staged, mid_ref) <= RTOL, f"seed={seed}"


def test_staged_bad_ids_nan_and_extreme_activations(monkeypatch):
    """An id outside [0, E) (negative and too large) gives a NaN row without reading weights, its neighbours are
    unaffected; NaN, 1e30 and 1e-30 activations in some sub-blocks, zeros in another: every bit equal to the
    per-lane kernel's."""
    import cupy
    rng, seed = fresh_rng()
    E, D, ff, k = 7, 4096, 130, 5
    gate, _ = make_weight(T.IQ2_XXS, (E, ff, D), rng)
    up, _ = make_weight(T.IQ2_XXS, (E, ff, D), rng)
    x = rng.standard_normal((1, D)).astype(np.float32)
    x[0, 64:96] = 0.0
    x[0, 200] = np.nan
    x[0, 1024:1056] *= 1e30
    x[0, 2048:2080] *= 1e-30
    ids = np.array([[3, -1, 6, 7, 0]], np.int32)
    w = rng.uniform(0.5, 1.5, (1, k)).astype(np.float32)
    args = (gate, up, cupy.asarray(x), cupy.asarray(ids), cupy.asarray(w), 10.0)
    staged = _gate_up(monkeypatch, True, *args)
    per_lane = _gate_up(monkeypatch, False, *args)
    assert np.isnan(staged[0, 1]).all() and np.isnan(staged[0, 3]).all(), f"seed={seed}"
    assert np.isfinite(staged[0, [0, 2, 4]]).all(), f"seed={seed}"
    np.testing.assert_array_equal(staged, per_lane, err_msg=f"seed={seed}")


def test_unaligned_rows_take_the_per_lane_kernel(monkeypatch):
    """cols 1,024: rows of 264 bytes, not a multiple of the 16-byte copies: the staged path declines
    (quant_ops._use_i8s) and the per-lane kernel runs; its result against float64."""
    import cupy
    rng, seed = fresh_rng()
    E, D, ff, k = 4, 1024, 48, 2
    gate, gate_ref = make_weight(T.IQ2_XXS, (E, ff, D), rng)
    up, up_ref = make_weight(T.IQ2_XXS, (E, ff, D), rng)
    x = rng.standard_normal((1, D)).astype(np.float32)
    ids, w = _routing(rng, E, k)
    monkeypatch.setenv("DS4CUPY_MOE_STAGED", "1")
    ops = quant_ops()
    assert not ops._use_i8s(T.IQ2_XXS, 1, D, gate.shape[-1], gate, up)
    mid = cupy.asnumpy(ops.moe_gate_up(gate, up, T.IQ2_XXS, cupy.asarray(x), cupy.asarray(ids), cupy.asarray(w),
                                       clamp=float("inf")))
    mid_ref, _ = moe_reference(gate_ref, up_ref, np.zeros((E, 1, ff)), x.astype(np.float64), ids, w, float("inf"))
    assert rel_err(mid, mid_ref) <= RTOL, f"seed={seed}"


def test_staged_in_a_captured_graph_replays_new_inputs(monkeypatch):
    """Captured once (as the decode graph does), replayed with new activations and new expert ids written into the
    same buffers: each replay equals an eager per-lane launch on those inputs bit for bit."""
    import cupy
    rng, seed = fresh_rng()
    E, D, ff, k = 10, 4096, 256, 6
    gate, _ = make_weight(T.IQ2_XXS, (E, ff, D), rng)
    up, _ = make_weight(T.IQ2_XXS, (E, ff, D), rng)
    x = cupy.asarray(rng.standard_normal((1, D)).astype(np.float32))
    ids_np, w_np = _routing(rng, E, k)
    ids, w = cupy.asarray(ids_np), cupy.asarray(w_np)
    mid = cupy.empty((1, k, ff), cupy.float32)
    monkeypatch.setenv("DS4CUPY_MOE_STAGED", "1")
    ops = quant_ops()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        ops.moe_gate_up(gate, up, T.IQ2_XXS, x, ids, w, clamp=8.0, out=mid)     # compile + first launch
        stream.begin_capture()
        ops.moe_gate_up(gate, up, T.IQ2_XXS, x, ids, w, clamp=8.0, out=mid)
        graph = stream.end_capture()
    for _ in range(3):
        x[...] = cupy.asarray(rng.standard_normal((1, D)).astype(np.float32))
        new_ids, new_w = _routing(rng, E, k)
        ids[...] = cupy.asarray(new_ids)
        w[...] = cupy.asarray(new_w)
        cupy.cuda.Device().synchronize()
        graph.launch(stream=stream)
        stream.synchronize()
        got = cupy.asnumpy(mid)
        want = _gate_up(monkeypatch, False, gate, up, x, ids, w, 8.0)
        np.testing.assert_array_equal(got, want, err_msg=f"seed={seed}")


def _down(monkeypatch, staged: bool, down, mid, ids, out=None, accumulate=False):
    import cupy
    monkeypatch.setenv("DS4CUPY_MOE_STAGED", "1" if staged else "0")
    ops = quant_ops()
    n, k, ff = mid.shape
    assert ops._use_xs(T.Q2_K, n, k, ff) == staged, "the switch did not pick the kernel under test"
    return cupy.asnumpy(ops.moe_down(down, T.Q2_K, mid, ids, out=out, accumulate=accumulate))


@pytest.mark.parametrize("E,k,D,ff", [(16, 6, 4096, 2048), (9, 3, 1000, 512), (9, 8, 37, 256), (12, 1, 4096, 1024)])
def test_down_xs_equals_per_lane_kernel_bit_for_bit(monkeypatch, E, k, D, ff):
    """Flash shape (2,048 warp units: several per warp), D not a multiple of the 2 rows a unit takes (1000, 37: the
    clamped tail row), ff from one block to 2,048, k from 1 to 8; mid with scales over 2^-8..2^8 per 64 values."""
    import cupy
    rng, seed = fresh_rng()
    down, down_ref = make_weight(T.Q2_K, (E, D, ff), rng)
    mid = (rng.standard_normal((1, k, ff)) * np.exp2(rng.uniform(-8, 8, (1, k, ff // 64))).repeat(64, 2))
    mid = mid.astype(np.float32)
    ids = rng.choice(E, size=(1, k), replace=False).astype(np.int32)
    args = (down, cupy.asarray(mid), cupy.asarray(ids))
    staged = _down(monkeypatch, True, *args)
    per_lane = _down(monkeypatch, False, *args)
    np.testing.assert_array_equal(staged, per_lane, err_msg=f"seed={seed}")
    ref = sum(down_ref[ids[0, j]] @ mid[0, j].astype(np.float64) for j in range(k))
    assert rel_err(staged[0], ref) <= RTOL, f"seed={seed}"


def test_down_xs_accumulates_and_marks_bad_ids(monkeypatch):
    """accumulate=True adds onto out (as the shared expert's sum is added to the routed one); an id outside [0, E)
    makes the token's whole output NaN; NaN / 1e30 values in mid; every bit equal to the per-lane kernel's."""
    import cupy
    rng, seed = fresh_rng()
    E, k, D, ff = 6, 6, 512, 2048
    down, _ = make_weight(T.Q2_K, (E, D, ff), rng)
    mid = rng.standard_normal((1, k, ff)).astype(np.float32)
    mid[0, 2, 77] = np.nan
    mid[0, 4, 1024:1088] *= 1e30
    base = rng.standard_normal((1, D)).astype(np.float32)
    ids = rng.choice(E, size=(1, k), replace=False).astype(np.int32)
    got = {}
    for staged in (True, False):
        out = cupy.asarray(base)
        got[staged] = _down(monkeypatch, staged, down, cupy.asarray(mid), cupy.asarray(ids), out=out,
                            accumulate=True)
    np.testing.assert_array_equal(got[True], got[False], err_msg=f"seed={seed}")
    bad = ids.copy()
    bad[0, 3] = E + 2
    for staged in (True, False):
        got[staged] = _down(monkeypatch, staged, down, cupy.asarray(mid), cupy.asarray(bad))
    assert np.isnan(got[True]).all(), f"seed={seed}"
    np.testing.assert_array_equal(got[True], got[False], err_msg=f"seed={seed}")
