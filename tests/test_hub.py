"""The hub, end to end: a real lanchatd on 127.0.0.1, real TCP and UDP clients."""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from conftest import Daemon, LineClient, TextUser, unit_stop_timeout_s

from lanchat.client import ControlClient
from lanchat.config import DEFAULT_PORT
from lanchat.limits import SEND_STALL_TIMEOUT_S

MESSAGE_RE = re.compile(r"^\[\d\d:\d\d:\d\d\] (\S+): (.*)$")


def test_three_text_clients_chat_in_order(daemon: Daemon, clients: list[Any]) -> None:
    alice = TextUser(daemon.port, "alice")
    clients.append(alice)
    assert "Welcome, alice!" in alice.welcome and "#lobby" in alice.welcome
    bob = TextUser(daemon.port, "bob")
    clients.append(bob)
    assert alice.line() == "* bob joined #lobby"
    carol = TextUser(daemon.port, "carol")
    clients.append(carol)
    assert "alice" in carol.welcome and "bob" in carol.welcome
    assert alice.line() == "* carol joined #lobby"
    assert bob.line() == "* carol joined #lobby"

    for i in range(5):
        alice.send(f"a{i}\n")
        bob.send(f"b{i}\n")
    for who, other1, other2 in ((carol, "alice", "bob"), (alice, "bob", None),
                                (bob, "alice", None)):
        got: dict[str, list[str]] = {}
        expected = 10 if other2 else 5
        for _ in range(expected):
            m = MESSAGE_RE.match(who.line())
            assert m, "messages are rendered [HH:MM:SS] nick: text"
            got.setdefault(m.group(1), []).append(m.group(2))
        assert got[other1] == [f"{other1[0]}{i}" for i in range(5)]  # each sender in order
        assert who.nick not in got  # no echo of one's own lines

    carol.send("/quit\n")
    assert carol.line() == "* Bye!"
    assert carol.closed()
    assert alice.line() == "* carol left #lobby (quit)"
    assert bob.line() == "* carol left #lobby (quit)"


def test_duplicate_nick_is_refused_and_asked_again(daemon: Daemon, clients: list[Any]) -> None:
    alice = TextUser(daemon.port, "alice")
    clients.append(alice)
    second = LineClient(daemon.port)
    clients.append(second)
    second.line(), second.line()
    second.send("alice\n")
    assert second.line().startswith("! the nick alice is taken")
    second.send("ALICE\n")  # nicks are unique regardless of case
    assert second.line().startswith("! the nick ALICE is taken")
    second.send("owner\n")  # the daemon's own user's nick is taken too
    assert "taken" in second.line()
    second.send("bad nick\n")
    assert second.line().startswith("! nick must be printable characters without spaces")
    second.send("alice2\n")
    assert "Welcome, alice2!" in second.line()
    assert alice.line() == "* alice2 joined #lobby"


def test_commands_nick_me_join_users_help(daemon: Daemon, clients: list[Any]) -> None:
    alice = TextUser(daemon.port, "alice")
    bob = TextUser(daemon.port, "bob")
    clients += [alice, bob]
    alice.line()  # bob joined
    bob.send("/users\n")
    assert bob.line() == "* In #lobby (3): owner, alice (plain), bob (plain)"
    bob.send("/me waves\n")
    assert re.match(r"^\[\d\d:\d\d:\d\d\] \* bob waves$", alice.line())
    assert re.match(r"^\[\d\d:\d\d:\d\d\] \* bob waves$", bob.line())  # his confirmation
    bob.send("/nick robert\n")
    assert bob.line() == "* You are now known as robert"
    assert alice.line() == "* bob is now known as robert"
    bob.send("/nick alice\n")
    assert "taken" in bob.line()
    bob.send("/frobnicate\n")
    assert bob.line() == "! unknown command /frobnicate -- type /help"
    bob.send("/help\n")
    assert bob.line() == "Commands:"
    bob.until("/quit")
    bob.until("//")
    bob.send("/join Dev\n")
    assert bob.line() == "* You are now in #dev with owner"  # the node's own user is everywhere
    assert alice.line() == "* robert left #lobby (moved to #dev)"
    alice.send("only lobby hears this\n")
    alice.send("/join #dev\n")
    assert alice.line() == "* You are now in #dev with owner, robert"
    assert bob.line() == "* alice joined #dev"
    alice.send("hello dev\n")
    assert bob.line().endswith("alice: hello dev")  # and not the lobby line before it
    bob.send("//slash at the start\n")
    assert alice.line().endswith("robert: /slash at the start")


def test_me_and_msg_are_confirmed_to_the_sender(daemon: Daemon, clients: list[Any]) -> None:
    """Text mode shows its sender nothing of a plain line (it is on their screen already),
    but an action or a direct message is shown back as the others see it, as irssi does:
    ``* bob waves``, ``bob -> alice: hi``.  Also for lines that arrive together."""
    alice = TextUser(daemon.port, "alice")
    bob = TextUser(daemon.port, "bob")
    clients += [alice, bob]
    alice.line()  # bob joined
    stamp = r"^\[\d\d:\d\d:\d\d\] "
    bob.send("/me waves\n")
    assert re.match(stamp + r"\* bob waves$", bob.line())
    bob.send("/msg alice psst\n")
    assert re.match(stamp + r"bob -> alice: psst$", bob.line())
    assert re.match(stamp + r"\* bob waves$", alice.line())
    assert re.match(stamp + r"bob -> alice: psst$", alice.line())
    bob.send("plain words\n/me nods\n/msg alice again\n")  # one read: published together
    assert re.match(stamp + r"\* bob nods$", bob.line())
    assert re.match(stamp + r"bob -> alice: again$", bob.line())
    bob.send("/ping\n")
    assert bob.line() == "* pong"  # and no echo of the plain line came before it
    assert alice.line().endswith("bob: plain words")


def test_crlf_and_multiline_and_escapes_are_safe(daemon: Daemon, clients: list[Any]) -> None:
    alice = TextUser(daemon.port, "alice")
    bob = TextUser(daemon.port, "bob")
    clients += [alice, bob]
    alice.line()
    bob.send("telnet style\r\n")
    assert alice.line().endswith("bob: telnet style")
    bob.send("title \x1b]0;pwned\x07 clear \x1b[2J done\n")
    line = alice.line()
    assert "\x1b" not in line and "\x07" not in line
    assert "pwned" in line  # shown, but harmlessly
    # a JSON client can send a multi-line text; text clients see it indented, unspoofable
    j = LineClient(daemon.port)
    clients.append(j)
    j.send(json.dumps({"type": "hello", "v": 1, "nick": "jay"}) + "\n")
    j.until('"welcome"')
    alice.line()  # jay joined
    j.send(json.dumps({"type": "say", "text": "line one\n[12:00:00] bob: fake"}) + "\n")
    assert alice.line().endswith("jay: line one")
    assert alice.line() == "  [12:00:00] bob: fake"


def test_udp_and_tcp_clients_chat(daemon: Daemon, clients: list[Any]) -> None:
    alice = TextUser(daemon.port, "alice")
    clients.append(alice)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.settimeout(5)
    try:
        udp.sendto(b"udpuser\n", ("127.0.0.1", daemon.port))
        welcome, _ = udp.recvfrom(8192)
        assert b"Welcome, udpuser!" in welcome
        assert alice.line() == "* udpuser joined #lobby"
        udp.sendto(b"hello over udp", ("127.0.0.1", daemon.port))
        assert alice.line().endswith("udpuser: hello over udp")
        alice.send("hello back over tcp\n")
        data, _ = udp.recvfrom(8192)
        assert data.decode().rstrip("\n").endswith("alice: hello back over tcp")
        udp.sendto(b"", ("127.0.0.1", daemon.port))  # keepalive: no reply, no message
        udp.sendto(b"/users", ("127.0.0.1", daemon.port))
        data, _ = udp.recvfrom(8192)
        assert data.startswith(b"* In #lobby (3):")
        udp.sendto(b"/quit", ("127.0.0.1", daemon.port))
        assert udp.recvfrom(8192)[0] == b"* Bye!\n"
        assert alice.line() == "* udpuser left #lobby (quit)"
    finally:
        udp.close()


def test_json_and_text_clients_chat(daemon: Daemon, clients: list[Any]) -> None:
    alice = TextUser(daemon.port, "alice")
    j = LineClient(daemon.port)
    clients += [alice, j]
    assert j.line().startswith("* ")  # the text greeting comes first; JSON clients skip it
    j.send(json.dumps({"type": "hello", "v": 1, "nick": "jay", "client": "test"}) + "\n")
    welcome = json.loads(j.until(lambda s: s.startswith("{")))
    assert welcome["type"] == "welcome" and welcome["nick"] == "jay"
    assert {u["nick"] for u in welcome["users"]} == {"owner", "alice"}
    assert alice.line() == "* jay joined #lobby"
    j.send(json.dumps({"type": "say", "text": "héllo from json", "ref": 42}) + "\n")
    sent = json.loads(j.line())
    assert sent["type"] == "sent" and sent["ref"] == 42
    msg = sent["message"]
    assert set(msg) >= {"id", "origin", "seq", "ts", "room", "nick", "host", "text"}
    assert msg["text"] == "héllo from json" and msg["room"] == "lobby" and msg["seq"] >= 1
    assert abs(msg["ts"] - time.time()) < 10  # stamped with the server's time
    assert alice.line().endswith("jay: héllo from json")
    alice.send("hi jay\n")
    got = json.loads(j.line())
    assert got["type"] == "message"
    assert got["message"]["nick"] == "alice" and got["message"]["text"] == "hi jay"
    j.send('{"type":"ping","t":5}\n')
    assert json.loads(j.line()) == {"type": "pong", "t": 5}
    j.send('{"type":"users"}\n')
    users = json.loads(j.line())
    assert users["type"] == "users" and len(users["users"]) == 3
    j.send('{"type":"bye"}\n')
    assert json.loads(j.line())["type"] == "bye"
    assert j.closed()
    assert alice.line() == "* jay left #lobby (quit)"


def test_stalled_client_does_not_stall_others(daemon: Daemon, clients: list[Any]) -> None:
    """A client that never reads: the others still get 10,000 messages; it is cut off."""
    stalled = LineClient(daemon.port)
    clients.append(stalled)
    stalled.send(b"stalled\n")  # joins, then never reads again
    sender = TextUser(daemon.port, "sender")
    receivers = [TextUser(daemon.port, f"r{i}") for i in range(3)]
    clients.extend([sender, *receivers])
    for r in receivers[:-1]:
        r.until(f"r{len(receivers) - 1} joined")  # all present
    rss_before = daemon.rss_kib()
    payload = "x" * 1000  # 10,000 of these is 10 MB: more than any socket buffer holds
    problems: list[str] = []

    def receive(r: TextUser) -> None:
        try:
            for i in range(10_000):
                line = r.line(timeout=30)
                if line == "* stalled left #lobby (too slow)":
                    line = r.line(timeout=30)
                if not line.endswith(f"sender: {i} {payload}"):
                    problems.append(f"{r.nick} got {line[:80]!r} for message {i}")
                    return
        except (TimeoutError, EOFError) as exc:
            problems.append(f"{r.nick}: {exc}")

    readers = [threading.Thread(target=receive, args=(r,)) for r in receivers]
    started = time.monotonic()
    for t in readers:
        t.start()
    for chunk in range(40):  # 40 bursts of 250 KB at 2.5 MB/s: far more than any chat, and
        # slow enough for this test's own readers on a loaded two-core CI machine
        sender.send("".join(f"{i} {payload}\n" for i in range(chunk * 250, chunk * 250 + 250)))
        time.sleep(0.1)
    for t in readers:
        t.join(60)
    elapsed = time.monotonic() - started
    assert not problems
    assert elapsed < 30, f"10,000 messages took {elapsed:.1f} s"
    # the stalled client's queue overflowed: the hub cut it off and told the others
    sender.until("stalled left #lobby (too slow)", timeout=15)
    cut_seen = time.monotonic()
    # memory stayed bounded: 10 MB of traffic for a reader that never reads is not kept
    assert daemon.rss_kib() - rss_before < 40 * 1024
    # the stalled client wakes up after the hub's send-stall timeout: it reads what its
    # buffers held, then the reason it was dropped, then the end of the connection
    time.sleep(max(0.0, cut_seen + SEND_STALL_TIMEOUT_S + 1 - time.monotonic()))
    tail = b""
    stalled.sock.settimeout(10)
    for _ in range(100_000):
        data = stalled.sock.recv(1 << 20)
        if not data:
            break
        tail = (tail + data)[-4096:]
    last = tail.rstrip(b"\n").split(b"\n")[-1].decode()
    assert last == "! disconnected: too slow: your queue of unsent messages was full", last


def test_bad_input_gets_an_error_and_the_hub_keeps_serving(daemon: Daemon,
                                                           clients: list[Any]) -> None:
    watcher = TextUser(daemon.port, "watcher")
    clients.append(watcher)

    bad = TextUser(daemon.port, "bad")
    clients.append(bad)
    watcher.line()
    bad.send(b"caf\xe9 latin-1\n")
    assert bad.line().startswith("! invalid UTF-8")
    bad.send(b"nul \x00 byte\n")
    assert bad.line() == "! text may not contain NUL bytes"
    bad.send(b"z" * (1 << 20))  # 1 MiB, no newline
    assert bad.line().startswith("! line longer than")
    assert bad.closed()
    assert watcher.line() == "* bad left #lobby (line too long)"

    garbage = LineClient(daemon.port)
    clients.append(garbage)
    garbage.send(json.dumps({"type": "hello", "v": 1, "nick": "garbage"}) + "\n")
    garbage.until('"welcome"')
    watcher.line()
    for junk in (b"{not json\n", b"[1,2]\n", b'{"type":"explode"}\n', b'{"type":"say"}\n',
                 b'{"type":"say","text":""}\n', b'{"type":"say","text":NaN}\n'):
        garbage.send(junk)
        reply = json.loads(garbage.line())
        assert reply["type"] == "error" and reply["fatal"] is False and reply["message"]

    badhello = LineClient(daemon.port)
    clients.append(badhello)
    badhello.send(b'{"type":"hello","v":"one"}\n')
    reply = json.loads(badhello.until(lambda s: s.startswith("{")))
    assert reply["type"] == "error" and reply["fatal"] is True
    assert badhello.closed()

    midline = TextUser(daemon.port, "midline")
    watcher.line()
    midline.send(b"this line never ends")
    midline.close()
    assert watcher.line() == "* midline left #lobby (connection closed)"

    # after all that, the hub still serves everyone
    fresh = TextUser(daemon.port, "fresh")
    clients.append(fresh)
    assert watcher.line() == "* fresh joined #lobby"
    fresh.send("still alive?\n")
    assert watcher.line().endswith("fresh: still alive?")
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_sigterm_says_goodbye_and_exits_cleanly(daemon: Daemon, clients: list[Any]) -> None:
    alice = TextUser(daemon.port, "alice")
    j = LineClient(daemon.port)
    clients += [alice, j]
    j.send(json.dumps({"type": "hello", "v": 1, "nick": "jay"}) + "\n")
    j.until('"welcome"')
    alice.line()
    # within the service's TimeoutStopSec=, after which systemd would SIGKILL it (and stop()
    # would too: the exit status would be -9, not 0)
    started = time.monotonic()
    assert daemon.stop(signal.SIGTERM, timeout=unit_stop_timeout_s()) == 0
    print(f"\nSIGTERM to exit: {time.monotonic() - started:.2f} s")
    assert alice.until("bye") == "* server shutting down -- bye!"
    assert json.loads(j.until('"bye"'))["reason"] == "server shutting down"
    assert "Traceback" not in daemon.stderr()


def test_port_zero_picks_a_port_and_says_so(daemon: Daemon, clients: list[Any]) -> None:
    """``--port 0`` lets the kernel pick a free port, the start-up line says which, and that is
    the port the hub really serves: TCP (its greeting), UDP (the same number) and ``status``
    agree with the line.  (The fixture read ``daemon.port`` from that very line, so finding it
    there again proved nothing.)"""
    (line,) = [s for s in daemon.stderr().splitlines() if "listening on" in s]
    assert line.endswith(f" listening on 127.0.0.1:{daemon.port} (TCP+UDP), "
                         f"control socket {daemon.socket}"), line
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert low <= daemon.port <= high and daemon.port != DEFAULT_PORT  # the kernel's choice
    tcp = LineClient(daemon.port)
    clients.append(tcp)
    assert tcp.line().startswith("* lanchat hub ")
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        udp.settimeout(5)
        udp.sendto(b"udpuser\n", ("127.0.0.1", daemon.port))
        assert b"Welcome, udpuser!" in udp.recvfrom(8192)[0]
        udp.sendto(b"/quit", ("127.0.0.1", daemon.port))
    finally:
        udp.close()
    with ControlClient(daemon.socket) as control:
        status = control.call("status")
    assert (status["port"], status["udp_port"]) == (daemon.port, daemon.port), status


def test_frames_pipelined_behind_the_first_line_are_not_lost(daemon: Daemon,
                                                            clients: list[Any]) -> None:
    """A client may send its hello and its first messages in one packet (nc < file does)."""
    alice = TextUser(daemon.port, "alice")
    clients.append(alice)
    j = LineClient(daemon.port)
    clients.append(j)
    j.send(json.dumps({"type": "hello", "v": 1, "nick": "jay"}) + "\n"
           + json.dumps({"type": "say", "text": "right behind the hello"}) + "\n")
    assert alice.line() == "* jay joined #lobby"
    assert alice.line().endswith("jay: right behind the hello")
    t = LineClient(daemon.port)
    clients.append(t)
    t.send("tom\nfirst words\nsecond words\n")
    assert alice.line() == "* tom joined #lobby"
    assert alice.line().endswith("tom: first words")
    assert alice.line().endswith("tom: second words")


def test_quit_in_a_busy_room_is_announced_as_a_quit(daemon: Daemon, clients: list[Any]) -> None:
    """After /quit, messages still on their way to the quitter must not get it announced
    as "too slow" (its outbox is closing, not full)."""
    watcher = TextUser(daemon.port, "watcher")
    flooder = TextUser(daemon.port, "flooder")
    clients += [watcher, flooder]
    stop = threading.Event()

    def flood() -> None:
        deadline = time.monotonic() + 30.0
        while not stop.is_set() and time.monotonic() < deadline:
            flooder.send("".join(f"busy {i}\n" for i in range(50)))
            time.sleep(0.005)

    t = threading.Thread(target=flood, name="flooder")
    t.start()
    try:
        for i in range(6):
            quitter = TextUser(daemon.port, f"quitter{i}")
            clients.append(quitter)
            quitter.send("/quit\n")
            line = watcher.until(f"quitter{i} left", 10.0, limit=1_000_000)
            assert line.endswith("(quit)"), line
    finally:
        stop.set()
        t.join()


def test_direct_message_reaches_its_addressee_in_any_room_and_nobody_else(
        daemon: Daemon, clients: list[Any]) -> None:
    """Issue 13 case 9: a /msg finds its person in another room; an unknown one is an error;
    a third client in the sender's room, and the daemon's own history and tail, never show it."""
    ann = TextUser(daemon.port, "ann")
    ben = TextUser(daemon.port, "ben")
    cid = TextUser(daemon.port, "cid")
    clients += [ann, ben, cid]
    ben.send("/join dev\n")
    ben.until("#dev")
    ann.send("/msg ben psst ben\n")
    assert "psst ben" in ben.until("psst ben")
    ann.send("/msg nobody are you there\n")
    assert ann.until(lambda s: s.startswith("!")) == "! no such user: nobody"
    ann.send("everyone\n")
    assert "everyone" in cid.until(lambda s: "psst" in s or "everyone" in s)
    j = LineClient(daemon.port)
    clients.append(j)
    j.line()
    j.send(json.dumps({"type": "hello", "v": 1, "nick": "jay", "client": "test"}) + "\n")
    j.until(lambda s: s.startswith("{"))
    j.send(json.dumps({"type": "say", "text": "hi ghost", "to": "ghost", "ref": 1}) + "\n")
    err = json.loads(j.until(lambda s: '"error"' in s))
    assert err["code"] == "no-such-user" and "ghost" in err["message"]
    j.send(json.dumps({"type": "say", "text": "hi ben from jay", "to": "ben", "ref": 2}) + "\n")
    sent = json.loads(j.until(lambda s: '"sent"' in s))
    assert sent["message"]["to"] == "ben" and sent["message"]["to_node"]
    assert "hi ben from jay" in ben.until("hi ben from jay")
    res = daemon.cli("--json", "history")
    assert res.returncode == 0, res.stderr
    texts = [json.loads(line)["text"] for line in res.stdout.decode().splitlines()]
    assert "everyone" in texts
    assert not [t for t in texts if "psst" in t or "jay" in t or "ghost" in t], texts


#: Lines a client pastes before a command in the ordering tests: enough that the router is
#: still storing them (in batches of MAX_COMMIT_BATCH, each entry signed) long after a
#: command that did not wait for them would have been answered.
PASTE_LINES = 2000


def test_users_after_a_paste_is_answered_once_the_paste_is_stored(daemon: Daemon,
                                                                  clients: list[Any]) -> None:
    """A text user's /users comes after the lines it said before: answered, those lines are
    stored (history has the last one).  A line only queues at the router; an answer read
    straight from the router's state must not overtake it."""
    talker = TextUser(daemon.port, "talker")
    clients.append(talker)
    talker.send("".join(f"pasted {i}\n" for i in range(PASTE_LINES)) + "/users\n")
    users = talker.until(lambda s: s.startswith("* In #lobby ("))
    assert users.endswith("owner, talker (plain)"), users
    with ControlClient(daemon.socket, timeout=10) as c:
        last = [(m["nick"], m["text"]) for m in c.call("history", limit=1)]
    assert last == [("talker", f"pasted {PASTE_LINES - 1}")]


def test_json_commands_are_answered_after_the_says_before_them(daemon: Daemon,
                                                               clients: list[Any]) -> None:
    """A JSON client's replies keep the order of its frames: every ``sent`` of the says
    before a ``users`` comes before the ``users`` answer."""
    j = LineClient(daemon.port)
    clients.append(j)
    j.send(json.dumps({"type": "hello", "v": 1, "nick": "jay"}) + "\n")
    assert json.loads(j.until('"welcome"'))["nick"] == "jay"
    j.send("".join(json.dumps({"type": "say", "text": f"said {i}", "ref": i}) + "\n"
                   for i in range(PASTE_LINES)) + '{"type":"users"}\n')
    refs: list[int] = []
    for _ in range(PASTE_LINES + 1):
        frame = json.loads(j.line())
        if frame["type"] == "users":
            break
        assert frame["type"] == "sent", frame
        refs.append(frame["ref"])
    assert refs == list(range(PASTE_LINES)), f"users answered after {len(refs)} sent"
    assert [u["nick"] for u in frame["users"]] == ["owner", "jay"]
