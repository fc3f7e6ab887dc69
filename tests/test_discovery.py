"""Discovery: pure name/TXT rules, and real mDNS between network namespaces.

The network tests never run zeroconf on this machine's interfaces: every probe runs inside a
namespace of a private LAN built by tests/netns.py (DESIGN.md, "Testing on a real network,
safely").  Run them as root; without root they skip, unless $CI is set, where they fail.
Timings are printed (``pytest -s``) so regressions in time-to-found/lost are visible.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import netns
import pytest
from conftest import lanchat_cmd, lanchatd_cmd
from zeroconf import ServiceInfo

from lanchat.discovery import (
    MAX_LABEL_BYTES,
    MAX_TXT_ITEM_BYTES,
    PROTOCOL_VERSION,
    RENAME_RESERVE_BYTES,
    SERVICE_TYPE,
    Discovery,
    build_txt,
    instance_label,
    label_of,
    peer_from_txt,
)
from lanchat.errors import ValidationError

PROBE = str(Path(__file__).with_name("discovery_probe.py"))
SUBNET = netns.DEFAULT_SUBNET

NODE_A = "a1" * 8
NODE_B = "b2" * 8
NODE_C = "c3" * 8

#: Generous bounds for one event on an idle bridge (measured: found ~1.6-2.1 s after the peer
#: began registering, most of it RFC 6762 probing; lost a few ms after its SIGTERM).
FOUND_WITHIN_S = 10.0
LOST_WITHIN_S = 2.0
#: Rediscovery after a link returns, with a 0.5 s interface poll (measured ~0.6-1.1 s).  Without
#: the interface watcher it took 3-8 s, waiting for zeroconf's backed-off browse queries (which
#: back off to an hour), so this bound checks that the watcher does its job.
REDISCOVER_WITHIN_S = 4.0


# -- pure: instance labels and TXT --------------------------------------------------------------

def test_label_replaces_dots_and_control_characters() -> None:
    assert instance_label("alice on laptop.example") == "alice on laptop-example"
    assert instance_label("a\tb\nc\x7fd") == "a b c d"
    assert instance_label("  bob  ") == "bob"
    assert instance_label("") == "lanchat"
    assert instance_label("...") == "---"
    assert instance_label("\x00\x01") == "lanchat"


@pytest.mark.parametrize("name", ["x" * 200, "é" * 100, "日本語" * 30, "a" + "😀" * 40])
def test_label_is_truncated_on_a_character_boundary(name: str) -> None:
    label = instance_label(name)
    raw = label.encode("utf-8")
    limit = MAX_LABEL_BYTES - RENAME_RESERVE_BYTES
    assert len(raw) <= limit
    assert len(raw) > limit - 4                  # cut at most one character short
    assert name.startswith(label)                # a prefix of whole characters
    # Even after python-zeroconf's conflict rename the label still registers.
    ServiceInfo(SERVICE_TYPE, f"{label}-999.{SERVICE_TYPE}", port=1, server="h.local.")


def test_label_of_strips_the_service_type() -> None:
    assert label_of(f"alice-2.{SERVICE_TYPE}") == "alice-2"
    assert label_of("alice._LANCHAT._tcp.local.") == "alice"
    assert label_of("other._http._tcp.local.") == "other._http._tcp.local."


def test_txt_has_txtvers_first_and_the_contract_keys() -> None:
    txt = build_txt(node_id=NODE_A, udp_port=7001, auth=True)
    assert list(txt) == ["txtvers", "v", "id", "udp", "auth"]
    assert txt == {"txtvers": "1", "v": str(PROTOCOL_VERSION), "id": NODE_A, "udp": "7001",
                   "auth": "1"}
    assert build_txt(node_id=NODE_A, udp_port=None) == {"txtvers": "1", "v": "1", "id": NODE_A}
    info = ServiceInfo(SERVICE_TYPE, f"a.{SERVICE_TYPE}", port=1, properties=txt,
                       server="h.local.")
    assert info.decoded_properties == txt


def test_txt_item_over_255_bytes_is_refused() -> None:
    ok = "a" * (MAX_TXT_ITEM_BYTES - len("id="))
    assert build_txt(node_id=ok, udp_port=None)["id"] == ok
    with pytest.raises(ValueError, match="TXT item 'id'"):
        build_txt(node_id=ok + "a", udp_port=None)


def test_peer_from_txt_accepts_a_hub_and_rejects_junk() -> None:
    props: dict[str, str | None] = {"txtvers": "1", "V": "1", "ID": NODE_B, "udp": "7002"}
    peer = peer_from_txt(f"bob.{SERVICE_TYPE}", props, ["10.0.0.2"], 7000)
    assert peer is not None
    assert (peer.node, peer.name, peer.addresses, peer.port, peer.udp_port, peer.version,
            peer.auth) == (NODE_B, "bob", ("10.0.0.2",), 7000, 7002, 1, False)
    with_auth = peer_from_txt("x", {**props, "auth": "1"}, ["10.0.0.2"], 7000)
    assert with_auth is not None and with_auth.auth
    bad_udp = peer_from_txt("x", {**props, "udp": "99999"}, ["1.2.3.4"], 1)
    assert bad_udp is not None and bad_udp.udp_port is None
    for bad in ({"v": "1"}, {"v": "1", "id": "XYZ"}, {"id": NODE_B}, {"id": NODE_B, "v": "x"},
                {"id": NODE_B, "v": None}):
        assert peer_from_txt("x", bad, ["10.0.0.2"], 7000) is None, bad
    assert peer_from_txt("x", props, [], 7000) is None
    assert peer_from_txt("x", props, ["10.0.0.2"], None) is None
    assert peer_from_txt("x", props, ["10.0.0.2"], 0) is None


def test_discovery_validates_its_arguments_without_touching_the_network() -> None:
    def make(**kw: Any) -> Discovery:
        args: dict[str, Any] = {"node_id": NODE_A, "name": "a", "port": 7000,
                                "on_found": lambda p: None, "on_lost": lambda n: None}
        args.update(kw)
        return Discovery(**args)

    with pytest.raises(ValidationError):
        make(node_id="not-hex")
    with pytest.raises(ValueError):
        make(port=0)
    with pytest.raises(ValueError):
        make(udp_port=70000)
    with pytest.raises(ValueError):
        make(ip_version="v5")
    d = make()
    assert d.advertised_name == ""
    d.close()                                   # never started: a no-op
    d.close()


def test_require_netns_fails_instead_of_skipping_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        netns.require_netns()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        netns.require_netns()


# -- real mDNS inside network namespaces --------------------------------------------------------

@pytest.fixture
def lan() -> Iterator[netns.Lan]:
    with netns.lan_for_test("ld") as the_lan:
        yield the_lan
    namespaces, pids = the_lan.leftovers()
    assert not namespaces, f"namespaces left behind: {namespaces}"
    assert not pids, f"processes left behind: {pids}"


def probe(host: netns.Host, node: str, name: str, *extra: str) -> netns.NsProcess:
    return host.run([sys.executable, PROBE, "--node", node, "--name", name, "--max-seconds",
                     "90", *extra])


def is_event(event: str, node: str | None = None) -> Callable[[dict[str, Any]], bool]:
    return lambda o: o.get("event") == event and (node is None or o.get("node") == node)


def started(p: netns.NsProcess) -> dict[str, Any]:
    return p.wait_for_line(is_event("started"), FOUND_WITHIN_S)


@pytest.mark.netns
def test_two_hosts_find_each_other_with_the_advertised_fields(lan: netns.Lan) -> None:
    a, b = lan.add_host(), lan.add_host()
    pa = probe(a, NODE_A, "alice", "--port", "7001", "--udp-port", "7002")
    pb = probe(b, NODE_B, "bob", "--port", "7101", "--auth")
    sa, sb = started(pa), started(pb)
    fa = pa.wait_for_line(is_event("found", NODE_B), FOUND_WITHIN_S)
    fb = pb.wait_for_line(is_event("found", NODE_A), FOUND_WITHIN_S)
    # A peer is found once it has probed (~1.5-2 s, RFC 6762 §8) and announces; "started" is
    # printed after registration returned, i.e. after the announcements went out.
    for who, found, peer in (("a", fa, pb), ("b", fb, pa)):
        begun = peer.wait_for_line(is_event("starting"), 1)["t"]
        done = peer.wait_for_line(is_event("started"), 1)["t"]
        print(f"\n{who} found its peer {found['t'] - begun:.2f} s after the peer began "
              f"registering ({found['t'] - done:+.3f} s relative to its start() returning)")
    assert fb == {**fb, "name": "alice", "addresses": [a.address()], "port": 7001, "udp": 7002,
                  "v": PROTOCOL_VERSION, "auth": False, "service": f"alice.{SERVICE_TYPE}"}
    assert fa == {**fa, "name": "bob", "addresses": [b.address()], "port": 7101, "udp": None,
                  "v": PROTOCOL_VERSION, "auth": True}
    time.sleep(1.0)                             # give a stray self-report time to show up
    for p, own in ((pa, NODE_A), (pb, NODE_B)):
        nodes = [o["node"] for o in p.json_lines() if o["event"] == "found"]
        assert own not in nodes                 # never ourselves
        assert len(nodes) == len(set(nodes))    # one report per change, not per packet
    assert sa["name"] == "alice" and sb["name"] == "bob"


@pytest.mark.netns
def test_three_hosts_find_each_other(lan: netns.Lan) -> None:
    hosts = [lan.add_host() for _ in range(3)]
    nodes = [NODE_A, NODE_B, NODE_C]
    t0 = time.time()
    # host0's callbacks raise every time: discovery must log that and carry on.
    procs = [probe(h, n, f"host{i}", *(["--flaky-callbacks"] if i == 0 else []))
             for i, (h, n) in enumerate(zip(hosts, nodes, strict=True))]
    last = 0.0
    for i, p in enumerate(procs):
        for j, n in enumerate(nodes):
            if i != j:
                found = p.wait_for_line(is_event("found", n), FOUND_WITHIN_S)
                assert found["addresses"] == [hosts[j].address()]
                last = max(last, found["t"])
    assert "on_found failed on purpose" in procs[0].err_text()
    assert lan.stop(procs[2]) == 0
    procs[0].wait_for_line(is_event("lost", NODE_C), LOST_WITHIN_S)
    assert "on_lost failed on purpose" in procs[0].err_text()
    procs[1].wait_for_line(is_event("lost", NODE_C), LOST_WITHIN_S)
    print(f"\nthree hosts: all six found {last - t0:.2f} s after launching the probes "
          f"(Python start-up and ~1.5-2 s of registration probing included)")


@pytest.mark.netns
def test_same_display_name_on_two_hosts_is_two_peers(lan: netns.Lan) -> None:
    a, b, c = lan.add_host(), lan.add_host(), lan.add_host()
    pa = probe(a, NODE_A, "alice")
    name_a = started(pa)["name"]
    pb = probe(b, NODE_B, "alice")              # after a holds the name: must be renamed
    name_b = started(pb)["name"]
    assert {name_a, name_b} == {"alice", "alice-2"}
    pc = probe(c, NODE_C, "carol")
    fa = pc.wait_for_line(is_event("found", NODE_A), FOUND_WITHIN_S)
    fb = pc.wait_for_line(is_event("found", NODE_B), FOUND_WITHIN_S)
    assert (fa["name"], fa["addresses"]) == (name_a, [a.address()])
    assert (fb["name"], fb["addresses"]) == (name_b, [b.address()])
    # And each of the two sees the other under the other's registered name.
    assert pa.wait_for_line(is_event("found", NODE_B), FOUND_WITHIN_S)["name"] == name_b
    assert pb.wait_for_line(is_event("found", NODE_A), FOUND_WITHIN_S)["name"] == name_a


@pytest.mark.netns
def test_clean_stop_sends_goodbye_and_peer_reports_lost(lan: netns.Lan) -> None:
    a, b = lan.add_host(), lan.add_host()
    pa, pb = probe(a, NODE_A, "alice"), probe(b, NODE_B, "bob")
    pa.wait_for_line(is_event("found", NODE_B), FOUND_WITHIN_S)
    t0 = time.time()
    assert lan.stop(pb) == 0                    # SIGTERM -> close() -> goodbye
    lost = pa.wait_for_line(is_event("lost", NODE_B), LOST_WITHIN_S)
    print(f"\ntime-to-lost after SIGTERM: {lost['t'] - t0:.3f} s")
    assert any(o["event"] == "closed" for o in pb.json_lines())
    assert "Traceback" not in pb.err_text()


@pytest.mark.netns
def test_update_reannounces_a_new_port(lan: netns.Lan) -> None:
    a, b = lan.add_host(), lan.add_host()
    pa, pb = probe(a, NODE_A, "alice", "--port", "7001"), probe(b, NODE_B, "bob")
    pb.wait_for_line(is_event("found", NODE_A), FOUND_WITHIN_S)
    t0 = time.time()
    pa.send_signal(signal.SIGUSR1)        # the probe calls update(port=7002)
    pa.wait_for_line(is_event("updated"), FOUND_WITHIN_S)
    moved = pb.wait_for_line(lambda o: is_event("found", NODE_A)(o) and o["port"] == 7002,
                             FOUND_WITHIN_S)
    print(f"\nport update seen by the peer {moved['t'] - t0:.3f} s after SIGUSR1")
    assert moved["name"] == "alice"             # same instance, not a second service
    assert not any(o["event"] == "lost" for o in pb.json_lines())


@pytest.mark.netns
def test_host_whose_link_comes_back_is_rediscovered(lan: netns.Lan) -> None:
    a, b, c = lan.add_host(), lan.add_host(), lan.add_host()
    poll = ("--poll", "0.5")                    # the interface poll, 30 s in production
    pa, pb = probe(a, NODE_A, "alice", *poll), probe(b, NODE_B, "bob", *poll)
    pa.wait_for_line(is_event("found", NODE_B), FOUND_WITHIN_S)
    pb.wait_for_line(is_event("found", NODE_A), FOUND_WITHIN_S)
    lan.set_link(b, SUBNET, up=False)           # pull bob's cable
    time.sleep(1.5)                             # > one poll: bob notices the carrier loss
    pc = probe(c, NODE_C, "carol", *poll)       # carol arrives while bob is away
    pc.wait_for_line(is_event("found", NODE_A), FOUND_WITHIN_S)
    time.sleep(1.0)
    assert not any(o["event"] == "found" and o["node"] == NODE_B for o in pc.json_lines())
    t0 = time.time()
    lan.set_link(b, SUBNET, up=True)
    # Bob re-announces on the returning link (carol learns of him) and browses afresh (he
    # learns of carol, who announced while he was away).
    fc = pc.wait_for_line(is_event("found", NODE_B), REDISCOVER_WITHIN_S)
    fb = pb.wait_for_line(is_event("found", NODE_C), REDISCOVER_WITHIN_S)
    print(f"\nafter the link returned: carol found bob in {fc['t'] - t0:.2f} s, "
          f"bob found carol in {fb['t'] - t0:.2f} s (interface poll 0.5 s)")
    assert fc["addresses"] == [b.address()]


@pytest.mark.netns
def test_interfaces_by_name_or_address_and_ipv6(lan: netns.Lan) -> None:
    net1, net2 = SUBNET, "10.78.0.0/24"
    a = lan.add_host([net1, net2])             # eth0 on net1, eth1 on net2
    b = lan.add_host([net2])
    c = lan.add_host([net1])
    for h in (a, b, c):
        h.wait_ipv6_ready()
    pa = probe(a, NODE_A, "alice", "--interface", "eth1", "--ip-version", "all")
    pb = probe(b, NODE_B, "bob", "--ip-version", "all")
    pc = probe(c, NODE_C, "carol", "--interface", c.address(net1))
    seen_by_b = pb.wait_for_line(is_event("found", NODE_A), FOUND_WITHIN_S)
    v4, *v6 = seen_by_b["addresses"]
    assert v4 == a.address(net2)               # IPv4 first, only the chosen interface's
    assert len(v6) == 1 and v6[0].startswith("fe80:") and "%" in v6[0]   # scoped link-local
    seen_by_a = pa.wait_for_line(is_event("found", NODE_B), FOUND_WITHIN_S)
    assert seen_by_a["addresses"][0] == b.address(net2)
    time.sleep(3.0)
    # alice speaks mDNS on eth1 only, so carol (on net1) and alice never meet.
    assert not any(o["event"] == "found" for o in pc.json_lines())
    assert not any(o["event"] == "found" and o["node"] == NODE_C for o in pa.json_lines())


@pytest.mark.netns
def test_browse_hubs_lists_each_hub_once(lan: netns.Lan) -> None:
    a, b, c = lan.add_host(), lan.add_host(), lan.add_host()
    pa, pb = probe(a, NODE_A, "alice", "--port", "7001"), probe(b, NODE_B, "bob")
    started(pa)
    started(pb)
    out = c.check_output([sys.executable, PROBE, "browse", "--timeout", "3"], timeout=30)
    hubs = json.loads(out.strip().splitlines()[-1])["hubs"]
    assert [(h["node"], h["name"], h["addresses"]) for h in hubs] == [
        (NODE_A, "alice", [a.address()]), (NODE_B, "bob", [b.address()])]
    assert hubs[0]["port"] == 7001


@pytest.mark.netns
def test_teardown_kills_processes_and_deletes_namespaces() -> None:
    netns.require_netns()
    with netns.Lan("lt") as the_lan:
        h = the_lan.add_host()
        p = h.run(["sleep", "60"])
        created = list(the_lan.namespaces)
        assert set(created) <= netns.netns_names()
    assert p.poll() is not None
    assert not set(created) & netns.netns_names()
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run(["ip", "netns", "exec", created[-1], "true"], check=True,
                       capture_output=True, timeout=10)


# -- lanchat connect without a host: a real daemon found by mDNS ----------------------------------

#: A hub daemon is advertised once it prints "listening on" (registration comes first).
DAEMON_READY_S = 30.0


def hub_daemon(lan: netns.Lan, host: netns.Host, nick: str) -> tuple[netns.NsProcess, str]:
    """lanchatd with discovery on (the default), inside ``host``; its control socket path."""
    where = lan.tmpdir / nick
    sock = str(where / "control.sock")
    p = host.run([*lanchatd_cmd(), "-v", "--nick", nick, "--state-dir", str(where / "state"),
                  "--socket", sock, "--max-rate", "0"])
    deadline = time.monotonic() + DAEMON_READY_S
    while "listening on" not in p.err_text():
        assert p.poll() is None, f"lanchatd exited {p.returncode}:\n{p.err_text()}"
        assert time.monotonic() < deadline, f"lanchatd not ready:\n{p.err_text()}"
        time.sleep(0.05)
    return p, sock


def control(sock: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``lanchat --socket SOCK ARGS`` from here: a Unix socket is not in any namespace."""
    return subprocess.run([*lanchat_cmd(), "--socket", sock, *args], capture_output=True,
                          text=True, timeout=30, check=False)


def connect(host: netns.Host, *args: str) -> netns.NsProcess:
    """``lanchat connect ARGS`` inside ``host``, its stdin a pipe (not a terminal)."""
    return host.run([*lanchat_cmd(), "connect", *args], stdin=subprocess.PIPE)


def wait_text(p: netns.NsProcess, text: str, timeout: float) -> str:
    """Wait until ``text`` appears on the process's stdout; return that stdout."""
    deadline = time.monotonic() + timeout
    while text not in (out := p.out_text()):
        assert time.monotonic() < deadline, (f"no {text!r} within {timeout} s\n"
                                             f"stdout:\n{out}\nstderr:\n{p.err_text()}")
        time.sleep(0.05)
    return out


@pytest.mark.netns
def test_connect_without_a_host_finds_the_hub_by_mdns_and_chats(lan: netns.Lan) -> None:
    a, b, c = lan.add_host(), lan.add_host(), lan.add_host()
    # Nothing advertised yet: nothing found, and the user is told how to name a hub.
    none = connect(b, "--nick", "bob")
    assert none.wait(30) == 1
    assert none.err_text() == ("lanchat: no lanchat hub found on the local network; "
                               "give one: lanchat connect HOST[:PORT]\n")
    # One hub: joined without a question.
    _hub, sock = hub_daemon(lan, a, "alice")
    name = json.loads(control(sock, "--json", "status").stdout)["name"]
    t0 = time.monotonic()
    bob = connect(b, "--nick", "bob")
    assert bob.stdin is not None
    wait_text(bob, f"* Connected to {name} ({a.address()}:7654) as bob, in #lobby with alice.",
              30.0)
    print(f"\nlanchat connect found the hub and joined in {time.monotonic() - t0:.2f} s "
          "(3 s of it browsing)")
    bob.stdin.write(b"hello from bob\n")
    bob.stdin.flush()
    deadline = time.monotonic() + 15.0
    while "hello from bob" not in control(sock, "history").stdout:
        assert time.monotonic() < deadline, bob.err_text()
        time.sleep(0.1)
    assert control(sock, "send", "hi bob").returncode == 0
    assert "alice: hi bob" in wait_text(bob, "alice: hi bob", 15.0)
    bob.stdin.write(b"/quit\n")
    bob.stdin.close()
    assert bob.wait(15) == 0
    # Two hubs and no terminal to choose on: both are listed, exit status 2.
    _hub2, sock2 = hub_daemon(lan, c, "carol")
    name2 = json.loads(control(sock2, "--json", "status").stdout)["name"]
    both = connect(b, "--nick", "bob")
    assert both.wait(30) == 2
    listing = sorted([(name, f"{a.address()}:7654"), (name2, f"{c.address()}:7654")])
    assert both.err_text() == (
        "lanchat: 2 hubs found; choose one with lanchat connect HOST[:PORT]:\n"
        + "".join(f"  {i}. {n}  {where}\n" for i, (n, where) in enumerate(listing, 1)))
