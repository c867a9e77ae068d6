"""Decoding one frame of a parsed DICOM object and showing it, and which encodings can be.

:class:`DicomObject` is what :func:`service.engine.imaging.dicom_reading.open_dicom` returns: an
object whose Image Pixel module has been checked and none of whose pixels has been decoded. Its
:meth:`~DicomObject.display` decodes the one frame asked for (a compressed frame's codestream
must first declare the object's own size, since decoders allocate what the codestream says) and
shows it: grey objects through the viewer's pipeline of
:mod:`service.engine.imaging.dicom_display`, colour objects (RGB, YBR_*, PALETTE COLOR) as 8-bit
RGB. :data:`SUPPORTED_TRANSFER_SYNTAXES` are the encodings the installed decoders handle.

Patient data never leaves these modules except in :class:`DicomSource`, whose header is for
writing derived objects and is never shown in its ``repr`` or in any error.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pydicom
import pydicom.config
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut
from pydicom.pixels.utils import pixel_array as decode_pixels
from pydicom.uid import UID

from service.engine.imaging.dicom_display import (
    AppliedWindow,
    DisplayOptions,
    grey_display,
    to_u8,
)
from service.errors import (
    InvalidImageError,
    InvalidParameterError,
    TruncatedImageError,
    UnsupportedTransferSyntaxError,
)

#: Photometric interpretations shown in grey, and those that become RGB.
GREY_INTERPRETATIONS = ("MONOCHROME1", "MONOCHROME2")
COLOUR_INTERPRETATIONS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")

#: Uploads are untrusted: pydicom must not put their values in warnings (its default reading
#: mode warns "Invalid value for VR PN: '<the value>'"), which would bring patient data to the
#: logs. pydicom converts values when they are first used, so this is set here, in the module
#: that every user of an upload's dataset imports (the reader, the Secondary Capture writer);
#: set once, at import, never per call.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

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


@dataclass(frozen=True)
class PixelModule:
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

    def __init__(self, dataset: Dataset, pixels: PixelModule, transfer_syntax: UID) -> None:
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
            sop_class=sop_class_name(self._ds.get("SOPClassUID")),
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


def check_decoder(syntax: UID) -> None:
    """Refuse a transfer syntax no installed decoder handles."""
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


def sop_class_name(uid: object) -> str:
    """The SOP class's name, for descriptions and errors."""
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
