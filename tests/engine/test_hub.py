"""The hub reachability check: one bounded connection, the environment's offline switch and
proxy honoured, asked once per process."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from service.engine import hub


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def listening() -> Iterator[int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


def _closed_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = int(probe.getsockname()[1])
    probe.close()
    return port


def test_a_hub_that_accepts_a_connection_is_online(
    monkeypatch: pytest.MonkeyPatch, listening: int
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listening}")
    assert hub.check_hub() == hub.HubAccess(True)


def test_a_refused_connection_is_offline_and_says_which_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    access = hub.check_hub()
    assert not access.online
    assert access.reason.startswith("127.0.0.1 cannot be reached")


def test_a_hub_that_does_not_answer_is_offline_within_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def hang(host: str, port: int, timeout_s: float) -> None:
        time.sleep(5)

    monkeypatch.setattr(hub, "_connect", hang)
    started = time.monotonic()
    access = hub.check_hub(timeout_s=0.2)
    assert time.monotonic() - started < 2
    assert access == hub.HubAccess(False, "huggingface.co did not answer within 0.2 s")


def test_hf_hub_offline_is_honoured_without_any_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(host: str, port: int, timeout_s: float) -> None:
        raise AssertionError("no connection may be tried")

    monkeypatch.setattr(hub, "_connect", fail)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.check_hub() == hub.HubAccess(False, "HF_HUB_OFFLINE is set")


def test_the_https_proxy_is_what_is_checked_when_one_is_set(
    monkeypatch: pytest.MonkeyPatch, listening: int
) -> None:
    seen: list[tuple[str, int]] = []

    def connect(host: str, port: int, timeout_s: float) -> None:
        seen.append((host, port))

    monkeypatch.setattr(hub, "_connect", connect)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{listening}")
    assert hub.check_hub().online
    assert seen == [("127.0.0.1", listening)]


def test_the_answer_is_asked_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []

    def check(timeout_s: float = hub.CHECK_TIMEOUT_S) -> hub.HubAccess:
        asked.append(1)
        return hub.HubAccess(False, "offline")

    monkeypatch.setattr(hub, "check_hub", check)
    monkeypatch.setattr(hub, "_cached", None)
    assert hub.hub_access() == hub.hub_access() == hub.HubAccess(False, "offline")
    assert asked == [1]
