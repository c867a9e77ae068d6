"""Reading a DICOM upload safely: everything checked before any pixel is decoded.

Reading is split in two so that the caller
(:func:`service.engine.imaging.images.decode_image`) can apply the pixel limits between them:
:func:`open_dicom` parses the object without decoding any pixel (pydicom allocates the whole
declared output before it decodes, so a tiny compressed file that claims 60000 x 60000 pixels
would take gigabytes), and the :class:`~service.engine.imaging.dicom_decoding.DicomObject` it
returns then decodes one frame only and shows it (:mod:`service.engine.imaging.dicom_decoding`,
:mod:`service.engine.imaging.dicom_display`).

Before that, this module reads the transfer syntax from the file meta bytes, inflates a
deflated dataset in bounded steps (a deflate bomb is refused as too large), tells objects
without an image from truncated ones, checks the Image Pixel module, that a decoder handles the
encoding, and that native pixel data holds every declared frame.
"""

from __future__ import annotations

import io
import struct
import zlib

import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID

from service.engine.imaging.dicom_decoding import (
    COLOUR_INTERPRETATIONS,
    GREY_INTERPRETATIONS,
    DicomObject,
    PixelModule,
    check_decoder,
    sop_class_name,
)
from service.errors import (
    DicomWithoutImageError,
    ImageTooLargeError,
    InvalidImageError,
    TruncatedImageError,
    UnsupportedImageFormatError,
)

#: The name of the format in answers (``original.format``).
DICOM_FORMAT = "DICOM"

_PREAMBLE = 128
_MAGIC = b"DICM"
_META_START = _PREAMBLE + len(_MAGIC)
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_INFLATE_CHUNK = 1 << 20


def is_dicom(data: bytes) -> bool:
    """DICOM Part 10 files carry ``DICM`` after a 128-byte preamble."""
    return data[_PREAMBLE:_META_START] == _MAGIC


def open_dicom(data: bytes, max_inflated_bytes: int) -> DicomObject:
    """Parse a DICOM Part 10 file and check its Image Pixel module, decoding no pixel.

    A deflated object is inflated only up to ``max_inflated_bytes`` (then it is refused as
    too large). Raises :class:`InvalidImageError` for data that is not a readable DICOM object,
    :class:`DicomWithoutImageError` for objects without an image (reports, plans, waveforms),
    :class:`TruncatedImageError` when the declared pixel data is missing or short, and
    :class:`UnsupportedTransferSyntaxError` for encodings no installed decoder handles.
    """
    syntax, body = _file_meta(data)
    if syntax == pydicom.uid.DeflatedExplicitVRLittleEndian:
        _check_inflated_size(data[body:], max_inflated_bytes)
    ds = _read(data)
    if "PixelData" not in ds:
        # pydicom drops a cut-off dataset whole (an encapsulated Pixel Data without its end):
        # the header alone tells a truncated image from an object without one.
        _refuse_without_pixel_data(ds if len(ds) else _read(data, stop_before_pixels=True))
    pixels = _pixel_module(ds)
    check_decoder(syntax)
    _check_length(ds, pixels, syntax)
    return DicomObject(ds, pixels, syntax)


def _file_meta(data: bytes) -> tuple[UID, int]:
    """The transfer syntax from the file meta group, and where the dataset begins.

    Read here, from the bytes, because pydicom inflates a deflated dataset whole before
    anything can be checked.
    """
    offset, syntax = _META_START, None
    try:
        while offset + 8 <= len(data):
            group, element = struct.unpack_from("<HH", data, offset)
            if group != 0x0002:
                break
            vr = data[offset + 4 : offset + 6]
            if vr in _LONG_VRS:
                (length,) = struct.unpack_from("<I", data, offset + 8)
                start = offset + 12
            else:
                (length,) = struct.unpack_from("<H", data, offset + 6)
                start = offset + 8
            if element == 0x0010:
                syntax = data[start : start + length].rstrip(b"\x00 ").decode("ascii")
            offset = start + length
    except (struct.error, UnicodeDecodeError) as exc:
        raise InvalidImageError(
            "The DICOM file meta information is corrupt; re-export the object and try again."
        ) from exc
    if not syntax:
        raise InvalidImageError(
            "The DICOM file has no transfer syntax in its file meta information; re-export the"
            " object as a DICOM Part 10 file and try again."
        )
    return UID(syntax), offset


def _check_inflated_size(deflated: bytes, limit: int) -> None:
    """Inflate in bounded steps, keeping nothing, to refuse a deflate bomb before pydicom
    inflates the dataset in one piece."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total, pending = 0, deflated
    try:
        while pending:
            total += len(inflater.decompress(pending, _INFLATE_CHUNK))
            if total > limit:
                raise ImageTooLargeError(
                    f"The deflated DICOM dataset inflates to more than {limit:,} bytes, the most"
                    " accepted; send it uncompressed or with a pixel compression instead."
                )
            pending = inflater.unconsumed_tail
    except zlib.error as exc:
        raise InvalidImageError(
            "The deflated DICOM dataset is corrupt; check that the whole file was sent."
        ) from exc


def _read(data: bytes, *, stop_before_pixels: bool = False) -> Dataset:
    try:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=stop_before_pixels)
    except MemoryError:
        raise
    except Exception as exc:  # InvalidDicomError, struct.error, EOFError, ValueError, ...
        raise InvalidImageError(
            "The data starts like a DICOM file but could not be read; check that the whole"
            " file was sent."
        ) from exc


def _refuse_without_pixel_data(header: Dataset) -> None:
    """The error for an object without Pixel Data, as its header explains it."""
    if "FloatPixelData" in header or "DoubleFloatPixelData" in header:
        raise UnsupportedImageFormatError(
            "DICOM objects with floating-point pixel data (parametric maps) are not supported;"
            " send an image with integer Pixel Data.",
            allowed=[DICOM_FORMAT],
        )
    if "Rows" in header or "Columns" in header:
        raise TruncatedImageError(
            "The DICOM object declares an image but its Pixel Data is missing or cut off; check"
            " that the whole file was sent."
        )
    raise DicomWithoutImageError(
        f"The DICOM object ({sop_class_name(header.get('SOPClassUID'))}) holds no image: it has"
        " no Pixel Data (structured reports, plans and waveforms cannot be explained)."
    )


def _pixel_module(ds: Dataset) -> PixelModule:
    """The checked Image Pixel module of an object with Pixel Data."""
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1))
        bits_allocated = int(ds.BitsAllocated)
        bits_stored = int(ds.get("BitsStored", bits_allocated))
        frames = int(ds.get("NumberOfFrames") or 1)
        photometric = str(ds.PhotometricInterpretation).strip().upper()
    except MemoryError:
        raise
    except Exception as exc:  # missing or malformed attributes
        raise InvalidImageError(
            "The DICOM object's Image Pixel module is incomplete or malformed (Rows, Columns,"
            " Bits Allocated, Photometric Interpretation, Number of Frames)."
        ) from exc
    if photometric not in GREY_INTERPRETATIONS + COLOUR_INTERPRETATIONS:
        raise UnsupportedImageFormatError(
            f"DICOM images with photometric interpretation {photometric[:20]} are not"
            f" supported; accepted: {', '.join(GREY_INTERPRETATIONS + COLOUR_INTERPRETATIONS)}.",
            allowed=[DICOM_FORMAT],
        )
    if ds.PhotometricInterpretation != photometric:
        # The decoders and the display pipeline read the attribute itself: give them the
        # standard spelling of a value written in lower case or with padding.
        ds.PhotometricInterpretation = photometric
    expected_samples = 1 if photometric in (*GREY_INTERPRETATIONS, "PALETTE COLOR") else 3
    if (
        min(rows, columns, frames) < 1
        or samples != expected_samples
        or bits_allocated not in (1, 8, 16, 32)
        or not 1 <= bits_stored <= bits_allocated
    ):
        raise InvalidImageError(
            f"The DICOM object's Image Pixel module is inconsistent ({columns}x{rows} pixels,"
            f" {frames} frame(s), {samples} sample(s) per pixel for {photometric}, bits"
            f" allocated {bits_allocated}, bits stored {bits_stored})."
        )
    return PixelModule(rows, columns, frames, samples, bits_allocated, bits_stored, photometric)


def _check_length(ds: Dataset, pixels: PixelModule, syntax: UID) -> None:
    """Native pixel data must hold every declared frame (encapsulated frames are checked one
    by one before decoding)."""
    if syntax.is_encapsulated:
        return
    try:
        expected = get_expected_length(ds, "bytes")
    except MemoryError:
        raise
    except Exception as exc:
        raise InvalidImageError(
            "The DICOM object's Image Pixel module is malformed; re-export the object."
        ) from exc
    if len(ds.PixelData) < expected:
        raise TruncatedImageError(
            f"The DICOM object's pixel data is truncated: {len(ds.PixelData):,} of"
            f" {expected:,} bytes for {pixels.frames} frame(s) of {pixels.columns}x{pixels.rows};"
            " check that the whole file was sent."
        )
