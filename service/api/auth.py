"""API keys and caller identity.

With keys configured (``GRADCAM_API_KEYS`` and/or ``GRADCAM_API_KEYS_FILE``), every request
needs one, as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``, unless the route it is
dispatched to is declared :func:`public` where it is defined: the probes (``/livez``,
``/readyz``), the page and its files, the OpenAPI document and its viewers. Deny by default: a
route nobody declared public, a new route family included, needs a key, and so does a path that
matches no route at all. Which route a request reaches is found with Starlette's own matching
(the route's ``matches``, the root path and mounts included), in the router's order. Keys are
kept only as SHA-256 digests (a deployment may configure the digests themselves,
``sha256:<hex>``) and a presented key is compared with every one of them in constant time.

Every request is tagged with a caller id (``scope["state"]["caller"]``) for fairness, logs and
metrics: a short hash of the key's digest, or of the client address when the service runs open.
Neither a key nor an address can be read back from it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final, Protocol, TypeVar

import fastapi.routing
from starlette import status
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocketClose

from service.api.errors import UnauthorizedError
from service.api.problems import problem_response, service_problem
from service.settings import ConfigError, Settings, read_config_file

logger = logging.getLogger("service.api")

#: A plain key shorter than this is refused at start: it could be guessed.
MIN_KEY_LENGTH: Final = 16
_DIGEST = re.compile(r"^sha256:([0-9a-fA-F]{64})$")
#: Prefixes of caller ids: an API key's, or a client address's.
KEY_CALLER: Final = "key"
ADDRESS_CALLER: Final = "addr"
#: The mark :func:`public` leaves on an endpoint (or a mounted app).
_PUBLIC_MARK: Final = "__gradcam_public__"

Endpoint = TypeVar("Endpoint")


def public(endpoint: Endpoint) -> Endpoint:
    """Declare the routes served by ``endpoint`` open: no API key needed even when keys are
    configured. Use it where the route is defined, under the router's decorator::

        @router.get("/livez")
        @public
        async def livez() -> Liveness: ...

    or on the app a ``Mount`` serves (``Mount("/files", public(StaticFiles(...)))``). The mark
    is on the endpoint, which ``include_router`` keeps whether it copies routes or not.
    """
    setattr(endpoint, _PUBLIC_MARK, True)
    return endpoint


def is_public(route: Any) -> bool:
    """Whether ``route`` (one of :func:`reachable_routes`) was declared :func:`public`: its
    endpoint, or the app it mounts."""
    return any(
        getattr(getattr(route, attribute, None), _PUBLIC_MARK, False) is True
        for attribute in ("endpoint", "app")
    )


#: FastAPI from 0.16x keeps an included router as one route of the app and lists the routes it
#: dispatches to (with the include's prefix) through this; older versions copy them in the app.
_route_contexts: Callable[[Sequence[BaseRoute]], Iterable[Any]] | None = getattr(
    fastapi.routing, "iter_route_contexts", None
)


def reachable_routes(routes: Sequence[BaseRoute]) -> list[Any]:
    """The routes a request can be dispatched to among ``routes`` (an app's), in the order the
    router tries them: an included router's own routes in its place. Each has Starlette's
    ``matches``, and the ``path``, ``methods`` and ``endpoint`` (or mounted ``app``) it serves."""
    return list(routes) if _route_contexts is None else list(_route_contexts(routes))


def _dispatched(routes: Sequence[BaseRoute], scope: Scope) -> tuple[Any, Scope]:
    """The route the router hands ``scope`` to, found as the router finds it: the first that
    matches in full, else the first that matches but for the method (its 405), else none (a 404
    or a redirect); with the scope that route sees."""
    partial: tuple[Any, Scope] | None = None
    for route in reachable_routes(routes):
        match, child = route.matches(scope)
        if match == Match.FULL:
            return route, {**scope, **child}
        if match == Match.PARTIAL and partial is None:
            partial = (route, {**scope, **child})
    return partial if partial is not None else (None, scope)


def is_public_request(routes: Sequence[BaseRoute], scope: Scope) -> bool:
    """Whether the route a request reaches among ``routes`` (an app's) is :func:`public`. A
    mount that is not public itself is looked into: its own routes decide."""
    route, scope = _dispatched(routes, scope)
    while route is not None and not is_public(route):
        inner: Sequence[BaseRoute] = getattr(route, "routes", None) or ()
        if not inner:
            return False
        route, scope = _dispatched(inner, scope)
    return route is not None


def route_path(scope: Scope) -> str:
    """The path the app routes on: behind ``--root-path`` or mounted under a prefix, the
    request's path less that prefix (what Starlette matches routes against)."""
    path = str(scope.get("path", ""))
    root = str(scope.get("root_path", ""))
    return path[len(root) :] if root and path.startswith(root) else path


_REALM: Final = 'Bearer realm="gradcam-service"'


@lru_cache(maxsize=4096)
def _caller_id(kind: str, material: bytes) -> str:
    return f"{kind}-" + hashlib.sha256(b"gradcam-caller\0" + material).hexdigest()[:10]


@dataclass(frozen=True)
class KeyRing:
    """The accepted keys, as SHA-256 digests."""

    digests: tuple[bytes, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        """The keys of ``GRADCAM_API_KEYS`` and ``GRADCAM_API_KEYS_FILE`` (one a line; blank
        lines and ``#`` comments skipped). Raises :class:`ConfigError` naming the bad entry by
        position, never by value."""
        entries = [
            ("GRADCAM_API_KEYS", i, key.get_secret_value())
            for i, key in enumerate(settings.api_keys)
        ]
        if settings.api_keys_file is not None:
            entries.extend(("GRADCAM_API_KEYS_FILE", i, line) for i, line in _key_lines(settings))
        return cls(tuple(dict.fromkeys(_digest(*entry) for entry in entries)))

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def caller(self, key: str) -> str | None:
        """The caller id of ``key``, or None if it is not one of ours (constant time)."""
        presented = hashlib.sha256(key.encode("utf-8")).digest()
        found: bytes | None = None
        for digest in self.digests:
            if hmac.compare_digest(presented, digest):
                found = digest
        return None if found is None else _caller_id(KEY_CALLER, found)


def _key_lines(settings: Settings) -> Iterable[tuple[int, str]]:
    assert settings.api_keys_file is not None
    text = read_config_file("GRADCAM_API_KEYS_FILE", settings.api_keys_file)
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.strip()
        if entry and not entry.startswith("#"):
            yield number, entry


def _digest(source: str, position: int, entry: str) -> bytes:
    where = (
        f"{source}: entry {position}"
        if source == "GRADCAM_API_KEYS"
        else f"{source}: line {position}"
    )
    entry = entry.strip()
    if entry.lower().startswith("sha256:"):
        match = _DIGEST.match(entry)
        if match is None:
            raise ConfigError(f"{where}: a digest must be 'sha256:' and 64 hex digits.")
        return bytes.fromhex(match.group(1))
    if (
        len(entry) < MIN_KEY_LENGTH
        or not (entry.isascii() and entry.isprintable())
        or (any(c.isspace() for c in entry))
    ):
        raise ConfigError(
            f"{where}: a key must be at least {MIN_KEY_LENGTH} printable ASCII characters"
            " without spaces (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')."
        )
    return hashlib.sha256(entry.encode("utf-8")).digest()


def presented_key(scope: Scope) -> str | None:
    """The key a request carries: ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``."""
    for name, raw in scope.get("headers", ()):
        lowered = bytes(name).lower()
        value = bytes(raw).decode("latin-1").strip()
        if lowered == b"authorization":
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif lowered == b"x-api-key" and value:
            return value
    return None


#: Address ids are salted per process, so that the 2^32 IPv4 addresses cannot be hashed in
#: advance to read them back (key ids hash a key's digest: stable across restarts).
_ADDRESS_SALT: Final = secrets.token_bytes(16)


def address_caller(scope: Scope) -> str:
    """The caller id of a request's client address (the forwarded one behind a trusted proxy)."""
    client = scope.get("client")
    host = str(client[0]) if client else "unknown"
    return _caller_id(ADDRESS_CALLER, _ADDRESS_SALT + host.encode("utf-8"))


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a listen address) is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def access_summary(keys: KeyRing, host: str) -> tuple[int, str]:
    """The start-up log line about who may use the API: (level, message)."""
    if keys.enabled:
        return logging.INFO, (
            "API keys required on every route but the probes, the page and the API"
            f" documentation ({len(keys.digests)} keys)"
        )
    if is_loopback(host):
        return logging.INFO, "no API keys configured: the API is open to local clients"
    return (
        logging.WARNING,
        f"NO API KEYS CONFIGURED while listening on {host}: anyone who can reach this port can"
        " use every model. Set GRADCAM_API_KEYS or GRADCAM_API_KEYS_FILE.",
    )


class Routed(Protocol):
    """What holds an app's routes: its router (or the app)."""

    @property
    def routes(self) -> list[BaseRoute]: ...


class AuthMiddleware:
    """Tag every request with its caller; with keys configured, refuse a request without a valid
    key (401) unless the route it reaches among ``router``'s (read at each request, so routes
    added later count) is :func:`public`."""

    def __init__(self, app: ASGIApp, keys: KeyRing, router: Routed) -> None:
        self.app = app
        self.keys = keys
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        if not self.keys.enabled or is_public_request(self.router.routes, scope):
            state["caller"] = address_caller(scope)
            await self.app(scope, receive, send)
            return
        key = presented_key(scope)
        caller = self.keys.caller(key) if key is not None else None
        if caller is None and scope["type"] == "websocket":
            # Closed before it is accepted: the server answers the handshake with 403.
            await WebSocketClose(code=status.WS_1008_POLICY_VIOLATION)(scope, receive, send)
            return
        if caller is None:
            error = (
                UnauthorizedError(
                    "This endpoint needs an API key: send 'Authorization: Bearer <key>' or"
                    " 'X-API-Key: <key>'.",
                    code="missing_api_key",
                )
                if key is None
                else UnauthorizedError(
                    "The API key is not valid; check it, or ask for a new one.",
                    code="invalid_api_key",
                )
            )
            challenge = _REALM if key is None else f'{_REALM}, error="invalid_token"'
            response = problem_response(
                service_problem(error, route_path(scope)), headers={"WWW-Authenticate": challenge}
            )
            await response(scope, receive, send)
            return
        state["caller"] = caller
        await self.app(scope, receive, send)
