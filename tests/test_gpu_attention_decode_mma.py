"""Decode attention on tensor cores (kernels/attention_decode_mma.cu's attn_partial_mma + attention.cu's attn_combine,
through engines/cuda/attention_decode_mma.py) on the GPU: against ops.attention (attn_partial + attn_combine, the path
it replaces, with the same splits) and a float64 evaluation (tests/attention_mma_emul.py's ref_attention), on fresh
random inputs: the Flash shape (64 heads, head_dim 512, window 128, 64 rope dims) at S = 1 with the session's decode
splits sized from a ctx (DECODE_MAX_SPLITS, DECODE_MIN_ROWS_PER_SPLIT) for the three layer kinds (window, HCA ratio
128, CSA top-512 of ratio 4 rows with the top-k below the visible rows), positions from 0 to ~20,000 (many compress
windows), a few queries (S = 2, 3, 5, 13), odd head counts (4, 33, 40, 72) and dims (32, 96, 256), splits of 1 entry,
of 40 (three tiles, the last partial) and one split over the whole list (the session's short-chunk path); a window
ring partly filled (never-existing slots NaN), compressed rows past the visible ones NaN, indexer picks with -1,
future rows and repeats (make_inputs). Then: every split that holds keys is written and none past the list end is
(scratch filled with NaN); two launches give the same bits; a CUDA graph captured at a shallow device position and
replayed at a deep one gives the eager launch's bits; the tiny model with switch DECODE_ATTN_MMA on vs off; and the
tiny model's decode graph captured shallow serves deep (test_gpu_model's test, switch on).

Tolerances (the kernel shares attn_prefill_mma's arithmetic: attention_mma.cu's header):
- op vs float64 and vs ops.attention: max |difference| <= 1e-5 * max |out|, the bound of the prefill kernel
  (tests/test_gpu_attention_mma.py) and of ops.attention itself against float64 (float32 sums over up to ~640 keys of
  512 products). A split's partial is the prefill kernel's running state, stored in true units; attn_combine merges
  them as it merges attn_partial's. A wrong mask, row, split boundary or scale gives errors of O(1e-2 .. 1) (a lost
  lo term alone ~1e-3). Each test prints its measured values (the number to record with the run).
- the tiny model, QAT off: logits within 1e-4 of their range after the prefill and at each of 30 greedy steps, same
  greedy tokens unless the top-2 margin is below twice the difference (test_gpu_model.py's rule), as the prefill
  kernel's switch test. The prefill is 270 tokens in chunks of 64, so its last chunk (14 tokens, below
  attention_mma.MIN_TOKENS) also takes this path (one split).
"""
from __future__ import annotations

import numpy as np
import pytest

import attention_mma_emul as emul
from gpu_util import GPU_MARKS, gpu_available
from test_gpu_model import _lockstep_within, _on_and_off, tiny_file  # noqa: F401 (tiny_file: fixture)
from test_gpu_model import test_decode_graph_captured_shallow_serves_deep as _shallow_serves_deep

cp = pytest.importorskip("cupy") if gpu_available() else None

pytestmark = GPU_MARKS

BOUND = 1e-5

CASES = {   # S, H, d, W, pos0, mode, ratio, K, n_rot, ctx (sizes the splits as CudaSession does), rps (None: session's)
    "flash_window_position_0": (1, 64, 512, 128, 0, 0, 0, 0, 64, 4096, None),
    "flash_window": (1, 64, 512, 128, 3000, 0, 0, 0, 64, 4096, None),
    "flash_hca_depth_4k": (1, 64, 512, 128, 4095, 1, 128, 0, 64, 4096, None),
    "flash_hca_deep": (1, 64, 512, 128, 20000, 1, 128, 0, 64, 65536, None),
    "flash_csa_topk_below_rows": (1, 64, 512, 128, 8000, 2, 4, 512, 64, 65536, None),
    "flash_csa_early": (1, 64, 512, 128, 100, 2, 4, 512, 64, 65536, None),
    "flash_hca_three_queries": (3, 64, 512, 128, 2000, 1, 16, 0, 64, 4096, None),
    "flash_csa_short_chunk_one_split": (13, 64, 512, 128, 500, 2, 4, 64, 64, 4096, "rows"),
    "odd_heads_dense_splits_of_40": (2, 40, 96, 32, 700, 1, 3, 0, 32, 1024, 40),
    "heads_72_indexed": (5, 72, 256, 64, 300, 2, 4, 9, 64, 512, None),
    "tiny_heads_window_splits_of_1": (1, 4, 96, 32, 17, 0, 0, 0, 32, 64, 1),
    "heads_33_dense_d32": (2, 33, 32, 16, 40, 1, 5, 0, 32, 256, None),
}


def splits(W, ratio, mode, K, ctx, rps=None):
    """(nsplit, rows_per_split) as CudaSession sizes a layer's decode splits from its ctx; rps "rows": one split."""
    from ds4cupy.engines.cuda import ops
    from ds4cupy.engines.cuda.session import DECODE_MAX_SPLITS, DECODE_MIN_ROWS_PER_SPLIT
    rows = ops.attention_rows(W, ratio, mode, K, ctx)
    if rps is None:
        rps = max(DECODE_MIN_ROWS_PER_SPLIT, -(-rows // DECODE_MAX_SPLITS))
    elif rps == "rows":
        rps = rows
    return -(-rows // rps), rps


def list_len(pos, W, ratio, mode, K):
    return min(pos + 1, W) + ((pos + 1) // ratio if mode == 1 else (K if mode == 2 else 0))


def dev(a):
    return None if a is None else cp.asarray(np.ascontiguousarray(a))


def launch(fn, x, ns, rps, pos=None, out=None):
    """fn = decode_attention or ops.attention on x's inputs; returns (out, part_ml, part_o), scratch NaN-filled."""
    S, H, d = x["q"].shape
    out = cp.full((S, H, d), cp.nan, cp.float32) if out is None else out
    ml = cp.full((S, H, ns, 2), cp.nan, cp.float32)
    po = cp.full((S, H, ns, d), cp.nan, cp.float32)
    pos = cp.asarray(np.array([x["pos0"]], np.int32)) if pos is None else pos
    fn(dev(x["q"]), dev(x["ring"]), dev(x["cur"]), dev(x["comp"]), dev(x["idx"]), pos, x["W"], x["ratio"], x["mode"],
       dev(x["sinks"]), x["n_rot"], dev(x["freqs"]), ml, po, out, ns, rps)
    return out, ml, po


def new_fn():
    from ds4cupy.engines.cuda.attention_decode_mma import decode_attention
    return decode_attention


def old_fn():
    from ds4cupy.engines.cuda import ops
    return ops.attention


def rel(a, ref):
    return float(np.max(np.abs(a.astype(np.float64) - ref))) / float(np.max(np.abs(ref)))


@pytest.mark.parametrize("case", list(CASES))
def test_matches_attn_partial_and_float64(case, rng):
    S, H, d, W, pos0, mode, ratio, K, n_rot, ctx, rps = CASES[case]
    ns, rps = splits(W, ratio, mode, K, ctx, rps)
    x = emul.make_inputs(rng, S, H, d, W, pos0, mode, ratio, K, n_rot)
    new, ml, po = (cp.asnumpy(a) for a in launch(new_fn(), x, ns, rps))
    old = cp.asnumpy(launch(old_fn(), x, ns, rps)[0])
    ref = emul.ref_attention(**x)
    assert np.isfinite(new).all(), f"{np.count_nonzero(~np.isfinite(new))} outputs not finite (NaN rows read?)"
    for t in range(S):       # splits holding keys written (m = -inf for one without a valid key), the others not
        used = max(1, -(-list_len(pos0 + t, W, ratio, mode, K) // rps))
        written = (~np.isnan(ml[t, :, :used, 0])).all() and np.isfinite(ml[t, :, :used, 1]).all()
        assert written and np.isfinite(po[t, :, :used]).all(), f"query {t}: a split holding keys unwritten"
        assert np.isnan(ml[t, :, used:]).all() and np.isnan(po[t, :, used:]).all(), f"query {t}: split past the end"
    e_ref, e_old, e_old_ref = rel(new, ref), rel(new, old.astype(np.float64)), rel(old, ref)
    print(f"{case} ({ns} splits of {rps}): |new - float64| {e_ref:.2e}, |new - attention.cu| {e_old:.2e}, "
          f"|attention.cu - float64| {e_old_ref:.2e} (of max |out|)")
    assert e_ref <= BOUND, f"new vs float64: {e_ref:.2e}"
    assert e_old <= BOUND, f"new vs attention.cu: {e_old:.2e}"


def test_deterministic_and_graph_captured_shallow_replayed_deep(rng):
    """No float atomics, no host work: two launches give the same bits; a graph captured while the device position
    is 5 and replayed after it is set to 9,000 (CSA, top 512 of 2,250 visible rows, splits sized for ctx 65,536) gives
    the eager launch's bits at 9,000, within BOUND of float64."""
    from ds4cupy.engines.cuda.attention_decode_mma import decode_attention
    W, mode, ratio, K, ctx = 128, 2, 4, 512, 65536
    ns, rps = splits(W, ratio, mode, K, ctx)
    x = emul.make_inputs(rng, 1, 64, 512, W, 9000, mode, ratio, K, 64)
    a = cp.asnumpy(launch(decode_attention, x, ns, rps)[0])
    b = cp.asnumpy(launch(decode_attention, x, ns, rps)[0])
    np.testing.assert_array_equal(a, b)
    args = {k: dev(x[k]) for k in ("q", "ring", "cur", "comp", "idx", "sinks", "freqs")}
    pos = cp.asarray(np.array([5], np.int32))
    out = cp.full(x["q"].shape, cp.nan, cp.float32)
    ml = cp.full((1, 64, ns, 2), cp.nan, cp.float32)
    po = cp.full((1, 64, ns, 512), cp.nan, cp.float32)
    cp.cuda.Device().synchronize()          # the uploads and the fills (null stream) before the graph's stream
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        decode_attention(args["q"], args["ring"], args["cur"], args["comp"], args["idx"], pos, W, ratio, mode,
                         args["sinks"], 64, args["freqs"], ml, po, out, ns, rps)
        graph = stream.end_capture()
    pos[...] = 9000
    cp.cuda.Device().synchronize()
    graph.launch(stream=stream)
    stream.synchronize()
    got = cp.asnumpy(out)
    np.testing.assert_array_equal(got, a)
    e = rel(got, emul.ref_attention(**x))
    print(f"graph captured at 5, replayed at 9,000: |out - float64| {e:.2e} of max |out|")
    assert e <= BOUND


def test_argument_errors_name_the_value(rng):
    from ds4cupy.engines.cuda.attention_decode_mma import decode_attention
    x = emul.make_inputs(rng, 1, 4, 96, 32, 10, 2, 4, 5, 32)
    ns, rps = 4, 10
    good = dict(q=dev(x["q"]), ring=dev(x["ring"]), cur=dev(x["cur"]), comp=dev(x["comp"]), idx=dev(x["idx"]),
                d_pos=cp.asarray(np.array([10], np.int32)), window=32, ratio=4, mode=2, sinks=dev(x["sinks"]),
                n_rot=32, freqs=dev(x["freqs"]), part_ml=cp.empty((1, 4, ns, 2), cp.float32),
                part_o=cp.empty((1, 4, ns, 96), cp.float32), out=cp.empty((1, 4, 96), cp.float32), nsplit=ns,
                rows_per_split=rps)
    decode_attention(**good)
    for change, pattern in (
            (dict(q=cp.zeros((1, 4, 80), cp.float32)), r"head_dim 80 must be a positive multiple of 32"),
            (dict(idx=None), r"mode 2 needs idx"),
            (dict(mode=3), r"mode 3 must be 0"),
            (dict(rows_per_split=0), r"rows_per_split 0 must be > 0"),
            (dict(part_o=cp.empty((1, 4, 3, 96), cp.float32)), r"part_o has shape \(1, 4, 3, 96\), expected"),
            (dict(sinks=cp.zeros(4, cp.float64)), r"sinks must be float32, got float64"),
            (dict(n_rot=33), r"n_rot 33 must be even")):
        with pytest.raises((ValueError, TypeError), match=pattern):
            decode_attention(**{**good, **change})


def test_tiny_model_switch_on_vs_off(tiny_file, rng, monkeypatch):
    """The tiny model (window 32, ratio 4 layers with top-6 indexer, ratio 16 layers; 4 heads of 96 dims), QAT off:
    270-token prefill in chunks of 64 (the last, 14 tokens, on this path when on) then 30 graph-replayed greedy
    decode steps (on: attn_partial_mma's splits; off: attn_partial's). The engine takes this path only for layers
    with >= MIN_ROWS key rows (512; the tiny model has at most ~100): the floor is lowered to 0 so that every layer
    does."""
    from ds4cupy.engines.cuda import attention_decode_mma
    monkeypatch.setattr(attention_decode_mma, "MIN_ROWS", 0)
    on, off = _on_and_off(tiny_file, "DECODE_ATTN_MMA", False, monkeypatch)
    assert on.model.decode_attn_mma and not off.model.decode_attn_mma
    rels = _lockstep_within(on, off, rng.integers(0, on.model.config.n_vocab, 270), 30, 1e-4)
    print(f"tiny model, switch on vs off: prefill logits {rels[0]:.1e}, worst step {max(rels):.1e} of max |logit|")
    assert on.tokens == off.tokens


def test_tiny_model_decode_graph_shallow_serves_deep_switch_on(tiny_file, rng, monkeypatch):
    """test_gpu_model's test_decode_graph_captured_shallow_serves_deep with DECODE_ATTN_MMA on: a decode graph
    captured at depth ~12 replayed past 4,096 equals the eager steps bit for bit and the reference within 1e-3
    (every layer on this path: its MIN_ROWS floor lowered to 0)."""
    from ds4cupy.engines.cuda import attention_decode_mma
    monkeypatch.setenv("DS4CUPY_DECODE_ATTN_MMA", "1")
    monkeypatch.setattr(attention_decode_mma, "MIN_ROWS", 0)
    assert attention_decode_mma.enabled()
    _shallow_serves_deep(tiny_file, rng)
