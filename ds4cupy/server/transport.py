"""The HTTP connection layer under the app: an AppRunner whose connections time out slow headers and whose
parser-level errors are OpenAI error objects.

aiohttp answers requests it cannot parse (a bad request line, a header line past its size limit, a bad chunk) itself,
before any middleware runs, with a text/plain body; and it waits for a request's headers for as long as the
keep-alive timer allows. `GuardedRunner` swaps in a request handler that
- closes a connection whose first request headers are not complete within `header_timeout_s` (a slow sender holds a
  connection for seconds, not for an hour); later requests on a kept-alive connection are bounded by
  `keepalive_timeout_s`, which closes a connection that waits for (the rest of) a request's headers that long;
- answers parser errors with {"error": {"message", "type", "param", "code"}} and the same status;
- lingers at most LINGERING_S over the unread rest of a refused body before closing.

Body read timeouts and size limits are app-level (guards.py): they need the route and the settings.
"""
from __future__ import annotations

import asyncio
import logging

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from .protocol import error_body

log = logging.getLogger("ds4cupy.server")

DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_KEEPALIVE_TIMEOUT_S = 30.0
DEFAULT_SHUTDOWN_TIMEOUT_S = 5.0     # after the app's own drain (shutdown.py): handlers left are cut off
# after answering a request whose body was not read (413, 408, 415), read and drop what the client still sends for this
# long before closing, so that it sees the answer rather than a reset (aiohttp's default is 10 s)
LINGERING_S = 1.0


class GuardedRequestHandler(RequestHandler):
    """aiohttp's per-connection protocol with a first-request header timeout and JSON parser errors."""

    def __init__(self, manager: Server, *, header_timeout: float, **kwargs):
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._header_timeout and self._header_timeout > 0:
            self._header_timer = asyncio.get_running_loop().call_later(self._header_timeout, self._headers_overdue)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def _headers_overdue(self) -> None:
        self._header_timer = None
        if getattr(self, "_request_count", 1) == 0:        # no complete request header yet
            log.info("closing a connection that sent no complete request headers in %.1f s", self._header_timeout)
            self.force_close()

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """A request aiohttp could not parse (or a handler failure that escaped the app): an OpenAI error object."""
        if status >= 500:
            log.error("error handling a request from %s", getattr(request, "remote", "?"), exc_info=exc)
            text, kind, code = "internal server error", "server_error", "internal_error"
        else:
            log.info("malformed HTTP request from %s: %s", getattr(request, "remote", "?"), message or exc)
            reason = (message or (str(exc) if exc else "") or "").strip().splitlines()
            text = "malformed HTTP request" + (f": {reason[0][:200]}" if reason else "")
            kind, code = "invalid_request_error", "bad_http_request"
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send the error")
        resp = web.Response(status=status, body=orjson.dumps(error_body(text, type=kind, code=code)),
                            content_type="application/json")
        resp.force_close()
        return resp


class _GuardedServer(Server):
    """aiohttp's Server, building GuardedRequestHandler protocols."""
    header_timeout: float = DEFAULT_HEADER_TIMEOUT_S

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, header_timeout=self.header_timeout, **self._kwargs)


class GuardedRunner(web.AppRunner):
    """web.AppRunner for ds4cupy's app: guarded connections, no access log, bounded keep-alive and shutdown."""

    def __init__(self, app: web.Application, *, header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
                 keepalive_timeout_s: float = DEFAULT_KEEPALIVE_TIMEOUT_S,
                 shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S):
        super().__init__(app, access_log=None, keepalive_timeout=keepalive_timeout_s,
                         shutdown_timeout=shutdown_timeout_s, lingering_time=LINGERING_S)
        self._header_timeout_s = header_timeout_s

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        if type(server) is Server:            # aiohttp's own class: give it our protocol factory
            server.__class__ = type("GuardedServer", (_GuardedServer,), {"header_timeout": self._header_timeout_s})
        else:                                  # pragma: no cover - a future aiohttp with another Server class
            log.warning("aiohttp server class %s: header timeout and JSON parser errors not installed",
                        type(server).__name__)
        return server
