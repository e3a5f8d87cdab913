"""The NumPy reference against transformers' DeepseekV4ForCausalLM: the oracle we did not write.

A tiny random model with EVERY parameter randomised (sinks, HC fn/base/scale, compressor position biases, router
bias, distinct tid2eid rows, norms away from 1) is saved with save_pretrained, converted with `ds4cupy convert --type
f32` and loaded by ds4cupy's reference backend with QAT simulation off (transformers has none). The prompt crosses the
sliding window many times and several HCA windows, and index_topk is far below the number of compressed rows, so the
indexer really selects.

Tolerance: both sides compute in float32 with different summation orders (BLAS blocking, einsum vs matmul, float64
sums in our norms); the measured difference is a few 1e-6 of max|logit|, so 1e-4 x max|logit| leaves margin while a
single wrong sign, rope layout or mask shows up as 1e-2 or more.

The models come from ds4cupy.tools.hf_oracle (64 indexer heads, so no exact-zero score ties: see its docstring).
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from pathlib import Path  # noqa: E402

import ds4cupy  # noqa: E402
from ds4cupy.tools.convert import convert  # noqa: E402
from ds4cupy.tools.hf_oracle import random_tiny_model  # noqa: E402


REAL_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizer" / "tokenizer.json"

CONFIGS = {
    # window 8, CSA 4, HCA 16, a hash layer of each attention kind
    "small-vocab": dict(vocab=1024, seed=3, hca_rate=16, hash_layers=2,
                        layer_types=["sliding_attention", "compressed_sparse_attention",
                                     "heavily_compressed_attention", "compressed_sparse_attention"]),
    # the real vocabulary size (embedding, head and tid2eid at full height)
    "real-vocab": dict(vocab=129280, seed=11, hca_rate=8, hash_layers=1,
                       layer_types=["sliding_attention", "heavily_compressed_attention",
                                    "compressed_sparse_attention"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_reference_matches_transformers(name, tmp_path):
    spec = CONFIGS[name]
    model = random_tiny_model(**spec)
    model.save_pretrained(tmp_path / "hf")
    tokenizer = REAL_TOKENIZER if spec["vocab"] == 129280 and REAL_TOKENIZER.is_file() else None
    gguf_path = convert(tmp_path / "hf", tmp_path / "model.gguf", dtype="f32", tokenizer_json=tokenizer)

    n_tokens = 150 if name == "real-vocab" else 260
    ids = np.random.default_rng(spec["seed"] + 7).integers(0, spec["vocab"], n_tokens)
    with torch.no_grad():
        expected = model(torch.tensor(ids)[None]).logits[0].float().numpy()

    ours = ds4cupy.load(gguf_path, backend="reference", qat=False)
    got = ours.new_session(1024).prefill(ids, all_logits=True)
    assert got.shape == expected.shape
    scale = np.abs(expected).max()
    err = np.abs(got - expected).max(axis=-1)
    worst = int(np.argmax(err))
    assert err.max() <= 1e-4 * scale, f"position {worst}: max |diff| {err.max():.3g} vs max |logit| {scale:.3g}"
    # the comparison is not vacuous: logits vary across positions and tokens
    assert expected.std(axis=-1).min() > 1e-3


@pytest.mark.slow
def test_parity_is_sensitive_to_the_hc_orientation(tmp_path):
    """A control: transposing one layer's Sinkhorn mixing (the classic mHC mistake) must break parity."""
    model = random_tiny_model(**CONFIGS["small-vocab"])
    model.save_pretrained(tmp_path / "hf")
    gguf_path = convert(tmp_path / "hf", tmp_path / "model.gguf", dtype="f32")
    ids = np.random.default_rng(1).integers(0, 1024, 40)
    with torch.no_grad():
        expected = model(torch.tensor(ids)[None]).logits[0].float().numpy()
    ours = ds4cupy.load(gguf_path, backend="reference", qat=False)
    impl = ours._impl
    wrong = staticmethod(lambda y, X, post, comb: impl.__class__.hc_post(y, X, post, np.swapaxes(comb, -1, -2)))
    impl.hc_post = wrong
    got = ours.new_session(64).prefill(ids, all_logits=True)
    assert np.abs(got - expected).max() > 1e-2 * np.abs(expected).max()
