"""The server's protocol layer and engine worker, without the model: validation, thinking selection, builders, SSE
framing, prefix-reuse planning, FIFO order, cancellation and failure handling on a fake session."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import orjson
import pytest

from ds4cupy.server import protocol
from ds4cupy.server.metrics import ServerMetrics
from ds4cupy.server.protocol import ProtocolError
from fake_sessions import TokenListSession
from ds4cupy.server.worker import (EngineWorker, EventChannel, GenerationJob, JobCancelled, JobFailed, JobFinished,
                                   JobStarted, PrefillProgress, TokenDelta)

CTX = 4096
USER = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return protocol.parse_chat_request({"messages": USER, **fields}, ctx=CTX)


def refused(fn, *args, **kwargs) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        fn(*args, **kwargs)
    err = info.value
    body = err.body()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return err


# ------------------------------------------------------------------------------------------------------ validation

def test_chat_defaults():
    req = chat()
    assert req.stream is False and req.include_usage is False and req.max_tokens is None
    assert (req.sampling.temperature, req.sampling.top_p, req.sampling.top_k, req.sampling.min_p) == (1.0, 1.0, 0, 0.05)
    assert req.thinking.enabled and not req.thinking.think_max
    assert req.tools == [] and req.offered_tools == [] and req.stop == []


def test_chat_fields_parsed():
    req = chat(stream=True, stream_options={"include_usage": True}, max_completion_tokens=7, temperature=0,
               top_p=0.5, top_k=40, min_p=0.1, seed=-1, stop="END", model="deepseek-chat")
    assert req.stream and req.include_usage and req.max_tokens == 7
    assert req.sampling.temperature == 0 and req.sampling.top_k == 40 and req.sampling.seed == 2**64 - 1
    assert req.stop == ["END"] and not req.thinking.enabled


def test_max_completion_tokens_wins_over_max_tokens():
    """OpenAI deprecated max_tokens for max_completion_tokens: when a request sends both, the newer name counts
    (whichever comes first in the body), and each is still validated."""
    assert chat(max_tokens=9, max_completion_tokens=4).max_tokens == 4
    assert protocol.parse_chat_request({"max_completion_tokens": 4, "messages": USER, "max_tokens": 9},
                                       ctx=CTX).max_tokens == 4
    assert chat(max_tokens=9).max_tokens == 9 and chat(max_completion_tokens=3).max_tokens == 3
    assert refused(chat, max_tokens=0, max_completion_tokens=4).param == "max_tokens"
    completion = protocol.parse_completion_request({"prompt": "p", "max_tokens": 9, "max_completion_tokens": 2},
                                                   ctx=CTX)
    assert completion.max_tokens == 2


def test_stop_holds_up_to_sixteen_strings():
    """16 stop strings are accepted (17 are refused: test_chat_field_errors)."""
    assert chat(stop=[f"s{i}" for i in range(16)]).stop == [f"s{i}" for i in range(16)]


@pytest.mark.parametrize("fields, param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_tokens": "10"}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"min_p": 2}, "min_p"),
    ({"seed": "x"}, "seed"),
    ({"stop": 5}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop": ["a"] * 17}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": []}, "stream_options"),
    ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ({"model": 3}, "model"),
    ({"n": 2}, "n"),
    ({"frobnicate": 1}, "frobnicate"),              # not an OpenAI field: refused, never ignored
    ({"store": True}, "store"),                      # a field the server cannot honour, other than at its default
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"reasoning_effort": 1}, "reasoning_effort"),
    ({"thinking": "on"}, "thinking"),
    ({"thinking": {"type": "maybe"}}, "thinking.type"),
    ({"think": "no"}, "think"),
    ({"tools": {}}, "tools"),
    ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_chat_field_errors(fields, param):
    err = refused(chat, **fields)
    assert err.status == 400 and err.type == "invalid_request_error" and err.param == param


@pytest.mark.parametrize("messages, param", [
    (None, "messages"),
    ([], "messages"),
    ("hello", "messages"),
    ([{"role": "robot", "content": "x"}], "messages[0].role"),
    (["x"], "messages[0]"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0]"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": ""}}]}],
     "messages[0].tool_calls[0].function.name"),
    ([{"role": "tool", "content": "r", "tool_call_id": 3}], "messages[0].tool_call_id"),
])
def test_message_errors(messages, param):
    err = refused(protocol.parse_chat_request, {"messages": messages}, ctx=CTX)
    assert err.status == 400 and err.param == param


def test_body_must_be_object():
    assert refused(protocol.parse_chat_request, [1, 2], ctx=CTX).status == 400
    assert refused(protocol.parse_completion_request, "x", ctx=CTX).status == 400


def test_messages_normalised():
    req = protocol.parse_chat_request({"messages": [
        {"role": "system", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "reasoning_content": "r",
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "get", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]}, ctx=CTX)
    sys_msg, user, assistant, tool = req.messages
    assert sys_msg["content"] == "be brief" and user["content"] == "weather?"
    assert assistant["content"] == "" and assistant["reasoning_content"] == "r"
    assert assistant["tool_calls"][0]["function"] == {"name": "get", "arguments": '{"city":"Rome"}'}
    assert tool == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}


def test_tools_and_tool_choice():
    tools = [{"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}]
    req = chat(tools=tools)
    assert req.tool_choice == "auto" and req.offered_tools == req.tools
    assert chat(tools=tools, tool_choice="none").offered_tools == []
    assert chat(tools=tools, tool_choice={"type": "function", "function": {"name": "get"}}).offered_tools
    assert refused(chat, tools=tools, tool_choice={"type": "function", "function": {"name": "nope"}}).status == 400


@pytest.mark.parametrize("fields, enabled, think_max", [
    ({}, True, False),
    ({"model": "deepseek-chat"}, False, False),
    ({"model": "deepseek-reasoner"}, True, False),
    ({"thinking": {"type": "disabled"}}, False, False),
    ({"thinking": False}, False, False),
    ({"think": False}, False, False),
    ({"reasoning_effort": "none"}, False, False),
    ({"reasoning_effort": "high"}, True, False),
    ({"reasoning_effort": "minimal"}, True, False),                  # only "none" turns thinking off
    ({"reasoning_effort": "low"}, True, False),
    ({"reasoning_effort": "xhigh"}, True, False),
    ({"reasoning_effort": "max"}, True, False),                      # ctx 4096 < 393216: plain thinking
    ({"model": "deepseek-chat", "thinking": {"type": "enabled"}}, True, False),
    ({"model": "deepseek-chat", "reasoning_effort": "low"}, True, False),
])
def test_thinking_selection(fields, enabled, think_max):
    t = chat(**fields).thinking
    assert (t.enabled, t.think_max) == (enabled, think_max)
    assert t.thinking_mode == ("thinking" if enabled else "chat")


def test_think_max_needs_long_context():
    big = protocol.parse_chat_request({"messages": USER, "reasoning_effort": "max"}, ctx=protocol.THINK_MAX_MIN_CTX)
    assert big.thinking.think_max and big.thinking.reasoning_effort == "max"
    off = protocol.parse_chat_request({"messages": USER, "reasoning_effort": "max", "think": False},
                                      ctx=protocol.THINK_MAX_MIN_CTX)
    assert not off.thinking.enabled and off.thinking.reasoning_effort is None


def test_completion_request():
    req = protocol.parse_completion_request({"prompt": ["Say hi"], "max_tokens": 3, "stop": ["x", "y"]}, ctx=CTX)
    assert req.prompt == "Say hi" and req.max_tokens == 3 and req.stop == ["x", "y"]
    assert not req.thinking.enabled
    assert req.messages()[0] == {"role": "system", "content": protocol.COMPLETIONS_SYSTEM_PROMPT}
    for body, param in [({}, "prompt"), ({"prompt": ""}, "prompt"), ({"prompt": ["a", "b"]}, "prompt"),
                        ({"prompt": [1, 2]}, "prompt"), ({"prompt": "a", "echo": True}, "echo"),
                        ({"prompt": "a", "suffix": "z"}, "suffix"), ({"prompt": "a", "max_tokens": 0}, "max_tokens")]:
        err = refused(protocol.parse_completion_request, body, ctx=CTX)
        assert err.param == param


# ------------------------------------------------------------------------------------------------------- builders

def test_usage_and_builders():
    usage = protocol.usage_object(10, 4, 6)
    assert usage == {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14,
                     "prompt_tokens_details": {"cached_tokens": 6}}
    full = protocol.chat_completion("id1", "m", 1, content="", reasoning="r", finish_reason="tool_calls", usage=usage,
                                    tool_calls=[{"id": "c", "type": "function",
                                                 "function": {"name": "f", "arguments": "{}"}}])
    message = full["choices"][0]["message"]
    assert message["content"] is None and message["reasoning_content"] == "r" and message["tool_calls"]
    chunk = protocol.chat_chunk("id1", "m", 1, {"content": "x"}, include_usage=True)
    assert chunk["object"] == "chat.completion.chunk" and chunk["usage"] is None
    assert protocol.chat_usage_chunk("id1", "m", 1, usage)["choices"] == []
    assert protocol.text_chunk("id2", "m", 1, "t")["choices"][0]["text"] == "t"


def test_tool_call_deltas_accumulate():
    acc = protocol.ToolCallAccumulator()
    deltas = [{"index": 0, "id": "call_a", "name": "get", "arguments": ""},
              {"index": 0, "id": None, "name": None, "arguments": '{"city": '},
              {"index": 0, "id": None, "name": None, "arguments": '"Rome"}'},
              {"index": 1, "id": "call_b", "name": "time", "arguments": "{}"}]
    wire = [protocol.tool_call_delta(d) for d in deltas]
    assert wire[0] == {"index": 0, "id": "call_a", "type": "function", "function": {"name": "get", "arguments": ""}}
    assert wire[1] == {"index": 0, "function": {"arguments": '{"city": '}}
    for d in deltas:
        acc.add(d)
    calls = acc.calls()
    assert [c["function"]["name"] for c in calls] == ["get", "time"]
    assert orjson.loads(calls[0]["function"]["arguments"]) == {"city": "Rome"}


def test_sse_framing():
    event = protocol.sse_event({"text": "a\nb"})
    assert event.startswith(b"data: ") and event.endswith(b"\n\n") and event.count(b"\n") == 2
    assert orjson.loads(event[6:-2]) == {"text": "a\nb"}
    assert protocol.SSE_DONE == b"data: [DONE]\n\n"
    assert protocol.SSE_KEEPALIVE.startswith(b":")


def test_context_exceeded_error():
    err = protocol.context_exceeded(5000, 4096)
    assert err.status == 400 and err.code == "context_length_exceeded" and "4096" in err.message


# ---------------------------------------------------------------------------------------------- worker with fakes

class FakeSession(TokenListSession):
    """Records prefill/decode calls; a state is its tokens only."""

    def __init__(self, prefill_delay: float = 0.0, fail_on: int | None = None):
        super().__init__()
        self.prefill_calls: list[list[int]] = []
        self.prefill_delay = prefill_delay
        self.fail_on = fail_on
        self.resets = 0

    def prefill(self, ids):
        if self.fail_on is not None and self.fail_on in ids:
            raise RuntimeError("boom")
        time.sleep(self.prefill_delay)
        self.prefill_calls.append(list(ids))
        self.tokens.extend(ids)
        return ("logits", len(self.tokens))

    def decode(self, token_id):
        self.tokens.append(token_id)
        return ("logits", len(self.tokens))

    def reset(self):
        super().reset()
        self.resets += 1


@dataclass
class FakeDelta:
    token_id: int
    reasoning: str = ""
    content: str = ""
    tool_calls: list | None = None
    finish_reason: str | None = None


class FakeGenerator:
    """Emits max_tokens tokens (ids 1000+i, content 't{i} '), decoding each but the last; finish 'length'."""

    def __init__(self, job, delay: float = 0.0):
        self.job, self.delay, self.completion_tokens = job, delay, 0

    def stream(self, session, logits):
        for i in range(self.job.max_tokens):
            time.sleep(self.delay)
            self.completion_tokens += 1
            last = i == self.job.max_tokens - 1
            yield FakeDelta(1000 + i, content=f"t{i} ", finish_reason="length" if last else None)
            if not last:
                session.decode(1000 + i)


def run_jobs(worker, jobs, timeout=10.0):
    """Submit jobs from an event loop and collect every job's events until its terminal event."""
    async def main():
        loop = asyncio.get_running_loop()
        for job in jobs:
            job.channel = EventChannel(loop)
            worker.submit(job)
        results = []
        for job in jobs:
            events = []
            while True:
                event = await asyncio.wait_for(job.channel.get(), timeout)
                events.append(event)
                if isinstance(event, (JobFinished, JobCancelled, JobFailed)):
                    break
            results.append(events)
        return results
    return asyncio.run(main())


def make_job(name, prompt, max_tokens=3, **kw):
    return GenerationJob(request_id=name, prompt_ids=list(prompt), max_tokens=max_tokens,
                         sampling=protocol.SamplingFields(), **kw)


def test_worker_streams_and_reuses_prefix():
    session = FakeSession()
    metrics = ServerMetrics()
    worker = EngineWorker(session, lambda job: FakeGenerator(job), metrics=metrics, prefill_chunk=4).start()
    try:
        first = list(range(1, 11))                                        # 10 prompt tokens
        [events] = run_jobs(worker, [make_job("a", first)])
        assert isinstance(events[0], JobStarted) and events[0].cached_tokens == 0
        deltas = [e.delta for e in events if isinstance(e, TokenDelta)]
        assert [d.content for d in deltas] == ["t0 ", "t1 ", "t2 "]
        done = events[-1]
        assert isinstance(done, JobFinished) and done.finish_reason == "length"
        assert (done.prompt_tokens, done.completion_tokens, done.cached_tokens) == (10, 3, 0)
        # chunked: 9 stable tokens in chunks of 4, then the last prompt token alone
        assert [len(c) for c in session.prefill_calls] == [4, 4, 1, 1]
        assert [e.done for e in events if isinstance(e, PrefillProgress)] == [4, 8, 9, 10]

        # next turn: the live tokens (prompt + 2 decoded) are a prefix -> continue directly
        second = session.tokens + [50, 51, 52]
        [events] = run_jobs(worker, [make_job("b", second)])
        assert events[0].cached_tokens == 12 and events[-1].cached_tokens == 12
        assert session.prefill_calls[-2:] == [[50, 51], [52]]

        # a regenerated answer to the same prompt: restore the snapshot taken before its last token
        [events] = run_jobs(worker, [make_job("c", second)])
        assert events[0].cached_tokens == len(second) - 1
        assert session.prefill_calls[-1] == [52]

        # a checkpoint at the last turn start: a different last turn reuses everything before it
        third = second[:5] + [88, 89, 90]
        [events] = run_jobs(worker, [make_job("c2", second[:5] + [60, 61, 62], checkpoints=[5])])
        assert events[0].cached_tokens == 0
        [events] = run_jobs(worker, [make_job("c3", third, checkpoints=[5])])
        assert events[0].cached_tokens == 5 and session.prefill_calls[-2:] == [[88, 89], [90]]

        # an unrelated prompt: reset
        [events] = run_jobs(worker, [make_job("d", [7, 7, 7])])
        assert events[0].cached_tokens == 0 and session.resets >= 1
        snap = metrics.snapshot()
        assert snap["cached_tokens"] == 12 + len(second) - 1 + 5 and snap["completion_tokens"] == 18
    finally:
        worker.stop()


def test_worker_fifo_order_and_queue_position():
    session = FakeSession()
    order = []

    def make(job):
        order.append(job.request_id)
        return FakeGenerator(job, delay=0.005)

    worker = EngineWorker(session, make)
    jobs = [make_job(f"r{i}", [i + 1, i + 2], max_tokens=2) for i in range(8)]
    positions = []

    async def main():
        loop = asyncio.get_running_loop()
        for job in jobs:
            job.channel = EventChannel(loop)
            positions.append(worker.submit(job))
        assert worker.queue_depth == 8 and worker.position(jobs[3]) == 3
        worker.start()
        for job in jobs:
            while not isinstance(await asyncio.wait_for(job.channel.get(), 10), (JobFinished, JobFailed)):
                pass

    try:
        asyncio.run(main())
    finally:
        worker.stop()
    assert positions == list(range(8))
    assert order == [j.request_id for j in jobs]


def test_worker_cancel_within_one_token_and_when_queued():
    session = FakeSession()
    worker = EngineWorker(session, lambda job: FakeGenerator(job, delay=0.01)).start()

    async def main():
        loop = asyncio.get_running_loop()
        long_job = make_job("long", [1, 2, 3], max_tokens=10_000, channel=EventChannel(loop))
        queued = make_job("queued", [4, 5], max_tokens=5, channel=EventChannel(loop))
        after = make_job("after", [6, 7], max_tokens=2, channel=EventChannel(loop))
        for job in (long_job, queued, after):
            worker.submit(job)
        queued.cancel.set()                              # gone before it starts: never touches the session
        n = 0
        while n < 5:
            if isinstance(await asyncio.wait_for(long_job.channel.get(), 5), TokenDelta):
                n += 1
        long_job.cancel.set()
        t0 = time.perf_counter()
        seen_after_cancel = 0
        while True:
            event = await asyncio.wait_for(long_job.channel.get(), 5)
            if isinstance(event, JobCancelled):
                break
            seen_after_cancel += isinstance(event, TokenDelta)
        assert seen_after_cancel <= 2              # the one in flight, plus one already queued to the loop
        assert isinstance(await asyncio.wait_for(queued.channel.get(), 5), JobCancelled)
        while not isinstance(event := await asyncio.wait_for(after.channel.get(), 5), JobFinished):
            pass
        assert time.perf_counter() - t0 < 2.0
        return event

    try:
        finished = asyncio.run(main())
    finally:
        worker.stop()
    assert finished.completion_tokens == 2
    assert not any(4 in c for c in session.prefill_calls)


def test_worker_survives_engine_failure():
    session = FakeSession(fail_on=666)
    worker = EngineWorker(session, lambda job: FakeGenerator(job)).start()
    try:
        bad, good = run_jobs(worker, [make_job("bad", [1, 666, 2]), make_job("good", [1, 2, 3])])
        assert isinstance(bad[-1], JobFailed) and bad[-1].status == 500 and bad[-1].code == "engine_error"
        assert "bad" in bad[-1].message and "boom" not in bad[-1].message     # the request id, not the exception
        assert isinstance(good[-1], JobFinished) and good[0].cached_tokens == 0
    finally:
        worker.stop()


def test_worker_stop_cancels_waiting_jobs():
    worker = EngineWorker(FakeSession(), lambda job: FakeGenerator(job))

    async def main():
        job = make_job("x", [1, 2], channel=EventChannel())
        worker.submit(job)
        worker.stop()
        assert job.cancel.is_set()
        assert isinstance(await asyncio.wait_for(job.channel.get(), 5), JobCancelled)

    asyncio.run(main())
    with pytest.raises(RuntimeError):
        worker.submit(make_job("y", [1]))


def test_metrics_render_prometheus():
    m = ServerMetrics()
    m.record_request("/v1/chat/completions", 200)
    m.record_prefill(10, 0.5, 4)
    m.record_decode(20, 2.0, 0.25)
    m.queue_depth = lambda: 3
    text = m.render()
    assert 'ds4cupy_requests_total{endpoint="/v1/chat/completions",status="200"} 1' in text
    assert "ds4cupy_prompt_tokens_total 14" in text and "ds4cupy_prompt_cached_tokens_total 4" in text
    assert 'ds4cupy_decode_tokens_per_second{scope="all"} 10' in text
    assert 'ds4cupy_prefill_tokens_per_second{scope="all"} 20' in text
    assert "ds4cupy_time_to_first_token_seconds_count 1" in text and "ds4cupy_queue_depth 3" in text
    for line in text.splitlines():
        assert line.startswith("#") or len(line.split(" ")) == 2
