"""Decoding uploaded image bytes into RGB pictures, safely.

Uploads are untrusted: they may be empty, truncated, in a format the service does not accept,
or crafted to declare enormous dimensions (decompression bombs). ``decode_image`` classifies
each failure as a domain error the HTTP layer can map (400 invalid, 415 unsupported, 413 too
large) and checks the declared size *before* any pixel buffer is allocated.

Pillow's own bomb protection lives in ``Image.open``, which warns (``DecompressionBombWarning``)
between ``MAX_IMAGE_PIXELS`` and twice that, and only raises above. A warning cannot be turned
into an error per call without mutating the process-wide warning filters (``catch_warnings`` is
not thread-safe), so this module identifies images through Pillow's plugin registry directly,
which parses only the header, then applies its own limits, and Pillow's ``MAX_IMAGE_PIXELS`` as a
hard limit too, before decoding. Nothing here mutates global state per call, so it is safe to
call from many threads at once.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageFile, ImageOps

from service.engine.imaging.dicom_decoding import DEFAULT_DISPLAY, DicomSource
from service.engine.imaging.dicom_display import DisplayOptions
from service.engine.imaging.dicom_reading import DICOM_FORMAT, is_dicom, open_dicom
from service.errors import ImageTooLargeError, InvalidImageError, UnsupportedImageFormatError

#: Container formats accepted for upload, as Pillow names them. Anything else Pillow recognises
#: (ICO, TGA, PPM, PSD, ...) is refused as unsupported rather than decoded: each extra parser is
#: attack surface, and the list is what the API documents.
ACCEPTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF")
#: Every format accepted: Pillow's, and DICOM (recognised by its ``DICM`` marker, decoded by
#: :mod:`service.engine.imaging.dicom_reading` and :mod:`~service.engine.imaging.dicom_decoding`).
UPLOAD_FORMATS: tuple[str, ...] = (*ACCEPTED_FORMATS, DICOM_FORMAT)
#: Bytes of decoded pixel data allowed per pixel of the limit: an RGBA (or CMYK) image at the
#: pixel limit, the most Pillow decodes any accepted format to. A DICOM object's declared pixel
#: data (all frames, all samples) must fit in the same budget.
BYTES_PER_PIXEL_BUDGET = 4
#: Room for a deflated DICOM dataset's attributes besides its pixel data.
_DICOM_HEADER_BUDGET = 16 * 1024 * 1024

#: Pillow modes holding one unsigned 16-bit (or, for "I", 32-bit signed) integer per pixel.
_WIDE_INT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
#: Modes that carry an alpha channel; they are composited over white.
_EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
_WHITE = (255, 255, 255)
_ACCEPTED_LIST = ", ".join(UPLOAD_FORMATS)

# Load every plugin once, at import, so that the registry consulted per call is complete and is
# never mutated while requests are being served.
Image.init()


@dataclass(frozen=True)
class ImageLimits:
    """Largest image the service will decode, checked from the header before decoding pixels.

    ``max_pixels`` bounds memory (an RGB image takes 3 bytes per pixel, intermediate copies
    more); ``max_side`` bounds either dimension, which also stops absurd aspect ratios.
    """

    max_pixels: int = 40_000_000
    max_side: int = 16_384

    def __post_init__(self) -> None:
        if self.max_pixels < 1 or self.max_side < 1:
            msg = f"image limits must be positive, got {self}"
            raise ValueError(msg)

    @property
    def max_decoded_bytes(self) -> int:
        """Most bytes of decoded pixel data one upload may declare."""
        return self.max_pixels * BYTES_PER_PIXEL_BUDGET


#: The limits used when the caller does not pass any.
DEFAULT_LIMITS = ImageLimits()


@dataclass(frozen=True)
class DecodedImage:
    """An uploaded image decoded to RGB, with what it was before conversion.

    ``image`` is a plain in-memory ``"RGB"`` image with EXIF orientation already applied;
    ``width`` and ``height`` are the upload's displayed dimensions, which ``image`` has unless
    it was decoded reduced (``decode_image``'s ``scale``). ``format`` is one of
    ``UPLOAD_FORMATS`` and ``original_mode`` the Pillow mode the file decoded to (e.g.
    ``"I;16"``, ``"CMYK"``, ``"P"``, ``"LA"``; for DICOM its photometric interpretation), useful
    for logging and for explaining results. A DICOM upload's ``image`` is the frame as a viewer
    displays it (windowed), and ``dicom`` describes it and keeps its header for derived objects.
    """

    image: Image.Image
    format: str
    original_mode: str
    width: int
    height: int
    dicom: DicomSource | None = field(default=None, repr=False)


#: ``scale(width, height)``: the smallest scale at which the caller needs an image of this
#: upright size; 1.0 asks for every pixel.
ScaleNeeded = Callable[[int, int], float]


def decode_image(
    data: bytes,
    limits: ImageLimits = DEFAULT_LIMITS,
    display: DisplayOptions | None = None,
    scale: ScaleNeeded | None = None,
) -> DecodedImage:
    """Decode uploaded bytes into an RGB image, refusing anything unsafe or unusable.

    Raises ``InvalidImageError`` for empty, unrecognisable, truncated or corrupt data,
    ``UnsupportedImageFormatError`` for a real image in a format outside ``UPLOAD_FORMATS``,
    and ``ImageTooLargeError`` when the declared dimensions exceed ``limits`` (checked before the
    pixels are decoded). Only the first frame of animated GIF/WebP/PNG or multi-page TIFF files
    is used; a DICOM object shows the frame and window of ``display`` (default: its first frame,
    its own window).

    With ``scale``, only the pixels needed are decoded: a JPEG at the smallest DCT scaling (1/2,
    1/4, 1/8) still at least ``scale(width, height)`` of its size, other formats reduced by the
    largest whole factor that keeps it (box averaging). ``width`` and ``height`` stay the
    upload's own, so the result's ``image`` may be smaller than they say.
    """
    if not data:
        raise InvalidImageError(
            f"The uploaded image is empty (0 bytes); send the bytes of a {_ACCEPTED_LIST} file."
        )
    if is_dicom(data):
        return _decode_dicom(data, limits, display or DEFAULT_DISPLAY)
    fmt, im = _open_header(data)
    with im:
        _check_size(im.size, limits)
        width, height = _upright_size(im)
        needed = min(1.0, scale(width, height)) if scale is not None else 1.0
        if needed < 1.0 and fmt == "JPEG":
            # DCT-domain scaling: decodes 1/2, 1/4 or 1/8 of the pixels, at least the size asked.
            im.draft(im.mode, (math.ceil(im.width * needed), math.ceil(im.height * needed)))
        try:
            im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _too_large(im.size, limits) from exc
        except MemoryError:
            raise
        except Exception as exc:  # Pillow's decoders raise many types on bad data.
            raise InvalidImageError(
                f"The {fmt} image is truncated or corrupt and could not be decoded; "
                "check that the whole file was sent, or re-save it and try again."
            ) from exc
        original_mode = im.mode
        _apply_exif_orientation(im)
        rgb = _reduced(_to_rgb(im), math.ceil(width * needed), math.ceil(height * needed))
    return DecodedImage(
        image=rgb, format=fmt, original_mode=original_mode, width=width, height=height
    )


def _upright_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed: EXIF orientations 5 to 8 swap the stored sides."""
    try:
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except MemoryError:
        raise
    except Exception:  # Malformed EXIF is ignored, as by _apply_exif_orientation.
        orientation = 1
    return (im.height, im.width) if orientation in (5, 6, 7, 8) else im.size


def _reduced(im: Image.Image, min_width: int, min_height: int) -> Image.Image:
    """``im`` shrunk by the largest whole factor that keeps it at least the size given."""
    factor = min(im.width // max(1, min_width), im.height // max(1, min_height))
    return im.reduce(factor) if factor >= 2 else im


def _decode_dicom(data: bytes, limits: ImageLimits, display: DisplayOptions) -> DecodedImage:
    """A DICOM object's frame as displayed; its size is checked before any pixel is decoded."""
    dicom = open_dicom(data, max_inflated_bytes=limits.max_decoded_bytes + _DICOM_HEADER_BUDGET)
    _check_size((dicom.columns, dicom.rows), limits)
    if dicom.declared_bytes > limits.max_decoded_bytes:
        raise ImageTooLargeError(
            f"The DICOM object declares {dicom.frames} frame(s) of {dicom.columns}x{dicom.rows}"
            f" pixels, {dicom.declared_bytes:,} bytes of pixel data; the most accepted is"
            f" {limits.max_decoded_bytes:,} bytes. Send fewer frames or a smaller image."
        )
    shown, source = dicom.display(display)
    rgb = Image.fromarray(shown, "RGB") if shown.ndim == 3 else _gray_to_rgb(shown)
    return DecodedImage(
        image=rgb,
        format=DICOM_FORMAT,
        original_mode=source.description.photometric_interpretation,
        width=rgb.width,
        height=rgb.height,
        dicom=source,
    )


def _open_header(data: bytes) -> tuple[str, ImageFile.ImageFile]:
    """Identify ``data`` and parse its header only; return the accepted format and the image.

    This mirrors ``Image.open`` (each plugin's magic-byte check, then its header parser) but
    without Pillow's bomb check, which would warn instead of failing; ``decode_image`` applies
    its own limits right after. Accepted formats are tried first; data whose magic bytes claim
    an accepted format but whose header does not parse is invalid, not unsupported.
    """
    prefix = data[:16]
    for fmt in ACCEPTED_FORMATS:
        entry = Image.OPEN.get(fmt)
        if entry is None:  # Pillow built without this codec (e.g. no libwebp).
            continue
        factory, accept = entry
        verdict = _accepts(accept, prefix)
        if not verdict or isinstance(verdict, str):  # a str means "recognised, no codec"
            continue
        try:
            return fmt, factory(io.BytesIO(data), "")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLargeError(
                f"The {fmt} image declares dimensions too large to decode safely; "
                "resize it and try again."
            ) from exc
        except MemoryError:
            raise
        except Exception as exc:  # Header parsers raise many types on bad data.
            raise InvalidImageError(
                f"The data starts like a {fmt} image but its header is corrupt or truncated; "
                "check that the whole file was sent, or re-save it and try again."
            ) from exc

    other = _identify_other_format(data, prefix)
    if other is not None:
        raise UnsupportedImageFormatError(
            f"Images in {other} format are not accepted; convert it to one of "
            f"{_ACCEPTED_LIST} and try again.",
            allowed=list(UPLOAD_FORMATS),
        )
    raise InvalidImageError(
        "The uploaded data is not an image in any recognised format; send the bytes of a "
        f"{_ACCEPTED_LIST} file."
    )


def _identify_other_format(data: bytes, prefix: bytes) -> str | None:
    """Return the name of the non-accepted format Pillow recognises ``data`` as, if any.

    Only headers are parsed, to tell a 415 (a real image in the wrong format) from a 400
    (not an image at all); no pixels are ever decoded for these formats.
    """
    for fmt in Image.ID:
        if fmt in ACCEPTED_FORMATS:
            continue
        factory, accept = Image.OPEN[fmt]
        verdict = _accepts(accept, prefix)
        if not verdict:
            continue
        if isinstance(verdict, str):  # recognised, but Pillow lacks the codec
            return fmt
        try:
            factory(io.BytesIO(data), "").close()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            return fmt  # recognised; too large is moot as it is refused anyway
        except MemoryError:
            raise
        except Exception:  # Not this format; try the next, as Image.open does.
            continue
        return fmt
    return None


def _accepts(accept: Callable[[bytes], bool | str] | None, prefix: bytes) -> bool | str:
    """Run a plugin's magic-byte check; a plugin without one must try its header parser.

    Some checks index into the prefix and fail on very short data, which just means "no".
    """
    if accept is None:
        return True
    try:
        return accept(prefix)
    except Exception:  # e.g. struct.error on a prefix shorter than the magic bytes
        return False


def _check_size(size: tuple[int, int], limits: ImageLimits) -> None:
    """Refuse dimensions over ``limits`` or Pillow's own ``MAX_IMAGE_PIXELS``, if set."""
    width, height = size
    pixels = width * height
    pil_cap = Image.MAX_IMAGE_PIXELS
    if (
        width > limits.max_side
        or height > limits.max_side
        or pixels > limits.max_pixels
        or (pil_cap is not None and pixels > pil_cap)
    ):
        raise _too_large(size, limits)
    if width < 1 or height < 1:
        raise InvalidImageError(
            f"The image declares a size of {width}x{height} pixels, which has no pixels; "
            "re-save it and try again."
        )


def _too_large(size: tuple[int, int], limits: ImageLimits) -> ImageTooLargeError:
    """Build the error for an image over the size limits, saying what the limits are."""
    width, height = size
    max_pixels = limits.max_pixels
    if Image.MAX_IMAGE_PIXELS is not None:
        max_pixels = min(max_pixels, Image.MAX_IMAGE_PIXELS)
    return ImageTooLargeError(
        f"The image is {width}x{height} pixels; the largest accepted is {limits.max_side} "
        f"pixels per side and {max_pixels:,} pixels in total. Resize it and try again."
    )


def _apply_exif_orientation(im: Image.Image) -> None:
    """Rotate/flip ``im`` in place as its EXIF Orientation tag says, so it displays upright.

    Broken EXIF metadata is not a reason to refuse an image whose pixels decoded fine: if the
    tag cannot be read, the image is left as stored.
    """
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except MemoryError:
        raise
    except Exception:  # Malformed EXIF raises many types (or warnings promoted to errors).
        return


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert a decoded image of any Pillow mode to a new 8-bit ``"RGB"`` image.

    Transparency is composited over white (what a viewer shows on a page), palettes and colour
    spaces go through Pillow, and wide integer or float samples are scaled here because
    Pillow's ``convert`` clips them to 0..255 instead of scaling.
    """
    mode = im.mode
    try:
        if mode in _WIDE_INT_MODES:
            return _gray_to_rgb(_wide_int_to_u8(im))
        if mode == "F":
            return _gray_to_rgb(_float_to_u8(np.asarray(im, dtype=np.float32)))
        if mode in _ALPHA_MODES or "transparency" in im.info:
            # Pillow cannot go from premultiplied "La" to RGBA directly, only via "LA".
            rgba = (im.convert("LA") if mode == "La" else im).convert("RGBA")
            background = Image.new("RGB", rgba.size, _WHITE)
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        return im.convert("RGB")  # RGB (a copy), L, 1, P, CMYK, YCbCr, LAB, HSV
    except ValueError as exc:  # a mode Pillow cannot convert to RGB
        raise UnsupportedImageFormatError(
            f"Images with {mode} pixels are not supported; re-save it as 8-bit RGB or "
            "greyscale and try again.",
            allowed=list(UPLOAD_FORMATS),
        ) from exc


def _wide_int_to_u8(im: Image.Image) -> npt.NDArray[np.uint8]:
    """Scale 16-bit samples to 8 bit as value*255/65535, rounded; transparent key -> white.

    Mode "I" is 32-bit, but Pillow uses it mostly for 16-bit data; when its values do not fit
    0..65535 they are min-max scaled instead, like floats.
    """
    values = np.asarray(im)
    if values.dtype == np.int32 and values.size and (values.min() < 0 or values.max() > 65535):
        return _float_to_u8(values.astype(np.float64))
    wide = values.astype(np.uint32)
    # v*255/65535 == v/257, and v/257 is never exactly halfway, so this rounds correctly.
    gray = ((wide + 128) // 257).astype(np.uint8)
    key = im.info.get("transparency")
    if isinstance(key, int):
        gray[values == key] = 255
    return gray


def _float_to_u8(values: npt.NDArray[np.floating]) -> npt.NDArray[np.uint8]:
    """Min-max scale samples to 0..255 (a constant image -> 0); NaN -> 0, +/-inf -> 255/0."""
    finite = np.isfinite(values)
    out = np.zeros(values.shape, dtype=np.uint8)
    if finite.any():
        lo = float(values[finite].min())
        hi = float(values[finite].max())
        if hi > lo:
            scaled = (values[finite].astype(np.float64) - lo) * (255.0 / (hi - lo))
            out[finite] = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    out[values == np.inf] = 255
    return out


def _gray_to_rgb(gray: npt.NDArray[np.uint8]) -> Image.Image:
    """Build an RGB image with ``gray`` in all three channels."""
    return Image.fromarray(np.ascontiguousarray(gray)).convert("RGB")
