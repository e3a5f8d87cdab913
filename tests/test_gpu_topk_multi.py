"""Switch TOPK_MULTI on the GPU: indexer_topk_multi (kernels/topk_multi.cu, G blocks a query) against indexer_topk
(kernels/indexer.cu, one block a query) and the NumPy rule of test_topk_multi_model.topk_rule (the K largest
ord_key values, ties -> lower index, ascending, -1 padding). Fresh random rows every run (the `rng` fixture).

Tolerance: none. The selection is discrete and both kernels promise the same int32 output for every input, so the
outputs must be equal bit for bit, including rows drawn from 6 values (thousands of ties at the K-th value spread over
every block), all-equal rows, and rows of NaN / -NaN / +-inf / +-0; nvis in {K-1, K, K+1, 5,000, 262,000} (the last is
a query at ~1M context), S = 1 and S = 3 (consecutive positions: different nvis), G from the session's rule at 1M
context and small G. Then a CUDA graph captured at position 5 (every query below K rows) replayed at 1,048,000, and
the tiny model with the switch on vs off: identical logits bit for bit through a chunked prefill and graph-replayed
decode steps (the same top-k ids, hence the same kernels on the same inputs everywhere else).
"""
from __future__ import annotations

import numpy as np
import pytest

from gpu_util import GPU_MARKS, gpu_available
from test_gpu_model import _lockstep, tiny_file  # noqa: F401 (tiny_file: fixture)
from test_topk_multi_model import topk_rule

cp = pytest.importorskip("cupy") if gpu_available() else None

pytestmark = GPU_MARKS

K = 512
VALUES = np.array([-1.5, 0.0, 0.25, 0.25001, 2.0, 7.0], np.float32)
SPECIAL = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0], np.float32)


def d_pos(p):
    return cp.asarray(np.array([p], np.int32))


def rows(rng, kind: str, S: int, n: int) -> np.ndarray:
    if kind == "random":
        return rng.standard_normal((S, n)).astype(np.float32)
    if kind == "ties":
        return rng.choice(VALUES, (S, n))
    if kind == "equal":
        return np.full((S, n), -0.75, np.float32)
    x = rng.standard_normal((S, n)).astype(np.float32)            # "special": a third of the entries NaN / inf / 0
    mask = rng.random((S, n)) < 0.33
    x[mask] = rng.choice(SPECIAL, int(mask.sum()))
    return x


def scratch(S: int, G: int):
    """hist zero (the kernels' precondition), meta full of garbage (they need no initial value)."""
    from ds4cupy.engines.cuda import ops
    hist = cp.zeros(S * ops.TOPKM_BINS, cp.uint32)
    meta = cp.asarray(np.random.default_rng().integers(-2**31, 2**31 - 1, ops.topk_multi_meta_size(S, G),
                                                       dtype=np.int64).astype(np.int32))
    return hist, meta


@pytest.mark.parametrize("kind", ["random", "ties", "equal", "special"])
@pytest.mark.parametrize("nvis", [K - 1, K, K + 1, 5000, 262000])
@pytest.mark.parametrize("S", [1, 3])
@pytest.mark.parametrize("G", ["ctx", 1, 7])
def test_equals_indexer_topk(rng, kind, nvis, S, G):
    from ds4cupy.engines.cuda import ops
    p0 = 4 * nvis - 2                   # query t at position p0 + t sees (p0 + t + 1) // 4: nvis - 1, nvis, nvis
    G = ops.topk_multi_blocks((1 << 20) // 4, S) if G == "ctx" else G
    stride = nvis + 3
    host = rows(rng, kind, S, stride)   # entries past each query's nvis exist and must be ignored
    scores = cp.asarray(host)
    ref = cp.full((S, K), -7, cp.int32)
    ops.indexer_topk(scores, d_pos(p0), 4, ref)
    hist, meta = scratch(S, G)
    got = cp.full((S, K), -7, cp.int32)
    ops.indexer_topk_multi(scores, d_pos(p0), 4, got, hist, meta, G)
    got, ref = cp.asnumpy(got), cp.asnumpy(ref)
    np.testing.assert_array_equal(got, ref)
    for t in range(S):
        np.testing.assert_array_equal(got[t], topk_rule(host[t], (p0 + t + 1) // 4, K))
    assert not cp.asnumpy(hist).any(), "each call leaves the histograms zero"
    # a second call on the same scratch (the session's case): the same output
    again = cp.full((S, K), -7, cp.int32)
    ops.indexer_topk_multi(scores, d_pos(p0), 4, again, hist, meta, G)
    np.testing.assert_array_equal(cp.asnumpy(again), ref)


def test_small_k_and_ties_across_blocks(rng):
    """The tiny model's top-6 over a few hundred rows where the 6th value's ties sit in many blocks."""
    from ds4cupy.engines.cuda import ops
    S, n = 3, 700
    host = np.zeros((S, n + 4), np.float32)
    host[:, rng.choice(n, 4, replace=False)] = 1.0
    scores = cp.asarray(host)
    for G in (1, 5, 64, 264):
        ref = cp.empty((S, 6), cp.int32)
        got = cp.empty((S, 6), cp.int32)
        ops.indexer_topk(scores, d_pos(4 * n - 3), 4, ref)
        hist, meta = scratch(S, G)
        ops.indexer_topk_multi(scores, d_pos(4 * n - 3), 4, got, hist, meta, G)
        np.testing.assert_array_equal(cp.asnumpy(got), cp.asnumpy(ref))


def test_graph_captured_shallow_replayed_deep(rng):
    """G comes from ctx, the work from the device position: a graph captured at position 5 (1 visible row) and
    replayed at 1,048,000 (262,000 rows) gives indexer_topk's output there bit for bit, twice (the histograms are
    left zero between replays)."""
    from ds4cupy.engines.cuda import ops
    S, ctx = 1, 1 << 20
    n = ctx // 4 + 2
    host = rows(rng, "ties", S, n)
    scores = cp.asarray(host)
    G = ops.topk_multi_blocks(ctx // 4, S)
    ref = cp.empty((S, K), cp.int32)
    ops.indexer_topk(scores, d_pos(1048000), 4, ref)
    hist, meta = scratch(S, G)
    out = cp.full((S, K), -7, cp.int32)
    pos = d_pos(5)
    cp.cuda.Device().synchronize()
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        ops.indexer_topk_multi(scores, pos, 4, out, hist, meta, G)
        graph = stream.end_capture()
    pos[...] = 1048000
    cp.cuda.Device().synchronize()
    for _ in range(2):
        out.fill(-7)
        cp.cuda.Device().synchronize()
        graph.launch(stream=stream)
        stream.synchronize()
        np.testing.assert_array_equal(cp.asnumpy(out), cp.asnumpy(ref))
        assert not cp.asnumpy(hist).any()
    np.testing.assert_array_equal(cp.asnumpy(out)[0], topk_rule(host[0], 262000, K))


def test_argument_errors():
    from ds4cupy.engines.cuda import ops
    sc = cp.zeros((1, 16), cp.float32)
    out = cp.zeros((1, 4), cp.int32)
    hist, meta = scratch(1, 2)
    with pytest.raises(ValueError, match="hist needs"):
        ops.indexer_topk_multi(sc, d_pos(3), 4, out, hist[:100], meta, 2)
    with pytest.raises(ValueError, match="meta"):
        ops.indexer_topk_multi(sc, d_pos(3), 4, out, hist, meta, 3)
    with pytest.raises(TypeError, match="uint32"):
        ops.indexer_topk_multi(sc, d_pos(3), 4, out, hist.view(cp.int32), meta, 2)


@pytest.mark.parametrize("qat", [False, True])
def test_tiny_model_switch_on_vs_off(tiny_file, qat, rng, monkeypatch):
    """The tiny model (ratio-4 layers: top-6), TOPK_MULTI on vs off, ctx 4,608 so that G = 3 blocks a query (1,152
    rows / 512; prefill chunks of 64 queries: 2 or 3 by the SM count): a 300-token prefill in chunks of 64 (up to 75 visible rows, several blocks' slices) then 30
    graph-replayed greedy decode steps give identical logits bit for bit (any differing top-k id changes the attended
    rows and the logits)."""
    from ds4cupy.engines.cuda import ops
    from ds4cupy.engines.cuda.session import CudaModel
    from ds4cupy.format.model_file import ModelFile
    sessions = []
    for value in ("1", "0"):
        monkeypatch.setenv("DS4CUPY_TOPK_MULTI", value)
        sessions.append(CudaModel.from_file(ModelFile(tiny_file), qat=qat, memory="device", chunk=64)
                        .new_session(4608))
    on, off = sessions
    assert on.model.topk_multi and not off.model.topk_multi
    assert on._topk_hist is not None and off._topk_hist is None
    assert ops.topk_multi_blocks(4608 // 4, 1) == 3 and ops.topk_multi_blocks(4608 // 4, 64) >= 2   # >= 2: SMs
    _lockstep(on, off, rng.integers(0, on.model.config.n_vocab, 300), 30, np.testing.assert_array_equal)
    assert not cp.asnumpy(on._topk_hist).any()
