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
Two configs exist for paths the real model's settings leave unexercised: 3 Sinkhorn iterations (with 20 the mixing
has converged and one iteration more or less is invisible), and a SwiGLU limit of 1 (no activation reaches 10) with an
mHC epsilon of 0.05 (the real 1e-6 is invisible). Each carries controls: with the path broken on our side (one
iteration fewer; the clamp removed; the epsilon 0) the same comparison must miss by more than 1e-2 x max|logit|.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import ds4cupy
from ds4cupy.engines.numerics import silu
from ds4cupy.tools.convert import convert
from ds4cupy.tools.hf_oracle import random_tiny_model


REAL_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizer" / "tokenizer.json"

CONFIGS = {
    # window 8, CSA 4, HCA 16, a hash layer of each attention kind
    "small-vocab": dict(vocab=1024, seed=3, hca_rate=16, hash_layers=2,
                        layer_types=["sliding_attention", "compressed_sparse_attention",
                                     "heavily_compressed_attention", "compressed_sparse_attention"]),
    # 3 Sinkhorn iterations: the mixing is far from converged, so each iteration counts (with 20 it has converged,
    # and one iteration fewer moves the logits far less than the tolerance)
    "few-sinkhorn": dict(vocab=1024, seed=5, hca_rate=16, hash_layers=1, sinkhorn_iters=3,
                         layer_types=["compressed_sparse_attention", "heavily_compressed_attention",
                                      "sliding_attention"]),
    # SwiGLU limit 1: gate and up projections (~N(0, 1) here) pass it often, so the clamp acts (at 10 it never does);
    # an mHC epsilon of 0.05 (the real 1e-6 is invisible) makes each place it is added count
    "clamp-and-eps": dict(vocab=1024, seed=9, hca_rate=16, hash_layers=1, swiglu_limit=1.0, hc_eps=0.05,
                         layer_types=["heavily_compressed_attention", "compressed_sparse_attention",
                                      "sliding_attention"]),
    # the real vocabulary size (embedding, head and tid2eid at full height; last, as the slowest)
    "real-vocab": dict(vocab=129280, seed=11, hca_rate=8, hash_layers=1,
                       layer_types=["sliding_attention", "heavily_compressed_attention",
                                    "compressed_sparse_attention"]),
}
N_TOKENS = {"real-vocab": 150, "few-sinkhorn": 120, "clamp-and-eps": 120}


def _no_clamp(impl):
    impl._swiglu = staticmethod(lambda g, u, lim: silu(g) * u)


def _one_sinkhorn_iteration_fewer(impl):
    impl.config.hc_sinkhorn_iters -= 1


def _no_hc_eps(impl):
    impl.config.hc_eps = 0.0


# Controls for the configs that exist for a path: the same comparison with that path broken on our side must fail
# clearly, so the config keeps exercising what it is there for.
CONTROLS = {"few-sinkhorn": [_one_sinkhorn_iteration_fewer], "clamp-and-eps": [_no_clamp, _no_hc_eps]}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_reference_matches_transformers(name, tmp_path):
    spec = CONFIGS[name]
    model = random_tiny_model(**spec)
    model.save_pretrained(tmp_path / "hf")
    tokenizer = REAL_TOKENIZER if spec["vocab"] == 129280 and REAL_TOKENIZER.is_file() else None
    gguf_path = convert(tmp_path / "hf", tmp_path / "model.gguf", dtype="f32", tokenizer_json=tokenizer)

    n_tokens = N_TOKENS.get(name, 260)
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
    for control in CONTROLS.get(name, []):
        broken = ds4cupy.load(gguf_path, backend="reference", qat=False)
        control(broken._impl)
        miss = np.abs(broken.new_session(1024).prefill(ids, all_logits=True) - expected).max()
        assert miss > 1e-2 * scale, f"{name}, {control.__name__}: still matches ({miss:.3g} vs max |logit| {scale:.3g})"


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
