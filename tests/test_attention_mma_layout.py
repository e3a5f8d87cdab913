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
- the constants shared by the kernel, its launcher and the emulation, and the switch turning the path off;
- the decode kernel (kernels/attention_decode_mma.cu, the same body over one split of the key list): its emulated
  partials, merged as attn_combine merges them, against float64.
The GPU tests (tests/test_gpu_attention_mma.py) run the kernel itself against ops.attention and float64.

Bound: the emulation's error is <= 8e-7 of max |out| (measured: the cases below over 20 seeds, <= 5.9e-7; the GPU
test's shapes, <= 7.4e-7; block-scaled rows at head_dim 512, <= 8.1e-7 of each block), from the split operands
(2^-21 per term, the dropped lo * lo product 2^-20), float32 sums and exp; asserted at 2e-6. The lo-less control
sits at ~1e-3.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

import attention_mma_emul as emul
from ds4cupy.engines.cuda import attention_mma as am
from ds4cupy.engines.cuda.compile import KERNEL_DIR

BOUND = 2e-6


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
    x = emul.make_inputs(rng, S, H, d, W, pos0, mode, ratio, K, n_rot)
    stats = {}
    got = run_emul(x, stats=stats)
    ref = emul.ref_attention(**x)
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
    S, H, d = 7, 32, 256
    x = emul.make_block_scaled_inputs(rng, S, H, d, W=16, pos0=30, ratio=2)
    stats = {}
    got = run_emul(x, stats=stats).reshape(S, H, d // 8, 8)
    ref = emul.ref_attention(**x).reshape(S, H, d // 8, 8)
    assert (stats["written"] == 1).all() and stats["conflicts"] == 0
    for k, mag in enumerate(emul.BLOCK_MAGNITUDES):
        size = np.abs(ref[:, :, k]).max()
        assert size > 0
        err = float(np.abs(got[:, :, k] - ref[:, :, k]).max() / size)
        assert err <= BOUND, f"dims of rows 2^{mag}: error {err:.2e} of their size"


def test_constants_agree_with_the_kernel(monkeypatch):
    src = (KERNEL_DIR / "attention_mma.cuh").read_text()      # the constants moved with the shared pieces
    defs = {m.group(1): int(m.group(2)) for m in re.finditer(r"^#define (AM_\w+) (\d+)", src, flags=re.M)}
    assert defs == {"AM_TK": emul.TK, "AM_HG": emul.HG, "AM_NS": emul.NSL, "AM_MAXB": emul.MAXB,
                    "AM_PLD": emul.PLD}
    assert (am.TILE_KEYS, am.HEADS_PER_BLOCK) == (defs["AM_TK"], defs["AM_HG"])
    assert defs["AM_MAXB"] * defs["AM_NS"] * 16 == am.MAX_HEAD_DIM          # 16-dim blocks of the 4 slices
    assert am.shared_bytes(512) == 64 * 1024                                   # two stages of 16 rows
    monkeypatch.setenv("DS4CUPY_PREFILL_ATTN_MMA", "0")
    assert am.enabled() is False                         # switched off: no device query, attention.cu everywhere


SPLIT_CASES = {   # S, H, d, W, pos0, mode, ratio, K, n_rot, NS, rps
    "window_splits_of_8_position_3": (1, 40, 64, 16, 3, 0, 0, 0, 32, 4, 8),
    "dense_splits_of_20_many_windows": (2, 36, 96, 16, 150, 1, 3, 0, 32, 8, 20),
    "indexed_splits_of_5_across_window_end": (3, 33, 64, 16, 60, 2, 4, 12, 64, 7, 5),
}


@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_emulated_decode_partials_combine_to_float64(case, rng):
    """kernels/attention_decode_mma.cu's attn_partial_mma (attn_prefill_mma's body over one split of the key list,
    the split's entries as a key list shifted by s rps entries, its running (m, l, o) stored), emulated with
    splits=(NS, rps), then attention.cu's attn_combine in float64: within BOUND of the float64 attention. Splits
    that straddle the window's end and the compressed rows, skipped picks, splits past the list end (not stored);
    every stored element stored once, no bank conflict. (Without the shift, or with o off by a factor 2, it fails.)"""
    S, H, d, W, pos0, mode, ratio, K, n_rot, ns, rps = SPLIT_CASES[case]
    x = emul.make_inputs(rng, S, H, d, W, pos0, mode, ratio, K, n_rot)
    stats = {}
    ml, po = emul.attn_prefill_mma(x["q"], x["ring"], x["cur"], x["comp"], x["idx"], x["pos0"], W, ratio, mode,
                                   x["sinks"], n_rot, x["freqs"], stats=stats, splits=(ns, rps))
    assert stats["conflicts"] == 0
    for t in range(S):
        P = pos0 + t
        R = min(P + 1, W) + ((P + 1) // ratio if mode == 1 else (K if mode == 2 else 0))
        used = max(1, -(-R // rps))
        assert used < ns, "the case should leave splits past the list end"
        assert (stats["ml_written"][t, :, :used] == 1).all() and (stats["written"][t, :, :used] == 1).all()
        assert (stats["ml_written"][t, :, used:] == 0).all() and (stats["written"][t, :, used:] == 0).all()
    got = emul.attn_combine(ml, po, x["sinks"], pos0, W, ratio, mode, K, rps, n_rot, x["freqs"])
    ref = emul.ref_attention(**x)
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    assert err <= BOUND, f"max |emulated partials, combined - float64| = {err:.2e} * max |out|"
