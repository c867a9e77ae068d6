"""Secondary Capture results: valid DICOM read back strictly, filed under the source's study and
patient, new UIDs, a description of what they show, BurnedInAnnotation as it should be."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, validate_file_meta
from pydicom.uid import SecondaryCaptureImageStorage

from service.engine.imaging.dicom_decoding import DicomSource
from service.engine.imaging.dicom_display import DisplayOptions
from service.engine.imaging.images import decode_image
from service.engine.pictures.secondary_capture import CaptureContent, secondary_capture
from service.errors import InvalidImageError

DicomFactory = Callable[..., bytes]
CONTENT = CaptureContent("chest-xray", "layer4", "gradcam", "pneumothorax", 0.8125)
#: Attributes the Secondary Capture Image IOD requires (types 1 and 2), module by module.
REQUIRED = (
    *("PatientName", "PatientID", "PatientBirthDate", "PatientSex"),  # Patient
    *("StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID"),
    "AccessionNumber",  # General Study
    *("Modality", "SeriesInstanceUID", "SeriesNumber"),  # General Series
    "ConversionType",  # SC Equipment
    *("InstanceNumber", "PatientOrientation"),  # General Image
    *("SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated"),
    *("BitsStored", "HighBit", "PixelRepresentation", "PlanarConfiguration", "PixelData"),
    *("SOPClassUID", "SOPInstanceUID", "SpecificCharacterSet"),  # SOP Common
)


def _source(dicom_factory: DicomFactory, frames: int = 1, **attributes: Any) -> DicomSource:
    pixels = np.zeros((frames, 16, 24) if frames > 1 else (16, 24), dtype=np.uint8)
    decoded = decode_image(
        dicom_factory(pixels, "MONOCHROME2", 8, **attributes),
        display=DisplayOptions(frame=frames - 1),
    )
    assert decoded.dicom is not None
    return decoded.dicom


def _read_strictly(data: bytes, monkeypatch: pytest.MonkeyPatch) -> Dataset:
    """pydicom's validation: file meta to the standard, every value read in RAISE mode, and the
    Image Pixel module checked by decoding."""
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.RAISE)
    ds = pydicom.dcmread(io.BytesIO(data))
    validate_file_meta(ds.file_meta, enforce_standard=True)
    for _ in ds.iterall():
        pass
    ds.pixel_array  # noqa: B018 - decoding validates the Image Pixel module
    return ds


def test_a_capture_passes_pydicoms_validation_and_holds_the_picture(
    dicom_factory: DicomFactory, rng: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    picture = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.RAISE)
    data = secondary_capture(picture, _source(dicom_factory), CONTENT)
    ds = _read_strictly(data, monkeypatch)
    assert ds.SOPClassUID == SecondaryCaptureImageStorage
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert not [keyword for keyword in REQUIRED if keyword not in ds]
    assert (ds.PhotometricInterpretation, ds.ImageType) == ("RGB", ["DERIVED", "SECONDARY"])
    np.testing.assert_array_equal(ds.pixel_array, picture)


def test_a_capture_files_under_the_source_study_and_patient_with_new_uids(
    dicom_factory: DicomFactory, patient: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _source(dicom_factory, frames=3, StudyID="S-77")
    first = _read_strictly(
        secondary_capture(np.zeros((4, 4, 3), np.uint8), source, CONTENT), monkeypatch
    )
    second = _read_strictly(
        secondary_capture(np.zeros((4, 4, 3), np.uint8), source, CONTENT), monkeypatch
    )
    header = source.header
    assert first.StudyInstanceUID == second.StudyInstanceUID == header.StudyInstanceUID
    assert first.StudyID == "S-77"
    assert len({first.SeriesInstanceUID, second.SeriesInstanceUID, header.SeriesInstanceUID}) == 3
    assert len({first.SOPInstanceUID, second.SOPInstanceUID, header.SOPInstanceUID}) == 3
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
    ):
        assert str(first.get(keyword)) == patient[keyword]
    assert "InstitutionName" not in first  # only what filing needs is copied
    reference = first.SourceImageSequence[0]
    assert reference.ReferencedSOPInstanceUID == header.SOPInstanceUID
    assert reference.ReferencedFrameNumber == 3  # the last of three frames, counted from 1


def test_a_name_in_another_character_set_is_written_in_utf8_and_reads_back_the_same(
    dicom_factory: DicomFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _source(dicom_factory, SpecificCharacterSet="ISO_IR 100", PatientName="Müller^Jürgen")
    ds = _read_strictly(
        secondary_capture(np.zeros((4, 4, 3), np.uint8), source, CONTENT), monkeypatch
    )
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == "Müller^Jürgen"


@pytest.mark.parametrize(
    ("source_says", "capture_says"), [("NO", "NO"), ("YES", "YES"), (None, "YES")]
)
def test_burned_in_annotation_is_no_only_when_the_source_says_no(
    dicom_factory: DicomFactory, source_says: str | None, capture_says: str
) -> None:
    attributes = {"BurnedInAnnotation": source_says} if source_says else {}
    data = secondary_capture(
        np.zeros((4, 4, 3), np.uint8), _source(dicom_factory, **attributes), CONTENT
    )
    assert pydicom.dcmread(io.BytesIO(data)).BurnedInAnnotation == capture_says


def test_de_identified_sources_stay_marked_as_such(dicom_factory: DicomFactory) -> None:
    source = _source(
        dicom_factory, PatientIdentityRemoved="YES", DeidentificationMethod="basic profile"
    )
    ds = pydicom.dcmread(
        io.BytesIO(secondary_capture(np.zeros((4, 4, 3), np.uint8), source, CONTENT))
    )
    assert (ds.PatientIdentityRemoved, ds.DeidentificationMethod) == ("YES", "basic profile")


def test_the_series_description_names_model_layer_method_and_target_within_64_characters(
    dicom_factory: DicomFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _source(dicom_factory)
    short = _read_strictly(
        secondary_capture(np.zeros((4, 4, 3), np.uint8), source, CONTENT), monkeypatch
    )
    assert short.SeriesDescription == "gradcam pneumothorax | chest-xray layer4"
    assert "probability 0.8125" in short.DerivationDescription
    long = CaptureContent("m" * 40, "blocks.11.norm1", "gradcam++", "left\\right effusion", 0.5)
    ds = _read_strictly(secondary_capture(np.zeros((4, 4, 3), np.uint8), source, long), monkeypatch)
    assert len(ds.SeriesDescription) == 64
    assert ds.SeriesDescription.startswith("gradcam++ left/right effusion | mmm")
    assert ds.SeriesDescription.endswith("...")


@pytest.mark.parametrize("shape", [(4, 4), (4, 4, 4)])
def test_only_rgb_pictures_are_captured(
    dicom_factory: DicomFactory, shape: tuple[int, ...]
) -> None:
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        secondary_capture(np.zeros(shape, np.uint8), _source(dicom_factory), CONTENT)


def test_a_header_that_cannot_be_written_is_refused_without_quoting_it(
    dicom_factory: DicomFactory, patient: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*_: Any, **__: Any) -> None:
        raise ValueError(f"With tag (0010,0010) got exception: {patient['PatientName']!r}")

    source = _source(dicom_factory)
    monkeypatch.setattr(Dataset, "save_as", fail)
    with pytest.raises(InvalidImageError) as info:
        secondary_capture(np.zeros((4, 4, 3), np.uint8), source, CONTENT)
    assert info.value.code == "dicom_header_unwritable"
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__  # tracebacks do not show pydicom's message
    assert "Zyxwut" not in info.value.detail
