"""JSON-RPC 2.0 codec conformance (https://www.jsonrpc.org/specification; conventions.md §3.1).

Replies are judged by an oracle that owes nothing to the codec (``jsonrpc_oracle``: a JSON
Schema checked by ``jsonschema``, and the spec's rules applied to the request), and by the
spec's own examples, written out below as literal request/response pairs and sent both to the
codec and to a real control server over its Unix socket.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from typing import Any

import jsonrpc_oracle as oracle
import pytest
from control_fake import FakeBackend
from hypothesis import given, settings
from hypothesis import strategies as st

from lanchat import jsonrpc
from lanchat.control import ControlServer
from lanchat.errors import (
    ClosedError,
    LanchatError,
    LimitExceeded,
    NickInUse,
    StoreError,
    ValidationError,
)


def _fail(exc: Exception) -> Any:
    def handler(params: dict[str, Any]) -> Any:
        raise exc
    return handler


ROUTES: dict[str, jsonrpc.Handler] = {
    "echo": lambda p: p,
    "void": lambda p: None,
    "subtract": lambda p: p["minuend"] - p["subtrahend"],
    "boom": _fail(RuntimeError("secret /etc/path traceback detail")),
    "badnick": _fail(ValidationError("nick must be a string", code="bad-nick")),
    "store": _fail(StoreError("disk full")),
    "taken": _fail(NickInUse("alice is taken")),
    "limit": _fail(LimitExceeded("too many")),
    "denied": _fail(LanchatError("not for you", code="not-allowed")),
    "closed": _fail(ClosedError("shutting down")),
    "other": _fail(LanchatError("something")),
    "unencodable": lambda p: object(),
    "rpc.secret": lambda p: "leak",
}


def _subtract(p: dict[str, Any]) -> tuple[bool, Any]:
    """What the ``subtract`` route answers: the difference, or -32603 when it cannot."""
    try:
        value = p["minuend"] - p["subtrahend"]
        json.dumps(value, allow_nan=False)
    except Exception:  # noqa: BLE001 - any failure of the handler is an internal error
        return False, jsonrpc.INTERNAL_ERROR
    return True, value


def _fails(code: int) -> oracle.Expect:
    return lambda p: (False, code)


#: What each route of ROUTES answers, for the oracle (``rpc.secret`` is reserved: not found).
EXPECT: dict[str, oracle.Expect] = {
    "echo": lambda p: (True, p), "void": lambda p: (True, None), "subtract": _subtract,
    "boom": _fails(-32603), "badnick": _fails(-32602), "store": _fails(1), "taken": _fails(2),
    "limit": _fails(3), "denied": _fails(4), "closed": _fails(5), "other": _fails(9),
    "unencodable": _fails(-32603), "rpc.secret": _fails(-32601),
}


def call(line: str | bytes) -> Any:
    out = jsonrpc.handle_line(line if isinstance(line, bytes) else line.encode(), ROUTES)
    if out is None:
        return None
    assert out.endswith(b"\n") and out.count(b"\n") == 1
    return json.loads(out)


def test_result_echoes_id_unchanged_in_type() -> None:
    for id_ in (1, "1", 0, -5, 2.5, "", None):
        req = {"jsonrpc": "2.0", "method": "echo", "params": {"a": 1}, "id": id_}
        resp = call(json.dumps(req))
        assert resp == {"jsonrpc": "2.0", "result": {"a": 1}, "id": id_}
        assert type(resp["id"]) is type(id_)


def test_void_method_has_result_null() -> None:
    resp = call('{"jsonrpc":"2.0","method":"void","id":7}')
    assert resp == {"jsonrpc": "2.0", "result": None, "id": 7}


def test_bool_id_is_invalid_request() -> None:
    resp = call('{"jsonrpc":"2.0","method":"echo","id":true}')
    assert resp["error"]["code"] == -32600 and resp["id"] is None


def test_object_id_is_invalid_request() -> None:
    resp = call('{"jsonrpc":"2.0","method":"echo","id":{"a":1}}')
    assert resp["error"]["code"] == -32600 and resp["id"] is None


def test_jsonrpc_member_required_and_exact() -> None:
    for bad in ('{"method":"echo","id":1}', '{"jsonrpc":"2","method":"echo","id":1}',
                '{"jsonrpc":2.0,"method":"echo","id":1}'):
        resp = call(bad)
        assert resp["error"]["code"] == -32600
        assert resp["id"] == 1


def test_parse_error_has_null_id() -> None:
    for bad in (b'{"jsonrpc":"2.0","method":"echo","id":1', b"\xff\xfe", b"nope",
                b'{"jsonrpc":"2.0","method":"echo","params":{"x":NaN},"id":1}',
                b'{"jsonrpc":"2.0","method":"echo","params":{"x":Infinity},"id":1}'):
        resp = call(bad)
        assert resp["error"]["code"] == -32700 and resp["id"] is None
        assert "result" not in resp


def test_notifications_never_answered_even_on_error() -> None:
    for req in ('{"jsonrpc":"2.0","method":"echo"}',
                '{"jsonrpc":"2.0","method":"nope"}',
                '{"jsonrpc":"2.0","method":"echo","params":[1,2]}',
                '{"jsonrpc":"2.0","method":"boom"}',
                '{"jsonrpc":"2.0","method":"badnick","params":{}}'):
        assert call(req) is None


def test_id_null_is_not_a_notification() -> None:
    resp = call('{"jsonrpc":"2.0","method":"nope","id":null}')
    assert resp["error"]["code"] == -32601 and resp["id"] is None


def test_method_not_found_and_rpc_reserved() -> None:
    assert call('{"jsonrpc":"2.0","method":"nope","id":1}')["error"]["code"] == -32601
    resp = call('{"jsonrpc":"2.0","method":"rpc.secret","id":2}')
    assert resp["error"]["code"] == -32601 and resp["id"] == 2


def test_method_must_be_string() -> None:
    resp = call('{"jsonrpc":"2.0","method":1,"params":"bar","id":3}')
    assert resp["error"]["code"] == -32600


def test_params_by_name_only() -> None:
    resp = call('{"jsonrpc":"2.0","method":"subtract","params":[42,23],"id":1}')
    assert resp["error"]["code"] == -32602 and resp["id"] == 1
    resp = call('{"jsonrpc":"2.0","method":"subtract","params":{"minuend":42,"subtrahend":23},'
                '"id":1}')
    assert resp["result"] == 19
    for bad in ('"x"', "3", "null", "true"):
        resp = call('{"jsonrpc":"2.0","method":"echo","params":' + bad + ',"id":1}')
        assert resp["error"]["code"] == -32600


def test_internal_error_hides_details() -> None:
    resp = call('{"jsonrpc":"2.0","method":"boom","id":1}')
    assert resp["error"] == {"code": -32603, "message": "internal error"}
    resp = call('{"jsonrpc":"2.0","method":"unencodable","id":9}')
    assert resp["error"]["code"] == -32603 and resp["id"] == 9


def test_application_error_table() -> None:
    expected = {"badnick": (-32602, "bad-nick"), "store": (1, "store"),
                "taken": (2, "nick-taken"), "limit": (3, "limit"),
                "denied": (4, "not-allowed"), "closed": (5, "closed"), "other": (9, "error")}
    for method, (code, name) in expected.items():
        resp = call(json.dumps({"jsonrpc": "2.0", "method": method, "id": method}))
        assert resp["error"]["code"] == code, method
        assert resp["error"]["data"] == {"code": name}
        assert resp["id"] == method
    assert call('{"jsonrpc":"2.0","method":"badnick","id":1}')["error"]["message"] == \
        "nick must be a string"
    codes = [row.code for row in jsonrpc.ERROR_CODES]
    assert len(codes) == len(set(codes))


def test_empty_batch_is_single_error() -> None:
    resp = call("[]")
    assert isinstance(resp, dict) and resp["error"]["code"] == -32600 and resp["id"] is None


def test_batch_of_non_objects() -> None:
    resp = call("[1,2,3]")
    assert isinstance(resp, list) and len(resp) == 3
    assert all(r["error"]["code"] == -32600 and r["id"] is None for r in resp)


def test_batch_of_notifications_gives_no_output() -> None:
    assert call('[{"jsonrpc":"2.0","method":"echo"},{"jsonrpc":"2.0","method":"nope"}]') is None


def test_invalid_json_batch_is_single_parse_error() -> None:
    resp = call('[{"jsonrpc":"2.0","method":"echo","id":1},{"jsonrpc":"2.0","method"]')
    assert isinstance(resp, dict) and resp["error"]["code"] == -32700


def test_mixed_batch_matches_spec_example() -> None:
    batch = [
        {"jsonrpc": "2.0", "method": "subtract", "params": {"minuend": 3, "subtrahend": 1},
         "id": "1"},
        {"jsonrpc": "2.0", "method": "void", "params": {}},              # notification
        {"jsonrpc": "2.0", "method": "subtract", "params": {"minuend": 42, "subtrahend": 23},
         "id": 2},
        {"foo": "boo"},                                                  # invalid
        {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
        {"jsonrpc": "2.0", "method": "boom", "id": 6},
        {"jsonrpc": "2.0", "method": "boom"},                            # failing notification
        {"jsonrpc": "2.0", "method": "store", "id": None},
        7,
    ]
    line = json.dumps(batch).encode()
    out = jsonrpc.handle_line(line, ROUTES)
    oracle.check_reply(line, out, EXPECT)
    assert out is not None
    resp = json.loads(out)
    by_id: dict[str, list[Any]] = {}
    for r in resp:
        by_id.setdefault(json.dumps(r["id"]), []).append(r)
    assert by_id['"1"'][0]["result"] == 2
    assert by_id["2"][0]["result"] == 19
    assert by_id['"5"'][0]["error"]["code"] == -32601
    assert by_id["6"][0]["error"]["code"] == -32603
    nulls = sorted(r["error"]["code"] for r in by_id["null"])
    assert nulls == [-32600, -32600, 1]
    assert len(resp) == 7  # "1", 2, {"foo"}, "5", 6, store, 7: not the two notifications


def test_a_batch_reply_stops_growing_at_its_bound() -> None:
    """Each request in a batch runs only while the reply is under the bound; the rest are
    answered with a ``limit`` error, not run, and notifications past it are dropped."""
    ran: list[int] = []

    def page(params: dict[str, Any]) -> str:
        ran.append(params["n"])
        return "x" * 1000

    batch = [{"jsonrpc": "2.0", "method": "page", "params": {"n": i}, "id": i}
             for i in range(50)]
    batch.insert(30, {"jsonrpc": "2.0", "method": "page", "params": {"n": -1}})
    out = jsonrpc.handle_line(json.dumps(batch).encode(), {"page": page},
                              max_batch_reply=10_000)
    assert out is not None
    replies = json.loads(out)
    done = [r for r in replies if "result" in r]
    refused = [r for r in replies if "error" in r]
    assert len(done) == 10 and ran == list(range(10))  # 10 x ~1 KB passes 10,000 bytes
    assert [r["id"] for r in refused] == list(range(10, 50))  # in order, ids kept
    assert {r["error"]["code"] for r in refused} == {3}
    assert refused[0]["error"]["data"] == {"code": "limit"}
    assert len(out) < 10_000 + 1100 + 40 * 200
    assert all(oracle.is_response(r) for r in replies)
    # A single request is never refused: only a batch's later members are.
    assert json.loads(jsonrpc.handle_line(
        b'{"jsonrpc":"2.0","method":"page","params":{"n":0},"id":1}', {"page": page},
        max_batch_reply=10))["result"] == "x" * 1000


def test_str_input_and_whitespace() -> None:
    out = jsonrpc.handle_line('  {"jsonrpc":"2.0","method":"void","id":1}  ', ROUTES)
    assert out is not None and json.loads(out)["result"] is None


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_get_the_reply_the_spec_prescribes(data: bytes) -> None:
    oracle.check_reply(data, jsonrpc.handle_line(data, ROUTES), EXPECT)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
request_like = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.sampled_from(["2.0", "1.0", 2]) | json_values,
        "method": st.sampled_from([*list(ROUTES), "nope", "rpc.x"]) | json_values,
        "params": st.dictionaries(st.text(max_size=5), json_values, max_size=3) | json_values,
        "id": st.integers() | st.text(max_size=5) | st.none() | st.booleans() | json_values,
    },
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(request_like, st.lists(request_like | json_values, max_size=5), json_values))
def test_arbitrary_json_gets_the_reply_the_spec_prescribes(obj: Any) -> None:
    line = json.dumps(obj).encode()
    oracle.check_reply(line, jsonrpc.handle_line(line, ROUTES), EXPECT)


# -- the oracle itself: it must refuse the mistakes it is there to catch --------------------------

def test_the_oracle_refuses_wrong_replies() -> None:
    """Without this the oracle could be as blind as the check it replaced."""
    req = b'{"jsonrpc":"2.0","method":"echo","params":{"a":1},"id":7}'
    good = b'{"jsonrpc":"2.0","result":{"a":1},"id":7}\n'
    oracle.check_reply(req, good, EXPECT)
    wrong = [
        b'{"result":{"a":1},"id":7}\n',                                  # no "jsonrpc"
        b'{"jsonrpc":"2.0","result":{"a":1},"id":"7"}\n',                # id changed type
        b'{"jsonrpc":"2.0","result":{"a":2},"id":7}\n',                  # wrong result
        b'{"jsonrpc":"2.0","result":{"a":1},"error":{"code":1,"message":"x"},"id":7}\n',
        b'{"jsonrpc":"2.0","result":{"a":1}}\n',                          # no id
        b'[{"jsonrpc":"2.0","result":{"a":1},"id":7}]\n',                # batch for a single
        b'{"jsonrpc":"2.0","result":{"a":1},"id":7,"extra":0}\n',
        b'{"jsonrpc":"2.0","result":"\xed\xa0\x80","id":7}\n',           # not UTF-8
        None,                                                           # silence
    ]
    for out in wrong:
        with pytest.raises(AssertionError):
            oracle.check_reply(req, out, EXPECT)
    note = b'{"jsonrpc":"2.0","method":"boom"}'
    oracle.check_reply(note, None, EXPECT)
    for out in (b'{"jsonrpc":"2.0","error":{"code":-32603,"message":"x"},"id":null}\n',
                b'{"jsonrpc":"2.0","result":null,"id":null}\n'):
        with pytest.raises(AssertionError):  # a notification is never answered
            oracle.check_reply(note, out, EXPECT)
    for bad_error in ({"message": "x"}, {"code": "1", "message": "x"}, {"code": 1},
                      {"code": 1.5, "message": "x"}, {"code": -32500, "message": "reserved"},
                      {"code": True, "message": "x"}):
        assert not oracle.is_response({"jsonrpc": "2.0", "error": bad_error, "id": None})


# -- the specification's own examples ----------------------------------------------------------

#: https://www.jsonrpc.org/specification, section 7 "Examples", as literal pairs: a request
#: line and the reply the spec shows (None: "nothing is returned").  Error messages are the
#: spec's; only codes must match (messages are free text).
SPEC_EXAMPLES: list[tuple[str, str, str | None]] = [
    ("positional parameters",
     '{"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": 1}',
     '{"jsonrpc": "2.0", "result": 19, "id": 1}'),
    ("positional parameters, swapped",
     '{"jsonrpc": "2.0", "method": "subtract", "params": [23, 42], "id": 2}',
     '{"jsonrpc": "2.0", "result": -19, "id": 2}'),
    ("named parameters",
     '{"jsonrpc": "2.0", "method": "subtract", "params": {"subtrahend": 23, "minuend": 42}, '
     '"id": 3}',
     '{"jsonrpc": "2.0", "result": 19, "id": 3}'),
    ("named parameters, reordered",
     '{"jsonrpc": "2.0", "method": "subtract", "params": {"minuend": 42, "subtrahend": 23}, '
     '"id": 4}',
     '{"jsonrpc": "2.0", "result": 19, "id": 4}'),
    ("a notification",
     '{"jsonrpc": "2.0", "method": "update", "params": [1,2,3,4,5]}', None),
    ("a notification without params", '{"jsonrpc": "2.0", "method": "foobar"}', None),
    ("non-existent method",
     '{"jsonrpc": "2.0", "method": "foobar", "id": "1"}',
     '{"jsonrpc": "2.0", "error": {"code": -32601, "message": "Method not found"}, "id": "1"}'),
    ("invalid JSON",
     '{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]',
     '{"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}, "id": null}'),
    ("invalid Request object",
     '{"jsonrpc": "2.0", "method": 1, "params": "bar"}',
     '{"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": null}'),
    ("batch, invalid JSON",
     '[{"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},'
     '{"jsonrpc": "2.0", "method"]',
     '{"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}, "id": null}'),
    ("an empty Array", "[]",
     '{"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": null}'),
    ("an invalid Batch (but not empty)", "[1]",
     '[{"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": null}]'),
    ("invalid Batch", "[1,2,3]",
     '[{"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": null},'
     '{"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": null},'
     '{"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": null}]'),
    ("Batch",
     '[{"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},'
     '{"jsonrpc": "2.0", "method": "notify_hello", "params": [7]},'
     '{"jsonrpc": "2.0", "method": "subtract", "params": [42,23], "id": "2"},'
     '{"foo": "boo"},'
     '{"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},'
     '{"jsonrpc": "2.0", "method": "get_data", "id": "9"}]',
     '[{"jsonrpc": "2.0", "result": 7, "id": "1"},'
     '{"jsonrpc": "2.0", "result": 19, "id": "2"},'
     '{"jsonrpc": "2.0", "error": {"code": -32600, "message": "Invalid Request"}, "id": null},'
     '{"jsonrpc": "2.0", "error": {"code": -32601, "message": "Method not found"}, "id": "5"},'
     '{"jsonrpc": "2.0", "result": ["hello", 5], "id": "9"}]'),
    ("Batch (all notifications)",
     '[{"jsonrpc": "2.0", "method": "notify_sum", "params": [1,2,4]},'
     '{"jsonrpc": "2.0", "method": "notify_hello", "params": [7]}]', None),
]

#: The spec's methods, by name: lanchat takes params by name only (lanchat-protocol(7)).
SPEC_ROUTES: dict[str, jsonrpc.Handler] = {
    "subtract": lambda p: p["minuend"] - p["subtrahend"],
    "sum": lambda p: sum(p["values"]),
    "get_data": lambda p: ["hello", 5],
    "update": lambda p: None,
    "notify_hello": lambda p: None,
    "notify_sum": lambda p: None,
}
#: How a positional call of a spec method is spelled by name.
_BY_NAME = {"subtract": ("minuend", "subtrahend"), "sum": ("values",), "update": ("values",),
            "notify_sum": ("values",), "notify_hello": ("n",)}


def _by_name(request: Any) -> Any:
    """The spec's request with its positional params passed by name (same meaning)."""
    if isinstance(request, list):
        return [_by_name(r) for r in request]
    if not (isinstance(request, dict) and isinstance(request.get("params"), list)):
        return request
    names, args = _BY_NAME[request["method"]], request["params"]
    named = dict(zip(names, args, strict=False)) if len(names) > 1 else {names[0]: args}
    return {**request, "params": named}


def _normalised(reply: Any) -> Any:
    """A reply with error messages blanked (free text) and a batch in a canonical order."""
    if isinstance(reply, list):
        return sorted((_normalised(r) for r in reply), key=lambda r: json.dumps(r, sort_keys=True))
    if isinstance(reply, dict) and isinstance(reply.get("error"), dict):
        assert isinstance(reply["error"].get("message"), str), reply
        return {**reply, "error": {**reply["error"], "message": "..."}}
    return reply


def _spec_line(text: str) -> bytes:
    """The request as one line: re-encoded when it is JSON, byte for byte when it is not."""
    try:
        return json.dumps(_by_name(json.loads(text))).encode()
    except json.JSONDecodeError:
        return text.encode()


@pytest.mark.parametrize(("what", "request_text", "reply_text"), SPEC_EXAMPLES,
                         ids=[e[0] for e in SPEC_EXAMPLES])
def test_spec_example_through_the_codec(what: str, request_text: str,
                                        reply_text: str | None) -> None:
    out = jsonrpc.handle_line(_spec_line(request_text), SPEC_ROUTES)
    if reply_text is None:
        assert out is None, f"{what}: the spec returns nothing, lanchat said {out!r}"
        return
    assert out is not None and out.endswith(b"\n") and out.count(b"\n") == 1
    oracle.assert_reply_shape(json.loads(out))
    assert _normalised(json.loads(out)) == _normalised(json.loads(reply_text)), what


def test_spec_positional_examples_are_invalid_params_here() -> None:
    """The spec's positional calls verbatim: lanchat answers -32602 (params by name only)."""
    for request_text, id_ in (
            ('{"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": 1}', 1),
            ('{"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"}', "1")):
        out = jsonrpc.handle_line(request_text.encode(), SPEC_ROUTES)
        assert out is not None
        assert _normalised(json.loads(out)) == {
            "jsonrpc": "2.0", "error": {"code": -32602, "message": "..."}, "id": id_}


# -- the same examples against a real control server, over its socket --------------------------

@pytest.fixture
def control_socket() -> Iterator[str]:
    workdir = tempfile.mkdtemp(dir="/tmp", prefix="lcj-")
    server = ControlServer(os.path.join(workdir, "control.sock"), FakeBackend())
    server.start()
    try:
        yield server.path
    finally:
        server.close()
        shutil.rmtree(workdir, ignore_errors=True)


#: The examples whose answer does not depend on the spec's methods (the control server has
#: lanchat's own methods, and none of the spec's), sent verbatim.
_NEEDS_SPEC_METHODS = {"positional parameters", "positional parameters, swapped",
                       "named parameters", "named parameters, reordered", "Batch"}
_METHODLESS = [e for e in SPEC_EXAMPLES if e[0] not in _NEEDS_SPEC_METHODS]


def _read_line(f: Any) -> Any:
    line = f.readline()
    assert line.endswith(b"\n"), f"connection closed or partial line: {line!r}"
    return json.loads(line)


@pytest.mark.parametrize(("what", "request_text", "reply_text"), _METHODLESS,
                         ids=[e[0] for e in _METHODLESS])
def test_spec_example_over_the_control_socket(control_socket: str, what: str,
                                              request_text: str, reply_text: str | None) -> None:
    """Each request, then a marker call: the next line must be the spec's reply (or, for
    notifications, straight away the marker's reply -- nothing at all in between)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5.0)
        s.connect(control_socket)
        marker = {"jsonrpc": "2.0", "method": "methods", "id": "marker"}
        s.sendall(request_text.encode() + b"\n" + json.dumps(marker).encode() + b"\n")
        with s.makefile("rb") as f:
            if reply_text is not None:
                got = _read_line(f)
                oracle.assert_reply_shape(got)
                assert _normalised(got) == _normalised(json.loads(reply_text)), what
            after = _read_line(f)
            assert after["id"] == "marker" and isinstance(after["result"], list), after
