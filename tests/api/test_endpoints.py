"""Every /v1 endpoint on its success path, multipart and JSON, with tiny random-weight models."""

from __future__ import annotations

import base64
import io
import os
import socket
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api.app import create_app
from service.engine.cam.methods import METHOD_NAMES
from service.engine.models.spec import ModelSpec
from service.settings import Settings

ImageFactory = Callable[..., bytes]


def _files(*blobs: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("image", (f"image{i}.png", blob, "image/png")) for i, blob in enumerate(blobs)]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _array(payload: dict[str, Any]) -> np.ndarray:
    """Decode a map payload, whatever its encoding, into a float32 array of its shape."""
    assert payload["dtype"] == "float32"
    if payload["encoding"] == "base64":
        raw = base64.b64decode(payload["data"])
        return np.frombuffer(raw, dtype="<f4").reshape(payload["shape"])
    array = np.asarray(payload["data"], dtype=np.float32)
    assert list(array.shape) == payload["shape"]
    return array


def test_livez(client: TestClient) -> None:
    response = client.get("/livez")
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "alive"}


def test_readyz_lists_every_model_ready(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready"
    assert {name: m["state"] for name, m in body["models"].items()} == {
        "tiny": "ready",
        "vit": "ready",
    }


def test_list_models(client: TestClient) -> None:
    response = client.get("/v1/models")
    assert response.status_code == 200, response.text
    models = {m["name"]: m for m in response.json()["models"]}
    assert set(models) == {"tiny", "vit"}
    assert models["tiny"]["state"] == "ready"
    assert models["tiny"]["weights"]["random"] is True


def test_describe_model_flags_random_weights(client: TestClient) -> None:
    response = client.get("/v1/models/tiny")
    assert response.status_code == 200, response.text
    info = response.json()
    assert info["name"] == "tiny"
    assert info["architecture"] == "resnet18"
    assert info["num_classes"] == 4
    assert info["labels"] == ["cat", "dog", "bird", "fish"]
    assert info["input_size"] == [64, 64]
    assert info["preprocessing"]["crop_pct"] == 1.0
    assert len(info["preprocessing"]["mean"]) == 3
    assert info["default_layer"] == "layer4"
    assert info["device"] == "cpu"
    assert info["ready"] is True
    assert info["weights"] == {
        "source": "random",
        "location": None,
        "random": True,
        "note": "requested",
    }


def test_describe_model_says_what_its_workers_are_busy_with(client: TestClient) -> None:
    work = client.get("/v1/models/tiny").json()["work"]
    assert work["queued"] == 0
    assert work["long_jobs_running"] == 0
    assert work["long_jobs_queued"] == 0
    assert work["long_jobs_remaining_s"] == 0.0
    assert 0 < work["forward_pass_s"] < 5  # timed on this machine after the warm-up


def test_layers_of_a_cnn(client: TestClient) -> None:
    response = client.get("/v1/models/tiny/layers")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["default_layer"] == "layer4"
    layers = {layer["name"]: layer for layer in body["layers"]}
    assert layers["layer4"] == {
        "name": "layer4",
        "module_type": "Sequential",
        "output_shape": [512, 2, 2],
        "layout": "channels_first",
        "grid": [2, 2],
        "channels": 512,
        "prefix_tokens": 0,
        "layer_index": 2,
        "stage": True,
    }
    assert layers["layer1"]["layer_index"] == 5
    assert not layers["layer4.1"]["stage"]


def test_layers_of_a_vit_drop_the_class_token(client: TestClient) -> None:
    response = client.get("/v1/models/vit/layers")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["default_layer"] == "blocks.1.norm1"
    layer = next(lay for lay in body["layers"] if lay["name"] == body["default_layer"])
    assert layer["layout"] == "tokens"
    assert layer["prefix_tokens"] == 1
    assert layer["grid"] == [4, 4]


def test_predict_multipart_one_result_per_image(
    client: TestClient, make_image: ImageFactory
) -> None:
    first, second = make_image(80, 60, seed=1), make_image(33, 47, "JPEG", seed=2)
    response = client.post(
        "/v1/models/tiny/predict", files=_files(first, second), data={"top_k": "3"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "tiny"
    assert body["random_weights"] is True
    assert any("RANDOM" in warning for warning in body["warnings"])
    results = body["results"]
    assert [r["index"] for r in results] == [0, 1]
    assert results[0]["original"] == {
        "width": 80,
        "height": 60,
        "mode": "RGB",
        "format": "PNG",
        "dicom": None,
    }
    assert results[1]["original"]["format"] == "JPEG"
    for result in results:
        predictions = result["predictions"]
        assert len(predictions) == 3
        probabilities = [p["probability"] for p in predictions]
        assert probabilities == sorted(probabilities, reverse=True)
        assert all(p["label"] == ["cat", "dog", "bird", "fish"][p["index"]] for p in predictions)
        timings = result["timings"]
        assert timings["batch_size"] >= 1
        assert timings["compute_ms"] > 0


def test_predict_top_k_is_capped_at_the_number_of_classes(client: TestClient, png: bytes) -> None:
    response = client.post("/v1/models/tiny/predict", files=_files(png), data={"top_k": "50"})
    assert response.status_code == 200, response.text
    predictions = response.json()["results"][0]["predictions"]
    assert sorted(p["index"] for p in predictions) == [0, 1, 2, 3]
    assert sum(p["probability"] for p in predictions) == pytest.approx(1.0, abs=1e-5)


def test_predict_json_base64_matches_multipart(client: TestClient, png: bytes) -> None:
    multipart = client.post("/v1/models/tiny/predict", files=_files(png))
    as_json = client.post(
        "/v1/models/tiny/predict",
        json={"images": [{"data": _b64(png)}, {"data": "data:image/png;base64," + _b64(png)}]},
    )
    assert multipart.status_code == 200, multipart.text
    assert as_json.status_code == 200, as_json.text
    expected = multipart.json()["results"][0]["predictions"]
    for result in as_json.json()["results"]:
        got = result["predictions"]
        assert [p["index"] for p in got] == [p["index"] for p in expected]
        assert [p["probability"] for p in got] == pytest.approx(
            [p["probability"] for p in expected], abs=1e-5
        )


def test_explain_default_layer_and_top_class(client: TestClient, png: bytes) -> None:
    response = client.post("/v1/models/tiny/explain", files=_files(png))
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    (explanation,) = result["explanations"]
    assert explanation["layer"] == "layer4"
    assert explanation["method"] == "gradcam"
    assert explanation["target"]["index"] == result["predictions"][0]["index"]
    assert set(explanation["target"]) == {"index", "label", "probability", "logit"}
    heatmap = _array(explanation["heatmap"])
    assert heatmap.shape == (2, 2)
    assert heatmap.min() >= 0.0
    assert heatmap.max() <= 1.0
    assert explanation["raw_range"]["min"] <= explanation["raw_range"]["max"]
    overlay = explanation["overlay"]
    assert overlay["media_type"] == "image/png"
    picture = Image.open(io.BytesIO(base64.b64decode(overlay["data"])))
    assert picture.format == "PNG"
    assert picture.size == (overlay["width"], overlay["height"]) == (80, 60)
    assert explanation["upsampled"] is None
    assert result["timings"]["render_ms"] >= 0


def test_explain_says_where_the_maps_lie_on_the_image(client: TestClient, png: bytes) -> None:
    """An 80x60 upload, centre-cropped to the tiny model's square input: the input's box is
    the middle 60x60 pixels, and the map resized onto the image is zero outside it only."""
    response = client.post(
        "/v1/models/tiny/explain",
        files=_files(png),
        data={"upsampled": "original", "threshold": "0.5", "overlay": "none"},
    )
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    box = result["input_box"]
    assert (box["top"], box["bottom"]) == pytest.approx((0.0, 60.0))
    assert box["right"] - box["left"] == pytest.approx(60.0, abs=1.5)
    assert (box["left"] + box["right"]) / 2 == pytest.approx(40.0, abs=1.0)
    upsampled = _array(result["explanations"][0]["upsampled"])
    centres = np.arange(80) + 0.5
    seen = (centres >= box["left"]) & (centres < box["right"])
    assert 56 <= seen.sum() <= 62
    assert (upsampled[:, ~seen] == 0).all()
    assert (upsampled[:, seen] > 0).all()  # the 0.5 floor: every seen pixel has a value


def test_explain_every_target_and_layer_in_order(client: TestClient, png: bytes) -> None:
    response = client.post(
        "/v1/models/tiny/explain",
        files=_files(png),
        data={"layer": ["layer4", "layer3"], "target": ["dog", "3"], "overlay": "none"},
    )
    assert response.status_code == 200, response.text
    explanations = response.json()["results"][0]["explanations"]
    assert [(e["target"]["index"], e["layer"]) for e in explanations] == [
        (1, "layer4"),
        (1, "layer3"),
        (3, "layer4"),
        (3, "layer3"),
    ]
    assert [e["target"]["label"] for e in explanations] == ["dog", "dog", "fish", "fish"]
    assert _array(explanations[1]["heatmap"]).shape == (4, 4)
    assert all(e["overlay"] is None for e in explanations)


def test_explain_layer_index_is_the_original_scripts_layer_idx(
    client: TestClient, png: bytes
) -> None:
    response = client.post(
        "/v1/models/tiny/explain",
        files=_files(png),
        data={"layer_index": "5", "overlay": "none"},
    )
    assert response.status_code == 200, response.text
    (explanation,) = response.json()["results"][0]["explanations"]
    assert explanation["layer"] == "layer1"
    assert _array(explanation["heatmap"]).shape == (16, 16)


def test_explain_heatmap_list_and_base64_decode_to_the_same_array(
    client: TestClient, png: bytes
) -> None:
    common = {"layer": "layer3", "upsampled": "original", "overlay": "none"}
    as_list = client.post(
        "/v1/models/tiny/explain", files=_files(png), data={**common, "encoding": "list"}
    )
    as_b64 = client.post(
        "/v1/models/tiny/explain", files=_files(png), data={**common, "encoding": "base64"}
    )
    assert as_list.status_code == 200, as_list.text
    assert as_b64.status_code == 200, as_b64.text
    listed = as_list.json()["results"][0]["explanations"][0]
    packed = as_b64.json()["results"][0]["explanations"][0]
    assert packed["heatmap"]["encoding"] == "base64"
    np.testing.assert_array_equal(_array(listed["heatmap"]), _array(packed["heatmap"]))
    upsampled = _array(packed["upsampled"])
    assert upsampled.shape == (60, 80)
    assert packed["upsampled"]["size"] == "original"
    np.testing.assert_array_equal(_array(listed["upsampled"]), upsampled)


def test_explain_raw_heatmap_keeps_the_layers_units_beside_the_normalised_map(
    client: TestClient, png: bytes
) -> None:
    response = client.post(
        "/v1/models/tiny/explain",
        files=_files(png),
        data={"layer": "layer3", "target": ["0", "1", "2", "3"], "overlay": "none"},
    )
    assert response.status_code == 200, response.text
    explanations = response.json()["results"][0]["explanations"]
    assert any(e["raw_range"]["max"] > 0 for e in explanations), "every map was all-negative"
    for explanation in explanations:
        raw = _array(explanation["raw_heatmap"])
        normalised = _array(explanation["heatmap"])
        assert raw.shape == normalised.shape == (4, 4)
        assert raw.min() >= 0.0  # rectified
        peak = explanation["raw_range"]["max"]
        if peak > 0:
            assert raw.max() == pytest.approx(peak, rel=1e-5)
            np.testing.assert_allclose(
                normalised, (raw - raw.min()) / (raw.max() - raw.min() + 1e-7), atol=1e-5
            )
        else:
            assert not raw.any()


def test_explain_json_body_with_options(client: TestClient, png: bytes) -> None:
    response = client.post(
        "/v1/models/tiny/explain",
        json={
            "images": [{"data": _b64(png)}],
            "layer": "layer4",
            "target": [0, "bird"],
            "method": "gradcam++",
            "threshold": 0.125,
            "colormap": "viridis",
            "alpha": 0.3,
            "overlay": "jpeg",
            "heatmap": False,
            "upsampled": "input",
            "encoding": "base64",
        },
    )
    assert response.status_code == 200, response.text
    explanations = response.json()["results"][0]["explanations"]
    assert [e["target"]["label"] for e in explanations] == ["cat", "bird"]
    for explanation in explanations:
        assert explanation["method"] == "gradcam++"
        assert explanation["heatmap"] is None
        assert explanation["overlay"]["media_type"] == "image/jpeg"
        upsampled = _array(explanation["upsampled"])
        assert upsampled.shape == (64, 64)
        assert explanation["upsampled"]["size"] == "input"
        # The threshold floor: nothing under 1/8 of the peak once normalised.
        assert upsampled.min() >= 0.125 - 1e-3 or upsampled.max() == 0.0


@pytest.mark.parametrize("method", [m for m in METHOD_NAMES if m != "scorecam"])
def test_explain_every_fast_method(client: TestClient, png: bytes, method: str) -> None:
    response = client.post(
        "/v1/models/tiny/explain",
        files=_files(png),
        data={"method": method, "overlay": "none"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["explanations"][0]["method"] == method


def test_explain_vit_panel_overlay(client: TestClient, make_image: ImageFactory) -> None:
    image = make_image(40, 50, seed=3)
    response = client.post(
        "/v1/models/vit/explain", files=_files(image), data={"overlay": "panel", "top_k": "2"}
    )
    assert response.status_code == 200, response.text
    explanations = response.json()["results"][0]["explanations"]
    assert len(explanations) == 2
    for explanation in explanations:
        assert explanation["layer"] == "blocks.1.norm1"
        assert _array(explanation["heatmap"]).shape == (4, 4)
        assert explanation["overlay"]["media_type"] == "image/png"
        panel = Image.open(io.BytesIO(base64.b64decode(explanation["overlay"]["data"])))
        assert panel.size == (explanation["overlay"]["width"], explanation["overlay"]["height"])


def test_an_empty_map_says_so_instead_of_returning_a_silent_blank(
    client: TestClient, make_image: ImageFactory
) -> None:
    image = make_image(40, 50, seed=3)
    # With class-token pooling the last block's output gets no gradient on its patch tokens.
    empty = client.post(
        "/v1/models/vit/explain", files=_files(image), data={"layer": "blocks.1", "overlay": "none"}
    )
    useful = client.post(
        "/v1/models/vit/explain",
        files=_files(image),
        data={"layer": "blocks.1.norm1", "overlay": "none"},
    )
    assert empty.status_code == 200, empty.text
    assert useful.status_code == 200, useful.text
    (blank,) = empty.json()["results"][0]["explanations"]
    assert not _array(blank["heatmap"]).any()
    assert len(blank["warnings"]) == 1
    assert "empty" in blank["warnings"][0]
    assert "norm1" in blank["warnings"][0]
    (informative,) = useful.json()["results"][0]["explanations"]
    assert informative["raw_range"]["max"] > 0
    assert informative["warnings"] == []


def test_explain_several_images_each_get_their_own(
    client: TestClient, make_image: ImageFactory
) -> None:
    images = [make_image(64, 64, seed=s) for s in range(3)]
    response = client.post(
        "/v1/models/tiny/explain", files=_files(*images), data={"overlay": "none"}
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["index"] for r in results] == [0, 1, 2]
    maps = [_array(r["explanations"][0]["heatmap"]) for r in results]
    assert not np.array_equal(maps[0], maps[1])


def test_grey_and_palette_images_are_accepted(client: TestClient, make_image: ImageFactory) -> None:
    grey = make_image(30, 30, mode="L")
    palette = make_image(30, 30, fmt="GIF", mode="P")
    response = client.post("/v1/models/tiny/predict", files=_files(grey, palette))
    assert response.status_code == 200, response.text
    modes = [r["original"]["mode"] for r in response.json()["results"]]
    assert modes == ["L", "P"]


def test_in_json_a_string_of_digits_is_a_label_and_a_number_an_index(
    client: TestClient, png: bytes
) -> None:
    body = {"images": [{"data": base64.b64encode(png).decode()}], "overlay": "none"}
    as_label = client.post("/v1/models/tiny/explain", json={**body, "target": ["3"]})
    assert as_label.status_code == 422, as_label.text
    assert as_label.json()["code"] == "unknown_target"
    as_index = client.post("/v1/models/tiny/explain", json={**body, "target": [3]})
    assert as_index.status_code == 200, as_index.text
    assert as_index.json()["results"][0]["explanations"][0]["target"]["label"] == "fish"


@pytest.mark.parametrize("endpoint", ["predict", "explain"])
def test_model_answers_name_the_replica_that_computed_them(
    client: TestClient, png: bytes, endpoint: str
) -> None:
    response = client.post(f"/v1/models/tiny/{endpoint}", files=_files(png))
    assert response.status_code == 200, response.text
    assert response.headers["x-gradcam-replica"] == f"{socket.gethostname()}/{os.getpid()}"
    documented = client.get("/openapi.json").json()["paths"][f"/v1/models/{{model}}/{endpoint}"]
    assert "X-Gradcam-Replica" in documented["post"]["responses"]["200"]["headers"]


def test_the_replica_is_named_by_whoever_runs_the_app(
    settings_factory: Callable[..., Settings],
    until_ready: Callable[[TestClient], None],
    tiny_spec: ModelSpec,
    png: bytes,
) -> None:
    app = create_app(settings_factory(models=[tiny_spec]), replica="GradCam#abc123")
    with TestClient(app) as named:
        until_ready(named)
        response = named.post("/v1/models/tiny/predict", files=_files(png))
        assert response.status_code == 200, response.text
        assert response.headers["x-gradcam-replica"] == "GradCam#abc123"
        assert "x-gradcam-replica" not in named.get("/v1/models").headers
