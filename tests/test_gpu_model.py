"""Whole tiny models on the GPU (ds4cupy.engines.cuda.session) against the NumPy reference (ds4cupy.engines.reference).

ModelConfig.tiny (window 32, layers of ratio 0 / 4 (CSA + indexer, top-6) / 16 (HCA)) with q2 and q4 experts, QAT on
and off: a 600-token prefill (crosses the window, many compress windows, and the GPU's 256-token chunks), then 300
greedy decode steps.

Tolerances. The two backends differ only in float32 summation order (and the reference's float64 router logits),
so the issue's bound holds with a wide margin: max |logit difference| <= 1e-3 * max |logit| at every step, and the
same greedy token (measured on an H100: ~1e-6 relative with QAT off, at every layer's KV, compressed and indexer
rows too).

QAT on: FP8 (KV nope dims) and FP4 (indexer q/k) rounding turn a float32-ulp difference into a whole rounding step
whenever a value lies within rounding noise of a boundary; a few such flips happen in every run, and a flipped value
can then tip a discrete choice downstream (the indexer's top-k, the router's top-k experts). Measured on an H100
(tiny model): an FP4 flip that reorders the indexer's top-6 moves the logits by up to 0.16 of their range (2 of 4
random prompts); with the top-k covering every visible row the worst step of a run was 4e-4 in 4 prompts but 1.7e-3
in a fifth (FP8 flips, then probably a router near-tie). That is the discontinuity of rounding + top-k, not an
error, so the issue's bound cannot hold at every step of every random run. The QAT-on comparison therefore
- runs with index_topk >= the number of compressed rows (every QAT rounding and the indexer's score kernel still run;
  top-k selection itself is checked with QAT off, top-6 of up to 225 rows, and in test_gpu_ops);
- requires max |difference| <= 1e-2 * max |logit| for at least half of the 301 logit vectors, <= 0.25 at every step
  (a real bug gives O(1) differences everywhere: see the QAT-off numbers), and the same greedy token except where
  the reference's top-2 margin is below twice the step's max |difference| (both are then fed the reference's token).
  A flip in a KV row stays in the cache, so it shifts every later step a little: H200, commit ceec17e, q4, the
  per-pair MoE session: median 1.6e-3, 280 of 301 vectors above 1e-3 (the grouped-MoE session on the same prompt
  and the QAT-off runs were within 1e-3 at every step); hence 1e-2, above that drift and far below the O(1) of a
  wrong kernel.

Grouped prefill MoE (engines/cuda/moe_grouped.py, chunks of >= 32 tokens, the engine's default): float32-accurate
like the per-pair path (integer codes as mma operands, hi + lo fp16 activations, scales and mins in float32; the
kernels/moe_grouped.cu header). Each run compares two GPU sessions with the reference under the same bounds above:
"per_pair" (DS4CUPY_MOE_GROUPED=0) and "grouped". Measured by putting the grouped kernels' arithmetic into the
reference's prefill MoE (scripts/emulate_moe_grouped.py; tiny q2 / q4, QAT off, 600-token prefill + 40 greedy steps,
4 prompts each): max|diff| / max|logit| <= 5.4e-7 at every step, the same greedy tokens (the old fp16 operands: 4e-3
on prefills, up to 0.29 on single decode steps).
"""
from __future__ import annotations

import numpy as np
import pytest

from gpu_util import GPU_MARKS

pytestmark = GPU_MARKS

PROMPT, STEPS = 600, 300


@pytest.fixture(scope="module", params=["q2", "q4"])
def tiny_file(request, tmp_path_factory):
    from ds4cupy.format.config import ModelConfig
    from ds4cupy.tools.make_model import tokenizer_fields, write_random_model
    n_vocab, _ = tokenizer_fields(None)
    cfg = ModelConfig.tiny(n_vocab)
    path = tmp_path_factory.mktemp("gpu-model") / f"tiny-{request.param}.gguf"
    return write_random_model(path, cfg, experts=request.param, seed=11)


def _rel(gpu, ref):
    return float(np.max(np.abs(gpu - ref))) / float(np.max(np.abs(ref)))


def _same_greedy(gpu, ref, rel, strict):
    g, r = int(np.argmax(gpu)), int(np.argmax(ref))
    if g == r:
        return True
    if strict:
        return False
    top2 = np.sort(ref)[-2:]
    margin = float(top2[1] - top2[0])
    return margin < 2 * rel * float(np.max(np.abs(ref)))


@pytest.mark.parametrize("qat", [True, False])
def test_tiny_model_matches_reference(tiny_file, qat, rng, monkeypatch):
    from ds4cupy.engines.cuda.session import CudaModel
    from ds4cupy.format.model_file import ModelFile
    from ds4cupy.engines.reference import ReferenceModel

    mf = ModelFile(tiny_file)
    if qat:
        mf.config.indexer_top_k = (PROMPT + STEPS) // 4 + 1      # see the module docstring
    ref = ReferenceModel(mf, qat=qat).new_session(4096)
    gpus = {}
    for moe, flag in (("per_pair", "0"), ("grouped", "1")):
        monkeypatch.setenv("DS4CUPY_MOE_GROUPED", flag)
        gpus[moe] = CudaModel.from_file(mf, qat=qat, memory="device", chunk=256).new_session(4096)
    assert all(gpus["grouped"]._moe_prefill.routed_ok) and not any(gpus["per_pair"]._moe_prefill.routed_ok)
    ids = rng.integers(0, mf.config.n_vocab, PROMPT)
    rels = {moe: [] for moe in gpus}
    lr = ref.prefill(ids)
    lg = {moe: s.prefill(ids) for moe, s in gpus.items()}
    for step in range(STEPS + 1):
        if step:
            lr = ref.decode(tok)
            lg = {moe: s.decode(tok) for moe, s in gpus.items()}
        for moe in gpus:
            rel = _rel(lg[moe], lr)
            rels[moe].append(rel)
            assert rel <= (0.25 if qat else 1e-3), f"{moe} step {step}: max|diff| = {rel:.2e} * max|logit|"
            assert _same_greedy(lg[moe], lr, rel, strict=not qat), \
                f"{moe}: greedy token differs at step {step} (rel {rel:.1e})"
        tok = int(np.argmax(lr))
    for moe, r in rels.items():
        r = np.array(r)
        print(f"qat={qat} {moe}: max|diff|/max|logit| median {np.median(r):.1e}, max {r.max():.1e} over {r.size} "
              f"logit vectors, {(r > 1e-3).sum()} above 1e-3")
        assert (r <= (1e-2 if qat else 1e-3)).mean() >= (0.5 if qat else 1.0), f"{moe}"
        assert gpus[moe].n_tokens == ref.n_tokens == PROMPT + STEPS
        assert gpus[moe].tokens == ref.tokens


def test_session_contract(tiny_file, rng):
    """Chunked prefill == one prefill; prefill(a)+prefill(b) == prefill(a+b); snapshot/restore; reset;
    all_logits rows equal the per-token logits."""
    from ds4cupy.engines.cuda.session import CudaModel
    from ds4cupy.format.model_file import ModelFile

    mf = ModelFile(tiny_file)
    ids = rng.integers(0, mf.config.n_vocab, 300)
    # QAT off: chunk boundaries change float32 summation order, which QAT rounding could amplify (module docstring)
    whole = CudaModel.from_file(mf, qat=False, memory="device").new_session(1024)
    chunked = CudaModel.from_file(mf, qat=False, memory="device", chunk=64).new_session(1024)
    a = whole.prefill(ids)
    b = chunked.prefill(ids)
    # same math, different chunk boundaries: only summation-order and kernel-choice (matvec vs matmul) differences
    np.testing.assert_allclose(b, a, atol=1e-4 * np.abs(a).max())
    whole.reset()
    whole.prefill(ids[:123])
    c = whole.prefill(ids[123:])
    np.testing.assert_allclose(c, a, atol=1e-4 * np.abs(a).max())
    snap = whole.snapshot()
    d1 = [whole.decode(int(t)) for t in ids[:20]]
    whole.restore(snap)
    assert whole.n_tokens == 300
    d2 = [whole.decode(int(t)) for t in ids[:20]]
    for x, y in zip(d1, d2):
        np.testing.assert_array_equal(x, y)          # same kernels, same inputs: deterministic
    whole.reset()
    assert whole.n_tokens == 0 and whole.tokens == []
    al = whole.prefill(ids[:40], all_logits=True)
    assert al.shape == (40, mf.config.n_vocab)
    whole.reset()
    one = whole.prefill(ids[:40])
    np.testing.assert_allclose(al[-1], one, atol=1e-4 * np.abs(one).max())


def test_decode_graph_replay_equals_eager(tiny_file, rng):
    """The captured decode step (CUDA graph) gives bit-identical logits to eager launches, across snapshot/restore
    and reset (graph capture also proves a decode step allocates nothing and never syncs with the host)."""
    from ds4cupy.engines.cuda.session import CudaModel
    from ds4cupy.format.model_file import ModelFile

    mf = ModelFile(tiny_file)
    ids = rng.integers(0, mf.config.n_vocab, 70)
    steps = rng.integers(0, mf.config.n_vocab, 40)
    eager = CudaModel.from_file(mf, memory="device", decode_graph=False).new_session(512)
    graph = CudaModel.from_file(mf, memory="device", decode_graph=True).new_session(512)
    for s in (eager, graph):
        s.prefill(ids)
    snap = graph.snapshot()
    e = [eager.decode(int(t)) for t in steps]
    g = [graph.decode(int(t)) for t in steps]
    assert graph._graph is not None
    for a, b in zip(e, g):
        np.testing.assert_array_equal(b, a)
    graph.restore(snap)
    g2 = [graph.decode(int(t)) for t in steps[:10]]
    for a, b in zip(e, g2):
        np.testing.assert_array_equal(b, a)
    graph.reset()
    eager.reset()
    np.testing.assert_array_equal(graph.prefill(ids[:5]), eager.prefill(ids[:5]))
    np.testing.assert_array_equal(graph.decode(int(steps[0])), eager.decode(int(steps[0])))


def _on_and_off(tiny_file, switch: str, qat: bool, monkeypatch):
    """Two sessions of the tiny model, switch DS4CUPY_<switch> = 1 and = 0 (engines/cuda/switches.py), chunks of 64."""
    from ds4cupy.engines.cuda.session import CudaModel
    from ds4cupy.format.model_file import ModelFile
    sessions = []
    for value in ("1", "0"):
        monkeypatch.setenv(f"DS4CUPY_{switch}", value)
        sessions.append(CudaModel.from_file(ModelFile(tiny_file), qat=qat, memory="device", chunk=64).new_session(512))
    return sessions


def _lockstep(a, b, ids, steps: int, check) -> None:
    """Prefill both sessions with ids (chunked), then `steps` graph-replayed greedy decode steps, both fed b's token;
    check(logits of a, logits of b) after the prefill and after every step."""
    la, lb = a.prefill(ids), b.prefill(ids)
    for _ in range(steps):
        check(la, lb)
        tok = int(np.argmax(lb))
        la, lb = a.decode(tok), b.decode(tok)
    check(la, lb)


def _lockstep_within(on, off, ids, steps: int, bound: float) -> list[float]:
    """_lockstep with every logit vector of `on` within `bound` of `off`'s range and the same greedy token (up to a
    top-2 margin inside the difference); returns the per-step relative differences."""
    rels = []

    def check(a, b):
        r = _rel(a, b)
        rels.append(r)
        assert r <= bound, f"step {len(rels) - 1}: max|diff| = {r:.2e} * max|logit|"
        assert _same_greedy(a, b, r, strict=False), f"greedy token differs at step {len(rels) - 1} (rel {r:.1e})"
    _lockstep(on, off, ids, steps, check)
    return rels


def test_fused_hc_step_equals_three_launches(tiny_file, rng, monkeypatch):
    """hc_step (one launch per hyper-connection step, the default) against DS4CUPY_HC_FUSED=0 (hc_post, hc_mix,
    hc_split_collapse) through a whole model, QAT off: a 300-token prefill (chunks of 64) and 30 graph-replayed decode
    steps. They differ only in float32 summation order (the mix's split sums), so the logits agree to 1e-4 of their
    range (a wrong post, counter or collapse gives O(1)) with the same greedy tokens."""
    fused, three = _on_and_off(tiny_file, "HC_FUSED", False, monkeypatch)
    assert fused.model.hc_fused and not three.model.hc_fused

    def check(a, b):
        assert _rel(a, b) <= 1e-4
        assert _same_greedy(a, b, 1e-4, strict=False)
    _lockstep(fused, three, rng.integers(0, fused.model.config.n_vocab, 300), 30, check)


@pytest.mark.parametrize("qat", [True, False])
def test_side_branches_equal_one_stream(tiny_file, qat, rng, monkeypatch):
    """The side-stream branches (compressors and indexer beside the query path, the shared expert beside the routed
    ones) against DS4CUPY_BRANCHES=0 (one stream, program order): the same kernels on the same inputs, so the logits
    are bit-identical through a chunked prefill (eager, concurrent streams) and graph-replayed decode steps (parallel
    graph branches); a missing dependency between the branches shows up as a difference."""
    two, one = _on_and_off(tiny_file, "BRANCHES", qat, monkeypatch)
    assert two.model.branches and not one.model.branches
    _lockstep(two, one, rng.integers(0, two.model.config.n_vocab, 300), 30, np.testing.assert_array_equal)


def test_decode_graph_captured_shallow_serves_deep(tiny_file, rng):
    """No launch parameter of the decode graph depends on the position at capture (issue 18): a graph captured at
    depth ~12 and replayed past depth 4,096 gives the eager step's logits bit for bit, and both match the reference
    there (QAT off: 1e-3 of the largest logit and the same greedy token, as in test_gpu_matches_reference). At that
    depth the CSA layers' indexer picks 6 of ~1,070 compressed rows and the HCA layers attend to ~270 rows, so a grid
    sized at capture (one block, 16 fixed splits) would have to loop far past its capture-time share."""
    from ds4cupy.engines.cuda.session import CudaModel
    from ds4cupy.engines.reference import ReferenceModel
    from ds4cupy.format.model_file import ModelFile

    mf = ModelFile(tiny_file)
    ids = [int(t) for t in rng.integers(0, mf.config.n_vocab, 4310)]
    ctx = 4608
    sessions = {"graph": CudaModel.from_file(mf, qat=False, memory="device", decode_graph=True).new_session(ctx),
                "eager": CudaModel.from_file(mf, qat=False, memory="device", decode_graph=False).new_session(ctx)}
    deep = {}
    for name, s in sessions.items():
        s.prefill(ids[:10])
        for t in ids[10:13]:
            s.decode(t)
        s.prefill(ids[13:4290])
        deep[name] = [s.decode(t) for t in ids[4290:4310]]
    assert sessions["graph"]._graph is not None
    for a, b in zip(deep["eager"], deep["graph"]):
        np.testing.assert_array_equal(b, a)
    ref = ReferenceModel(mf, qat=False).new_session(ctx)
    ref.prefill(ids[:4309])
    lr = ref.decode(ids[4309])
    rel = _rel(deep["graph"][-1], lr)
    assert rel <= 1e-3, f"max|diff| = {rel:.2e} * max|logit| at depth 4,309"
    assert int(np.argmax(deep["graph"][-1])) == int(np.argmax(lr))
