"""API keys: both header forms, digests, the keys file, open probes, and keys kept out of logs;
every route needs a key unless it is declared public (deny by default)."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import APIRouter, WebSocket
from fastapi.staticfiles import StaticFiles
from fastapi.testclient import TestClient
from starlette.routing import Mount, WebSocketRoute
from starlette.websockets import WebSocketDisconnect

from service.api.app import create_app
from service.api.auth import is_public, public, reachable_routes
from service.engine.models.spec import ModelSpec
from service.settings import ConfigError, Settings

SettingsFactory = Callable[..., Settings]
ReadyWaiter = Callable[[TestClient], None]


PLAIN = "plain-key-0123456789abcdef"
HASHED = "hashed-key-fedcba9876543210"  # configured only as its digest
FROM_FILE = "file-key-0a1b2c3d4e5f6789"
WRONG = "wrong-key-0000000000000000"


def _digest(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text(f"# rotated monthly\n\n{FROM_FILE}\n")
    return path


@pytest.fixture(scope="module")
def make_settings(settings_factory: SettingsFactory, tiny_spec: ModelSpec) -> SettingsFactory:
    """Settings serving only the tiny model."""
    return lambda **overrides: settings_factory(models=[tiny_spec], **overrides)


@pytest.fixture(scope="module")
def secured(
    keys_file: Path, make_settings: SettingsFactory, until_ready: ReadyWaiter
) -> Iterator[TestClient]:
    settings = make_settings(api_keys=[PLAIN, _digest(HASHED)], api_keys_file=keys_file)
    with TestClient(create_app(settings)) as client:
        until_ready(client)
        yield client


def _predict(client: TestClient, png: bytes, **headers: str) -> int:
    files = {"image": ("x.png", png, "image/png")}
    return client.post("/v1/models/tiny/predict", files=files, headers=headers).status_code


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {PLAIN}"},
        {"authorization": f"bearer {PLAIN}"},
        {"X-API-Key": PLAIN},
        {"Authorization": f"Bearer {HASHED}"},
        {"X-API-Key": FROM_FILE},
    ],
    ids=["bearer", "bearer-lowercase", "x-api-key", "digest", "file"],
)
def test_every_key_form_and_header_is_accepted(
    secured: TestClient, png: bytes, headers: dict[str, str]
) -> None:
    assert _predict(secured, png, **headers) == 200
    assert secured.get("/v1/models", headers=headers).status_code == 200
    assert secured.get("/metrics", headers=headers).status_code == 200


def test_a_missing_key_is_a_401_problem_with_a_bearer_challenge(secured: TestClient) -> None:
    for path in ("/v1/models", "/v1/models/tiny/layers", "/metrics", "/v1/no/such/path"):
        response = secured.get(path)
        assert response.status_code == 401, path
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["www-authenticate"] == 'Bearer realm="gradcam-service"'
        assert response.json()["code"] == "missing_api_key"


def test_a_wrong_key_is_refused_as_an_invalid_token(secured: TestClient, png: bytes) -> None:
    for headers in ({"Authorization": f"Bearer {WRONG}"}, {"X-API-Key": WRONG}):
        response = secured.get("/v1/models", headers=headers)
        assert response.status_code == 401
        assert 'error="invalid_token"' in response.headers["www-authenticate"]
        assert response.json()["code"] == "invalid_api_key"
        assert WRONG not in response.text
    # A digest is not a key: sending the configured digest itself must not work.
    assert _predict(secured, png, **{"X-API-Key": _digest(HASHED)}) == 401
    assert _predict(secured, png, Authorization=f"Basic {PLAIN}") == 401


def test_an_unauthenticated_upload_is_refused_before_its_body_is_read(
    secured: TestClient,
) -> None:
    response = secured.post(
        "/v1/models/tiny/explain",
        content=b"x" * 10_000_000,
        headers={"Content-Type": "multipart/form-data; boundary=x"},
    )
    assert response.status_code == 401


def test_probes_and_the_api_document_stay_open(secured: TestClient) -> None:
    assert secured.get("/livez").status_code == 200
    assert secured.get("/readyz").status_code == 200
    assert secured.get("/openapi.json").status_code == 200
    assert secured.get("/docs").status_code == 200


def test_keys_never_reach_a_log_line_and_callers_are_named_by_a_short_id(
    keys_file: Path,
    png: bytes,
    caplog: pytest.LogCaptureFixture,
    make_settings: SettingsFactory,
    until_ready: ReadyWaiter,
) -> None:
    settings = make_settings(api_keys=[PLAIN], api_keys_file=keys_file)
    with caplog.at_level(logging.DEBUG), TestClient(create_app(settings)) as client:
        until_ready(client)
        assert _predict(client, png, Authorization=f"Bearer {PLAIN}") == 200
        assert _predict(client, png, **{"X-API-Key": FROM_FILE}) == 200
        assert _predict(client, png, **{"X-API-Key": WRONG}) == 401
        metrics = client.get("/metrics", headers={"X-API-Key": PLAIN}).text
    for secret in (PLAIN, FROM_FILE, WRONG, _digest(PLAIN)[7:]):
        assert secret not in caplog.text
        assert secret not in metrics
    access = [r.getMessage() for r in caplog.records if r.name == "service.access"]
    callers = {line.rsplit("caller=", 1)[1] for line in access if "predict status=200" in line}
    assert len(callers) == 2, "each key is its own caller"
    assert all(caller.startswith("key-") and len(caller) == 14 for caller in callers)
    assert any(f'caller="{caller}"' in metrics for caller in callers)
    assert "API keys required" in caplog.text


def test_without_keys_the_service_is_open_and_says_so_loudly_off_loopback(
    caplog: pytest.LogCaptureFixture, make_settings: SettingsFactory
) -> None:
    with (
        caplog.at_level(logging.INFO, logger="service"),
        TestClient(create_app(make_settings(host="0.0.0.0"))),
    ):
        pass
    (record,) = [r for r in caplog.records if "API KEYS" in r.getMessage().upper()]
    assert record.levelno == logging.WARNING
    assert "0.0.0.0" in record.getMessage()
    caplog.clear()
    with (
        caplog.at_level(logging.INFO, logger="service"),
        TestClient(create_app(make_settings(host="127.0.0.1"))),
    ):
        pass
    (record,) = [r for r in caplog.records if "API KEYS" in r.getMessage().upper()]
    assert record.levelno == logging.INFO


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (["short"], "GRADCAM_API_KEYS: entry 0: a key must be at least 16 printable ASCII"),
        (["clé-non-ascii-0123456789"], "printable ASCII"),
        ([PLAIN, "sha256:abc"], "GRADCAM_API_KEYS: entry 1: a digest must be"),
        (["has a space in the key"], "without spaces"),
    ],
)
def test_weak_or_malformed_keys_stop_the_service_without_echoing_them(
    keys: list[str], message: str, make_settings: SettingsFactory
) -> None:
    with pytest.raises(ConfigError, match=message) as refused:
        create_app(make_settings(api_keys=keys))
    assert all(key not in str(refused.value) for key in keys)


def test_an_unreadable_keys_file_stops_the_service(
    tmp_path: Path, make_settings: SettingsFactory
) -> None:
    with pytest.raises(ConfigError, match="GRADCAM_API_KEYS_FILE: cannot read"):
        create_app(make_settings(api_keys_file=tmp_path / "missing.txt"))


def test_keys_stay_hidden_in_the_settings_repr() -> None:
    settings = Settings(api_keys=[PLAIN])
    assert PLAIN not in repr(settings)
    assert PLAIN not in str(settings.model_dump())


def test_keys_are_required_behind_a_root_path_too(
    make_settings: SettingsFactory, until_ready: ReadyWaiter
) -> None:
    app = create_app(make_settings(api_keys=[PLAIN]))
    with TestClient(app, root_path="/gradcam") as client:
        until_ready(client)
        for path in ("/gradcam/v1/models", "/gradcam/metrics"):
            assert client.get(path).status_code == 401, path
        assert client.get("/gradcam/v1/models", headers={"X-API-Key": PLAIN}).status_code == 200
        assert client.get("/gradcam/livez").status_code == 200


def test_only_keys_become_metric_labels_never_client_addresses(secured: TestClient) -> None:
    secured.get("/livez")
    secured.get("/v1/models", headers={"X-API-Key": PLAIN})
    metrics = secured.get("/metrics", headers={"X-API-Key": PLAIN}).text
    labels = [line for line in metrics.splitlines() if line.startswith("gradcam_caller_requests")]
    assert any('caller="key-' in line for line in labels)
    assert not any("addr-" in line for line in labels)


#: What is declared public: the probes, the page and its files, the API document and its viewers
#: (and, below, files a test mounts as public). Everything else needs a key.
PUBLIC_ROUTES = {
    "/livez",
    "/readyz",
    "/",
    "/ui/options.json",
    "/ui/{name}",
    "/openapi.json",
    "/docs",
    "/docs/oauth2-redirect",
    "/docs/assets/{name}",
    "/redoc",
}


def _reachable(path: str) -> str:
    """A path that ``path`` (a route's template) matches: its parameters filled in."""
    return re.sub(r"\{(\w+)(:\w+)?\}", lambda m: "tiny" if m[1] == "model" else "x", path)


def _grown(app: Any, folder: Path) -> None:
    """Add to ``app`` what a later change could add without a thought for keys: a new route
    family under a prefix, files mounted, a websocket; and files mounted as declared public."""
    (folder / "file.txt").write_text("file")
    later = APIRouter()

    @later.api_route("/models", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def v2_models() -> dict[str, str]:
        return {"served": "without a key?"}

    @later.websocket("/stream")
    async def v2_stream(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.close()

    app.include_router(later, prefix="/v2")
    app.mount("/files", StaticFiles(directory=folder), name="files")
    app.mount("/open-files", public(StaticFiles(directory=folder)), name="open-files")


def test_every_route_needs_a_key_unless_it_is_declared_public(
    make_settings: SettingsFactory, tmp_path: Path
) -> None:
    """Every route of the app, every method, mounts and websockets included, read from the app
    itself: no list of protected routes to keep up to date."""
    app = create_app(make_settings(api_keys=[PLAIN]))
    _grown(app, tmp_path)
    client = TestClient(app, raise_server_exceptions=False)  # no lifespan: no model loads
    declared = set()
    checked = 0
    for route in reachable_routes(app.routes):
        original = getattr(route, "original_route", route)
        if isinstance(original, Mount):
            requests = [(method, route.path + "/file.txt") for method in ("GET", "HEAD", "POST")]
        elif isinstance(original, WebSocketRoute):
            requests = [("WEBSOCKET", _reachable(route.path))]
        else:
            requests = [(method, _reachable(route.path)) for method in sorted(route.methods)]
        if is_public(route):
            declared.add(route.path)
        for method, path in requests:
            checked += 1
            if method == "WEBSOCKET":
                assert not is_public(route), "websockets are checked for refusal only"
                with pytest.raises(WebSocketDisconnect) as closed, client.websocket_connect(path):
                    pass
                assert closed.value.code == 1008, path
                with client.websocket_connect(path, headers={"X-API-Key": PLAIN}):
                    pass
                continue
            refused = client.request(method, path)
            with_key = client.request(method, path, headers={"X-API-Key": PLAIN})
            assert with_key.status_code != 401, (method, path)
            if is_public(route):
                assert refused.status_code != 401, (method, path)
                continue
            assert refused.status_code == 401, (method, path, refused.status_code)
            assert refused.headers["www-authenticate"] == 'Bearer realm="gradcam-service"'
            if method != "HEAD":
                assert refused.json()["code"] == "missing_api_key", (method, path)
    assert declared == PUBLIC_ROUTES | {"/open-files"}, "only these routes are open"
    assert checked > 2 * len(declared)
    # A path no route matches needs a key too (a 404 says nothing to a caller without one).
    for path in ("/v3/models", "/livez/extra", "/metrics.txt", "/v1", "/"):
        refused = client.get("/nowhere" + path)
        assert refused.status_code == 401, path
    assert client.get("/nowhere", headers={"X-API-Key": PLAIN}).status_code == 404


def test_without_keys_every_route_is_open(make_settings: SettingsFactory, tmp_path: Path) -> None:
    app = create_app(make_settings())
    _grown(app, tmp_path)
    client = TestClient(app, raise_server_exceptions=False)
    for path in ("/v2/models", "/files/file.txt", "/metrics", "/nowhere"):
        assert client.get(path).status_code != 401, path
    with client.websocket_connect("/v2/stream"):
        pass
