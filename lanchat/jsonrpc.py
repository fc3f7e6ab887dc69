"""JSON-RPC 2.0 codec for the control socket: one line in, the reply line (or nothing) out.

Pure: no sockets, threads or clock.  :func:`handle_line` takes one request
line (bytes, without its newline) and a route table, and returns the bytes to
send back -- or ``None`` when the spec says to stay silent (notifications,
batches of notifications).  The rules implementations commonly get wrong
(https://www.jsonrpc.org/specification; conventions.md §3.1) are kept here:

- ``"jsonrpc"`` must be exactly ``"2.0"``; otherwise -32600.
- ids are a string, a number or ``null`` and are echoed unchanged in type;
  ``true``/``false`` are not ids (Python's ``bool`` is an ``int``).
- a notification is a request with *no* ``"id"`` member; ``"id": null`` is not one.
  A notification never gets a reply, not even an error, not even in a batch.
- a response carries exactly one of ``result`` / ``error``.
- ``[]`` gets one -32600 error object, not an array; a batch of notifications
  gets no output at all; a batch of non-objects gets an array of -32600 errors.
- names starting with ``rpc.`` are reserved (-32601); params are by name only
  (an array is -32602); ``"params": null`` is not structured, hence -32600.
- NaN/Infinity are not JSON (:func:`lanchat.framing.loads_line` rejects them).

Application errors (a :class:`~lanchat.errors.LanchatError` raised by a
handler) are mapped to the codes of :data:`ERROR_CODES`, the one table the
``lanchat-rpc(7)`` man page documents.  Anything else a handler raises is a
bug: -32603 with a generic message (the traceback goes to the log, never to
the caller).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lanchat.errors import (
    ClosedError,
    LanchatError,
    LimitExceeded,
    NickInUse,
    RemoteProtocolError,
    StoreError,
    ValidationError,
)
from lanchat.framing import dumps_line, is_finite_number, loads_line
from lanchat.limits import MAX_RPC_BATCH_REPLY_BYTES

log = logging.getLogger(__name__)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

#: A JSON-RPC id: string, number or null (never a bool).
Id = str | int | float | None
#: A method handler: named params in, a JSON-serialisable result out.
Handler = Callable[[dict[str, Any]], Any]
Routes = Mapping[str, Handler]


@dataclass(frozen=True, slots=True)
class ErrorCode:
    """One row of the application error table."""

    code: int
    #: The ``code`` string of the :class:`LanchatError` (also sent as ``error.data.code``).
    name: str
    #: The exception class mapped to this code (``None``: matched by ``name`` only).
    exc_type: type[LanchatError] | None
    description: str


#: Application errors, in matching order: a raised error's ``code`` string is
#: looked up first, then its class (first ``isinstance`` match).  ``lanchat-rpc(7)``
#: documents exactly this table.  Every error also carries
#: ``"data": {"code": <the error's code string>}`` so scripts can tell e.g.
#: ``bad-nick`` from ``bad-room`` without parsing the message.
ERROR_CODES: tuple[ErrorCode, ...] = (
    ErrorCode(INVALID_PARAMS, "invalid", ValidationError,
              "a parameter is missing, unknown or invalid (bad nick, room, text, limit)"),
    ErrorCode(1, "store", StoreError,
              "the history store could not accept the message; nothing was sent"),
    ErrorCode(2, "nick-taken", NickInUse, "the nickname is already in use"),
    ErrorCode(3, "limit", LimitExceeded,
              "a limit was exceeded (rate, queue, connections, already subscribed)"),
    ErrorCode(4, "not-allowed", None,
              "the caller is not allowed to do this (e.g. send from an unprivileged uid)"),
    ErrorCode(5, "closed", ClosedError, "the daemon is shutting down"),
    ErrorCode(9, "error", LanchatError, "any other failure; the message says what"),
)


def error_code_for(exc: LanchatError) -> int:
    """The JSON-RPC error code of an application error (see :data:`ERROR_CODES`)."""
    for row in ERROR_CODES:
        if row.name == exc.code:
            return row.code
    for row in ERROR_CODES:
        if row.exc_type is not None and isinstance(exc, row.exc_type):
            return row.code
    return 9  # pragma: no cover - the last row matches every LanchatError


class RpcFailure(Exception):
    """Raised by a handler to send a specific JSON-RPC error (code, message, data)."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


@dataclass(frozen=True, slots=True)
class Request:
    """One well-formed request: method, named params, and its id (unless a notification)."""

    method: str
    params: dict[str, Any]
    id: Id = None
    notification: bool = False
    #: Params came as an array: a valid request, but we take params by name only (-32602).
    positional: bool = False


def error_object(code: int, message: str, id_: Id = None, data: Any = None) -> dict[str, Any]:
    """A complete error response object."""
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "error": err, "id": id_}


def result_object(result: Any, id_: Id) -> dict[str, Any]:
    """A complete success response object (``result`` may be ``None``: void methods)."""
    return {"jsonrpc": "2.0", "result": result, "id": id_}


def notification(method: str, params: Any) -> bytes:
    """One notification line (server -> client), ``\\n``-terminated."""
    return dumps_line({"jsonrpc": "2.0", "method": method, "params": params})


def is_valid_id(value: object) -> bool:
    """True for a JSON-RPC id: a string, a finite number (not a bool) or ``None``."""
    return value is None or isinstance(value, str) or is_finite_number(value)


def parse_request(obj: object) -> Request | dict[str, Any]:
    """Check one decoded request object; return a :class:`Request` or an error response."""
    if not isinstance(obj, dict):
        return error_object(INVALID_REQUEST, "invalid request: not an object")
    has_id = "id" in obj
    id_ = obj.get("id")
    if has_id and not is_valid_id(id_):
        return error_object(INVALID_REQUEST, "invalid request: id must be a string, number or null")
    if obj.get("jsonrpc") != "2.0":
        return error_object(INVALID_REQUEST, 'invalid request: "jsonrpc" must be "2.0"', id_)
    method = obj.get("method")
    if not isinstance(method, str):
        return error_object(INVALID_REQUEST, 'invalid request: "method" must be a string', id_)
    if "params" in obj:
        params = obj["params"]
        if isinstance(params, list):
            # Structured but positional: a valid request we cannot serve (params by name only).
            return Request(method, {}, id_, not has_id, positional=True)
        if not isinstance(params, dict):
            return error_object(
                INVALID_REQUEST, 'invalid request: "params" must be an object', id_
            )
    else:
        params = {}
    return Request(method, params, id_, not has_id)


def parse_line(line: bytes | str) -> tuple[bool, list[Request | dict[str, Any]]]:
    """Parse one line into ``(is_batch, entries)``.

    Each entry is a :class:`Request` to dispatch or an error response that is
    already final.  Bad JSON, bad UTF-8 and ``[]`` come back as a single
    (non-batch) error.  Never raises.
    """
    try:
        obj = loads_line(line)
    except RemoteProtocolError as exc:
        return False, [error_object(PARSE_ERROR, f"parse error: {exc}")]
    if isinstance(obj, list):
        if not obj:
            return False, [error_object(INVALID_REQUEST, "invalid request: empty batch")]
        return True, [parse_request(item) for item in obj]
    return False, [parse_request(obj)]


def dispatch(request: Request, routes: Routes) -> dict[str, Any] | None:
    """Run one request through ``routes``; return its response, or ``None`` for a notification."""
    response = _call(request, routes)
    return None if request.notification else response


def _call(request: Request, routes: Routes) -> dict[str, Any]:
    id_ = request.id
    handler = None if request.method.startswith("rpc.") else routes.get(request.method)
    if handler is None:
        return error_object(METHOD_NOT_FOUND, f"method not found: {request.method}", id_)
    if request.positional:
        return error_object(INVALID_PARAMS, "invalid params: params must be passed by name", id_)
    try:
        result = handler(request.params)
    except RpcFailure as exc:
        return error_object(exc.code, exc.message, id_, exc.data)
    except LanchatError as exc:
        return error_object(error_code_for(exc), str(exc), id_, {"code": exc.code})
    except Exception:  # a handler bug must not kill the connection (logged with traceback)
        log.exception("control method %s failed", request.method)
        return error_object(INTERNAL_ERROR, "internal error", id_)
    return result_object(result, id_)


def _encode(response: dict[str, Any]) -> bytes:
    """One response as compact JSON without the newline; -32603 if it cannot be encoded."""
    try:
        return dumps_line(response)[:-1]
    except (TypeError, ValueError):
        log.exception("control reply could not be encoded")
        return dumps_line(error_object(INTERNAL_ERROR, "internal error", response.get("id")))[:-1]


def handle_line(line: bytes | str, routes: Routes, *,
                max_batch_reply: int = MAX_RPC_BATCH_REPLY_BYTES) -> bytes | None:
    """Answer one request line: the ``\\n``-terminated reply, or ``None`` to send nothing.

    A batch's reply is one JSON array, so it is held whole: each response is
    encoded as soon as it is made (its result objects freed), and once the
    reply passes ``max_batch_reply`` bytes, the batch's remaining requests are
    not run but answered with a ``limit`` error (its notifications dropped).
    So a batch costs at most that plus one response, however many ``history``
    calls it holds.  Never raises (handler failures become error responses).
    """
    is_batch, entries = parse_line(line)
    replies: list[bytes] = []
    size = 0
    for entry in entries:
        if not isinstance(entry, Request):
            response: dict[str, Any] | None = entry
        elif is_batch and size > max_batch_reply:
            response = None if entry.notification else error_object(
                3, f"the batch's reply passed {max_batch_reply} bytes; this request was "
                   "not run (send it again, or in a smaller batch)", entry.id,
                {"code": "limit"})
        else:
            response = dispatch(entry, routes)
        if response is not None:
            replies.append(_encode(response))
            size += len(replies[-1]) + 1
    if not replies:
        return None
    if is_batch:
        return b"[" + b",".join(replies) + b"]\n"
    return replies[0] + b"\n"


def check_params(params: Mapping[str, Any], allowed: frozenset[str] | set[str]) -> None:
    """Raise :class:`ValidationError` naming the first parameter not in ``allowed``.

    Unknown names are refused rather than ignored, so a typo (``rom``) is an
    error instead of a silent default.
    """
    for key in params:
        if key not in allowed:
            raise ValidationError(f"unknown parameter {key!r}")


__all__ = [
    "ERROR_CODES", "INTERNAL_ERROR", "INVALID_PARAMS", "INVALID_REQUEST", "METHOD_NOT_FOUND",
    "PARSE_ERROR", "ErrorCode", "Handler", "Id", "Request", "Routes", "RpcFailure",
    "check_params", "dispatch", "error_code_for", "error_object", "handle_line",
    "notification", "parse_line", "parse_request", "result_object",
]
