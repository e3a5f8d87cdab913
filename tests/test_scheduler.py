"""The continuous-batching scheduler (server/scheduler.py) without HTTP: FIFO admission bounded by the batch, one token
per stream per tick (batched or in turn), prefill chunks interleaved with the running streams' decode steps,
cancellation, abort, failure and stop of one stream leaving the others intact, and the memory check of --max-batch.

Fake sessions (TokenListSession) make every step's "logits" a function of the session's whole token history and the
fake generator samples from them, so a stream whose step was run on another session, or twice, or skipped, generates
other tokens than the same job served alone. The real Generator on the tiny reference model checks cancellation end
to end (greedy: the same tokens as alone).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest

from ds4cupy.memory.sessions import SessionsFitError, check_sessions_fit, session_bytes
from ds4cupy.server import protocol
from ds4cupy.server.metrics import ServerMetrics
from ds4cupy.server.scheduler import BatchScheduler, StreamBatch, stream_batch
from ds4cupy.server.worker import (EngineWorker, EventChannel, GenerationJob, JobCancelled, JobFailed, JobFinished,
                                   JobStarted, PrefillProgress, TokenDelta, real_generator_factory)
from fake_sessions import TokenListSession

pytestmark = pytest.mark.usefixtures("one_blas_thread")

TIMEOUT = 30.0


# ------------------------------------------------------------------------------------------------------- fakes

def history_logits(tokens: list[int]) -> int:
    """The fake 'logits': a hash of the whole token history (the next token is derived from it)."""
    h = 17
    for t in tokens:
        h = (h * 31 + t + 1) % 1_000_003
    return h


class LogSession(TokenListSession):
    """Records every engine call in a shared log: ("prefill", name, ids) / ("decode", name). fail_on: a token id whose
    prefill raises."""

    def __init__(self, name: str, log: list, fail_on: int | None = None, step_sleep: float = 0.0):
        super().__init__()
        self.name, self.log, self.fail_on, self.step_sleep = name, log, fail_on, step_sleep

    def prefill(self, ids):
        if self.fail_on is not None and self.fail_on in ids:
            raise RuntimeError("boom")
        self.log.append(("prefill", self.name, tuple(int(t) for t in ids)))
        self.tokens.extend(int(t) for t in ids)
        return history_logits(self.tokens)

    def step(self, token_id):
        if self.step_sleep:
            time.sleep(self.step_sleep)
        self.tokens.append(int(token_id))
        return history_logits(self.tokens)

    def decode(self, token_id):
        self.log.append(("decode", self.name))
        return self.step(token_id)


def fake_decode_batch(log: list):
    def decode_batch(sessions, token_ids, temperatures=None):
        if 666 in token_ids:
            raise RuntimeError("batched boom")
        log.append(("batch", tuple(s.name for s in sessions)))
        return [s.step(t) for s, t in zip(sessions, token_ids)]
    return decode_batch


@dataclass
class Delta:
    token_id: int
    content: str = ""
    finish_reason: str | None = None


class HistoryGenerator:
    """max_tokens tokens, each derived from the logits of the step before; every token but the last is decoded (the
    Generator's contract)."""

    def __init__(self, job):
        self.job, self.completion_tokens = job, []

    def stream(self, session, logits):
        for i in range(self.job.max_tokens):
            token = 100 + logits % 900
            self.completion_tokens.append(token)
            last = i == self.job.max_tokens - 1
            yield Delta(token, f"{token} ", "length" if last else None)
            if not last:
                logits = session.decode(token)


def job(name, prompt, max_tokens=4, **kw) -> GenerationJob:
    return GenerationJob(request_id=name, prompt_ids=list(prompt), max_tokens=max_tokens,
                         sampling=protocol.SamplingFields(temperature=0.0), **kw)


def scheduler(n, log, *, batched=True, prefill_chunk=4, **kw) -> BatchScheduler:
    sessions = [LogSession(f"s{i}", log, **kw) for i in range(n)]
    batch = StreamBatch(sessions, fake_decode_batch(log) if batched else None, n)
    return BatchScheduler(batch, HistoryGenerator, prefill_chunk=prefill_chunk, metrics=ServerMetrics())


def run_jobs(worker, jobs, on_event=None):
    """Submit jobs (from an event loop), start the worker, collect every job's events to its terminal one.
    on_event(job, event) may act on events as they come (cancel a job); returns ({name: events}, positions)."""
    async def main():
        loop = asyncio.get_running_loop()
        positions = []
        for j in jobs:
            j.channel = EventChannel(loop)
            positions.append(worker.submit(j))
        worker.start()
        results = {}

        async def collect(j):
            events = []
            while True:
                event = await asyncio.wait_for(j.channel.get(), TIMEOUT)
                events.append(event)
                if on_event is not None:
                    on_event(j, event)
                if isinstance(event, (JobFinished, JobCancelled, JobFailed)):
                    results[j.request_id] = events
                    return
        await asyncio.gather(*(collect(j) for j in jobs))
        return results, positions
    try:
        return asyncio.run(main())
    finally:
        worker.stop()


def tokens_of(events) -> list[int]:
    return [e.delta.token_id for e in events if isinstance(e, TokenDelta)]


def alone(j: GenerationJob) -> list[int]:
    """The tokens of the job served alone by the single-stream worker."""
    log = []
    single = EngineWorker(LogSession("alone", log), HistoryGenerator, prefill_chunk=4)
    results, _ = run_jobs(single, [job(j.request_id, j.prompt_ids, j.max_tokens)])
    return tokens_of(results[j.request_id])


# ------------------------------------------------------------------------------------------------------ admission

def spy_admissions(worker) -> list:
    """The prompts of the jobs the worker starts (PrefixCache.prepare: where a job takes its session), in order."""
    started, prepare = [], worker.cache.prepare

    def spy(session, prompt, reuse=True):
        started.append((list(prompt), worker.running_count))
        return prepare(session, prompt, reuse=reuse)
    worker.cache.prepare = spy
    return started


def test_fifo_admission_bounded_by_the_batch():
    log = []
    worker = scheduler(2, log)
    started = spy_admissions(worker)
    jobs = [job(f"r{i}", [10 * i + 1, 10 * i + 2, 10 * i + 3], max_tokens=2 + i % 3) for i in range(6)]
    results, positions = run_jobs(worker, jobs)
    # two places: the first two start at once; each later one after the jobs ahead of it beyond the free place
    assert positions == [0, 0, 1, 2, 3, 4]
    assert [p for p, _ in started] == [j.prompt_ids for j in jobs]          # FIFO
    assert max(n for _, n in started) == 2                                  # never more than 2 at once
    assert any(n == 2 for _, n in started)                                  # and 2 did run together
    for j in jobs:
        events = results[j.request_id]
        assert isinstance(events[0], JobStarted) and isinstance(events[-1], JobFinished)
        assert tokens_of(events) == alone(j)
    assert worker.jobs_served == 6 and not worker.busy


def decode_order(log) -> list[str]:
    """The sessions of every decode step in the log, in order (a batched call's in its order)."""
    out = []
    for e in log:
        if e[0] == "batch":
            out.extend(e[1])
        elif e[0] == "decode":
            out.append(e[1])
    return out


def assert_round_robin(order: list[str]) -> None:
    """Fairness: between two consecutive steps of one stream, every other stream stepping both before and after
    them steps exactly once."""
    where: dict[str, list[int]] = {}
    for i, name in enumerate(order):
        where.setdefault(name, []).append(i)
    for x, xs in where.items():
        for i, j in zip(xs, xs[1:]):
            for y, ys in where.items():
                if y != x and ys[0] < i and ys[-1] > j:
                    n = sum(1 for k in ys if i < k < j)
                    assert n == 1, f"{y} stepped {n} times between two steps of {x} ({order})"


def test_a_conversation_continues_on_its_live_session():
    """Two conversations served together, then their next turns: each job takes the free session already holding its
    conversation (a live-prefix hit: nothing restored, nothing prefilled twice), whatever the order they come in."""
    log = []
    worker = scheduler(2, log)
    first = [job("x1", [1, 2, 3], 4), job("y1", [7, 8], 4)]
    results, _ = run_jobs(worker, first)
    held = {s.name: list(s.tokens) for s in worker.sessions}
    assert sorted(map(len, held.values())) == [5, 6]               # prompt + 3 of the 4 generated tokens
    x_tokens = [1, 2, 3] + tokens_of(results["x1"])
    y_tokens = [7, 8] + tokens_of(results["y1"])
    worker = BatchScheduler(StreamBatch(worker.sessions, fake_decode_batch(log), 2), HistoryGenerator,
                            prefill_chunk=4, cache=worker.cache)
    second = [job("y2", y_tokens + [50, 51], 3), job("x2", x_tokens + [60], 3)]
    hits = worker.cache.counts["hit_live"]
    log.clear()
    results, _ = run_jobs(worker, second)
    assert worker.cache.counts["hit_live"] == hits + 2
    assert results["y2"][0].cached_tokens == len(y_tokens) - 1 and results["x2"][0].cached_tokens == len(x_tokens) - 1
    prefilled: dict = {}
    for e in log:
        if e[0] == "prefill":
            prefilled[e[1]] = prefilled.get(e[1], ()) + e[2]
    assert prefilled == {next(n for n, t in held.items() if t[0] == 7): (y_tokens[-1], 50, 51),
                         next(n for n, t in held.items() if t[0] == 1): (x_tokens[-1], 60)}


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "in-turn"])
def test_every_stream_gets_one_token_per_tick(batched):
    """Three streams joining one after the other: every decode round advances every decoding stream exactly once,
    in one batched call or one call each in turn, and each answer is the one served alone."""
    log = []
    worker = scheduler(3, log, batched=batched, prefill_chunk=8)
    jobs = [job("a", [1, 2], 12), job("b", [3, 4, 5, 6, 7], 9), job("c", [8, 9], 6)]
    results, _ = run_jobs(worker, jobs)
    for j in jobs:
        assert tokens_of(results[j.request_id]) == alone(j)
    order = decode_order(log)
    assert [order.count(f"s{i}") for i in range(3)] == [11, 8, 5]      # max_tokens - 1 decodes each
    assert_round_robin(order)
    batches = [e[1] for e in log if e[0] == "batch"]
    if batched:
        assert ("s0", "s1", "s2") in batches and all(len(set(b)) == len(b) for b in batches)
        assert worker.metrics.decode_steps < 24
    else:
        assert not batches and worker.metrics.decode_steps == 24
    assert worker.metrics.decode_step_streams == 24


def test_round_robin_check_is_live():
    """assert_round_robin fails on an unfair order (one stream stepping twice while another waits)."""
    assert_round_robin(["s0", "s1", "s0", "s1", "s0"])
    with pytest.raises(AssertionError):
        assert_round_robin(["s0", "s1", "s0", "s0", "s1", "s0"])


def test_a_long_prefill_interleaves_with_running_streams():
    """A 40-token prompt arriving while a stream decodes is prefilled 4 tokens (one chunk) per decode step of the
    running stream: the running stream waits one chunk per token, never the whole prefill."""
    log = []
    # 1 ms a step keeps the open-ended stream from running tens of thousands of steps (each one costing its whole
    # history) while the event consumer catches up; the test asserts the order of calls, not their timing
    worker = scheduler(2, log, prefill_chunk=4, step_sleep=0.001)
    running = job("running", [7, 8, 9], max_tokens=100_000)
    late = job("late", list(range(200, 240)), max_tokens=3)

    async def main():
        loop = asyncio.get_running_loop()
        running.channel, late.channel = EventChannel(loop), EventChannel(loop)
        worker.submit(running)
        worker.start()
        out = {"running": [], "late": []}
        while not isinstance(event := await asyncio.wait_for(running.channel.get(), TIMEOUT), TokenDelta):
            out["running"].append(event)
        out["running"].append(event)
        worker.submit(late)
        while not isinstance(event := await asyncio.wait_for(late.channel.get(), TIMEOUT), JobFinished):
            out["late"].append(event)
        out["late"].append(event)
        running.cancel.set()
        while not isinstance(event := await asyncio.wait_for(running.channel.get(), TIMEOUT), JobCancelled):
            out["running"].append(event)
        return out
    try:
        results = asyncio.run(main())
    finally:
        worker.stop()
    late_chunks = [i for i, e in enumerate(log) if e[0] == "prefill" and e[2][0] >= 200]
    # the late prompt: a checkpoint at 39 (all but the last token) cuts it to 4-token chunks, then 3 + 1 tokens
    assert [len(log[i][2]) for i in late_chunks] == [4] * 9 + [3, 1]
    # between two decode steps of the running stream, at most one chunk's worth (4 tokens) of the late prompt
    gaps, n = [], 0
    for e in log[late_chunks[0]:late_chunks[-1] + 1]:
        if e == ("decode", "s0"):
            gaps.append(n)
            n = 0
        elif e[0] == "prefill":
            n += len(e[2])
        else:
            raise AssertionError(f"unexpected step {e}")
    gaps.append(n)
    assert gaps == [4] * 10, gaps
    progress = [e.done for e in results["late"] if isinstance(e, PrefillProgress)]
    assert progress == [4, 8, 12, 16, 20, 24, 28, 32, 36, 39, 40]
    assert tokens_of(results["late"]) == alone(late)
    got = tokens_of(results["running"])
    assert len(got) > 11 and got == alone(job("running", running.prompt_ids, len(got)))


# ------------------------------------------------------------------------------------------- leaving the batch

class LeavesAfter(HistoryGenerator):
    """The client of job `leaver` goes away right after its 3rd token (the flag set where the worker runs, so the
    moment is exact)."""

    def stream(self, session, logits):
        for i, delta in enumerate(super().stream(session, logits)):
            if self.job.request_id.startswith("leaver") and i == 2:
                self.job.cancel.set()
            yield delta


class Poison(HistoryGenerator):
    """Job `poison` hands the scheduler token 666 as its 6th (the fake batched step raises on it)."""

    def stream(self, session, logits):
        for i, delta in enumerate(super().stream(session, logits)):
            if self.job.request_id == "poison" and i == 5:
                delta.token_id = 666
            yield delta


def test_cancelling_one_stream_leaves_the_others_intact():
    log = []
    sessions = [LogSession(f"s{i}", log) for i in range(3)]
    worker = BatchScheduler(StreamBatch(sessions, fake_decode_batch(log), 3), LeavesAfter, prefill_chunk=4)
    jobs = [job("a", [1, 2, 3], 8), job("leaver", [4, 5], 30), job("c", [6], 8), job("d", [7, 8], 5)]
    results, _ = run_jobs(worker, jobs)
    gone = results["leaver"]
    assert isinstance(gone[-1], JobCancelled) and gone[-1].completion_tokens == 3
    assert tokens_of(gone) == alone(jobs[1])[:3]
    for j in (jobs[0], jobs[2], jobs[3]):          # d took the leaver's place
        assert isinstance(results[j.request_id][-1], JobFinished)
        assert tokens_of(results[j.request_id]) == alone(j)


def test_a_failing_stream_fails_alone():
    """An engine error in one stream's prefill fails that request (500); one in a batched step fails that step's
    streams; the others finish with their own answers and the server goes on."""
    log = []
    worker = scheduler(3, log, fail_on=99)
    jobs = [job("ok1", [1, 2], 5), job("bad", [3, 99, 4], 5), job("ok2", [5, 6], 5)]
    results, _ = run_jobs(worker, jobs)
    assert isinstance(results["bad"][-1], JobFailed) and results["bad"][-1].status == 500
    assert "bad" in results["bad"][-1].message
    for j in (jobs[0], jobs[2]):
        assert tokens_of(results[j.request_id]) == alone(j)

    log = []
    sessions = [LogSession(f"s{i}", log) for i in range(2)]
    worker = BatchScheduler(StreamBatch(sessions, fake_decode_batch(log), 2), Poison, prefill_chunk=4)
    jobs = [job("poison", [1, 2], 8), job("ok", [3, 4], 8), job("later", [5, 6], 3)]
    results, _ = run_jobs(worker, jobs)
    assert isinstance(results["poison"][-1], JobFailed) and isinstance(results["ok"][-1], JobFailed)
    assert results["ok"][-1].status == 500 and sessions[1].tokens == [] and sessions[0].tokens[:2] == [5, 6]
    assert tokens_of(results["later"]) == alone(jobs[2])


def test_stop_and_abort_end_every_stream():
    # the abort comes from inside the third batched step (the worker thread), not from the event consumer: a consumer
    # under load can fall so far behind that both 10,000-token streams have ended before it sees their 6th token
    log = []
    base = fake_decode_batch(log)
    state = {"steps": 0, "aborted": None}

    def decode_batch(sessions, token_ids, temperatures=None):
        state["steps"] += 1
        if state["steps"] == 3:
            state["aborted"] = worker.abort_running("the server is shutting down")
            worker.fail_pending("the server is shutting down")
        return base(sessions, token_ids, temperatures)
    sessions = [LogSession(f"s{i}", log) for i in range(2)]
    worker = BatchScheduler(StreamBatch(sessions, decode_batch, 2), HistoryGenerator, prefill_chunk=4,
                            metrics=ServerMetrics())
    jobs = [job("a", [1], 10_000), job("b", [2], 10_000), job("queued", [3], 5)]
    results, _ = run_jobs(worker, jobs)
    assert state["aborted"] is True
    for name in ("a", "b", "queued"):
        end = results[name][-1]
        assert isinstance(end, JobFailed) and end.status == 503 and end.code == "server_shutting_down", name
    assert not any(e[2] == (3,) for e in log if e[0] == "prefill")

    worker = scheduler(2, [], step_sleep=0.001)      # 10,000 steps take >= 10 s: the stop always comes first

    async def main():
        loop = asyncio.get_running_loop()
        js = [job(n, [i + 1], 10_000, channel=EventChannel(loop)) for i, n in enumerate("xyz")]
        for j in js:
            worker.submit(j)
        worker.start()
        while not isinstance(await asyncio.wait_for(js[0].channel.get(), TIMEOUT), TokenDelta):
            pass
        await asyncio.get_running_loop().run_in_executor(None, worker.stop)
        for j in js:
            while not isinstance(event := await asyncio.wait_for(j.channel.get(), TIMEOUT), JobCancelled):
                assert not isinstance(event, (JobFinished, JobFailed))
    asyncio.run(main())
    assert not worker.alive


# ------------------------------------------------------------------------------------------- the real engine

def test_reference_streams_cancel_one_keep_the_others_greedy(tiny_reference_model, rng):
    """Three greedy streams on the tiny reference model, batched (max_decode_batch covers them): one is cancelled
    after 3 tokens; the other two generate exactly what they generate alone on the single-stream worker."""
    model = tiny_reference_model
    make = real_generator_factory(model.tokenizer)
    prompts = [[int(t) for t in rng.integers(0, model.config.n_vocab, n)] for n in (9, 23, 14)]
    jobs = [job(f"j{i}", p, 8) for i, p in enumerate(prompts)]
    jobs[1].max_tokens = 40
    want = {}
    single = EngineWorker(model.new_session(128), make, prefill_chunk=8)
    results, _ = run_jobs(single, [job(j.request_id, j.prompt_ids, j.max_tokens) for j in jobs])
    for j in jobs:
        want[j.request_id] = tokens_of(results[j.request_id])
    batch = StreamBatch([model.new_session(128) for _ in range(3)], model.decode_batch, model.max_decode_batch)
    metrics = ServerMetrics()
    worker = BatchScheduler(batch, make, prefill_chunk=8, metrics=metrics)
    count = {"n": 0}

    def cancel_j1(j, event):
        if j.request_id == "j1" and isinstance(event, TokenDelta):
            count["n"] += 1
            if count["n"] == 3:
                j.cancel.set()
    results, _ = run_jobs(worker, jobs, on_event=cancel_j1)
    assert isinstance(results["j1"][-1], JobCancelled)
    got = tokens_of(results["j1"])
    assert 3 <= len(got) < 40 and got == want["j1"][:len(got)]
    for name in ("j0", "j2"):
        assert isinstance(results[name][-1], JobFinished)
        assert tokens_of(results[name]) == want[name] and len(want[name]) == 8
    assert metrics.decode_step_streams > metrics.decode_steps        # streams were advanced together


# ---------------------------------------------------------------------------------------------------- memory

def test_sessions_fit_check_names_the_numbers(tiny_reference_model):
    cfg = tiny_reference_model.config
    ctx = 4096
    per = session_bytes(cfg, ctx, "cuda")
    reserve = 1 << 30
    free = reserve + 3 * per + per // 2           # room for 3 more sessions beside the first
    assert check_sessions_fit(cfg, ctx, 4, "cuda", free) == 3 * per
    with pytest.raises(SessionsFitError) as info:
        check_sessions_fit(cfg, ctx, 6, "cuda", free)
    msg = str(info.value)
    assert "--max-batch 6 needs 6 sessions of 4096 tokens" in msg and "5 more than the first" in msg
    assert "--max-batch 4 at this context" in msg and "kept in reserve" in msg
    ctx_fit = int(msg.rsplit("--ctx ", 1)[1].split()[0])
    assert ctx_fit % 1024 == 0 and 0 < ctx_fit < ctx
    check_sessions_fit(cfg, ctx_fit, 6, "cuda", free)                 # the suggestion fits
    # host memory (reference): no reserve, no scratch
    host = session_bytes(cfg, ctx, "reference")
    assert host < per
    assert check_sessions_fit(cfg, ctx, 2, "reference", host) == host
    with pytest.raises(SessionsFitError, match="of host memory is free"):
        check_sessions_fit(cfg, ctx, 3, "reference", host)
    # the CUDA engine's packed indexer rows (INDEXER_FP4, QAT on) make a session smaller by exactly those rows
    from ds4cupy.engines.numerics import fp4_row_bytes
    from ds4cupy.memory.budget import kv_layout
    packed = session_bytes(cfg, ctx, "cuda", index_fp4=True)
    rows = sum(b.shape[0] for b in kv_layout(cfg, ctx) if b.name == "index")
    assert rows > 0 and per - packed == rows * (4 * cfg.indexer_head_dim - fp4_row_bytes(cfg.indexer_head_dim))
    assert check_sessions_fit(cfg, ctx, 4, "cuda", reserve + 3 * packed, index_fp4=True) == 3 * packed


def test_stream_batch_for_the_server(tiny_reference_model):
    model = tiny_reference_model
    first = model.new_session(256)
    assert stream_batch(model, first, 256, 1) is None
    batch = stream_batch(model, first, 256, 4, free_bytes=1 << 40)
    assert batch.sessions[0] is first and len(batch.sessions) == 4 and len({id(s) for s in batch.sessions}) == 4
    assert all(s.ctx == 256 for s in batch.sessions) and batch.step_size == 4
    assert batch.decode_batch == model.decode_batch
    with pytest.raises(SystemExit, match=r"--max-batch 4 needs 4 sessions of 256 tokens.*Fits: --max-batch 2"):
        stream_batch(model, first, 256, 4, free_bytes=int(session_bytes(model.config, 256, "reference") * 1.5))
    with pytest.raises(SystemExit, match="--max-batch must be >= 1, got 0"):
        stream_batch(model, first, 256, 0)
