"""The HTTP edge, in one place for the gateway (serve/gateway.py) and the platform's API (cluster/api.py): the JSON
response, the one chunked body reader (request bodies and dataset uploads alike), the error handlers that answer
every failure in the OpenAI envelope (`error_response`, statuses from rayembed/errors.py), and the route wrapper
that records request metrics."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator
from typing import Callable

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from ray.exceptions import RayActorError
from ray.serve import metrics
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from rayembed.errors import (ClientGone, InvalidName, InvalidRequest, MethodNotAllowed, NotFound, PayloadTooLarge, QueueFull,
                             RequestTimeout, ServeError, Unauthorized, Unavailable, UnsupportedMediaType, envelope,
                             shown, status_of)

log = logging.getLogger("ray.serve")
MODEL_HEADER = "x-rayembed-model"  # the model as the client of a forwarding gateway named it (only echoed back)
ANSWERED_BY = "x-rayembed-answered-by"  # which process rendered an embeddings answer: "gateway" or "provider"


def json_response(body: dict | bytes, status: int = 200, headers: dict | None = None) -> Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return Response(content=content, status_code=status, media_type="application/json", headers=headers)


def _domain_error(exc: BaseException) -> BaseException:
    """Name Serve's own failures in our terms (replicas return client errors as values, not raised)."""
    if isinstance(exc, BackPressureError):
        return QueueFull(f"the model's replicas and queue are full ({exc.message}); retry later")
    if isinstance(exc, (DeploymentUnavailableError, RayActorError)):
        return Unavailable(f"no healthy replica for this model: {exc}")
    if isinstance(exc, ClientDisconnect):
        return ClientGone("the client closed the connection before its request body arrived")
    return exc


async def body_chunks(request: Request, limit: int, deadline_s: float, chunk_timeout_s: float | None = None,
                      what: str = "request body", advice: str = "split the request") -> AsyncIterator[bytes]:
    """The body a chunk at a time: at most `limit` bytes (declared or sent), all of it within `deadline_s`, and, with
    `chunk_timeout_s`, no longer than that between two chunks (a client that stalls or trickles holds nothing for
    long). `what` and `advice` name it in the errors."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"{what} of {int(declared)} bytes; the limit is {limit}: {advice}")
    size, ends = 0, time.monotonic() + deadline_s
    stream = request.stream().__aiter__()
    while True:
        left = ends - time.monotonic()
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), max(0.0, left if chunk_timeout_s is None
                                                                   else min(chunk_timeout_s, left)))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            stalled = chunk_timeout_s is not None and left > chunk_timeout_s
            why = f"stalled for {chunk_timeout_s:g} s" if stalled else f"did not arrive within {deadline_s:g} s"
            raise RequestTimeout(f"the {what} {why} ({size} bytes received"
                                 + (f" of {declared} declared" if declared else "") + f"): {advice}") from None
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"{what} larger than the limit of {limit} bytes: {advice}")
        yield chunk


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The JSON body of a POST/PATCH: declared as JSON, at most `limit` bytes, received within `timeout_s`."""
    chunks = [chunk async for chunk in body_chunks(request, limit, timeout_s)]
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if chunks and media != "application/json" and not media.endswith("+json"):
        got = f"Content-Type {media[:80]!r}" if media else "no Content-Type"
        raise UnsupportedMediaType(f"the request body must be JSON: send the header Content-Type: application/json "
                                   f"(got {got})")
    return b"".join(chunks)


def install_error_handlers(app: FastAPI, name_rule: str | None = None) -> None:
    """Unknown paths, wrong methods and FastAPI's own validation answer in the OpenAI envelope too, and
    a trailing slash is an unknown path (not a 307 with an empty body). `name_rule`: what a path parameter that
    breaks its pattern is told (the platform's entity names)."""
    app.router.redirect_slashes = False

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        path = request.url.path
        shown = path if len(path) <= 120 else path[:117] + "..."
        if exc.status_code == 404:
            return error_response(NotFound(f"no route {request.method} {shown}; see /docs"))
        if exc.status_code == 405:  # every route of the path, not just the first one matched (one per method)
            allow = ", ".join(sorted({m for r in request.app.routes if getattr(r, "methods", None)
                                      and r.matches(request.scope)[0] != Match.NONE for m in r.methods} - {"HEAD"}))
            return error_response(MethodNotAllowed(f"method {request.method} is not allowed on {shown}"
                                                   + (f"; use {allow}" if allow else ""), allow))
        return error_response(InvalidRequest(str(exc.detail)[:200]))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body"))
        if name_rule and first.get("type") == "string_pattern_mismatch":
            return error_response(InvalidName(f"{where} {shown(first.get('input'))} is invalid: use {name_rule}", where))
        return error_response(InvalidRequest(f"invalid request: {where + ': ' if where else ''}"
                                             f"{first.get('msg', 'see /docs')}", where or None))


def error_response(exc: BaseException) -> Response:
    """The one place an exception becomes an HTTP answer; unknown errors are a 500 with no traceback."""
    exc = _domain_error(exc)
    status, err_type, code = status_of(exc)
    if isinstance(exc, ServeError):
        message, param = exc.message, exc.param
    else:
        log.exception("unhandled error in the gateway", exc_info=exc)
        message, param = "internal error; the gateway log has the details", None
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    if isinstance(exc, MethodNotAllowed) and exc.allow:
        headers = {"Allow": exc.allow}
    if isinstance(exc, Unauthorized):
        headers = {"WWW-Authenticate": 'Bearer realm="rayembed"'}
    return json_response(envelope(message, err_type, param, code), status, headers)


class RequestMetrics:
    def __init__(self):
        self.requests = metrics.Counter("rayembed_requests", "gateway requests by route and HTTP status",
                                        tag_keys=("route", "status"))
        self.latency = metrics.Histogram(
            "rayembed_request_ms", "gateway request latency", tag_keys=("route", "status"),
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000])

    def record(self, kind: str, status: int, start: float) -> None:
        tags = {"route": kind, "status": str(status)}
        self.requests.inc(tags=tags)
        self.latency.observe((time.perf_counter() - start) * 1000, tags=tags)


def api_route(kind: str, metrics_of: Callable[[], RequestMetrics]):
    """Wrap a route: map every exception through `error_response` and record metrics."""
    def wrap(fn):
        @functools.wraps(fn)
        async def route(*args, **kwargs):
            start = time.perf_counter()
            try:
                response = await fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - the single edge handler
                response = error_response(exc)
            metrics_of().record(kind, response.status_code, start)
            return response
        return route
    return wrap
