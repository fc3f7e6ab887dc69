"""Fuzzing: every decoder on the pure floor, and the daemon's sockets, fed hostile input.

Pure decoders (hypothesis): LineDecoder, framing.loads_line, wire.parse_hello/parse_command,
textmode.parse_line, jsonrpc.handle_line, linkproto.parse_frame, Message/Presence/NodeRoster
.from_dict and NetworkRoster.apply.  Each may only ever raise a LanchatError subclass, and
whatever it accepts must encode again (a value that decodes but cannot be re-encoded
poisons every later reply that carries it).

Every target runs twice: ``FUZZ_SHORT`` cases in CI, ``FUZZ_LONG`` under ``-m slow``.  The
number of cases hypothesis actually ran is printed per target (``pytest -s``).

Socket level: random bytes and malformed frames to a real lanchatd over TCP (text and JSON
mode), UDP and the control socket; afterwards the daemon is alive, a normal client chats,
and its threads, open fds and RSS are back near their baseline.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, LineClient, TextUser
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lanchat import jsonrpc, linkproto, textmode, wire
from lanchat.client import ControlClient
from lanchat.errors import FrameTooLong, LanchatError
from lanchat.framing import LineDecoder, dumps_line, loads_line
from lanchat.limits import MAX_FRAME_BYTES, WRITER_IDLE_EXIT_S
from lanchat.model import Message, Presence
from lanchat.presence import NetworkRoster, NodeRoster

FUZZ_SHORT = 200
FUZZ_LONG = 20_000

#: Cases run per target in this process, for the report (printed by each test).
CASES: collections.Counter[str] = collections.Counter()

NODE_A = "a1" * 8
NODE_B = "b2" * 8


# -- strategies -------------------------------------------------------------------------------

#: A scalar that ``as_json`` replaces with a raw JSON spelling (``1e999``, deep nesting, ...).
RAW = "\u0001RAW\u0001"
_RAW_JSON = json.dumps(RAW)

_scalars = (st.none() | st.booleans() | st.integers() | st.integers(-(2**70), 2**70)
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.text(max_size=12)
            | st.sampled_from(["", "\x1b[2J", "a\nb", "\x00", "\ud800", "lobby", "#dev",
                               "alice", NODE_A, "é" * 40, RAW, RAW]))
json_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=16,
)

#: Raw JSON spellings that json.dumps never produces but a peer can send.
_raw_json_atoms = st.sampled_from(["1e999", "-1e999", "1" * 5000]) | st.sampled_from([
    "1e999", "-1e999", "NaN", "Infinity", "-Infinity", "1" * 5000, "0" * 10, "-0", "1.5e-400",
    '"\\ud800"', '"\\u0000"', '"\\u001b]0;x\\u0007"', "true", "null", "[]", "{}",
    "[" * 3000 + "]" * 3000, "{\"a\":" * 2000 + "1" + "}" * 2000,
])


def as_json(values: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """``values`` as JSON bytes, each ``RAW`` scalar in them spelled as a hostile atom."""
    def spell(value: Any, atoms: list[str]) -> bytes:
        text = json.dumps(value)
        for atom in atoms:
            text = text.replace(_RAW_JSON, atom, 1)
        return text.replace(_RAW_JSON, "1e999").encode()
    return st.builds(spell, values, st.lists(_raw_json_atoms, min_size=1, max_size=4))


def _splice(base: dict[str, Any], key: str, atom: str) -> bytes:
    """``base`` as JSON with ``key``'s value replaced by a raw JSON spelling."""
    d = dict(base)
    d[key] = RAW
    return json.dumps(d).replace(_RAW_JSON, atom).encode()


def _frames(kinds: list[str], keys: list[str]) -> st.SearchStrategy[bytes]:
    """JSON objects with a plausible ``type``, plausible keys and hostile values, as bytes."""
    obj = st.fixed_dictionaries(
        {"type": st.sampled_from(kinds) | json_values},
        optional={k: st.just(RAW) | json_values for k in keys},
    )
    plain = as_json(obj)
    spliced = st.builds(_splice, obj, st.sampled_from(keys), _raw_json_atoms)
    return plain | spliced


def _mutated_bytes(base: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """``base`` frames, some with bytes flipped, cut short or NUL/0xFF/CR inserted."""
    def mutate(data: bytes, pos: int, how: int, byte: int) -> bytes:
        if not data:
            return data
        i = pos % len(data)
        if how == 0:
            return data[:i]
        if how == 1:
            return data[:i] + bytes([byte]) + data[i + 1:]
        return data[:i] + bytes([byte]) + data[i:]
    hostile = st.sampled_from([0x00, 0xFF, 0x0D, 0x1B, 0x80, 0xC0, 0xED, 0x22, 0x5C])
    return base | st.builds(mutate, base, st.integers(0, 10**6), st.integers(0, 2),
                            hostile | st.integers(0, 255))


def _message_dicts() -> st.SearchStrategy[dict[str, Any]]:
    good = {"id": f"{NODE_A}:3", "origin": NODE_A, "seq": 3, "ts": 1.7e9, "room": "lobby",
            "nick": "alice", "host": "laptop", "text": "hi"}
    return st.builds(
        lambda drop, over: {**{k: v for k, v in good.items() if k not in drop}, **over},
        st.sets(st.sampled_from(sorted(good))),
        st.dictionaries(st.sampled_from([*good, "to", "extra"]), json_values, max_size=3),
    )


def _roster_dicts() -> st.SearchStrategy[Any]:
    user_fields = {
        "nick": st.sampled_from(["bob", "x y", ""]) | json_values,
        "host": st.sampled_from(["h", ""]) | json_values,
        "since": st.floats() | st.just(RAW) | json_values,
        "room": st.sampled_from(["lobby", "Dev", "#x"]) | json_values,
        "via": st.sampled_from(["tcp", "udp"]) | json_values,
    }
    plausible = st.fixed_dictionaries({
        "nick": st.sampled_from(["bob", "carol"]), "host": st.just("h"),
        "since": st.sampled_from([math.inf, -math.inf, math.nan]) | st.floats() | st.just(RAW)
        | st.integers()},
        optional={"room": user_fields["room"], "via": user_fields["via"]})
    user = plausible | st.fixed_dictionaries({}, optional=user_fields)
    plausible_roster = st.fixed_dictionaries({
        "node": st.just(NODE_B), "ver": st.integers(0, 5), "name": st.just("n"),
        "host": st.just("h"), "users": st.lists(user, max_size=3)})
    return plausible_roster | st.fixed_dictionaries({}, optional={
        "node": st.sampled_from([NODE_A, NODE_B, "x"]) | json_values,
        "ver": st.integers(-2, 2**64) | json_values,
        "name": st.sampled_from(["n", "\x1b[31m", "a\nb"]) | json_values,
        "host": st.sampled_from(["h"]) | json_values,
        "users": st.lists(user, max_size=4) | json_values,
        "gone": json_values,
    }) | json_values


# -- the checks ----------------------------------------------------------------------------

def _only_lanchat_errors(fn: Callable[[], Any]) -> Any:
    """Run ``fn``; a LanchatError is an allowed refusal (None), anything else propagates."""
    try:
        return fn()
    except LanchatError:
        return None


def check_line_decoder(case: tuple[int, list[bytes]]) -> None:
    """Any split of a stream gives the lines a reference split gives; the limit holds."""
    max_frame, chunks = case
    stream = b"".join(chunks)
    *complete, tail = stream.split(b"\n")
    expected = [line[:-1] if line.endswith(b"\r") else line for line in complete]
    too_long = any(len(line) + 1 > max_frame for line in complete) or len(tail) >= max_frame
    dec = LineDecoder(max_frame)
    got: list[bytes] = []
    raised = False
    for chunk in chunks:
        try:
            got += dec.feed(chunk)
        except FrameTooLong:
            raised = True
            break
        assert dec.pending < max_frame, "the decoder held a frame past its limit"
    for line in got:
        assert len(line) < max_frame and b"\n" not in line
    if raised:
        assert too_long, "FrameTooLong for a stream whose every line fits"
        assert got == expected[: len(got)]
        with pytest.raises(FrameTooLong):  # poisoned: the stream has lost its framing
            dec.feed(b"more\n")
    else:
        assert not too_long, "a line over the limit went through"
        assert got == expected
        assert dec.eof() == tail


def check_loads_line(data: bytes) -> None:
    value = _only_lanchat_errors(lambda: loads_line(data))
    if value is not None:
        dumps_line(value)  # strict JSON in means strict JSON out (no inf, no NaN)


def check_parse_hello(data: bytes) -> None:
    hello = _only_lanchat_errors(lambda: wire.parse_hello(data))
    if hello is not None:
        assert hello.version == wire.VERSION
        assert hello.role in ("client", "daemon")


def check_parse_command(data: bytes) -> None:
    cmd = _only_lanchat_errors(lambda: wire.parse_command(data))
    if cmd is None:
        return
    # every reply a command leads to must be encodable (a sent ack echoes ref, pong echoes t)
    if hasattr(cmd, "ref"):
        wire.encode_sent(cmd.ref, Message(origin=NODE_A, seq=1, ts=1.0, room="lobby",
                                          nick="a", host="h", text=cmd.text))
    if hasattr(cmd, "token"):
        wire.encode_pong(cmd.token)


def check_textmode(text: str) -> None:
    cmd = _only_lanchat_errors(lambda: textmode.parse_line(text))
    if cmd is not None and hasattr(cmd, "text"):
        assert "\x00" not in cmd.text


_ROUTES: dict[str, jsonrpc.Handler] = {"echo": lambda p: p, "void": lambda p: None}


def check_jsonrpc(data: bytes) -> None:
    out = jsonrpc.handle_line(data, _ROUTES)  # never raises, by contract
    if out is None:
        return
    assert out.endswith(b"\n") and out.count(b"\n") == 1
    obj = json.loads(out)
    for item in obj if isinstance(obj, list) else [obj]:
        assert jsonrpc.response_is_valid(item), item
        if "result" in item:  # what we echo must be what was sent, encodable
            dumps_line(item)


def check_link_frame(data: bytes) -> None:
    frame = _only_lanchat_errors(lambda: linkproto.parse_frame(data))
    if isinstance(frame, linkproto.Msgs):
        linkproto.encode_msgs(frame.messages)
    elif isinstance(frame, linkproto.Roster):
        linkproto.encode_roster(frame.roster)  # relayed to every other peer as is
    elif isinstance(frame, linkproto.Sync):
        linkproto.encode_sync(frame.cursors)


def check_message(d: Any) -> None:
    msg = _only_lanchat_errors(lambda: Message.from_dict(d))
    if msg is not None:
        assert Message.from_dict(json.loads(dumps_line(msg.to_dict()))) == msg
        textmode.encode_message(msg)


def check_presence(d: Any) -> None:
    p = _only_lanchat_errors(lambda: Presence.from_dict(d))
    if p is not None:
        assert Presence.from_dict(json.loads(dumps_line(p.to_dict()))) == p
        textmode.encode_presence(p)


def check_roster(d: Any) -> None:
    r = _only_lanchat_errors(lambda: NodeRoster.from_dict(d))
    if r is not None:
        again = NodeRoster.from_dict(json.loads(dumps_line(r.to_dict())))
        assert again.node == r.node and again.ver == r.ver
        # what a JSON client's welcome and `lanchat users` would carry
        dumps_line([u.to_dict() for u in r.users])


def check_network_roster(seq: list[Any]) -> None:
    net = NetworkRoster(NODE_A)
    for d, direct in seq:
        r = _only_lanchat_errors(lambda d=d: NodeRoster.from_dict(d))
        if r is not None:
            net.apply(r, via="link", direct=direct)
        if d is not None and isinstance(d, dict) and isinstance(d.get("node"), str):
            _only_lanchat_errors(lambda d=d: net.mark_gone(d["node"]))
    dumps_line([u.to_dict() for u in net.users()])


# -- targets ------------------------------------------------------------------------------

_hello_keys = ["v", "nick", "room", "role", "client", "node", "name", "host", "port"]
_cmd_keys = ["text", "to", "ref", "room", "nick", "t", "reason"]
_link_keys = ["m", "roster", "cursors", "reason", "code", "message", "v", "role", "node",
              "name", "host", "port"]

TARGETS: dict[str, tuple[st.SearchStrategy[Any], Callable[[Any], None]]] = {
    "framing.LineDecoder": (
        st.tuples(st.integers(2, 64),
                  st.lists(st.binary(max_size=40)
                           | st.sampled_from([b"\n", b"\r\n", b"\r", b"x" * 70, b"\n\n"]),
                           max_size=12)),
        check_line_decoder),
    "framing.loads_line": (
        _mutated_bytes(st.binary(max_size=200) | as_json(json_values)
                       | _raw_json_atoms.map(str.encode)),
        check_loads_line),
    "wire.parse_hello": (
        _mutated_bytes(_frames(["hello", "say"], _hello_keys) | st.binary(max_size=100)),
        check_parse_hello),
    "wire.parse_command": (
        _mutated_bytes(_frames(["say", "join", "nick", "users", "ping", "bye", "hello"],
                               _cmd_keys) | st.binary(max_size=100)),
        check_parse_command),
    "textmode.parse_line": (
        st.text(max_size=80) | st.builds(lambda c, rest: f"/{c} {rest}",
                                         st.sampled_from(["nick", "join", "me", "msg", "quit",
                                                          "ping", "users", "help", "x", "MSG"]),
                                         st.text(max_size=40)),
        check_textmode),
    "jsonrpc.handle_line": (
        _mutated_bytes(_frames(["x"], ["jsonrpc", "method", "params", "id"]).map(
            lambda b: b.replace(b'"type"', b'"_t"'))
            | as_json(st.lists(json_values, max_size=3))
            | _raw_json_atoms.map(lambda a: ('{"jsonrpc":"2.0","method":"echo","id":' + a
                                             + ',"params":{"x":' + a + "}}").encode())),
        check_jsonrpc),
    "linkproto.parse_frame": (
        _mutated_bytes(_frames(["msgs", "roster", "sync", "ping", "pong", "bye", "welcome",
                                "error"], _link_keys)
                       | as_json(st.builds(lambda ms: {"type": "msgs", "m": ms},
                                           st.lists(_message_dicts(), max_size=3)))
                       | as_json(st.builds(lambda r: {"type": "roster", "roster": r},
                                           _roster_dicts()))
                       | _raw_json_atoms.map(lambda a: _splice(
                           {"type": "roster", "roster": {"node": NODE_B, "ver": 1, "name": "n",
                                                         "host": "h", "users": [
                                                             {"nick": "bob", "host": "h",
                                                              "since": 0}]}},
                           "roster", a))),
        check_link_frame),
    "model.Message.from_dict": (_message_dicts() | json_values, check_message),
    "model.Presence.from_dict": (
        st.fixed_dictionaries({}, optional={
            "kind": st.sampled_from(["join", "leave", "nick", "x"]) | json_values,
            "nick": st.sampled_from(["bob", "b b"]) | json_values,
            "host": st.sampled_from(["h"]) | json_values,
            "node": st.sampled_from([NODE_A]) | json_values,
            "room": st.sampled_from(["lobby"]) | json_values,
            "ts": st.floats() | json_values,
            "old": st.sampled_from(["al"]) | json_values,
            "reason": st.text(max_size=5) | json_values}) | json_values,
        check_presence),
    "presence.NodeRoster.from_dict": (_roster_dicts(), check_roster),
    "presence.NetworkRoster.apply": (
        st.lists(st.tuples(_roster_dicts(), st.booleans()), max_size=6), check_network_roster),
}


_INF_ROSTER = {"node": NODE_B, "ver": 1, "name": "n", "host": "h",
               "users": [{"nick": "bob", "host": "h", "since": math.inf}]}

#: Inputs every run tries first: hostile spellings found once, kept as regressions.
PINNED: dict[str, list[Any]] = {
    "framing.loads_line": [b"1e999", b"[" * 100_000, b"1" * 5000],
    "wire.parse_command": [b'{"type":"ping","t":1e999}', b'{"type":"say","text":"x","ref":1e999}'],
    "linkproto.parse_frame": [
        json.dumps({"type": "roster", "roster": _INF_ROSTER}).replace("Infinity", "1e999")
        .encode()],
    "presence.NodeRoster.from_dict": [_INF_ROSTER],
    "jsonrpc.handle_line": [b'{"jsonrpc":"2.0","method":"echo","params":{"x":1e999},"id":1}'],
}


def run_target(name: str, examples: int) -> int:
    """Run one target's property for ``examples`` cases; return how many hypothesis ran."""
    strategy, check = TARGETS[name]

    def prop(value: Any) -> None:
        CASES[name] += 1
        check(value)

    for pinned in PINNED.get(name, []):
        prop = example(pinned)(prop)
    prop = settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))(given(strategy)(prop))

    before = CASES[name]
    prop()
    ran = CASES[name] - before
    print(f"\nfuzz {name}: {ran} cases (asked for {examples})")
    return ran


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_decoder_short(name: str) -> None:
    assert run_target(name, FUZZ_SHORT) > 0


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_decoder_long(name: str) -> None:
    assert run_target(name, FUZZ_LONG) > 0


# -- known hostile spellings, pinned ------------------------------------------------------------

def test_overflowing_numbers_are_not_json() -> None:
    """``1e999`` is read by Python's json as ``inf``: the strict decoder must refuse it, as it
    refuses ``Infinity`` -- otherwise a ping's ``t`` or a say's ``ref`` echoes back as a
    reply the hub cannot encode, and a roster's ``since`` poisons every welcome."""
    for spelling in (b"1e999", b'{"t":-1e999}', b"[1e400]"):
        with pytest.raises(LanchatError):
            loads_line(spelling)


def test_deep_nesting_is_refused_not_a_crash() -> None:
    for depth in (1000, 100_000):
        for data in (b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth):
            check_loads_line(data)
            check_parse_command(data)
            check_link_frame(data)
            check_jsonrpc(data)


# -- socket-level fuzzing against a real daemon ----------------------------------------------

def proc_stats(pid: int) -> dict[str, int]:
    """Threads, open fds and RSS (KiB) of a process, read from /proc."""
    out = {"threads": 0, "fds": len(os.listdir(f"/proc/{pid}/fd")), "rss_kib": 0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            out["threads"] = int(line.split()[1])
        elif line.startswith("VmRSS:"):
            out["rss_kib"] = int(line.split()[1])
    return out


def wait_back_to_baseline(pid: int, base: dict[str, int], *, threads: int = 2, fds: int = 4,
                          timeout: float = WRITER_IDLE_EXIT_S + 20) -> dict[str, int]:
    """Poll until threads and fds are within slack of ``base`` (idle writers exit after
    WRITER_IDLE_EXIT_S); return the last reading."""
    deadline = time.monotonic() + timeout
    while True:
        now = proc_stats(pid)
        if (now["threads"] <= base["threads"] + threads and now["fds"] <= base["fds"] + fds):
            return now
        if time.monotonic() > deadline:
            return now
        time.sleep(0.25)


def _hostile_payloads(rng: random.Random) -> list[bytes]:
    fixed = [
        b"\xff\xfe\xfd\n", b"\x00\x00\x00\n", b"lone\rcr\rno newline", b"\r\r\r\n",
        b"{" * 5000 + b"\n", b"[" * 20000 + b"]" * 20000 + b"\n",
        b'{"type":"hello","v":1e999,"nick":"x"}\n', b'{"type":"hello","v":' + b"9" * 5000 + b"}\n",
        b'{"type":"hello","v":1,"nick":"\\u0000"}\n', b'{"type":"hello","v":1,"nick":"\\ud800"}\n',
        b'{"type":"hello","v":1,"role":"daemon","node":"zz"}\n',
        b'{"type":"hello","v":1,"role":"daemon"}\n',
        b"\x1b]0;pwned\x07\n", b"x" * (MAX_FRAME_BYTES + 10), b"\xc0\x80\n", b"\xed\xa0\x80\n",
    ]
    rand = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) for _ in range(8)]
    return fixed + rand


def _json_session_junk(rng: random.Random, nick: str) -> bytes:
    """A valid hello followed by malformed frames (a JSON-mode client gone wrong)."""
    junk = [
        b'{"type":"ping","t":1e999}', b'{"type":"say","text":"x","ref":1e999}',
        b'{"type":"say","text":"a\\u0000b"}', b'{"type":"say","text":"\\ud800"}',
        b'{"type":"join","room":[' + b"[" * 3000 + b"]" * 3000 + b"]}",
        b'{"type":"nick","nick":"\\u001b[2J"}', b'{"type":' + b"1" * 5000 + b"}",
        b"\xff\xff", b"[]", b"null", b'{"type":"say","text":"' + b"y" * 5000 + b'"}',
        b'{"type":"users","x":' + b"{" * 100 + b"}",
    ]
    rng.shuffle(junk)
    hello = json.dumps({"type": "hello", "v": 1, "nick": nick}).encode()
    return b"\n".join([hello, *junk[: rng.randrange(1, len(junk))]]) + b"\n"


def _fuzz_tcp_once(port: int, payload: bytes, *, linger_rst: bool) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        if linger_rst:  # close with a RST instead of a FIN
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        with contextlib.suppress(OSError):
            s.sendall(payload)
            s.settimeout(0.05)
            s.recv(65536)


def _fuzz_control_once(path: str, payload: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(path)
        with contextlib.suppress(OSError):
            s.sendall(payload)
            s.settimeout(0.05)
            s.recv(65536)


def _rpc_junk(rng: random.Random) -> bytes:
    atoms = ["1e999", "NaN", "1" * 5000, '"\\ud800"', "[" * 3000 + "]" * 3000, "{}", "[]",
             '"\\u0000"']
    a = rng.choice(atoms)
    choices = [
        f'{{"jsonrpc":"2.0","method":"send","params":{{"text":{a}}},"id":1}}'.encode(),
        f'{{"jsonrpc":"2.0","method":"history","params":{{"limit":{a}}},"id":{a}}}'.encode(),
        f'{{"jsonrpc":"2.0","method":"subscribe","params":{{"backlog":{a}}},"id":2}}'.encode(),
        f'{{"jsonrpc":"2.0","method":"set_nick","params":{{"nick":{a}}},"id":3}}'.encode(),
        f'[{a},{a}]'.encode(),
        bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))),
    ]
    return rng.choice(choices) + b"\n"


def socket_fuzz(daemon: Daemon, *, connections: int, seconds: float, seed: int) -> dict[str, int]:
    """Throw ``connections`` hostile TCP sessions (text and JSON mode), UDP datagrams and
    control-socket lines at ``daemon`` within ``seconds``; return counts of what was sent."""
    rng = random.Random(seed)
    payloads = _hostile_payloads(rng)
    counts: collections.Counter[str] = collections.Counter()
    udp_many = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(20)]
    deadline = time.monotonic() + seconds
    try:
        for i in range(connections):
            if time.monotonic() > deadline:
                break
            kind = i % 5
            if kind == 0:
                _fuzz_tcp_once(daemon.port, rng.choice(payloads), linger_rst=rng.random() < 0.3)
                counts["tcp-raw"] += 1
            elif kind == 1:
                _fuzz_tcp_once(daemon.port, _json_session_junk(rng, f"j{i}"),
                               linger_rst=rng.random() < 0.3)
                counts["tcp-json"] += 1
            elif kind == 2:
                # text mode: a nick, then hostile lines
                body = b"\n".join(rng.choice(payloads) for _ in range(3))
                _fuzz_tcp_once(daemon.port, f"t{i}\n".encode() + body,
                               linger_rst=rng.random() < 0.3)
                counts["tcp-text"] += 1
            elif kind == 3:
                sock = rng.choice(udp_many)
                for data in (f"u{i}".encode(), rng.choice(payloads)[:9000], b"", b"\xff" * 10,
                             b"/nick \x1b[2J", b"x" * 9000):
                    with contextlib.suppress(OSError):
                        sock.sendto(data, ("127.0.0.1", daemon.port))
                    counts["udp"] += 1
                if rng.random() < 0.5:
                    sock.sendto(b"/quit", ("127.0.0.1", daemon.port))
            else:
                _fuzz_control_once(daemon.socket, _rpc_junk(rng))
                counts["control"] += 1
    finally:
        for s in udp_many:
            with contextlib.suppress(OSError):
                s.sendto(b"/quit", ("127.0.0.1", daemon.port))
            s.close()
    return dict(counts)


def _assert_still_serves(daemon: Daemon, clients: list[Any]) -> None:
    assert daemon.proc is not None and daemon.proc.poll() is None, daemon.stderr()[-3000:]
    a = TextUser(daemon.port, "after1")
    b = TextUser(daemon.port, "after2")
    clients += [a, b]
    a.until("after2 joined")
    b.send("still chatting\n")
    assert a.until("after2:").endswith("after2: still chatting")
    with ControlClient(daemon.socket, timeout=10) as c:
        assert c.call("status")["node"]
    a.send("/quit\n")
    b.send("/quit\n")
    assert a.closed() and b.closed()


def _run_socket_fuzz(daemon: Daemon, clients: list[Any], *, connections: int,
                     seconds: float) -> None:
    assert daemon.proc is not None
    pid = daemon.proc.pid
    watcher = TextUser(daemon.port, "watcher")  # a user present throughout
    clients.append(watcher)
    time.sleep(WRITER_IDLE_EXIT_S + 0.5)  # the watcher's writer thread idles out
    base = proc_stats(pid)
    seed = random.randrange(1 << 30)
    started = time.monotonic()
    counts = socket_fuzz(daemon, connections=connections, seconds=seconds, seed=seed)
    took = time.monotonic() - started
    peak = proc_stats(pid)
    after = wait_back_to_baseline(pid, base)
    print(f"\nsocket fuzz (seed {seed}): {counts} in {took:.1f} s; "
          f"baseline {base}, right after {peak}, settled {after}")
    err = daemon.stderr()
    assert "Traceback" not in err, f"seed {seed}: the daemon logged a traceback:\n{err[-4000:]}"
    _assert_still_serves(daemon, clients)
    watcher.send("watcher still here\n")
    watcher.send("/users\n")
    assert watcher.until("* In #lobby").startswith("* In #lobby")
    assert after["threads"] <= base["threads"] + 2, (seed, base, after)
    assert after["fds"] <= base["fds"] + 4, (seed, base, after)
    assert after["rss_kib"] <= base["rss_kib"] + 30 * 1024, (seed, base, after)


def test_socket_fuzz_tcp_udp_control(daemon: Daemon, clients: list[Any]) -> None:
    _run_socket_fuzz(daemon, clients, connections=300, seconds=15)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_socket_fuzz_long(daemon: Daemon, clients: list[Any]) -> None:
    _run_socket_fuzz(daemon, clients, connections=20_000, seconds=300)


def test_json_client_hostile_numbers_get_errors_not_a_dropped_connection(
        daemon: Daemon, clients: list[Any]) -> None:
    """A ping with ``t: 1e999`` or a say with ``ref: 1e999`` must get a non-fatal error (or a
    reply) on a connection that stays usable, and no traceback in the log."""
    j = LineClient(daemon.port)
    clients.append(j)
    j.send(json.dumps({"type": "hello", "v": 1, "nick": "num"}) + "\n")
    j.until('"welcome"')
    for frame in (b'{"type":"ping","t":1e999}\n', b'{"type":"say","text":"x","ref":-1e999}\n'):
        j.send(frame)
        reply = json.loads(j.line())
        assert reply["type"] in ("error", "pong", "sent"), reply
        if reply["type"] == "error":
            assert reply["fatal"] is False, reply
    j.send(b'{"type":"ping","t":7}\n')
    assert json.loads(j.until('"pong"')) == {"type": "pong", "t": 7}
    assert "Traceback" not in daemon.stderr(), daemon.stderr()[-3000:]


def test_lone_surrogates_are_sent_as_escapes_not_invalid_utf8() -> None:
    """``"\\ud800"`` is valid JSON that ``loads_line`` accepts; ``dumps_line`` must write it back
    as that escape, so the frame is UTF-8 and decodes to what was encoded."""
    for value in ("\ud800", {"\udfff": ["a\ud83db", 1]}, ["\udc00" * 3]):
        line = dumps_line(value)
        line.decode("utf-8")  # strict: raises on invalid UTF-8
        assert loads_line(line) == value


def test_a_lone_surrogate_reaches_everyone_else_as_valid_utf8(daemon: Daemon,
                                                              clients: list[Any]) -> None:
    """A JSON client may put ``"\\ud800"`` in its bye reason, which the hub shows to everyone in
    the room.  What reaches the others -- JSON clients and control subscribers alike -- must be
    UTF-8 their strict decoders accept, with the escape as written: otherwise one client's
    goodbye garbles every other connection (``lanchat tail`` dies on it)."""
    hello = '{{"type":"hello","v":1,"nick":"{}"}}\n'
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sub:
        sub.settimeout(10)
        sub.connect(daemon.socket)
        notes = sub.makefile("rb")
        sub.sendall(b'{"jsonrpc":"2.0","method":"subscribe","params":{},"id":1}\n')
        assert loads_line(notes.readline())["id"] == 1
        watcher = LineClient(daemon.port)
        leaver = LineClient(daemon.port)
        clients += [watcher, leaver]
        watcher.send(hello.format("watcher"))
        watcher.until('"welcome"')
        leaver.send(hello.format("leaver"))
        leaver.until('"welcome"')
        watcher.until('"join"')
        leaver.send('{"type":"bye","reason":"\\ud800 gone"}\n')
        seen = json.loads(watcher.until('"leave"'))  # (read with errors="replace")
        assert seen["presence"]["reason"] == "\ud800 gone", seen
        for _ in range(10):
            note = loads_line(notes.readline())  # strict UTF-8, as `lanchat tail` reads
            if note["params"].get("kind") == "leave":
                assert note["params"]["reason"] == "\ud800 gone", note
                break
        else:
            raise AssertionError("the subscriber never saw the leave")
