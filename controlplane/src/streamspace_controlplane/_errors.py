"""The one exception that becomes an HTTP error response; public as ``http.ApiError``.

It lives in its own module so that :mod:`~streamspace_controlplane.auth` and the services can
raise it without importing the request helpers of :mod:`~streamspace_controlplane.http`,
which themselves use :mod:`~streamspace_controlplane.auth`.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import ValidationError

from streamspace_sdk.errors import StreamSpaceError

__all__ = ["ERROR_CODES", "ApiError", "validation_error"]

_MAX_LISTED_FIELDS = 5

ERROR_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
}
"""The ``error.code`` of each status the API answers with, when nothing more precise fits."""


class ApiError(StreamSpaceError):
    """An error the client should see, as ``{"error": {"code", "message"}}`` with ``status``.

    Services raise it too, so the command line reports the same sentence the API would.

    Args:
        status: HTTP status code.
        code: Short machine-readable reason (``not_found``, ``quota_exceeded``, ...).
        message: The sentence a person reads; never holds secrets.
        headers: Extra response headers (``WWW-Authenticate``, ``Retry-After``, ``Allow``).
        fields: For validation errors, ``{"field": "a.b", "message": ...}`` per bad field.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
        *,
        fields: list[dict[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.fields = fields

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.code!r}, {self.message!r})"


def validation_error(exc: ValidationError, where: str) -> ApiError:
    """Turn a pydantic error into a 422 naming each bad field (never echoing its value).

    Args:
        exc: The error.
        where: ``body``, ``query`` or ``header``; the first part of each field path.
    """
    fields = []
    for err in exc.errors(include_input=False, include_url=False):
        path = ".".join(str(part) for part in (where, *err["loc"]) if part != "")
        fields.append({"field": path, "message": str(err["msg"])})
    listed = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:_MAX_LISTED_FIELDS])
    more = len(fields) - _MAX_LISTED_FIELDS
    if more > 0:
        listed += f"; and {more} more"
    return ApiError(422, "validation_error", f"invalid request: {listed}", fields=fields)
