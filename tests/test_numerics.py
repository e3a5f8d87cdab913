"""ds4cupy.engines.numerics against independent oracles: torch's float8_e4m3fn cast (RNE), transformers' YaRN frequencies, an
explicit Sylvester Hadamard matrix, and the FP4 e2m1 grid by brute force.

Random inputs come from the seeded `rng` fixture (tests/conftest.py); `DS4CUPY_SEED_SWEEP=1000` reruns them on 1,000
other seeds."""
from __future__ import annotations

import math

import numpy as np
import torch

from ds4cupy.engines import numerics as nm


def e4m3_grid() -> np.ndarray:
    """Every finite non-negative float8 e4m3fn value, from the bit layout (bias 7, 3 mantissa bits, exponent field 0
    subnormal, S.1111.111 the only NaN): 0, 2^-9, ..., 448."""
    values = [m / 8 * 2.0 ** -6 for m in range(8)]
    values += [(1 + m / 8) * 2.0 ** (e - 7) for e in range(1, 16) for m in range(8) if (e, m) != (15, 7)]
    return np.array(values)


def test_e4m3_round_matches_torch_cast(rng):
    """float32 inputs (the engine rounds only float32 values), so torch's cast rounds exactly once: a float64 input
    would be rounded to float32 first, and a value just above a tie (42.00000057) would land on the tie and go to
    even (40) where one rounding gives 44. The exact ties between neighbouring grid values and their float32
    neighbours are always in the set, so ties-to-even is checked on every run, not by chance."""
    grid = e4m3_grid()
    ties = (grid[:-1] + grid[1:]) / 2
    ties32 = ties.astype(np.float32)
    assert np.array_equal(ties32, ties)                                     # midpoints are exact in float32
    near = np.concatenate([np.nextafter(ties32, np.float32(0)), np.nextafter(ties32, np.float32(np.inf))])
    random = np.concatenate([rng.standard_normal(20000) * 50, rng.uniform(-448, 448, 20000),
                             rng.standard_normal(5000) * 2.0 ** -8])        # subnormal range too
    x = np.concatenate([grid, ties32, near, random.astype(np.float32)])
    x = np.concatenate([x, -x]).astype(np.float32)
    ours = nm.e4m3_round(x)
    ref = torch.from_numpy(x).to(torch.float8_e4m3fn).to(torch.float64).numpy()
    bad = np.flatnonzero(ours != ref)
    assert bad.size == 0, f"{bad.size} mismatches, e.g. x={x[bad[0]]!r}: ours {ours[bad[0]]}, torch {ref[bad[0]]}"
    # the ties really go to the even mantissa (a round-half-up bug would pass on random inputs alone)
    even = nm.e4m3_round(ties32[1:-1])
    lower, upper = grid[1:-2], grid[2:-1]
    code = np.searchsorted(grid, lower)                # index on the grid = the bit pattern's low bits
    np.testing.assert_array_equal(even, np.where(code % 2 == 0, lower, upper))


def test_fp8_sim_blocks_use_power_of_two_scales_rounded_up(rng):
    x = (rng.standard_normal((7, 128)) * rng.uniform(0.01, 30, (7, 1))).astype(np.float32)
    y = nm.fp8_sim(x, 64)
    for r in range(7):
        for b in range(2):
            blk = x[r, 64 * b: 64 * (b + 1)].astype(np.float64)
            s = 2.0 ** math.ceil(math.log2(max(np.abs(blk).max(), 1e-4) / 448))
            expect = torch.tensor(blk / s, dtype=torch.float32).to(torch.float8_e4m3fn).double().numpy() * s
            np.testing.assert_allclose(y[r, 64 * b: 64 * (b + 1)], expect, rtol=0, atol=0)


def test_e2m1_round_is_nearest_grid_point_ties_to_even_code(rng):
    grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    x = np.concatenate([rng.uniform(-6, 6, 5000), (grid[:-1] + grid[1:]) / 2, -(grid[:-1] + grid[1:]) / 2])
    y = nm.e2m1_round(x)
    for v, r in zip(x, y):
        d = np.abs(np.abs(v) - grid)
        best = np.flatnonzero(d == d.min())
        code = best[0] if len(best) == 1 else best[best % 2 == 0][0]
        assert r == math.copysign(grid[code], v) or (grid[code] == 0 and r == 0), (v, r)


def test_fp4_sim_blocks_use_power_of_two_scales_rounded_up(rng):
    """Blocks of 32: s = 2^ceil(log2(max(amax, 6 * 2^-126) / 6)), each value the e2m1 grid point nearest to x / s
    (ties to the even code) times s; the grid rounding here by brute force."""
    grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    x = (rng.standard_normal((6, 64)) * rng.uniform(0.01, 30, (6, 1))).astype(np.float32)
    x[2, :32] *= np.float32(40 / np.abs(x[2, :32]).max())
    x[2, 7] = -48.0                                                    # amax exactly 6 * 2^3: the scale is 2^3
    y = nm.fp4_sim(x, 32)
    for r in range(6):
        for b in range(2):
            blk = x[r, 32 * b: 32 * (b + 1)].astype(np.float64)
            s = 2.0 ** math.ceil(math.log2(max(np.abs(blk).max(), 6 * 2.0 ** -126) / 6))
            for v, got in zip(blk / s, y[r, 32 * b: 32 * (b + 1)]):
                d = np.abs(abs(v) - grid)
                best = np.flatnonzero(d == d.min())
                code = best[0] if len(best) == 1 else best[best % 2 == 0][0]
                assert got == np.float32(math.copysign(grid[code], v) * s), (r, b, v * s, got)
    assert np.array_equal(nm.fp4_sim(y, 32), y)                       # already on the grid: unchanged


def test_hadamard_is_the_orthonormal_sylvester_matrix(rng):
    n = 128
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    x = rng.standard_normal((5, n)).astype(np.float32)
    np.testing.assert_allclose(nm.hadamard(x), x @ h.T / math.sqrt(n), rtol=1e-5, atol=1e-5)


def test_yarn_frequencies_match_transformers():
    from transformers import DeepseekV4Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = DeepseekV4Config(head_dim=512, qk_rope_head_dim=64, compress_rope_theta=160000.0,
                           rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                                         "beta_fast": 32, "beta_slow": 1},
                           max_position_embeddings=1048576)
    inv_freq, scaling = ROPE_INIT_FUNCTIONS["yarn"](cfg, None, layer_type="compress")
    ours = nm.rope_freqs(64, 160000.0, (16.0, 65536, 32.0, 1.0))
    np.testing.assert_allclose(ours, inv_freq.double().numpy(), rtol=1e-6)
    assert scaling == 1.0          # no YaRN magnitude scaling (model.md §2.3)
    plain = nm.rope_freqs(64, 10000.0)
    np.testing.assert_allclose(plain, 1.0 / 10000.0 ** (np.arange(0, 64, 2) / 64), rtol=1e-12)


def test_rope_is_interleaved_on_the_trailing_dims_and_inverts(rng):
    x = rng.standard_normal((3, 2, 96)).astype(np.float32)
    cos, sin = nm.rope_cos_sin(nm.rope_freqs(32, 10000.0), np.array([0, 5, 77]))
    y = nm.rope_apply(x, cos, sin)
    np.testing.assert_array_equal(y[..., :64], x[..., :64])                 # leading dims untouched
    np.testing.assert_allclose(y[0], x[0], atol=1e-6)                        # position 0 is the identity
    a, b = x[1, :, 64], x[1, :, 65]                                          # pair (64, 65) turns by 5 * f_0 = 5 rad
    np.testing.assert_allclose(y[1, :, 64], a * math.cos(5) - b * math.sin(5), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(nm.rope_apply(y, cos, sin, inverse=True), x, atol=1e-5)


def test_hc_sinkhorn_is_nearly_doubly_stochastic(rng):
    mix = rng.standard_normal((6, 24)).astype(np.float32)
    pre, post, comb = nm.hc_split_sinkhorn(mix, np.array([0.7, 0.4, 0.9]), rng.standard_normal(24), 4, 20, 1e-6)
    assert pre.shape == (6, 4) and post.shape == (6, 4) and comb.shape == (6, 4, 4)
    assert (pre > 0).all() and (pre < 1 + 1e-5).all() and (post > 0).all() and (post < 2).all()
    np.testing.assert_allclose(comb.sum(axis=-2), 1.0, atol=1e-4)          # columns normalised last
    np.testing.assert_allclose(comb.sum(axis=-1), 1.0, atol=1e-2)
