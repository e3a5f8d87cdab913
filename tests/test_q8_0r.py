"""The Q8_0R plane layout (ds4cupy.engines.cuda.q8_0r) on the CPU: the NumPy definition against the GGUF decoder,
its inverse, the repack plan of the model tensors, the pseudo-qtype, and the launch-geometry rule of quant_ops.
The GPU kernels are checked against these definitions in tests/test_gpu_q8_0r.py."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from ds4cupy.engines.cuda import q8_0r
from ds4cupy.engines.cuda import quant_ops as qo
from ds4cupy.format import quants as Q
from ds4cupy.format.config import ModelConfig
from ds4cupy.format.layout import ds4_file_tensors
from seeding import current_test_seed


def fresh_rng():
    seed = current_test_seed()       # fixed per test (tests/seeding.py), named in failure messages
    return np.random.default_rng(seed), seed


def decode_planes(packed: np.ndarray, cols: int, slab_rows: int) -> np.ndarray:
    """float32 [..., rows, cols] read from Q8_0R bytes with the formulas of kernels/q8_0r.cuh (one element at a time
    in the index arithmetic, independent of repack_q8_0_np's reshapes)."""
    nblk = cols // 32
    flat = packed.reshape(-1)
    rows_total = flat.size // (34 * nblk)
    out = np.empty((rows_total, cols), np.float32)
    r = np.arange(rows_total)
    slab, lr = r // slab_rows, r % slab_rows
    sb = slab * slab_rows * 34 * nblk
    for c in range(cols):
        q = flat[sb + 32 * nblk * lr + c].view(np.int8).astype(np.float32)
        d_off = sb + 32 * nblk * slab_rows + 2 * (nblk * lr + c // 32)
        d = (flat[d_off].astype(np.uint16) | (flat[d_off + 1].astype(np.uint16) << 8)).view(np.float16)
        out[:, c] = q * d.astype(np.float32)
    return out.reshape(packed.shape[:-1] + (cols,))


@pytest.mark.parametrize("shape,slab", [((37, 256), None), ((24, 96), 8), ((24, 96), 24), ((5, 16, 96), 16),
                                        ((3, 40, 160), 8), ((1, 32), None)])
def test_layout_definition_decodes_like_gguf_and_inverts(shape, slab):
    rng, seed = fresh_rng()
    raw = Q.random_blocks(T.Q8_0, shape, rng, 0.3)
    packed = q8_0r.repack_q8_0_np(raw, slab)
    assert packed.shape == raw.shape and packed.dtype == np.uint8
    s = slab or shape[-2]
    assert np.array_equal(decode_planes(packed, shape[-1], s), Q.dequantize(raw, T.Q8_0, shape)), f"seed={seed}"
    assert np.array_equal(q8_0r.unpack_q8_0_np(packed, slab), raw), f"seed={seed}"
    if s < shape[-2] or len(shape) == 3:   # more than one slab: the layout is not a single-slab one
        assert not np.array_equal(packed, q8_0r.repack_q8_0_np(raw.reshape(-1, raw.shape[-1])).reshape(raw.shape))


def test_slab_rows_must_divide():
    raw = Q.random_blocks(T.Q8_0, (24, 96), np.random.default_rng(0), 0.3)
    with pytest.raises(ValueError, match="slab_rows=5"):
        q8_0r.repack_q8_0_np(raw, 5)


def test_marker():
    a = q8_0r.Q8_0R(24)
    assert a == qo.Q8_0R(24) and a != q8_0r.Q8_0R(8) and a != T.Q8_0 and hash(a) == hash(q8_0r.Q8_0R(24))
    assert a.name == "Q8_0R" and str(a) == "Q8_0R(slab_rows=24)"
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="slab_rows"):
            q8_0r.Q8_0R(bad)
    assert qo._qtype(a) is a and qo._qtype("Q8_0") == T.Q8_0


def test_slab_fits():
    assert q8_0r.slab_fits(8, 32) and q8_0r.slab_fits(1, 256) and q8_0r.slab_fits(3, 32 * 8)
    assert not q8_0r.slab_fits(37, 32 * 33) and not q8_0r.slab_fits(4, 96) and not q8_0r.slab_fits(8, 48)


@pytest.mark.parametrize("preset", ["tiny", "flash"])
def test_repack_plan_of_the_model_tensors(preset):
    cfg = ModelConfig.tiny(512) if preset == "tiny" else ModelConfig.flash(4)
    table = [(spec.name, t, Q.raw_shape(t, spec.shape)) for spec, t in ds4_file_tensors(cfg, "q8_0")]
    plan = q8_0r.repack_plan(table, cfg.o_groups)
    q8 = {n: sh for n, t, sh in table if t == T.Q8_0}
    assert set(plan) <= set(q8) and "token_embd.weight" not in plan
    for name, sh in q8.items():
        if name in q8_0r.NOT_REPACKED:
            continue
        assert name in plan, name      # every Q8_0 tensor of these presets fits 16-byte aligned slabs
        want = sh[-2] // cfg.o_groups if name.endswith("attn_output_a.weight") else sh[-2]
        assert plan[name] == want, name
        assert q8_0r.slab_fits(plan[name], sh[-1] // 34 * 32)
    assert any(len(q8[n]) == 3 for n in plan)      # expert stacks: one slab per expert


def test_repack_plan_skips_misaligned_and_other_types():
    table = [("blk.0.attn_q_a.weight", T.Q8_0, (37, 34 * 33)),      # 37 * 33 blocks: no 16-byte aligned slab
             ("blk.0.attn_kv.weight", T.Q8_0, (40, 34 * 33)),
             ("blk.0.attn_output_a.weight", T.Q8_0, (12, 34 * 8)),  # 3 groups of 4 rows x 8 blocks
             ("blk.0.attn_output_b.weight", T.F16, (64, 256)),
             ("token_embd.weight", T.Q8_0, (64, 34 * 8))]
    assert q8_0r.repack_plan(table, o_groups=3) == {"blk.0.attn_kv.weight": 40, "blk.0.attn_output_a.weight": 4}


def test_kernel_constant_read_back():
    assert q8_0r.kernel_constant("Q8R_INFLIGHT") == qo._Q8R_INFLIGHT >= 1
    with pytest.raises(LookupError, match="NOPE"):
        q8_0r.kernel_constant("NOPE")


@pytest.mark.parametrize("rows,cols,group_rows,dots", [(1024, 4096, 0, 1), (32768, 1024, 0, 1), (512, 4096, 0, 1),
                                                       (8192, 4096, 1024, 1), (4096, 8192, 0, 1), (9, 288, 3, 1),
                                                       (2048, 4096, 0, 2), (129280, 4096, 0, 1), (40, 32, 0, 1)])
def test_launch_geometry_rule(rows, cols, group_rows, dots):
    nr, wpr = qo.q8r_launch_geometry(rows, cols, group_rows, dots_per_row=dots, sm_count=132)
    assert nr in (1, 2, 4) and wpr in (1, 2, 4, 8)
    assert nr == max(n for n in (1, 2, 4) if not group_rows or group_rows % n == 0)   # the most rows x allows
    stage = max(1, qo._Q8R_INFLIGHT // (nr * dots)) * 32
    assert wpr == 1 or wpr * stage <= 2 * cols // 32          # every warp of a group gets a whole stage
    units = -(-rows // nr)
    target = 132 * qo.Q8R_WARPS_PER_SM
    assert wpr == 8 or units * wpr >= target or 2 * wpr * stage > 2 * cols // 32   # else more warps were due
    assert wpr == 1 or units * wpr // 2 < target                                 # and no more than due
    assert qo.q8r_launch_geometry(rows, cols, group_rows, 1, 8, sm_count=132) == (1, 8)   # explicit values kept
    nr2, _ = qo.q8r_launch_geometry(rows, cols, group_rows, dots_per_row=dots, sm_count=132, max_nr=2)
    assert nr2 == min(nr, 2)                                  # int8 activations: kernels of 1 or 2 rows per warp


def test_launch_geometry_of_the_measured_shapes():
    """The H200 measurements behind the defaults (BENCHMARKS.md, Q8_0R A/B): 4 rows per warp and one or two warps
    per row won on attn_output_a (8 groups x 1024 rows x 4096), attn_output_b (4096 x 8192) and the head."""
    for rows, cols, group_rows in ((8192, 4096, 1024), (4096, 8192, 0), (129280, 4096, 0)):
        nr, wpr = qo.q8r_launch_geometry(rows, cols, group_rows, sm_count=132)
        assert nr == 4 and wpr in (1, 2), (rows, cols)


def test_launch_geometry_rejects_bad_values():
    with pytest.raises(ValueError, match="rows per warp"):
        qo.q8r_launch_geometry(24, 256, 3, nr=2, sm_count=132)
    with pytest.raises(ValueError, match="rows per warp"):
        qo.q8r_launch_geometry(24, 256, 0, nr=3, sm_count=132)
    with pytest.raises(ValueError, match="warps per row group"):
        qo.q8r_launch_geometry(24, 256, 0, nr=1, wpr=3, sm_count=132)


def test_quantize_q8x_np_definition():
    """The int8 activation blocks (optional dp4a path): |x - xq xd| <= (1/2 + 127 * 2^-24) xd, |xq| <= 127 with the
    block's largest |x| at +-127, an all-zero block gives scale 0 and quants 0."""
    rng, seed = fresh_rng()
    x = (rng.standard_normal((5, 256)) * rng.uniform(1e-3, 1e3, (5, 1))).astype(np.float32)
    x[2, 64:96] = 0
    xq, xd = qo.quantize_q8x_np(x)
    assert xq.dtype == np.int8 and xd.dtype == np.float32 and xq.shape == x.shape and xd.shape == (5, 8)
    d = np.repeat(xd.astype(np.float64), 32, axis=-1)
    assert np.all(np.abs(xq * d - x) <= (0.5 + 127 * 2.0 ** -24) * d), f"seed={seed}"
    amax_q = np.abs(xq.astype(np.int32)).reshape(5, 8, 32).max(axis=2)
    assert xd[2, 2] == 0 and not xq[2, 64:96].any()
    assert np.all(amax_q[xd > 0] == 127), f"seed={seed}"
