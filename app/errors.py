"""Every error the API returns is JSON: {"error": code, "message": text, "detail": ...}."""

from __future__ import annotations

import errno
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.batching import QueueFull
from app.images import ImageError
from app.limits import BodyTooLarge

log = logging.getLogger(__name__)

_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
          409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_request",
          429: "too_many_requests", 503: "unavailable", 507: "insufficient_storage"}
# Seconds a client is asked to wait when the database is unreachable.
DATABASE_RETRY_AFTER_S = "5"


def error_response(status: int, message: str, code: str | None = None, detail=None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": code or _CODES.get(status, "error"), "message": message}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status, headers=headers)


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None, detail: Any = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.detail = status, message, code, headers, detail


def is_disk_full(exc: BaseException) -> bool:
    """A write failed because the volume is full: ENOSPC/EDQUOT, or SQLite saying so."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, DBAPIError):
        text = str(exc.orig)
        return "disk is full" in text or "No space left" in text
    return False


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ImageError)
    async def _image_error(_: Request, exc: ImageError) -> JSONResponse:
        return error_response(exc.status, exc.message, code="invalid_image")

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_: Request, exc: BodyTooLarge) -> JSONResponse:
        return error_response(413, "the request body is over the upload limit")

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        retry_after = str(request.app.state.settings.retry_after_s)
        return error_response(503, f"the service is at capacity ({exc}); retry after {retry_after} s",
                              code="overloaded", headers={"Retry-After": retry_after})

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, code=exc.code, detail=exc.detail, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, BodyTooLarge):
            # FastAPI wraps failures while reading the form into a 400; the real cause is the size limit.
            return error_response(413, "the request body is over the upload limit")
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", [])), "msg": e.get("msg", "")} for e in exc.errors()]
        summary = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
        return error_response(422, f"invalid request: {summary}", detail=errors)

    @app.exception_handler(DBAPIError)
    async def _database_error(_: Request, exc: DBAPIError) -> JSONResponse:
        # A lost or refused connection (the database stopped, restarted, unreachable) is the service being
        # unavailable, not a bug: 503, and the pool reconnects once it is back (pre-ping).
        if is_disk_full(exc):
            log.error("data volume full: %s", exc.orig)
            return error_response(507, "the data volume is full; nothing was stored", code="insufficient_storage")
        if exc.connection_invalidated or exc.__class__.__name__ in ("OperationalError", "InterfaceError"):
            log.warning("database unavailable: %s", exc.__class__.__name__)
            return error_response(503, f"the database is unavailable ({_first_line(exc.orig)}); retry later",
                                  code="database_unavailable", headers={"Retry-After": DATABASE_RETRY_AFTER_S})
        log.exception("database error")
        return error_response(500, "internal error; the server log has the details", code="internal")

    @app.exception_handler(PoolTimeout)
    async def _pool_timeout(_: Request, exc: PoolTimeout) -> JSONResponse:
        return error_response(503, "no database connection became free in time; retry later",
                              code="database_unavailable", headers={"Retry-After": DATABASE_RETRY_AFTER_S})

    @app.exception_handler(OSError)
    async def _os_error(_: Request, exc: OSError) -> JSONResponse:
        if is_disk_full(exc):
            log.error("data volume full: %s", exc)
            return error_response(507, "the data volume is full; nothing was stored", code="insufficient_storage")
        log.exception("unhandled error")
        return error_response(500, "internal error; the server log has the details", code="internal")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal error; the server log has the details", code="internal")


def _first_line(error: object) -> str:
    return str(error).strip().splitlines()[0][:200] if str(error).strip() else error.__class__.__name__
