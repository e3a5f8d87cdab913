"""`ds4cupy serve` as a user starts it: no -m (the demo model, labelled as random weights), a free port, the URL
printed once listening, one request, a clean exit on SIGTERM."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request

START_TIMEOUT = 90.0


def test_serve_demo_model_prints_url_and_serves():
    proc = subprocess.Popen([sys.executable, "-m", "ds4cupy", "serve", "--port", "0", "--backend", "reference",
                             "--ctx", "512"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        url = None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            m = re.search(r"listening on (http://127\.0\.0\.1:\d+)/v1", line)
            if m:
                url = m.group(1)
                break
        assert url, f"no URL printed; stderr: {proc.stderr.read() if proc.poll() is not None else ''}"
        body = json.dumps({"model": "deepseek-chat", "max_tokens": 2,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            reply = json.loads(resp.read())
        assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] >= 1
        with urllib.request.urlopen(url + "/health", timeout=10) as resp:
            assert json.loads(resp.read())["demo_model_random_weights"] is True
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "RANDOM" in err                     # the demo model is clearly labelled
