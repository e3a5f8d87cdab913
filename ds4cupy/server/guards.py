"""App-level request guards, applied to every route (whatever module defines it): body limits and CORS.

- `body_guard`: a POST/PUT/PATCH must say `Content-Type: application/json` (415 otherwise: a web page can send
  text/plain or form bodies to any server without a CORS preflight, and those are never parsed here); a declared
  Content-Length over the limit is refused before a byte is read (413); the body must arrive within
  `body_timeout_s` (408). The body is read here once; handlers' `request.read()` / `request.json()` get it from
  aiohttp's cache.
- `cors`: with allowed origins (`--cors ORIGIN`, repeatable; `*` allows any), preflight requests from those origins are
  answered (204, methods, the requested headers, max-age) and their responses carry Access-Control-Allow-Origin;
  preflights from other origins (all of them when none is allowed) get 403 and no CORS headers: browsers then block
  cross-origin reads and the preflight a JSON POST needs fails, so a page cannot make the server work for it.

Errors are raised as protocol.ProtocolError: the app's error middleware turns them into OpenAI error objects.
"""
from __future__ import annotations

import asyncio

from aiohttp import web

from .protocol import ProtocolError

BODY_METHODS = ("POST", "PUT", "PATCH")
JSON_MEDIA_TYPE = "application/json"
DEFAULT_BODY_TIMEOUT_S = 30.0
CORS_MAX_AGE_S = 600
CORS_METHODS = "GET, POST, OPTIONS"
CORS_EXPOSED = "X-Queue-Position, X-Request-Id"


def too_large(limit: int, size: int | None = None) -> ProtocolError:
    said = f"of {size} bytes " if size is not None else ""
    return ProtocolError(413, f"request body {said}exceeds the {limit}-byte limit", code="request_too_large")


def body_guard(max_body_bytes: int, body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S):
    """The middleware described in the module docstring."""

    @web.middleware
    async def guard(request: web.Request, handler):
        if request.method in BODY_METHODS:
            if request.content_type != JSON_MEDIA_TYPE:
                given = request.headers.get("Content-Type")
                raise ProtocolError(415, f"request bodies must be JSON with Content-Type: {JSON_MEDIA_TYPE} "
                                         f"(got {given!r})" if given else
                                    f"request bodies must be JSON with Content-Type: {JSON_MEDIA_TYPE} (none given)",
                                    code="unsupported_media_type")
            length = request.content_length
            if length is not None and length > max_body_bytes:
                raise too_large(max_body_bytes, length)
            try:
                body = await asyncio.wait_for(request.read(), body_timeout_s)
            except asyncio.TimeoutError:
                raise ProtocolError(408, f"the request body did not arrive within {body_timeout_s:g} s",
                                    code="request_timeout") from None
            except web.HTTPRequestEntityTooLarge:
                raise too_large(max_body_bytes) from None
            if len(body) > max_body_bytes:
                raise too_large(max_body_bytes, len(body))
        return await handler(request)

    return guard


def origin_allowed(origin: str | None, origins: tuple[str, ...]) -> bool:
    return bool(origin) and ("*" in origins or origin in origins)


def cors(origins: tuple[str, ...]):
    """(middleware, on_response_prepare hook) for the allowed `origins`; the hook adds the headers to every response
    (streams included: it runs just before the headers go out)."""
    origins = tuple(origins)

    @web.middleware
    async def preflight(request: web.Request, handler):
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            origin = request.headers.get("Origin")
            if not origin_allowed(origin, origins):
                raise ProtocolError(403, f"cross-origin requests from {origin!r} are not allowed (see --cors)",
                                    code="origin_not_allowed")
            headers = {"Access-Control-Allow-Methods": CORS_METHODS, "Access-Control-Max-Age": str(CORS_MAX_AGE_S)}
            wanted = request.headers.get("Access-Control-Request-Headers")
            if wanted:
                headers["Access-Control-Allow-Headers"] = wanted
            return web.Response(status=204, headers=headers)
        return await handler(request)

    async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin_allowed(origin, origins):
            response.headers["Access-Control-Allow-Origin"] = "*" if "*" in origins else origin
            response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSED
            if "*" not in origins:
                response.headers.add("Vary", "Origin")

    return preflight, add_headers
