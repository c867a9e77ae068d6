"""DICOM uploads: reading an object safely and showing one frame as a radiology viewer does.

Reading is split in two so that the caller
(:func:`service.engine.imaging.images.decode_image`) can apply the pixel limits between them:
:func:`open_dicom` parses the object without decoding any pixel (pydicom allocates the whole
declared output before it decodes, so a tiny compressed file that claims 60000 x 60000 pixels
would take gigabytes), and :meth:`DicomObject.display` then decodes one frame only and runs the
display pipeline of PS3.3 C.11 / PS3.4 N.2:

1. modality LUT: Rescale Slope/Intercept or the Modality LUT Sequence;
2. VOI transform: the caller's window, else the file's first window (LINEAR, LINEAR_EXACT or
   SIGMOID) or its VOI LUT Sequence, else the 0.5th-99.5th percentile range of the frame
   (data of at most 8 stored bits without rescaling is shown over its full range instead);
   enhanced multi-frame objects keep rescale and window per frame in their functional groups;
3. MONOCHROME1 is inverted, so that high values are dark, as the object asks.

Colour objects (RGB, YBR_*, PALETTE COLOR) become 8-bit RGB. Patient data never leaves this
module except in :class:`DicomSource`, whose header is for writing derived objects and is
never shown in its ``repr`` or in any error.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pydicom
import pydicom.config
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut
from pydicom.pixels.utils import get_expected_length
from pydicom.pixels.utils import pixel_array as decode_pixels
from pydicom.uid import UID

from service.engine.imaging.dicom_display import (
    AppliedWindow,
    DisplayOptions,
    grey_display,
    to_u8,
)
from service.errors import (
    DicomWithoutImageError,
    ImageTooLargeError,
    InvalidImageError,
    InvalidParameterError,
    TruncatedImageError,
    UnsupportedImageFormatError,
    UnsupportedTransferSyntaxError,
)

#: The name of the format in answers (``original.format``).
DICOM_FORMAT = "DICOM"
#: Photometric interpretations shown in grey, and those that become RGB.
GREY_INTERPRETATIONS = ("MONOCHROME1", "MONOCHROME2")
COLOUR_INTERPRETATIONS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")

#: Uploads are untrusted: pydicom must not put their values in warnings (its default reading
#: mode warns "Invalid value for VR PN: '<the value>'"), which would bring patient data to the
#: logs. Set once, at import, never per call.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

_PREAMBLE = 128
_MAGIC = b"DICM"
_META_START = _PREAMBLE + len(_MAGIC)
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_INFLATE_CHUNK = 1 << 20
#: Start-of-frame markers of JPEG (SOF0-SOF15 but DHT, JPG, DAC) and JPEG-LS (SOF55).
_JPEG_FAMILY_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
_J2K_START = b"\xff\x4f\xff\x51"  # SOC, then SIZ
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


@dataclass(frozen=True)
class DicomDescription:
    """What a DICOM upload was, without any patient data."""

    sop_class: str
    transfer_syntax: str
    modality: str | None
    photometric_interpretation: str
    bits_stored: int
    rows: int
    columns: int
    number_of_frames: int
    frame: int
    window: AppliedWindow | None  # None for colour objects


@dataclass(frozen=True, eq=False)
class DicomSource:
    """A decoded DICOM upload's description, and its header (patient, study, series, ...)
    without pixel data, for the objects derived from it. The header is identifying: it is kept
    out of ``repr`` and never logged or echoed."""

    description: DicomDescription
    header: Dataset = field(repr=False)


#: The file's own window, and its first frame.
DEFAULT_DISPLAY = DisplayOptions()


def is_dicom(data: bytes) -> bool:
    """DICOM Part 10 files carry ``DICM`` after a 128-byte preamble."""
    return data[_PREAMBLE:_META_START] == _MAGIC


# ------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class _Pixels:
    """The Image Pixel module of an object (checked, not decoded)."""

    rows: int
    columns: int
    frames: int
    samples: int
    bits_allocated: int
    bits_stored: int
    photometric: str


class DicomObject:
    """A parsed DICOM object with pixel data, none of it decoded yet."""

    def __init__(self, dataset: Dataset, pixels: _Pixels, transfer_syntax: UID) -> None:
        self._ds = dataset
        self._pixels = pixels
        self._syntax = transfer_syntax

    @property
    def rows(self) -> int:
        return self._pixels.rows

    @property
    def columns(self) -> int:
        return self._pixels.columns

    @property
    def frames(self) -> int:
        return self._pixels.frames

    @property
    def declared_bytes(self) -> int:
        """Bytes of the whole decoded pixel data: Rows x Columns x frames x samples x bytes."""
        p = self._pixels
        return p.rows * p.columns * p.frames * p.samples * max(1, p.bits_allocated // 8)

    def display(
        self, options: DisplayOptions = DEFAULT_DISPLAY
    ) -> tuple[npt.NDArray[np.uint8], DicomSource]:
        """Decode ``options.frame`` only and show it: an HxW (grey) or HxWx3 (RGB) uint8 array,
        and the object's description with its header.

        Call it only once the size is known to be acceptable (:attr:`declared_bytes`).
        """
        p = self._pixels
        if not 0 <= options.frame < p.frames:
            raise InvalidParameterError(
                f"frame {options.frame} does not exist: the object has {p.frames} frame(s),"
                f" numbered 0 to {p.frames - 1}.",
                code="frame_out_of_range",
            )
        raw = self._decode(options.frame)
        window: AppliedWindow | None = None
        try:
            if p.photometric in GREY_INTERPRETATIONS:
                shown, window = grey_display(self._ds, raw, options)
            elif p.photometric == "PALETTE COLOR":
                shown = to_u8(apply_color_lut(raw, self._ds), None)
            else:
                shown = to_u8(raw, p.bits_stored)
        except MemoryError:
            raise
        except Exception as exc:  # malformed rescale, LUT or palette attributes
            raise InvalidImageError(
                "The DICOM object's display attributes (rescale, modality or VOI LUT, palette)"
                " are malformed; re-export the object."
            ) from exc
        del self._ds.PixelData  # the header alone goes on; the encoded pixels are done with
        description = DicomDescription(
            sop_class=_name(self._ds.get("SOPClassUID")),
            transfer_syntax=self._syntax.name,
            modality=_text(self._ds.get("Modality")),
            photometric_interpretation=p.photometric,
            bits_stored=p.bits_stored,
            rows=p.rows,
            columns=p.columns,
            number_of_frames=p.frames,
            frame=options.frame,
            window=window,
        )
        return shown, DicomSource(description=description, header=self._ds)

    def _decode(self, frame: int) -> np.ndarray:
        """One frame, decoded by pydicom and its plugins (YBR becomes RGB)."""
        if self._syntax.is_encapsulated:
            self._check_codestream(frame)
        try:
            return decode_pixels(self._ds, index=frame)
        except MemoryError:
            raise
        except Exception as exc:  # decoders raise many types on bad data
            raise InvalidImageError(
                f"Frame {frame} of the DICOM object ({self._syntax.name}) is corrupt and could"
                " not be decoded; check that the whole file was sent."
            ) from exc

    def _check_codestream(self, frame: int) -> None:
        """A compressed frame's own header must declare the object's size: decoders allocate
        what the codestream says, whatever Rows and Columns say."""
        p = self._pixels
        try:
            encoded = get_frame(self._ds.PixelData, frame, number_of_frames=p.frames)
        except MemoryError:
            raise
        except Exception as exc:
            raise TruncatedImageError(
                f"The DICOM object's compressed pixel data has no complete frame {frame}; check"
                " that the whole file was sent."
            ) from exc
        size = _codestream_size(encoded)
        if size is not None and size != (p.columns, p.rows):
            raise InvalidImageError(
                f"Frame {frame}'s compressed data declares {size[0]}x{size[1]} pixels but the"
                f" DICOM header {p.columns}x{p.rows}; the object is corrupt."
            )


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
    _check_decoder(syntax)
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
        f"The DICOM object ({_name(header.get('SOPClassUID'))}) holds no image: it has no Pixel"
        " Data (structured reports, plans and waveforms cannot be explained)."
    )


def _pixel_module(ds: Dataset) -> _Pixels:
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
    return _Pixels(rows, columns, frames, samples, bits_allocated, bits_stored, photometric)


def _check_decoder(syntax: UID) -> None:
    try:
        available = get_decoder(syntax).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise UnsupportedTransferSyntaxError(
            f"DICOM objects encoded as {syntax.name} are not supported; send it uncompressed"
            " or as JPEG, JPEG-LS, JPEG 2000 or RLE.",
            allowed=list(SUPPORTED_TRANSFER_SYNTAXES),
        )


def _check_length(ds: Dataset, pixels: _Pixels, syntax: UID) -> None:
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


def _codestream_size(encoded: bytes) -> tuple[int, int] | None:
    """(width, height) a JPEG, JPEG-LS or JPEG 2000 codestream declares ((0, 0) when it has no
    readable size); None for other data (RLE, whose decoder works from Rows and Columns)."""
    if encoded.startswith(_JP2_SIGNATURE):  # a JP2 file where a codestream belongs
        start = encoded.find(_J2K_START)
        encoded = encoded[start:] if start >= 0 else b""
        if not encoded:
            return (0, 0)
    if encoded.startswith(_J2K_START):  # SOC, SIZ: Lsiz, Rsiz, then Xsiz, Ysiz, XOsiz, YOsiz
        if len(encoded) < 24:
            return (0, 0)
        xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", encoded, 8)
        return xsiz - xosiz, ysiz - yosiz
    if not encoded.startswith(b"\xff\xd8"):
        return None
    offset = 2  # JPEG: SOI, then marker segments up to a SOF
    while offset + 9 <= len(encoded) and encoded[offset] == 0xFF:
        while encoded[offset + 1] == 0xFF and offset + 10 <= len(encoded):
            offset += 1  # fill bytes before a marker
        marker = encoded[offset + 1]
        if marker in _JPEG_FAMILY_SOF:
            height, width = struct.unpack_from(">HH", encoded, offset + 5)
            return width, height
        (length,) = struct.unpack_from(">H", encoded, offset + 2)
        offset += 2 + length
    return (0, 0)


def _name(uid: object) -> str:
    return UID(str(uid)).name if uid else "unknown SOP class"


def _text(value: object) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text or None


#: Transfer syntaxes the installed decoders handle (for errors and the documentation).
SUPPORTED_TRANSFER_SYNTAXES: tuple[str, ...] = tuple(
    uid.name
    for uid in (
        pydicom.uid.ImplicitVRLittleEndian,
        pydicom.uid.ExplicitVRLittleEndian,
        pydicom.uid.DeflatedExplicitVRLittleEndian,
        pydicom.uid.ExplicitVRBigEndian,
        pydicom.uid.JPEGBaseline8Bit,
        pydicom.uid.JPEGExtended12Bit,
        pydicom.uid.JPEGLossless,
        pydicom.uid.JPEGLosslessSV1,
        pydicom.uid.JPEGLSLossless,
        pydicom.uid.JPEGLSNearLossless,
        pydicom.uid.JPEG2000Lossless,
        pydicom.uid.JPEG2000,
        pydicom.uid.HTJ2KLossless,
        pydicom.uid.HTJ2KLosslessRPCL,
        pydicom.uid.HTJ2K,
        pydicom.uid.RLELossless,
    )
    if get_decoder(uid).is_available
)
