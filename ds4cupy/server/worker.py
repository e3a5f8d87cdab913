"""The engine worker: one thread owns the one session; requests wait in a FIFO queue.

The event loop never touches the session. A request handler builds a `GenerationJob` (prompt token ids, sampling,
limits) and `EngineWorker.submit`s it; the worker thread takes jobs strictly in arrival order and, per job:

1. brings the session to the longest cached prefix of the prompt (`PrefixCache.prepare`): the live session when
   its tokens are a prefix, else the stored state that shares the most tokens (several conversations are kept, in
   memory and optionally on disk), else a reset (always for a job whose controls say cache_prompt=false);
2. prefills the rest of the prompt in chunks (server.prefill_pacing: a fixed size, or paced to a duration), checking
   the job's cancel flag and reporting progress between chunks
   (the handler turns progress and silence into SSE keepalive comments), storing checkpoints on the way (every
   `cache.interval` tokens, where the last user turn starts, all of the prompt but its last token);
3. streams the Generator's deltas, checking the cancel flag after every token, and stores the state the request
   ends with (prompt and generated tokens), which the conversation's next request usually continues.

Events go back to the request's asyncio loop through `EventChannel` (loop.call_soon_threadsafe into an asyncio.Queue).
A client that goes away sets `job.cancel`; a job cancelled while still queued is skipped without touching the session.

The server can also refuse or cut off jobs with a 503 `JobFailed`: `refuse_new` (shutting down: jobs submitted from then
on fail at once), `fail_pending` (queued jobs), `abort_running` (the running job stops within a token), and the
`precheck` callable, asked before each job and between prefill chunks and tokens (the model file changed under an
mmap'd session). An engine exception is a 500 `JobFailed` with a generic message naming the request id; the details go
to the log.

`serve --max-batch N` (N > 1) serves up to N jobs at once with `server.scheduler.BatchScheduler`, a subclass that keeps
this queue, these events and these controls and replaces the one-job-at-a-time loop.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from .prefill_pacing import PrefillPacer
from .prefix_cache import PrefixCache

log = logging.getLogger("ds4cupy.server")

DEFAULT_PREFILL_CHUNK = 512


# ----------------------------------------------------------------------------------------------------------- events

@dataclass
class JobStarted:
    """The worker took the job: how many prompt tokens came from the live KV, and how long the job waited."""
    prompt_tokens: int
    cached_tokens: int
    queue_wait_s: float


@dataclass
class PrefillProgress:
    """`done` of `total` new prompt tokens prefilled (sent after every chunk)."""
    done: int
    total: int


@dataclass
class TokenDelta:
    """One Generator delta: token_id, reasoning, content, tool_calls, finish_reason."""
    delta: Any


@dataclass
class JobFinished:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    prefill_s: float
    decode_s: float
    ttft_s: float | None
    stop_string: str | None = None      # the stop string that ended the generation, if one did


@dataclass
class JobCancelled:
    """The client went away; the worker stopped within one token (or before starting)."""
    completion_tokens: int


@dataclass
class JobFailed:
    """The job did not complete. status 500 (code engine_error): the engine raised; the session was reset and the
    server keeps serving. status 503: the job was refused or cut off (server shutting down, model file changed).
    `message` is what the client is told."""
    message: str
    status: int = 500
    code: str = "engine_error"


SHUTTING_DOWN = "server_shutting_down"
MODEL_FILE_CHANGED = "model_file_changed"


class EventChannel:
    """Carries events from the worker thread to one request's event loop, in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self.loop = loop or asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, event: Any) -> None:
        """Called from the worker thread; a closed loop (server shutting down) drops the event."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:
            pass

    async def get(self, timeout: float | None = None) -> Any:
        """The next event, or None after `timeout` seconds of silence."""
        if timeout is None:
            return await self.queue.get()
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None


# -------------------------------------------------------------------------------------------------------------- job

@dataclass
class GenerationJob:
    """One request's work for the engine: already validated and tokenized (bad input never gets here)."""
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: Any                       # protocol.SamplingFields (temperature, top_p, top_k, min_p, seed)
    stop: list[str] = field(default_factory=list)
    thinking: bool = False              # the prompt ends with <think>: text up to </think> is reasoning
    parse_tools: bool = False
    # prompt positions worth a snapshot besides the last one (e.g. where the last user turn starts: a retried or
    # edited last turn then reuses everything before it)
    checkpoints: list[int] = field(default_factory=list)
    controls: Any = None                # controls.GenerationControls (logprobs, penalties, ...); None: defaults
    grammar: str | None = None          # a grammar the output must follow (already checked to compile)
    channel: EventChannel | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)
    abort: tuple[str, str] | None = None     # (message, code) when the server, not the client, cancelled the job

    def emit(self, event: Any) -> None:
        if self.channel is not None:
            self.channel.put(event)


class SessionLike(Protocol):
    """The slice of the engine Session contract the worker uses (docs/ARCHITECTURE.md)."""
    tokens: list[int]
    n_tokens: int

    def prefill(self, ids: list[int]) -> Any: ...
    def snapshot(self, since: int = 0) -> Any: ...          # a ds4cupy.engines.state.SessionState
    def restore(self, state: Any) -> None: ...
    def reset(self) -> None: ...


# job -> object with .stream(session, logits) yielding deltas and .completion_tokens (the generated ids)
GeneratorFactory = Callable[[GenerationJob], Any]


def real_generator_factory(tokenizer) -> GeneratorFactory:
    """Build ds4cupy.text.generate.Generator objects for jobs (imported lazily so the protocol tests need no engine)."""
    from ..text.generate import Generator
    from ..text.sampling import SamplingParams

    def make(job: GenerationJob):
        s = job.sampling
        params = SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, min_p=s.min_p, seed=s.seed)
        c = job.controls
        extra = {} if c is None else {"adjust": c.adjust, "logprobs": c.logprobs, "ignore_eos": c.ignore_eos}
        if job.grammar is not None:
            from ..text.constraints import Constraint
            extra["constraint"] = Constraint(tokenizer, job.grammar)
        return Generator(tokenizer, params, max_tokens=job.max_tokens, stop=list(job.stop), thinking=job.thinking,
                         parse_tools=job.parse_tools, **extra)
    return make


# ----------------------------------------------------------------------------------------------------------- worker

class EngineWorker:
    """The single engine session thread and its FIFO queue (server.scheduler.BatchScheduler: several streams)."""

    max_batch = 1                             # streams served at once

    def __init__(self, session: SessionLike, make_generator: GeneratorFactory, *, metrics=None,
                 prefill_chunk: int | PrefillPacer = DEFAULT_PREFILL_CHUNK, cache: PrefixCache | None = None,
                 name: str = "ds4cupy-engine", precheck: Callable[[], str | None] | None = None):
        self.session = session
        self.precheck = precheck              # () -> why the engine cannot serve now (503), or None
        self.make_generator = make_generator
        self.metrics = metrics
        # tokens a prefill call: a fixed count, or a PrefillPacer sizing each chunk to a target duration
        self.pacer = prefill_chunk if isinstance(prefill_chunk, PrefillPacer) else PrefillPacer(max(1, int(prefill_chunk)))
        self._pending: collections.deque[GenerationJob] = collections.deque()
        self._cond = threading.Condition()
        self._running: list[GenerationJob] = []    # the jobs being served (at most max_batch)
        self._stopping = False
        self._refusal: tuple[str, str] | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        # stored session states (checkpoints of earlier prompts and request ends), by token prefix
        self.cache = cache if cache is not None else PrefixCache()
        self._checkpoint_failed = False
        self.jobs_served = 0

    # --------------------------------------------------------------------------------------------- event-loop side

    def start(self) -> "EngineWorker":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel everything queued and running, and join the thread."""
        with self._cond:
            self._stopping = True
            for job in self._pending:          # never started: tell their handlers now
                job.cancel.set()
                job.emit(JobCancelled(completion_tokens=0))
            self._pending.clear()
            for job in self._running:
                job.cancel.set()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def refuse_new(self, message: str, code: str = SHUTTING_DOWN) -> None:
        """From now on every submitted job fails at once with a 503 JobFailed(message, code)."""
        with self._cond:
            self._refusal = (message, code)

    def fail_pending(self, message: str, code: str = SHUTTING_DOWN) -> int:
        """Every queued job fails with a 503 JobFailed(message, code); returns how many there were."""
        with self._cond:
            jobs = list(self._pending)
            self._pending.clear()
        for job in jobs:
            job.emit(JobFailed(message, 503, code))
        return len(jobs)

    def abort_running(self, message: str, code: str = SHUTTING_DOWN) -> bool:
        """Stop the running jobs within a token; each ends with a 503 JobFailed(message, code). False if none runs."""
        with self._cond:
            for job in self._running:
                job.abort = (message, code)
                job.cancel.set()
            return bool(self._running)

    def submit(self, job: GenerationJob) -> int:
        """Queue a job; returns its queue position (0 = starts as soon as the engine takes it, else the number of jobs
        that must finish first: the ones ahead of it, the running ones included, beyond the free places of a batch).
        After `refuse_new` the job fails at once instead (position 0)."""
        with self._cond:
            if self._refusal is not None:
                job.emit(JobFailed(self._refusal[0], 503, self._refusal[1]))
                return 0
            if self._stopping:
                raise RuntimeError("the engine worker is stopping")
            position = self._ahead(len(self._pending))
            self._pending.append(job)
            self._cond.notify()
        log.info("request %s queued at position %d (%d prompt tokens)", job.request_id, position,
                 len(job.prompt_ids))
        return position

    def position(self, job: GenerationJob) -> int | None:
        """Jobs that must finish before `job` starts (as submit says); None once it runs or is gone."""
        with self._cond:
            try:
                index = self._pending.index(job)
            except ValueError:
                return None
            return self._ahead(index)

    def _ahead(self, index: int) -> int:
        """For the index-th waiting job: jobs that must finish before it starts (hold self._cond)."""
        return max(0, index + len(self._running) - (self.max_batch - 1))

    @property
    def queue_depth(self) -> int:
        """Jobs waiting (not counting the running one)."""
        with self._cond:
            return len(self._pending)

    @property
    def busy(self) -> bool:
        with self._cond:
            return bool(self._running)

    @property
    def running_count(self) -> int:
        """Jobs being served now (prefilling or generating)."""
        with self._cond:
            return len(self._running)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no job runs or waits (a job counts itself in `jobs_served` just after its last event went
        out); True when idle, False after `timeout` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._running and not self._pending, timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ----------------------------------------------------------------------------------------------- worker side

    def _next_job(self) -> GenerationJob | None:
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            job = self._pending.popleft()
            self._running.append(job)
            return job

    def _run(self) -> None:
        while True:
            job = self._next_job()
            if job is None:
                return
            try:
                problem = self._problem()
                if job.cancel.is_set():
                    log.info("request %s cancelled while queued", job.request_id)
                    self._emit_cancelled(job, 0)
                elif problem is not None:
                    log.warning("request %s refused: %s", job.request_id, problem)
                    self._forget_session_state()
                    job.emit(JobFailed(problem, 503, MODEL_FILE_CHANGED))
                else:
                    self._serve(job)
            except Exception:            # the engine failed: report it, start from a clean session, keep serving
                log.exception("request %s failed in the engine", job.request_id)
                self._forget_session_state()
                job.emit(JobFailed(f"the engine failed while serving request {job.request_id}; the details are in "
                                   f"the server log"))
            finally:
                with self._cond:
                    self._running.remove(job)
                    self.jobs_served += 1
                    self._cond.notify_all()

    def _problem(self) -> str | None:
        """The precheck's answer (a precheck that raises counts as a problem)."""
        if self.precheck is None:
            return None
        try:
            return self.precheck()
        except Exception as exc:     # noqa: BLE001
            return f"the engine cannot serve ({type(exc).__name__})"

    def _should_stop(self, job: GenerationJob) -> bool:
        """True when the job must stop now: the client left, the server aborted it, or the precheck fails (which
        turns into an abort)."""
        if job.cancel.is_set():
            return True
        problem = self._problem()
        if problem is not None:
            job.abort = (problem, MODEL_FILE_CHANGED)
            job.cancel.set()
            return True
        return False

    def _emit_cancelled(self, job: GenerationJob, completion_tokens: int, session: SessionLike | None = None) -> None:
        """A stopped job's last event: JobCancelled (the client left) or a 503 JobFailed (the server stopped it)."""
        if job.abort is not None:
            if job.abort[1] == MODEL_FILE_CHANGED:
                self._forget_session_state(session)
            job.emit(JobFailed(job.abort[0], 503, job.abort[1]))
        else:
            job.emit(JobCancelled(completion_tokens=completion_tokens))

    def _forget_session_state(self, session: SessionLike | None = None) -> None:
        """After an engine failure or a refusal: the session (default: the worker's) may hold anything, start it over
        (stored states are kept)."""
        try:
            (self.session if session is None else session).reset()
        except Exception:
            log.exception("session reset failed")

    def _checkpoint(self, session: SessionLike | None = None) -> None:
        """Store the session's (default: the worker's) state in the cache. A failure (memory, a session without delta
        snapshots) costs the reuse, never the request; it is logged once."""
        try:
            self.cache.checkpoint(self.session if session is None else session)
        except Exception as exc:     # noqa: BLE001
            if not self._checkpoint_failed:
                log.warning("kv cache: cannot store the session state (%s: %s); serving without it", type(exc).__name__,
                            exc)
            self._checkpoint_failed = True

    def _prefill_chunked(self, job: GenerationJob, ids: list[int], done_before: int, total: int):
        """Prefill `ids` in chunks; returns (last logits, cancelled)."""
        logits, start = None, 0
        while start < len(ids):
            if self._should_stop(job):
                return logits, True
            chunk = ids[start:start + self.pacer.size()]
            t0 = time.perf_counter()
            logits = self.session.prefill(chunk)
            dt = time.perf_counter() - t0
            self.cache.observe_prefill(len(chunk), dt)
            self.pacer.observe(len(chunk), dt)
            start += len(chunk)
            job.emit(PrefillProgress(done_before + start, total))
        return logits, False

    def _serve(self, job: GenerationJob) -> None:
        started = time.perf_counter()
        prompt = list(job.prompt_ids)
        reuse = job.controls is None or job.controls.cache_prompt     # cache_prompt=false: prefill everything
        plan = self.cache.prepare(self.session, prompt, reuse=reuse)
        cached = plan.cached
        job.emit(JobStarted(prompt_tokens=len(prompt), cached_tokens=cached, queue_wait_s=started - job.enqueued_at))
        log.info("request %s started after %.3f s in queue: %d prompt tokens, %d reused (%s)", job.request_id,
                 started - job.enqueued_at, len(prompt), cached, plan.source)

        # prefill from checkpoint to checkpoint, storing the state at each (the last one: all but the last prompt
        # token), then the rest, which gives the logits for the first generated token
        to_prefill = len(prompt) - cached
        position, logits, cancelled = cached, None, False
        for point in self.cache.checkpoint_positions(cached, len(prompt), job.checkpoints):
            logits, cancelled = self._prefill_chunked(job, prompt[position:point], position - cached, to_prefill)
            if cancelled:
                break
            position = point
            self._checkpoint()
        if not cancelled:
            logits, cancelled = self._prefill_chunked(job, prompt[position:], position - cached, to_prefill)
        prefill_s = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.record_prefill(to_prefill, prefill_s, cached)
        if cancelled:
            log.info("request %s cancelled during prefill", job.request_id)
            self._emit_cancelled(job, 0)
            return

        generator = self.make_generator(job)
        decode_started = time.perf_counter()
        ttft = None
        finish_reason = None
        n_deltas = 0
        stream = generator.stream(self.session, logits)
        try:
            for delta in stream:
                n_deltas += 1
                if ttft is None:
                    ttft = time.perf_counter() - job.enqueued_at
                job.emit(TokenDelta(delta))
                if getattr(delta, "finish_reason", None):
                    finish_reason = delta.finish_reason
                    break
                if self._should_stop(job):
                    break
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        decode_s = time.perf_counter() - decode_started
        produced = getattr(generator, "completion_tokens", n_deltas)     # the Generator keeps a list of ids
        completion_tokens = len(produced) if isinstance(produced, (list, tuple)) else int(produced)
        if self.metrics is not None:
            self.metrics.record_decode(completion_tokens, decode_s, ttft)
        if finish_reason is None:
            if job.cancel.is_set():
                log.info("request %s cancelled after %d tokens", job.request_id, completion_tokens)
                self._emit_cancelled(job, completion_tokens)
                return
            finish_reason = "stop"          # a generator that ended without saying why
        log.info("request %s finished (%s): %d tokens in %.3f s", job.request_id, finish_reason, completion_tokens,
                 decode_s)
        job.emit(JobFinished(finish_reason=finish_reason, prompt_tokens=len(prompt),
                             completion_tokens=completion_tokens, cached_tokens=cached, prefill_s=prefill_s,
                             decode_s=decode_s, ttft_s=ttft, stop_string=getattr(generator, "stop_string", None)))
        self._checkpoint()                  # the request's end: its conversation's next turn continues here
