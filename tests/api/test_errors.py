"""Every error status as an RFC 9457 problem: status, code, detail, and nothing leaked."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.errors import DeadlineExceededError, OverloadedError, WorkerError

ImageFactory = Callable[..., bytes]
PROBLEM = "application/problem+json"


def _files(*blobs: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("image", (f"image{i}.png", blob, "image/png")) for i, blob in enumerate(blobs)]


def _problem(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["title"]
    assert body["detail"]
    assert "Traceback" not in response.text
    assert "/service/" not in response.text
    return body


def test_undecodable_image_is_400(client: TestClient) -> None:
    response = client.post("/v1/models/tiny/predict", files=_files(b"not an image at all"))
    body = _problem(response, 400, "invalid_image")
    assert body["type"] == "urn:gradcam-service:problem:invalid_image"
    assert body["instance"] == "/v1/models/tiny/predict"
    assert body["image_index"] == 0


def test_multi_image_error_names_the_image(client: TestClient, png: bytes) -> None:
    truncated = png[: len(png) // 2]
    response = client.post("/v1/models/tiny/explain", files=_files(png, png, truncated))
    body = _problem(response, 400, "invalid_image")
    assert body["image_index"] == 2
    assert body["detail"].startswith("image 2: ")


def test_unsupported_image_format_is_415(client: TestClient, png: bytes) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buffer, "ICO")
    response = client.post("/v1/models/tiny/predict", files=_files(png, buffer.getvalue()))
    body = _problem(response, 415, "unsupported_image_format")
    assert body["image_index"] == 1
    assert "ICO" in body["detail"]
    assert "PNG" in body["allowed"]


def test_unsupported_content_type_is_415(client: TestClient, png: bytes) -> None:
    response = client.post(
        "/v1/models/tiny/predict", content=png, headers={"content-type": "image/png"}
    )
    body = _problem(response, 415, "unsupported_content_type")
    assert body["allowed"] == ["multipart/form-data", "application/json"]


def test_unknown_model_is_404(client: TestClient, png: bytes) -> None:
    for response in (
        client.get("/v1/models/nope"),
        client.get("/v1/models/nope/layers"),
        client.post("/v1/models/nope/predict", files=_files(png)),
    ):
        body = _problem(response, 404, "unknown_model")
        assert sorted(body["allowed"]) == ["tiny", "vit"]


def test_unknown_route_is_404_and_wrong_method_405(client: TestClient) -> None:
    _problem(client.get("/v2/models"), 404, "not_found")
    response = client.delete("/v1/models")
    body = _problem(response, 405, "method_not_allowed")
    assert "GET" in body["detail"]
    assert response.headers["allow"] == "GET"


def test_unknown_layer_is_422_with_allowed_names(client: TestClient, png: bytes) -> None:
    response = client.post("/v1/models/tiny/explain", files=_files(png), data={"layer": "layer9"})
    body = _problem(response, 422, "unknown_layer")
    assert "layer9" in body["detail"]
    assert "layer4" in body["allowed"]


def test_unknown_layer_index_is_422(client: TestClient, png: bytes) -> None:
    response = client.post("/v1/models/tiny/explain", files=_files(png), data={"layer_index": "99"})
    body = _problem(response, 422, "unknown_layer")
    assert "2" in body["allowed"]


def test_layer_and_layer_index_together_is_422(client: TestClient, png: bytes) -> None:
    response = client.post(
        "/v1/models/tiny/explain",
        files=_files(png),
        data={"layer": "layer4", "layer_index": "2"},
    )
    _problem(response, 422, "conflicting_parameters")


@pytest.mark.parametrize("target", ["zebra", "4", "-1"])
def test_unknown_class_is_422(client: TestClient, png: bytes, target: str) -> None:
    response = client.post("/v1/models/tiny/explain", files=_files(png), data={"target": target})
    body = _problem(response, 422, "unknown_target")
    if target == "zebra":
        assert body["allowed"] == ["cat", "dog", "bird", "fish"]


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"method": "gradcam-9000"}, "method"),
        ({"colormap": "rainbow"}, "colormap"),
        ({"overlay": "gif"}, "overlay"),
        ({"encoding": "hex"}, "encoding"),
        ({"upsampled": "double"}, "upsampled"),
        ({"top_k": "0"}, "top_k"),
        ({"alpha": "1.5"}, "alpha"),
        ({"threshold": "-0.1"}, "threshold"),
        ({"heatmap": "perhaps"}, "heatmap"),
        ({"layers": "layer4"}, "layers"),
        ({"top_k": ["1", "2"]}, "top_k"),
    ],
)
def test_bad_parameter_is_422_naming_the_field(
    client: TestClient, png: bytes, data: dict[str, Any], field: str
) -> None:
    response = client.post("/v1/models/tiny/explain", files=_files(png), data=data)
    body = _problem(response, 422, "invalid_parameter")
    assert [error["loc"] for error in body["errors"]] == [["form", field]]
    assert field in body["detail"]


def test_bad_json_body_is_422(client: TestClient) -> None:
    response = client.post("/v1/models/tiny/predict", json={"images": [], "top_k": "x"})
    body = _problem(response, 422, "invalid_parameter")
    locs = sorted(tuple(error["loc"]) for error in body["errors"])
    assert locs == [("body", "images"), ("body", "top_k")]

    malformed = client.post(
        "/v1/models/tiny/predict", content=b"{", headers={"content-type": "application/json"}
    )
    _problem(malformed, 422, "invalid_parameter")


def test_bad_base64_is_400(client: TestClient, png: bytes) -> None:
    good = base64.b64encode(png).decode()
    response = client.post(
        "/v1/models/tiny/predict", json={"images": [{"data": good}, {"data": "abc"}]}
    )
    body = _problem(response, 400, "invalid_image")
    assert body["image_index"] == 1


def test_no_image_is_422(client: TestClient) -> None:
    response = client.post("/v1/models/tiny/predict", files=[("top_k", (None, "3"))])
    _problem(response, 422, "missing_image")


def test_image_as_text_field_is_422(client: TestClient) -> None:
    response = client.post("/v1/models/tiny/predict", files=[("image", (None, "cat.jpg"))])
    body = _problem(response, 422, "invalid_parameter")
    assert body["errors"][0]["loc"] == ["form", "image", 0]


def test_too_many_images_is_422(client: TestClient, png: bytes) -> None:
    response = client.post("/v1/models/tiny/predict", files=_files(*[png] * 5))
    body = _problem(response, 422, "too_many_images")
    assert "4" in body["detail"]


def test_upload_over_the_limit_by_content_length_is_413(client: TestClient) -> None:
    response = client.post(
        "/v1/models/tiny/predict",
        files=_files(b"\0" * (300 * 1024)),
    )
    body = _problem(response, 413, "payload_too_large")
    assert str(256 * 1024) in body["detail"]


def test_chunked_upload_over_the_limit_is_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(100):
            yield b"\0" * 16 * 1024

    response = client.post(
        "/v1/models/tiny/predict",
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    assert "content-length" not in response.request.headers
    _problem(response, 413, "payload_too_large")


def _asgi_post(client: TestClient, headers: list[tuple[bytes, bytes]]) -> tuple[int, int]:
    """POST 100 chunks of 16 KiB straight to the ASGI app; return (status, chunks pulled).

    The test client buffers request bodies before calling the app, so reading-while-streaming
    is checked at the ASGI level, on the served app's own event loop.
    """
    pulled = 0
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        pulled += 1
        if pulled > 100:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": b"\0" * 16 * 1024, "more_body": pulled < 100}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/models/tiny/predict",
        "raw_path": b"/v1/models/tiny/predict",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), *headers],
        "client": ("testclient", 50000),
        "server": ("testserver", 80),
        "state": {},
    }
    assert client.portal is not None
    client.portal.call(client.app, scope, receive, send)
    return statuses[0], pulled


def test_streamed_upload_is_refused_while_reading(client: TestClient) -> None:
    status, pulled = _asgi_post(client, [(b"transfer-encoding", b"chunked")])
    assert status == 413
    assert pulled <= 256 // 16 + 1, "the body must be refused once past the limit"


def test_declared_upload_over_the_limit_is_refused_before_reading(client: TestClient) -> None:
    status, pulled = _asgi_post(client, [(b"content-length", str(100 * 16 * 1024).encode())])
    assert status == 413
    assert pulled == 0


def test_image_too_large_in_pixels_is_413(
    settings_factory: Callable[..., Any],
    until_ready: Callable[[TestClient], None],
    tiny_spec: Any,
    make_image: ImageFactory,
) -> None:
    from service.api.app import create_app

    settings = settings_factory(models=[tiny_spec], max_image_pixels=1000)
    with TestClient(create_app(settings)) as client:
        until_ready(client)
        response = client.post("/v1/models/tiny/predict", files=_files(make_image(40, 40)))
    body = _problem(response, 413, "image_too_large")
    assert body["image_index"] == 0


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (OverloadedError("Model 'tiny' is busy.", retry_after_s=2.5), 429, "overloaded"),
        (DeadlineExceededError("Too slow."), 504, "deadline_exceeded"),
        (WorkerError("The computation failed."), 500, "worker_error"),
    ],
)
def test_runtime_errors_map_to_their_status(
    client: TestClient,
    png: bytes,
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
    status: int,
    code: str,
) -> None:
    async def fail(*_: object) -> None:
        raise error

    monkeypatch.setattr(client.app.state.runtime, "predict", fail)  # type: ignore[attr-defined]
    response = client.post("/v1/models/tiny/predict", files=_files(png))
    _problem(response, status, code)
    if status == 429:
        assert response.headers["retry-after"] == "3"
    else:
        assert "retry-after" not in response.headers


def test_unexpected_exception_is_a_generic_500(
    client: TestClient,
    png: bytes,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def crash(*_: object) -> None:
        raise RuntimeError("secret at /srv/internal/path.py")

    monkeypatch.setattr(client.app.state.runtime, "explain", crash)  # type: ignore[attr-defined]
    with caplog.at_level("ERROR", logger="service.api"):
        response = client.post("/v1/models/tiny/explain", files=_files(png))
    body = _problem(response, 500, "internal_error")
    assert "secret" not in response.text
    assert "RuntimeError" not in body["detail"]
    assert any(record.exc_info for record in caplog.records), "the traceback must be logged"
