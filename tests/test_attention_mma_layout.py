"""CPU checks of the prefill attention on tensor cores (kernels/attention_mma.cu, engines/cuda/attention_mma.py) that
need no GPU:

- a NumPy emulation of a whole launch (tests/attention_mma_emul.py: the kernel's warp roles, cp.async swizzle,
  in-place hi / lo conversion, ldmatrix addresses, partial-score buffer, softmax and PV fragments and epilogue, with
  ldmatrix and mma.m16n8k16 as the PTX ISA defines them) against a float64 evaluation of the attention, at odd shapes
  (queries not a multiple of the key tile, heads not a multiple of the block's 32, head_dim 64 / 96 / 512, a window
  ring partly filled, compressed rows crossing many windows, modes 0 / 1 / 2 with skipped, future and repeated
  indexer entries): every output written exactly once, no shared-memory bank conflict, float32-level error, while
  the control without the lo terms (plain fp16 operands) is ~1e-3 off;
- key rows whose magnitudes span 2^-12 .. 2^12 (each row's own power-of-two scale, the running exponent E of the
  PV accumulator growing along the list), checked block of dims by block of dims;
- the constants shared by the kernel, its launcher and the emulation, and the switch's default.
The GPU tests (tests/test_gpu_attention_mma.py) run the kernel itself against ops.attention and float64.

Bound: the emulation's error is <= 6e-7 of max |out| on these inputs (split operands: 2^-21 per term, the dropped
lo * lo product 2^-20, float32 sums and exp); asserted at 2e-6. The lo-less control sits at ~1e-3.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

import attention_mma_emul as emul
from ds4cupy.engines import numerics as nm
from ds4cupy.engines.cuda import attention_mma as am
from ds4cupy.engines.cuda.compile import KERNEL_DIR

BOUND = 2e-6


def make_inputs(rng, S, H, d, W, pos0, mode, ratio, K, n_rot, qscale=2.0):
    """Random inputs as the session holds them: every position's KV row (hist), the window ring with the rows of the
    W positions before pos0 (slots of positions that never existed: NaN, never read), this chunk's rows (cur),
    compressed rows (rows past the last query's visible ones: NaN) and indexer picks with -1, future rows, repeats."""
    P_end = pos0 + S
    hist = rng.standard_normal((P_end, d)).astype(np.float32)
    ring = np.full((W, d), np.nan, np.float32)
    for p in range(max(0, pos0 - W), pos0):
        ring[p % W] = hist[p]
    q = (rng.standard_normal((S, H, d)) * qscale).astype(np.float32)
    sinks = rng.standard_normal(H).astype(np.float32)
    comp = idx = None
    if mode:
        nvis_last = P_end // ratio
        comp = rng.standard_normal((nvis_last + 4, d)).astype(np.float32)
        comp[nvis_last:] = np.nan
    if mode == 2:
        idx = np.empty((S, K), np.int32)
        for t in range(S):
            nv = (pos0 + t + 1) // ratio
            pick = list(rng.permutation(nv)[:K - 3]) + [-1, nv + int(rng.integers(0, 3)), int(rng.integers(0, nv))
                                                       if nv else -1]
            idx[t] = np.array(pick + [-1] * (K - len(pick)), np.int32)[rng.permutation(K)]
    freqs = nm.rope_freqs(n_rot, 10000.0, None)
    return dict(q=q, hist=hist, ring=ring, cur=hist[pos0:], comp=comp, idx=idx, pos0=pos0, W=W, ratio=ratio,
                mode=mode, sinks=sinks, n_rot=n_rot, freqs=freqs)


def ref_attention(q, hist, comp, idx, pos0, W, ratio, mode, sinks, n_rot, freqs, **_):
    """float64: the key list as a count per key (window, visible compressed rows, indexer entries with repeats), the
    softmax with the sink in the denominator, the inverse rope on the last n_rot dims."""
    S, H, d = q.shape
    pos = pos0 + np.arange(S)
    keys = hist.astype(np.float64)
    allp = np.arange(len(hist))
    cnt = ((allp[None] <= pos[:, None]) & (allp[None] > pos[:, None] - W)).astype(np.float64)
    if mode:
        nvis = (pos + 1) // ratio
        c2 = np.zeros((S, comp.shape[0]))
        for t in range(S):
            if mode == 1:
                c2[t, :nvis[t]] = 1
            else:
                for w in idx[t]:
                    if 0 <= w < nvis[t]:
                        c2[t, w] += 1
        keys = np.concatenate([keys, np.nan_to_num(comp.astype(np.float64))])
        cnt = np.concatenate([cnt, c2], axis=1)
    sc = np.einsum("shd,kd->shk", q.astype(np.float64), keys) * d ** -0.5
    sc = np.where(cnt[:, None, :] > 0, sc, -np.inf)
    m = np.maximum(sc.max(-1), sinks[None].astype(np.float64))
    e = np.exp(sc - m[..., None]) * cnt[:, None, :]
    o = np.einsum("shk,kd->shd", e, keys) / (e.sum(-1) + np.exp(sinks[None] - m))[..., None]
    if n_rot:
        c, s = np.cos(pos[:, None] * freqs[None]), np.sin(pos[:, None] * freqs[None])
        a, b = o[..., d - n_rot::2].copy(), o[..., d - n_rot + 1::2].copy()
        o[..., d - n_rot::2] = a * c[:, None] + b * s[:, None]
        o[..., d - n_rot + 1::2] = b * c[:, None] - a * s[:, None]
    return o


def run_emul(x, variant="exact", stats=None):
    return emul.attn_prefill_mma(x["q"], x["ring"], x["cur"], x["comp"], x["idx"], x["pos0"], x["W"], x["ratio"],
                                 x["mode"], x["sinks"], x["n_rot"], x["freqs"], variant=variant, stats=stats)


CASES = {   # S, H, d, W, pos0, mode, ratio, K, n_rot
    "window_ring_partly_filled": (13, 40, 64, 8, 5, 0, 0, 0, 32),
    "dense_compressed_many_windows": (11, 36, 96, 8, 37, 1, 3, 0, 32),
    "indexed_tiny_heads": (9, 4, 96, 32, 50, 2, 4, 7, 32),
    "indexed_flash_dims": (3, 33, 512, 16, 40, 2, 4, 20, 64),
    "first_chunk": (18, 32, 64, 16, 0, 2, 4, 6, 64),
}


@pytest.mark.parametrize("case", list(CASES))
def test_emulated_kernel_matches_float64(case, rng):
    S, H, d, W, pos0, mode, ratio, K, n_rot = CASES[case]
    x = make_inputs(rng, S, H, d, W, pos0, mode, ratio, K, n_rot)
    stats = {}
    got = run_emul(x, stats=stats)
    ref = ref_attention(**x)
    assert (stats["written"] == 1).all(), "every output element stored exactly once"
    assert stats["conflicts"] == 0, f"{stats['conflicts']} shared-memory accesses with bank conflicts"
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    assert err <= BOUND, f"max |emulated - float64| = {err:.2e} * max |out|"
    hi = run_emul(x, variant="hi")
    err_hi = float(np.abs(hi - ref).max() / np.abs(ref).max())
    assert err_hi > 100 * BOUND, f"control without lo terms only {err_hi:.2e} off: the test cannot see the split"


def test_row_scales_and_running_exponent(rng):
    """Key rows of magnitude 2^k, k in -12 .. 12, each nonzero only in its own block of 8 dims (so every output block
    comes from rows of one magnitude), small rows early in the list and large ones late (E grows from tile to tile,
    rescaling the accumulator), q ~ 1e-5 (all scores near 0: every row weighs about the same). Each output block must
    be float32-accurate relative to its own size, which only holds if every row's scale and the P' factors
    2^(e_j - E + 14) are right."""
    S, H, d, W, pos0, ratio, n_rot = 7, 32, 256, 16, 30, 2, 0
    x = make_inputs(rng, S, H, d, W, pos0, 1, ratio, 0, n_rot, qscale=1e-5)
    mags = np.arange(-12, 13)                                     # 25 classes <= 32 blocks of 8 dims
    hist, comp = x["hist"], x["comp"]
    nv = comp.shape[0] - 4
    for rows, klass in ((hist, lambda i: i % 9), (comp[:nv], lambda i: 9 + i % 16)):   # window: small, comp: large
        for i in range(rows.shape[0]):
            k = klass(i)
            keep = np.zeros(d, bool)
            keep[8 * k: 8 * k + 8] = True
            rows[i] = np.where(keep, rows[i] * np.float32(2.0 ** mags[k]), 0.0)
    x["ring"][:] = np.nan
    for p in range(max(0, pos0 - W), pos0):
        x["ring"][p % W] = hist[p]
    x["cur"] = hist[pos0:]
    stats = {}
    got = run_emul(x, stats=stats).reshape(S, H, d // 8, 8)
    ref = ref_attention(**x).reshape(S, H, d // 8, 8)
    assert (stats["written"] == 1).all() and stats["conflicts"] == 0
    for k in range(len(mags)):
        size = np.abs(ref[:, :, k]).max()
        assert size > 0
        err = float(np.abs(got[:, :, k] - ref[:, :, k]).max() / size)
        assert err <= BOUND, f"dims of rows 2^{mags[k]}: error {err:.2e} of their size"


def test_constants_agree_with_the_kernel(monkeypatch):
    src = (KERNEL_DIR / "attention_mma.cu").read_text()
    defs = {m.group(1): int(m.group(2)) for m in re.finditer(r"^#define (AM_\w+) (\d+)", src, flags=re.M)}
    assert defs == {"AM_TK": emul.TK, "AM_HG": emul.HG, "AM_NS": emul.NSL, "AM_MAXB": emul.MAXB,
                    "AM_PLD": emul.PLD}
    assert (am.TILE_KEYS, am.HEADS_PER_BLOCK) == (defs["AM_TK"], defs["AM_HG"])
    assert defs["AM_MAXB"] * defs["AM_NS"] * 16 == am.MAX_HEAD_DIM          # 16-dim blocks of the 4 slices
    assert am.shared_bytes(512) == 64 * 1024                                   # two stages of 16 rows
    monkeypatch.delenv("DS4CUPY_PREFILL_ATTN_MMA", raising=False)
    assert am.enabled() is False                         # off by default: not yet run on a GPU
    monkeypatch.setenv("DS4CUPY_PREFILL_ATTN_MMA", "0")
    assert am.enabled() is False
