"""`ds4cupy bench` end to end on the tiny model (reference backend, short settings), its server mode against a
BackgroundServer, the byte counts it reports, and bench.sh passing its arguments through. No speed is asserted."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ds4cupy.tools.bench import cli as bench_cli, measure as bench_measure, report as bench_report
from ds4cupy.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
RUN_FIELDS = {"run", "page_cache", "bandwidth", "load_s", "warmup_s", "prefill", "decode", "peak_gpu_mem_bytes",
              "peak_rss_bytes"}
DECODE_FIELDS = {"depth", "prompt_tokens", "tokens", "ttft_s", "seconds", "steady_tps", "avg_tps",
                 "weight_bytes_per_token", "kv_bytes_read_per_token", "bytes_per_token", "gbps", "roofline_fraction"}
SUMMARY_FIELDS = {"label", "unit", "scale", "n", "median", "min", "max", "spread_pct", "values"}


def _check_report(report: dict, pp: list[int], tg: int, depths: list[int], runs: int) -> None:
    meta = report["meta"]
    for key in ("date", "commit", "gpu", "settings", "model", "backend", "mode", "kv_bytes_per_token",
                "weight_bytes_per_token", "page_cache", "argv"):
        assert key in meta, key
    assert meta["settings"]["runs"] == runs
    assert len(report["runs"]) == runs
    for r in report["runs"]:
        assert RUN_FIELDS <= set(r), RUN_FIELDS - set(r)
        assert [p["pp"] for p in r["prefill"]] == pp
        for p in r["prefill"]:
            assert p["tps"] > 0 and p["ttft_s"] > 0 and math.isclose(p["tps"] * p["seconds"], p["tokens"])
        assert [d["depth"] for d in r["decode"]] == depths
        for d in r["decode"]:
            assert DECODE_FIELDS <= set(d), DECODE_FIELDS - set(d)
            assert d["tokens"] == tg and d["steady_tps"] > 0 and d["avg_tps"] > 0 and d["ttft_s"] > 0
    for key, s in report["summary"].items():
        assert SUMMARY_FIELDS <= set(s), key
        if s["n"]:
            assert s["min"] <= s["median"] <= s["max"] and len(s["values"]) == s["n"]


def test_bench_end_to_end_reference(tiny_model_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DS4CUPY_REPACK_Q8_0", "0")       # engine switches are recorded with the report
    monkeypatch.setenv("NOT_DS4CUPY_X", "1")
    out, csv_out = tmp_path / "b.json", tmp_path / "b.csv"
    rc = cli_main(["bench", "-m", str(tiny_model_path), "--backend", "reference", "--pp", "64", "--tg", "8",
                   "--depth", "0,32", "--runs", "2", "--page-cache", "fadvise", "--json-out", str(out),
                   "--csv", str(csv_out)])
    assert rc == 0
    report = json.loads(out.read_text())
    _check_report(report, [64], 8, [0, 32], 2)
    m = report["meta"]
    assert m["backend"] == "reference" and m["mode"] == "engine" and m["gpu"] is None
    assert m["page_cache"] == ["fadvise", "fadvise"]
    assert m["env"] == {k: v for k, v in os.environ.items() if k.startswith("DS4CUPY_")}
    assert m["env"]["DS4CUPY_REPACK_Q8_0"] == "0" and "NOT_DS4CUPY_X" not in m["env"]
    for r in report["runs"]:
        assert r["load_s"] > 0 and r["bandwidth"] is None and r["peak_gpu_mem_bytes"] is None
        assert r["peak_rss_bytes"] > 0
        for d in r["decode"]:
            # bytes read: the weights plus the KV rows of the decoded positions (more at depth 32 than at 0)
            assert d["weight_bytes_per_token"] == m["weight_bytes_per_token"]
            assert d["bytes_per_token"] == pytest.approx(d["weight_bytes_per_token"] + d["kv_bytes_read_per_token"])
            assert d["gbps"] == pytest.approx(d["bytes_per_token"] * d["steady_tps"] / 1e9)
            assert d["roofline_fraction"] is None          # no device bandwidth measured on a CPU
        assert r["decode"][1]["kv_bytes_read_per_token"] > r["decode"][0]["kv_bytes_read_per_token"]
    # the median of two runs is their mean; the table and CSV carry the same medians
    s = report["summary"]["pp64.tps"]
    assert s["median"] == pytest.approx(sum(s["values"]) / 2)
    text = capsys.readouterr().out
    assert "pp64 prefill" in text and "tg8@d32 decode steady" in text
    rows = csv_out.read_text().splitlines()
    assert rows[0].startswith("metric,") and any(r.startswith("pp64.tps,") for r in rows)
    # --show prints the saved report: BENCHMARKS.md's Markdown rows carry the JSON's medians
    capsys.readouterr()
    assert cli_main(["bench", "--show", str(out), "--markdown", "--match", "pp64"]) == 0
    shown = capsys.readouterr().out
    med = report["summary"]["pp64.tps"]
    assert "DS4CUPY_REPACK_Q8_0" in shown.splitlines()[0]
    rows = [ln for ln in shown.splitlines() if ln.startswith("| pp64 prefill |")]
    assert len(rows) == 1 and float(rows[0].split("|")[3].replace(",", "")) == pytest.approx(med["median"], rel=1e-2)
    assert all("pp64" in ln for ln in shown.splitlines()[3:])          # after the commit line, header, separator
    assert cli_main(["bench", "--show", str(tmp_path / "missing.json")]) == 2


def test_kv_read_bytes_follows_the_cache_layout():
    from ds4cupy.format.config import ModelConfig
    cfg = ModelConfig.flash(4)                   # layers: window, window, CSA 4, HCA 128
    hd, idim, w = cfg.head_dim, cfg.indexer_head_dim, cfg.sliding_window
    state = 2 * 8 * 2 * hd * 4 + 2 * 8 * 2 * idim * 4 + 2 * 128 * hd * 4
    pos = 9999                                   # 10,000 tokens visible
    expect = 4 * w * hd * 4 + state + (10000 // 4) * idim * 4 + cfg.indexer_top_k * hd * 4 + (10000 // 128) * hd * 4
    assert bench_measure.kv_read_bytes(cfg, pos) == expect
    assert bench_measure.kv_read_bytes(cfg, 0) == 4 * 1 * hd * 4 + state
    # packed indexer rows (INDEXER_FP4): 68 bytes a row for 128 dims (64 of e2m1 codes, 4 block exponents)
    packed = expect - (10000 // 4) * idim * 4 + (10000 // 4) * (idim // 2 + idim // 32)
    assert bench_measure.kv_read_bytes(cfg, pos, index_fp4=True) == packed


def test_int_list_and_summary():
    assert bench_cli.int_list("512,2k,pp8192") == [512, 2048, 8192]
    with pytest.raises(Exception):
        bench_cli.int_list("abc")
    runs = [{"load_s": v, "prefill": [], "decode": []} for v in (3.0, 1.0, 2.0)]
    s = bench_report.summarize(runs)["load_s"]
    assert (s["median"], s["min"], s["max"]) == (2.0, 1.0, 3.0) and s["spread_pct"] == pytest.approx(100.0)


def test_bench_server_mode(tiny_model_path, tmp_path):
    import ds4cupy
    from ds4cupy.server import BackgroundServer, ServerSettings, create_app
    m = ds4cupy.load(tiny_model_path, backend="reference")
    app = create_app(m.tokenizer, m.new_session(ctx=1024), ServerSettings(ctx=1024))
    out = tmp_path / "s.json"
    try:
        with BackgroundServer(app) as srv:
            rc = cli_main(["bench", "--server", srv.url, "--pp", "48", "--tg", "5", "--depth", "0,40", "--runs", "1",
                           "--json-out", str(out)])
    finally:
        m.close()
    assert rc == 0
    report = json.loads(out.read_text())
    _check_report(report, [48], 5, [0, 40], 1)
    assert report["meta"]["mode"] == "server"
    run = report["runs"][0]
    # the calibrated prompt lands near the asked length, as counted by the server's usage
    assert abs(run["prefill"][0]["prompt_tokens"] - 48) <= 8
    assert run["decode"][1]["prompt_tokens"] >= 40 - 8


def test_bench_rejects_bad_arguments(tiny_model_path, tmp_path):
    assert cli_main(["bench"]) == 2
    assert cli_main(["bench", "-m", str(tiny_model_path), "--backend", "reference", "--depth-fill", "random"]) == 2
    assert cli_main(["bench", "-m", str(tiny_model_path), "--backend", "reference", "--pp", "64", "--ctx", "32",
                     "--tg", "4", "--depth", "0", "--json-out", str(tmp_path / "x.json")]) == 2


def _fake_python(tmp_path: Path) -> Path:
    fake = tmp_path / "fake-python"
    fake.write_text('#!/usr/bin/env bash\nfor a in "$@"; do printf "<%s>\\n" "$a"; done\n'
                    'printf "PYTHONPATH=%s\\n" "$PYTHONPATH"\n')
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize("script,command", [("bench.sh", "bench"), ("verify.sh", "verify")])
def test_wrapper_passes_arguments_through(script, command, tmp_path):
    env = dict(os.environ, PYTHON=str(_fake_python(tmp_path)))
    args = ["-m", "a model with spaces.gguf", "--pp", "1,2", "", "--x=y z"]
    out = subprocess.run(["bash", str(ROOT / script), *args], env=env, capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines[:-1] == [f"<{a}>" for a in ["-m", "ds4cupy", command, *args]]
    assert lines[-1].startswith(f"PYTHONPATH={ROOT}")


def test_bench_sh_runs_for_real(tiny_model_path, tmp_path):
    out = tmp_path / "sh.json"
    r = subprocess.run(["bash", str(ROOT / "bench.sh"), "-m", str(tiny_model_path), "--backend", "reference",
                        "--pp", "16", "--tg", "3", "--depth", "0", "--runs", "1", "--page-cache", "keep",
                        "--no-warmup", "--json-out", str(out)],
                       env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    _check_report(report, [16], 3, [0], 1)
    assert report["meta"]["page_cache"] == ["kept"]
