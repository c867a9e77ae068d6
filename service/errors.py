"""Domain errors raised by the engine and the runtime.

Nothing here knows about HTTP. Each error carries a stable machine-readable ``code`` and a
``category``; the HTTP layer maps categories to status codes in one place
(``service.api.problems``). The ``detail`` sentence is shown to callers, so it must say what
went wrong and what to do, and never contain stack traces or internal paths. Refusals of a
request as such (no API key, a body too large, a content type not accepted) are the HTTP
layer's own: ``service.api.errors``.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum


class ErrorCategory(StrEnum):
    """What kind of failure an error is; the HTTP layer maps each to one status."""

    INVALID_IMAGE = "invalid_image"
    UNSUPPORTED_MEDIA = "unsupported_media"
    TOO_LARGE = "too_large"
    NOT_FOUND = "not_found"
    UNAUTHENTICATED = "unauthenticated"
    INVALID_ARGUMENT = "invalid_argument"
    NOT_READY = "not_ready"
    OVERLOADED = "overloaded"
    DEADLINE = "deadline"
    INTERNAL = "internal"


class ServiceError(Exception):
    """Base class of every error the service reports to its callers."""

    category: ErrorCategory = ErrorCategory.INTERNAL
    code: str = "internal_error"
    title: str = "Internal error"
    #: Seconds a caller should wait before retrying, when the raiser gives none.
    default_retry_after_s: float | None = None

    def __init__(
        self,
        detail: str,
        *,
        code: str | None = None,
        image_index: int | None = None,
        allowed: Sequence[str] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        self.image_index = image_index
        self.allowed = list(allowed) if allowed is not None else None
        self.retry_after_s = (
            retry_after_s if retry_after_s is not None else (self.default_retry_after_s)
        )

    def for_image(self, index: int) -> ServiceError:
        """Return this error tagged with the position of the image it concerns."""
        self.image_index = index
        return self


class InvalidImageError(ServiceError):
    category = ErrorCategory.INVALID_IMAGE
    code = "invalid_image"
    title = "The image could not be decoded"


class UnsupportedImageFormatError(ServiceError):
    category = ErrorCategory.UNSUPPORTED_MEDIA
    code = "unsupported_image_format"
    title = "The image format is not accepted"


class TruncatedImageError(InvalidImageError):
    """The image's pixel data is shorter than it declares (or missing from an image object)."""

    code = "truncated_pixel_data"
    title = "The image data is truncated"


class DicomWithoutImageError(UnsupportedImageFormatError):
    """A DICOM object with no pixel data: a structured report, an RT plan, a waveform."""

    code = "dicom_without_image"
    title = "The DICOM object holds no image"


class UnsupportedTransferSyntaxError(UnsupportedImageFormatError):
    """A DICOM encoding that no installed pixel-data decoder handles (e.g. MPEG video)."""

    code = "unsupported_transfer_syntax"
    title = "The DICOM transfer syntax is not supported"


class ImageTooLargeError(ServiceError):
    category = ErrorCategory.TOO_LARGE
    code = "image_too_large"
    title = "The image is too large"


class UnknownModelError(ServiceError):
    category = ErrorCategory.NOT_FOUND
    code = "unknown_model"
    title = "Unknown model"


class UnknownLayerError(ServiceError):
    category = ErrorCategory.INVALID_ARGUMENT
    code = "unknown_layer"
    title = "Unknown or unusable layer"


class UnknownTargetError(ServiceError):
    category = ErrorCategory.INVALID_ARGUMENT
    code = "unknown_target"
    title = "Unknown target class"


class InvalidParameterError(ServiceError):
    category = ErrorCategory.INVALID_ARGUMENT
    code = "invalid_parameter"
    title = "Invalid parameter"


class ResponseTooLargeError(ServiceError):
    """The answer a request asks for would be larger than the service sends."""

    category = ErrorCategory.INVALID_ARGUMENT
    code = "response_too_large"
    title = "The answer would be too large"


class ModelNotReadyError(ServiceError):
    category = ErrorCategory.NOT_READY
    code = "model_not_ready"
    title = "The model is not ready"
    default_retry_after_s = 5.0


class ModelLoadError(ServiceError):
    """A model could not be built or its weights did not fit; raised at start-up."""

    category = ErrorCategory.INTERNAL
    code = "model_load_failed"
    title = "The model could not be loaded"


class OverloadedError(ServiceError):
    category = ErrorCategory.OVERLOADED
    code = "overloaded"
    title = "The service is overloaded"


class DeadlineExceededError(ServiceError):
    category = ErrorCategory.DEADLINE
    code = "deadline_exceeded"
    title = "The request took longer than its deadline"


class WorkerError(ServiceError):
    """A failure inside a worker (out of memory included); only its batch is affected."""

    category = ErrorCategory.INTERNAL
    code = "worker_error"
    title = "The computation failed"


class ServiceNotReadyError(ServiceError):
    """The service as a whole is not ready (``/readyz``): some model is loading or failed."""

    category = ErrorCategory.NOT_READY
    code = "not_ready"
    title = "The service is not ready"
    default_retry_after_s = 5.0
