"""Switch HC_SIDE_SINKHORN: hc_step launched with sk (the Sinkhorn's inputs written instead of running it) followed by
hc_sinkhorn_deferred (kernels/hc.cu) against hc_step's fused Sinkhorn, and the tiny model with the switch on against
off. The deferred kernel runs hc_sinkhorn on the same doubles in the same order, so every result is bit for bit the
fused path's (bound 0); the coefficients are also checked against numerics.hc_split_sinkhorn on the mix that sk holds
(float64 in both, float32 out: rtol 1e-6 leaves room for a one-ulp float32 rounding flip from exp's last bit)."""
from __future__ import annotations

import numpy as np
import pytest

from ds4cupy.engines import numerics as nm
from gpu_util import GPU_MARKS, gpu_available

cp = pytest.importorskip("cupy") if gpu_available() else None

pytestmark = GPU_MARKS

F32 = np.float32
DIMS = {"tiny": 256, "flash": 4096}      # D; n = 4 streams, 24 mix rows (ModelConfig.tiny / DeepSeek-V4-Flash)


@pytest.fixture
def rng(seed):
    return np.random.default_rng(seed)


def dev(a):
    return cp.asarray(np.ascontiguousarray(a))


@pytest.mark.parametrize("size", ["tiny", "flash"])
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("kernel", ["specialised", "generic"])
@pytest.mark.parametrize("post", [True, False])
def test_deferred_sinkhorn_equals_fused(rng, size, T, kernel, post, monkeypatch):
    from ds4cupy.engines.cuda import ops
    n, D = 4, DIMS[size]
    rows, iters, eps = 2 * n + n * n, 20, 1e-6
    X = (rng.standard_normal((T, n, D)) * rng.uniform(0.5, 2, (T, n, 1))).astype(F32)
    y = rng.standard_normal((T, D)).astype(F32)
    coef_prev = rng.uniform(0.1, 1.0, (T, n + n * n)).astype(F32)
    fn = (rng.standard_normal((rows, n * D)) * 0.05).astype(np.float16)
    scale = rng.uniform(0.5, 2.0, 3).astype(F32)
    base = rng.standard_normal(rows).astype(F32)
    w = rng.uniform(0.5, 1.5, D).astype(F32)
    counter = cp.zeros(T, cp.uint32)
    ns = ops.hc_step_nsplit(n, D, T)
    if kernel == "generic":
        monkeypatch.setattr(ops, "hc_step_kernel", lambda *a: "hc_step")
    else:
        assert ops.hc_step_kernel(n, D, rows, ops.DT_F16, (dev(X),)) == "hc_step_n4_r24_f16"

    def run(deferred: bool):
        gX = dev(X)
        u, xn = cp.full((T, D), np.nan, cp.float32), cp.full((T, D), np.nan, cp.float32)
        coef = cp.full((T, n + n * n), np.nan, cp.float32)
        part = cp.full((T, ns, rows + 1), np.nan, cp.float32)
        sk = cp.full(T * (rows + 2), np.nan, cp.float64) if deferred else None
        ops.hc_step(gX, dev(y) if post else None, dev(coef_prev) if post else None, dev(fn), ops.DT_F16, rows, part,
                    ns, counter, dev(scale), dev(base), iters, eps, eps, False, u, coef, dev(w), xn, sk)
        assert int(counter.sum()) == 0, "hc_step left its arrival counters non-zero"
        mid = cp.asnumpy(coef)
        if deferred:            # hc_step wrote post only; the comb is the deferred kernel's
            assert np.isfinite(mid[:, :n]).all() and np.isnan(mid[:, n:]).all()
            assert np.isfinite(cp.asnumpy(sk)).all()
            ops.hc_sinkhorn_deferred(sk, rows, n, dev(scale), dev(base), iters, eps, coef, T)
        return [cp.asnumpy(a) for a in (gX, u, xn, coef)], mid, (cp.asnumpy(sk) if deferred else None)

    fused, _, _ = run(False)
    got, mid, sk = run(True)
    for name, a, b in zip(("X", "u", "xn", "coef"), got, fused):
        np.testing.assert_array_equal(a, b, err_msg=name)
    np.testing.assert_array_equal(mid[:, :n], fused[3][:, :n])
    # independent check of what sk holds and of the deferred Sinkhorn: rs = 1 / rms of the post-hc_post state (float32
    # sums of squares in other orders: relative 1e-5) and comb = numerics' Sinkhorn of mix = sums * rs
    sk = sk.reshape(T, rows + 2)
    flat = fused[0].reshape(T, -1).astype(np.float64)
    rs_ref = 1.0 / np.sqrt(np.mean(flat * flat, axis=-1) + eps)
    np.testing.assert_allclose(sk[:, rows + 1], rs_ref, rtol=1e-5)
    _, post_ref, comb_ref = nm.hc_split_sinkhorn(sk[:, :rows] * sk[:, rows + 1:], scale, base, n, iters, eps)
    np.testing.assert_allclose(got[3][:, :n], post_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got[3][:, n:].reshape(T, n, n), comb_ref, rtol=1e-6, atol=1e-7)


# ---- the tiny model, switch on against off ---------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["q2", "q4"])
def tiny_file(request, tmp_path_factory):
    from ds4cupy.format.config import ModelConfig
    from ds4cupy.tools.make_model import tokenizer_fields, write_random_model
    n_vocab, _ = tokenizer_fields(None)
    path = tmp_path_factory.mktemp("gpu-hc-side") / f"tiny-{request.param}.gguf"
    return write_random_model(path, ModelConfig.tiny(n_vocab), experts=request.param, seed=11)


@pytest.mark.parametrize("qat,branches", [(True, "1"), (False, "1"), (False, "0")])
def test_tiny_model_side_sinkhorn_bit_identical(tiny_file, qat, branches, rng, monkeypatch):
    """A 300-token chunked prefill (chunks of 64), 30 graph-replayed greedy decode steps and a 40-token all-logits
    prefill, switch on against off (side stream on, and off: inline), logits bit for bit at every step. Every
    non-head hc_step of the on-session passes sk and is followed by one hc_sinkhorn_deferred; the off-session never
    launches it."""
    from ds4cupy.engines.cuda import ops
    from test_gpu_model import _lockstep, _on_and_off

    monkeypatch.setenv("DS4CUPY_BRANCHES", branches)
    on, off = _on_and_off(tiny_file, "HC_SIDE_SINKHORN", qat, monkeypatch)
    assert on.model.hc_side_sinkhorn and not off.model.hc_side_sinkhorn
    assert on.model.branches == (branches == "1")
    calls = {"step": [], "deferred": []}
    hc_step, deferred = ops.hc_step, ops.hc_sinkhorn_deferred

    def count_step(*a, **k):
        # positional (session._hc): ..., counter (8), ..., head (14), ..., xn (18), sk (19)
        sk = a[19] if len(a) > 19 else k.get("sk")
        calls["step"].append((a[8].data.ptr, a[14], sk is not None))
        return hc_step(*a, **k)

    def count_deferred(*a, **k):
        calls["deferred"].append(a[0].data.ptr)
        return deferred(*a, **k)
    monkeypatch.setattr(ops, "hc_step", count_step)
    monkeypatch.setattr(ops, "hc_sinkhorn_deferred", count_deferred)

    ids = rng.integers(0, on.model.config.n_vocab, 300)
    _lockstep(on, off, ids, 30, np.testing.assert_array_equal)
    assert on._graph is not None and off._graph is not None
    on.reset()
    off.reset()
    np.testing.assert_array_equal(on.prefill(ids[:40], all_logits=True), off.prefill(ids[:40], all_logits=True))

    mine = {on._hc_counter.data.ptr: "on", off._hc_counter.data.ptr: "off"}
    steps = {s: [(head, has_sk) for ptr, head, has_sk in calls["step"] if mine[ptr] == s] for s in ("on", "off")}
    mix_on = [has_sk for head, has_sk in steps["on"] if not head]
    assert mix_on and all(mix_on), "the on-session launched an hc_step mix without sk"
    assert not any(has_sk for _, has_sk in steps["off"])
    assert all(head is False or not has_sk for head, has_sk in steps["on"])
    assert len(steps["on"]) == len(steps["off"])
    assert calls["deferred"] and all(p == on._hc_sk.data.ptr for p in calls["deferred"])
    assert len(calls["deferred"]) == len(mix_on)
    assert off._hc_sk is None
