"""Every error the server answers, in the client's shape: OpenAI's ``{"error": {"message", "type",
"param", "code"}}``, or Anthropic's ``{"type": "error", "error": {"type", "message"}}`` on the
Messages API's routes. FastAPI's and Starlette's own errors (422 validation, 404, 405, a body
that is not JSON) and unexpected exceptions are translated too: never a bare "Internal Server
Error", never FastAPI's 422.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from pico_vllm.server.anthropic import ERROR_TYPES
from pico_vllm.server.async_engine import EngineError
from pico_vllm.server.protocol import APIError
from pico_vllm.server.responses import ClientGone


def error_response(e: APIError, path: str) -> JSONResponse:
    """OpenAI's error shape, or Anthropic's on the Messages API's routes."""
    if path.startswith("/v1/messages"):
        kind = ERROR_TYPES.get(e.status, "api_error") if e.kind != "overloaded_error" else e.kind
        body = {"type": "error", "error": {"type": kind, "message": e.message}}
    else:
        body = {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.status}}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


async def on_api_error(request: Request, e: APIError) -> JSONResponse:
    return error_response(e, request.url.path)


async def on_engine_error(request: Request, e: EngineError) -> JSONResponse:
    return error_response(APIError(503 if e.stopped else 500, str(e), "server_error"), request.url.path)


async def on_unexpected(request: Request, e: Exception) -> JSONResponse:
    return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error"),
                          request.url.path)


async def on_client_gone(_: Request, e: ClientGone) -> Response:
    return Response(status_code=499)  # nginx's "client closed request"


async def on_invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    """A body that does not fit the request's model: 400 naming the first field at fault."""
    first = e.errors()[0]
    if first["type"] == "json_invalid":  # its "loc" is a character offset, not a field
        reason = first.get("ctx", {}).get("error", first["msg"])
        return error_response(APIError(400, f"request body is not valid JSON: {reason}"), request.url.path)
    where = ".".join(str(p) for p in first["loc"] if p != "body")
    reason = "not supported by this server" if first["type"] == "extra_forbidden" else first["msg"]
    message = f"{where}: {reason}" if where else f"request body: {reason}"
    return error_response(APIError(400, message, param=where or None), request.url.path)


async def on_http_error(request: Request, e: HTTPException) -> JSONResponse:
    """Starlette's own errors: an unknown route, a wrong method, a body it could not parse."""
    if e.status_code == 404:
        return error_response(APIError(404, f"no route {request.method} {request.url.path}",
                                       "not_found_error"), request.url.path)
    if e.status_code == 405:
        allowed = e.headers.get("Allow", "") if e.headers else ""
        message = f"{request.method} is not allowed on {request.url.path} (allowed: {allowed})"
        return error_response(APIError(405, message, headers=e.headers), request.url.path)
    if e.status_code == 400 and e.__cause__ is not None:  # FastAPI could not parse the body
        message = f"request body is not valid JSON: {type(e.__cause__).__name__}: {e.__cause__}"
        return error_response(APIError(400, message), request.url.path)
    return error_response(APIError(e.status_code, str(e.detail), headers=e.headers), request.url.path)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every exception type above in the client's error shape."""
    for kind, handler in [(APIError, on_api_error), (EngineError, on_engine_error),
                          (Exception, on_unexpected), (ClientGone, on_client_gone),
                          (RequestValidationError, on_invalid), (HTTPException, on_http_error)]:
        app.add_exception_handler(kind, handler)
