"""The software-pipelined grouped MoE kernels (moe_grouped_pipe_* of kernels/moe_grouped.cu, switch MOE_GROUPED_PIPE)
against the plain grouped kernels (moe_grouped_*) on the same inputs: bit-identical (np.testing.assert_array_equal),
since only the load schedule differs (two shared tiles, the next k-step's global loads issued before the current
step's mma) and the decode, the hi + lo split, the mma order and the float32 folds are the same code.

Shapes and loads are those of tests/test_gpu_moe_grouped.py (its helpers are imported): every grouped format, uneven
expert loads (an expert with 0 tokens, one with every token: several 64-pair tiles and a partial one), all pairs on
one expert, bad expert ids (NaN rows), partial row tiles, odd and even numbers of k-steps (Q8_0: 1, 3, 11, 14; the
256-column formats: 8 .. 24), the shared expert with accumulate, activations far outside fp16's range. Each output
buffer is pre-filled with garbage (NaN for one run, a number for the other) so an element only one kernel writes
shows. Plus: the switch picks the kernels; Q4_K scale bytes over their whole 6-bit range against float64 (the decode
both kernels share was rewritten as load + decode).

The pipelined kernels keep MG_PIPE_DEPTH (default 2) k-steps of loads in flight; to check the other depth, run this
file with DS4_NVRTC_OPTIONS="-DMG_PIPE_DEPTH=1" (a separate compile, cached apart).
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from ds4cupy.engines.cuda.q8_0r import Q8_0R
from ds4cupy.format import quants as Q
from gpu_util import GPU_MARKS
from test_gpu_moe_grouped import FORMATS, RTOL, fresh_rng, mg, rel_err, routing_ids

pytestmark = GPU_MARKS

# (gate/up type, down type, D, ff) beyond FORMATS: Q8_0 with one k-step of gate/up (D = 32) and 3 of down (ff = 96,
# a partial 128-row gate/up tile and a 32-row down tile)
SHAPES = FORMATS + [(T.Q8_0, T.Q8_0, 32, 96), (Q8_0R(96), Q8_0R(32), 32, 96)]
LOADS = [(37, 3, 7, "uneven"), (130, 4, 9, "uneven"), (70, 1, 5, "all_one"), (200, 6, 32, "random")]


def raw_weight(qtype, shape, rng, std=0.05):
    """Fresh random valid blocks on the device (Q8_0R: Q8_0 repacked into planes, one slab per matrix), as
    test_gpu_moe_grouped.make_weight without its float64 dequantization (not needed to compare two kernels)."""
    import cupy
    if isinstance(qtype, Q8_0R):
        from ds4cupy.engines.cuda.q8_0r import repack_q8_0
        w = cupy.asarray(Q.random_blocks(T.Q8_0, shape, rng, std))
        repack_q8_0(w, shape[-1], qtype.slab_rows)
        return w
    return cupy.asarray(Q.random_blocks(qtype, shape, rng, std))


def _both(fn):
    """fn(pipe, fill) -> list of cupy arrays, for the plain and the pipelined kernels; the host copies, pairwise."""
    import cupy
    plain = [cupy.asnumpy(a) for a in fn(False, np.nan)]
    piped = [cupy.asnumpy(a) for a in fn(True, -3.0)]
    return list(zip(plain, piped))


def _routed(gu_t, dn_t, D, ff, n, k, E, kind, rng, x_scale=1.0, bad=0.0):
    """The routed MoE (route, gate/up, down, slot sum) of fresh random inputs, plain and pipelined: pairs of (mid, yp,
    y). bad: the share of expert ids replaced by ids outside [0, E)."""
    import cupy
    ops = mg()
    gate = raw_weight(gu_t, (E, ff, D), rng)
    up = raw_weight(gu_t, (E, ff, D), rng)
    down = raw_weight(dn_t, (E, D, ff), rng)
    ids = routing_ids(kind, n, k, E, rng)
    if bad:
        hit = rng.random(ids.shape) < bad
        hit[0, 0] = True
        ids[hit] = rng.choice(np.array([-1, E, E + 3, 2**31 - 1], np.int64), hit.sum()).astype(np.int32)
    k = ids.shape[1]
    x = cupy.asarray((rng.standard_normal((n, D)) * x_scale).astype(np.float32))
    w = cupy.asarray(rng.uniform(0.1, 1.5, (n, k)).astype(np.float32))
    r = ops.route(cupy.asarray(ids), E, ops.alloc_routing(n * k, E))
    clamp = 0.5   # bites on a share of the rows at std 0.05 weights and unit activations

    def run(pipe, fill):
        mid = cupy.full((n, k, ff), fill, np.float32)
        yp = cupy.full((n * k, D), fill, np.float32)
        y = cupy.full((n, D), fill, np.float32)
        ops.gate_up(gate, up, gu_t, x, r, w, clamp, out=mid, pipe=pipe)
        ops.down(down, dn_t, mid, r, out=yp, pipe=pipe)
        ops.sum_slots(yp, k, out=y)
        return mid, yp, y

    return ids, _both(run)


@pytest.mark.parametrize("gu_t,dn_t,D,ff", SHAPES, ids=lambda v: getattr(v, "name", str(v)))
@pytest.mark.parametrize("n,k,E,kind", LOADS)
def test_pipelined_equals_plain(gu_t, dn_t, D, ff, n, k, E, kind):
    rng, seed = fresh_rng()
    ids, pairs = _routed(gu_t, dn_t, D, ff, n, k, E, kind, rng)
    tag = f"{gu_t}/{dn_t} D={D} ff={ff} n={n} kind={kind} seed={seed}"
    for name, (a, b) in zip(("mid", "yp", "y"), pairs):
        assert np.isfinite(a).all() and a.any(), f"{name} {tag}"     # every element written, not all zeros
        np.testing.assert_array_equal(b, a, err_msg=f"{name} {tag}")


@pytest.mark.parametrize("gu_t,dn_t,D,ff", [FORMATS[0], FORMATS[2]], ids=lambda v: getattr(v, "name", str(v)))
def test_bad_ids_and_activation_range(gu_t, dn_t, D, ff):
    """Ids outside [0, E) (NaN rows in both, at the same places) and activations of 1e6 (beyond fp16)."""
    rng, seed = fresh_rng()
    ids, pairs = _routed(gu_t, dn_t, D, ff, 150, 4, 12, "uneven", rng, x_scale=1e6, bad=0.05)
    bad = ((ids < 0) | (ids >= 12)).reshape(-1)
    (mid, mid_p), (yp, yp_p), (y, y_p) = pairs
    rows = mid.reshape(len(bad), -1)
    assert np.isnan(rows[bad]).all() and np.isfinite(rows[~bad]).all(), f"seed={seed}"
    assert np.isnan(yp[bad]).all() and np.isfinite(yp[~bad]).all(), f"seed={seed}"
    for name, a, b in (("mid", mid, mid_p), ("yp", yp, yp_p), ("y", y, y_p)):
        np.testing.assert_array_equal(b, a, err_msg=f"{name} {gu_t}/{dn_t} seed={seed}")


@pytest.mark.parametrize("gu_t,dn_t", [(T.IQ2_XXS, T.Q2_K), (T.Q4_K, T.Q4_K), ("Q8_0R", "Q8_0R")], ids=str)
def test_shared_expert_accumulate(gu_t, dn_t):
    """routed=None (one expert, every token: two 64-token tiles and a partial one), down adding onto out."""
    import cupy
    ops = mg()
    rng, seed = fresh_rng()
    D, ff, n = 512, 768, 150
    if gu_t == "Q8_0R":
        gu_t, dn_t = Q8_0R(ff), Q8_0R(D)
    gate = raw_weight(gu_t, (ff, D), rng)
    up = raw_weight(gu_t, (ff, D), rng)
    down = raw_weight(dn_t, (D, ff), rng)
    x = cupy.asarray(rng.standard_normal((n, D)).astype(np.float32))
    base = rng.standard_normal((n, D)).astype(np.float32)

    def run(pipe, fill):
        mid = cupy.full((n, 1, ff), fill, np.float32)
        ops.gate_up(gate, up, gu_t, x, None, None, 0.5, out=mid, pipe=pipe)
        out = cupy.asarray(base)
        ops.down(down, dn_t, mid, None, out=out, accumulate=True, pipe=pipe)
        return mid, out

    for a, b in _both(run):
        assert np.isfinite(a).all(), f"seed={seed}"
        np.testing.assert_array_equal(b, a, err_msg=f"{gu_t}/{dn_t} seed={seed}")


def test_large_chunk_many_experts():
    """A chunk at the engine's scale of routing (512 tokens, 6 of 64 experts: ~48 pairs an expert, most tiles
    partial) with the q2 model's formats."""
    rng, seed = fresh_rng()
    _, pairs = _routed(T.IQ2_XXS, T.Q2_K, 512, 256, 512, 6, 64, "random", rng)
    for name, (a, b) in zip(("mid", "yp", "y"), pairs):
        assert np.isfinite(a).all(), f"{name} seed={seed}"
        np.testing.assert_array_equal(b, a, err_msg=f"{name} seed={seed}")


def test_q4_k_scales_full_range():
    """Q4_K blocks of random bytes (6-bit scales and mins over 0..63, both packings of q4_k_scale_min) against the
    float64 product of gguf's dequantization, through both kernels (their shared decode reads the three scale bytes
    of a sub-block into a register first); bound as tests/test_gpu_moe_grouped.py (RTOL)."""
    import cupy
    ops = mg()
    rng, seed = fresh_rng()
    D, ff, n = 256, 512, 70
    raw = rng.integers(0, 256, (D, ff // 256 * 144), dtype=np.uint8)
    blocks = raw.reshape(D, -1, 144)
    d = rng.uniform(1e-3, 2e-3, blocks.shape[:2]).astype(np.float16)
    dmin = rng.uniform(1e-4, 2e-4, blocks.shape[:2]).astype(np.float16)
    blocks[:, :, 0:2] = d.view(np.uint8).reshape(*d.shape, 2)
    blocks[:, :, 2:4] = dmin.view(np.uint8).reshape(*dmin.shape, 2)
    ref_w = Q.dequantize(raw, T.Q4_K, (D, ff)).astype(np.float64)
    mid = rng.standard_normal((n, ff)).astype(np.float32)
    ref = mid.astype(np.float64) @ ref_w.T
    w_dev, mid_dev = cupy.asarray(raw), cupy.asarray(mid)
    ys = [cupy.asnumpy(ops.down(w_dev, T.Q4_K, mid_dev, None, pipe=pipe)) for pipe in (False, True)]
    np.testing.assert_array_equal(ys[1], ys[0], err_msg=f"seed={seed}")
    assert rel_err(ys[0], ref) <= RTOL, f"seed={seed}: {rel_err(ys[0], ref):.1e}"


def test_switch_picks_the_kernels(monkeypatch):
    """pipe=None follows DS4CUPY_MOE_GROUPED_PIPE; pipe=True / False override it (the launched kernels' names)."""
    import cupy
    ops = mg()
    rng, _ = fresh_rng()
    launched = []
    real = ops.get_kernel

    def spy(family, name):
        launched.append(name)
        return real(family, name)

    monkeypatch.setattr(ops, "get_kernel", spy)
    D, ff, n = 256, 256, 40
    gate = raw_weight(T.Q8_0, (ff, D), rng)
    down = raw_weight(T.Q8_0, (D, ff), rng)
    x = cupy.asarray(rng.standard_normal((n, D)).astype(np.float32))
    for env, pipe, expect in (("1", None, True), ("0", None, False), ("1", False, False), ("0", True, True)):
        monkeypatch.setenv("DS4CUPY_MOE_GROUPED_PIPE", env)
        launched.clear()
        mid = ops.gate_up(gate, gate, T.Q8_0, x, None, None, 10.0, pipe=pipe)
        ops.down(down, T.Q8_0, mid, None, pipe=pipe)
        pre = "moe_grouped_pipe_" if expect else "moe_grouped_"
        assert launched == [pre + "gate_up_q8_0", pre + "down_q8_0"], (env, pipe, launched)
