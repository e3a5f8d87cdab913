"""`ds4cupy serve`: an HTTP server over one engine session, speaking OpenAI Chat Completions, OpenAI Responses and
Anthropic Messages.

validation.py  what every API shares: the error value, typed field readers, sampling fields, thinking selection
sse.py         SSE framing (data-only and named events)
protocol.py    OpenAI chat / completions: validation, response and chunk builders (no engine knowledge)
anthropic.py   Anthropic Messages: request mapping, message and event builders, error shape
responses.py   OpenAI Responses: input items, output items and events, the store for previous_response_id
serving.py     what handlers share: settings, state, body reading, prompt preparation, JobRun, the SSE loops
app.py         aiohttp routes, API key and error middleware, the OpenAI handlers, BackgroundServer
anthropic_handlers.py, responses_handlers.py   the handlers of the other two APIs
worker.py      the engine worker thread: FIFO queue, prefix reuse, chunked prefill, checkpoints, streaming
scheduler.py   BatchScheduler (--max-batch N): several streams on N sessions, FIFO admission, one step each a tick
prefill_pacing.py  prefill chunk sizes: fixed, or paced to ~0.4 s a chunk from the measured rate (the default)
prefix_cache.py  many stored session states by token prefix, LRU over GPU / host / disk
kv_disk.py     state files on disk (--kv-cache-dir)
metrics.py     counters and the Prometheus text of GET /metrics
cli.py         the `serve` command
"""
from .app import BackgroundServer, ServerSettings, create_app

__all__ = ["BackgroundServer", "ServerSettings", "create_app"]
