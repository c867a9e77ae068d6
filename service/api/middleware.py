"""Pure ASGI middleware, from the outside in:

0. :class:`SecurityHeadersMiddleware`: ``nosniff``, no referrer, and ``no-store`` unless a
   route chose its own caching (answers may hold clinical images);
1. :class:`ObservabilityMiddleware`: in-flight gauge, request count and latency by route
   template, and one access-log line per request (``service.access``);
2. :class:`CorsMiddleware`: cross-origin access for the origins in ``GRADCAM_CORS_ORIGINS``,
   outside authentication (a preflight carries no key) and the limits, so that their error
   answers reach a browser on those origins too;
3. :class:`~service.api.auth.AuthMiddleware`: the caller's id; 401 without a valid API key;
4. :class:`UploadLimitMiddleware`: 413 before the body is read when Content-Length is too large,
   and while reading when a streamed body grows past the limit;
5. :class:`ProblemGuardMiddleware`: turns anything that escaped the handlers into a problem
   response (a generic 500 for the unexpected), so no traceback ever reaches a client.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Final

from fastapi import Request
from fastapi.responses import Response
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.auth import KEY_CALLER
from service.api.disconnects import ClientDisconnectedError
from service.api.errors import PayloadTooLargeError
from service.api.problems import (
    http_problem,
    problem_response,
    service_problem,
    unhandled_error_handler,
)
from service.errors import ServiceError
from service.metrics import Metrics

access_logger = logging.getLogger("service.access")
#: Polled every few seconds by orchestrators and the README's start loop: their lines go to
#: DEBUG, where they do not bury the requests (a probe that fails with a 500 still warns).
PROBE_PATHS: Final = frozenset({"/livez", "/readyz"})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


def upload_too_large(max_bytes: int) -> PayloadTooLargeError:
    """The error for a request body over ``max_bytes``."""
    mib = max_bytes / (1024 * 1024)
    return PayloadTooLargeError(
        f"The request body is larger than the limit of {max_bytes} bytes"
        f" ({mib:.1f} MiB); send smaller or fewer images."
    )


#: What a page on an allowed origin may send, and which response headers its script may read
#: (besides the CORS-safelisted ones): when to retry, that an API key is required, and which
#: replica computed an answer.
CORS_METHODS: tuple[str, ...] = ("GET", "POST")
CORS_REQUEST_HEADERS: tuple[str, ...] = ("Authorization", "X-API-Key", "Content-Type")
CORS_EXPOSED_HEADERS: tuple[str, ...] = ("Retry-After", "WWW-Authenticate", "X-Gradcam-Replica")


class CorsMiddleware(CORSMiddleware):
    """Starlette's CORS for exact ``origins``, never with credentials (API keys travel in the
    ``Authorization`` header, not cookies); a refused preflight is a problem like any error."""

    def __init__(self, app: ASGIApp, origins: list[str]) -> None:
        super().__init__(
            app,
            allow_origins=origins,
            allow_methods=CORS_METHODS,
            allow_headers=CORS_REQUEST_HEADERS,
            allow_credentials=False,
            expose_headers=CORS_EXPOSED_HEADERS,
            max_age=600,
        )

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        refused = bytes(response.body).decode().removeprefix("Disallowed CORS ")
        detail = (
            f"This cross-origin request is refused ({refused} not allowed): the service"
            " accepts pages from the origins in GRADCAM_CORS_ORIGINS, the methods"
            f" {' and '.join(CORS_METHODS)}, and the headers {', '.join(CORS_REQUEST_HEADERS)}."
        )
        vary = {"Vary": response.headers["vary"]} if "vary" in response.headers else None
        return problem_response(http_problem(400, detail, None), headers=vary)


class UploadLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413, without buffering them first."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            response = problem_response(
                service_problem(upload_too_large(self.max_bytes), scope.get("path")),
                headers={"Connection": "close"},
            )
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise upload_too_large(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


class ProblemGuardMiddleware:
    """Answer a problem for any exception the handlers did not, if no response has started."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ServiceError as exc:
            if started:
                raise
            response: Response = problem_response(service_problem(exc, scope.get("path")))
            await response(scope, receive, send)
        except ClientDisconnectedError:
            if started:
                raise
            await Response(status_code=499)(scope, receive, send)
        except Exception as exc:
            if started:
                raise
            response = await unhandled_error_handler(Request(scope), exc)
            await response(scope, receive, send)


def _route_of(scope: Scope) -> tuple[str, str | None]:
    """(route template, model name) of a request; matched here if routing never happened."""
    route = scope.get("route")
    params: dict[str, Any] = scope.get("path_params") or {}
    if route is None:
        app = scope.get("app")
        for candidate in getattr(getattr(app, "router", None), "routes", ()):
            match, child = candidate.matches(scope)
            if match == Match.FULL:
                route, params = candidate, child.get("path_params") or {}
                break
    template = getattr(route, "path", None)
    model = params.get("model")
    return (template if isinstance(template, str) else "unmatched"), (
        model if isinstance(model, str) else None
    )


def _quoted(value: object) -> str:
    text = str(value)
    if text and all(c.isalnum() or c in "/{}._-:+" for c in text):
        return text
    return json.dumps(text)


SECURITY_HEADERS: dict[bytes, bytes] = {
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
}


class SecurityHeadersMiddleware:
    """Headers every response carries, whoever produced it (errors from middleware included)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {bytes(name).lower() for name, _ in headers}
                headers.extend(
                    (name, value) for name, value in SECURITY_HEADERS.items() if name not in present
                )
                if b"cache-control" not in present:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


class ObservabilityMiddleware:
    """Prometheus request metrics by route template, and one access-log line per request.

    The caller (set by :class:`~service.api.auth.AuthMiddleware`) is logged by its id; it is a
    metric label only with ``label_callers`` (API keys: a bounded set), never for addresses.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, *, label_callers: bool = False) -> None:
        self.app = app
        self.metrics = metrics
        self.label_callers = label_callers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        self.metrics.in_flight_requests.inc()
        try:
            await self.app(scope, receive, recording_send)
        except BaseException as exc:
            if not isinstance(exc, Exception):
                status = 499  # cancelled: the client or the server went away
            raise
        finally:
            self.metrics.in_flight_requests.dec()
            seconds = time.perf_counter() - started
            template, model = _route_of(scope)
            method = str(scope.get("method", ""))
            labels = (template, method, str(status))
            self.metrics.requests_total.labels(*labels).inc()
            self.metrics.request_duration_seconds.labels(*labels).observe(seconds)
            state = scope.get("state")
            state = state if isinstance(state, dict) else {}
            images, caller = state.get("images"), state.get("caller")
            if self.label_callers:
                keyed = caller if caller and caller.startswith(KEY_CALLER) else "-"
                self.metrics.caller_requests_total.labels(keyed, str(status)).inc()
            path = template if template != "unmatched" else str(scope.get("path", ""))[:200]
            if status >= 500 and status not in (503, 504):
                level = logging.WARNING
            elif template in PROBE_PATHS:
                level = logging.DEBUG
            else:
                level = logging.INFO
            access_logger.log(
                level,
                "method=%s path=%s status=%d duration_ms=%.1f model=%s images=%s caller=%s",
                method,
                _quoted(path),
                status,
                seconds * 1000.0,
                _quoted(model) if model is not None else "-",
                images if images is not None else "-",
                caller or "-",
            )
