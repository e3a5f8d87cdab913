"""kernels/topk_multi.cu (switch TOPK_MULTI) without a GPU: a NumPy model of its exact arithmetic (three radix levels
of 11 / 11 / 10 bits over per-query histograms, G contiguous block slices, 256 contiguous thread ranges a block, the
deterministic counted compaction) against the selection rule of indexer_topk written independently (the K largest
ord_key values, ties -> lower index, ascending, -1 padding), on fresh random rows with many ties, NaN / inf / -0,
all-equal rows, nvis around K, and every G from 1 to more blocks than rows. The GPU test (test_gpu_topk_multi.py)
then checks the kernels against indexer_topk bit for bit; this one checks the design's proof (topk_multi.cu header)."""
from __future__ import annotations

import numpy as np
import pytest

THREADS = 256


def ord_key(x: np.ndarray) -> np.ndarray:
    """indexer.cu's ord_key on float32 bits: sign set -> ~u, else u | 0x80000000 (larger float -> larger key)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return np.where(u & np.uint32(0x80000000), ~u, u | np.uint32(0x80000000)).astype(np.uint32)


def topk_rule(row: np.ndarray, nvis: int, K: int) -> np.ndarray:
    """indexer_topk's output for one query: int32 [K]."""
    out = np.full(K, -1, np.int32)
    if nvis <= K:
        out[:nvis] = np.arange(nvis)
        return out
    key = ord_key(row[:nvis]).astype(np.int64)
    out[:] = np.sort(np.argsort(-key, kind="stable")[:K])
    return out


def topk_multi_model(row: np.ndarray, nvis: int, K: int, G: int) -> np.ndarray:
    """The kernels' computation step by step (topkm_hist / topkm_scan x 3, topkm_count, topkm_write)."""
    out = np.full(K, -1, np.int32)
    if nvis <= K:
        out[:nvis] = np.arange(nvis)
        return out
    key = ord_key(row[:nvis])
    L = -(-nvis // G)
    slices = [(g * L, min(nvis, g * L + L)) for g in range(G)]
    prefix, need = 0, K
    for level, (shift, bits) in enumerate(((21, 11), (10, 11), (0, 10))):
        hmask = 0 if level == 0 else (0xFFFFFFFF << (shift + bits)) & 0xFFFFFFFF
        hist = np.zeros(2048, np.int64)
        for s0, s1 in slices:                        # each block's histogram, added into the query's
            k = key[s0:s1]
            k = k[(k & np.uint32(hmask)) == np.uint32(prefix)]
            hist += np.bincount((k >> np.uint32(shift)) & np.uint32((1 << bits) - 1), minlength=2048)
        nb = 1 << bits
        found = False
        excl = 0
        for d in range(nb - 1, -1, -1):              # from the top digit down (the scan's order)
            if excl < need <= excl + hist[d]:
                prefix, need, found = prefix | (d << shift), need - excl, True
                break
            excl += int(hist[d])
        assert found
    kth = np.uint32(prefix)
    cnt = [(int(np.sum(key[s0:s1] > kth)), int(np.sum(key[s0:s1] == kth))) for s0, s1 in slices]
    written = np.zeros(K, np.int64)
    for g, (s0, s1) in enumerate(slices):
        if s0 >= s1:
            continue
        gt_before = sum(c[0] for c in cnt[:g])
        eq_before = sum(c[1] for c in cnt[:g])
        chunk = -(-(s1 - s0) // THREADS)
        ranges = [(min(s1, s0 + i * chunk), min(s1, s0 + i * chunk + chunk)) for i in range(THREADS)]
        gts = [int(np.sum(key[a:b] > kth)) for a, b in ranges]
        eqs = [int(np.sum(key[a:b] == kth)) for a, b in ranges]
        eq_excl = np.concatenate([[0], np.cumsum(eqs)[:-1]])
        takes = [max(0, min(e, need - (eq_before + int(x)))) for e, x in zip(eqs, eq_excl)]
        at_excl = np.concatenate([[0], np.cumsum(np.add(gts, takes))[:-1]])
        for (a, b), take, ex in zip(ranges, takes, at_excl):
            at = gt_before + min(need, eq_before) + int(ex)
            seen = 0
            for i in range(a, b):
                if key[i] > kth or (key[i] == kth and seen < take):
                    seen += key[i] == kth
                    out[at] = i
                    written[at] += 1
                    at += 1
    assert np.all(written == 1), "every slot written exactly once"
    return out


def _row(rng, kind: str, n: int) -> np.ndarray:
    if kind == "ties":
        return rng.choice(np.array([-1.5, 0.0, 0.25, 0.25001, 2.0, 7.0], np.float32), n)
    if kind == "equal":
        return np.full(n, 0.5, np.float32)
    if kind == "special":
        x = rng.choice(np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0], np.float32), n)
        mask = rng.random(n) < 0.5
        x[mask] = rng.standard_normal(int(mask.sum())).astype(np.float32)
        return x
    return rng.standard_normal(n).astype(np.float32)


def test_ord_key_orders_like_the_floats(rng):
    x = np.array([-np.inf, -2.0, -1e-38, -0.0, 0.0, 1e-45, 1.0, np.inf], np.float32)
    k = ord_key(x)
    assert np.all(np.diff(k.astype(np.int64)) > 0)
    assert ord_key(np.array([np.nan], np.float32))[0] > k[-1]              # +NaN above +inf
    assert ord_key(-np.array([np.nan], np.float32))[0] < k[0]              # -NaN below -inf


@pytest.mark.parametrize("kind", ["random", "ties", "equal", "special"])
@pytest.mark.parametrize("nvis,K", [(5, 6), (6, 6), (7, 6), (300, 6), (511, 512), (512, 512), (513, 512),
                                    (5000, 512)])
@pytest.mark.parametrize("G", [1, 3, 7, 64])
def test_model_equals_rule(rng, kind, nvis, K, G):
    row = _row(rng, kind, nvis + 7)          # entries past nvis exist and must be ignored
    np.testing.assert_array_equal(topk_multi_model(row, nvis, K, G), topk_rule(row, nvis, K))


def test_more_blocks_than_rows_and_a_tie_straddling_blocks(rng):
    row = np.zeros(40, np.float32)
    row[[3, 17, 18, 33]] = 1.0                 # 4 greater, then the K-th value's ties spread over every block
    for G in (1, 2, 5, 40, 100):
        np.testing.assert_array_equal(topk_multi_model(row, 40, 10, G), topk_rule(row, 40, 10))
