"""Paths of the NumPy reference that transformers parity cannot reach (it has no QAT and breaks score ties its own
way): the indexer's tie rule and where the QAT rounding goes.

- Indexer ties (model.md §2.6): among compressed rows with equal scores the lowest index wins. The test forces ties by
  giving the indexer identical key rows: identical inputs give bit-identical scores, so whatever the scores are, the
  rows selected from each group of identical rows must be that group's lowest-indexed ones.
- QAT placement (model.md §2.7): KV rows are FP8-rounded (`fp8_sim`, blocks of 64) on their nope dims only, the rope
  dims keep their exact float32 bits; indexer keys and queries become `fp4_sim(hadamard(.))` (blocks of 32). The test
  compares a QAT-on and a QAT-off session on a 2-layer model whose first layer is a ratio-4 (CSA + indexer) layer:
  the first layer's inputs do not depend on QAT, so the stored rows with QAT on must equal the QAT-off rows rounded
  exactly as stated. Equality is exact (bit for bit): the same float32 values go through the same functions.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import ds4cupy
from ds4cupy.engines.numerics import fp4_sim, fp8_sim, hadamard
from ds4cupy.format.config import ModelConfig
from ds4cupy.tools.make_model import tokenizer_fields, write_random_model


# ---- indexer ties ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qat", [True, False])
@pytest.mark.parametrize("n_groups", [1, 3, 4])
def test_indexer_ties_go_to_the_lowest_index(tiny_model_path, rng, qat, n_groups):
    model = ds4cupy.load(tiny_model_path, backend="reference", qat=qat)
    impl, c = model._impl, model.config
    il = c.compress_ratios.index(4)                          # the first CSA layer (it has the indexer)
    k, n_comp = c.indexer_top_k, 20
    assert n_comp > k + n_groups
    protos = rng.standard_normal((n_groups, c.indexer_head_dim)).astype(np.float32)
    group = rng.permutation(np.arange(n_comp) % n_groups)    # every group has >= 5 identical rows, in random places
    picked_groups = set()
    for trial in range(4):
        st = impl.new_layer_state(il)
        st.index_kv = protos[group].copy()
        p = 4 * n_comp + 1                                  # all n_comp rows visible; (p + 1) % 4 != 0: no new row
        x = rng.standard_normal((1, c.n_embd)).astype(np.float32)
        qr = rng.standard_normal((1, c.q_lora_rank)).astype(np.float32)
        visible = np.ones((1, n_comp), dtype=bool)
        sel = impl.indexer_select(x, qr, np.array([p]), st, il, visible)[0]
        assert st.index_kv.shape[0] == n_comp and sel.sum() == k
        for g in range(n_groups):
            members = np.flatnonzero(group == g)
            chosen = np.flatnonzero(sel & (group == g))
            np.testing.assert_array_equal(chosen, members[: chosen.size],
                                          err_msg=f"group {g} (rows {members.tolist()}): tie broken upward")
            if 0 < chosen.size < members.size:
                picked_groups.add(g)
    # the check bit: at least one group was cut inside (some but not all of its tied rows fit in the top k)
    assert picked_groups, "no tie was decided by the tie rule"


# ---- QAT placement --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def csa_first_model(tmp_path_factory, module_seed):
    """The tiny dimensions with two layers: ratio 4 (window + compressed rows + indexer) first, then ratio 16."""
    n_vocab, _ = tokenizer_fields(None)
    cfg = dataclasses.replace(ModelConfig.tiny(n_vocab), name="csa-first", n_layer=2, compress_ratios=[4, 16, 0],
                              swiglu_clamp=[10.0, 10.0], n_hash_layer=1)
    path = tmp_path_factory.mktemp("models") / "csa-first.gguf"
    return write_random_model(path, cfg, experts="q2", seed=module_seed)


def _spy_qat_index(impl) -> list:
    """Record (input, output) of every indexer QAT call (keys: one row [di]; queries: [S, heads, di])."""
    calls, inner = [], impl._qat_index

    def spy(v):
        out = inner(v)
        calls.append((np.array(v), np.array(out)))
        return out

    impl._qat_index = spy
    return calls


def test_qat_rounds_nope_dims_to_fp8_and_indexer_rows_to_fp4(csa_first_model, rng):
    runs = {}
    for qat in (True, False):
        model = ds4cupy.load(csa_first_model, backend="reference", qat=qat)
        calls = _spy_qat_index(model._impl)
        s = model.new_session(128)
        ids = rng.integers(0, model.config.n_vocab, 43) if qat else runs[True][0]
        s.prefill(ids)
        runs[qat] = (ids, s.states[0], calls, model.config)
    _, on, on_calls, c = runs[True]
    _, off, off_calls, _ = runs[False]
    nope = c.nope_dim
    assert 0 < nope < c.head_dim and nope % 64 == 0

    # KV rows: the sliding window's raw rows and the compressed rows
    for what in ("window_kv", "comp_kv"):
        a, b = getattr(on, what), getattr(off, what)
        assert a.shape == b.shape and a.shape[0] >= 8, what
        np.testing.assert_array_equal(a[:, :nope], fp8_sim(b[:, :nope], 64), err_msg=f"{what}: nope dims")
        np.testing.assert_array_equal(a[:, nope:], b[:, nope:], err_msg=f"{what}: rope dims must keep their bits")
        # non-vacuous: the rounding changed the nope dims, and the rope dims are not FP8 values already
        assert (a[:, :nope] != b[:, :nope]).mean() > 0.5, what
        assert (fp8_sim(b[:, nope:], c.head_dim - nope) != b[:, nope:]).mean() > 0.5, what

    # indexer keys (the stored compressed rows)
    assert on.index_kv.shape == off.index_kv.shape and on.index_kv.shape[0] >= 8
    np.testing.assert_array_equal(on.index_kv, fp4_sim(hadamard(off.index_kv), 32))
    assert (on.index_kv != hadamard(off.index_kv)).mean() > 0.5

    # indexer queries: one QAT call on the [S, heads, di] queries per chunk, with the same input as without QAT
    q_on = [(i, o) for i, o in on_calls if i.ndim == 3]
    q_off = [(i, o) for i, o in off_calls if i.ndim == 3]
    assert len(q_on) == len(q_off) == 1
    (qi_on, qo_on), (qi_off, qo_off) = q_on[0], q_off[0]
    assert qi_on.shape == (43, c.indexer_n_head, c.indexer_head_dim)
    np.testing.assert_array_equal(qi_on, qi_off)
    np.testing.assert_array_equal(qo_on, fp4_sim(hadamard(qi_on), 32))
    np.testing.assert_array_equal(qo_off, qi_off)                              # QAT off: untouched
    # and the key rows went through the same call, one row at a time
    k_on = [o for i, o in on_calls if i.ndim == 1]
    np.testing.assert_array_equal(np.stack(k_on), on.index_kv)
