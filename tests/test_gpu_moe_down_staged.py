"""The one-token Q2_K down with the mid values and each warp's expert rows staged in shared memory (kernels/moe.cu,
moe_down_xsw_q2_k; switch MOE_DOWN_STAGED) against moe_down_xs_q2_k (MOE_STAGED alone), the per-lane
moe_down_fast_q2_k (both off) and float64.

Tolerance. The three kernels run the same slices per lane, the same expert order, the same float steps
(MoeQ2K::dot_rows_x) and the same warp sums; only where the bytes come from differs: bit for bit (tolerance 0).
Against float64 they carry the float32 error of test_gpu_quant_ops (RTOL).
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from gpu_util import GPU_MARKS
from test_gpu_quant_ops import RTOL, fresh_rng, make_weight, quant_ops, rel_err

pytestmark = GPU_MARKS

KERNELS = {"xsw": ("1", "1"), "xs": ("1", "0"), "fast": ("0", "0")}     # MOE_STAGED, MOE_DOWN_STAGED


def _down(monkeypatch, kernel: str, down, mid, ids, out=None, accumulate=False):
    import cupy
    staged, down_staged = KERNELS[kernel]
    monkeypatch.setenv("DS4CUPY_MOE_STAGED", staged)
    monkeypatch.setenv("DS4CUPY_MOE_DOWN_STAGED", down_staged)
    ops = quant_ops()
    n, k, ff = mid.shape
    assert ops._use_xsw(T.Q2_K, n, k, ff, down.shape[-1], down) == (kernel == "xsw"), "xsw not picked as asked"
    return cupy.asnumpy(ops.moe_down(down, T.Q2_K, mid, ids, out=out, accumulate=accumulate))


def _mid(rng, k, ff):
    m = rng.standard_normal((1, k, ff)) * np.exp2(rng.uniform(-8, 8, (1, k, ff // 64))).repeat(64, 2)
    return m.astype(np.float32)


@pytest.mark.parametrize("E,k,D,ff", [(16, 6, 4096, 2048), (9, 3, 1000, 1024), (12, 8, 37, 2048), (12, 1, 4096, 1024)])
def test_xsw_equals_xs_and_per_lane_bit_for_bit(monkeypatch, E, k, D, ff):
    """Flash shape (2,048 units of 2 rows: about one a warp), D not a multiple of 2 (the clamped tail row), k from 1
    to 8 (8 x 2,048: 150 KB of shared memory, one CTA an SM), ff 1,024 and 2,048."""
    import cupy
    rng, seed = fresh_rng()
    down, down_ref = make_weight(T.Q2_K, (E, D, ff), rng)
    mid = _mid(rng, k, ff)
    ids = rng.choice(E, size=(1, k), replace=False).astype(np.int32)
    args = (down, cupy.asarray(mid), cupy.asarray(ids))
    got = {name: _down(monkeypatch, name, *args) for name in KERNELS}
    np.testing.assert_array_equal(got["xsw"], got["xs"], err_msg=f"seed={seed}")
    np.testing.assert_array_equal(got["xsw"], got["fast"], err_msg=f"seed={seed}")
    ref = sum(down_ref[ids[0, j]] @ mid[0, j].astype(np.float64) for j in range(k))
    assert rel_err(got["xsw"][0], ref) <= RTOL, f"seed={seed}"


def test_xsw_accumulates_marks_bad_ids_and_takes_nan(monkeypatch):
    """accumulate=True onto out; an id outside [0, E) makes the token's output NaN without reading that expert; NaN
    and 1e30 values in mid: every bit as the per-lane kernel."""
    import cupy
    rng, seed = fresh_rng()
    E, k, D, ff = 7, 6, 700, 2048
    down, _ = make_weight(T.Q2_K, (E, D, ff), rng)
    mid = _mid(rng, k, ff)
    mid[0, 2, 77] = np.nan
    mid[0, 4, 1024:1088] *= 1e30
    base = rng.standard_normal((1, D)).astype(np.float32)
    ids = rng.choice(E, size=(1, k), replace=False).astype(np.int32)
    got = {name: _down(monkeypatch, name, down, cupy.asarray(mid), cupy.asarray(ids), out=cupy.asarray(base),
                       accumulate=True) for name in ("xsw", "fast")}
    np.testing.assert_array_equal(got["xsw"], got["fast"], err_msg=f"seed={seed}")
    bad = ids.copy()
    bad[0, 0] = -3
    got = {name: _down(monkeypatch, name, down, cupy.asarray(mid), cupy.asarray(bad)) for name in ("xsw", "fast")}
    assert np.isnan(got["xsw"]).all(), f"seed={seed}"
    np.testing.assert_array_equal(got["xsw"], got["fast"], err_msg=f"seed={seed}")


def test_rows_not_16_byte_multiples_take_xs(monkeypatch):
    """ff 512: Q2_K rows of 168 bytes, not a multiple of the 16-byte copies: xsw declines, xs runs (bit-identical to
    the per-lane kernel)."""
    import cupy
    rng, seed = fresh_rng()
    E, k, D, ff = 8, 6, 300, 512
    down, _ = make_weight(T.Q2_K, (E, D, ff), rng)
    mid = cupy.asarray(_mid(rng, k, ff))
    ids = cupy.asarray(rng.choice(E, size=(1, k), replace=False).astype(np.int32))
    monkeypatch.setenv("DS4CUPY_MOE_STAGED", "1")
    monkeypatch.setenv("DS4CUPY_MOE_DOWN_STAGED", "1")
    assert not quant_ops()._use_xsw(T.Q2_K, 1, k, ff, down.shape[-1], down)
    assert quant_ops()._use_xs(T.Q2_K, 1, k, ff)
    xs = cupy.asnumpy(quant_ops().moe_down(down, T.Q2_K, mid, ids))
    np.testing.assert_array_equal(xs, _down(monkeypatch, "fast", down, mid, ids), err_msg=f"seed={seed}")


def test_xsw_in_a_captured_graph_replays_new_inputs(monkeypatch):
    """Captured once, replayed with new mid values and expert ids in the same buffers: equal to eager per-lane
    launches on those inputs, bit for bit."""
    import cupy
    rng, seed = fresh_rng()
    E, k, D, ff = 10, 6, 1024, 2048
    down, _ = make_weight(T.Q2_K, (E, D, ff), rng)
    mid = cupy.asarray(_mid(rng, k, ff))
    ids = cupy.asarray(rng.choice(E, size=(1, k), replace=False).astype(np.int32))
    y = cupy.empty((1, D), cupy.float32)
    monkeypatch.setenv("DS4CUPY_MOE_STAGED", "1")
    monkeypatch.setenv("DS4CUPY_MOE_DOWN_STAGED", "1")
    ops = quant_ops()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        ops.moe_down(down, T.Q2_K, mid, ids, out=y)
        stream.begin_capture()
        ops.moe_down(down, T.Q2_K, mid, ids, out=y)
        graph = stream.end_capture()
    for _ in range(3):
        mid[...] = cupy.asarray(_mid(rng, k, ff))
        ids[...] = cupy.asarray(rng.choice(E, size=(1, k), replace=False).astype(np.int32))
        cupy.cuda.Device().synchronize()
        graph.launch(stream=stream)
        stream.synchronize()
        got = cupy.asnumpy(y)
        np.testing.assert_array_equal(got, _down(monkeypatch, "fast", down, mid, ids), err_msg=f"seed={seed}")
