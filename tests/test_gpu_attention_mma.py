"""The prefill attention on tensor cores (kernels/attention_mma.cu through engines/cuda/attention_mma.py) on the GPU:
against ops.attention (kernels/attention.cu, the path it replaces, one split as CudaSession's prefill runs it) and a
float64 evaluation, on fresh random inputs at odd shapes: queries not a multiple of the 16-entry key tile, heads not a
multiple of the block's 32 (4, 33, 40, 72) and the Flash shape (64 heads, head_dim 512, window 128, 64 rope dims),
a window ring partly filled (its slots of positions that never existed hold NaN: never read), compressed rows
crossing many windows, modes 0 / 1 / 2, indexer picks below and above the number of visible rows with -1, future rows
(NaN beyond the last visible one: must be skipped) and repeats; key rows spanning 2^-12 .. 2^12 block by block; the
same bits from a CUDA graph replay; and the tiny model prefilled with switch PREFILL_ATTN_MMA on vs off.

Tolerances (the kernel's header gives the numerics):
- op vs float64 and vs ops.attention: max |difference| <= 1e-5 * max |out|, the bound test_gpu_ops.py's attention test
  holds ops.attention itself to against float64 (float32 summation over up to ~1,000 keys of 512 products). The NumPy
  emulation of the kernel (tests/test_attention_mma_layout.py) stays within 8e-7 of float64 on such inputs; the
  tensor cores' truncating float32 accumulation inside each mma and __expf add float32-ulp-level terms on top. A
  wrong mask, row or scale gives errors of O(1e-2 .. 1) (a lost lo term alone ~1e-3). Each test prints its measured
  values (the number to record with the run).
- block-scaled rows: each output block within 1e-5 of its own size.
- the tiny model, QAT off (chunks of 64 tokens, all on the new kernel; decode on attention.cu in both): logits within
  1e-4 of their range at the prefill and at each of 30 greedy steps, same greedy tokens unless the top-2 margin is
  below twice the difference (the rule of test_gpu_model.py); attention differences at float32 level move logits by
  ~1e-6. QAT on is left out here: an FP8 rounding flip downstream of a float32-ulp difference can reorder the
  indexer's top-k and move logits by up to 0.16 of their range (test_gpu_model.py's docstring), which is no signal
  about this kernel.
"""
from __future__ import annotations

import numpy as np
import pytest

import attention_mma_emul as emul
from gpu_util import GPU_MARKS, gpu_available
from test_gpu_model import _lockstep_within, _on_and_off, tiny_file  # noqa: F401 (tiny_file: fixture)

cp = pytest.importorskip("cupy") if gpu_available() else None

pytestmark = GPU_MARKS

BOUND = 1e-5

CASES = {   # S, H, d, W, pos0, mode, ratio, K, n_rot
    "flash_window": (45, 64, 512, 128, 300, 0, 0, 0, 64),
    "flash_window_first_chunk": (200, 64, 512, 128, 0, 0, 0, 0, 64),
    "flash_dense_compressed": (37, 64, 512, 128, 1200, 1, 16, 0, 64),
    "flash_indexed_topk_below_rows": (77, 64, 512, 128, 700, 2, 4, 64, 64),
    "flash_indexed_first_chunk": (150, 64, 512, 128, 0, 2, 4, 64, 64),
    "tiny_heads_window": (45, 4, 96, 32, 17, 0, 0, 0, 32),
    "odd_heads_dense": (45, 40, 96, 32, 17, 1, 3, 0, 32),
    "odd_heads_indexed": (45, 40, 96, 32, 17, 2, 4, 5, 32),
    "heads_72_indexed": (33, 72, 256, 64, 100, 2, 4, 9, 64),
    "heads_33_dense_d32": (21, 33, 32, 16, 40, 1, 5, 0, 32),
}


def dev(a):
    return None if a is None else cp.asarray(np.ascontiguousarray(a))


def run_new(x, out=None):
    from ds4cupy.engines.cuda import attention_mma as am
    S, H, d = x["q"].shape
    out = cp.full((S, H, d), cp.nan, cp.float32) if out is None else out
    am.prefill_attention(dev(x["q"]), dev(x["ring"]), dev(x["cur"]), dev(x["comp"]), dev(x["idx"]),
                         cp.asarray(np.array([x["pos0"]], np.int32)), x["W"], x["ratio"], x["mode"], dev(x["sinks"]),
                         x["n_rot"], dev(x["freqs"]), out)
    return out


def run_old(x):
    from ds4cupy.engines.cuda import ops
    S, H, d = x["q"].shape
    out = cp.full((S, H, d), cp.nan, cp.float32)
    ops.attention(dev(x["q"]), dev(x["ring"]), dev(x["cur"]), dev(x["comp"]), dev(x["idx"]),
                  cp.asarray(np.array([x["pos0"]], np.int32)), x["W"], x["ratio"], x["mode"], dev(x["sinks"]),
                  x["n_rot"], dev(x["freqs"]), cp.empty((S, H, 1, 2), cp.float32), cp.empty((S, H, 1, d), cp.float32),
                  out, 1)
    return out


def rel(a, ref):
    return float(np.max(np.abs(a.astype(np.float64) - ref))) / float(np.max(np.abs(ref)))


@pytest.mark.parametrize("case", list(CASES))
def test_matches_attention_cu_and_float64(case, rng):
    S, H, d, W, pos0, mode, ratio, K, n_rot = CASES[case]
    x = emul.make_inputs(rng, S, H, d, W, pos0, mode, ratio, K, n_rot)
    new = cp.asnumpy(run_new(x))
    old = cp.asnumpy(run_old(x))
    ref = emul.ref_attention(**x)
    assert np.isfinite(new).all(), f"{np.count_nonzero(~np.isfinite(new))} outputs not finite (NaN rows read?)"
    e_ref, e_old, e_old_ref = rel(new, ref), rel(new, old.astype(np.float64)), rel(old, ref)
    print(f"{case}: |new - float64| {e_ref:.2e}, |new - attention.cu| {e_old:.2e}, |attention.cu - float64| "
          f"{e_old_ref:.2e} (of max |out|)")
    assert e_ref <= BOUND, f"new vs float64: {e_ref:.2e}"
    assert e_old <= BOUND, f"new vs attention.cu: {e_old:.2e}"


def test_block_scaled_rows(rng):
    """Rows of magnitude 2^-12 .. 2^12, one magnitude per block of 8 dims (attention_mma_emul.make_block_scaled_inputs):
    every row's own scale and the running exponent of the PV accumulator, checked block by block."""
    S, H, d = 40, 64, 512
    x = emul.make_block_scaled_inputs(rng, S, H, d, W=32, pos0=60, ratio=2)
    nb = len(emul.BLOCK_MAGNITUDES)
    got = cp.asnumpy(run_new(x))[..., : 8 * nb].reshape(S, H, nb, 8)
    ref = emul.ref_attention(**x)[..., : 8 * nb].reshape(S, H, nb, 8)
    errs = [float(np.abs(got[:, :, k] - ref[:, :, k]).max() / np.abs(ref[:, :, k]).max()) for k in range(nb)]
    print("block-scaled rows: worst block error", f"{max(errs):.2e}")
    for k, mag in enumerate(emul.BLOCK_MAGNITUDES):
        assert errs[k] <= BOUND, f"dims of rows 2^{mag}: error {errs[k]:.2e} of their size"


def test_deterministic_and_graph_replay(rng):
    """No float atomics and no host work: two launches give the same bits, and so does a CUDA graph of the launch."""
    x = emul.make_inputs(rng, 50, 64, 512, 128, 900, 2, 4, 64, 64)
    a = cp.asnumpy(run_new(x))
    b = cp.asnumpy(run_new(x))
    np.testing.assert_array_equal(a, b)
    from ds4cupy.engines.cuda import attention_mma as am
    args = {k: dev(x[k]) for k in ("q", "ring", "cur", "comp", "idx", "sinks", "freqs")}
    pos = cp.asarray(np.array([x["pos0"]], np.int32))
    out = cp.full(x["q"].shape, cp.nan, cp.float32)
    cp.cuda.Device().synchronize()          # the uploads and the fill (null stream) before the graph's stream
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        am.prefill_attention(args["q"], args["ring"], args["cur"], args["comp"], args["idx"], pos, x["W"], x["ratio"],
                             x["mode"], args["sinks"], x["n_rot"], args["freqs"], out)
        graph = stream.end_capture()
        graph.launch(stream=stream)
    stream.synchronize()
    np.testing.assert_array_equal(cp.asnumpy(out), a)


def test_argument_errors_name_the_value(rng):
    from ds4cupy.engines.cuda import attention_mma as am
    x = emul.make_inputs(rng, 20, 4, 96, 32, 10, 2, 4, 5, 32)
    good = dict(q=dev(x["q"]), ring=dev(x["ring"]), cur=dev(x["cur"]), comp=dev(x["comp"]), idx=dev(x["idx"]),
                d_pos=cp.zeros(1, cp.int32), window=32, ratio=4, mode=2, sinks=dev(x["sinks"]), n_rot=32,
                freqs=dev(x["freqs"]), out=cp.empty((20, 4, 96), cp.float32))
    am.prefill_attention(**good)
    for change, pattern in (
            (dict(q=cp.zeros((20, 4, 80), cp.float32)), r"head_dim 80 must be a positive multiple of 32"),
            (dict(idx=None), r"mode 2 needs idx"),
            (dict(comp=None), r"mode 2 needs comp"),
            (dict(mode=3), r"mode 3 must be 0"),
            (dict(ring=cp.zeros((31, 96), cp.float32)), r"ring has shape \(31, 96\), expected \(32, 96\)"),
            (dict(sinks=cp.zeros(4, cp.float64)), r"sinks must be float32, got float64"),
            (dict(n_rot=33), r"n_rot 33 must be even")):
        with pytest.raises((ValueError, TypeError), match=pattern):
            am.prefill_attention(**{**good, **change})


def test_tiny_model_prefill_switch_on_vs_off(tiny_file, rng, monkeypatch):
    """The tiny model (window 32, ratio 4 layers with top-6 indexer, ratio 16 layers; 4 heads of 96 dims), QAT off,
    300-token prefill in chunks of 64 (switch on: every chunk on attention_mma.cu) then 30 greedy decode steps (both on
    attention.cu, reading KV that the prefill's attention outputs fed)."""
    on, off = _on_and_off(tiny_file, "PREFILL_ATTN_MMA", False, monkeypatch)
    assert on.model.prefill_attn_mma and not off.model.prefill_attn_mma
    rels = _lockstep_within(on, off, rng.integers(0, on.model.config.n_vocab, 300), 30, 1e-4)
    print(f"tiny model, switch on vs off: prefill logits {rels[0]:.1e}, worst step {max(rels):.1e} of max |logit|")
    assert on.tokens == off.tokens
