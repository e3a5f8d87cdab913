"""Switch INDEXER_FP4 on the GPU: compressor_emit_fp4 (the indexer rows stored packed) and indexer_scores_fp4 (exact
integer block dot products on the packed rows), kernels/compressor.cu and kernels/indexer.cu, against NumPy
(numerics.fp4_pack, float64 scores) and the float32 path they replace; then the tiny model with QAT on, switch on
vs off. Fresh random inputs every run (the `rng` fixture).

Tolerances.
- Packing: bit-exact (the rows are fp4_sim'd, so their codes + exponents are an exact representation).
- Scores vs float64: the block sums are exact integers and each block term sum * 2^(eq+ek-2) is exact in float32;
  what rounds is the 4-term block combine (3 roundings), the weight w * wscale (1), the per-thread fmaf over 4 heads
  (4) and the 4 shuffle additions: at most 12 roundings of 2^-24 on every term's path, so |score - exact| <=
  12 * 2^-24 * sum_h |w_h| * sum_b |term_hb| (we allow 16).
- Against indexer_scores (float32 FMAs on the unpacked rows): both compute every q . k exactly when each (head, row)
  pair's block exponent sums eq + ek are within 9 of each other (header of indexer_scores_fp4), and then add the heads
  in the same order: the scores must be bit-identical. The test asserts that condition holds for its inputs (unit-RMS
  Hadamard-rotated rows: the block amaxes of a row are within a factor 4) and then demands equality; a second case
  with per-block scales far apart only gets the float64 bound.
"""
from __future__ import annotations

import numpy as np
import pytest

from ds4cupy.engines import numerics as nm
from gpu_util import GPU_MARKS, gpu_available
from test_gpu_model import _lockstep_within, _on_and_off, tiny_file  # noqa: F401 (tiny_file: fixture)

cp = pytest.importorskip("cupy") if gpu_available() else None

pytestmark = GPU_MARKS

F32 = np.float32
U = 2.0 ** -24


def dev(a):
    return cp.asarray(np.ascontiguousarray(a))


def d_pos(p):
    return cp.asarray(np.array([p], np.int32))


def fp4_rows(rng, shape, block_spread=0):
    """fp4_sim(hadamard(x)) of unit Gaussian rows (the QAT'd indexer q / k); block_spread > 0 scales each block of 32
    after the rotation by 2^[-spread, spread] before the rounding (exponents far apart)."""
    x = nm.hadamard(rng.standard_normal(shape).astype(F32))
    if block_spread:
        c = shape[-1]
        s = np.exp2(rng.integers(-block_spread, block_spread + 1, shape[:-1] + (c // 32, 1)))
        x = (x.reshape(shape[:-1] + (c // 32, 32)) * s).reshape(shape).astype(F32)
    return nm.fp4_sim(x)


def exponents(x):
    """Block exponents as numerics.fp4_pack stores them: [..., c // 32]."""
    c = x.shape[-1]
    p = nm.fp4_pack(x)
    return p[..., c // 2: c // 2 + c // 32].view(np.int8).astype(np.int64)


def reference(q, wts, k, HI, c):
    """float64 scores [S, N] and the bound's scale sum_h |w_h| sum_b |term_hb|."""
    S, N = q.shape[0], k.shape[0]
    w = wts.astype(np.float64) * (c ** -0.5) * (HI ** -0.5)
    qb = q.astype(np.float64).reshape(S, HI, c // 32, 32)
    kb = k.astype(np.float64).reshape(N, c // 32, 32)
    terms = np.einsum("shbi,nbi->shnb", qb, kb)                      # exact: products of fp4 values, 32 terms
    dots = terms.sum(-1)
    ref = np.einsum("sh,shn->sn", w, np.maximum(dots, 0.0))
    scale = np.einsum("sh,shn->sn", np.abs(w), np.abs(terms).sum(-1))
    return ref, scale


def max_exponent_spread(q, k):
    """An upper bound of max over (t, h, s) of the range of eq_b + ek_b over the blocks b: the widest range of a q
    head's block exponents plus the widest of a key row's."""
    eq, ek = exponents(q), exponents(k)
    return int((eq.max(-1) - eq.min(-1)).max() + (ek.max(-1) - ek.min(-1)).max())


CASES = [  # (HI, c, S, p0, N, K, nblk)
    (4, 64, 1, 211, 53, 6, 16), (4, 64, 37, 0, 12, 6, 16), (4, 32, 5, 900, 230, 6, 4),
    (64, 128, 20, 3000, 755, 512, 3), (64, 128, 1, 4099, 1025, 512, 16), (64, 128, 1, 65535, 16384, 512, 1),
    (64, 128, 1, 65535, 16384, 512, 264), (48, 128, 2, 262141, 65536, 512, 7),
]


@pytest.mark.parametrize("HI,c,S,p0,N,K,nblk", CASES)
def test_scores_exact_blocks_and_topk_identical(rng, HI, c, S, p0, N, K, nblk):
    """indexer_scores_fp4 on packed keys: within the float64 bound (module docstring), bit-identical to
    indexer_scores on the float rows (the exactness condition is asserted for these inputs), and the same top-K."""
    from ds4cupy.engines.cuda import ops
    N = max(N, (p0 + S) // 4)
    q = fp4_rows(rng, (S, HI, c))
    k = fp4_rows(rng, (N, c))
    wts = rng.standard_normal((S, HI)).astype(F32)
    nvis = (np.arange(p0, p0 + S) + 1) // 4
    assert max_exponent_spread(q, k) <= 9             # the premise of bit-identity (module docstring)
    ref, scale = reference(q, wts, k, HI, c) if N <= 16384 else (None, None)
    kp = dev(nm.fp4_pack(k))
    new = cp.full((S, N + 2), np.nan, cp.float32)
    old = cp.full((S, N + 2), np.nan, cp.float32)
    ops.indexer_scores_fp4(dev(q), dev(wts), kp, d_pos(p0), 4, new, nblk)
    ops.indexer_scores(dev(q), dev(wts), dev(k), d_pos(p0), 4, old, nblk)
    got, want = cp.asnumpy(new), cp.asnumpy(old)
    for t in range(S):
        nv = int(nvis[t])
        assert np.all(np.isnan(got[t, nv:])), "wrote past nvis"
        np.testing.assert_array_equal(got[t, :nv], want[t, :nv])
        if ref is not None and nv:
            err = np.abs(got[t, :nv].astype(np.float64) - ref[t, :nv])
            assert np.all(err <= 16 * U * scale[t, :nv] + 1e-45), f"t={t}: worst {np.max(err / scale[t, :nv]):.2e}"
    outs = []
    for sc in (new, old):
        o = cp.empty((S, K), cp.int32)
        ops.indexer_topk(sc, d_pos(p0), 4, o)
        outs.append(cp.asnumpy(o))
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("c", [64, 128])
def test_scores_with_block_exponents_far_apart(rng, c):
    """Blocks scaled by 2^[-12, 12] (the float32 FMA chain of indexer_scores now rounds): still within the float64
    bound, which only the block combine and the head sum enter."""
    from ds4cupy.engines.cuda import ops
    HI, S, p0 = 64 if c == 128 else 4, 3, 4000
    N = (p0 + S) // 4 + 2
    q = fp4_rows(rng, (S, HI, c), block_spread=12)
    k = fp4_rows(rng, (N, c), block_spread=12)
    wts = rng.standard_normal((S, HI)).astype(F32)
    ref, scale = reference(q, wts, k, HI, c)
    out = cp.full((S, N), np.nan, cp.float32)
    ops.indexer_scores_fp4(dev(q), dev(wts), dev(nm.fp4_pack(k)), d_pos(p0), 4, out, 8)
    got = cp.asnumpy(out)
    for t in range(S):
        nv = (p0 + t + 1) // 4
        err = np.abs(got[t, :nv].astype(np.float64) - ref[t, :nv])
        assert np.all(err <= 16 * U * scale[t, :nv] + 1e-45), f"worst {np.max(err / scale[t, :nv]):.2e}"


def test_non_representable_q_is_scored_as_its_fp4_sim(rng):
    """A q that is not fp4_sim output (never sent by the session) gives exactly the scores of fp4_sim(q)."""
    from ds4cupy.engines.cuda import ops
    HI, c, S, p0 = 64, 128, 2, 2000
    N = (p0 + S) // 4 + 2
    q = nm.hadamard(rng.standard_normal((S, HI, c)).astype(F32))
    k = dev(nm.fp4_pack(fp4_rows(rng, (N, c))))
    wts = dev(rng.standard_normal((S, HI)).astype(F32))
    a = cp.full((S, N), np.nan, cp.float32)
    b = cp.full((S, N), np.nan, cp.float32)
    ops.indexer_scores_fp4(dev(q), wts, k, d_pos(p0), 4, a, 8)
    ops.indexer_scores_fp4(dev(nm.fp4_sim(q)), wts, k, d_pos(p0), 4, b, 8)
    np.testing.assert_array_equal(cp.asnumpy(a), cp.asnumpy(b))


@pytest.mark.parametrize("c", [64, 128])
def test_compressor_emit_fp4_packs_the_float_rows(rng, c):
    """compressor_step_fp4 fed the same uneven chunks as compressor_step (QAT mode 2: Hadamard + fp4_sim) stores
    exactly numerics.fp4_pack of its float rows, which unpack to them bit for bit; both leave the same state ring."""
    from ds4cupy.engines.cuda import ops
    r, n_tok = 32 if c == 64 else 64, 83
    cw = 2 * c
    C = rng.standard_normal((n_tok, cw)).astype(F32)
    Z = (rng.standard_normal((n_tok, cw)) * 2).astype(F32)
    ape = dev(rng.standard_normal((4, cw)).astype(F32))
    norm_w = dev(rng.uniform(0.5, 1.5, c).astype(F32))
    fr = dev(nm.rope_freqs(r, 160000.0, (16.0, 65536, 32.0, 1.0)))
    st = [[cp.zeros((8, cw), cp.float32) for _ in range(2)] for _ in range(2)]
    out_f = cp.full((n_tok // 4 + 2, c), np.nan, cp.float32)
    out_p = cp.full((n_tok // 4 + 2, nm.fp4_row_bytes(c)), 0xAB, cp.uint8)
    p = 0
    for s in [1, 2, 7, 1, 1, 8, 5, 1, 30, 27]:
        gC, gZ = dev(C[p:p + s]), dev(Z[p:p + s])
        ops.compressor_step(gC, gZ, ape, st[0][0], st[0][1], d_pos(p), 4, norm_w, r, fr, ops.QAT_HADAMARD_FP4, out_f)
        ops.compressor_step_fp4(gC, gZ, ape, st[1][0], st[1][1], d_pos(p), norm_w, r, fr, out_p)
        p += s
    assert p == n_tok
    rows = n_tok // 4
    f, pk = cp.asnumpy(out_f), cp.asnumpy(out_p)
    np.testing.assert_array_equal(pk[:rows], nm.fp4_pack(f[:rows]))
    np.testing.assert_array_equal(nm.fp4_unpack(pk[:rows], c).view(np.uint32), f[:rows].view(np.uint32))
    assert np.all(pk[rows:] == 0xAB)                                   # nothing written past the emitted rows
    for a, b in zip(st[0], st[1]):
        np.testing.assert_array_equal(cp.asnumpy(a), cp.asnumpy(b))


def test_graph_captured_shallow_replayed_deep(rng):
    """The grid comes from ctx, the work from the device position: a graph captured at position 5 and replayed at
    262,000 (65,500 visible rows) equals the eager launch there bit for bit."""
    from ds4cupy.engines.cuda import ops
    HI, c, ctx = 64, 128, 262144
    N = ctx // 4 + 2
    q = dev(fp4_rows(rng, (1, HI, c)))
    wts = dev(rng.standard_normal((1, HI)).astype(F32))
    k = dev(nm.fp4_pack(fp4_rows(rng, (N, c))))
    nblk = ops.indexer_blocks(ctx // 4, 1)
    eager = cp.full((1, N), np.nan, cp.float32)
    ops.indexer_scores_fp4(q, wts, k, d_pos(262000), 4, eager, nblk)
    pos = d_pos(5)
    out = cp.full((1, N), np.nan, cp.float32)
    cp.cuda.Device().synchronize()
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        ops.indexer_scores_fp4(q, wts, k, pos, 4, out, nblk)
        graph = stream.end_capture()
    pos[...] = 262000
    cp.cuda.Device().synchronize()
    graph.launch(stream=stream)
    stream.synchronize()
    np.testing.assert_array_equal(cp.asnumpy(out), cp.asnumpy(eager))
    assert not np.isnan(cp.asnumpy(out)[0, :262001 // 4]).any()


def test_argument_errors(rng):
    from ds4cupy.engines.cuda import ops
    q = cp.zeros((1, 4, 64), cp.float32)
    wts = cp.zeros((1, 4), cp.float32)
    sc = cp.zeros((1, 16), cp.float32)
    with pytest.raises(TypeError, match="uint8"):
        ops.indexer_scores_fp4(q, wts, cp.zeros((10, 36), cp.float32), d_pos(3), 4, sc, 1)
    with pytest.raises(ValueError, match=r"uint8 \[rows, 36\]"):
        ops.indexer_scores_fp4(q, wts, cp.zeros((10, 34), cp.uint8), d_pos(3), 4, sc, 1)
    with pytest.raises(ValueError, match="c in"):
        ops.indexer_scores_fp4(cp.zeros((1, 4, 96), cp.float32), wts, cp.zeros((10, 52), cp.uint8), d_pos(3), 4,
                               sc, 1)


def test_tiny_model_qat_switch_on_vs_off(tiny_file, rng, monkeypatch):
    """The tiny model (ratio-4 layers: 4 indexer heads of 64, top-6) with QAT on, switch on vs off: 300-token prefill
    in chunks of 64, then 30 graph-replayed greedy decode steps. The indexer rows are the same values (packed
    losslessly) and, for these unit-RMS rows, both score kernels compute the same exact dot products and add the
    heads in the same order: the same top-6 everywhere, hence the same logits. Bound 1e-6 of the logits' range
    (a wrong code, exponent or row gives a different top-6 and O(1e-2) and more); the same greedy tokens."""
    on, off = _on_and_off(tiny_file, "INDEXER_FP4", True, monkeypatch)
    assert on.model.indexer_fp4 and not off.model.indexer_fp4
    csa = [il for il in range(on.model.config.n_layer) if on.model.config.ratio(il) == 4]
    assert csa and all(on.kv[(il, "index")].dtype == cp.uint8 for il in csa)
    assert all(off.kv[(il, "index")].dtype == cp.float32 for il in csa)
    rels = _lockstep_within(on, off, rng.integers(0, on.model.config.n_vocab, 300), 30, 1e-6)
    print(f"tiny model QAT on, INDEXER_FP4 on vs off: prefill {rels[0]:.1e}, worst step {max(rels):.1e}")
    assert on.tokens == off.tokens
    ci = on.model.config.indexer_head_dim
    for il in csa:                                   # the cached rows: the float ones, packed
        n = on.n_tokens // 4
        np.testing.assert_array_equal(cp.asnumpy(on.kv[(il, "index")][:n]),
                                      nm.fp4_pack(cp.asnumpy(off.kv[(il, "index")][:n, :ci])))
    # snapshot / restore slice the packed rows like the float ones
    snap = on.snapshot()
    a = on.decode(5)
    on.restore(snap)
    np.testing.assert_array_equal(on.decode(5), a)
    on.fill_random_state(200)                        # the benchmarks' random state: packed rows too
    assert np.isfinite(on.decode(7)).all()


def test_switch_needs_qat(tiny_file, monkeypatch):
    """QAT off: the switch changes nothing (the rows are not fp4_sim'd, so not representable): float rows, the
    float kernels."""
    from ds4cupy.engines.cuda.session import CudaModel
    from ds4cupy.format.model_file import ModelFile
    monkeypatch.setenv("DS4CUPY_INDEXER_FP4", "1")
    m = CudaModel.from_file(ModelFile(tiny_file), qat=False, memory="device", chunk=64)
    assert not m.indexer_fp4
    s = m.new_session(256)
    assert all(a.dtype == cp.float32 for a in s.kv.values())
