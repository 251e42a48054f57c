"""Errors as OpenAI's API sends them: a status code and {"error": {message, type, param, code}},
so every client library raises its usual exception with our message in it."""

from __future__ import annotations

from fastapi.responses import JSONResponse

# The `type` OpenAI gives each status; clients show it beside the message.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    504: "upstream_error",
}


class ApiError(Exception):
    """A request the server refuses or cannot serve; the handler turns it into the response."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def client_left() -> JSONResponse:
    """What a request whose client disconnected ends with (nobody reads it; the log and metrics do)."""
    return ApiError(499, "client disconnected").response()
