"""make-model, write_gguf and the demo model: files in the exact ds4 layout, deterministic, numerically sane."""
from __future__ import annotations

import os

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from ds4cupy import cli
from ds4cupy.format.config import ModelConfig
from ds4cupy.format.gguf_write import GGUFWriteError, write_gguf
from ds4cupy.format.layout import ds4_type, model_specs
from ds4cupy.tools.make_model import random_model_tensors, tokenizer_fields, weight_std, write_random_model

EXPERTS = ["q2", "q4", "q8_0", "f16"]
_KIND_VTYPE = {"u32": V.UINT32, "u64": V.UINT64, "f32": V.FLOAT32, "bool": V.BOOL, "u32s": V.UINT32, "f32s": V.FLOAT32}


def tiny_cfg() -> ModelConfig:
    n_vocab, _ = tokenizer_fields(None)
    return ModelConfig.tiny(n_vocab)


def expected_specs(cfg):
    """The specs a generated file holds, in order: all of model_specs except the router bias of hash layers."""
    return [s for s in model_specs(cfg)
            if not (s.name.endswith("exp_probs_b.bias") and cfg.is_hash_layer(int(s.name.split(".")[1])))]


def same_config(a: ModelConfig, b: ModelConfig) -> bool:
    """Equal up to float32 storage of the float values (GGUF metadata floats are f32)."""
    da, db = a.as_dict(), b.as_dict()
    da.pop("name"), db.pop("name")
    f32 = {k: (np.float32(v).tolist() if isinstance(v, float) else v) for k, v in da.items()}
    return f32 == {k: (np.float32(v).tolist() if isinstance(v, float) else v) for k, v in db.items()}


def numpy_shape(t) -> tuple[int, ...]:
    """GGUFReader gives ne order (innermost first); layout specs are NumPy order."""
    return tuple(int(x) for x in reversed(t.shape.tolist()))


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory, module_seed):
    d = tmp_path_factory.mktemp("tiny")
    cfg = tiny_cfg()
    seed = module_seed
    files = {e: write_random_model(d / f"tiny-{e}.gguf", cfg, experts=e, seed=seed) for e in EXPERTS}
    return cfg, seed, files


@pytest.mark.parametrize("experts", EXPERTS)
def test_layout_types_shapes_and_metadata(tiny_files, experts):
    cfg, seed, files = tiny_files
    r = gguf.GGUFReader(files[experts])
    specs = expected_specs(cfg)
    assert [t.name for t in r.tensors] == [s.name for s in specs]
    for t, s in zip(r.tensors, specs):
        assert numpy_shape(t) == s.shape, t.name
        assert t.tensor_type == ds4_type(s, experts), t.name
        assert t.tensor_type in s.allowed, t.name
        assert t.data_offset % 32 == 0, t.name
    for key, (kind, value) in cfg.metadata().items():
        f = r.fields[key]
        assert f.types[-1] == _KIND_VTYPE[kind], key
        got = f.contents()
        if kind in ("f32", "f32s"):
            np.testing.assert_array_equal(np.float32(got), np.float32(value), err_msg=key)
        else:
            assert got == value, key
    assert same_config(ModelConfig.from_metadata({k: f.contents() for k, f in r.fields.items()
                                                  if not k.startswith("GGUF.")}), cfg)
    assert r.fields["general.architecture"].contents() == "deepseek4"
    assert r.fields["general.quantization_version"].contents() == 2
    assert "random weights" in r.fields["general.name"].contents()
    assert len(r.fields["tokenizer.ggml.tokens"].contents()) == cfg.n_vocab


@pytest.mark.parametrize("experts", EXPERTS)
def test_weights_decode_to_sane_values(tiny_files, experts):
    cfg, seed, files = tiny_files
    r = gguf.GGUFReader(files[experts])
    specs = {s.name: s for s in model_specs(cfg)}
    for t in r.tensors:
        s = specs[t.name]
        if s.kind == "index":
            ids = np.asarray(t.data)
            assert ids.shape == (cfg.n_vocab, cfg.n_expert_used)
            assert ids.min() >= 0 and ids.max() < cfg.n_expert
            assert all(len(set(row)) == cfg.n_expert_used for row in ids.tolist()), "tid2eid rows must be distinct"
            assert len(np.unique(ids[:, 0])) == cfg.n_expert, "every expert should be picked somewhere"
            continue
        x = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(s.shape)
        assert np.isfinite(x).all(), t.name
        if s.kind == "vector":
            if "norm" in t.name:
                assert abs(x.mean() - 1) < 0.1 and x.std() < 0.3, t.name
            assert np.abs(x).max() < 6, t.name
        else:
            want = weight_std(s, cfg)
            assert abs(x.std() / want - 1) < 0.25, (t.name, x.std(), want)
            assert abs(x.mean()) < 0.2 * want + 0.02, t.name


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, tiny_files):
    cfg, seed, files = tiny_files
    again = write_random_model(tmp_path / "again.gguf", cfg, experts="q2", seed=seed)
    assert again.read_bytes() == files["q2"].read_bytes()
    other = write_random_model(tmp_path / "other.gguf", cfg, experts="q2", seed=seed + 1)
    a, b = gguf.GGUFReader(files["q2"]), gguf.GGUFReader(other)
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.name == tb.name
        assert not np.array_equal(np.asarray(ta.data), np.asarray(tb.data)), ta.name


def test_cli_make_model_tiny(tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    assert cli.main(["make-model", "--preset", "tiny", "--experts", "q4", "--seed", "7", "--out", str(out)]) == 0
    assert "random weights" in capsys.readouterr().out
    ref = write_random_model(tmp_path / "api.gguf", tiny_cfg(), experts="q4", seed=7)
    r1, r2 = gguf.GGUFReader(out), gguf.GGUFReader(ref)
    assert [t.name for t in r1.tensors] == [t.name for t in r2.tensors]
    for t1, t2 in zip(r1.tensors, r2.tensors):
        assert np.array_equal(np.asarray(t1.data), np.asarray(t2.data)), t1.name


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    assert cli.main(["make-model", "--preset", "tiny", "--layers", "3", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "--layers" in capsys.readouterr().err
    assert cli.main(["make-model", "--preset", "flash", "--layers", "0", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "found 0" in capsys.readouterr().err
    assert cli.main(["make-model", "--tokenizer", str(tmp_path / "missing.json"),
                     "--out", str(tmp_path / "x.gguf")]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_model_file_opens_generated_model(tiny_files):
    from ds4cupy.format import model_file
    cfg, _, files = tiny_files
    mf = model_file.ModelFile(files["q2"])
    assert same_config(mf.config, cfg)
    x = mf.dequantize("blk.1.ffn_down_exps.weight")
    assert x.shape == (cfg.n_expert, cfg.n_embd, cfg.n_ff_exp) and np.isfinite(x).all()


def test_flash_one_layer_plan():
    """The full flash file is ~3.6 GB; check its tensor plan and the cheap tensors without writing it."""
    cfg = ModelConfig.flash(1)
    plan = random_model_tensors(cfg, "q2", seed=3)
    specs = expected_specs(cfg)
    assert [(n, t, s) for n, _, t, s in plan] == [(sp.name, ds4_type(sp, "q2"), sp.shape) for sp in specs]
    types = {n: t for n, _, t, _ in plan}
    assert types["blk.0.ffn_gate_exps.weight"] == T.IQ2_XXS and types["blk.0.ffn_down_exps.weight"] == T.Q2_K
    assert types["token_embd.weight"] == T.F16 and types["output.weight"] == T.Q8_0
    total = sum(gguf.quants.quant_shape_to_byte_shape(s, t)[-1] * int(np.prod(s[:-1])) for _, _, t, s in plan)
    assert 3.0e9 < total < 4.0e9
    make = {n: m for n, m, _, _ in plan}
    ids = make["blk.0.ffn_gate_tid2eid.weight"]()
    assert ids.shape == (129280, 6) and ids.dtype == np.int32
    srt = np.sort(ids, axis=1)
    assert (np.diff(srt, axis=1) > 0).all() and ids.min() >= 0 and ids.max() < 256
    hc = make["blk.0.hc_attn_fn.weight"]()
    assert hc.dtype == np.float16 and hc.shape == (24, 16384)
    assert np.array_equal(hc, random_model_tensors(cfg, "q2", seed=3)[1][1]()), "not deterministic"


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DS4CUPY_SLOW_TESTS"), reason="writes a 3.6 GB file; set DS4CUPY_SLOW_TESTS=1")
def test_flash_one_layer_file(tmp_path):
    out = tmp_path / "flash1.gguf"
    assert cli.main(["make-model", "--preset", "flash", "--layers", "1", "--out", str(out)]) == 0
    r = gguf.GGUFReader(out)
    specs = expected_specs(ModelConfig.flash(1))
    assert [(t.name, numpy_shape(t)) for t in r.tensors] == [(s.name, s.shape) for s in specs]


def test_write_gguf_roundtrip_and_errors(tmp_path, rng):
    a = rng.standard_normal((1, 64), dtype=np.float32)  # fewer bytes than q: file_type follows q
    q = gguf.quants.quantize(rng.standard_normal((5, 64)).astype(np.float32), T.Q8_0)
    meta = {"x.u32": ("u32", 7), "x.i32s": ("i32s", [-1, 2]), "x.f32s": ("f32s", [0.5]), "x.strs": ("strs", ["a"]),
            "x.u64": ("u64", 2**40), "x.bool": ("bool", False), "x.str": ("str", "é")}
    p = write_gguf(tmp_path / "t.gguf", meta, [("a", a, T.F32, (1, 64)), ("q", lambda: q, T.Q8_0, (5, 64))],
                   name="test")
    r = gguf.GGUFReader(p)
    for k, (kind, v) in meta.items():
        assert r.fields[k].contents() == v, k
    assert r.fields["general.name"].contents() == "test"
    assert r.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert np.array_equal(r.tensors[0].data, a) and np.array_equal(r.tensors[1].data, q)
    with pytest.raises(GGUFWriteError, match="'q'.*needs 340 bytes"):
        write_gguf(tmp_path / "bad.gguf", {}, [("q", q[:4], T.Q8_0, (5, 64))], name="bad")
    with pytest.raises(GGUFWriteError, match="'w'.*multiple of 32"):
        write_gguf(tmp_path / "bad.gguf", {}, [("w", q, T.Q8_0, (5, 48))], name="bad")
    with pytest.raises(GGUFWriteError, match="x.k.*kind 'u16'"):
        write_gguf(tmp_path / "bad.gguf", {"x.k": ("u16", 1)}, [], name="bad")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["t.gguf"], "failed writes must leave nothing behind"


def test_demo_model_cached_and_labelled(tmp_path, monkeypatch):
    from ds4cupy.tools import demo

    monkeypatch.setenv("DS4CUPY_CACHE", str(tmp_path / "cache"))
    p = demo.demo_model_path()
    assert p.parent == tmp_path / "cache" and "random-weights" in p.name
    mtime = p.stat().st_mtime_ns
    assert demo.demo_model_path() == p and p.stat().st_mtime_ns == mtime, "must be reused, not rewritten"
    r = gguf.GGUFReader(p)
    assert "RANDOM WEIGHTS" in r.fields["general.name"].contents()
    assert [f.name for f in p.parent.iterdir()] == [p.name]
