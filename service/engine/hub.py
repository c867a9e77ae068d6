"""Whether the Hugging Face hub can be reached, asked once per process and quickly.

timm fetches pretrained weights through ``huggingface_hub``, which retries an unreachable hub
for about 47 s (five retries, each logged twice) before it looks in its local cache. Offline
that made every start and every local command wait. :func:`hub_access` decides up front with
one TCP connection (name lookup included) bounded by ``timeout_s``: where the hub (or the
HTTPS proxy in the environment) cannot be reached, the weights are looked up in the local cache
only, in the hub library's own offline mode, which answers at once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_ENDPOINT = "https://huggingface.co"
CHECK_TIMEOUT_S = 2.0
_TRUE = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class HubAccess:
    """``online`` when a download may be tried; otherwise ``reason`` says why not."""

    online: bool
    reason: str = ""


_lock = threading.Lock()
_offline_lock = threading.Lock()
_cached: HubAccess | None = None


def _target() -> tuple[str, int, str]:
    """(host, port, what it is) of the first hop to the hub: the HTTPS proxy when one is set."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy:
        parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if parts.hostname:
            return parts.hostname, parts.port or 8080, f"the HTTPS proxy {parts.hostname}"
    endpoint = os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    parts = urlsplit(endpoint)
    host = parts.hostname or "huggingface.co"
    port = parts.port or (80 if parts.scheme == "http" else 443)
    return host, port, host


def _connect(host: str, port: int, timeout_s: float) -> None:
    with socket.create_connection((host, port), timeout=timeout_s):
        pass


def check_hub(timeout_s: float = CHECK_TIMEOUT_S) -> HubAccess:
    """One connection attempt, bounded by ``timeout_s`` in all, a name lookup that hangs
    included: it runs in a daemon thread, left behind if it outlasts the bound (a pool's
    worker would be joined at exit and hold the process up)."""
    if (os.environ.get("HF_HUB_OFFLINE") or "").strip().lower() in _TRUE:
        return HubAccess(False, "HF_HUB_OFFLINE is set")
    host, port, what = _target()
    failure: list[OSError] = []

    def attempt() -> None:
        try:
            _connect(host, port, timeout_s)
        except OSError as exc:
            failure.append(exc)

    thread = threading.Thread(target=attempt, name="hub-check", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return HubAccess(False, f"{what} did not answer within {timeout_s:g} s")
    if failure:
        detail = failure[0].strerror or type(failure[0]).__name__
        return HubAccess(False, f"{what} cannot be reached ({detail})")
    return HubAccess(True)


def hub_access() -> HubAccess:
    """:func:`check_hub`, asked once per process (every model and command shares the answer)."""
    global _cached
    with _lock:
        if _cached is None:
            _cached = check_hub()
        return _cached


@contextmanager
def cache_only() -> Iterator[None]:
    """The hub library in its offline mode for the duration: cached files are used, nothing is
    requested, a missing file fails at once (``LocalEntryNotFoundError``). timm's own line
    "Loading pretrained weights from Hugging Face hub" is held back meanwhile: nothing is
    loaded from the hub."""
    from huggingface_hub import constants

    timm_logger = logging.getLogger("timm.models._builder")
    with _offline_lock:
        offline, level = constants.HF_HUB_OFFLINE, timm_logger.level
        constants.HF_HUB_OFFLINE = True
        timm_logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            constants.HF_HUB_OFFLINE = offline
            timm_logger.setLevel(level)
