"""Kling's error envelope: HTTP status plus a business code (reference §11)."""

from __future__ import annotations

import uuid

from fastapi.responses import JSONResponse


class ApiError(Exception):
    def __init__(self, status: int, code: int, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def envelope(data: object, code: int = 0, message: str = "SUCCEED") -> dict[str, object]:
    body: dict[str, object] = {"code": code, "message": message, "request_id": str(uuid.uuid4())}
    if code == 0:
        body["data"] = data
    return body


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(envelope(None, error.code, error.message), status_code=error.status)


def bad_param(message: str) -> ApiError:
    return ApiError(400, 1201, message)
