"""Continuous batching: up to N requests served at once, each on its own session of one model (`serve --max-batch N`).

`BatchScheduler` is an `EngineWorker` (the same FIFO queue, events, cancellation, refusal and abort controls) whose
thread runs a loop of ticks instead of one job at a time. A tick:

1. admits waiting jobs in arrival order (FIFO) while fewer than N streams run, each onto a free session: the one whose
   live tokens give the job the longest cached prefix (`PrefixCache.plan`), which the cache then continues, restores
   or resets as the single-stream worker does;
2. ends the streams whose job was cancelled (the client left, the server aborted it, the precheck failed) before they
   take another step: the other streams go on untouched;
3. prefills at most one chunk's worth of prompt tokens (the worker's PrefillPacer: a fixed count, or paced to
   ~0.4 s a chunk), to the streams still prefilling in admission order (a call ends at a checkpoint position or
   where the tokens run out; several short prompts may share a tick), so a long prompt delays the running streams
   by one chunk per token they generate, never by its whole prefill; when a prompt is in, its generator samples the first token from the prefill's logits and the stream
   joins the decoding batch;
4. advances every decoding stream by one token: in groups of at most the backend's `max_decode_batch`, one
   `decode_batch` call per group (the weights are read once for the group); with max_decode_batch 1 (a backend
   without a batched step) each stream steps in turn, which is still continuous, fair scheduling, without the
   shared weight reads. Every stream gets exactly one token per tick (fairness), in admission order.

Streams leave when their generator finishes (the state is checkpointed into the prefix cache, as in the single
worker) or when they are cancelled; their session is then free for the next job.

The generators are the single worker's (`make_generator(job).stream(session, logits)`): a stream's generator sees a
`StepSession` whose decode / decode_top hand over the result of the batched step the scheduler already ran for the
token the generator's last delta sampled (`delta.token_id`, the token the Generator decodes next), and forward to the
real session when no step was run for it (groups of one). The sampled ids are therefore those of the same request
served alone whenever the batched step gives the same logits (engines/contract.py; the reference backend's do, bit
for bit).

An engine exception in a prefill chunk or a single step fails that stream; one in a batched step fails the streams
of that group (their sessions are reset); the others and the server go on.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..text.candidates import TopCandidates, top_candidates
from .worker import (MODEL_FILE_CHANGED, EngineWorker, GenerationJob, JobFailed, JobFinished, JobStarted,
                     PrefillProgress, TokenDelta)

log = logging.getLogger("ds4cupy.server")


@dataclass
class StreamBatch:
    """What the scheduler serves streams on: one session per concurrent stream (N = len(sessions), the first is the
    single-stream server's), and the model's batched decode step (engines/contract.py: decode_batch(sessions,
    token_ids, temperatures) -> logits rows / TopCandidates) with the most sessions one call takes; decode_batch
    None or max_decode_batch 1: the streams step one at a time, in turn."""
    sessions: list
    decode_batch: Callable[..., list] | None = None
    max_decode_batch: int = 1

    def __post_init__(self):
        if not self.sessions:
            raise ValueError("a stream batch needs at least one session")
        if len({id(s) for s in self.sessions}) != len(self.sessions):
            raise ValueError("every stream needs its own session: a session appears twice")
        if self.max_decode_batch < 1:
            raise ValueError(f"max_decode_batch must be >= 1, got {self.max_decode_batch}")

    @property
    def step_size(self) -> int:
        """Streams advanced by one decode call."""
        return 1 if self.decode_batch is None else max(1, min(self.max_decode_batch, len(self.sessions)))


class StepSession:
    """A stream's session as its generator sees it: the real session, except that decode / decode_top return the
    result of the batched step the scheduler already ran for that token (`hand_over`) instead of stepping again."""

    def __init__(self, session):
        self._session = session
        self._ready: tuple[int, Any] | None = None

    def __getattr__(self, name):
        return getattr(self._session, name)

    def hand_over(self, token_id: int, result: Any) -> None:
        """The session already consumed `token_id` in a batched step; `result` is that step's row or candidates."""
        self._ready = (int(token_id), result)

    def _take(self, token_id: int) -> Any:
        ready, self._ready = self._ready, None
        if ready is None:
            return None
        if ready[0] != int(token_id):
            raise RuntimeError(f"the generator decoded token {token_id}, but the batched step consumed {ready[0]} "
                               f"(a generator must decode the token of its last delta)")
        return ready[1]

    def decode(self, token_id: int):
        ready = self._take(token_id)
        if ready is None:
            return self._session.decode(token_id)
        return ready.logits() if isinstance(ready, TopCandidates) else ready

    def decode_top(self, token_id: int, temperature: float) -> TopCandidates:
        ready = self._take(token_id)
        if ready is None:
            return self._session.decode_top(token_id, temperature)
        if isinstance(ready, TopCandidates) and ready.temperature == temperature:
            return ready
        row = ready.logits() if isinstance(ready, TopCandidates) else ready
        return top_candidates(row, temperature, fetch_logits=lambda: row)


class Stream:
    """One job being served: its session, its prefill progress, then its generator."""

    def __init__(self, job: GenerationJob, session):
        self.job, self.session = job, session
        self.view = StepSession(session)
        self.admitted = time.perf_counter()
        self.prompt = list(job.prompt_ids)
        self.cached = 0
        self.position = 0                  # prompt tokens in the session
        self.points: list[int] = []        # where prefill calls end: checkpoint positions, then the prompt's end
        self.prefill_s = 0.0               # engine time of this stream's prefill (prepare and chunks)
        self.logits = None                 # the last prefill chunk's logits
        self.generator = None
        self.deltas = None                 # the generator's stream once the prompt is in
        self.next_token: int | None = None   # the token the next decode step consumes
        self.decode_started = 0.0
        self.ttft: float | None = None
        self.n_deltas = 0
        self.ended = False                 # its last event went out

    @property
    def prefilling(self) -> bool:
        return self.deltas is None

    def close(self) -> None:
        close = getattr(self.deltas, "close", None)
        if close is not None:
            close()


class BatchScheduler(EngineWorker):
    """Up to len(batch.sessions) jobs at once (module docstring); the event-loop side is EngineWorker's."""

    def __init__(self, batch: StreamBatch, make_generator, *, metrics=None, **kw):
        super().__init__(batch.sessions[0], make_generator, metrics=metrics, **kw)
        self.batch = batch
        self.sessions = list(batch.sessions)
        self.max_batch = len(self.sessions)
        self._streams: list[Stream] = []

    # ----------------------------------------------------------------------------------------------- the loop

    def _run(self) -> None:
        while True:
            admitted = self._admit()
            if admitted is None:
                return
            for stream in admitted:
                self._start(stream)
            self._drop_stopped()
            self._prefill_step()
            self._decode_step()

    def _admit(self) -> list[Stream] | None:
        """Wait for work; take waiting jobs FIFO onto free sessions. None: stopping with nothing left to end."""
        with self._cond:
            while not self._streams and not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping and not self._streams:
                return None
            admitted = []
            while self._pending and len(self._streams) < self.max_batch and not self._stopping:
                job = self._pending.popleft()
                stream = Stream(job, self._free_session(job))
                self._streams.append(stream)
                self._running.append(job)
                admitted.append(stream)
            return admitted

    def _free_session(self, job: GenerationJob):
        """The free session from which the job reuses the most prompt tokens, one that holds them live before one
        that would restore them (ties: the first); hold self._cond."""
        busy = {id(s.session) for s in self._streams}
        free = [s for s in self.sessions if id(s) not in busy]
        if job.controls is not None and not job.controls.cache_prompt:
            return free[0]

        def reuse(session):
            plan = self.cache.plan(list(session.tokens), job.prompt_ids)
            return plan.cached, plan.action == "live"
        return max(free, key=reuse)

    def _release(self, stream: Stream) -> None:
        """The stream's last event went out: its session is free."""
        stream.close()
        stream.ended = True
        with self._cond:
            self._streams.remove(stream)
            self._running.remove(stream.job)
            self.jobs_served += 1
            self._cond.notify_all()

    def _fail(self, stream: Stream) -> None:
        """The engine raised while serving the stream: report it, reset its session, keep serving the others."""
        job = stream.job
        log.exception("request %s failed in the engine", job.request_id)
        self._forget_session_state(stream.session)
        job.emit(JobFailed(f"the engine failed while serving request {job.request_id}; the details are in the server "
                           f"log"))
        self._release(stream)

    # ---------------------------------------------------------------------------------------------- one stream

    def _start(self, stream: Stream) -> None:
        """Bring the stream's session to the longest cached prefix of its prompt (or refuse / skip the job)."""
        job = stream.job
        problem = self._problem()
        if job.cancel.is_set():
            log.info("request %s cancelled while queued", job.request_id)
            self._emit_cancelled(job, 0, stream.session)
            self._release(stream)
            return
        if problem is not None:
            log.warning("request %s refused: %s", job.request_id, problem)
            self._forget_session_state(stream.session)
            job.emit(JobFailed(problem, 503, MODEL_FILE_CHANGED))
            self._release(stream)
            return
        try:
            reuse = job.controls is None or job.controls.cache_prompt
            plan = self.cache.prepare(stream.session, stream.prompt, reuse=reuse)
        except Exception:        # noqa: BLE001
            self._fail(stream)
            return
        stream.cached = stream.position = plan.cached
        stream.points = self.cache.checkpoint_positions(plan.cached, len(stream.prompt), job.checkpoints)
        stream.points.append(len(stream.prompt))
        stream.prefill_s = time.perf_counter() - stream.admitted
        wait = stream.admitted - job.enqueued_at
        job.emit(JobStarted(prompt_tokens=len(stream.prompt), cached_tokens=plan.cached, queue_wait_s=wait))
        log.info("request %s started after %.3f s in queue: %d prompt tokens, %d reused (%s), %d streams running",
                 job.request_id, wait, len(stream.prompt), plan.cached, plan.source, len(self._streams))

    def _drop_stopped(self) -> None:
        """End every stream whose job must stop now (cancelled, aborted, or the precheck fails)."""
        if not self._streams:
            return
        problem = self._problem()
        for stream in list(self._streams):
            job = stream.job
            if problem is not None and not job.cancel.is_set():
                job.abort = (problem, MODEL_FILE_CHANGED)
                job.cancel.set()
            if not job.cancel.is_set():
                continue
            produced = self._completion_tokens(stream)
            if stream.prefilling:
                log.info("request %s cancelled during prefill", job.request_id)
                self._record_prefill(stream)
            else:
                log.info("request %s cancelled after %d tokens", job.request_id, produced)
                self._record_decode(stream, produced)
            self._emit_cancelled(job, produced if not stream.prefilling else 0, stream.session)
            self._release(stream)

    def _prefill_step(self) -> None:
        """Up to one chunk's worth of prompt tokens (the pacer's size) this tick, to the streams still prefilling in admission order (one call
        ends at a checkpoint position or where the tokens run out); a stream whose prompt is in samples its first
        token and joins the decoding streams."""
        budget = self.pacer.size()
        for stream in [s for s in self._streams if s.prefilling]:
            while budget > 0 and stream.prefilling and not stream.ended:
                budget -= self._prefill_call(stream, budget)
            if budget <= 0:
                return

    def _prefill_call(self, stream: Stream, budget: int) -> int:
        """One prefill call of at most `budget` tokens for the stream; returns the tokens it took (0: it failed)."""
        job = stream.job
        end = min(stream.position + budget, stream.points[0])
        try:
            t0 = time.perf_counter()
            stream.logits = stream.session.prefill(stream.prompt[stream.position:end])
            dt = time.perf_counter() - t0
            taken, stream.position = end - stream.position, end
            self.cache.observe_prefill(taken, dt)
            self.pacer.observe(taken, dt)
            stream.prefill_s += dt
            job.emit(PrefillProgress(end - stream.cached, len(stream.prompt) - stream.cached))
            if end < stream.points[0]:
                return taken
            stream.points.pop(0)
            if stream.points:
                t0 = time.perf_counter()
                self._checkpoint(stream.session)
                stream.prefill_s += time.perf_counter() - t0
                return taken
            self._record_prefill(stream)
            stream.generator = self.make_generator(job)
            stream.decode_started = time.perf_counter()
            stream.deltas = stream.generator.stream(stream.view, stream.logits)
            stream.logits = None
            self._advance(stream)             # the first token, from the prefill's logits
            return taken
        except Exception:        # noqa: BLE001
            self._fail(stream)
            return 0

    def _decode_step(self) -> None:
        """Every decoding stream one token further: batched steps of at most step_size streams each."""
        ready = [s for s in self._streams if s.next_token is not None]
        size = self.batch.step_size
        for i in range(0, len(ready), size):
            group = ready[i:i + size]
            if len(group) > 1:
                if not self._batched_step(group):
                    continue
            elif self.metrics is not None:
                self.metrics.record_decode_step(1)
            for stream in group:
                try:
                    self._advance(stream)
                except Exception:        # noqa: BLE001
                    self._fail(stream)

    def _batched_step(self, group: list[Stream]) -> bool:
        """One decode_batch call for the group; its results go to the streams' views. False: it failed (the group's
        streams are failed)."""
        temps = []
        for s in group:
            fast = bool(getattr(s.generator, "fast_path", False))
            params = getattr(s.generator, "params", None)
            temps.append(params.temperature if fast and params is not None else None)
        try:
            results = self.batch.decode_batch([s.session for s in group], [s.next_token for s in group],
                                              temps if any(t is not None for t in temps) else None)
        except Exception:        # noqa: BLE001
            for s in group:
                self._fail(s)
            return False
        for s, result in zip(group, results):
            s.view.hand_over(s.next_token, result)
        if self.metrics is not None:
            self.metrics.record_decode_step(len(group))
        return True

    def _advance(self, stream: Stream) -> None:
        """The stream's next delta (its generator decodes the pending token, if any, then samples): emitted; at the
        end, the stream finishes."""
        stream.next_token = None
        delta = next(stream.deltas, None)
        job = stream.job
        if delta is None:                         # a generator that ended without saying why
            self._finish(stream, "stop")
            return
        stream.n_deltas += 1
        if stream.ttft is None:
            stream.ttft = time.perf_counter() - job.enqueued_at
        job.emit(TokenDelta(delta))
        finish = getattr(delta, "finish_reason", None)
        if finish:
            self._finish(stream, finish)
        else:
            stream.next_token = int(delta.token_id)

    def _finish(self, stream: Stream, finish_reason: str) -> None:
        job = stream.job
        produced = self._completion_tokens(stream)
        decode_s = self._record_decode(stream, produced)
        log.info("request %s finished (%s): %d tokens in %.3f s", job.request_id, finish_reason, produced, decode_s)
        job.emit(JobFinished(finish_reason=finish_reason, prompt_tokens=len(stream.prompt), completion_tokens=produced,
                             cached_tokens=stream.cached, prefill_s=stream.prefill_s, decode_s=decode_s,
                             ttft_s=stream.ttft, stop_string=getattr(stream.generator, "stop_string", None)))
        stream.close()
        self._checkpoint(stream.session)       # the request's end: its conversation's next turn continues here
        self._release(stream)

    # ------------------------------------------------------------------------------------------------ metrics

    @staticmethod
    def _completion_tokens(stream: Stream) -> int:
        produced = getattr(stream.generator, "completion_tokens", stream.n_deltas)
        return len(produced) if isinstance(produced, (list, tuple)) else int(produced)

    def _record_prefill(self, stream: Stream) -> None:
        if self.metrics is not None:
            self.metrics.record_prefill(stream.position - stream.cached, stream.prefill_s, stream.cached)

    def _record_decode(self, stream: Stream, produced: int) -> float:
        """The stream's decode time (wall clock since its prompt was in: the streams it shared the engine with
        included); recorded in the metrics."""
        decode_s = time.perf_counter() - stream.decode_started
        if self.metrics is not None:
            self.metrics.record_decode(produced, decode_s, stream.ttft)
        return decode_s


def stream_batch(model, session, ctx: int, max_batch: int, free_bytes: int | None = None) -> StreamBatch | None:
    """The StreamBatch for `serve --max-batch N`: `session` plus N - 1 more sessions of `ctx` tokens, after checking
    that they fit (memory.sessions.check_sessions_fit: GPU memory on the cuda backend, host memory on the reference
    one; `free_bytes` overrides what is measured). None for N = 1 (the single-stream worker)."""
    if max_batch < 1:
        raise SystemExit(f"ds4cupy serve: --max-batch must be >= 1, got {max_batch}")
    if max_batch == 1:
        return None
    from ..memory.sessions import SessionsFitError, check_sessions_fit, free_for_sessions
    try:
        index_fp4 = bool(getattr(getattr(model, "_impl", None), "indexer_fp4", False))   # the CUDA engine's choice
        check_sessions_fit(model.config, ctx, max_batch, model.backend,
                           free_for_sessions(model.backend) if free_bytes is None else free_bytes,
                           index_fp4=index_fp4)
    except SessionsFitError as e:
        raise SystemExit(f"ds4cupy serve: {e}") from None
    sessions = [session] + [model.new_session(ctx=ctx) for _ in range(max_batch - 1)]
    n = model.max_decode_batch
    return StreamBatch(sessions, model.decode_batch if n > 1 else None, n)
