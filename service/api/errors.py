"""Errors that only the HTTP layer raises: about the request itself, not what it asks for.

They are :class:`~service.errors.ServiceError` like the domain's, with a category that
:mod:`service.api.problems` maps to a status along with the others (one table), so that a
client reads every refusal the same way.
"""

from __future__ import annotations

from service.errors import ErrorCategory, ServiceError


class UnauthorizedError(ServiceError):
    """No valid API key was presented; the message never repeats the key."""

    category = ErrorCategory.UNAUTHENTICATED
    code = "invalid_api_key"
    title = "Authentication required"


class PayloadTooLargeError(ServiceError):
    """The request body is over ``GRADCAM_MAX_UPLOAD_BYTES``."""

    category = ErrorCategory.TOO_LARGE
    code = "payload_too_large"
    title = "The upload is too large"


class UnsupportedContentTypeError(ServiceError):
    """The request body is neither ``multipart/form-data`` nor JSON."""

    category = ErrorCategory.UNSUPPORTED_MEDIA
    code = "unsupported_content_type"
    title = "Unsupported request content type"
