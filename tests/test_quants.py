"""ds4cupy.format.quants against gguf.quants (the independent oracle): decoders bit for bit, random blocks, quantizers."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from ds4cupy.format import quants as Q
from seeding import current_test_seed

BLOCK_TYPES = [T.Q8_0, T.Q2_K, T.Q4_K, T.IQ2_XXS, T.MXFP4, T.NVFP4]
FLOAT_TYPES = [T.F32, T.F16, T.BF16]
ALL_TYPES = FLOAT_TYPES + BLOCK_TYPES


def fresh_rng():
    seed = current_test_seed()       # fixed per test (tests/seeding.py), named in failure messages
    return np.random.default_rng(seed), seed


def gguf_dequantize(raw, qtype, shape):
    """gguf's decoder on our raw layout (it wants bytes for BF16, where we hold uint16 bits)."""
    data = raw.view(np.uint8) if qtype == T.BF16 else raw
    return np.asarray(gq.dequantize(data, qtype), dtype=np.float32).reshape(shape)


def fuzz_blocks(qtype, n_rows, n_cols, rng):
    """Uniformly random bytes with only the f16 / E8M0 scale fields made finite and moderate: every quant bit
    pattern occurs, which random_blocks (realistic scales) does not guarantee."""
    block, size = Q.BLOCK_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_rows, n_cols // block, size), dtype=np.uint8)

    def f16_field(offset):
        vals = (rng.uniform(0.5, 2.0, raw.shape[:2]) * 2.0 ** rng.integers(-12, 3, raw.shape[:2])).astype(np.float16)
        raw[:, :, offset:offset + 2] = vals[..., None].view(np.uint8)

    if qtype in (T.Q8_0, T.IQ2_XXS, T.Q4_K):
        f16_field(0)
    if qtype == T.Q4_K:
        f16_field(2)
    if qtype == T.Q2_K:
        f16_field(80)
        f16_field(82)
    if qtype == T.MXFP4:
        raw[:, :, 0] = rng.integers(1, 254, raw.shape[:2])  # 0..253 keeps 12 * 2^(e-128) finite
    return raw.reshape(n_rows, -1)


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_decoder_bit_exact_on_fuzzed_blocks(qtype):
    rng, seed = fresh_rng()
    block = Q.BLOCK_SIZES[qtype][0]
    shape = (5, 3 * block)  # odd row count, several blocks a row
    raw = fuzz_blocks(qtype, *shape, rng)
    ours = Q.dequantize(raw, qtype, shape)
    ref = gguf_dequantize(raw, qtype, shape)
    assert ours.dtype == np.float32 and ours.shape == shape
    assert np.array_equal(ours, ref, equal_nan=True), f"{qtype.name} seed={seed}"


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("std", [0.02, 0.7])
def test_random_blocks_valid_and_decode_like_gguf(qtype, std):
    rng, seed = fresh_rng()
    block = Q.BLOCK_SIZES[qtype][0]
    shape = (3, 7, 4 * max(block, 64))  # experts x odd rows x cols
    raw = Q.random_blocks(qtype, shape, rng, std)
    assert raw.shape == Q.raw_shape(qtype, shape)
    if qtype in FLOAT_TYPES:
        assert raw.dtype == Q.PLAIN_DTYPES[qtype]
    else:
        assert raw.dtype == np.uint8 and raw.shape[-1] == Q.row_bytes(qtype, shape[-1])
    ours = Q.dequantize(raw, qtype, shape)
    ref = gguf_dequantize(raw, qtype, shape)
    assert np.array_equal(ours, ref), f"{qtype.name} seed={seed}"
    assert np.isfinite(ours).all()
    # 5376+ values: the sample RMS of these heavy-ish tailed blocks is within a few % of its expectation; 12 % allows
    # for the per-block scale jitter and the coarse MXFP4 power-of-two scales with few blocks.
    rms = float(np.sqrt(np.mean(ours.astype(np.float64) ** 2)))
    assert abs(rms / std - 1) < 0.12, f"{qtype.name} std={std} rms={rms} seed={seed}"
    assert abs(float(ours.mean())) < 0.2 * std, f"{qtype.name} mean={ours.mean()} seed={seed}"


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q2_K, T.Q4_K, T.IQ2_XXS], ids=lambda t: t.name)
def test_random_blocks_scales_are_normal_f16(qtype):
    rng, _ = fresh_rng()
    raw = Q.random_blocks(qtype, (16, 512), rng, Q.min_std(qtype) * 1.01)
    blocks = raw.reshape(-1, Q.BLOCK_SIZES[qtype][1])
    offsets = {T.Q8_0: [0], T.IQ2_XXS: [0], T.Q4_K: [0, 2], T.Q2_K: [80, 82]}[qtype]
    for off in offsets:
        d = np.ascontiguousarray(blocks[:, off:off + 2]).view(np.float16)[:, 0].astype(np.float32)
        assert np.all(np.isfinite(d)) and np.all(d >= 2.0 ** -14), f"{qtype.name} field at {off}: min {d.min()}"


def test_random_blocks_deterministic_by_seed():
    a = Q.random_blocks(T.Q4_K, (4, 512), np.random.default_rng(7), 0.02)
    b = Q.random_blocks(T.Q4_K, (4, 512), np.random.default_rng(7), 0.02)
    c = Q.random_blocks(T.Q4_K, (4, 512), np.random.default_rng(8), 0.02)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("qtype", [T.F16, T.Q8_0], ids=lambda t: t.name)
def test_quantize_equals_gguf(qtype):
    rng, seed = fresh_rng()
    x = (rng.standard_normal((9, 96)) * rng.uniform(0.01, 3)).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block: d = 0 path
    assert np.array_equal(Q.quantize(x, qtype), gq.quantize(x, qtype)), f"seed={seed}"


def test_quantize_bf16_equals_gguf_and_round_trips():
    rng, seed = fresh_rng()
    x = (rng.standard_normal((5, 33)) * 10).astype(np.float32)
    x[0, 0] = np.nan
    bits = Q.quantize(x, T.BF16)
    assert bits.dtype == np.uint16 and bits.shape == x.shape
    assert np.array_equal(bits.view(np.uint8), gq.quantize(x, T.BF16).reshape(5, -1)), f"seed={seed}"
    back = Q.dequantize(bits, T.BF16, x.shape)
    assert np.isnan(back[0, 0])
    # bf16 keeps 8 significant bits: round to nearest errs by <= half an ulp = 2^-8 of the value's power of two
    assert np.all(np.abs(back[1:] - x[1:]) <= np.abs(x[1:]) * 2.0 ** -8)


def test_quantize_q8_0_round_trip_error_bound():
    rng, seed = fresh_rng()
    x = rng.standard_normal((4, 128)).astype(np.float32)
    y = Q.dequantize(Q.quantize(x, T.Q8_0), T.Q8_0, x.shape)
    amax = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True)
    # error <= d/2 (rounding) + f16 rounding of d (2^-11 relative) * 127 steps
    bound = amax / 127 * (0.5 + 127 * 2.0 ** -11) * 1.0001
    assert np.all(np.abs((y - x).reshape(-1, 32)) <= bound), f"seed={seed}"


def test_dequantize_accepts_byte_view_of_bf16():
    rng, _ = fresh_rng()
    bits = Q.random_blocks(T.BF16, (3, 8), rng, 1.0)
    assert np.array_equal(Q.dequantize(bits, T.BF16, (3, 8)), Q.dequantize(bits.view(np.uint8), T.BF16, (3, 8)))


def test_sizes_match_gguf():
    from gguf import GGML_QUANT_SIZES
    for t, size in Q.BLOCK_SIZES.items():
        assert GGML_QUANT_SIZES[t] == size, t.name
    assert Q.row_bytes(T.Q2_K, 4096) == 16 * 84
    assert Q.row_bytes("bf16", 10) == 20


def test_errors_name_the_bad_value():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="100.*Q8_0|Q8_0.*100"):
        Q.row_bytes(T.Q8_0, 100)
    with pytest.raises(ValueError, match="Q4_0"):
        Q.row_bytes(T.Q4_0, 256)
    with pytest.raises(ValueError, match="'nope'"):
        Q.qtype_of("nope")
    with pytest.raises(ValueError, match="needs 68 bytes, got 34"):
        Q.dequantize(np.zeros((1, 34), np.uint8), T.Q8_0, (1, 64))
    with pytest.raises(ValueError, match="std=1e-06"):
        Q.random_blocks(T.Q4_K, (2, 256), rng, 1e-6)
    with pytest.raises(ValueError, match="std must be"):
        Q.random_blocks(T.F32, (2, 4), rng, float("nan"))
    with pytest.raises(ValueError, match="I32"):
        Q.random_blocks(T.I32, (2, 4), rng, 1.0)
    with pytest.raises(ValueError, match="Q2_K"):
        Q.quantize(np.ones((1, 256), np.float32), T.Q2_K)
    with pytest.raises(ValueError, match="not a positive multiple"):
        Q.quantize(np.ones((1, 33), np.float32), T.Q8_0)
