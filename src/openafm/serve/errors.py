"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, whose messages
name fields and limits but never echo what a client sent."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error a client gets as an HTTP status and an OpenAI error object."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None, code: str | None) -> dict:
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(error: APIError) -> JSONResponse:
    body = error_body(error.status, error.message, error.param, error.code)
    return JSONResponse(body, status_code=error.status)


async def api_error_handler(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, APIError)
    return error_response(error)


def _field(location: tuple) -> str:
    return ".".join(str(part) for part in location if part != "body") or "body"


async def validation_error_handler(_: Request, error: Exception) -> JSONResponse:
    """The first invalid field and what was wrong with it; pydantic's `input` (the client's
    value) is left out."""
    assert isinstance(error, RequestValidationError)
    first = error.errors()[0] if error.errors() else {"loc": ("body",), "msg": "invalid body"}
    param = _field(tuple(first.get("loc", ())))
    message = f"invalid field {param!r}: {first.get('msg', 'invalid value')}"
    if first.get("type") == "json_invalid":
        param, message = "body", "the body is not valid JSON"
    return error_response(APIError(400, message, param=param, code="invalid_value"))


async def http_error_handler(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, HTTPException)
    message = {404: "no such route", 405: "method not allowed"}.get(error.status_code, "error")
    return error_response(APIError(error.status_code, message))


async def internal_error_handler(_: Request, error: Exception) -> JSONResponse:
    """No stack trace and no message text reaches the client: only the exception's type."""
    message = f"internal error ({type(error).__name__})"
    return error_response(APIError(500, message, code="internal_error"))
