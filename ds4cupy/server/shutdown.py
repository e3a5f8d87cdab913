"""Graceful shutdown: stop accepting, fail what waits, give the running request a grace period, then cut it off.

`drain(app, grace_s)` (called on SIGTERM / SIGINT by `ds4cupy serve`, after the listening sockets are closed):
1. new work is refused: /v1 POSTs get 503 `server_shutting_down` (app.availability_middleware), jobs submitted from
   now on fail at once (EngineWorker.refuse_new);
2. queued jobs fail with 503 and an OpenAI error body (a queued stream, already answering 200, gets the error as an
   SSE event followed by `data: [DONE]`);
3. the running job may finish within `grace_s`; past it, it is stopped within a token and ends the same way (503
   body, or an error event + [DONE] on a stream);
4. the handlers get up to `settle_s` to write those last bytes; then the runner's cleanup closes the connections.
"""
from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from .app import STATE
from .worker import SHUTTING_DOWN

log = logging.getLogger("ds4cupy.server")

SHUTDOWN_MESSAGE = "the server is shutting down"
POLL_S = 0.02


async def drain(app: web.Application, grace_s: float, settle_s: float = 5.0) -> None:
    """Steps 1-4 of the module docstring. Returns when no request is left in a handler (or settle_s after the
    running job was cut off)."""
    state = app[STATE]
    loop = asyncio.get_running_loop()
    state.draining = True
    state.worker.refuse_new(SHUTDOWN_MESSAGE, SHUTTING_DOWN)
    failed = state.worker.fail_pending(SHUTDOWN_MESSAGE, SHUTTING_DOWN)
    log.info("shutting down: %d queued request(s) refused, %s", failed,
             f"waiting up to {grace_s:g} s for the running one" if state.worker.busy else "nothing running")
    deadline = loop.time() + max(0.0, grace_s)
    while state.worker.busy and loop.time() < deadline:
        await asyncio.sleep(POLL_S)
    if state.worker.abort_running(SHUTDOWN_MESSAGE, SHUTTING_DOWN):
        log.info("shutting down: the running request did not finish within %g s; stopped", grace_s)
    deadline = loop.time() + settle_s
    while state.in_flight > 0 and loop.time() < deadline:
        await asyncio.sleep(POLL_S)
    if state.in_flight:
        log.warning("shutting down with %d request(s) still in their handlers", state.in_flight)
