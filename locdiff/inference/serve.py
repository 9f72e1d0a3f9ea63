"""`locdiff serve`: the registered model over HTTP, MLflow's scoring protocol behind a guard.

The app is MLflow's own scoring server (`mlflow.pyfunc.scoring_server.init`: `POST /invocations`, `/ping`,
`/health`, `/version`), exactly what `mlflow models serve` runs, wrapped in `GuardedApp`, which enforces on
`POST /invocations` what MLflow's server does not:

- the body is `application/json` (MLflow's CSV path answers a parse error with its stack trace): 415 else;
- the body is at most `max_bytes`, by its Content-Length before anything is read and by counting while it
  is read (chunked): 413 else (MLflow reads any body whole);
- the body arrives within `read_timeout_s`: 408 else;
- the body is a JSON object: 400 else, one line naming the position of the fault, without quoting the body
  (MLflow answers JSON nested too deeply with a bare 500 and quotes malformed bodies);
- every error answer is `{"error_code": ..., "message": ONE LINE}`: MLflow's `stack_trace` field is dropped
  and its message cut to its first line; a message that quotes the input (`Failed to predict data '...'`, a
  schema error's `Failed to enforce schema of data '...'`) is cut to MLflow's reason, without the input.

The model's answers (2xx) pass through unchanged, so a client of `mlflow models serve` works as it is.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import typing

from locdiff.errors import UserError, one_line
from locdiff.inference.model_uri import resolve_mlflow_model

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_MB = 128  # a body of JSON numbers costs ~9x its size in server memory (README, Bounds)
MAX_REQUEST_MB = 4096
READ_TIMEOUT_S = 60.0
MESSAGE_CHARS = 300  # an error message's length on the wire

Scope = dict[str, typing.Any]
Message = dict[str, typing.Any]
Receive = typing.Callable[[], typing.Awaitable[Message]]
Send = typing.Callable[[Message], typing.Awaitable[None]]
ASGIApp = typing.Callable[[Scope, Receive, Send], typing.Awaitable[None]]

# what MLflow's scoring server and schema check put before the reason of an error: the input's repr
_QUOTED_INPUT = re.compile(r"Failed to predict data '.*'\. \nError: ", re.DOTALL)
_QUOTED_SCHEMA = re.compile(r"Failed to enforce schema of data '.*' with schema '.*'\. Error: ", re.DOTALL)
_CODES = {400: "BAD_REQUEST", 408: "REQUEST_TIMEOUT", 413: "REQUEST_TOO_LARGE", 415: "UNSUPPORTED_MEDIA_TYPE"}


async def _reply(send: Send, status: int, message: str, error_code: str | None = None) -> None:
    body = json.dumps({"error_code": error_code or _CODES.get(status, "INTERNAL_ERROR"),
                       "message": one_line(message, MESSAGE_CHARS)}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _one_line_error(raw: bytes) -> tuple[str, str | None]:
    """(message, error_code) of an error answer of MLflow's: its JSON message's first line, or the text's."""
    try:
        answer = json.loads(raw)
    except (ValueError, RecursionError):
        answer = None
    if isinstance(answer, dict) and isinstance(answer.get("message"), str):
        code = answer.get("error_code")
        return _reason(answer["message"]), code if isinstance(code, str) else None
    text = raw[:4096].decode("utf-8", "replace").strip()
    return (text.split("\n", 1)[0] if text else "the model server failed"), None


def _reason(message: str) -> str:
    """An MLflow error message's reason: what follows the input it quotes (a wrongly typed param, a column
    that does not fit the schema), on one line; else its first line."""
    quoted = _QUOTED_INPUT.match(message.strip())
    if quoted is None:
        return message.strip().split("\n", 1)[0]
    reason = message.strip()[quoted.end():]
    schema = _QUOTED_SCHEMA.match(reason)
    if schema is not None:
        reason = f"the input does not fit the model's signature: {reason[schema.end():]}"
    return one_line(reason, MESSAGE_CHARS)


class GuardedApp:
    """An ASGI app: `app` behind the checks of the module docstring on `POST /invocations`."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, read_timeout_s: float = READ_TIMEOUT_S) -> None:
        self.app, self.max_bytes, self.read_timeout_s = app, max_bytes, read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != "/invocations" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        ctype = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if ctype != "application/json":
            return await _reply(send, 415, f"content type {ctype or '(none)'!r} is not served: post "
                                "application/json ({\"dataframe_split\": ...})")
        length = headers.get(b"content-length")
        if length is not None:
            if not length.strip().isdigit():
                return await _reply(send, 400, "Content-Length is not a number")
            if len(length.strip()) > 18 or int(length) > self.max_bytes:  # uvicorn (h11) refuses over 20 digits itself
                return await _reply(send, 413, f"request body of {length.strip()[:30].decode()} bytes is over the "
                                    f"server's limit of {self.max_bytes} (locdiff serve --max-request-mb)")
        try:
            body = await asyncio.wait_for(self._read(receive), timeout=self.read_timeout_s)
        except TimeoutError:
            return await _reply(send, 408, f"request body not received within {self.read_timeout_s:g} s")
        if body is None:  # the client left, or sent too much
            return await _reply(send, 413, f"request body is over the server's limit of {self.max_bytes} bytes "
                                "(locdiff serve --max-request-mb)")
        try:
            payload = await asyncio.to_thread(json.loads, body)  # seconds for a large body: off the event loop
        except RecursionError:
            return await _reply(send, 400, "request body is not valid JSON: nested too deeply")
        except ValueError as err:  # JSONDecodeError (its position, not the body), or an over-long integer
            where = f"line {err.lineno} column {err.colno}" if isinstance(err, json.JSONDecodeError) else err
            return await _reply(send, 400, f"request body is not valid JSON ({where})")
        if not isinstance(payload, dict):
            return await _reply(send, 400, f"request body must be a JSON object, not {type(payload).__name__}")
        del payload
        await self.app(scope, _replay(body, receive), _OneLineErrors(send))

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, or None once it exceeds max_bytes or the client disconnects."""
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return None
            if not message.get("more_body"):
                return bytes(body)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body already read, then the client's further messages."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class _OneLineErrors:
    """A send that passes 1xx-3xx answers through and rewrites 4xx/5xx ones to one line, no stack trace."""

    def __init__(self, send: Send) -> None:
        self.send, self.status, self.buffer = send, 200, bytearray()

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            if self.status < 400:
                await self.send(message)
            return
        if message["type"] != "http.response.body" or self.status < 400:
            await self.send(message)
            return
        self.buffer += message.get("body", b"")
        if not message.get("more_body"):
            text, code = _one_line_error(bytes(self.buffer))
            await _reply(self.send, self.status, text, code)


def serve(model_uri: str, *, host: str = "127.0.0.1", port: int = 5001,
          max_request_mb: int = DEFAULT_MAX_REQUEST_MB, tracking_uri: str | None = None) -> None:
    """Serve the LocDiff model at `model_uri` (a model URI of the registry or a saved MLflow model folder)
    until interrupted."""
    import mlflow.pyfunc
    import uvicorn
    from mlflow.pyfunc import scoring_server

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:  # before the model loads
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise UserError(f"cannot listen on {host}:{port} (--host, --port): {err.strerror or err}") from None
    model_dir, keep = resolve_mlflow_model(model_uri, tracking_uri=tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(str(model_dir))
        app = GuardedApp(scoring_server.init(model), max_bytes=max_request_mb * 1024 * 1024)
        logger.info("serving %s on http://%s:%d (POST /invocations, requests up to %d MB)", model_uri, host, port,
                    max_request_mb)
        uvicorn.run(app, host=host, port=port, workers=1, log_level="warning")
    finally:
        if keep is not None:
            keep.cleanup()
