"""DICOM uploads: the display pipeline, checked pixel for pixel against independent
computations, every encoding the plugins decode, hostile objects, and where patient data goes."""

from __future__ import annotations

import io
import json
import logging
import math
import struct
import subprocess
import sys
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import (
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from service.engine.cam.explain import ImageRequest, explain
from service.engine.imaging import dicom_decoding
from service.engine.imaging.dicom_display import AppliedWindow, DisplayOptions, Window, apply_window
from service.engine.imaging.dicom_reading import is_dicom
from service.engine.imaging.images import DecodedImage, ImageLimits, decode_image
from service.engine.models.loaded import LoadedModel
from service.engine.models.preprocess import preprocess
from service.errors import (
    DicomWithoutImageError,
    ImageTooLargeError,
    InvalidImageError,
    InvalidParameterError,
    ServiceError,
    TruncatedImageError,
    UnsupportedTransferSyntaxError,
)

DicomFactory = Callable[..., bytes]
Loader = Callable[..., LoadedModel]
REPO_ROOT = Path(__file__).resolve().parents[3]

#: A CT slice: 12 bits stored in 16, rescaled to Hounsfield units, a soft-tissue window.
CT_WINDOW = {"RescaleSlope": 1, "RescaleIntercept": -1024, "WindowCenter": 40, "WindowWidth": 400}


def ct_pixels(rows: int = 40, columns: int = 48) -> np.ndarray:
    """Stored values around the window (HU -400..+500) and a few at the ends of the range."""
    stored = np.linspace(624, 1524, rows * columns).reshape(rows, columns)
    stored[0, :4] = (0, 1, 4094, 4095)
    return np.rint(stored).astype(np.uint16)


def shown(decoded: DecodedImage) -> np.ndarray:
    """The displayed frame; grey frames are stored as three equal channels."""
    rgb = np.asarray(decoded.image)
    if decoded.dicom is not None and decoded.dicom.description.window is not None:
        assert (rgb[..., 0] == rgb[..., 1]).all()
        assert (rgb[..., 0] == rgb[..., 2]).all()
        return rgb[..., 0]
    return rgb


def bundled(name: str) -> bytes:
    path = get_testdata_file(name)
    assert path is not None, name
    return Path(str(path)).read_bytes()


# --- independent computations -------------------------------------------------------------------


def standard_linear(x: float, center: float, width: float) -> int:
    """PS3.3 C.11.2.1.2.1, written out per pixel, with y in 0..255 rounded half up."""
    if x <= center - 0.5 - (width - 1) / 2:
        y = 0.0
    elif x > center - 0.5 + (width - 1) / 2:
        y = 255.0
    else:
        y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    return math.floor(y + 0.5)


def pydicom_display(data: bytes) -> np.ndarray:
    """pydicom's own modality LUT and windowing, mapped from its output range to 0..255."""
    ds = pydicom.dcmread(io.BytesIO(data))
    arr = ds.pixel_array
    values = apply_voi_lut(apply_modality_lut(arr, ds), ds)
    bits, signed = int(ds.BitsStored), int(ds.PixelRepresentation) == 1
    y_min = -(2 ** (bits - 1)) if signed else 0
    y_max = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    if "RescaleSlope" in ds:
        y_min = y_min * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        y_max = y_max * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return np.floor((values - y_min) / (y_max - y_min) * 255.0 + 0.5)


# --- the display pipeline -----------------------------------------------------------------------


def test_a_16_bit_ct_is_rescaled_then_shown_through_its_window(
    dicom_factory: DicomFactory,
) -> None:
    stored = ct_pixels()
    data = dicom_factory(stored, "MONOCHROME2", 12, **CT_WINDOW)
    decoded = decode_image(data)
    expected = np.array(
        [[standard_linear(float(v) - 1024, 40, 400) for v in row] for row in stored]
    )
    np.testing.assert_array_equal(shown(decoded), expected)
    assert np.abs(shown(decoded) - pydicom_display(data)).max() <= 1
    assert 0 < (shown(decoded) == 0).sum() < stored.size  # both ends of the window are used
    assert 0 < (shown(decoded) == 255).sum() < stored.size
    assert decoded.dicom is not None
    assert decoded.dicom.description.window == AppliedWindow(40.0, 400.0, "LINEAR", "file")


def test_the_callers_window_overrides_the_files(dicom_factory: DicomFactory) -> None:
    stored = ct_pixels()
    data = dicom_factory(stored, "MONOCHROME2", 12, **CT_WINDOW)
    decoded = decode_image(data, display=DisplayOptions(window=Window(300, 1500)))
    expected = np.array(
        [[standard_linear(float(v) - 1024, 300, 1500) for v in row] for row in stored]
    )
    np.testing.assert_array_equal(shown(decoded), expected)
    assert decoded.dicom is not None
    assert decoded.dicom.description.window == AppliedWindow(300.0, 1500.0, "LINEAR", "request")


def test_monochrome1_is_inverted_after_windowing(dicom_factory: DicomFactory) -> None:
    stored = ct_pixels()
    mono2 = decode_image(dicom_factory(stored, "MONOCHROME2", 12, **CT_WINDOW))
    mono1 = decode_image(dicom_factory(stored, "MONOCHROME1", 12, **CT_WINDOW))
    np.testing.assert_array_equal(shown(mono1), 255 - shown(mono2))
    assert mono1.original_mode == "MONOCHROME1"


def test_a_lower_case_photometric_interpretation_is_read_as_the_standard_one(
    dicom_factory: DicomFactory,
) -> None:
    stored = ct_pixels()
    standard = dicom_factory(stored, "MONOCHROME1", 12, **CT_WINDOW)
    ds = pydicom.dcmread(io.BytesIO(standard))
    ds.PhotometricInterpretation = "monochrome1"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    lower = decode_image(buffer.getvalue())
    np.testing.assert_array_equal(shown(lower), shown(decode_image(standard)))
    assert lower.original_mode == "MONOCHROME1"


def test_without_a_window_the_percentile_range_is_shown_instead_of_wrapping(
    dicom_factory: DicomFactory,
) -> None:
    stored = ct_pixels()
    stored[5:9, 5:9] = 4095  # a bright spot outside the 0.5-99.5 percentile range
    data = dicom_factory(stored, "MONOCHROME2", 12, RescaleSlope=1, RescaleIntercept=-1024)
    decoded = decode_image(data)
    hu = stored.astype(np.float64) - 1024
    low, high = np.percentile(hu, 0.5), np.percentile(hu, 99.5)
    expected = np.clip(np.floor((hu - low) / (high - low) * 255 + 0.5), 0, 255)
    np.testing.assert_array_equal(shown(decoded), expected)
    # monotonic: brighter tissue is never shown darker (a cast to 8 bits would wrap around)
    order = np.argsort(hu, axis=None, kind="stable")
    assert (np.diff(shown(decoded).ravel()[order].astype(int)) >= 0).all()
    assert decoded.dicom is not None
    window = decoded.dicom.description.window
    assert window is not None
    assert (window.source, window.function) == ("percentile", "LINEAR_EXACT")
    assert window.center == pytest.approx((low + high) / 2)


def test_eight_bit_data_without_a_window_is_shown_over_its_full_range(
    dicom_factory: DicomFactory,
) -> None:
    stored = np.arange(256, dtype=np.uint8).reshape(16, 16)
    decoded = decode_image(dicom_factory(stored, "MONOCHROME2", 8))
    np.testing.assert_array_equal(shown(decoded), stored)


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_the_files_voi_lut_function_is_applied(dicom_factory: DicomFactory, function: str) -> None:
    stored = ct_pixels()
    data = dicom_factory(stored, "MONOCHROME2", 12, **CT_WINDOW, VOILUTFunction=function)
    hu = stored.astype(np.float64) - 1024
    if function == "SIGMOID":
        expected = np.floor(255 / (1 + np.exp(-4 * (hu - 40) / 400)) + 0.5)
    else:
        expected = np.clip(np.floor(((hu - 40) / 400 + 0.5) * 255 + 0.5), 0, 255)
    np.testing.assert_array_equal(shown(decode_image(data)), expected)
    assert np.abs(shown(decode_image(data)) - pydicom_display(data)).max() <= 1


def _lut(bits: int, values: list[int]) -> Dataset:
    """A LUT Sequence item mapping stored values from 0 to ``values``, ``bits`` deep."""
    lut = Dataset()
    lut.LUTDescriptor = [len(values), 0, bits]
    lut.add_new(0x00283006, "US", values)  # LUT Data, US rather than the ambiguous OW
    return lut


def test_a_voi_lut_sequence_is_applied_when_there_is_no_window(
    dicom_factory: DicomFactory,
) -> None:
    stored = np.arange(256, dtype=np.uint8).reshape(16, 16)
    lut = _lut(8, [min(255, 2 * i) for i in range(256)])
    decoded = decode_image(dicom_factory(stored, "MONOCHROME2", 8, VOILUTSequence=[lut]))
    np.testing.assert_array_equal(shown(decoded), np.minimum(255, 2 * stored.astype(int)))
    assert decoded.dicom is not None
    assert decoded.dicom.description.window == AppliedWindow(None, None, "LUT", "voi_lut")


def test_a_modality_lut_sequence_maps_stored_values_before_the_window(
    dicom_factory: DicomFactory,
) -> None:
    stored = np.arange(256, dtype=np.uint16).reshape(16, 16)
    lut = _lut(16, [10 * i for i in range(256)])
    lut.ModalityLUTType = "US"
    data = dicom_factory(
        stored, "MONOCHROME2", 8, ModalityLUTSequence=[lut], WindowCenter=1000, WindowWidth=801
    )
    expected = [[standard_linear(10.0 * v, 1000, 801) for v in row] for row in stored]
    np.testing.assert_array_equal(shown(decode_image(data)), expected)


def test_enhanced_multi_frame_objects_use_their_functional_groups(
    dicom_factory: DicomFactory,
) -> None:
    frames = np.stack([ct_pixels(), ct_pixels()[::-1]])

    def group(sequence: str, **values: Any) -> Dataset:
        item, holder = Dataset(), Dataset()
        for keyword, value in values.items():
            setattr(item, keyword, value)
        setattr(holder, sequence, [item])
        return holder

    shared = group("PixelValueTransformationSequence", RescaleSlope=2, RescaleIntercept=-2048)
    per_frame = [
        group("FrameVOILUTSequence", WindowCenter=center, WindowWidth=width)
        for center, width in ((0, 500), (400, 2000))
    ]
    data = dicom_factory(
        frames,
        "MONOCHROME2",
        12,
        SharedFunctionalGroupsSequence=[shared],
        PerFrameFunctionalGroupsSequence=per_frame,
    )
    for frame, (center, width) in enumerate(((0, 500), (400, 2000))):
        decoded = decode_image(data, display=DisplayOptions(frame=frame))
        expected = [
            [standard_linear(2.0 * v - 2048, center, width) for v in row] for row in frames[frame]
        ]
        np.testing.assert_array_equal(shown(decoded), expected)
        assert decoded.dicom is not None
        assert decoded.dicom.description.frame == frame
        assert decoded.dicom.description.number_of_frames == 2


def test_the_requested_frame_of_a_multi_frame_object_is_shown(
    dicom_factory: DicomFactory,
) -> None:
    frames = np.stack([np.full((12, 16), 40 * i, dtype=np.uint8) for i in range(4)])
    frames[2, 3:6, 4:9] = 255
    data = dicom_factory(frames, "MONOCHROME2", 8)
    for frame in range(4):
        decoded = decode_image(data, display=DisplayOptions(frame=frame))
        np.testing.assert_array_equal(shown(decoded), frames[frame])


@pytest.mark.parametrize("frame", [4, 100])
def test_a_frame_that_does_not_exist_is_an_invalid_parameter(
    dicom_factory: DicomFactory, frame: int
) -> None:
    data = dicom_factory(np.zeros((4, 12, 16), dtype=np.uint8), "MONOCHROME2", 8)
    with pytest.raises(InvalidParameterError) as info:
        decode_image(data, display=DisplayOptions(frame=frame))
    assert info.value.code == "frame_out_of_range"
    assert "0 to 3" in info.value.detail


def test_rgb_pixels_are_kept_as_they_are(dicom_factory: DicomFactory, rng: Any) -> None:
    pixels = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    decoded = decode_image(dicom_factory(pixels, "RGB", 8))
    np.testing.assert_array_equal(np.asarray(decoded.image), pixels)
    assert decoded.dicom is not None
    assert decoded.dicom.description.window is None


@pytest.mark.parametrize(
    "syntax", [RLELossless, JPEG2000Lossless, ExplicitVRBigEndian, ImplicitVRLittleEndian]
)
def test_compressed_and_other_encodings_show_the_same_pixels(
    dicom_factory: DicomFactory, syntax: str
) -> None:
    stored = ct_pixels()
    plain = decode_image(dicom_factory(stored, "MONOCHROME2", 12, **CT_WINDOW))
    encoded = decode_image(dicom_factory(stored, "MONOCHROME2", 12, syntax=syntax, **CT_WINDOW))
    np.testing.assert_array_equal(shown(encoded), shown(plain))
    assert encoded.dicom is not None
    assert encoded.dicom.description.transfer_syntax == pydicom.uid.UID(syntax).name


def test_a_compressed_multi_frame_colour_object_shows_the_requested_frame(
    dicom_factory: DicomFactory, rng: Any
) -> None:
    frames = rng.integers(0, 256, (3, 16, 20, 3), dtype=np.uint8)
    data = dicom_factory(frames, "RGB", 8, syntax=RLELossless)
    decoded = decode_image(data, display=DisplayOptions(frame=1))
    np.testing.assert_array_equal(np.asarray(decoded.image), frames[1])


MR_VARIANTS = [
    "MR_small_RLE.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_expb.dcm",
    "MR_small_implicit.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_padded.dcm",
]


@pytest.mark.parametrize("name", MR_VARIANTS)
def test_pydicoms_mr_in_every_lossless_encoding_shows_the_same_pixels(name: str) -> None:
    reference = decode_image(bundled("MR_small.dcm"))
    np.testing.assert_array_equal(shown(decode_image(bundled(name))), shown(reference))


def test_pydicoms_mr_is_shown_through_its_file_window_as_pydicom_computes_it() -> None:
    data = bundled("MR_small.dcm")
    assert np.abs(shown(decode_image(data)) - pydicom_display(data)).max() <= 1


@pytest.mark.parametrize(
    ("name", "size", "mode"),
    [
        ("CT_small.dcm", (128, 128), "MONOCHROME2"),
        ("JPEG2000.dcm", (256, 1024), "MONOCHROME2"),  # JPEG 2000 lossy
        ("JPGExtended.dcm", (256, 1024), "MONOCHROME2"),  # JPEG extended, 12 bit
        ("JPEGLSNearLossless_16.dcm", (10, 50), "MONOCHROME2"),
        ("image_dfl.dcm", (512, 512), "MONOCHROME2"),  # deflated dataset
        ("SC_rgb_jpeg_dcmtk.dcm", (100, 100), "YBR_FULL"),  # JPEG baseline
        ("SC_rgb_jpeg_gdcm.dcm", (100, 100), "RGB"),  # JPEG lossless
        ("examples_ybr_color.dcm", (320, 240), "YBR_FULL_422"),  # multi-frame JPEG baseline
        ("SC_ybr_full_422_uncompressed.dcm", (100, 100), "YBR_FULL_422"),
        ("examples_palette.dcm", (800, 350), "PALETTE COLOR"),
        ("SC_rgb_rle_16bit.dcm", (100, 100), "RGB"),
    ],
)
def test_pydicoms_test_files_decode(name: str, size: tuple[int, int], mode: str) -> None:
    decoded = decode_image(bundled(name))
    assert (decoded.width, decoded.height) == size
    assert decoded.original_mode == mode
    assert decoded.format == "DICOM"
    assert np.asarray(decoded.image).std() > 5  # a picture, not a blank


@pytest.mark.parametrize(
    "name",
    ["SC_rgb_jpeg_gdcm.dcm", "SC_rgb_gdcm_KY.dcm", "SC_rgb_rle_16bit.dcm", "SC_rgb_rle_32bit.dcm"],
)
def test_colour_objects_become_the_same_rgb_whatever_their_encoding(name: str) -> None:
    reference = np.asarray(decode_image(bundled("SC_rgb_rle.dcm")).image)
    np.testing.assert_array_equal(np.asarray(decode_image(bundled(name)).image), reference)


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_dcmtk.dcm", "SC_ybr_full_422_uncompressed.dcm"])
def test_ybr_objects_become_rgb(name: str) -> None:
    reference = np.asarray(decode_image(bundled("SC_rgb_rle.dcm")).image).astype(int)
    assert np.abs(np.asarray(decode_image(bundled(name)).image) - reference).mean() < 1.0


def test_the_window_functions_follow_the_standard_at_their_edges() -> None:
    values = np.array([-1000.0, 19.5, 19.6, 39.5, 40.0, 59.4, 59.5, 1000.0])
    linear = apply_window(values, AppliedWindow(40, 41, "LINEAR", "request"))
    assert linear.tolist() == [standard_linear(v, 40, 41) for v in values]
    assert linear[[0, -1]].tolist() == [0, 255]
    step = apply_window(values, AppliedWindow(40, 1, "LINEAR", "request"))
    assert step.tolist() == [0, 0, 0, 0, 255, 255, 255, 255]
    constant = apply_window(values, AppliedWindow(40, 0, "LINEAR_EXACT", "percentile"))
    assert not constant.any()


# --- each explained on a 3-channel and a 1-channel model ----------------------------------------


@pytest.fixture(scope="module")
def explained_models(load_tiny: Loader) -> dict[str, LoadedModel]:
    options: dict[str, Any] = {"num_classes": 3, "preprocessing": {"input_size": (64, 64)}}
    return {
        "rgb": load_tiny("resnet18", **options),
        "grey": load_tiny("resnet18", **options, in_chans=1),
    }


@pytest.mark.parametrize("channels", ["rgb", "grey"])
@pytest.mark.parametrize(
    "kind", ["ct", "monochrome1", "multi_frame", "rgb", "rle", "jpeg2000", "pydicom_jpeg"]
)
def test_dicom_objects_are_explained_by_rgb_and_grey_models(
    dicom_factory: DicomFactory,
    explained_models: dict[str, LoadedModel],
    rng: Any,
    channels: str,
    kind: str,
) -> None:
    stored = ct_pixels()
    data = {
        "ct": lambda: dicom_factory(stored, "MONOCHROME2", 12, **CT_WINDOW),
        "monochrome1": lambda: dicom_factory(stored, "MONOCHROME1", 12, **CT_WINDOW),
        "multi_frame": lambda: dicom_factory(np.stack([stored, stored[::-1]]), "MONOCHROME2", 12),
        "rgb": lambda: dicom_factory(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8), "RGB", 8),
        "rle": lambda: dicom_factory(stored, "MONOCHROME2", 12, syntax=RLELossless, **CT_WINDOW),
        "jpeg2000": lambda: dicom_factory(stored, "MONOCHROME2", 12, syntax=JPEG2000Lossless),
        "pydicom_jpeg": lambda: bundled("SC_rgb_jpeg_dcmtk.dcm"),
    }[kind]()
    model = explained_models[channels]
    decoded = decode_image(data, display=DisplayOptions(frame=1 if kind == "multi_frame" else 0))
    tensor, _ = preprocess(decoded.image, model.preprocessing)
    assert tensor.shape[0] == (1 if channels == "grey" else 3)
    result = explain(model, tensor[None], [ImageRequest(top_k=2)])
    assert len(result.maps[0]) == 2
    for cam in result.maps[0]:
        assert cam.grid.shape == model.layer().grid
        assert np.isfinite(cam.input_map).all()
    assert torch.isfinite(tensor).all()


# --- hostile objects ----------------------------------------------------------------------------


def _set_header(data: bytes, **attributes: Any) -> bytes:
    """The same object with header attributes rewritten (pixel data untouched)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any pixel is decoded."""

    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(dicom_decoding, "decode_pixels", refuse)


def test_native_pixel_data_cut_short_is_truncated(dicom_factory: DicomFactory) -> None:
    data = dicom_factory(ct_pixels(), "MONOCHROME2", 12, **CT_WINDOW)
    with pytest.raises(TruncatedImageError) as info:
        decode_image(data[: len(data) - 1000])
    assert info.value.code == "truncated_pixel_data"
    assert info.value.category == "invalid_image"


def test_compressed_pixel_data_cut_short_is_truncated(dicom_factory: DicomFactory) -> None:
    data = dicom_factory(ct_pixels(), "MONOCHROME2", 12, syntax=RLELossless)
    with pytest.raises(TruncatedImageError):
        decode_image(data[: len(data) - 200])


@pytest.mark.parametrize("name", ["test-SR.dcm", "rtplan.dcm", "waveform_ecg.dcm"])
def test_objects_without_pixel_data_hold_no_image(name: str) -> None:
    with pytest.raises(DicomWithoutImageError) as info:
        decode_image(bundled(name))
    assert info.value.code == "dicom_without_image"
    assert info.value.category == "unsupported_media"


@pytest.mark.usefixtures("no_pixel_decoding")
@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_a_tiny_compressed_file_declaring_a_huge_image_is_refused_before_decoding(
    dicom_factory: DicomFactory, syntax: str
) -> None:
    data = dicom_factory(np.zeros((32, 32), dtype=np.uint16), "MONOCHROME2", 12, syntax=syntax)
    huge = _set_header(data, Rows=60000, Columns=60000)
    assert len(huge) < 4096
    with pytest.raises(ImageTooLargeError, match="60000x60000"):
        decode_image(huge)


@pytest.mark.usefixtures("no_pixel_decoding")
def test_frames_times_pixels_over_the_byte_budget_is_refused_before_decoding(
    dicom_factory: DicomFactory,
) -> None:
    """Each 64x64 frame is within 10,000 pixels, but 8 frames of 2 bytes per pixel are 65,536
    bytes, over the budget of 10,000 pixels at 4 bytes."""
    data = dicom_factory(np.zeros((8, 64, 64), dtype=np.uint16), "MONOCHROME2", 12)
    with pytest.raises(ImageTooLargeError, match=r"8 frame\(s\) of 64x64"):
        decode_image(data, ImageLimits(max_pixels=10_000))


def _lying_frame(j2k: bytes, width: int, height: int, *, jp2: bool = False) -> bytes:
    """The object's frame with a SIZ that declares ``width`` x ``height`` pixels, as a bare
    codestream or wrapped in a JP2 file (non-conformant in DICOM, yet found in the wild)."""
    ds = pydicom.dcmread(io.BytesIO(j2k))
    frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    frame = frame[:8] + struct.pack(">II", width, height) + frame[16:]
    if jp2:
        signature = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
        frame = signature + struct.pack(">I", 8 + len(frame)) + b"jp2c" + frame
    ds.PixelData = encapsulate([frame])
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.usefixtures("no_pixel_decoding")
@pytest.mark.parametrize("jp2", [False, True])
def test_a_codestream_declaring_more_pixels_than_the_header_is_refused(
    dicom_factory: DicomFactory, jp2: bool
) -> None:
    j2k = dicom_factory(
        np.zeros((32, 32), dtype=np.uint16), "MONOCHROME2", 12, syntax=JPEG2000Lossless
    )
    with pytest.raises(InvalidImageError, match="declares 40000x40000 pixels"):
        decode_image(_lying_frame(j2k, 40000, 40000, jp2=jp2))


def test_a_deflate_bomb_is_refused_while_inflating(
    dicom_factory: DicomFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    deflated = dicom_factory(
        np.zeros((8, 8), dtype=np.uint8),
        "MONOCHROME2",
        8,
        syntax=pydicom.uid.DeflatedExplicitVRLittleEndian,
    )
    assert decode_image(deflated).width == 8
    (meta_length,) = struct.unpack_from("<I", deflated, 140)  # (0002,0000) after "DICM"
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = packer.compress(bytes(64 << 20)) + packer.flush()  # 64 MiB in about 64 KiB
    monkeypatch.setattr(pydicom, "dcmread", _refuse)
    with pytest.raises(ImageTooLargeError, match="inflates to more than"):
        decode_image(deflated[: 144 + meta_length] + bomb, ImageLimits(max_pixels=1_000_000))


def _refuse(*_: Any, **__: Any) -> Any:
    raise AssertionError("the dataset was read")


@pytest.mark.parametrize("malformed", ["rescale", "voi_lut"])
def test_malformed_display_attributes_are_an_invalid_image(
    dicom_factory: DicomFactory, malformed: str
) -> None:
    if malformed == "rescale":  # a slope that is no number, written over a valid one
        data = dicom_factory(ct_pixels(), "MONOCHROME2", 12, RescaleSlope="7.25")
        data = data.replace(b"7.25", b"x.yz", 1)
    else:  # a VOI LUT item without its descriptor and data
        data = dicom_factory(ct_pixels(), "MONOCHROME2", 12, VOILUTSequence=[Dataset()])
    with pytest.raises(InvalidImageError, match="display attributes"):
        decode_image(data)


def test_random_bytes_after_the_dicm_marker_are_invalid(rng: Any) -> None:
    junk = bytes(128) + b"DICM" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert is_dicom(junk)
    with pytest.raises(InvalidImageError) as info:
        decode_image(junk)
    assert info.value.code == "invalid_image"


def test_an_unsupported_transfer_syntax_is_refused_naming_the_supported_ones(
    dicom_factory: DicomFactory,
) -> None:
    data = dicom_factory(np.zeros((8, 8), dtype=np.uint8), "MONOCHROME2", 8)
    private = data.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.3.4.5.6.7.8.9.10", 1)
    with pytest.raises(UnsupportedTransferSyntaxError) as info:
        decode_image(private)
    assert info.value.code == "unsupported_transfer_syntax"
    assert info.value.allowed is not None
    assert "RLE Lossless" in info.value.allowed


def test_hostile_objects_keep_memory_bounded_in_a_fresh_process(
    dicom_factory: DicomFactory, tmp_path: Path
) -> None:
    """Peak resident memory of a process that refuses the hostile objects, next to one that
    only imports: the huge declared sizes would take gigabytes if anything were allocated."""
    tiny = np.zeros((32, 32), dtype=np.uint16)
    rle = dicom_factory(tiny, "MONOCHROME2", 12, syntax=RLELossless)
    j2k = dicom_factory(tiny, "MONOCHROME2", 12, syntax=JPEG2000Lossless)
    hostile = [
        _set_header(rle, Rows=60000, Columns=60000),
        _set_header(rle, NumberOfFrames=200_000, Rows=512, Columns=512),
        _lying_frame(j2k, 30000, 30000),
    ]
    for i, blob in enumerate(hostile):
        (tmp_path / f"{i}.dcm").write_bytes(blob)
    script = (
        "import json, resource, sys, pathlib\n"
        "from service.engine.imaging.images import decode_image\n"
        "from service.errors import ServiceError\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "codes = []\n"
        "for path in sorted(pathlib.Path(sys.argv[1]).glob('*.dcm')):\n"
        "    try:\n"
        "        decode_image(path.read_bytes())\n"
        "        codes.append('decoded')\n"
        "    except ServiceError as exc:\n"
        "        codes.append(exc.code)\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps({'codes': codes, 'grown_kib': peak - base}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
        check=True,
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["codes"] == ["image_too_large", "image_too_large", "invalid_image"]
    assert report["grown_kib"] < 64 * 1024  # under 64 MiB


# --- patient data -------------------------------------------------------------------------------


def test_no_patient_attribute_reaches_a_log_line_a_warning_or_an_error(
    dicom_factory: DicomFactory,
    patient: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    stored = ct_pixels()
    with pydicom.config.disable_value_validation():
        # a value pydicom's default reading mode would warn about, quoting it
        invalid_name = dicom_factory(
            stored, "MONOCHROME2", 12, PatientName="Zyxwut^Quorra^Ingrid" + "\x07" * 70
        )
    valid = dicom_factory(stored, "MONOCHROME2", 12, syntax=RLELossless, **CT_WINDOW)
    uploads = [
        invalid_name,
        valid,
        valid[: len(valid) - 300],
        dicom_factory(stored, "MONOCHROME2", 12)[:-500],
        _set_header(valid, Rows=60000, Columns=60000),
        dicom_factory(
            np.zeros((8, 8), dtype=np.uint8), "MONOCHROME2", 8, PhotometricInterpretation="HSV"
        ),
        dicom_factory(
            np.zeros((8, 8), dtype=np.uint8),
            "MONOCHROME2",
            8,
            PixelData=None,
            Rows=None,
            Columns=None,
        ),
    ]
    messages: list[str] = []
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for data in uploads:
            for frame in (0, 3):
                try:
                    decoded = decode_image(data, display=DisplayOptions(frame=frame))
                    messages.append(repr(decoded))
                except ServiceError as exc:
                    messages.extend((exc.detail, str(exc), repr(exc.allowed)))
    messages += [record.getMessage() for record in caplog.records]
    messages += [str(warning.message) for warning in caught]
    text = "\n".join(messages)
    assert "truncated" in text  # the errors were raised and collected
    for value in patient.values():
        for part in value.split("^"):
            assert len(part) < 3 or part not in text  # PatientSex "F" is in any text
