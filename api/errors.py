"""Error responses: `{"error": ...}` without fields; `{"errors": {field: [...]}}` for 422."""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.errors import NotFound, ValidationFailed

log = structlog.get_logger("api")


class ApiError(Exception):
    """An error answered as `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.message = message
        self.headers = headers
        super().__init__(message)


def _field_of(loc: tuple[Any, ...]) -> str:
    """`("body", "customer", "email")` → `email`; `("query", "page")` → `page`."""
    parts = [p for p in loc if isinstance(p, str)]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    if parts and parts[0] == "customer" and len(parts) > 1:
        parts = parts[1:]
    return parts[0] if parts else "base"


def _message(err: dict[str, Any]) -> str:
    msg = str(err.get("msg", "is invalid"))
    if err.get("type") == "missing":
        return "is required"
    return msg[0].lower() + msg[1:] if msg else "is invalid"


def validation_errors(errors: list[dict[str, Any]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for err in errors:
        out.setdefault(_field_of(tuple(err.get("loc", ()))), []).append(_message(err))
    return out


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(NotFound)
    def _not_found(_request: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"error": f"{exc.what} not found"}, status_code=404)

    @app.exception_handler(ValidationFailed)
    def _invalid(_request: Request, exc: ValidationFailed) -> JSONResponse:
        return JSONResponse({"errors": exc.errors}, status_code=422)

    @app.exception_handler(RequestValidationError)
    def _request_invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            detail = next(e for e in errors if e.get("type") == "json_invalid")
            ctx = detail.get("ctx") or {}
            reason = ctx.get("error", "") if isinstance(ctx, dict) else ""
            return JSONResponse(
                {"error": f"malformed JSON body: {reason}".rstrip(": ")}, status_code=400
            )
        if any(e.get("loc", ("",))[0] == "path" for e in errors):
            # Ids in paths are numbers; anything else names no record.
            return JSONResponse({"error": "Not found"}, status_code=404)
        return JSONResponse({"errors": validation_errors(errors)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404 and message == "Not Found":
            message = "Not found"
        return JSONResponse(
            {"error": message}, status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(Exception)
    def _unhandled(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("api.unhandled_error", error_type=type(exc).__name__)
        return JSONResponse({"error": "internal server error"}, status_code=500)
