"""llama-benchy (from PyPI), the tool people compare local servers with, against `ds4cupy serve` on the tiny model:
it loads the tokenizer `ds4cupy export-tokenizer` wrote, reads a local book file (put in its cache under the URL's
MD5, so it never downloads), runs, and reports pp and tg rows of the requested sizes with positive rates. Their speed
is printed, not asserted (speed is bench's job, and a timed comparison fails on a loaded machine)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import llama_benchy  # noqa: F401  (the llama-benchy command it provides)

import ds4cupy
from ds4cupy.cli import main as cli_main
from ds4cupy.server import BackgroundServer, ServerSettings, create_app

BOOK = Path(ds4cupy.__file__).parent / "data" / "demo_corpus.txt"
BOOK_URL = "http://book.invalid/ds4cupy-demo-corpus.txt"     # never fetched: the cache file below answers
PP, TG = 96, 4


def test_llama_benchy_reports_pp_and_tg_rows_consistent_with_bench(tiny_model_path, tmp_path):
    tokenizer_json = tmp_path / "tokenizer.json"
    assert cli_main(["export-tokenizer", str(tiny_model_path), "--out", str(tokenizer_json)]) == 0
    home = tmp_path / "home"
    cache = home / ".cache" / "llama-benchy"
    cache.mkdir(parents=True)
    (cache / f"{hashlib.md5(BOOK_URL.encode()).hexdigest()}.txt").write_text(BOOK.read_text(encoding="utf-8"),
                                                                             encoding="utf-8")
    results = tmp_path / "benchy.json"
    model = ds4cupy.load(tiny_model_path, backend="reference")
    try:
        app = create_app(model.tokenizer, model.new_session(ctx=1024), ServerSettings(ctx=1024))
        with BackgroundServer(app) as srv:
            env = {**os.environ, "HOME": str(home), "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1",
                   "HF_HUB_OFFLINE": "1"}
            run = subprocess.run(
                [sys.executable, "-m", "llama_benchy", "--base-url", srv.url + "/v1", "--model", "deepseek-v4-flash",
                 "--tokenizer", str(tokenizer_json), "--book-url", BOOK_URL, "--pp", str(PP), "--tg", str(TG),
                 "--runs", "2", "--no-warmup", "--no-cache", "--skip-coherence", "--format", "json",
                 "--save-result", str(results)],
                env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    finally:
        model.close()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Delta: 4 tokens" in run.stdout       # the exported tokenizer counts the text as the server does
    (row,) = json.loads(results.read_text())["benchmarks"]
    assert row["prompt_size"] == PP and row["response_size"] == TG
    pp = row["pp_throughput"]["values"]
    tg = row["tg_throughput"]["values"]
    assert len(pp) == len(tg) == 2 and min(pp) > 0 and min(tg) > 0

    # no speed assertion: speed is measured by bench (BENCHMARKS.md), and a timed comparison fails under load
    print(f"llama-benchy pp{PP} t/s {pp}, tg{TG} t/s {tg}")
