"""Fuzzing and round trips: every codec on the pure floor, and the daemon's sockets.

Pure decoders (hypothesis), two ways:

- **Hostile input** (``TARGETS``): LineDecoder, framing.loads_line, wire.parse_hello/
  parse_command, textmode.parse_line, jsonrpc.handle_line, linkproto.parse_frame,
  Message/Presence/NodeRoster.from_dict and NetworkRoster.apply.  Each may only refuse with
  the error types it documents; whatever it accepts must encode again *into something the
  same decoder accepts as the same value* (a value that decodes but cannot travel on poisons
  every later reply or relay that carries it).  Each run must see the decoder both accept and
  refuse (pinned inputs make that deterministic), so a decoder that refuses everything fails.
- **Valid input** (``ROUND_TRIPS``): values generated from the documented rules
  (lanchat-protocol(7), lanchatd.toml(5)), not from the validators, must be accepted, decode
  to the same values, and survive encode -> decode unchanged, for every codec that has an
  encoder: framing, the hub's JSON frames, link frames, JSON-RPC requests and responses,
  messages, presence, rosters, text-mode lines and the configuration file.

Every property runs ``FUZZ_SHORT`` cases by default and ``FUZZ_LONG`` under ``-m slow``.  The
number of cases run, accepted and refused is printed per target (``pytest -s``).

Socket level: random bytes and malformed frames to a real lanchatd over TCP (text and JSON
mode), UDP and the control socket; afterwards the daemon is alive, a normal client chats,
and its threads, open fds and RSS are back near their baseline.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import json
import math
import os
import random
import socket
import string
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonrpc_oracle as oracle
import pytest
from conftest import Daemon, LineClient, TextUser
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lanchat import config, hubclient, jsonrpc, linkproto, textmode, wire
from lanchat.client import ControlClient
from lanchat.commands import Help, Join, ListUsers, Nick, Ping, Quit, Say
from lanchat.errors import FrameTooLong, RemoteProtocolError, ValidationError
from lanchat.feed import SigningKey, sign_entries
from lanchat.framing import LineDecoder, dumps_line, loads_line
from lanchat.limits import (
    MAX_FRAME_BYTES,
    MAX_HOST_CHARS,
    MAX_NICK_CHARS,
    MAX_ROOM_CHARS,
    MAX_TEXT_BYTES,
    WRITER_IDLE_EXIT_S,
)
from lanchat.model import Message, Presence, User
from lanchat.presence import NetworkRoster, NodeRoster, sign_roster

FUZZ_SHORT = 200
FUZZ_LONG = 20_000

#: Per target, in this process: cases run, and how many the decoder accepted and refused.
CASES: collections.Counter[tuple[str, str]] = collections.Counter()

NODE_A = "a1" * 8
NODE_B = "b2" * 8


# -- hostile strategies ---------------------------------------------------------------------------

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


# -- valid values, from the documented rules ------------------------------------------------------
#
# Written from lanchat-protocol(7) and lanchatd.toml(5), never by filtering with lanchat's own
# validators: a decoder that refuses one of these refuses what the documentation promises.

#: Unicode categories all of whose characters are printable and none white space.
_VISIBLE = ("L", "M", "N", "P", "S")
_HEX = "0123456789abcdef"
_ROOM_FIRST = string.ascii_lowercase + string.digits
#: Text as JSON carries it: any Unicode scalar value (no lone surrogates).
_unicode = st.characters(codec="utf-8")

valid_nodes = st.text(_HEX, min_size=8, max_size=64)
#: Nodes with keys, for what a node signs (its roster) or proves (its hello): the node id
#: of a key is the key's hash, so these are drawn from a few keys rather than made up.
FUZZ_KEYS = {k.node: k for k in (SigningKey(bytes([i]) * 32) for i in range(1, 5))}
keyed_nodes = st.sampled_from(sorted(FUZZ_KEYS))
#: 1-32 printable characters, no white space, no ':' or ',', not starting with / * ! # [.
valid_nicks = st.builds(
    lambda first, rest: first + rest,
    st.characters(categories=_VISIBLE, exclude_characters=":,/*!#["),
    st.text(st.characters(categories=_VISIBLE, exclude_characters=":,"),
            max_size=MAX_NICK_CHARS - 1))
valid_hosts = (st.text(st.characters(categories=_VISIBLE), min_size=1, max_size=40)
               | st.just("h" * MAX_HOST_CHARS))
#: Canonical room names: 1-32 of a-z0-9_.- (starting with a letter or digit).
valid_rooms = st.builds(lambda first, rest: first + rest, st.sampled_from(_ROOM_FIRST),
                        st.text(_ROOM_FIRST + "_.-", max_size=MAX_ROOM_CHARS - 1))
#: 1 to 4096 bytes of UTF-8, no NUL, any other character (escapes and newlines included).
valid_texts = (st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1,
                       max_size=120)
               | st.sampled_from(["x" * MAX_TEXT_BYTES, "é" * (MAX_TEXT_BYTES // 2),
                                  "\U0001f600" * (MAX_TEXT_BYTES // 4), "\x1b[2J", "a\nb"]))
valid_ts = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False) | st.integers(0, 2**40)
valid_seqs = st.integers(1, 2**63 - 1)
#: JSON values as strict JSON has them: finite numbers, Unicode text.
json_strict = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(_unicode, max_size=10),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(_unicode, max_size=8), children, max_size=4),
    max_leaves=12,
)


def _with_id(d: dict[str, Any]) -> dict[str, Any]:
    return {"id": f"{d['origin']}:{d['seq']}", **d}


valid_message_dicts = st.fixed_dictionaries(
    {"origin": valid_nodes, "seq": valid_seqs, "ts": valid_ts, "room": valid_rooms,
     "nick": valid_nicks, "host": valid_hosts, "text": valid_texts},
    optional={"to": valid_nicks, "signed": st.just(False)},
).map(_with_id)
valid_presence_dicts = st.fixed_dictionaries(
    {"kind": st.sampled_from(["join", "leave", "nick"]), "nick": valid_nicks,
     "host": valid_hosts, "node": valid_nodes, "room": valid_rooms, "ts": valid_ts},
    optional={"old": valid_nicks, "reason": st.text(_unicode, max_size=200)},
)
valid_user_dicts = st.fixed_dictionaries(
    {"nick": valid_nicks, "host": valid_hosts,
     "since": st.floats(allow_nan=False, allow_infinity=False) | st.integers(-2**40, 2**40)},
    optional={"room": valid_rooms, "via": st.sampled_from(["daemon", "tcp", "json", "udp"])},
)
#: A node's display name: printable (spaces allowed), 1-253 characters.
valid_names = st.text(st.characters(categories=_VISIBLE, include_characters=" "), min_size=1,
                      max_size=40)
valid_roster_dicts = st.fixed_dictionaries(
    {"node": keyed_nodes, "ver": st.integers(0, 2**63), "name": valid_names,
     "host": valid_hosts, "users": st.lists(valid_user_dicts, max_size=4)},
    optional={"gone": st.booleans()},
)


def _message(d: dict[str, Any]) -> Message:
    return Message(**d)


def _roster(d: dict[str, Any]) -> NodeRoster:
    users = tuple(User(nick=u["nick"], host=u["host"], node=d["node"], local=False,
                       since=float(u["since"]), room=u.get("room", "lobby"),
                       via=u.get("via", "tcp")) for u in d["users"])
    return NodeRoster(node=d["node"], ver=d["ver"], name=d["name"], host=d["host"],
                      users=users, gone=d.get("gone", False))


valid_messages = valid_message_dicts.map(_message)
#: The key of the feeds whose runs the fuzzed link frames carry.
_FEED_KEY = SigningKey(b"\x07" * 32)


def _run(texts: list[str]) -> linkproto.Msgs:
    """A ``msgs`` frame: a run of ``_FEED_KEY``'s feed with these texts, with its key."""
    messages = [Message(origin=_FEED_KEY.node, seq=i, ts=1_700_000_000.0, room="lobby",
                        nick="fuzz", host="h", text=t) for i, t in enumerate(texts, 1)]
    return linkproto.Msgs(tuple(sign_entries(_FEED_KEY, messages, None)), _FEED_KEY.public)
valid_rosters = valid_roster_dicts.map(_roster)

#: Hub commands a client may send, with the values they carry.
valid_commands = st.one_of(
    st.builds(Say, valid_texts, to=st.none() | valid_nicks, ref=st.none() | json_strict),
    st.builds(Join, valid_rooms), st.builds(Nick, valid_nicks), st.just(ListUsers()),
    st.builds(Ping, json_strict), st.builds(Quit, st.text(_unicode, min_size=1, max_size=200)),
)
valid_peer_hellos = keyed_nodes.flatmap(lambda node: st.builds(
    linkproto.PeerHello, node=st.just(node), name=valid_names, host=valid_hosts,
    port=st.none() | st.integers(1, 65535), key=st.just(FUZZ_KEYS[node].public),
    nonce=st.text(_HEX, min_size=64, max_size=64),
    proof=st.none() | st.text(string.ascii_letters + string.digits + "-_", max_size=128),
    admit=st.none() | st.text(_HEX, min_size=64, max_size=64)))
_cursors = st.dictionaries(valid_nodes, st.integers(0, 2**63 - 1), max_size=5)


def _sync_with_heads(cursors: dict[str, int]) -> st.SearchStrategy[linkproto.Sync]:
    """A sync whose head hashes name some of its own cursors' origins."""
    hashes = st.text(_HEX, min_size=64, max_size=64)
    return st.dictionaries(st.sampled_from(sorted(cursors)), hashes).map(
        lambda heads: linkproto.Sync(cursors, heads=heads)) if cursors else st.just(
        linkproto.Sync(cursors))


valid_link_frames = st.one_of(
    st.lists(valid_texts, max_size=4).map(_run),
    valid_rosters.map(linkproto.Roster), _cursors.flatmap(_sync_with_heads),
    st.builds(linkproto.Floor, valid_nodes, st.integers(0, 2**63 - 1)),
    st.just(linkproto.Ping()), st.just(linkproto.Pong()),
    st.builds(linkproto.Bye, st.text(_unicode, max_size=200)),
    st.builds(linkproto.Refused, st.text(_unicode, max_size=50), st.text(_unicode, max_size=300)),
    st.builds(linkproto.Auth, st.text(_HEX, max_size=128),
              st.none() | st.text(_HEX, min_size=64, max_size=64)),
    st.builds(linkproto.Gone, valid_nodes, st.integers(0, 2**63 - 1)),
    valid_peer_hellos.map(linkproto.Welcome),
)


def encode_link_frame(frame: linkproto.Frame) -> bytes:
    """The bytes a daemon sends for ``frame`` (the inverse of ``linkproto.parse_frame``)."""
    if isinstance(frame, linkproto.Msgs):
        return linkproto.encode_run(frame.entries, frame.key)
    if isinstance(frame, linkproto.Roster):  # signed by its node, as a node sends its own
        return linkproto.encode_roster(sign_roster(FUZZ_KEYS[frame.roster.node], frame.roster))
    if isinstance(frame, linkproto.Gone):
        return linkproto.encode_gone(frame.node, frame.ver)
    if isinstance(frame, linkproto.Sync):
        return linkproto.encode_sync(frame.cursors, heads=frame.heads)
    if isinstance(frame, linkproto.Floor):
        return linkproto.encode_floor(frame.origin, frame.seq)
    if isinstance(frame, linkproto.Ping):
        return linkproto.encode_ping()
    if isinstance(frame, linkproto.Pong):
        return linkproto.encode_pong()
    if isinstance(frame, linkproto.Bye):
        return linkproto.encode_bye(frame.reason)
    if isinstance(frame, linkproto.Refused):
        return linkproto.encode_error(frame.code, frame.message)
    if isinstance(frame, linkproto.Auth):
        return linkproto.encode_auth(frame.proof, frame.admit)
    return linkproto.encode_welcome(frame.peer)


# JSON-RPC: requests as the spec defines them (methods outside the reserved ``rpc.`` names).
valid_ids = (st.none() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
             | st.text(_unicode, max_size=10))
valid_params = st.dictionaries(st.text(_unicode, max_size=8), json_strict, max_size=4)
valid_requests = st.fixed_dictionaries(
    {"jsonrpc": st.just("2.0"),
     "method": st.text(_unicode, max_size=12).filter(lambda m: not m.startswith("rpc."))},
    optional={"params": valid_params, "id": valid_ids},
)


# -- the checks of hostile input -------------------------------------------------------------------

def _decode(fn: Callable[[], Any], *refusals: type[Exception]) -> tuple[bool, Any]:
    """``(True, value)`` if ``fn()`` returned, ``(False, None)`` if it raised one of the
    documented ``refusals``; anything else propagates (and fails the test)."""
    try:
        return True, fn()
    except refusals:
        return False, None


def _travels(frame: bytes) -> Any:
    """``frame`` as the receiving end decodes it: one strict, UTF-8 JSON line."""
    assert frame.endswith(b"\n") and frame.count(b"\n") == 1, frame[:200]
    return loads_line(frame[:-1])


def check_line_decoder(case: tuple[int, list[bytes]]) -> bool:
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
    return not raised


def check_loads_line(data: bytes) -> bool:
    ok, value = _decode(lambda: loads_line(data), RemoteProtocolError)
    if ok:  # strict JSON in means strict JSON out (no inf, no NaN, valid UTF-8), unchanged
        assert _travels(dumps_line(value)) == value
    return ok


def check_parse_hello(data: bytes) -> bool:
    ok, hello = _decode(lambda: wire.parse_hello(data), RemoteProtocolError)
    if ok:
        assert hello.version == wire.VERSION
        assert hello.role in ("client", "daemon")
    return ok


def check_parse_command(data: bytes) -> bool:
    ok, cmd = _decode(lambda: wire.parse_command(data), RemoteProtocolError, ValidationError)
    if not ok:
        return False
    # A client's encoder says the same command again ...
    again = hubclient.encode_command(cmd)
    assert again is not None and wire.parse_command(again[:-1]) == cmd
    # ... and every reply it leads to travels (a sent ack echoes ref, pong echoes t).
    if isinstance(cmd, Say):
        sent = wire.encode_sent(cmd.ref, Message(origin=NODE_A, seq=1, ts=1.0, room="lobby",
                                                 nick="a", host="h", text=cmd.text))
        assert _travels(sent)["ref"] == cmd.ref
    if isinstance(cmd, Ping):
        assert _travels(wire.encode_pong(cmd.token))["t"] == cmd.token
    if isinstance(cmd, Quit):  # the reason goes to everyone in the room
        leave = Presence(kind="leave", nick="a", host="h", node=NODE_A, room="lobby", ts=1.0,
                         reason=cmd.reason)
        assert _travels(wire.encode_presence(leave))["presence"]["reason"] == cmd.reason
    return True


def check_textmode(text: str) -> bool:
    ok, cmd = _decode(lambda: textmode.parse_line(text), ValidationError)
    if ok and isinstance(cmd, Say):
        assert "\x00" not in cmd.text
    return ok


_ROUTES: dict[str, jsonrpc.Handler] = {"echo": lambda p: p, "void": lambda p: None}
_EXPECT: dict[str, oracle.Expect] = {"echo": lambda p: (True, p), "void": lambda p: (True, None)}


def check_jsonrpc(data: bytes) -> bool:
    """The reply is the one the spec prescribes (judged by ``jsonrpc_oracle``, not by the codec);
    accepted means at least one request was carried out."""
    out = jsonrpc.handle_line(data, _ROUTES)  # never raises, by contract
    oracle.check_reply(data, out, _EXPECT)
    if out is None:
        return True
    reply = loads_line(out[:-1])
    return any("result" in r for r in (reply if isinstance(reply, list) else [reply]))


def check_link_frame(data: bytes) -> bool:
    ok, frame = _decode(lambda: linkproto.parse_frame(data), RemoteProtocolError,
                        ValidationError)
    # Relayed or answered as is: it must say the same thing again.  A refused roster (bad
    # signature, over a bound) is a verdict, not a frame anyone sends on: nothing to re-encode.
    if ok and not isinstance(frame, linkproto.RosterRefused):
        assert linkproto.parse_frame(encode_link_frame(frame)[:-1]) == frame
    return ok


def check_message(d: Any) -> bool:
    ok, msg = _decode(lambda: Message.from_dict(d), ValidationError)
    if ok:
        assert Message.from_dict(_travels(dumps_line(msg.to_dict()))) == msg
        assert Message.from_dict(_travels(wire.encode_message(msg))["message"]) == msg
        textmode.encode_message(msg).decode("utf-8")
    return ok


def check_presence(d: Any) -> bool:
    ok, p = _decode(lambda: Presence.from_dict(d), ValidationError)
    if ok:
        assert Presence.from_dict(_travels(dumps_line(p.to_dict()))) == p
        assert Presence.from_dict(_travels(wire.encode_presence(p))["presence"]) == p
        textmode.encode_presence(p).decode("utf-8")
    return ok


def _over_a_link(r: NodeRoster) -> None:
    """``r`` signed by its node and carried by a link comes out as it went in.  A roster is
    signed by its own node, so ``r`` is first moved to a node whose key we hold."""
    key = FUZZ_KEYS[min(FUZZ_KEYS)]
    mine = NodeRoster(node=key.node, ver=r.ver, name=r.name, host=r.host, gone=r.gone,
                      users=tuple(User(nick=u.nick, host=u.host, node=key.node, local=False,
                                       since=u.since, room=u.room, via=u.via)
                                  for u in r.users))
    frame = linkproto.parse_frame(linkproto.encode_roster(sign_roster(key, mine))[:-1])
    assert frame == linkproto.Roster(mine)


def check_roster(d: Any) -> bool:
    ok, r = _decode(lambda: NodeRoster.from_dict(d), ValidationError)
    if ok:
        _over_a_link(r)
        # what a JSON client's welcome and `lanchat users` would carry
        _travels(dumps_line([u.to_dict() for u in r.users]))
    return ok


def check_network_roster(seq: list[Any]) -> bool:
    net = NetworkRoster(NODE_A)
    news = False
    for d, direct in seq:
        ok, r = _decode(lambda d=d: NodeRoster.from_dict(d), ValidationError)
        if ok:
            news = net.apply(r, via="link", direct=direct) is not None or news
        if isinstance(d, dict) and isinstance(d.get("node"), str):
            net.mark_gone(d["node"])
    _travels(dumps_line([u.to_dict() for u in net.users()]))
    return news


# -- targets ---------------------------------------------------------------------------------------

_hello_keys = ["v", "nick", "room", "role", "client", "node", "name", "host", "port"]
_cmd_keys = ["text", "to", "ref", "room", "nick", "t", "reason"]
_link_keys = ["m", "roster", "cursors", "reason", "code", "message", "v", "role", "node",
              "name", "host", "port"]


def _line(frame: bytes) -> bytes:
    return frame[:-1]


valid_hello_lines = (st.builds(hubclient.encode_hello, valid_nicks, st.none() | valid_rooms)
                     | valid_peer_hellos.map(linkproto.encode_hello)).map(_line)
valid_command_lines = valid_commands.map(hubclient.encode_command).map(
    lambda b: _line(b) if b else b"")
valid_link_lines = valid_link_frames.map(encode_link_frame).map(_line)
valid_request_lines = (valid_requests | st.lists(valid_requests, min_size=1, max_size=3)).map(
    lambda r: _line(dumps_line(r)))

TARGETS: dict[str, tuple[st.SearchStrategy[Any], Callable[[Any], bool]]] = {
    "framing.LineDecoder": (
        st.tuples(st.integers(2, 64),
                  st.lists(st.binary(max_size=40)
                           | st.sampled_from([b"\n", b"\r\n", b"\r", b"x" * 70, b"\n\n"]),
                           max_size=12)),
        check_line_decoder),
    "framing.loads_line": (
        _mutated_bytes(st.binary(max_size=200) | as_json(json_values)
                       | json_strict.map(lambda v: _line(dumps_line(v)))
                       | _raw_json_atoms.map(str.encode)),
        check_loads_line),
    "wire.parse_hello": (
        _mutated_bytes(_frames(["hello", "say"], _hello_keys) | valid_hello_lines
                       | st.binary(max_size=100)),
        check_parse_hello),
    "wire.parse_command": (
        _mutated_bytes(_frames(["say", "join", "nick", "users", "ping", "bye", "hello"],
                               _cmd_keys) | valid_command_lines | st.binary(max_size=100)),
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
            | valid_request_lines
            | as_json(st.lists(json_values, max_size=3))
            | _raw_json_atoms.map(lambda a: ('{"jsonrpc":"2.0","method":"echo","id":' + a
                                             + ',"params":{"x":' + a + "}}").encode())),
        check_jsonrpc),
    "linkproto.parse_frame": (
        _mutated_bytes(_frames(["msgs", "roster", "sync", "ping", "pong", "bye", "welcome",
                                "error"], _link_keys)
                       | valid_link_lines
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
    "model.Message.from_dict": (_message_dicts() | valid_message_dicts | json_values,
                                check_message),
    "model.Presence.from_dict": (
        valid_presence_dicts | st.fixed_dictionaries({}, optional={
            "kind": st.sampled_from(["join", "leave", "nick", "x"]) | json_values,
            "nick": st.sampled_from(["bob", "b b"]) | json_values,
            "host": st.sampled_from(["h"]) | json_values,
            "node": st.sampled_from([NODE_A]) | json_values,
            "room": st.sampled_from(["lobby"]) | json_values,
            "ts": st.floats() | json_values,
            "old": st.sampled_from(["al"]) | json_values,
            "reason": st.text(max_size=5) | json_values}) | json_values,
        check_presence),
    "presence.NodeRoster.from_dict": (_roster_dicts() | valid_roster_dicts, check_roster),
    "presence.NetworkRoster.apply": (
        st.lists(st.tuples(_roster_dicts() | valid_roster_dicts, st.booleans()), max_size=6),
        check_network_roster),
}


_INF_ROSTER = {"node": NODE_B, "ver": 1, "name": "n", "host": "h",
               "users": [{"nick": "bob", "host": "h", "since": math.inf}]}
_GOOD_ROSTER = {"node": NODE_B, "ver": 1, "name": "n", "host": "h",
                "users": [{"nick": "bob", "host": "h", "since": 1.5}]}
_GOOD_MESSAGE = {"id": f"{NODE_A}:3", "origin": NODE_A, "seq": 3, "ts": 1.7e9, "room": "lobby",
                 "nick": "alice", "host": "laptop", "text": "hi"}

#: Inputs every run tries first: at least one the decoder must accept and one it must refuse
#: (so that both counts are non-zero on every run), and hostile spellings found once, kept as
#: regressions.
PINNED: dict[str, list[Any]] = {
    "framing.LineDecoder": [(16, [b"ab\ncd", b"\r\n"]), (4, [b"x" * 70])],
    "framing.loads_line": [b'{"a":[1,2.5,"x",null,true]}', b"null", b"1e999", b"[" * 100_000,
                           b"1" * 5000, b'"\\ud800"'],
    "wire.parse_hello": [b'{"type":"hello","v":1,"nick":"alice"}', b'{"type":"say"}'],
    "wire.parse_command": [b'{"type":"say","text":"hi","ref":1}', b'{"type":"ping","t":1e999}',
                           b'{"type":"say","text":"x","ref":1e999}',
                           b'{"type":"bye","reason":"\\ud800"}'],
    "textmode.parse_line": ["hello there", "/nick"],
    "jsonrpc.handle_line": [b'{"jsonrpc":"2.0","method":"echo","params":{"x":1},"id":1}',
                            b'{"jsonrpc":"2.0","method":"echo","params":{"x":1e999},"id":1}',
                            b'{"jsonrpc":"2.0","method":"nope","id":"\\ud800"}'],
    "linkproto.parse_frame": [
        linkproto.encode_sync({NODE_A: 3})[:-1],
        json.dumps({"type": "roster", "roster": _INF_ROSTER}).replace("Infinity", "1e999")
        .encode()],
    "model.Message.from_dict": [_GOOD_MESSAGE, {}],
    "model.Presence.from_dict": [
        {"kind": "leave", "nick": "a", "host": "h", "node": NODE_A, "room": "lobby", "ts": 1.0,
         "reason": "\ud800"}, {}],
    "presence.NodeRoster.from_dict": [
        _GOOD_ROSTER, _INF_ROSTER,
        {**_GOOD_ROSTER, "users": [{"nick": "bob", "host": "h", "since": 1, "via": "\ud800"}]}],
    "presence.NetworkRoster.apply": [[(_GOOD_ROSTER, True)], [(_INF_ROSTER, True)]],
}


# -- valid input: accepted, same values, encode -> decode unchanged -------------------------------

def rt_framing(value: Any) -> None:
    line = dumps_line(value)
    assert _travels(line) == value
    assert LineDecoder(len(line)).feed(line) == [line[:-1]]  # exactly one frame


def rt_message(d: dict[str, Any]) -> None:
    msg = Message.from_dict(d)
    assert {k: getattr(msg, k) for k in d} == d
    assert _travels(dumps_line(msg.to_dict())) == d  # the documented fields, nothing else
    assert Message.from_dict(_travels(wire.encode_message(msg))["message"]) == msg


def rt_presence(d: dict[str, Any]) -> None:
    p = Presence.from_dict(d)
    assert {k: getattr(p, k) for k in d} == d
    assert _travels(wire.encode_presence(p))["presence"] == d


def rt_roster(d: dict[str, Any]) -> None:
    r = NodeRoster.from_dict(d)
    assert (r.node, r.ver, r.name, r.host, r.gone) == (d["node"], d["ver"], d["name"],
                                                         d["host"], d.get("gone", False))
    users = [{"nick": u.nick, "host": u.host, "since": u.since, "room": u.room, "via": u.via}
             for u in r.users]
    assert users == [{"room": "lobby", "via": "tcp", **u} for u in d["users"]]
    assert all(u.node == r.node and u.local is False for u in r.users)
    _over_a_link(r)


def rt_command(cmd: Any) -> None:
    frame = hubclient.encode_command(cmd)
    assert frame is not None
    assert wire.parse_command(_line(frame)) == cmd


def rt_hello(case: tuple[str, str | None, linkproto.PeerHello]) -> None:
    nick, room, peer = case
    hello = wire.parse_hello(_line(hubclient.encode_hello(nick, room)))
    assert (hello.version, hello.nick, hello.room, hello.role, hello.client) == (
        wire.VERSION, nick, room, "client", "lanchat")
    daemon = wire.parse_hello(_line(linkproto.encode_hello(peer)))
    assert daemon.role == "daemon"
    assert linkproto.parse_peer_hello(daemon.fields) == peer


def rt_link_frame(frame: linkproto.Frame) -> None:
    assert linkproto.parse_frame(_line(encode_link_frame(frame))) == frame


def rt_jsonrpc(case: tuple[Any, Any, int, Any]) -> None:
    """Requests parse to what was sent; echo answers with the params and the id unchanged;
    a handler's error reaches the caller as sent; a notification line parses as one."""
    request, result, code, data = case
    requests = request if isinstance(request, list) else [request]
    line = _line(dumps_line(request))
    is_batch, parsed = jsonrpc.parse_line(line)
    assert is_batch == isinstance(request, list)
    assert parsed == [jsonrpc.Request(r["method"], r.get("params", {}), r.get("id"),
                                      notification="id" not in r) for r in requests]
    echo = {r["method"]: (lambda p: p) for r in requests}
    oracle.check_reply(line, jsonrpc.handle_line(line, echo),
                       {m: (lambda p: (True, p)) for m in echo})
    for r in requests:
        if "id" not in r:
            continue
        one = _line(dumps_line(r))

        def fail(p: dict[str, Any]) -> Any:
            raise jsonrpc.RpcFailure(code, "failed", data)

        reply = _travels(jsonrpc.handle_line(one, {r["method"]: fail}) or b"")
        err = {"code": code, "message": "failed", **({} if data is None else {"data": data})}
        assert reply == {"jsonrpc": "2.0", "error": err, "id": r["id"]}
        reply = _travels(jsonrpc.handle_line(one, {r["method"]: lambda p: result}) or b"")
        assert reply == {"jsonrpc": "2.0", "result": result, "id": r["id"]}
        assert type(reply["id"]) is type(r["id"])
    params = requests[0].get("params", {})
    note = jsonrpc.notification(requests[0]["method"], params)
    assert jsonrpc.parse_line(_line(note)) == (False, [jsonrpc.Request(
        requests[0]["method"], params, None, notification=True)])


_phrase = st.text(st.characters(codec="utf-8", exclude_characters="\x00\n"), min_size=1,
                  max_size=40).filter(lambda s: s.strip() == s and s != "")
#: Lines a text-mode user types, each with the command lanchat-protocol(7) says it is.
valid_typed_lines = st.one_of(
    _phrase.filter(lambda s: not s.startswith("/")).map(lambda s: (s, Say(s))),
    _phrase.map(lambda s: ("/" + "/" + s, Say("/" + s))),
    st.builds(lambda n, c: (f"/{c} {n}", Nick(n)), valid_nicks,
              st.sampled_from(["nick", "NICK", "Nick"])),
    st.builds(lambda r, c, h: (f"/{c} {h}{r}", Join(r)), valid_rooms,
              st.sampled_from(["join", "JOIN"]), st.sampled_from(["", "#"])),
    st.builds(lambda n, t: (f"/msg {n} {t}", Say(t, to=n)), valid_nicks, _phrase),
    _phrase.map(lambda a: (f"/me {a}", Say("/me " + a))),
    _phrase.map(lambda r: (f"/quit {r}", Quit(r))),
    st.sampled_from([("/quit", Quit("quit")), ("/users", ListUsers()), ("/who", ListUsers()),
                     ("/names", ListUsers()), ("/help", Help())]),
)


def rt_textmode(case: tuple[str, Any]) -> None:
    line, command = case
    assert textmode.parse_line(line) == command


# lanchatd.toml(5): every key, each with a value its page says is valid.
_paths = st.text(st.characters(categories=_VISIBLE), max_size=30).map(lambda s: "/" + s)
_printable_words = st.text(st.characters(categories=_VISIBLE), min_size=1, max_size=15)
_peer_hosts = (st.text(string.ascii_lowercase + string.digits + ".-", min_size=1, max_size=20)
               | st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n))))
_peers = (st.builds(lambda h, p: f"{h}:{p}", _peer_hosts, st.integers(1, 65535))
          | st.builds(lambda n, p: f"[{ipaddress.IPv6Address(n)}]:{p}",
                      st.integers(0, 2**128 - 1), st.integers(1, 65535)))
_binds = (st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
          | st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n))))
_finite = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)
valid_config_files = st.fixed_dictionaries({}, optional={
    "nick": valid_nicks,
    "name": st.text(st.characters(categories=_VISIBLE, include_characters=" ",
                                  exclude_characters="."), min_size=1, max_size=15),
    "port": st.integers(0, 65535), "bind": _binds, "udp": st.booleans(),
    "interfaces": st.lists(_printable_words, max_size=3),
    "ip_version": st.sampled_from(config.IP_VERSIONS), "discovery": st.booleans(),
    "peers": st.lists(_peers, max_size=3), "state_dir": _paths, "socket": _paths,
    "socket_mode": st.integers(0, 0o777), "socket_group": _printable_words,
    "max_age_days": _finite | st.integers(0, 10**6), "max_messages": st.integers(0, 2**62),
    "log_level": st.sampled_from(config.LOG_LEVELS), "max_rate": _finite | st.integers(0, 10**6),
    "max_connections": st.integers(1, 1_000_000),
    "max_connections_per_ip": st.integers(0, 1_000_000),
    "plain_clients": st.booleans(),
}) | st.fixed_dictionaries({"secret": st.text(_HEX, min_size=32, max_size=64).map(
    lambda s: "s3cret-" + s)}, optional={"nick": valid_nicks}) | st.fixed_dictionaries(
    {"secret_file": _paths})


def _as_documented(key: str, value: Any) -> Any:
    """The ``Config`` value a valid file value means (lanchatd.toml(5))."""
    if key in ("interfaces", "peers"):
        return tuple(value)
    if key in ("max_age_days", "max_messages"):
        return value or None  # 0 = keep forever
    if key == "max_rate":
        return float(value)
    return value


_CONFIG_ENV = {"HOME": "/home/u", "XDG_RUNTIME_DIR": "/run/user/1000"}


def rt_config(file_data: dict[str, Any]) -> None:
    """A valid file is accepted as written; ``--check-config``'s rendering of the result is a
    file that gives the same configuration again (and never shows the secret)."""
    def build(data: dict[str, Any], path: str) -> config.Config:
        return config.build_config(file_data=data, file_path=path, env=_CONFIG_ENV,
                                   flags={}, hostname="box", username="user")

    first = build(file_data, "/etc/lanchat/lanchatd.toml")
    for key, value in file_data.items():
        assert getattr(first, key) == _as_documented(key, value), key
    text = config.render(first)
    again = build(config.parse_toml(text.encode(), "/r"), "/r")
    skip = {"config_file", "secret"}
    assert {k: getattr(again, k) for k in config.FILE_KEYS if k not in skip} == \
        {k: getattr(first, k) for k in config.FILE_KEYS if k not in skip}
    if first.secret is not None:
        assert first.secret not in text and again.secret is not None


ROUND_TRIPS: dict[str, tuple[st.SearchStrategy[Any], Callable[[Any], None]]] = {
    "framing": (json_strict, rt_framing),
    "model.Message": (valid_message_dicts, rt_message),
    "model.Presence": (valid_presence_dicts, rt_presence),
    "presence.NodeRoster": (valid_roster_dicts, rt_roster),
    "wire.command": (valid_commands, rt_command),
    "wire.hello": (st.tuples(valid_nicks, st.none() | valid_rooms, valid_peer_hellos), rt_hello),
    "linkproto.frame": (valid_link_frames, rt_link_frame),
    "jsonrpc": (st.tuples(valid_requests | st.lists(valid_requests, min_size=1, max_size=4),
                          json_strict, st.integers(-(2**53), 2**53), st.none() | json_strict),
                rt_jsonrpc),
    "textmode.parse_line": (valid_typed_lines, rt_textmode),
    "config.render": (valid_config_files, rt_config),
}


# -- running them ----------------------------------------------------------------------------------

def _run(name: str, strategy: st.SearchStrategy[Any], check: Callable[[Any], Any],
         examples: int, pinned: list[Any]) -> collections.Counter[str]:
    """Run ``check`` on ``examples`` generated cases (and the pinned ones); return the tally of
    cases run, accepted and refused."""
    tally: collections.Counter[str] = collections.Counter()

    def prop(value: Any) -> None:
        tally["ran"] += 1
        outcome = check(value)
        if outcome is not None:
            tally["accepted" if outcome else "refused"] += 1

    for value in pinned:
        prop = example(value)(prop)
    prop = settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))(given(strategy)(prop))
    prop()
    for key, count in tally.items():
        CASES[(name, key)] += count
    print(f"\nfuzz {name}: {dict(tally)} (asked for {examples})")
    return tally


def run_target(name: str, examples: int) -> None:
    """Fuzz one decoder: it ran the cases asked for, and both accepted and refused some."""
    strategy, check = TARGETS[name]
    tally = _run(name, strategy, check, examples, PINNED.get(name, []))
    assert tally["ran"] >= examples, f"{name}: only {tally['ran']} of {examples} cases ran"
    assert tally["accepted"] > 0, f"{name} refused every input, valid ones too: {tally}"
    assert tally["refused"] > 0, f"{name} accepted every input, hostile ones too: {tally}"


def run_round_trip(name: str, examples: int) -> None:
    strategy, check = ROUND_TRIPS[name]
    tally = _run(name, strategy, check, examples, [])
    assert tally["ran"] >= examples, f"{name}: only {tally['ran']} of {examples} cases ran"


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_decoder_short(name: str) -> None:
    run_target(name, FUZZ_SHORT)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_decoder_long(name: str) -> None:
    run_target(name, FUZZ_LONG)


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_valid_input_round_trips_short(name: str) -> None:
    run_round_trip(name, FUZZ_SHORT)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_valid_input_round_trips_long(name: str) -> None:
    run_round_trip(name, FUZZ_LONG)


# -- known hostile spellings, pinned ------------------------------------------------------------

def test_overflowing_numbers_are_not_json() -> None:
    """``1e999`` is read by Python's json as ``inf``: the strict decoder must refuse it, as it
    refuses ``Infinity`` -- otherwise a ping's ``t`` or a say's ``ref`` echoes back as a
    reply the hub cannot encode, and a roster's ``since`` poisons every welcome."""
    for spelling in (b"1e999", b'{"t":-1e999}', b"[1e400]", b"NaN", b"[Infinity]"):
        with pytest.raises(RemoteProtocolError) as info:
            loads_line(spelling)
        assert info.value.code == "bad-json"


def _refused_as_bad_json(decode: Callable[[], Any]) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode()
    assert info.value.code == "bad-json", info.value


def test_deep_nesting_is_refused_not_a_crash() -> None:
    """Nesting far past any real frame is refused by every JSON decoder as bad JSON (a JSON-RPC
    caller gets a parse error), never a RecursionError that kills the reader."""
    for depth in (1000, 100_000):
        for data in (b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth):
            if depth < 100_000 and check_loads_line(data):
                continue  # an interpreter whose parser takes this depth: it must round trip
            _refused_as_bad_json(lambda data=data: loads_line(data))
            _refused_as_bad_json(lambda data=data: wire.parse_command(data))
            _refused_as_bad_json(lambda data=data: linkproto.parse_frame(data))
            out = jsonrpc.handle_line(data, _ROUTES)
            assert out is not None
            reply = json.loads(out)
            assert reply["id"] is None and reply["error"]["code"] == jsonrpc.PARSE_ERROR, reply

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
    # The watcher, connected throughout, is still served both ways: still listed, still heard.
    watcher.send("watcher still here\n")
    watcher.send("/users\n")
    # It has not read since before the fuzz: every fuzz connection may have left it a few
    # lines (a join, its lines, a leave) to read before the answer.
    users = watcher.until(lambda s: s.startswith("* In #lobby ("), 30.0,
                          limit=max(10_000, 20 * connections))
    assert {"owner", "watcher (plain)"} <= set(users.split(": ", 1)[1].split(", ")), users
    with ControlClient(daemon.socket, timeout=10) as c:
        said = [(m["nick"], m["text"]) for m in c.call("history", limit=5)]
    assert ("watcher", "watcher still here") in said, said
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
    """A ping with ``t: 1e999`` or a say with ``ref: 1e999`` is not JSON (see
    test_overflowing_numbers_are_not_json): each gets a non-fatal ``bad-json`` error -- not a
    pong or a sent ack the hub could not encode -- on a connection that stays usable, the say
    is not posted, and no traceback is logged."""
    j = LineClient(daemon.port)
    clients.append(j)
    j.send(json.dumps({"type": "hello", "v": 1, "nick": "num"}) + "\n")
    j.until('"welcome"')
    for frame in (b'{"type":"ping","t":1e999}\n', b'{"type":"say","text":"x","ref":-1e999}\n'):
        j.send(frame)
        reply = json.loads(j.line())
        assert (reply["type"], reply["code"], reply["fatal"]) == ("error", "bad-json", False), \
            reply
    j.send(b'{"type":"ping","t":7}\n')
    assert json.loads(j.line()) == {"type": "pong", "t": 7}  # nothing in between: no "sent"
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
