"""The sampler's candidate set on the GPU (kernels/sample.cu through engines/cuda/sample_ops.py, and
CudaSession.decode_top) against NumPy (text.candidates.top_candidates) and against host sampling on the full logits.

Exactness. ids and values must be equal bit for bit: the kernels only compare and move the float32 logits (NaN read as
-inf, -0 as +0, which compare equal). The float64 total mass is summed in another order (per block of 1,024, rescaled
by exp((block max - max) / T)): each term carries a few float64 roundings, so the relative difference from NumPy's
sum is a few 1e-16; the bound is 1e-12. Sampling from the candidates then uses the very float32 values and the same
NumPy code as sampling from the row, so the drawn ids must be equal (a top_p decision could flip only if a cumulative
share lay within ~1e-15 of top_p: not in these draws).
"""
from __future__ import annotations

import numpy as np
import pytest

from gpu_util import GPU_MARKS

pytestmark = GPU_MARKS


@pytest.fixture(autouse=True)
def _path_on(monkeypatch):
    """Switch GPU_SAMPLING on: the in-graph candidates these tests check (off by default until verified on a GPU)."""
    monkeypatch.setenv("DS4CUPY_GPU_SAMPLING", "1")


TOTAL_RTOL = 1e-12
PARAMS = {                         # the parameter sets
    "greedy": dict(temperature=0.0),
    "T0.7-k40": dict(temperature=0.7, top_k=40),
    "T1-p0.9-m0.05": dict(temperature=1.0, top_p=0.9, min_p=0.05),
    "T1.3-m0.01": dict(temperature=1.3, min_p=0.01),
}


def _awkward(rng, n, scale):
    """Float32 logits with exact ties (rounded to 1/16), NaN, -inf and -0.0."""
    x = (np.round(rng.standard_normal(n) * scale * 16) / 16).astype(np.float32)
    pick = rng.choice(n, size=min(n, 60), replace=False)
    x[pick[:15]] = np.nan
    x[pick[15:30]] = -np.inf
    x[pick[30:45]] = np.float32(-0.0)
    return x


def _device_candidates(V):
    import cupy as cp
    from ds4cupy.engines.cuda.sample_ops import DeviceCandidates
    return DeviceCandidates(V, lambda shape, dtype: cp.empty(shape, dtype))


def _run(dc, d_logits, T, stream=None):
    import cupy as cp
    stream = stream or cp.cuda.get_current_stream()
    dc.set_temperature(T, stream)
    with stream:
        dc.launch(d_logits)
    dc.copy_to_host(stream)
    stream.synchronize()
    return dc.result()


def _check(top, x, T):
    from ds4cupy.text.candidates import top_candidates
    ref = top_candidates(x, T)
    np.testing.assert_array_equal(top.ids, ref.ids)
    np.testing.assert_array_equal(top.values, ref.values)
    assert top.temperature == T
    assert abs(top.total - ref.total) <= TOTAL_RTOL * ref.total, (top.total, ref.total)


@pytest.mark.parametrize("V", [129_280, 1000, 1024, 5 * 1024 + 3, 33 * 1024 + 7])
def test_kernel_matches_numpy(V, rng):
    """Argmax (ids[0], ties -> lowest id, NaN as -inf), max (values[0]), the sorted top 1,024 and the float64 mass on
    fresh random logits with ties, NaN, -inf and -0.0, at vocabulary sizes around and off the block size."""
    import cupy as cp
    dc = _device_candidates(V)
    for scale, T in ((1.0, 0.7), (4.0, 1.3), (0.05, 1.0)):
        x = _awkward(rng, V, scale)
        top = _run(dc, cp.asarray(x), T)
        _check(top, x, T)
        assert top.ids[0] == int(np.argmax(np.where(np.isnan(x), -np.inf, x)))
        again = _run(dc, cp.asarray(x), T)                     # deterministic, buffers reused
        np.testing.assert_array_equal(again.ids, top.ids)
        assert again.total == top.total
    if V < 1024:                                               # padding past the vocabulary
        assert (dc.h_result[:4096].view(np.int32)[V:] == -1).all()


def test_kernel_all_dead_row_and_single_finite(rng):
    import cupy as cp
    V = 3000
    dc = _device_candidates(V)
    x = np.full(V, np.nan, np.float32)
    x[::3] = -np.inf
    top = _run(dc, cp.asarray(x), 1.0)
    assert top.values[0] == -np.inf and top.total == 0.0 and top.ids[0] == 0
    np.testing.assert_array_equal(top.ids, np.arange(1024))   # all equal (-inf): ids ascending
    x[1234] = -5.0
    top = _run(dc, cp.asarray(x), 1.0)
    assert top.ids[0] == 1234 and top.values[0] == -5.0 and top.total == 1.0


def test_kernel_in_a_graph_reads_temperature_and_logits_at_replay(rng):
    """Captured once; new logits (same buffer) and a new temperature (device scalar) before each replay."""
    import cupy as cp
    V = 129_280
    dc = _device_candidates(V)
    d_logits = cp.empty(V, cp.float32)
    d_logits.set(_awkward(rng, V, 1.0))
    _run(dc, d_logits, 0.5)                                    # load the module before capture
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            dc.launch(d_logits)
        finally:
            graph = stream.end_capture()
    for scale, T in ((1.0, 0.9), (3.0, 1.7), (0.5, 0.9)):
        x = _awkward(rng, V, scale)
        d_logits.set(x, stream=stream)
        dc.set_temperature(T, stream)
        graph.launch(stream)
        dc.copy_to_host(stream)
        stream.synchronize()
        _check(dc.result(), x, T)


@pytest.mark.parametrize("name", list(PARAMS))
def test_kernel_candidates_sample_like_full_logits(name, rng):
    """1,000 draws on fresh 129,280-logit rows: Sampler.sample_top(device candidates) == Sampler.sample(row), same
    seed; the rows go from flat to peaked so that top_k 0 with min_p both decides from the set and falls back."""
    import cupy as cp
    from ds4cupy.text.sampling import Sampler, SamplingParams
    V = 129_280
    params = SamplingParams(seed=int(rng.integers(1 << 30)), **PARAMS[name])
    dc = _device_candidates(V)
    d_logits = cp.empty(V, cp.float32)
    a, b = Sampler(params), Sampler(params)
    fetched = 0
    for d in range(1000):
        scale = (0.5, 2.0, 6.0, 15.0)[d % 4]
        x = (rng.standard_normal(V) * scale).astype(np.float32)
        d_logits.set(x)
        top = _run(dc, d_logits, params.temperature)
        top = type(top)(top.ids, top.values, top.n_vocab, top.temperature, top.total, fetch_logits=lambda r=x: r)
        fetched += a.needs_logits(top)
        assert a.sample_top(top) == b.sample(x), f"draw {d}"
    print(f"{name}: {fetched} of 1000 draws needed the full row")
    if params.top_k == 0 and not params.greedy:
        assert 0 < fetched < 1000
    else:
        assert fetched == 0


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from ds4cupy.engines.cuda.session import CudaModel
    from ds4cupy.format.config import ModelConfig
    from ds4cupy.format.model_file import ModelFile
    from ds4cupy.tools.make_model import write_random_model
    cfg = ModelConfig.tiny(6151)                # vocab > 1,024, not a multiple of it: launch plan 7, 2, 1
    path = write_random_model(tmp_path_factory.mktemp("gpu-sampling") / "tiny.gguf", cfg, experts="q2", seed=5)
    with pytest.MonkeyPatch.context() as mp:    # module scope: set up before the autouse switch fixture
        mp.setenv("DS4CUPY_GPU_SAMPLING", "1")
        model = CudaModel.from_file(ModelFile(path), memory="device")
    assert model.gpu_sampling
    return model


@pytest.mark.parametrize("name", list(PARAMS))
def test_session_decode_top_samples_like_decode(model, name, rng):
    """A tiny model's CudaSession: 1,000 steps of decode_top + sample_top on one session and decode + sample on
    another, same seed: the same token every step (each feeds its own token back, so a difference would also change
    everything after it). Every 50 steps the candidates are checked against NumPy on the other session's row (the two
    sessions run the same kernels on the same inputs: identical rows), and logits() returns that row."""
    from ds4cupy.text.candidates import top_candidates
    from ds4cupy.text.sampling import Sampler, SamplingParams
    params = SamplingParams(seed=int(rng.integers(1 << 30)), **PARAMS[name])
    fast, full = model.new_session(1100), model.new_session(1100)
    prompt = rng.integers(0, model.config.n_vocab, 8)
    sa, sb = Sampler(params), Sampler(params)
    ta = sa.sample(fast.prefill(prompt))
    tb = sb.sample(full.prefill(prompt))
    assert ta == tb
    for step in range(1000):
        top = fast.decode_top(ta, params.temperature)
        row = full.decode(tb)
        ta, tb = sa.sample_top(top), sb.sample(row)
        assert ta == tb, f"step {step}: {ta} != {tb}"
        if step % 50 == 0:
            ref = top_candidates(row, params.temperature)
            np.testing.assert_array_equal(top.ids, ref.ids)
            np.testing.assert_array_equal(top.values, ref.values)
            if params.temperature > 0:
                assert abs(top.total - ref.total) <= TOTAL_RTOL * ref.total
            np.testing.assert_array_equal(top.logits(), row)
    assert fast._graph is not None and fast.tokens == full.tokens
    with pytest.raises(RuntimeError, match="are gone"):
        stale = top
        fast.decode_top(ta, params.temperature)
        stale.logits()


def test_session_decode_top_eager_equals_graph_and_timing(tmp_path, rng):
    """decode_graph=False (every step eager) gives the graph's candidates bit for bit; decode_timing reports the GPU
    time of a step (positive, below the wall time of the call)."""
    import time

    from ds4cupy.engines.cuda.session import CudaModel
    from ds4cupy.format.config import ModelConfig
    from ds4cupy.format.model_file import ModelFile
    from ds4cupy.tools.make_model import write_random_model
    path = write_random_model(tmp_path / "tiny.gguf", ModelConfig.tiny(2500), experts="q2", seed=8)
    mf = ModelFile(path)
    sessions = [CudaModel.from_file(mf, memory="device", decode_graph=g).new_session(256) for g in (False, True)]
    ids = rng.integers(0, 2500, 12)
    for s in sessions:
        s.prefill(ids)
        s.decode_timing = True
    for step, t in enumerate(rng.integers(0, 2500, 20)):
        T = (0.6, 1.0, 1.4)[step % 3]
        tops = []
        for s in sessions:
            c0 = time.perf_counter()
            tops.append(s.decode_top(int(t), T))
            wall = (time.perf_counter() - c0) * 1e3
            gpu = s.last_decode_gpu_ms
            assert 0 < gpu < wall, (gpu, wall)
        e, g = tops
        np.testing.assert_array_equal(g.ids, e.ids)
        np.testing.assert_array_equal(g.values, e.values)
        assert g.total == e.total and g.temperature == e.temperature == T
    assert sessions[1]._graph is not None and sessions[0]._graph is None
