"""`ds4cupy serve`: an OpenAI-compatible HTTP server over one engine session.

protocol.py  OpenAI request validation, response / chunk builders, SSE framing (no engine knowledge)
worker.py    the engine worker thread: FIFO queue, prefix reuse, chunked prefill, token streaming, cancellation
app.py       aiohttp routes, API key and body-size checks, SSE streaming, BackgroundServer
metrics.py   counters and the Prometheus text of GET /metrics
cli.py       the `serve` command
"""
from .app import BackgroundServer, ServerSettings, create_app

__all__ = ["BackgroundServer", "ServerSettings", "create_app"]
