"""convert: a random transformers DeepseekV4ForCausalLM, saved to disk, becomes a ds4-layout GGUF holding exactly its
parameters (names, orientation, types), whichever way the checkpoint spells the tensor names."""
from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import torch  # test extra: a missing torch or transformers is an error, not a skip
import transformers
from transformers import DeepseekV4ForCausalLM  # noqa: F401  (transformers >= 5.8.1, as the test extra pins)

from ds4cupy import cli
from ds4cupy.tools.convert import ConvertError, convert, hf_config_to_model_config
from ds4cupy.format.layout import model_specs

VOCAB = 896  # larger than the demo tokenizer (832 ids): the token list gets padded


def hf_config(**over):
    kw = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, head_dim=80,
              qk_rope_head_dim=16, q_lora_rank=32, o_groups=2, o_lora_rank=32, moe_intermediate_size=48,
              n_routed_experts=8, num_experts_per_tok=2, num_hash_layers=2, sliding_window=8,
              layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                           "compressed_sparse_attention"],
              compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
              index_n_heads=4, index_head_dim=32, index_topk=3,
              rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 32, "beta_fast": 32,
                            "beta_slow": 1},
              max_position_embeddings=512)
    kw.update(over)
    return transformers.DeepseekV4Config(**kw)


def random_model(seed: int, **over):
    """A tiny model with EVERY parameter and buffer random (transformers' init leaves sinks, HC base, position
    biases, router bias at 0 and tid2eid all zeros)."""
    m = transformers.DeepseekV4ForCausalLM(hf_config(**over)).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in m.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.ndim >= 2 else 0.5) + 0.1)
        for n, b in m.named_buffers():
            if n.endswith("tid2eid"):
                n_exp = m.config.n_routed_experts
                b.copy_(torch.argsort(torch.rand(b.shape[0], n_exp, generator=g), dim=1)[:, :b.shape[1]])
            elif n.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g))
    return m


def expected_tensors(m) -> dict[str, np.ndarray]:
    """ds4 name -> the HF parameter's values, written from the module tree (independent of convert's name table)."""
    base = m.model
    out = {"token_embd.weight": base.embed_tokens.weight, "output.weight": m.lm_head.weight,
           "output_norm.weight": base.norm.weight, "output_hc_fn.weight": base.hc_head.hc_fn,
           "output_hc_base.weight": base.hc_head.hc_base, "output_hc_scale.weight": base.hc_head.hc_scale}
    ff = m.config.moe_intermediate_size
    for il, L in enumerate(base.layers):
        a, mlp, p = L.self_attn, L.mlp, f"blk.{il}."
        t = {"hc_attn_fn": L.attn_hc.fn, "hc_attn_scale": L.attn_hc.scale, "hc_attn_base": L.attn_hc.base,
             "attn_norm": L.input_layernorm.weight, "attn_q_a": a.q_a_proj.weight, "attn_q_a_norm": a.q_a_norm.weight,
             "attn_q_b": a.q_b_proj.weight, "attn_kv": a.kv_proj.weight, "attn_kv_a_norm": a.kv_norm.weight,
             "attn_sinks": a.sinks, "attn_output_a": a.o_a_proj.weight, "attn_output_b": a.o_b_proj.weight,
             "hc_ffn_fn": L.ffn_hc.fn, "hc_ffn_scale": L.ffn_hc.scale, "hc_ffn_base": L.ffn_hc.base,
             "ffn_norm": L.post_attention_layernorm.weight, "ffn_gate_inp": mlp.gate.weight,
             "ffn_gate_exps": mlp.experts.gate_up_proj[:, :ff], "ffn_up_exps": mlp.experts.gate_up_proj[:, ff:],
             "ffn_down_exps": mlp.experts.down_proj, "ffn_gate_shexp": mlp.shared_experts.gate_proj.weight,
             "ffn_up_shexp": mlp.shared_experts.up_proj.weight, "ffn_down_shexp": mlp.shared_experts.down_proj.weight}
        c = a.compressor
        if c is not None:
            t.update(attn_compressor_ape=c.position_bias, attn_compressor_kv=c.kv_proj.weight,
                     attn_compressor_gate=c.gate_proj.weight, attn_compressor_norm=c.kv_norm.weight)
            if hasattr(c, "indexer"):
                ix = c.indexer
                t.update({"indexer.attn_q_b": ix.q_b_proj.weight, "indexer.proj": ix.scorer.weights_proj.weight,
                          "indexer_compressor_ape": ix.position_bias, "indexer_compressor_kv": ix.kv_proj.weight,
                          "indexer_compressor_gate": ix.gate_proj.weight, "indexer_compressor_norm": ix.kv_norm.weight})
        if hasattr(mlp.gate, "tid2eid"):
            t["ffn_gate_tid2eid"] = mlp.gate.tid2eid
        else:
            out[p + "exp_probs_b.bias"] = mlp.gate.e_score_correction_bias
        out.update({p + k + ".weight": v for k, v in t.items()})
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in out.items()}


def read_gguf(path):
    r = gguf.GGUFReader(path)
    return r, {t.name: t for t in r.tensors}


def values(t) -> np.ndarray:
    """A GGUF tensor as float32 NumPy-order values (I32 kept as integers)."""
    shape = tuple(int(x) for x in reversed(t.shape.tolist()))
    if t.tensor_type == T.I32:
        return np.asarray(t.data).reshape(shape)
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, module_seed):
    d = tmp_path_factory.mktemp("hf")
    m = random_model(module_seed)
    m.save_pretrained(d / "model")
    return m, d / "model", expected_tensors(m)


def test_f32_conversion_is_exact(saved, tmp_path, capsys):
    m, hf_dir, want = saved
    out = tmp_path / "m.gguf"
    assert cli.main(["convert", str(hf_dir), "--out", str(out), "--type", "f32"]) == 0
    r, got = read_gguf(out)
    cfg = hf_config_to_model_config(json.loads((hf_dir / "config.json").read_text()))
    specs = [s for s in model_specs(cfg) if s.name in want]
    assert [t.name for t in r.tensors] == [s.name for s in specs], "ds4 order"
    assert set(got) == set(want)
    for name, w in want.items():
        t = got[name]
        assert t.tensor_type == (T.I32 if name.endswith("tid2eid.weight") else T.F32), name
        v = values(t)
        assert v.shape == w.shape, name
        assert np.array_equal(v, w.astype(v.dtype)), name
    assert cfg.compress_ratios == [0, 4, 16, 4, 0] and cfg.n_hash_layer == 2
    assert r.fields["deepseek4.attention.compress_ratios"].contents() == [0, 4, 16, 4, 0]
    assert len(r.fields["tokenizer.ggml.tokens"].contents()) == VOCAB


def test_config_mapping(saved):
    m, hf_dir, _ = saved
    c = hf_config_to_model_config(json.loads((hf_dir / "config.json").read_text()))
    h = m.config
    assert (c.n_layer, c.n_embd, c.n_vocab, c.n_head, c.head_dim, c.n_rot) == (4, 64, VOCAB, 4, 80, 16)
    assert (c.q_lora_rank, c.o_lora_rank, c.o_groups, c.n_expert, c.n_expert_used, c.n_ff_exp) == (32, 32, 2, 8, 2, 48)
    assert (c.indexer_n_head, c.indexer_head_dim, c.indexer_top_k, c.sliding_window) == (4, 32, 3, 8)
    assert c.rope_freq_base == h.rope_parameters["main"]["rope_theta"] == 10000
    assert c.compress_rope_freq_base == h.rope_parameters["compress"]["rope_theta"] == 160000
    assert (c.rope_scaling_factor, c.rope_orig_ctx, c.yarn_beta_fast, c.yarn_beta_slow) == (16, 32, 32, 1)
    assert c.uses_yarn(1) and not c.uses_yarn(0)
    assert (c.expert_weights_scale, c.expert_weights_norm, c.swiglu_clamp) == (1.5, True, [10.0] * 4)
    assert (c.hc_mult, c.hc_sinkhorn_iters) == (4, 20)
    assert np.float32(c.hc_eps) == np.float32(h.hc_eps) and np.float32(c.rms_eps) == np.float32(h.rms_norm_eps)


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_other_types(saved, tmp_path, dtype):
    _, hf_dir, want = saved
    out = convert(hf_dir, tmp_path / f"{dtype}.gguf", dtype=dtype, experts="same")
    _, got = read_gguf(out)
    for name, w in want.items():
        t = got[name]
        if w.ndim == 1:
            assert t.tensor_type == T.F32 and np.array_equal(values(t), w), name
            continue
        if name.endswith("tid2eid.weight"):
            continue
        if dtype == "q8_0":
            hc_or_small = name.endswith(("hc_attn_fn.weight", "hc_ffn_fn.weight", "ape.weight", "compressor_kv.weight",
                                         "compressor_gate.weight", "indexer.attn_q_b.weight", "indexer.proj.weight",
                                         "ffn_gate_inp.weight", "token_embd.weight", "output_hc_fn.weight"))
            q8_rows = w.shape[-1] % 32 == 0  # rows that are not whole Q8_0 blocks fall back to F16
            assert t.tensor_type == (T.F16 if hc_or_small or not q8_rows else T.Q8_0), name
            tol = 0.01 if hc_or_small else 0.02
        else:
            assert t.tensor_type == {"f16": T.F16, "bf16": T.BF16}[dtype], name
            tol = {"f16": 1e-3, "bf16": 8e-3}[dtype]
        v = values(t)
        assert np.abs(v - w).max() <= tol * np.abs(w).max(), name


def test_experts_type_separate(saved, tmp_path):
    _, hf_dir, want = saved
    _, got = read_gguf(convert(hf_dir, tmp_path / "mix.gguf", dtype="f32", experts="f16"))
    assert got["blk.0.ffn_up_exps.weight"].tensor_type == T.F16
    assert got["blk.0.ffn_gate_shexp.weight"].tensor_type == T.F32
    np.testing.assert_allclose(values(got["blk.2.ffn_down_exps.weight"]), want["blk.2.ffn_down_exps.weight"],
                               rtol=1e-3, atol=1e-4)


def test_state_dict_names_and_bf16_source(saved, tmp_path):
    """A checkpoint with transformers' module names (fused gate_up_proj), stored in bf16, converts to the same
    tensors (exact bf16 values), proving both spellings map alike."""
    from safetensors.torch import save_file

    m, hf_dir, want = saved
    d = tmp_path / "sd"
    d.mkdir()
    shutil.copy(hf_dir / "config.json", d / "config.json")
    sd = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in m.state_dict().items()}
    save_file(sd, str(d / "model.safetensors"))
    _, got = read_gguf(convert(d, tmp_path / "sd.gguf", dtype="f32"))
    assert set(got) == set(want)
    for name, w in want.items():
        w_bf16 = torch.from_numpy(w).to(torch.bfloat16).float().numpy() if w.dtype == np.float32 else w
        assert np.array_equal(values(got[name]), w_bf16.astype(values(got[name]).dtype)), name


def _rewrite(src_dir, dst_dir, edit):
    """Copy a save_pretrained directory, passing its tensors dict through `edit`."""
    from safetensors.numpy import load_file, save_file

    dst_dir.mkdir()
    shutil.copy(src_dir / "config.json", dst_dir / "config.json")
    tensors = {}
    for f in sorted(src_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    save_file(edit(tensors), str(dst_dir / "model.safetensors"))
    return dst_dir


def test_leftover_and_missing_tensors_are_named(saved, tmp_path):
    _, hf_dir, _ = saved
    extra = _rewrite(hf_dir, tmp_path / "extra", lambda t: {**t, "model.layers.1.attn.mystery.weight":
                                                            np.zeros((2, 2), np.float32)})
    with pytest.raises(ConvertError, match=r"no ds4 counterpart: model\.layers\.1\.attn\.mystery\.weight"):
        convert(extra, tmp_path / "x.gguf")

    def drop(t):
        key = next(k for k in t if k.endswith("layers.3.attn.indexer.wq_b.weight"))
        return {k: v for k, v in t.items() if k != key}

    missing = _rewrite(hf_dir, tmp_path / "missing", drop)
    with pytest.raises(ConvertError, match=r"missing from the checkpoint: blk\.3\.indexer\.attn_q_b\.weight"):
        convert(missing, tmp_path / "x.gguf")

    def bad_ids(t):
        key = next(k for k in t if k.endswith("tid2eid"))
        t[key] = np.full_like(t[key], 8)
        return t

    with pytest.raises(ConvertError, match=r"tid2eid.*\[0, 8\)"):
        convert(_rewrite(hf_dir, tmp_path / "ids", bad_ids), tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_mtp_tensors_are_skipped(saved, tmp_path, capsys):
    _, hf_dir, want = saved
    d = _rewrite(hf_dir, tmp_path / "mtp", lambda t: {**t, "mtp.0.e_proj.weight": np.ones((64, 64), np.float32)})
    _, got = read_gguf(convert(d, tmp_path / "m.gguf"))
    assert set(got) == set(want)
    assert "skipped 1 mtp" in capsys.readouterr().err


def test_config_errors_are_clear(saved, tmp_path):
    _, hf_dir, _ = saved
    base = json.loads((hf_dir / "config.json").read_text())
    cases = [({"compress_rates": {"compressed_sparse_attention": 8, "heavily_compressed_attention": 16}},
              "compressed_sparse_attention is 8"),
             ({"scoring_func": "softmax"}, "scoring_func is 'softmax'"),
             ({"model_type": "llama"}, "model_type is 'llama'"),
             ({"mlp_layer_types": ["moe", "hash_moe", "moe", "moe"]}, "hash_moe layers first"),
             ({"head_dim": 72, "partial_rotary_factor": None, "rope_parameters": None}, "key_length.*multiple of 64"),
             ({"rope_parameters": {**base["rope_parameters"],
                                   "compress": {**base["rope_parameters"]["compress"], "attention_factor": 1.28}}},
              "attention_factor must be 1.0")]
    for change, msg in cases:
        with pytest.raises(ConvertError, match=msg):
            hf_config_to_model_config({**base, **change})
    assert cli.main(["convert", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.gguf")]) == 1


def test_legacy_config_keys():
    """DeepSeek's own config.json spelling (compress_ratios, num_hash_layers, rope_scaling) maps the same way."""
    hf = {"model_type": "deepseek_v4", "vocab_size": 129280, "hidden_size": 4096, "num_hidden_layers": 43,
          "num_attention_heads": 64, "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_groups": 8,
          "o_lora_rank": 1024, "moe_intermediate_size": 2048, "n_routed_experts": 256, "num_experts_per_tok": 6,
          "num_hash_layers": 3, "sliding_window": 128, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512,
          "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0], "rope_theta": 10000, "compress_rope_theta": 160000,
          "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32,
                           "beta_slow": 1}, "num_nextn_predict_layers": 1, "swiglu_limit": 10.0,
          "max_position_embeddings": 1048576}
    from ds4cupy.format.config import ModelConfig

    c = hf_config_to_model_config(hf, name="x")
    flash = ModelConfig.flash(43)
    for k in ("n_layer", "n_embd", "n_head", "head_dim", "n_rot", "n_expert", "n_hash_layer", "compress_ratios",
              "rope_scaling_factor", "rope_orig_ctx", "compress_rope_freq_base", "indexer_top_k", "swiglu_clamp"):
        assert getattr(c, k) == getattr(flash, k), k
