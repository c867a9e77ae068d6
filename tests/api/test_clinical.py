"""The clinical path over HTTP: DICOM uploads, windows and frames, grey and multi-label models,
Secondary Capture results, and patient data kept out of answers and logs."""

from __future__ import annotations

import base64
import io
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.dataset import validate_file_meta
from pydicom.uid import RLELossless, SecondaryCaptureImageStorage

DicomFactory = Callable[..., bytes]
ImageFactory = Callable[..., bytes]
EXPLAIN = "/v1/models/{}/explain"
CT = {"RescaleSlope": 1, "RescaleIntercept": -1024, "WindowCenter": 40, "WindowWidth": 400}


def _ct(dicom_factory: DicomFactory, frames: int = 1, **attributes: Any) -> bytes:
    stored = np.rint(np.linspace(624, 1524, 40 * 48)).reshape(40, 48).astype(np.uint16)
    pixels = np.stack([stored + 10 * i for i in range(frames)]) if frames > 1 else stored
    return dicom_factory(pixels, "MONOCHROME2", 12, **{**CT, **attributes})


def _files(data: bytes, media_type: str = "application/dicom") -> dict[str, Any]:
    return {"image": ("scan.dcm", data, media_type)}


def _picture(overlay: dict[str, Any]) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(overlay["data"]))).convert("RGB"))


def _linear(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM's LINEAR window to 0..255, written as clip and scale."""
    scaled = ((hu - (center - 0.5)) / (width - 1) + 0.5) * 255
    return np.clip(np.floor(scaled + 0.5), 0, 255).astype(np.uint8)


# --- DICOM in ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "media_type", ["application/dicom", "application/octet-stream", "image/png"]
)
def test_a_dicom_upload_is_recognised_by_its_content_and_described(
    clinical_client: TestClient, dicom_factory: DicomFactory, media_type: str
) -> None:
    response = clinical_client.post(
        EXPLAIN.format("xray"), files=_files(_ct(dicom_factory), media_type)
    )
    assert response.status_code == 200, response.text
    original = response.json()["results"][0]["original"]
    assert original == {
        "width": 48,
        "height": 40,
        "mode": "MONOCHROME2",
        "format": "DICOM",
        "dicom": {
            "sop_class": "Secondary Capture Image Storage",
            "transfer_syntax": "Explicit VR Little Endian",
            "modality": "OT",
            "photometric_interpretation": "MONOCHROME2",
            "bits_stored": 12,
            "rows": 40,
            "columns": 48,
            "number_of_frames": 1,
            "frame": 0,
            "window": {"center": 40.0, "width": 400.0, "function": "LINEAR", "source": "file"},
        },
    }


def test_a_dicom_upload_in_json_base64_with_a_data_url(
    clinical_client: TestClient, dicom_factory: DicomFactory
) -> None:
    data = dicom_factory(
        np.zeros((3, 24, 32), dtype=np.uint8), "MONOCHROME2", 8, syntax=RLELossless
    )
    encoded = "data:application/dicom;base64," + base64.b64encode(data).decode("ascii")
    response = clinical_client.post(
        "/v1/models/tiny/predict", json={"images": [{"data": encoded}], "frame": 2}
    )
    assert response.status_code == 200, response.text
    dicom = response.json()["results"][0]["original"]["dicom"]
    assert (dicom["frame"], dicom["number_of_frames"]) == (2, 3)
    assert dicom["transfer_syntax"] == "RLE Lossless"


def test_the_overlay_is_drawn_on_the_requested_window_of_the_requested_frame(
    clinical_client: TestClient, dicom_factory: DicomFactory
) -> None:
    """With alpha 0 the overlay is the displayed frame itself: pixel for pixel the window."""
    data = _ct(dicom_factory, frames=3)
    response = clinical_client.post(
        EXPLAIN.format("xray"),
        files=_files(data),
        data={"window_center": "300", "window_width": "1500", "frame": "2", "alpha": "0"},
    )
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert result["original"]["dicom"]["frame"] == 2
    assert result["original"]["dicom"]["window"] == {
        "center": 300.0,
        "width": 1500.0,
        "function": "LINEAR",
        "source": "request",
    }
    stored = pydicom.dcmread(io.BytesIO(data)).pixel_array[2].astype(np.float64)
    expected = _linear(stored - 1024, 300, 1500)
    picture = _picture(result["explanations"][0]["overlay"])
    np.testing.assert_array_equal(picture, np.repeat(expected[..., None], 3, axis=2))


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"window_center": "40"}, "give window_center and window_width together"),
        ({"window_center": "40", "window_width": "0"}, "window_width"),
        ({"window_center": "nan", "window_width": "400"}, "window_center"),
        ({"frame": "-1"}, "frame"),
        ({"min_probability": "1.5"}, "min_probability"),
    ],
)
def test_bad_clinical_parameters_are_422_naming_the_field(
    clinical_client: TestClient, dicom_factory: DicomFactory, fields: dict[str, str], where: str
) -> None:
    response = clinical_client.post(
        EXPLAIN.format("xray"), files=_files(_ct(dicom_factory)), data=fields
    )
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "invalid_parameter"
    assert where in response.json()["detail"]


def test_a_frame_beyond_the_object_is_422_naming_the_image(
    clinical_client: TestClient, dicom_factory: DicomFactory, make_image: ImageFactory
) -> None:
    files = [
        ("image", ("photo.png", make_image(), "image/png")),
        ("image", ("scan.dcm", _ct(dicom_factory, frames=2), "application/dicom")),
    ]
    response = clinical_client.post(EXPLAIN.format("tiny"), files=files, data={"frame": "2"})
    assert response.status_code == 422, response.text
    body = response.json()
    assert (body["code"], body["image_index"]) == ("frame_out_of_range", 1)


def _hostile(dicom_factory: DicomFactory, kind: str) -> bytes:
    from pydicom.data import get_testdata_file

    valid = _ct(dicom_factory)
    if kind == "truncated":
        return valid[:-700]
    if kind == "no_pixel_data":
        return Path(str(get_testdata_file("test-SR.dcm"))).read_bytes()
    if kind == "huge_compressed":
        ds = pydicom.dcmread(io.BytesIO(_ct(dicom_factory, syntax=RLELossless)))
        ds.Rows, ds.Columns = 60000, 60000
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()
    if kind == "unsupported_syntax":
        return valid.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.3.4.5.6.7.8.9.10", 1)
    return bytes(128) + b"DICM" + np.random.default_rng(3).bytes(2048)


@pytest.mark.parametrize(
    ("kind", "status", "code"),
    [
        ("truncated", 400, "truncated_pixel_data"),
        ("no_pixel_data", 415, "dicom_without_image"),
        ("huge_compressed", 413, "image_too_large"),
        ("unsupported_syntax", 415, "unsupported_transfer_syntax"),
        ("random_after_marker", 400, "invalid_image"),
    ],
)
def test_hostile_dicoms_are_clear_problems_and_the_server_stays_up(
    clinical_client: TestClient,
    dicom_factory: DicomFactory,
    kind: str,
    status: int,
    code: str,
) -> None:
    response = clinical_client.post(
        EXPLAIN.format("xray"), files=_files(_hostile(dicom_factory, kind))
    )
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == code
    assert response.json()["image_index"] == 0
    assert clinical_client.get("/livez").status_code == 200


# --- grey and multi-label models -----------------------------------------------------------------


def test_a_grey_multi_label_model_reports_its_channel_and_activation(
    clinical_client: TestClient,
) -> None:
    info = clinical_client.get("/v1/models/xray").json()
    assert info["preprocessing"]["channels"] == 1
    assert len(info["preprocessing"]["mean"]) == len(info["preprocessing"]["std"]) == 1
    assert info["activation"] == "sigmoid"
    rgb = clinical_client.get("/v1/models/tiny").json()
    assert (rgb["preprocessing"]["channels"], rgb["activation"]) == (3, "softmax")


def test_a_multi_label_model_gives_each_class_its_own_probability(
    clinical_client: TestClient, make_image: ImageFactory
) -> None:
    files = {"image": ("photo.png", make_image(), "image/png")}
    sigmoid = clinical_client.post("/v1/models/xray/predict", files=files).json()
    softmax = clinical_client.post("/v1/models/tiny/predict", files=files).json()
    total = sum(p["probability"] for p in sigmoid["results"][0]["predictions"])
    assert total > 1.05  # three sigmoids near 0.5 each, not one distribution
    assert sum(p["probability"] for p in softmax["results"][0]["predictions"]) == pytest.approx(1)


def test_min_probability_explains_every_class_reaching_it(
    clinical_client: TestClient, dicom_factory: DicomFactory
) -> None:
    files = _files(_ct(dicom_factory))
    every = clinical_client.post(EXPLAIN.format("xray"), files=files, data={"min_probability": "0"})
    assert every.status_code == 200, every.text
    result = every.json()["results"][0]
    probabilities = [e["target"]["probability"] for e in result["explanations"]]
    assert len(probabilities) == 3
    assert probabilities == sorted(probabilities, reverse=True)
    assert result["warnings"] == []

    none = clinical_client.post(EXPLAIN.format("xray"), files=files, data={"min_probability": "1"})
    assert none.status_code == 200, none.text
    result = none.json()["results"][0]
    assert result["explanations"] == []
    assert "No class reaches min_probability 1" in result["warnings"][0]


@pytest.mark.parametrize("other", [{"target": "nodule"}, {"top_k": "2"}])
def test_min_probability_with_another_way_of_choosing_classes_is_refused(
    clinical_client: TestClient, dicom_factory: DicomFactory, other: dict[str, str]
) -> None:
    response = clinical_client.post(
        EXPLAIN.format("xray"),
        files=_files(_ct(dicom_factory)),
        data={"min_probability": "0.5", **other},
    )
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "conflicting_parameters"


# --- results a clinical system can keep ----------------------------------------------------------


def test_overlay_dicom_is_a_valid_secondary_capture_of_the_same_picture_in_the_same_study(
    clinical_client: TestClient,
    dicom_factory: DicomFactory,
    patient: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = _ct(dicom_factory, frames=2)
    fields = {"target": "nodule", "layer": "layer3", "frame": "1"}
    png = clinical_client.post(EXPLAIN.format("xray"), files=_files(data), data=fields)
    answer = clinical_client.post(
        EXPLAIN.format("xray"), files=_files(data), data={**fields, "overlay": "dicom"}
    )
    assert answer.status_code == 200, answer.text
    overlay = answer.json()["results"][0]["explanations"][0]["overlay"]
    assert overlay["media_type"] == "application/dicom"
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.RAISE)
    capture = pydicom.dcmread(io.BytesIO(base64.b64decode(overlay["data"])))
    for _ in capture.iterall():  # every value converted, and validated
        pass
    validate_file_meta(capture.file_meta, enforce_standard=True)
    source = pydicom.dcmread(io.BytesIO(data))
    assert capture.SOPClassUID == SecondaryCaptureImageStorage
    assert capture.StudyInstanceUID == source.StudyInstanceUID
    assert capture.SeriesInstanceUID != source.SeriesInstanceUID
    assert capture.SOPInstanceUID != source.SOPInstanceUID
    assert str(capture.PatientName) == patient["PatientName"]
    assert (capture.PatientID, capture.AccessionNumber) == (
        patient["PatientID"],
        patient["AccessionNumber"],
    )
    assert capture.SeriesDescription == "gradcam nodule | xray layer3"
    assert capture.BurnedInAnnotation == "YES"  # the source does not say it has none
    assert capture.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert capture.SourceImageSequence[0].ReferencedFrameNumber == 2
    assert (capture.Rows, capture.Columns, capture.SamplesPerPixel) == (40, 48, 3)
    picture = _picture(png.json()["results"][0]["explanations"][0]["overlay"])
    np.testing.assert_array_equal(capture.pixel_array, picture)


def test_overlay_dicom_of_a_non_dicom_upload_is_refused_before_any_work(
    clinical_client: TestClient, make_image: ImageFactory
) -> None:
    response = clinical_client.post(
        EXPLAIN.format("tiny"),
        files={"image": ("photo.png", make_image(), "image/png")},
        data={"overlay": "dicom"},
    )
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "dicom_overlay_needs_dicom"


# --- patient data -------------------------------------------------------------------------------


def test_no_patient_attribute_reaches_a_log_line_or_an_answer(
    clinical_client: TestClient,
    dicom_factory: DicomFactory,
    patient: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pydicom.config.disable_value_validation():
        # a UID pydicom's default reading mode warns about when it is read (copied into the
        # Secondary Capture), quoting it: "Invalid value for VR UI: '1.2.826.0.1.0998...'"
        odd = _ct(dicom_factory, StudyInstanceUID="1.2.826.0.1.0998877665544")
    uploads = [_ct(dicom_factory), odd] + [
        _hostile(dicom_factory, kind)
        for kind in ("truncated", "no_pixel_data", "huge_compressed", "unsupported_syntax")
    ]
    bodies: list[str] = []
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # warnings reach stderr in production
        for data in uploads:
            for fields in ({"overlay": "dicom"}, {"overlay": "panel", "frame": "5"}):
                response = clinical_client.post(
                    EXPLAIN.format("xray"), files=_files(data), data=fields
                )
                bodies.append(response.text)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    logged += "\n".join(str(warning.message) for warning in caught)
    assert "path=/v1/models/{model}/explain status=200" in logged  # the access log was captured
    assert "status=400" in logged
    for value in [*patient.values(), "0998877665544"]:  # UIDs identify too (PS3.15)
        for part in value.split("^"):
            if len(part) > 2:
                assert part not in logged
                assert all(part not in body for body in bodies)
