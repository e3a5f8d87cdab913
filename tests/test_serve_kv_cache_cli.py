"""`ds4cupy serve --kv-cache-dir DIR` as a user runs it: states written while serving survive a restart of the
process, and the same prompt is then served from disk (Anthropic usage says so); the budgets are printed."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request

START_TIMEOUT = 90.0


def serve(cache_dir):
    proc = subprocess.Popen([sys.executable, "-m", "ds4cupy", "serve", "--port", "0", "--backend", "reference",
                             "--ctx", "512", "--kv-cache-dir", str(cache_dir), "--kv-cache-gb", "0.05",
                             "--checkpoint-tokens", "16"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)/v1", line)
        if m:
            return proc, m.group(1)
    proc.kill()
    raise AssertionError(f"no URL printed; stderr: {proc.communicate(timeout=10)[1]}")


def stop(proc) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    return err


def ask(url) -> dict:
    body = json.dumps({"model": "deepseek-chat", "max_tokens": 2, "system": "You are terse.",
                       "messages": [{"role": "user", "content": "Tell me about the sea, in a few words."}],
                       "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/messages", data=body, headers={"Content-Type": "application/json",
                                                                           "anthropic-version": "2023-06-01"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())["usage"]


def test_kv_cache_dir_survives_a_restart(tmp_path):
    proc, url = serve(tmp_path)
    try:
        first = ask(url)
    finally:
        err = stop(proc)
    assert first["cache_read_input_tokens"] == 0
    assert re.search(r"prefix cache: GPU 0 GB, host [\d.]+ GB, disk 0\.05 GB in .*; checkpoints every 16 tokens",
                     err), err
    assert len(list(tmp_path.glob("*.kv"))) >= 2

    proc, url = serve(tmp_path)
    try:
        again = ask(url)
    finally:
        err = stop(proc)
    prompt = first["input_tokens"]
    assert again["cache_read_input_tokens"] == prompt - 1 and again["input_tokens"] == 1
    assert "stored states" in err                # the files found at start-up are reported
