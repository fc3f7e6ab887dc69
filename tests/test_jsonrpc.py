"""JSON-RPC 2.0 codec conformance (https://www.jsonrpc.org/specification; conventions.md §3.1)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from lanchat import jsonrpc
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
    resp = call(json.dumps(batch))
    assert isinstance(resp, list)
    by_id = {}
    for r in resp:
        assert jsonrpc.response_is_valid(r)
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
    assert all(jsonrpc.response_is_valid(r) for r in replies)
    # A single request is never refused: only a batch's later members are.
    assert json.loads(jsonrpc.handle_line(
        b'{"jsonrpc":"2.0","method":"page","params":{"n":0},"id":1}', {"page": page},
        max_batch_reply=10))["result"] == "x" * 1000


def test_str_input_and_whitespace() -> None:
    out = jsonrpc.handle_line('  {"jsonrpc":"2.0","method":"void","id":1}  ', ROUTES)
    assert out is not None and json.loads(out)["result"] is None


def _check_reply(out: bytes | None) -> None:
    if out is None:
        return
    assert out.endswith(b"\n") and out.count(b"\n") == 1
    obj = json.loads(out)
    items = obj if isinstance(obj, list) else [obj]
    assert items, "a batch reply is never []"
    for item in items:
        assert jsonrpc.response_is_valid(item), item


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    _check_reply(jsonrpc.handle_line(data, ROUTES))


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
def test_arbitrary_json_gets_spec_valid_reply(obj: Any) -> None:
    line = json.dumps(obj).encode()
    out = jsonrpc.handle_line(line, ROUTES)
    _check_reply(out)
    # A well-formed notification (object with no id) never gets an answer.
    if (isinstance(obj, dict) and "id" not in obj and obj.get("jsonrpc") == "2.0"
            and isinstance(obj.get("method"), str)
            and ("params" not in obj or isinstance(obj["params"], dict | list))):
        assert out is None
