"""The grouped prefill MoE (ds4cupy.engines.cuda.moe_grouped, kernels/moe_grouped.cu) against NumPy: the device
routing sort exactly against numpy's stable argsort, the grouped GEMMs against float64 references built from
gguf-dequantized weights (ds4cupy.format.quants == gguf.quants, tests/test_quants.py), and the engine with the path on.

Tolerance (kernels/moe_grouped.cu header, "Numerics"). The mma operands are the blocks' integer codes (exact in fp16)
and the activations split into hi + lo fp16 under a power-of-two scale per 32 columns (2^-21 of the block's max);
sub-block scales and mins are applied in float32. What remains is float32 accumulation over cols / SB sub-blocks
(inside an mma the tensor cores truncate: a few 2^-23 of a sub-block's partial): ~1e-7..1e-6 of the result's norm at
these lengths (the NumPy emulation of that arithmetic, tests/test_moe_grouped.py: 1.3e-7 to 4.1e-7 at 1,024..4,096
columns for every format). RTOL = 2e-5 per product, against float64 products of the dequantized weights (gate/up:
mid from the float32 x; down: from the kernel's own mid, and the whole chain from the float64 mid) is twice the
float32 kernels' bound (tests/test_gpu_quant_ops.py, 1e-5) and over 10x below what fp16 operands give (~3e-4, computed
in test_grouped_moe_against_float64: a kernel that lost the lo term or rounded a weight to fp16 fails); any wrong
element, scale, min, sign or layout gives O(1).
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from ds4cupy.engines.cuda.q8_0r import Q8_0R
from ds4cupy.format import quants as Q
from gpu_util import GPU_MARKS
from seeding import current_test_seed

pytestmark = GPU_MARKS

RTOL = 2e-5


def mg():
    from ds4cupy.engines.cuda import moe_grouped
    return moe_grouped


def fresh_rng():
    seed = current_test_seed()
    return np.random.default_rng(seed), seed


def rel_err(y, ref):
    y = np.asarray(y, dtype=np.float64)
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def make_weight(qtype, shape, rng, std=0.05):
    """(cupy raw array, float64 dequantized reference) for fresh random valid blocks. qtype Q8_0R: Q8_0 blocks
    repacked on the device into planes, one slab per matrix (the engine's layout of Q8_0 stacks)."""
    import cupy
    if isinstance(qtype, Q8_0R):
        from ds4cupy.engines.cuda.q8_0r import repack_q8_0
        raw = Q.random_blocks(T.Q8_0, shape, rng, std)
        w = cupy.asarray(raw)
        repack_q8_0(w, shape[-1], qtype.slab_rows)
        return w, Q.dequantize(raw, T.Q8_0, shape).astype(np.float64)
    raw = Q.random_blocks(qtype, shape, rng, std)
    return cupy.asarray(raw), Q.dequantize(raw, qtype, shape).astype(np.float64)


def f16(a):
    """float64 values of a rounded to fp16 (round to nearest even, as the kernels' cvt.rn.f16)."""
    return np.asarray(a, np.float32).astype(np.float16).astype(np.float64)


def silu64(g):
    return g / (1.0 + np.exp(-g))


def gate_up_ref(gate, up, x, ids, weights, clamp):
    """mid[n, k, ff] in float64 (model.md §2.8); gate, up [E, ff, D], x [n, D], ids / weights [n, k]."""
    n, k = ids.shape
    mid = np.zeros((n, k, gate.shape[1]))
    for e in np.unique(ids):
        t, j = np.nonzero(ids == e)
        g = np.minimum(x[t] @ gate[e].T, clamp)
        u = np.clip(x[t] @ up[e].T, -clamp, clamp)
        mid[t, j] = silu64(g) * u * weights[t, j][:, None]
    return mid


def down_ref(down, mid, ids):
    """y[n, D] = sum_j down[ids[t, j]] @ mid[t, j] in float64."""
    n, k = ids.shape
    y = np.zeros((n, down.shape[1]))
    for e in np.unique(ids):
        t, j = np.nonzero(ids == e)
        np.add.at(y, t, mid[t, j] @ down[e].T)
    return y


def routing_ids(kind, n, k, E, rng):
    """Expert ids [n, k] (distinct per token, as the router picks them) with the load `kind`:
    'uneven': expert 0 gets no token, expert 1 every token (> one 64-pair tile when n > 64), the rest random;
    'all_one': k = 1 and every token on expert E - 1; 'random': uniform."""
    if kind == "all_one":
        return np.full((n, 1), E - 1, np.int32)
    if kind == "random":
        return np.stack([rng.choice(E, size=k, replace=False) for _ in range(n)]).astype(np.int32)
    rest = np.stack([rng.choice(np.arange(2, E), size=k - 1, replace=False) for _ in range(n)])
    ids = np.concatenate([np.ones((n, 1), np.int64), rest], axis=1)
    return rng.permuted(ids, axis=1).astype(np.int32)      # expert 1 in a random slot of each token


# ---- routing -------------------------------------------------------------------------------------------------------
def expected_routing(ids, E):
    """NumPy definition of moe_grouped_route: (offsets [E + 2], sorted [n_pairs], tiles [n_tiles, 3])."""
    flat = ids.reshape(-1).astype(np.int64)
    bucket = np.where((flat >= 0) & (flat < E), flat, E)
    order = np.argsort(bucket, kind="stable").astype(np.int32)
    counts = np.bincount(bucket, minlength=E + 1)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    tiles = [(b, offsets[b] + q, min(64, counts[b] - q)) for b in range(E + 1) for q in range(0, counts[b], 64)]
    return offsets, order, np.array(tiles, np.int32).reshape(-1, 3)


@pytest.mark.parametrize("n,k,E,kind", [(1, 1, 4, "random"), (37, 3, 7, "uneven"), (2048, 6, 256, "random"),
                                        (700, 6, 256, "uneven"), (150, 1, 9, "all_one"), (999, 8, 512, "random"),
                                        (301, 6, 256, "bad")])
def test_route_equals_numpy_stable_sort(n, k, E, kind):
    import cupy
    rng, seed = fresh_rng()
    if kind == "bad":   # ids outside [0, E) go to the bad-id bucket E
        ids = rng.integers(0, E, (n, k)).astype(np.int32)
        hit = rng.random((n, k)) < 0.05
        ids[hit] = rng.choice(np.array([-1, E, E + 7, 2**31 - 1, -(2**31)], np.int64), hit.sum()).astype(np.int32)
    else:
        ids = routing_ids(kind, n, k, E, rng)
    routing = mg().alloc_routing(n * k + 5, E)          # larger than needed: only n * k pairs are written and read
    for buf in (routing.offsets, routing.sorted, routing.tiles, routing.n_tiles):
        buf.fill(-77)
    r = mg().route(cupy.asarray(ids), E, routing)
    offsets, order, tiles = expected_routing(ids, E)
    n_tiles = int(routing.n_tiles.get()[0])
    assert n_tiles == len(tiles) <= mg().max_tiles(n * k, E), f"seed={seed}"
    np.testing.assert_array_equal(routing.offsets.get(), offsets, err_msg=f"seed={seed}")
    np.testing.assert_array_equal(routing.sorted.get()[: n * k], order, err_msg=f"seed={seed}")
    np.testing.assert_array_equal(routing.tiles.get()[:n_tiles], tiles, err_msg=f"seed={seed}")
    assert r.n_pairs == n * k and r.grid_tiles == mg().max_tiles(n * k, E)


# ---- grouped GEMMs -------------------------------------------------------------------------------------------------
# (gate/up type, down type, D, ff): the K-quants and IQ2_XXS need multiples of 256 for both reduction lengths; Q8_0
# takes multiples of 32 (one k-step), so its shapes leave partial row tiles (ff = 352: 128-row tiles; D = 448:
# 256-row tiles) and an odd number of k-steps (11 for down)
# (Q8_0R: slab = one expert matrix, gate/up ff rows, down D rows)
FORMATS = [(T.IQ2_XXS, T.Q2_K, 512, 768), (T.Q4_K, T.Q4_K, 768, 512), (T.Q8_0, T.Q8_0, 448, 352),
           (T.Q2_K, T.IQ2_XXS, 256, 256), (Q8_0R(352), Q8_0R(448), 448, 352)]


def _run_routed(gu_t, dn_t, D, ff, n, k, E, kind, rng, clamp_quantile=0.5):
    import cupy
    ops = mg()
    gate, gate_ref = make_weight(gu_t, (E, ff, D), rng)
    up, up_ref = make_weight(gu_t, (E, ff, D), rng)
    down, down_w = make_weight(dn_t, (E, D, ff), rng)
    x = rng.standard_normal((n, D)).astype(np.float32)
    ids = routing_ids(kind, n, k, E, rng)
    k = ids.shape[1]
    weights = rng.uniform(0.1, 1.5, size=(n, k)).astype(np.float32)
    # a clamp at the median |u| makes both clamps (gate above, up on both sides) bite on a good share of the rows
    clamp = float(np.quantile(np.abs(x[:4].astype(np.float64) @ up_ref[ids[0, 0]].T), clamp_quantile))
    routing = ops.alloc_routing(n * k, E)
    r = ops.route(cupy.asarray(ids), E, routing)
    mid = ops.gate_up(gate, up, gu_t, cupy.asarray(x), r, cupy.asarray(weights), clamp)
    yp = ops.down(down, dn_t, mid, r)
    y = ops.sum_slots(yp, k)
    return dict(gate=gate_ref, up=up_ref, down=down_w, x=x, ids=ids, weights=weights, clamp=clamp,
                mid=cupy.asnumpy(mid), yp=cupy.asnumpy(yp), y=cupy.asnumpy(y))


@pytest.mark.parametrize("gu_t,dn_t,D,ff", FORMATS, ids=lambda v: getattr(v, "name", str(v)))
@pytest.mark.parametrize("n,k,E,kind", [(37, 3, 7, "uneven"), (130, 4, 9, "uneven"), (70, 1, 5, "all_one"),
                                        (200, 6, 32, "random")])
def test_grouped_moe_against_float64(gu_t, dn_t, D, ff, n, k, E, kind):
    rng, seed = fresh_rng()
    o = _run_routed(gu_t, dn_t, D, ff, n, k, E, kind, rng)
    ids, x, c = o["ids"], o["x"].astype(np.float64), o["clamp"]
    assert o["mid"].shape == (n, ids.shape[1], ff) and o["y"].shape == (n, D)
    assert np.isfinite(o["mid"]).all() and np.isfinite(o["y"]).all()
    tag = f"{gu_t}/{dn_t} n={n} kind={kind} seed={seed}"
    mid_ref = gate_up_ref(o["gate"], o["up"], x, ids, o["weights"], c)
    e_mid = rel_err(o["mid"], mid_ref)
    assert e_mid <= RTOL, f"gate/up {tag}: {e_mid:.1e}"
    e_down = rel_err(o["y"], down_ref(o["down"], o["mid"].astype(np.float64), ids))   # the kernel's own mid
    assert e_down <= RTOL, f"down {tag}: {e_down:.1e}"
    e_y = rel_err(o["y"], down_ref(o["down"], mid_ref, ids))                          # the whole chain
    assert e_y <= RTOL, f"gate/up -> down {tag}: {e_y:.1e}"
    # the tolerance tells float32-accurate from fp16 operands (the old path; a lost lo term is of the same order)
    mid16 = gate_up_ref(f16(o["gate"]), f16(o["up"]), f16(o["x"]), ids, o["weights"], c)
    assert rel_err(mid16, mid_ref) > 4 * RTOL, tag
    # the clamps bite: clamp is the median |up . x| of expert ids[0, 0] over tokens 0..3
    u = np.einsum("td,tjfd->tjf", x[:4], o["up"][ids[:4]])
    assert 0.1 < np.mean(np.abs(u) > c) < 0.9, tag


def test_per_pair_rows_and_slot_sum_order():
    """yp holds one row per pair p = t k + j (down of that pair alone); y adds a token's rows in slot order."""
    rng, seed = fresh_rng()
    o = _run_routed(T.Q8_0, T.Q8_0, 256, 256, 45, 3, 6, "random", rng)
    yp = o["yp"].reshape(45, 3, 256)
    ids = o["ids"]
    for j in range(3):
        ref = np.einsum("tdf,tf->td", o["down"][ids[:, j]], o["mid"][:, j].astype(np.float64))
        assert rel_err(yp[:, j], ref) <= RTOL, f"slot {j} seed={seed}"
    expect = (yp[:, 0] + yp[:, 1]) + yp[:, 2]                     # float32, in order
    np.testing.assert_array_equal(o["y"], expect)


def test_bad_expert_ids_give_nan_rows():
    import cupy
    ops = mg()
    rng, seed = fresh_rng()
    E, D, ff, n, k = 5, 256, 256, 80, 2
    gate, gate_ref = make_weight(T.IQ2_XXS, (E, ff, D), rng)
    down, down_w = make_weight(T.Q2_K, (E, D, ff), rng)
    ids = np.stack([rng.choice(E, size=k, replace=False) for _ in range(n)]).astype(np.int32)
    bad_tokens = [3, 40, 79]
    ids[3, 1], ids[40, 0], ids[79, 1] = -1, E, 1 << 30
    x = rng.standard_normal((n, D)).astype(np.float32)
    w = np.ones((n, k), np.float32)
    r = ops.route(cupy.asarray(ids), E, ops.alloc_routing(n * k, E))
    mid = cupy.asnumpy(ops.gate_up(gate, gate, T.IQ2_XXS, cupy.asarray(x), r, cupy.asarray(w), 10.0))
    y = cupy.asnumpy(ops.sum_slots(ops.down(down, T.Q2_K, cupy.asarray(mid), r), k))
    bad = (ids < 0) | (ids >= E)
    assert np.isnan(mid[bad]).all() and np.isfinite(mid[~bad]).all(), f"seed={seed}"
    good_tok = np.setdiff1d(np.arange(n), bad_tokens)
    assert np.isnan(y[bad_tokens]).all() and np.isfinite(y[good_tok]).all(), f"seed={seed}"
    mid_ref = gate_up_ref(gate_ref, gate_ref, x.astype(np.float64), np.where(bad, 0, ids), w, 10.0)
    assert rel_err(mid[~bad], mid_ref[~bad]) <= RTOL, f"seed={seed}"


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_K, "Q8_0R"], ids=str)
def test_shared_expert_and_accumulate(qtype):
    """routed=None: one expert, every token (2 token tiles + a partial one), weight 1; down adds onto out.
    Q8_0R: the engine's default layout of the shared expert (Q8_0 repacked, one slab per matrix)."""
    import cupy
    ops = mg()
    rng, seed = fresh_rng()
    D, ff, n = 512, 256, 150
    gu_t, dn_t = (Q8_0R(ff), Q8_0R(D)) if qtype == "Q8_0R" else (qtype, qtype)
    gate, gate_ref = make_weight(gu_t, (ff, D), rng)
    up, up_ref = make_weight(gu_t, (ff, D), rng)
    down, down_w = make_weight(dn_t, (D, ff), rng)
    x = rng.standard_normal((n, D)).astype(np.float32)
    clamp = 0.3
    mid = ops.gate_up(gate, up, gu_t, cupy.asarray(x), None, None, clamp)
    assert mid.shape == (n, 1, ff)
    ids0 = np.zeros((n, 1), np.int32)
    mid_ref = gate_up_ref(gate_ref[None], up_ref[None], x.astype(np.float64), ids0, np.ones((n, 1)), clamp)
    assert rel_err(cupy.asnumpy(mid), mid_ref) <= RTOL, f"seed={seed}"
    base = rng.standard_normal((n, D)).astype(np.float32)
    out = cupy.asarray(base)
    ops.down(down, dn_t, mid, None, out=out, accumulate=True)
    ref = down_ref(down_w[None], cupy.asnumpy(mid).astype(np.float64), ids0)
    # one float32 rounding of base + product on top of the fp32 accumulation
    assert rel_err(cupy.asnumpy(out) - base, ref) <= RTOL + 1e-5, f"seed={seed}"


@pytest.mark.parametrize("qtype", [T.Q2_K, T.IQ2_XXS, T.Q4_K, T.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("scale", [1e6, 1e-7])
def test_activations_of_any_range(qtype, scale):
    """Activations far outside fp16's range (1e6 > 65504) or deep in its subnormals (1e-7): the power-of-two scale per
    32 columns keeps them exact to 2^-21, so the bound holds unchanged (the engine needs no range condition); one row
    of zeros and one 32-column block of zeros (the scale's clamp, no NaN)."""
    import cupy
    ops = mg()
    rng, seed = fresh_rng()
    D, ff, n = 256, 512, 70
    down, down_w = make_weight(qtype, (D, ff), rng)
    mid = (rng.standard_normal((n, ff)) * scale).astype(np.float32)
    mid[5] = 0.0
    mid[6, 64:96] = 0.0
    y = cupy.asnumpy(ops.down(down, qtype, cupy.asarray(mid), None))
    ref = mid.astype(np.float64) @ down_w.T
    assert np.isfinite(y).all() and not y[5].any(), f"seed={seed}"
    assert rel_err(y, ref) <= RTOL, f"{qtype.name} scale {scale} seed={seed}: {rel_err(y, ref):.1e}"


def test_run_to_run_bit_identical():
    """Same inputs, fresh buffers (other garbage in them), twice: bit-identical mid, per-pair rows and sums."""
    import cupy
    ops = mg()
    rng, seed = fresh_rng()
    E, D, ff, n, k = 16, 512, 512, 300, 6
    gate, _ = make_weight(T.IQ2_XXS, (E, ff, D), rng)
    up, _ = make_weight(T.IQ2_XXS, (E, ff, D), rng)
    down, _ = make_weight(T.Q2_K, (E, D, ff), rng)
    x = cupy.asarray(rng.standard_normal((n, D)).astype(np.float32))
    ids = cupy.asarray(routing_ids("uneven", n, k, E, rng))
    w = cupy.asarray(rng.uniform(0.1, 1.5, (n, k)).astype(np.float32))
    outs = []
    for fill in (0.0, np.nan):
        routing = ops.alloc_routing(n * k, E)
        for buf in (routing.offsets, routing.sorted, routing.tiles, routing.n_tiles):
            buf.fill(-1)
        mid = cupy.full((n, k, ff), fill, np.float32)
        yp = cupy.full((n * k, D), fill, np.float32)
        y = cupy.full((n, D), fill, np.float32)
        r = ops.route(ids, E, routing)
        ops.gate_up(gate, up, T.IQ2_XXS, x, r, w, 10.0, out=mid)
        ops.down(down, T.Q2_K, mid, r, out=yp)
        ops.sum_slots(yp, k, out=y)
        outs.append([cupy.asnumpy(a) for a in (mid, yp, y)])
    for a, b in zip(*outs):
        assert np.isfinite(a).all()
        np.testing.assert_array_equal(a, b, err_msg=f"seed={seed}")


def test_no_host_sync_graph_capture():
    """The routed and shared calls capture into a CUDA graph (no host sync, no allocation with out=) and the replay
    equals the eager result bit for bit."""
    import cupy
    ops = mg()
    rng, seed = fresh_rng()
    E, D, ff, n, k = 8, 256, 256, 96, 3
    gate, _ = make_weight(T.Q4_K, (E, ff, D), rng)
    down, _ = make_weight(T.Q4_K, (E, D, ff), rng)
    sg, _ = make_weight(T.Q8_0, (ff, D), rng)
    sd, _ = make_weight(T.Q8_0, (D, ff), rng)
    x = cupy.asarray(rng.standard_normal((n, D)).astype(np.float32))
    ids = cupy.asarray(routing_ids("random", n, k, E, rng))
    w = cupy.asarray(rng.uniform(0.1, 1.5, (n, k)).astype(np.float32))
    routing = ops.alloc_routing(n * k, E)
    mid, mids = cupy.empty((n, k, ff), np.float32), cupy.empty((n, 1, ff), np.float32)
    yp, y = cupy.empty((n * k, D), np.float32), cupy.empty((n, D), np.float32)

    def step():
        r = ops.route(ids, E, routing)
        ops.gate_up(gate, gate, T.Q4_K, x, r, w, 10.0, out=mid)
        ops.down(down, T.Q4_K, mid, r, out=yp)
        ops.sum_slots(yp, k, out=y)
        ops.gate_up(sg, sg, T.Q8_0, x, None, None, 10.0, out=mids)
        ops.down(sd, T.Q8_0, mids, None, out=y, accumulate=True)

    step()
    eager = cupy.asnumpy(y)
    y.fill(0)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        step()
        graph = stream.end_capture()
    graph.launch(stream)
    stream.synchronize()
    np.testing.assert_array_equal(cupy.asnumpy(y), eager, err_msg=f"seed={seed}")


def test_wrapper_errors_name_bad_values():
    import cupy
    ops = mg()
    with pytest.raises(ValueError, match="MXFP4"):
        ops.gate_up(cupy.zeros((2, 64, 17 * 8), np.uint8), cupy.zeros((2, 64, 17 * 8), np.uint8), T.MXFP4,
                    cupy.zeros((4, 256), np.float32))
    with pytest.raises(ValueError, match="multiple of 256, got 320"):
        ops.gate_up(cupy.zeros((64, 66), np.uint8), cupy.zeros((64, 66), np.uint8), T.IQ2_XXS,
                    cupy.zeros((4, 320), np.float32))
    routing = ops.alloc_routing(10, 8)
    with pytest.raises(ValueError, match="12 pairs exceed"):
        ops.route(cupy.zeros((4, 3), np.int32), 8, routing)
    with pytest.raises(ValueError, match="n_expert=9"):
        ops.route(cupy.zeros((2, 3), np.int32), 9, routing)
    with pytest.raises(ValueError, match="int32"):
        ops.route(cupy.zeros((2, 3), np.int64), 8, routing)
    with pytest.raises(ValueError, match="n_expert=600"):
        ops.alloc_routing(10, 600)


# ---- the engine ----------------------------------------------------------------------------------------------------
def test_session_grouped_prefill_close_to_per_pair(tmp_path, monkeypatch):
    """A tiny q2 model prefilled with the grouped MoE (chunks of 96 >= MIN_TOKENS) against the per-pair float32 path
    (DS4CUPY_MOE_GROUPED=0): both float32-accurate, so the prefill logits agree to 1e-4 of max |logit| (summation
    order only: the NumPy emulation of the grouped arithmetic moves the tiny models' logits by <= 5.4e-7, see
    tests/test_gpu_model.py; a wrong kernel gives O(1), fp16 operands ~4e-3), the same greedy token, and the grouped
    path really ran (its tile count was written)."""
    from ds4cupy.engines.cuda.session import CudaModel
    from ds4cupy.format.config import ModelConfig
    from ds4cupy.format.model_file import ModelFile
    from ds4cupy.tools.make_model import tokenizer_fields, write_random_model
    rng, seed = fresh_rng()
    n_vocab, _ = tokenizer_fields(None)
    path = write_random_model(tmp_path / "tiny.gguf", ModelConfig.tiny(n_vocab), experts="q2", seed=5)
    mf = ModelFile(path)
    ids = rng.integers(0, mf.config.n_vocab, 200)
    logits = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("DS4CUPY_MOE_GROUPED", flag)
        s = CudaModel.from_file(mf, qat=False, memory="device", chunk=96).new_session(1024)
        assert any(s._moe_prefill.routed_ok) == (flag == "1")
        if flag == "1":
            s._moe_prefill.routing.n_tiles.fill(-1)
        logits[flag] = s.prefill(ids)
        if flag == "1":
            assert int(s._moe_prefill.routing.n_tiles.get()[0]) > 0
    a, b = logits["0"], logits["1"]
    rel = float(np.max(np.abs(b - a)) / np.max(np.abs(a)))
    print(f"grouped vs per-pair prefill: max|diff| / max|logit| = {rel:.2e}")
    assert rel <= 1e-4, f"seed={seed}"
    assert int(np.argmax(a)) == int(np.argmax(b)), f"seed={seed}"
