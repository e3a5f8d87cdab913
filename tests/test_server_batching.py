"""`serve --max-batch N` end to end on the tiny reference model: 8 concurrent clients on servers batching 4 and 8
streams get, greedy, exactly the answers (token ids and text) the single-stream server gives each request alone; a
request queued behind a full batch gets keepalives and /metrics shows the batch; a client that leaves mid-stream
frees its place without touching the other streams' answers.
"""
from __future__ import annotations

import http.client
import json
import re
import threading
import time

import pytest

from ds4cupy.server import BackgroundServer, ServerSettings, create_app
from ds4cupy.server.app import STATE
from ds4cupy.server.scheduler import stream_batch

pytestmark = pytest.mark.usefixtures("one_blas_thread")

CTX = 256
HTTP_TIMEOUT = 60.0
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()


def server_for(model, max_batch: int, **settings) -> BackgroundServer:
    session = model.new_session(ctx=CTX)
    batch = stream_batch(model, session, CTX, max_batch)
    app = create_app(model.tokenizer, session, ServerSettings(ctx=CTX, **settings), prefill_chunk=32, batch=batch)
    return BackgroundServer(app).start()


def connect(srv) -> http.client.HTTPConnection:
    host, port = srv.url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=HTTP_TIMEOUT)


def post(srv, body: dict) -> dict:
    conn = connect(srv)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        assert resp.status == 200, data
        return json.loads(data)
    finally:
        conn.close()


def metrics(srv) -> dict[str, float]:
    conn = connect(srv)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(ds4cupy_\w+) (\S+)$", text, re.M)}


def greedy(content: str, max_tokens: int) -> dict:
    return {"model": "deepseek-chat", "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": max_tokens, "ignore_eos": True, "return_token_ids": True}


def answer(reply: dict) -> tuple:
    choice = reply["choices"][0]
    return tuple(choice["token_ids"]), choice["message"]["content"], reply["usage"]["completion_tokens"]


@pytest.fixture(scope="module")
def requests(module_seed):
    """8 prompts of different lengths (so the streams run at different depths), 12 greedy tokens each."""
    import numpy as np
    rng = np.random.default_rng(module_seed)
    return [greedy(" ".join(rng.choice(WORDS, 3 + 5 * i)), 12) for i in range(8)]


@pytest.fixture(scope="module")
def alone_answers(tiny_reference_model, requests):
    """Each request served alone by today's single-stream server (--max-batch 1)."""
    srv = server_for(tiny_reference_model, 1)
    try:
        return [answer(post(srv, body)) for body in requests]
    finally:
        srv.stop()


@pytest.mark.parametrize("max_batch", [4, 8])
def test_eight_concurrent_clients_get_their_alone_answers(tiny_reference_model, requests, alone_answers, max_batch):
    srv = server_for(tiny_reference_model, max_batch)
    try:
        assert srv.app[STATE].worker.max_batch == max_batch
        replies: dict[int, dict] = {}
        start = threading.Barrier(len(requests))

        def client(i):
            start.wait()
            replies[i] = post(srv, requests[i])
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(HTTP_TIMEOUT)
        assert sorted(replies) == list(range(len(requests)))
        for i, want in enumerate(alone_answers):
            assert answer(replies[i]) == want, f"request {i}"
            assert want[2] == 12
        m = metrics(srv)
        # the clients were served together: decode steps advanced more than one stream on average (measured 2.8 with
        # max-batch 4, 3.3 with 8)
        assert m["ds4cupy_batch_decode_step_streams_total"] > 1.5 * m["ds4cupy_batch_decode_steps_total"] > 0
        assert m["ds4cupy_batch_max_streams"] == max_batch and m["ds4cupy_completion_tokens_total"] == 96
        # the prefix cache keeps working: a second turn continues a conversation served in the batch
        first = requests[3]
        follow = dict(first, messages=first["messages"] + [
            {"role": "assistant", "content": replies[3]["choices"][0]["message"]["content"]},
            {"role": "user", "content": "more"}])
        reply = post(srv, follow)
        assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    finally:
        srv.stop()


def read_stream(resp, on_line=None) -> list[str]:
    lines = []
    while True:
        raw = resp.readline()
        if not raw:
            return lines
        line = raw.decode().rstrip("\n")
        lines.append(line)
        if on_line is not None and on_line(line, lines) is False:
            return lines


def stream_request(srv, body: dict, out: dict, key: str, stop_after_chunks: int | None = None) -> None:
    """POST a streaming request; out[key] = (headers, SSE lines). With stop_after_chunks the client hangs up after
    that many data chunks."""
    conn = connect(srv)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(dict(body, stream=True)),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()

        def maybe_stop(line, lines):
            if stop_after_chunks is not None and sum(x.startswith("data: {") for x in lines) >= stop_after_chunks:
                return False
        out[key] = (dict(resp.getheaders()), read_stream(resp, maybe_stop))
    finally:
        conn.close()


def streamed_text(lines: list[str]) -> tuple[str, list[int]]:
    text, ids = "", []
    for line in lines:
        if line.startswith("data: {"):
            choice = json.loads(line[6:])["choices"]
            if choice:
                text += choice[0]["delta"].get("content") or ""
                ids += choice[0].get("token_ids") or []
    return text, ids


def test_full_batch_queue_keepalive_metrics_and_a_client_leaving(tiny_reference_model, requests):
    """max-batch 2: two long streams fill the batch; a third request waits (position 1, keepalives, /metrics says 2
    streams and 1 waiting) and starts when the first client hangs up; the streams that stayed get their alone
    answers."""
    long_body = greedy("one two three", 48)
    stay_body = greedy("four five six seven", 40)
    alone = server_for(tiny_reference_model, 1)
    try:
        want_stay = answer(post(alone, stay_body))
        want_third = answer(post(alone, requests[0]))
    finally:
        alone.stop()

    srv = server_for(tiny_reference_model, 2, keepalive_s=0.05)
    out: dict = {}
    try:
        leaver = threading.Thread(target=stream_request, args=(srv, long_body, out, "leaver", 4))
        leaver.start()
        stayer = threading.Thread(target=lambda: out.setdefault("stay", post(srv, stay_body)))
        stayer.start()
        worker = srv.app[STATE].worker
        deadline = time.monotonic() + HTTP_TIMEOUT
        while worker.running_count < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        third = threading.Thread(target=stream_request, args=(srv, requests[0], out, "third"))
        third.start()
        seen = {}
        while time.monotonic() < deadline and not seen:
            m = metrics(srv)
            if m["ds4cupy_queue_depth"] == 1:
                seen = m
            time.sleep(0.01)
        for t in (leaver, stayer, third):
            t.join(HTTP_TIMEOUT)
        assert seen and seen["ds4cupy_batch_streams"] == 2 and seen["ds4cupy_batch_max_streams"] == 2
        assert worker.wait_idle(10)
        assert metrics(srv)["ds4cupy_batch_streams"] == 0

        headers, lines = out["third"]
        assert headers["X-Queue-Position"] == "1"
        assert ": keepalive" in lines[:lines.index(next(x for x in lines if x.startswith("data: {")))]
        text, ids = streamed_text(lines)
        assert (tuple(ids), text) == want_third[:2] and lines[-2] == "data: [DONE]"
        assert answer(out["stay"]) == want_stay
        assert metrics(srv)["ds4cupy_requests_cancelled_total"] == 1
    finally:
        srv.stop()
