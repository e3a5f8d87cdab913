"""`ds4cupy make-model --preset tiny` then `ds4cupy info` (issue 2's done-when), the JSON form, bytes per decoded token
against the file's own tensor table, and the errors a user can hit."""
from __future__ import annotations

import json

import pytest

from ds4cupy.cli import main
from ds4cupy.engines import gpu_available, load
from ds4cupy.format.model_file import ModelFile


def test_make_model_then_info(tmp_path, capsys):
    path = tmp_path / "tiny.gguf"
    assert main(["make-model", "--preset", "tiny", "--seed", "3", "--out", str(path)]) == 0
    capsys.readouterr()
    assert main(["info", str(path), "--ctx", "4096"]) == 0
    out = capsys.readouterr().out
    assert "layers     5: window CSA HCA16 CSA HCA16" in out
    assert "IQ2_XXS" in out and "Q2_K" in out and "Q8_0" in out
    assert "memory budget" in out and "ctx 4096" in out
    assert main(["info", str(path), "--machine", "h200"]) == 0
    assert "placement: weights device" in capsys.readouterr().out


def test_info_json_counts_the_bytes_a_token_reads(tmp_path, capsys):
    path = tmp_path / "tiny.gguf"
    assert main(["make-model", "--preset", "tiny", "--experts", "q4", "--out", str(path)]) == 0
    capsys.readouterr()
    assert main(["info", str(path), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    mf = ModelFile(path)
    cfg = mf.config
    experts = sum(t.nbytes for n, t in mf.tensors.items() if n.endswith("_exps.weight"))
    assert s["decode_bytes_per_token"]["routed experts"] == experts * cfg.n_expert_used // cfg.n_expert
    assert s["decode_bytes_per_token"]["head"] == mf.info("output.weight").nbytes
    assert s["weight_bytes"] == sum(t.nbytes for t in mf.tensors.values())
    assert s["types"]["Q4_K"]["tensors"] == 3 * cfg.n_layer
    assert sum(v for k, v in s["memory"].items() if k.startswith("kv.")) > 0


def test_info_errors(tmp_path, capsys):
    assert main(["info", str(tmp_path / "absent.gguf")]) == 1
    assert "no such model file" in capsys.readouterr().out
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(10))
    assert main(["info", str(bad)]) == 1
    assert "too short for a GGUF header" in capsys.readouterr().out


@pytest.mark.skipif(gpu_available(), reason="checks the message on a machine without a GPU")
def test_cuda_backend_without_gpu_says_so(tiny_model_path):
    with pytest.raises(RuntimeError, match="needs an NVIDIA GPU"):
        load(tiny_model_path, backend="cuda")
    assert load(tiny_model_path).backend == "reference"      # auto falls back to the CPU
