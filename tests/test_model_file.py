"""ModelFile: the tensor table of a generated tiny file, and every malformed-file case rejected with a message that
names what is wrong (never a traceback from inside NumPy or gguf)."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from ds4cupy.format import quants
from ds4cupy.format.config import ModelConfig
from ds4cupy.format.gguf_write import write_gguf
from ds4cupy.format.layout import model_specs
from ds4cupy.tools.make_model import random_model_tensors, tokenizer_fields
from ds4cupy.format.model_file import ModelFile, ModelFileError

N_VOCAB, TOK_META = tokenizer_fields(None)
CFG = ModelConfig.tiny(N_VOCAB)


def _write(path, tensors=None, meta_changes=None, drop_keys=()):
    meta = dict(CFG.metadata())
    meta.update(TOK_META)
    meta.update(meta_changes or {})
    for k in drop_keys:
        meta.pop(k)
    tensors = random_model_tensors(CFG, "q2", seed=9) if tensors is None else tensors
    return write_gguf(path, meta, tensors, name="malformed test")


def test_tensor_table_and_raw_views(tiny_model_path):
    mf = ModelFile(tiny_model_path)
    assert mf.config == ModelConfig.tiny(N_VOCAB)
    names = {s.name for s in model_specs(mf.config) if s.required}
    assert names <= set(mf.tensors)
    q = mf.info("blk.2.ffn_gate_exps.weight")
    assert q.qtype == T.IQ2_XXS and q.shape == (8, 256, 256)
    raw = mf.raw("blk.2.ffn_gate_exps.weight")
    assert raw.dtype == np.uint8 and raw.shape == (8, 256, 66)          # 256 values = one 66-byte block per row
    assert mf.raw("blk.0.attn_norm.weight").dtype == np.float32
    assert mf.raw("token_embd.weight").dtype == np.float16
    # dequantize (one expert) equals the block decoder on the same bytes
    e3 = mf.dequantize("blk.2.ffn_gate_exps.weight", index=3)
    np.testing.assert_array_equal(e3, quants.dequantize(raw[3], T.IQ2_XXS, (256, 256)))
    assert np.isfinite(e3).all() and e3.std() > 0


@pytest.mark.parametrize("case", ["missing", "dims", "type", "mixed_experts", "tid2eid_n_expert", "tid2eid_negative"])
def test_bad_tensors_are_named(tmp_path, case):
    tensors = random_model_tensors(CFG, "q2", seed=9)
    idx = {name: i for i, (name, *_rest) in enumerate(tensors)}
    target = {"missing": "blk.3.attn_kv.weight", "dims": "blk.1.attn_q_b.weight", "type": "blk.2.attn_norm.weight",
              "mixed_experts": "blk.4.ffn_up_exps.weight",
              "tid2eid_n_expert": "blk.1.ffn_gate_tid2eid.weight",
              "tid2eid_negative": "blk.0.ffn_gate_tid2eid.weight"}[case]
    i = idx[target]
    name, make, qtype, shape = tensors[i]
    rng = np.random.default_rng(0)
    if case == "missing":
        del tensors[i]
        expect = "is missing"
    elif case == "dims":
        shape = (shape[0] + 32, shape[1])
        tensors[i] = (name, quants.random_blocks(qtype, shape, rng, 0.05), qtype, shape)
        expect = "expected shape"
    elif case == "type":
        tensors[i] = (name, quants.random_blocks(T.Q8_0, shape, rng, 0.05), T.Q8_0, shape)
        expect = "expected type"
    elif case == "mixed_experts":
        tensors[i] = (name, quants.random_blocks(T.Q4_K, shape, rng, 0.05), T.Q4_K, shape)
        expect = "must share one type"
    else:                       # expert ids are 0..n_expert-1: one past the end, or -1
        bad = make().copy()
        value = CFG.n_expert if case == "tid2eid_n_expert" else -1
        bad[5, 1] = value
        tensors[i] = (name, bad, qtype, shape)
        expect = f"expert ids outside [0, {CFG.n_expert}) (found {bad.min()}..{bad.max()})"
        assert value in (bad.min(), bad.max())
    path = _write(tmp_path / f"{case}.gguf", tensors)
    with pytest.raises(ModelFileError) as e:
        ModelFile(path)
    assert target in str(e.value) and expect in str(e.value), str(e.value)


def test_truncated_file(tmp_path):
    path = _write(tmp_path / "full.gguf")
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelFileError) as e:
        ModelFile(cut)
    msg = str(e.value)
    assert "truncated" in msg and "output.weight" in msg, msg        # the last tensor is the one cut short
    one_short = tmp_path / "one_short.gguf"                            # a single missing byte is enough
    one_short.write_bytes(data[:-1])
    with pytest.raises(ModelFileError, match=f"'output.weight': data runs to byte {len(data)} but the file has "
                                             f"{len(data) - 1} bytes"):
        ModelFile(one_short)
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:300])
    with pytest.raises(ModelFileError, match="truncated|corrupt"):
        ModelFile(head)


def test_not_gguf_and_missing_file(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        ModelFile(junk)
    with pytest.raises(ModelFileError, match="no such model file"):
        ModelFile(tmp_path / "absent.gguf")


def test_unknown_block_type_names_the_tensor(tmp_path):
    path = _write(tmp_path / "ok.gguf")
    data = bytearray(path.read_bytes())
    # patch the type field of the tensor-info entry of blk.0.attn_norm.weight to an undefined type (77)
    key = b"blk.0.attn_norm.weight"
    at = data.index(len(key).to_bytes(8, "little") + key) + 8 + len(key)
    n_dims = int.from_bytes(data[at: at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    assert int.from_bytes(data[type_at: type_at + 4], "little") == T.F32
    data[type_at: type_at + 4] = (77).to_bytes(4, "little")
    bad = tmp_path / "unknown.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=r"blk\.0\.attn_norm\.weight.*unknown block type 77"):
        ModelFile(bad)


@pytest.mark.parametrize("change,expect", [
    ({"deepseek4.attention.head_count_kv": ("u32", 2)}, "head_count_kv: expected 1, found 2"),
    ({"deepseek4.attention.output_group_count": ("u32", 5)}, "output_group_count"),
    ({"deepseek4.attention.compress_ratios": ("u32s", [0, 4])}, "compress_ratios: expected block_count (5) to"),
    ({"deepseek4.rope.dimension_count": ("u32", 48)}, "multiple of 64"),
    ({"deepseek4.expert_used_count": ("u32", 99)}, "expert_used_count: expected <= expert_count (8), found 99"),
    ({"deepseek4.embedding_length": ("str", "wide")}, "embedding_length: expected an integer value, found 'wide'"),
    # the absurd values the issue found accepted
    ({"deepseek4.rope.freq_base": ("f32", -1.0)}, "rope.freq_base: expected a value in (1, 1e+10], found -1.0"),
    ({"deepseek4.hyper_connection.sinkhorn_iterations": ("u32", 130_000_000)},
     "sinkhorn_iterations: expected an integer in [1, 1000], found 130000000"),
    ({"deepseek4.context_length": ("u32", 1)}, "context_length: expected an integer in [64, 16777216], found 1"),
    ({"deepseek4.attention.sliding_window": ("u32", 1)}, "sliding_window: expected an integer in [4, 1048576]"),
    ({"deepseek4.attention.layer_norm_rms_epsilon": ("f32", float("nan"))}, "rms_epsilon: expected a finite number"),
    ({"deepseek4.expert_weights_scale": ("f32", float("inf"))}, "expert_weights_scale: expected a finite number"),
    ({"deepseek4.hyper_connection.epsilon": ("f32", 0.0)}, "hyper_connection.epsilon: expected a value in (0, 0.1]"),
    ({"deepseek4.swiglu_clamp_exp": ("f32s", [10.0, 10.0, -1.0, 10.0, 10.0])}, "swiglu_clamp_exp[2]: expected"),
    ({"deepseek4.attention.compress_ratios": ("u32s", [0, 4, 1, 4, 16, 0])}, "compress_ratios[2]: expected 0"),
    ({"deepseek4.block_count": ("f32", 5.0)}, "block_count: expected an integer value, found 5.0"),
    ({"tokenizer.ggml.bos_token_id": ("u32", 10**6)}, "bos_token_id': expected a token id in [0, 832)"),
])
def test_bad_metadata_names_key_expected_and_found(tmp_path, change, expect):
    path = _write(tmp_path / "meta.gguf", meta_changes=change)
    with pytest.raises(ModelFileError) as e:
        ModelFile(path)
    assert expect in str(e.value), str(e.value)


def test_missing_metadata_key(tmp_path):
    path = _write(tmp_path / "nokey.gguf", drop_keys=["deepseek4.attention.sliding_window"])
    with pytest.raises(ModelFileError, match="deepseek4.attention.sliding_window: .*key missing"):
        ModelFile(path)


def test_header_counts_are_checked_against_the_file_before_use(tmp_path):
    """A huge array count, a wrapping tensor offset and a misaligned one are refused by name, at once."""
    import struct
    path = _write(tmp_path / "ok.gguf")
    data = bytearray(path.read_bytes())
    key = b"tokenizer.ggml.merges"
    at = data.index(len(key).to_bytes(8, "little") + key) + 8 + len(key) + 4 + 4     # the array's element count
    for count, expect in ((2**60, "more than the 4194304 allowed"), (2**21, "needs 16777216 bytes")):
        huge = bytearray(data)
        huge[at:at + 8] = struct.pack("<Q", count)
        (tmp_path / "huge.gguf").write_bytes(huge)
        with pytest.raises(ModelFileError, match=rf"'tokenizer\.ggml\.merges'.*{expect}"):
            ModelFile(tmp_path / "huge.gguf")
    name = b"blk.0.attn_norm.weight"
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    off_at = at + 4 + 8 * int.from_bytes(data[at:at + 4], "little") + 4
    offset = int.from_bytes(data[off_at:off_at + 8], "little")
    for new, expect in ((2**64 - 32, "data runs to byte"), (offset + 4, "not a multiple of general.alignment")):
        bad = bytearray(data)
        bad[off_at:off_at + 8] = struct.pack("<Q", new)
        (tmp_path / "bad.gguf").write_bytes(bad)
        with pytest.raises(ModelFileError, match=rf"blk\.0\.attn_norm\.weight.*{expect}"):
            ModelFile(tmp_path / "bad.gguf")


def test_changed_reports_size_and_mtime(tmp_path):
    path = _write(tmp_path / "m.gguf")
    with ModelFile(path) as mf:
        assert mf.changed() is None
        with open(path, "ab") as f:
            f.write(b"x")
        assert "changed size" in mf.changed()
