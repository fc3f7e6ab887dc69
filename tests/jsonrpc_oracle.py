"""An oracle for JSON-RPC 2.0 replies that owes nothing to lanchat's codec.

The tests once judged lanchat's replies with a validator of lanchat's own -- the code under
test grading itself (it is gone).  This module judges them from the specification
(https://www.jsonrpc.org/specification) alone:

- :data:`RESPONSE_SCHEMA` / :data:`REPLY_SCHEMA`: the shape of a response object and of a whole
  reply, as a JSON Schema checked by the ``jsonschema`` package.
- :func:`check_reply`: what the reply to a given request line must be -- how many responses,
  which ids, which error codes the spec prescribes -- decided by reading the request here, with
  the standard library's ``json`` and the spec's rules, not with lanchat's parser.

lanchat's documented choices the oracle takes as given (lanchat-protocol(7); the spec leaves
them to the server): NaN, Infinity and numbers that overflow a double are not JSON (parse
error), and params are taken by name only (a positional request is answered -32602).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import jsonschema

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602

#: Codes the spec pre-defines; the rest of -32768..-32000 is reserved, except the
#: implementation-defined server errors -32099..-32000.  Applications use any other integer.
PREDEFINED_CODES = (-32700, -32600, -32601, -32602, -32603)

_ERROR_CODE = {
    "type": "integer",
    "anyOf": [
        {"enum": list(PREDEFINED_CODES)},
        {"minimum": -32099, "maximum": -32000},
        {"not": {"minimum": -32768, "maximum": -32000}},
    ],
}

#: One response object (spec section 5): ``jsonrpc`` exactly "2.0", an ``id`` that is a
#: string, a number or null, and exactly one of ``result`` / ``error``; an error object has
#: an integer ``code``, a string ``message`` and an optional ``data``.  The spec names no
#: other members; lanchat promises to send none.
RESPONSE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "jsonrpc": {"const": "2.0"},
        "id": {"type": ["string", "number", "null"]},
        "result": True,
        "error": {
            "type": "object",
            "properties": {"code": _ERROR_CODE, "message": {"type": "string"}, "data": True},
            "required": ["code", "message"],
            "additionalProperties": False,
        },
    },
    "required": ["jsonrpc", "id"],
    "oneOf": [{"required": ["result"]}, {"required": ["error"]}],
    "additionalProperties": False,
}

#: A whole reply line: one response, or a batch of them -- never an empty array (spec 6).
REPLY_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$defs": {"response": RESPONSE_SCHEMA},
    "oneOf": [
        {"$ref": "#/$defs/response"},
        {"type": "array", "items": {"$ref": "#/$defs/response"}, "minItems": 1},
    ],
}

jsonschema.Draft202012Validator.check_schema(REPLY_SCHEMA)
_RESPONSE = jsonschema.Draft202012Validator(RESPONSE_SCHEMA)
_REPLY = jsonschema.Draft202012Validator(REPLY_SCHEMA)


def is_response(obj: object) -> bool:
    """True if ``obj`` is a response object by :data:`RESPONSE_SCHEMA`."""
    return bool(_RESPONSE.is_valid(obj))


def assert_reply_shape(obj: object) -> None:
    """Raise AssertionError naming every schema violation of a decoded reply."""
    errors = sorted(_REPLY.iter_errors(obj), key=lambda e: list(e.absolute_path))
    assert not errors, f"not a JSON-RPC 2.0 reply: {[e.message for e in errors]}: {obj!r}"


# -- reading the request, the spec's way ---------------------------------------------------------

class _NotJson(Exception):
    pass


def _no_constant(name: str) -> Any:
    raise _NotJson(name)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJson(text)
    return value


def decode_request(line: bytes) -> tuple[bool, Any]:
    """``(True, value)`` for a line that is JSON text, ``(False, None)`` for one that is not.

    JSON text is UTF-8 (RFC 8259 section 8.1); NaN, Infinity and overflowing numbers are
    refused as lanchat documents.
    """
    try:
        text = line.decode("utf-8")
        return True, json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except (UnicodeDecodeError, ValueError, RecursionError, _NotJson):
        return False, None


def _is_id(value: object) -> bool:
    return value is None or isinstance(value, str) or (
        isinstance(value, int | float) and not isinstance(value, bool))


def is_request(obj: object) -> bool:
    """A Request object (spec 4): "jsonrpc": "2.0", a string method, structured params if any,
    and an id (if any) that is a string, a number or null."""
    return (isinstance(obj, dict) and obj.get("jsonrpc") == "2.0"
            and isinstance(obj.get("method"), str)
            and ("params" not in obj or isinstance(obj["params"], dict | list))
            and ("id" not in obj or _is_id(obj["id"])))


def is_notification(obj: object) -> bool:
    """A Notification is a Request object without an "id" member (spec 4.1)."""
    return is_request(obj) and isinstance(obj, dict) and "id" not in obj


def _same_json(a: object, b: object) -> bool:
    """Equal as JSON values: same type (1 is not 1.0 is not true), same content."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


#: What a route of the test's dispatch table answers: ``(ok, value)`` -- a result, or an
#: error code -- for given named params.
Expect = Callable[[dict[str, Any]], tuple[bool, Any]]


def _check_one(req: object, resp: Mapping[str, Any], routes: Mapping[str, Expect]) -> None:
    if not is_request(req):
        assert "error" in resp and resp["error"]["code"] == INVALID_REQUEST, (req, resp)
        req_id = req.get("id") if isinstance(req, dict) else None
        # "If there was an error in detecting the id in the Request object (e.g. Parse
        # error/Invalid Request), it MUST be Null"; an id that could be read may be echoed.
        assert resp["id"] is None or (_is_id(req_id) and _same_json(resp["id"], req_id)), \
            (req, resp)
        return
    assert isinstance(req, dict)
    assert _same_json(resp["id"], req["id"]), f"id not echoed unchanged: {req!r} -> {resp!r}"
    method, params = req["method"], req.get("params", {})
    expect = routes.get(method)
    if expect is None or method.startswith("rpc."):
        assert "error" in resp and resp["error"]["code"] == METHOD_NOT_FOUND, (req, resp)
    elif isinstance(params, list):
        assert "error" in resp and resp["error"]["code"] == INVALID_PARAMS, (req, resp)
    else:
        ok, value = expect(params)
        if ok:
            assert "result" in resp and _same_json(resp["result"], value), (req, resp)
        else:
            assert "error" in resp and resp["error"]["code"] == value, (req, resp)


def check_reply(line: bytes, out: bytes | None, routes: Mapping[str, Expect]) -> None:
    """Assert that ``out`` is the reply the spec prescribes to request ``line``.

    ``routes`` says what each method of the dispatch table answers.  Checked: the reply is
    one UTF-8 line of JSON matching :data:`REPLY_SCHEMA`; nothing at all for a notification
    or a batch of notifications; a parse error (id null) for text that is not JSON; a single
    Invalid Request for ``[]``; otherwise one response per entry that is not a notification,
    in a batch an array of them (in any order, spec 6), each with the id, result or error
    code the request calls for.
    """
    is_json, request = decode_request(line)
    if out is None:
        assert is_json and (is_notification(request) or (
            isinstance(request, list) and request and all(map(is_notification, request)))), \
            f"no reply to {line[:200]!r}"
        return
    assert out.endswith(b"\n") and out.count(b"\n") == 1, out[:200]
    ok, reply = decode_request(out)
    assert ok, f"the reply is not UTF-8 JSON text: {out[:200]!r}"
    assert_reply_shape(reply)
    if not is_json or request == []:
        code = PARSE_ERROR if not is_json else INVALID_REQUEST
        assert isinstance(reply, dict), reply
        assert reply["id"] is None and reply.get("error", {}).get("code") == code, reply
        return
    if not isinstance(request, list):
        assert isinstance(reply, dict), f"a single request got a batch reply: {reply!r}"
        assert not is_notification(request), f"a notification was answered: {reply!r}"
        _check_one(request, reply, routes)
        return
    assert isinstance(reply, list), f"a batch got a single reply: {reply!r}"
    answered = [r for r in request if not is_notification(r)]
    assert len(reply) == len(answered), f"{len(answered)} answers due, got {reply!r}"
    # Responses may come in any order (spec 6) and ids may repeat: pair them up.
    assert _pair(answered, reply, routes), f"the responses do not fit the batch {request!r}: " \
        f"{reply!r}"


def _fits(req: object, resp: Mapping[str, Any], routes: Mapping[str, Expect]) -> bool:
    try:
        _check_one(req, resp, routes)
    except AssertionError:
        return False
    return True


def _pair(requests: list[Any], responses: list[Any], routes: Mapping[str, Expect]) -> bool:
    """True if every request has its own response that fits it (a small backtracking match)."""
    if not requests:
        return True
    first, rest = requests[0], requests[1:]
    for i, resp in enumerate(responses):
        if _fits(first, resp, routes) and _pair(rest, responses[:i] + responses[i + 1:], routes):
            return True
    return False
