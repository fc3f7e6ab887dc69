"""Flood and connection limits, end to end: a real lanchatd, real TCP/UDP clients on loopback.

conftest starts every daemon with ``--max-rate 0``; a test that wants a rate passes
``--max-rate N`` again (argparse keeps the last).  Connection limits are config keys without
flags, so they come from the environment (``LANCHAT_MAX_CONNECTIONS[_PER_IP]``); the reader
timeouts from lanchatd's internal test knobs ``LANCHAT_LINE_TIMEOUT_S`` /
``LANCHAT_NICK_TIMEOUT_S``.
"""

from __future__ import annotations

import contextlib
import json
import re
import resource
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, LineClient, TextUser, require_tool, wait_for

from lanchat.client import ControlClient
from lanchat.limits import (
    COMMAND_BURST,
    COMMAND_RATE,
    MAX_DATAGRAM_BYTES,
    MAX_NICK_ATTEMPTS,
    MAX_NICK_CHARS,
    MAX_UDP_CLIENTS,
    MAX_UDP_CLIENTS_PER_IP,
    SOURCE_RATE_FACTOR,
    UDP_UNREGISTERED_BURST,
    UDP_UNREGISTERED_RATE,
)
from lanchat.ratelimit import default_burst

pytestmark = pytest.mark.timeout(40)

MESSAGE_RE = re.compile(r"^\[\d\d:\d\d:\d\d\] (\S+): (.*)$")
RATE_NOTICE = "! rate limit: at most {} messages per second; message dropped"


def drain(client: LineClient, quiet: float = 0.5, limit: int = 100_000) -> list[str]:
    """Every line until the client has heard nothing for ``quiet`` seconds."""
    lines: list[str] = []
    for _ in range(limit):
        try:
            lines.append(client.line(quiet))
        except TimeoutError:
            break
    return lines


def texts_from(lines: list[str], nick: str) -> list[str]:
    return [m.group(2) for m in map(MESSAGE_RE.match, lines) if m and m.group(1) == nick]


class UdpUser:
    """A UDP client of the hub (what ``nc -u`` does): its first datagram is its nickname.

    ``source`` is the loopback address it sends from (127.0.0.2 … are all loopback on
    Linux); ``rcvbuf`` shrinks its receive buffer when hundreds of them are open at once.
    """

    def __init__(self, port: int, nick: str, *, source: str = "127.0.0.1",
                 rcvbuf: int | None = None, timeout: float = 10.0) -> None:
        self.port = port
        self.nick = nick
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            if rcvbuf is not None:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.bind((source, 0))
            self.sock.settimeout(timeout)
            self.send(nick)
            self.first = self.datagram()  # the welcome, or why not
        except BaseException:
            self.sock.close()
            raise

    def send(self, text: str) -> None:
        self.sock.sendto(text.encode(), ("127.0.0.1", self.port))

    def datagram(self, timeout: float | None = None) -> str:
        """The next datagram's text, without its final newline; TimeoutError if none comes."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        data, _ = self.sock.recvfrom(MAX_DATAGRAM_BYTES)
        return data.decode("utf-8", "replace").removesuffix("\n")

    def drain(self, quiet: float = 0.5, limit: int = 10_000) -> list[str]:
        """Every datagram until none has come for ``quiet`` seconds."""
        got: list[str] = []
        for _ in range(limit):
            try:
                got.append(self.datagram(quiet))
            except TimeoutError:
                break
        return got

    def close(self) -> None:
        self.sock.close()


class JsonClient(LineClient):
    def __init__(self, port: int, nick: str) -> None:
        super().__init__(port)
        self.send(json.dumps({"type": "hello", "v": 1, "nick": nick}) + "\n")
        self.welcome = self.frame()

    def frame(self, timeout: float | None = None) -> dict[str, Any]:
        while True:
            line = self.line(timeout)
            if line.startswith("{"):
                frame: dict[str, Any] = json.loads(line)
                return frame


# -- message rate ------------------------------------------------------------------------


def test_text_flood_is_cut_to_the_rate_with_a_notice_and_others_stay_fast(
        make_daemon: Any, clients: list[Any]) -> None:
    d = make_daemon("--max-rate", "5")
    watcher = TextUser(d.port, "watcher")
    flooder = TextUser(d.port, "flooder")
    carol = TextUser(d.port, "carol")
    clients += [watcher, flooder, carol]
    drain(watcher, 0.3)

    stop = threading.Event()
    sent_at: list[float] = []  # when each flood line left

    def flood() -> None:  # 50 messages a second for 2 s: ten times the rate
        for i in range(100):
            if stop.is_set():
                return
            flooder.send(f"flood {i}\n")
            sent_at.append(time.monotonic())
            time.sleep(0.02)

    seen: list[str] = []
    sender = threading.Thread(target=flood, name="test-flooder")
    sender.start()
    try:
        time.sleep(0.5)  # well into the flood: the flooder is past its burst
        latencies = []
        for k in range(3):
            t0 = time.monotonic()
            carol.send(f"carol {k}\n")
            deadline = t0 + 15.0
            for _ in range(1000):  # every line counts: the flooder's are checked below
                seen.append(watcher.line(max(0.01, deadline - time.monotonic())))
                if seen[-1].endswith(f"carol: carol {k}"):
                    break
            latencies.append(time.monotonic() - t0)
            time.sleep(0.3)
    finally:
        stop.set()
        sender.join(10)
    seen += drain(watcher, 0.7)
    flood_s = sent_at[-1] - sent_at[0]

    # Others are not held up by the flood: their lines arrive while it goes on (a loaded
    # runner makes them slower, so the time is reported, not bounded).
    print(f"\ncarol's lines reached the watcher in {[round(x, 3) for x in latencies]} s "
          f"during a {flood_s:.1f} s flood")
    assert texts_from(seen, "carol") == ["carol 0", "carol 1", "carol 2"]
    # The flooder got its burst (10) and then 5 a second while it flooded (about 2 s).
    got = texts_from(seen, "flooder")
    expected = 10 + 5 * flood_s
    print(f"the flooder got {len(got)} lines through ({expected:.1f} expected)")
    assert expected - 3 <= len(got) <= expected + 3, (len(got), flood_s)
    assert got == sorted(got, key=lambda t: int(t.split()[1]))  # what passes keeps its order
    # The flooder is told which limit it hit -- once a second, not once per dropped line.
    notices = [line for line in drain(flooder, 0.5) if line.startswith("!")]
    assert notices and set(notices) == {RATE_NOTICE.format(5)}
    assert 1 <= len(notices) <= flood_s + 1, (notices, flood_s)


def test_a_sustained_flood_far_past_the_rate_is_disconnected(make_daemon: Any,
                                                             clients: list[Any]) -> None:
    d = make_daemon("--max-rate", "5")
    watcher = TextUser(d.port, "watcher")
    flooder = TextUser(d.port, "flooder")
    clients += [watcher, flooder]
    watcher.line()  # flooder joined
    flooder.send("".join(f"spam {i}\n" for i in range(600)))  # a burst far past 10 x 5 / s
    flooder.until("! flooding: more than 50 messages per second -- disconnecting")
    assert flooder.closed()
    watcher.until("* flooder left #lobby (flooding)")
    assert d.proc is not None and d.proc.poll() is None


def test_json_client_gets_rate_limited_errors_with_its_refs(make_daemon: Any,
                                                            clients: list[Any]) -> None:
    d = make_daemon("--max-rate", "2")
    j = JsonClient(d.port, "jay")
    clients.append(j)
    assert j.welcome["type"] == "welcome"
    j.send("".join(json.dumps({"type": "say", "text": f"m{i}", "ref": i}) + "\n"
                   for i in range(20)))
    sent: list[int] = []
    limited: list[int] = []
    for _ in range(20):
        f = j.frame(5.0)
        if f["type"] == "sent":
            sent.append(f["ref"])
        else:
            assert f["type"] == "error" and f["code"] == "rate-limited", f
            assert f["fatal"] is False
            assert f["message"] == "rate limit: at most 2 messages per second; message dropped"
            limited.append(f["ref"])
    assert 10 <= len(sent) <= 11  # the burst: max(10, 2 s x 2/s)
    assert sorted(sent + limited) == list(range(20))
    assert sent == list(range(len(sent)))  # the first ones pass, the rest are refused


def test_udp_client_is_rate_limited_with_a_datagram(make_daemon: Any,
                                                    clients: list[Any]) -> None:
    d = make_daemon("--max-rate", "2")
    watcher = TextUser(d.port, "watcher")
    clients.append(watcher)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.settimeout(5)
    try:
        udp.sendto(b"udpflood\n", ("127.0.0.1", d.port))
        assert b"Welcome, udpflood!" in udp.recvfrom(MAX_DATAGRAM_BYTES)[0]
        watcher.line()  # joined
        for i in range(30):
            udp.sendto(f"u{i}".encode(), ("127.0.0.1", d.port))
        data, _ = udp.recvfrom(MAX_DATAGRAM_BYTES)
        assert data.decode() == RATE_NOTICE.format(2) + "\n"
        got = texts_from(drain(watcher, 0.7), "udpflood")
        assert 10 <= len(got) <= 12, got
    finally:
        udp.close()


def test_reconnecting_gives_a_flooder_no_fresh_burst(make_daemon: Any,
                                                     clients: list[Any]) -> None:
    """Each connection has its own burst (10 at --max-rate 5), but its address has one
    bucket for all of them (SOURCE_RATE_FACTOR x 5 a second, burst MESSAGE_BURST_S of
    that): 30 reconnects, each sending its ten at once, pass about 40 lines, not 300."""
    d = make_daemon("--max-rate", "5")
    watcher = TextUser(d.port, "watcher")
    clients.append(watcher)
    rate = 5 * SOURCE_RATE_FACTOR
    burst = default_burst(rate)
    t0 = time.monotonic()
    notices: list[str] = []
    for i in range(30):
        c = TextUser(d.port, f"again{i}")
        clients.append(c)
        c.send("".join(f"line {i}.{k}\n" for k in range(10)) + "/quit\n")
        with contextlib.suppress(EOFError, TimeoutError):  # the hub closes after "Bye!"
            while (line := c.line(1.0)) != "* Bye!":
                notices += [line] if line.startswith("!") else []
        c.close()
    elapsed = time.monotonic() - t0
    got = [m.group(2) for m in map(MESSAGE_RE.match, drain(watcher, 1.0))
           if m and m.group(1).startswith("again")]
    print(f"\n{len(got)} of 300 lines passed in {elapsed:.2f} s of reconnects")
    assert len(got) <= burst + rate * elapsed + 5, (len(got), elapsed)
    assert len(got) >= burst  # the address's burst itself is not cut
    assert ("! rate limit: at most 20 messages per second from your address; message dropped"
            in notices), notices[:5]


def test_udp_answers_to_unknown_addresses_are_rate_limited(make_daemon: Any) -> None:
    """A datagram's source may be forged: one host (here, its ports) gets at most
    UDP_UNREGISTERED_BURST answers and registrations at once, then one a second."""
    d = make_daemon()
    socks = []
    try:
        for i in range(20):
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(u)
            u.settimeout(0.5)
            u.sendto(f"victim{i}\n".encode(), ("127.0.0.1", d.port))
        answered = 0
        for u in socks:
            try:
                u.recvfrom(MAX_DATAGRAM_BYTES)
                answered += 1
            except TimeoutError:
                pass
        registered = [x for x in rpc_users(d) if x["nick"].startswith("victim")]
        print(f"\n{answered} of 20 answered, {len(registered)} registered")
        assert answered <= UDP_UNREGISTERED_BURST + 2 * UDP_UNREGISTERED_RATE, answered
        assert len(registered) == answered
        other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # another host: its own
        socks.append(other)
        other.bind(("127.0.0.2", 0))
        other.settimeout(5)
        other.sendto(b"elsewhere\n", ("127.0.0.1", d.port))
        assert b"Welcome, elsewhere!" in other.recvfrom(MAX_DATAGRAM_BYTES)[0]
    finally:
        for u in socks:
            u.close()


def rpc_users(d: Daemon) -> list[dict[str, Any]]:
    with ControlClient(d.socket, timeout=10) as c:
        users: list[dict[str, Any]] = c.call("users")
    return users


def test_max_rate_zero_is_unlimited(daemon: Daemon, clients: list[Any]) -> None:
    watcher = TextUser(daemon.port, "watcher")
    fast = TextUser(daemon.port, "fast")
    clients += [watcher, fast]
    watcher.line()
    fast.send("".join(f"n{i}\n" for i in range(1000)))
    got: list[str] = []
    for _ in range(2000):
        got += texts_from([watcher.line(5.0)], "fast")
        if len(got) == 1000:
            break
    assert got == [f"n{i}" for i in range(1000)]
    assert not [line for line in drain(fast, 0.3) if line.startswith("!")]


def test_control_socket_sends_are_never_rate_limited(make_daemon: Any) -> None:
    d = make_daemon("--max-rate", "1")
    with ControlClient(d.socket) as c:
        for i in range(500):
            c.call("send", text=f"local {i}", room="lobby")
    for i in range(5):
        p = d.cli("send", f"cli {i}")
        assert p.returncode == 0, p.stderr
    with ControlClient(d.socket) as c:
        history = c.call("history", room="lobby", limit=1000)
    texts = [m["text"] for m in history]
    assert texts == [f"local {i}" for i in range(500)] + [f"cli {i}" for i in range(5)]


def test_other_commands_are_bounded_separately_and_generously(make_daemon: Any,
                                                              clients: list[Any]) -> None:
    d = make_daemon("--max-rate", "1")
    busy = TextUser(d.port, "busy")
    watcher = TextUser(d.port, "watcher")
    clients += [busy, watcher]
    busy.line()  # watcher joined
    busy.send("/users\n" * 300)
    lines = drain(busy, 0.5)
    answers = sum(1 for line in lines if line.startswith("* In #lobby"))
    refused = [line for line in lines if line.startswith("!")]
    # the burst (the first nickname tried is free), give or take what refilled meanwhile
    assert COMMAND_BURST - 1 <= answers <= COMMAND_BURST + COMMAND_RATE, answers
    assert refused and set(refused) == {
        f"! rate limit: at most {COMMAND_RATE:g} commands per second; command ignored"}
    busy.send("still here\n")  # messages have their own bucket, and busy was not cut off
    assert watcher.until("busy:").endswith("busy: still here")


# -- connections -----------------------------------------------------------------------------


def test_connections_per_address_are_limited(make_daemon: Any, clients: list[Any]) -> None:
    d = make_daemon(env={"LANCHAT_MAX_CONNECTIONS_PER_IP": "3"})
    users = [TextUser(d.port, f"u{i}") for i in range(3)]
    clients += users
    extra = LineClient(d.port)
    clients.append(extra)
    t0 = time.monotonic()
    assert extra.line() == "! too many connections from your address (limit 3)"
    assert extra.closed()
    assert time.monotonic() - t0 < 3.0
    # A JSON client is told in JSON.
    j = LineClient(d.port)
    clients.append(j)
    j.send(json.dumps({"type": "hello", "v": 1, "nick": "jay"}) + "\n")
    err = json.loads(j.line())
    assert err == {"type": "error", "code": "too-many-connections", "fatal": True,
                   "message": "too many connections from your address (limit 3)"}
    assert j.closed()
    # A slot freed is a slot to take.
    users[0].send("/quit\n")
    assert users[0].closed()
    users[1].until("* u0 left #lobby")
    again = TextUser(d.port, "again")
    clients.append(again)
    assert "Welcome, again!" in again.welcome


def test_total_connections_are_limited_and_refusals_cost_no_slot(make_daemon: Any,
                                                                 clients: list[Any]) -> None:
    d = make_daemon(env={"LANCHAT_MAX_CONNECTIONS": "2"})
    a, b = TextUser(d.port, "a"), TextUser(d.port, "b")
    clients += [a, b]
    refused = [LineClient(d.port) for _ in range(5)]
    clients += refused
    for r in refused:
        assert r.line() == "! server full (limit 2 connections)"
        assert r.closed()
    a.send("still chatting\n")
    assert b.until("a:").endswith("a: still chatting")
    b.send("/quit\n")
    assert b.closed()
    a.until("* b left #lobby")
    c = TextUser(d.port, "c")
    clients.append(c)
    assert "Welcome, c!" in c.welcome


def test_a_full_hub_still_accepts_a_daemon_link(make_daemon: Any, clients: list[Any]) -> None:
    a = make_daemon(nick="alice", subdir="a", env={"LANCHAT_MAX_CONNECTIONS": "1"})
    user = TextUser(a.port, "user")
    clients.append(user)
    b = make_daemon("--peer", f"127.0.0.1:{a.port}", nick="bob", subdir="b")

    def linked() -> bool:
        with ControlClient(a.socket) as c:
            return any(p.get("state") == "linked" for p in c.call("peers"))

    wait_for("B linked to the full hub A", linked, 10.0)
    with ControlClient(b.socket) as c:
        c.call("send", text="over the link", room="lobby")
    assert user.until("bob:").endswith("bob: over the link")
    late = LineClient(a.port)  # the link took no client slot, and gave none away
    clients.append(late)
    assert late.line() == "! server full (limit 1 connections)"


# -- timeouts --------------------------------------------------------------------------------


def test_slow_loris_is_dropped_after_the_line_timeout(make_daemon: Any,
                                                      clients: list[Any]) -> None:
    d = make_daemon(env={"LANCHAT_LINE_TIMEOUT_S": "1.5"})
    idle = TextUser(d.port, "idle")  # sends nothing at all: that is fine
    slow = TextUser(d.port, "slow")  # finishes its line, slowly but in time: also fine
    loris = TextUser(d.port, "loris")
    clients += [idle, slow, loris]
    drain(idle, 0.3)
    slow.send("hel")
    t0 = time.monotonic()
    loris.send("never")
    time.sleep(0.8)
    slow.send("lo\n")
    notices: list[str] = []
    for _ in range(40):  # a byte every 0.3 s: a trickle that never ends the line
        try:
            line = loris.line(0.3)
        except TimeoutError:
            loris.send("x")
            continue
        if line.startswith("!"):
            notices.append(line)
            break
    elapsed = time.monotonic() - t0
    assert notices == ["! line not finished within 1.5 s -- disconnecting"]
    assert 1.3 <= elapsed <= 3.5, elapsed
    assert loris.closed()
    seen = drain(idle, 0.5)
    assert "* loris left #lobby (timed out)" in seen
    assert texts_from(seen, "slow") == ["hello"]
    time.sleep(1.0)  # well past the line timeout: the idle user is still welcome
    idle.send("/users\n")
    assert idle.line().startswith("* In #lobby (3): ")


def test_nickname_prompt_times_out(make_daemon: Any, clients: list[Any]) -> None:
    d = make_daemon(env={"LANCHAT_NICK_TIMEOUT_S": "1"})
    c = LineClient(d.port)
    clients.append(c)
    t0 = time.monotonic()
    assert "welcome" in c.line().lower()
    assert "nickname" in c.line().lower()
    assert c.line(5.0) == "! no nickname chosen within 1 s -- disconnecting"
    assert 0.8 <= time.monotonic() - t0 <= 3.0
    assert c.closed()


#: Nine refused nicknames and what the hub answers each (then a tenth attempt).
BAD_NICKS = [
    ("bob", "! the nick bob is taken; choose another:"),
    ("two words", "! nick must be printable characters without spaces; choose another:"),
    ("x" * (MAX_NICK_CHARS + 1), f"! nick must be 1-{MAX_NICK_CHARS} characters; choose another:"),
    ("a:b", "! nick may not start with any of /*!#[ or contain ':' or ','; choose another:"),
] * 3


def prompt(port: int) -> LineClient:
    """A text-mode connection that has read the greeting and sits at the nickname prompt."""
    c = LineClient(port)
    assert c.line().startswith("* lanchat hub ")
    assert c.line() == "* Choose a nickname:"
    return c


def test_the_tenth_nickname_attempt_is_the_last(daemon: Daemon, clients: list[Any]) -> None:
    bob = TextUser(daemon.port, "bob")
    clients.append(bob)
    bad = BAD_NICKS[:MAX_NICK_ATTEMPTS - 1]
    # Nine refused nicknames, and blank lines (which are not attempts): the tenth still counts.
    patient = prompt(daemon.port)
    clients.append(patient)
    for nick, answer in bad:
        patient.send(f"{nick}\n\n")
        assert patient.line() == answer
        assert patient.line() == "* Choose a nickname:"
    patient.send("carol\n")
    assert patient.line().startswith("* Welcome, carol! You are in #lobby with owner, bob.")
    assert bob.until("joined") == "* carol joined #lobby"
    # Ten refused nicknames: the tenth is answered with its reason alone, then the hub says
    # why it gives up and closes the connection.  Nobody saw this client.
    hopeless = prompt(daemon.port)
    clients.append(hopeless)
    hopeless.send("".join(f"{nick}\n" for nick, _ in bad) + "bob\n")
    assert [hopeless.line() for _ in bad] == [answer for _, answer in bad]
    assert hopeless.line() == "! the nick bob is taken"
    assert hopeless.line() == (f"! no nickname chosen in {MAX_NICK_ATTEMPTS} attempts "
                               "-- disconnecting")
    assert hopeless.closed()
    bob.send("/users\n")
    assert bob.until("* In #lobby") == "* In #lobby (3): owner, bob (plain), carol (plain)"


def test_blank_lines_at_the_prompt_are_rate_limited(daemon: Daemon,
                                                    clients: list[Any]) -> None:
    # The first nickname tried costs no token (an idle client then holds no buckets), but
    # what is not a nickname is a command: a flood of blank lines gets the command limit.
    flood = prompt(daemon.port)
    clients.append(flood)
    flood.send("\n" * 300)
    lines = drain(flood, 0.5)
    prompts = lines.count("* Choose a nickname:")
    assert COMMAND_BURST - 1 <= prompts <= COMMAND_BURST + COMMAND_RATE, lines[:5]
    assert f"! rate limit: at most {COMMAND_RATE:g} commands per second; command ignored" \
        in lines
    # and whoever just picks a name is let in at once
    quick = prompt(daemon.port)
    clients.append(quick)
    quick.send("dave\n")
    assert quick.line().startswith("* Welcome, dave! You are in #lobby")


def tx_queue(server_port: int, client_port: int) -> int:
    """Bytes the daemon's kernel holds unacknowledged for one loopback client (/proc/net/tcp)."""
    local, remote = f"0100007F:{server_port:04X}", f"0100007F:{client_port:04X}"
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = row.split()
        if fields[1] == local and fields[2] == remote:
            return int(fields[4].split(":")[0], 16)
    raise AssertionError(f"no connection {local} -> {remote} in /proc/net/tcp")


@pytest.mark.timeout(120)  # generous deadlines inside; 40 s is the module's
def test_a_client_that_stops_reading_is_cut_after_the_send_stall_timeout(
        make_daemon: Any, clients: list[Any]) -> None:
    stall_s = 1.5
    d = make_daemon("-v", env={"LANCHAT_SEND_STALL_TIMEOUT_S": str(stall_s)})
    watcher = TextUser(d.port, "watcher")
    talker = TextUser(d.port, "talker")
    stuck = TextUser(d.port, "stuck", rcvbuf=4096)  # then reads nothing until told
    clients += [watcher, talker, stuck]
    watcher.until("* stuck joined #lobby")
    stuck_port = stuck.sock.getsockname()[1]
    # Fill the stuck client's kernel buffers (its own and the daemon's send buffer) with
    # bursts of 64 KiB, until the daemon's side stops taking more: from then on its writer
    # is blocked.  Stop right there, with far less than the 512 KiB queue limit waiting, so
    # that what cuts the client off can only be the stalled send.
    t0 = time.monotonic()
    held, full_at = -1, None
    for k in range(400):  # 25 MiB at most; loopback buffers are a few MiB
        talker.send("".join(f"fill {k}.{j} {'x' * 4000}\n" for j in range(16)))
        assert watcher.until(f"talker: fill {k}.15 ", timeout=10.0)  # the watcher keeps up
        time.sleep(0.1)
        now_held = tx_queue(d.port, stuck_port)
        if now_held > 0 and now_held == held:
            full_at = time.monotonic()
            break
        held = now_held
    assert full_at is not None, "the stuck client's buffers never filled"
    print(f"\nthe daemon holds {held // 1024} KiB for the stuck client after {k + 1} bursts "
          f"({full_at - t0:.1f} s)")
    # The room chats on, slowly: a line every 0.25 s keeps the writer with something to send
    # (the kernel may still take a little more -- a zero-window probe can grow the send
    # buffer -- and an outbox it emptied would have nothing left to stall on), far too slowly
    # to fill the 512 KiB queue before the stall timeout.
    cut_line = "stuck>: cut off: too slow: nothing could be sent"  # the daemon's log (-v)
    deadline = full_at + stall_s + 30.0
    trickled = 0
    while cut_line not in d.stderr():
        assert time.monotonic() < deadline, (
            f"not cut off within {stall_s + 30.0} s; the daemon holds "
            f"{tx_queue(d.port, stuck_port)} bytes for it\n{d.stderr()[-3000:]}")
        talker.send(f"trickle {trickled} {'x' * 4000}\n")
        trickled += 1
        time.sleep(0.25)
    print(f"cut off {time.monotonic() - full_at:.2f} s after its buffers filled "
          f"(send stall timeout {stall_s} s; {trickled} lines meanwhile)")
    assert watcher.until(f"talker: trickle {trickled - 1} ", timeout=10.0)
    # The others carry on meanwhile.
    talker.send("after the cut\n")
    assert watcher.until("talker: after").endswith("talker: after the cut")
    # The stuck client reads on: what its buffers held, then why it was dropped, then EOF;
    # nothing sent after the cut.
    lines: list[str] = []
    with contextlib.suppress(EOFError):
        for _ in range(100_000):
            lines.append(stuck.line(10.0))
    assert lines[-1] == f"! disconnected: too slow: nothing could be sent to you for {stall_s:g} s"
    assert not any("after the cut" in line for line in lines)
    assert watcher.until("* stuck left") == "* stuck left #lobby (too slow)"


def test_hub_sockets_have_keepalive(daemon: Daemon, clients: list[Any]) -> None:
    ss = require_tool("ss", "iproute2")
    user = TextUser(daemon.port, "kept")
    clients.append(user)

    def keepalive_timer() -> str | None:
        # ss shows one timer per socket: a retransmit timer hides the keepalive for a moment
        out = subprocess.run([ss, "-tnoH", "state", "established",
                              f"( sport = :{daemon.port} )"],
                             capture_output=True, text=True, timeout=10, check=False).stdout
        return out if "timer:(keepalive," in out else None

    out = wait_for("a keepalive timer on the hub's side of the connection", keepalive_timer, 5.0)
    # KEEPALIVE_IDLE_S is 300 s: the first probe is minutes away, not the kernel's two hours
    assert re.search(r"timer:\(keepalive,[45]min", out), out


# -- UDP clients -----------------------------------------------------------------------------


def user_nicks(d: Daemon) -> set[str]:
    """The nicks ``lanchat users --json`` lists."""
    res = d.cli("--json", "users")
    assert res.returncode == 0, res.stderr.decode()
    return {u["nick"] for u in json.loads(res.stdout)}


@pytest.mark.timeout(120)  # generous deadlines inside; 40 s is the module's
def test_a_silent_udp_client_is_forgotten_and_one_sending_keepalives_is_not(
        make_daemon: Any, clients: list[Any]) -> None:
    idle_s = 1.5
    d = make_daemon(env={"LANCHAT_UDP_IDLE_TIMEOUT_S": str(idle_s)})
    watcher = TextUser(d.port, "watcher")
    clients.append(watcher)
    silent = UdpUser(d.port, "silent")
    kept = UdpUser(d.port, "kept")
    try:
        assert silent.first.startswith("* Welcome, silent!")
        assert kept.first.startswith("* Welcome, kept!")
        watcher.until("* kept joined #lobby")
        t0 = time.monotonic()
        assert {"silent", "kept"} <= user_nicks(d)
        # kept sends an empty datagram (a keepalive) three times per idle period; silent
        # sends nothing.  Bounded: twenty idle periods at most.
        left = None
        next_keepalive = t0
        while left is None and time.monotonic() - t0 < 20 * idle_s:
            if time.monotonic() >= next_keepalive:
                kept.send("")
                next_keepalive += idle_s / 3
            with contextlib.suppress(TimeoutError):
                line = watcher.line(0.1)
                if "left" in line:
                    left = line
        forgotten_after = time.monotonic() - t0
        print(f"\nsilent UDP client forgotten {forgotten_after:.2f} s after it joined "
              f"(idle timeout {idle_s} s)")
        assert left == "* silent left #lobby (timed out)"
        assert forgotten_after >= idle_s - 0.3  # not before its time is up
        assert "* you were silent too long and have been forgotten" in silent.drain(0.3)
        # kept outlives two more idle periods on keepalives alone
        until = time.monotonic() + 2 * idle_s
        while time.monotonic() < until:
            kept.send("")
            time.sleep(idle_s / 3)
        nicks = user_nicks(d)
        assert "kept" in nicks and "silent" not in nicks
        watcher.send("/users\n")
        assert watcher.until("* In #lobby") == ("* In #lobby (3): owner, kept (plain), "
                                                "watcher (plain)")
        # Room traffic reaches kept, and no longer the forgotten client.
        kept.drain(0.2)
        watcher.send("after the silence\n")
        assert "[" in (got := kept.datagram(5.0)) and got.endswith("watcher: after the silence")
        assert silent.drain(0.5) == []
        # Forgotten means unregistered: its next datagram is a nickname again.
        silent.send("silent")
        assert silent.datagram(5.0).startswith("* Welcome, silent!")
        assert watcher.until("joined") == "* silent joined #lobby"
    finally:
        silent.close()
        kept.close()


def raise_fd_limit(needed: int) -> None:
    """Let this process open ``needed`` descriptors (the soft limit may be 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.fail(f"this test needs {needed} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@pytest.mark.timeout(240)
def test_udp_clients_are_capped_per_address_and_in_total(make_daemon: Any,
                                                         clients: list[Any]) -> None:
    raise_fd_limit(MAX_UDP_CLIENTS + 256)
    # One address may register only a few UDP clients a second (a datagram's source is not
    # proven: UDP_UNREGISTERED_*); the knob speeds that up so that the cap is reached at once.
    d = make_daemon(env={"LANCHAT_UDP_UNREGISTERED_SCALE": "100000"})
    watcher = TextUser(d.port, "watcher")
    clients.append(watcher)
    users: list[UdpUser] = []
    t0 = time.monotonic()
    try:
        # One address takes its share: 512 join, the 513th is told which limit it hit.
        for i in range(MAX_UDP_CLIENTS_PER_IP):
            users.append(UdpUser(d.port, f"a{i}", rcvbuf=2048))
            assert users[-1].first.startswith(f"* Welcome, a{i}!"), users[-1].first
        over_ip = UdpUser(d.port, "a-over", rcvbuf=2048)
        users.append(over_ip)
        assert over_ip.first == ("! too many UDP clients from your address "
                                 f"(limit {MAX_UDP_CLIENTS_PER_IP})")
        # Another address still gets in, up to the total.
        for i in range(MAX_UDP_CLIENTS - MAX_UDP_CLIENTS_PER_IP):
            users.append(UdpUser(d.port, f"b{i}", source="127.0.0.2", rcvbuf=2048))
            assert users[-1].first.startswith(f"* Welcome, b{i}!"), users[-1].first
        over_all = UdpUser(d.port, "c-over", source="127.0.0.3", rcvbuf=2048)
        users.append(over_all)
        assert over_all.first == f"! too many UDP clients (limit {MAX_UDP_CLIENTS}); try TCP"
        filled = time.monotonic() - t0
        nicks = user_nicks(d)
        assert len(nicks) == 2 + MAX_UDP_CLIENTS  # owner, watcher and every UDP client
        assert "a-over" not in nicks and "c-over" not in nicks
        # The refused are not registered: trying again is refused again.
        over_all.send("c-over")
        assert over_all.datagram(5.0) == over_all.first
        # A slot freed is a slot to take (and the address's count goes down too).
        leaver = users[0]
        leaver.drain(0.2)
        leaver.send("/quit")
        assert "* Bye!" in leaver.drain(0.5)
        watcher.until("* a0 left #lobby (quit)", timeout=30.0)
        again = UdpUser(d.port, "c-again", source="127.0.0.3", rcvbuf=2048)
        users.append(again)
        assert again.first.startswith("* Welcome, c-again!"), again.first
        over_all.send("c-over")
        assert over_all.datagram(5.0) == over_all.first  # full again
        print(f"\n{MAX_UDP_CLIENTS} UDP clients registered in {filled:.1f} s")
    finally:
        for u in users:
            u.close()
