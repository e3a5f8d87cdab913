"""server.prefill_pacing.PrefillPacer: chunk sizes paced to a duration (the server's default) or fixed, and the worker
prefilling in the pacer's chunks. Engines are simulated by a cost model t(n) = overhead + n / rate (the shape of a
GPU prefill: a fixed cost per call, then per token), on a fake clock: no real time, no sleeps."""
from __future__ import annotations

import asyncio

import pytest

from ds4cupy.server.prefill_pacing import DEFAULT_TARGET_S, PrefillPacer
from fake_sessions import TokenListSession


def run_pacer(pacer: PrefillPacer, overhead: float, rate: float, calls: int) -> list[tuple[int, float]]:
    out = []
    for _ in range(calls):
        n = pacer.size()
        t = overhead + n / rate
        pacer.observe(n, t)
        out.append((n, t))
    return out


def test_fixed_size_ignores_timing():
    p = PrefillPacer(300)
    assert not p.adaptive and p.size() == 300
    p.observe(300, 10.0)
    p.observe(300, 0.001)
    assert p.size() == 300 and "300 tokens" in p.describe()


@pytest.mark.parametrize("overhead,rate", [(0.02, 1_650.0), (0.005, 20_000.0), (0.05, 300.0), (0.0, 900.0)])
def test_paced_chunks_settle_near_the_target(overhead, rate):
    """From an H200's ~1,650 t/s to a slow ~300 t/s engine: after a few chunks every chunk takes about the target
    (within one 64-token step of it, or the size bound is reached), sizes are multiples of 64 within [64, 8192]."""
    p = PrefillPacer()
    assert p.adaptive and p.size() == 512
    trace = run_pacer(p, overhead, rate, 12)
    for n, _ in trace:
        assert 64 <= n <= 8192 and n % 64 == 0
    for n, t in trace[6:]:
        step = 64 / rate
        at_bound = n in (64, 8192)
        assert at_bound or abs(t - DEFAULT_TARGET_S) <= step + overhead, (n, t)


def test_faster_engine_larger_chunks_and_bounds():
    fast, slow = PrefillPacer(), PrefillPacer()
    run_pacer(fast, 0.0, 10_000.0, 8)
    run_pacer(slow, 0.0, 500.0, 8)
    assert fast.size() > slow.size()
    huge = PrefillPacer()
    run_pacer(huge, 0.0, 1e7, 4)
    assert huge.size() == 8192                   # largest
    tiny = PrefillPacer()
    run_pacer(tiny, 0.0, 10.0, 4)
    assert tiny.size() == 64                     # smallest


def test_short_tail_chunks_do_not_move_the_estimate():
    """The last piece of a prompt (a few tokens, mostly per-call overhead) is not a rate measurement."""
    p = PrefillPacer()
    run_pacer(p, 0.01, 2_000.0, 6)
    before = (p.size(), p.rate)
    p.observe(7, 0.05)                           # 140 t/s if taken at face value
    assert (p.size(), p.rate) == before
    p.observe(p.size(), 0.0)                     # no time measured: ignored too
    assert (p.size(), p.rate) == before


@pytest.mark.parametrize("kw,bad", [({"fixed": 0}, "0"), ({"target_s": 0.0}, "0.0"), ({"smallest": 8, "multiple": 64},
                                     "64, 8"), ({"initial": 10_000}, "10000"), ({"smoothing": 0.0}, "0.0")])
def test_bad_settings_are_named(kw, bad):
    with pytest.raises(ValueError, match=bad):
        PrefillPacer(**kw)


class ClockSession(TokenListSession):
    """A fake engine session whose prefill advances a fake clock by overhead + n / rate and records the chunk sizes."""

    def __init__(self, clock, overhead, rate):
        super().__init__()
        self.clock, self.overhead, self.rate, self.chunks = clock, overhead, rate, []

    def prefill(self, ids):
        self.chunks.append(len(ids))
        self.clock[0] += self.overhead + len(ids) / self.rate
        self.tokens += list(ids)
        return [0.0]

    def decode(self, token_id):
        self.tokens.append(token_id)
        return [0.0]


def test_worker_prefills_in_paced_chunks(monkeypatch):
    """The engine worker asks the pacer for each chunk's size and reports its timing: a 6,000-token prompt on a
    ~1,650 t/s engine goes in chunks that grow from 512 to ~0.4 s worth, every token exactly once, progress rising to
    the total."""
    from ds4cupy.server import worker as worker_mod
    from ds4cupy.server.protocol import SamplingFields
    from ds4cupy.server.worker import EngineWorker, EventChannel, GenerationJob, JobFinished, PrefillProgress

    clock = [0.0]
    monkeypatch.setattr(worker_mod.time, "perf_counter", lambda: clock[0])

    class OneToken:
        def __init__(self, job):
            self.completion_tokens = [7]

        def stream(self, session, logits):
            yield type("Delta", (), {"token_id": 7, "finish_reason": "stop", "content": "x"})()

    session = ClockSession(clock, 0.02, 1_650.0)
    pacer = PrefillPacer()
    worker = EngineWorker(session, OneToken, prefill_chunk=pacer).start()
    prompt = list(range(1, 6001))

    async def main():
        job = GenerationJob(request_id="p", prompt_ids=prompt, max_tokens=1, sampling=SamplingFields(),
                            channel=EventChannel())
        worker.submit(job)
        events = []
        while not isinstance(event := await asyncio.wait_for(job.channel.get(), 10), JobFinished):
            events.append(event)
        return events

    try:
        events = asyncio.run(main())
    finally:
        worker.stop()
    chunks = [n for n in session.chunks]
    assert sum(chunks) == len(prompt) and session.tokens[:len(prompt)] == prompt
    assert chunks[0] == 512 and max(chunks) > 512
    progress = [e.done for e in events if isinstance(e, PrefillProgress)]
    assert progress == sorted(progress) and progress[-1] == len(prompt)
    assert pacer.rate is not None and 1_000 < pacer.rate < 1_650
