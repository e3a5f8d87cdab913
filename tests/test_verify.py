"""`ds4cupy verify`: passes on the generated models, exits non-zero when a check is made to fail (a corrupted weight),
and its story coherence rule tells prose from loops and gibberish."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ds4cupy.tools import verify
from ds4cupy.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
REAL_TOKENIZER = ROOT.parent / "shared" / "data" / "tokenizer" / "tokenizer.json"


def _verdicts(path: Path) -> dict:
    return json.loads(path.read_text())


def test_verify_passes_on_generated_models(tmp_path, capsys):
    out = tmp_path / "v.json"
    rc = cli_main(["verify", "--json-out", str(out)])
    text = capsys.readouterr().out
    report = _verdicts(out)
    assert rc == 0, text
    assert report["verdict"] == "PASS" and report["counts"]["FAIL"] == 0
    names = [c["name"] for c in report["checks"]]
    for label in ("tiny-q2", "tiny-q4"):
        for what in ("prefill(L+1) == prefill(L) + decode(1)", "chunked prefill == whole prefill",
                     "snapshot/restore round trip"):
            assert f"{label} [reference] {what}" in names
    # transformers is in the test extra, so the parity check runs (a missing transformers fails here)
    assert any(n.startswith("transformers parity [reference") and c["status"] == "PASS"
               for n, c in zip(names, report["checks"]))
    # one verdict line per check, with the measured number and the threshold
    for c in report["checks"]:
        line = next(ln for ln in text.splitlines() if c["name"] in ln)
        assert line.startswith(c["status"])
        if c["status"] != "SKIP":
            assert "threshold" in line and "max|diff|" in line
    assert text.strip().splitlines()[-1].startswith("PASS:")


def test_verify_fails_on_a_corrupted_weight(tmp_path, capsys):
    out = tmp_path / "v.json"
    rc = cli_main(["verify", "--checks", "tiny", "--corrupt-weight", "output_norm.weight", "--json-out", str(out)])
    report = _verdicts(out)
    assert rc == 1 and report["verdict"] == "FAIL"
    assert all(c["status"] == "FAIL" for c in report["checks"]) and len(report["checks"]) == 6
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("FAIL:")


def test_parity_catches_a_finite_corruption(tmp_path):
    """A weight scaled by 1.25 keeps every self-consistency check happy; only the independent oracle catches it."""
    out = tmp_path / "v.json"
    rc = cli_main(["verify", "--checks", "transformers", "--corrupt-weight", "blk.1.attn_norm.weight",
                   "--corrupt-mode", "scale", "--json-out", str(out)])
    checks = _verdicts(out)["checks"]
    assert rc == 1 and [c["status"] for c in checks] == ["FAIL"]


def test_corrupt_weight_changes_only_that_tensor(tiny_model_path, tmp_path):
    from ds4cupy.format.model_file import ModelFile
    path = tmp_path / "m.gguf"
    path.write_bytes(tiny_model_path.read_bytes())
    assert verify.corrupt_weight(path, "blk.0.attn_norm.weight", "scale")
    assert not verify.corrupt_weight(path, "no.such.tensor")
    with ModelFile(tiny_model_path) as a, ModelFile(path) as b:
        np.testing.assert_allclose(b.raw("blk.0.attn_norm.weight"), 1.25 * a.raw("blk.0.attn_norm.weight"),
                                   rtol=1e-6)
        np.testing.assert_array_equal(b.raw("output_norm.weight"), a.raw("output_norm.weight"))


def test_rel_diff_is_nan_safe():
    a = np.array([1.0, -2.0, 4.0])
    assert verify.rel_diff(a, a + np.array([0, 0, 0.04])) == pytest.approx(0.01)
    assert not verify.within(verify.rel_diff(a, np.array([1.0, np.nan, 4.0])), 1.0)
    assert not verify.within(verify.rel_diff(np.zeros(3), np.zeros(3)), 1.0)


@pytest.mark.skipif(not REAL_TOKENIZER.is_file(), reason="the real DeepSeek-V4 tokenizer.json is not here")
def test_coherence_rule():
    from ds4cupy.text.tokenizer import Tokenizer
    tok = Tokenizer.from_tokenizer_json(REAL_TOKENIZER)
    prose = ("The old robot stood in the corner of the workshop, watching the light move across the floor. Every "
             "morning it cleaned the brushes that nobody used anymore, because the painter had left years ago. One "
             "day a child came in, picked up a brush and handed it to the robot. The robot did not know what to do, "
             "so it copied the shapes of the window, the door and the tree outside. The colours were wrong, but the "
             "child laughed, and the robot decided to try again the next day.")
    loop = "the robot painted the wall and " * 20
    gibberish = " ".join(["qzxv", "blorptank", "xxyqq", "vrrmt", "zqkj", "the", "pfft", "wqxz"] * 8)
    ok = verify.coherence(prose, tok)
    assert ok["ok"] and ok["repeat_4gram_rate"] <= 0.05 and ok["vocab_rate"] >= 0.95, ok
    bad_loop = verify.coherence(loop, tok)
    assert not bad_loop["ok"] and bad_loop["repeat_4gram_rate"] > 0.5
    bad_words = verify.coherence(gibberish, tok)
    assert not bad_words["ok"] and bad_words["vocab_rate"] < 0.5, bad_words
    assert not verify.coherence("Paris.", tok)["ok"]           # too short


def test_prompt_checks_run_on_a_model(tiny_model_path):
    """The real-model prompt checks run end to end (on random weights they must not crash; they may fail)."""
    import ds4cupy
    m = ds4cupy.load(tiny_model_path, backend="reference")
    runner = verify.Runner(out=open(os.devnull, "w"))
    try:
        verify.run_prompts(runner, m, ctx=512, story_tokens=12)
    finally:
        m.close()
    assert len(runner.verdicts) == 3
    assert all(v.status in ("PASS", "FAIL") and not v.measured.startswith("error") for v in runner.verdicts), \
        [v.line() for v in runner.verdicts]


def test_verify_sh_exit_status(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "verify.sh"), "--checks", "tiny", "--corrupt-weight", "output_norm.weight"],
                       env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL" in r.stdout.splitlines()[-1]
