"""Pinned keys (lanchat.pins, lanchat.pinfile): strict files, atomic writes, TOFU decisions."""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lanchat import pinfile
from lanchat.errors import ValidationError
from lanchat.feed import PublicKey, SigningKey, fingerprint
from lanchat.limits import MAX_KNOWN_PINS, MAX_PIN_FILE_BYTES, MAX_PIN_NAME_CHARS
from lanchat.pins import (
    HUBS_HEADER,
    PEERS_HEADER,
    PeerPins,
    PeerVerdict,
    PinCheck,
    PinFileError,
    Pins,
    PinStatus,
    TrustPolicy,
    changed_hub_message,
    check_name,
    decide_hub,
    hub_name,
    new_hub_message,
)

pytestmark = pytest.mark.timeout(60)


def key() -> PublicKey:
    return SigningKey(secrets.token_bytes(32)).public


def line(name: str, k: PublicKey) -> str:
    return f"{name} {k.node} {k.text}\n"


# -- names --------------------------------------------------------------------------------

def test_hub_names_are_canonical() -> None:
    assert hub_name("Hub.Example.", 7000) == "hub.example:7000"
    assert hub_name("10.0.0.2", 1) == "10.0.0.2:1"
    assert hub_name("::1", 7000) == "[::1]:7000"
    assert hub_name("[FE80::1%eth0]", 7000) == "[fe80::1%eth0]:7000"
    for host, port in (("", 7000), ("a b", 7000), ("h", 0), ("h", 65536), ("h#x", 1),
                       ("h\n", 1), ("x" * MAX_PIN_NAME_CHARS, 1)):
        with pytest.raises(ValidationError):
            hub_name(host, port)


def test_pin_names_cannot_break_a_line_or_hide_in_a_log() -> None:
    check_name("mdns:lanchat-on-alice")
    for bad in ("", "a b", "a\tb", "a#b", "a\nb", "é", "x" * (MAX_PIN_NAME_CHARS + 1), 7, None):
        with pytest.raises(ValidationError):
            check_name(bad)


# -- the file format ----------------------------------------------------------------------

def test_format_and_parse_round_trip_with_comments_and_order() -> None:
    a, b = key(), key()
    pins = Pins().pinned("hub-b:7000", b).pinned("[::1]:7000", a)
    data = pins.format(HUBS_HEADER)
    assert data.startswith(HUBS_HEADER.encode() + b"\n")
    assert data.endswith(line("[::1]:7000", a).encode())
    again = Pins.parse(b"\n# a comment\n" + data + b"# trailing\n")
    assert again == pins and list(again) == list(pins)
    assert again.names_of(a.node) == ["[::1]:7000"]


@pytest.mark.parametrize(("content", "why"), [
    (b"h:1 x\n", "NAME NODE-ID KEY"),
    (b"h:1  NODE KEY\n", "NAME NODE-ID KEY"),
    (b" h:1 NODE KEY\n", "NAME NODE-ID KEY"),
    (b"h:1 NODE KEY \n", "NAME NODE-ID KEY"),
    (b"h:1 NODE KEY\r\n", "base64url"),
    (b"h:1 NODE KEY", "newline"),
    (b"h\xc3\xa9:1 NODE KEY\n", "ASCII"),
    (b"h:1 NODEUPPER KEY\n", "32 lowercase hex"),
    (b"h:1 NODE short\n", "base64url"),
    (b"h:1 OTHERNODE KEY\n", "is not node"),
    (b"h:1 NODE KEY\nh:1 NODE KEY\n", "pinned twice"),
    (b"h#1 NODE KEY\n", "character"),
])
def test_parse_refuses_every_malformed_line_naming_it(content: bytes, why: str) -> None:
    k, other = key(), key()
    data = (content.replace(b"OTHERNODE", other.node.encode())
            .replace(b"NODEUPPER", k.node.upper().encode())
            .replace(b"NODE", k.node.encode()).replace(b"KEY", k.text.encode()))
    with pytest.raises(PinFileError, match=why) as info:
        Pins.parse(b"# header\n" + data, "known_hubs")
    if why not in ("ASCII", "newline"):
        last = 2 + content.count(b"\n") - 1
        assert f"known_hubs, line {last}:" in str(info.value)


def test_parse_is_bounded() -> None:
    data = b"".join(line(f"h{i}:1", key()).encode() for i in range(MAX_KNOWN_PINS))
    assert len(Pins.parse(data)) == MAX_KNOWN_PINS
    with pytest.raises(PinFileError, match=f"more than {MAX_KNOWN_PINS}"):
        Pins.parse(data + line("one-more:1", key()).encode())
    with pytest.raises(PinFileError):
        Pins({f"h{i}:1": key() for i in range(MAX_KNOWN_PINS + 1)})


# -- checks and lanchat connect's messages ------------------------------------------------

def test_check_new_match_changed_and_the_messages() -> None:
    old, new = key(), key()
    pins = Pins().pinned("hub:7000", old)
    assert pins.check("other:7000", new).status is PinStatus.NEW
    assert pins.check("hub:7000", old).status is PinStatus.MATCH
    changed = pins.check("hub:7000", new)
    assert changed.status is PinStatus.CHANGED and changed.old == old
    first = new_hub_message(pins.check("other:7000", new), "/home/u/known_hubs")
    assert fingerprint(new) in first and new.node in first and "/home/u/known_hubs" in first
    warning = changed_hub_message(changed, "/home/u/known_hubs")
    assert "WARNING: THE KEY OF HUB hub:7000 HAS CHANGED" in warning
    assert fingerprint(old) in warning and fingerprint(new) in warning
    assert warning.rstrip().endswith(f"lanchat connect --accept-key {new.node} hub:7000")
    with pytest.raises(ValueError):
        changed_hub_message(pins.check("hub:7000", old), "x")


def test_decide_hub_with_accept_key_expects_that_node_even_at_first_contact() -> None:
    k, other = key(), key()
    fresh = decide_hub(Pins(), "hub:1", k, "kh", accept=k.node)
    assert fresh.proceed and fresh.pins is not None and fresh.pins.get("hub:1") == k
    refused = decide_hub(Pins(), "hub:1", k, "kh", accept=other.node)
    assert not refused.proceed and refused.pins is None
    assert f"not node {other.node}" in (refused.message or "")
    pinned = Pins().pinned("hub:1", other)
    changed = decide_hub(pinned, "hub:1", k, "kh")
    assert not changed.proceed and changed.pins is None
    assert isinstance(changed.check, PinCheck) and changed.check.old == other
    ok = decide_hub(pinned, "hub:1", k, "kh", accept=k.node)
    assert ok.proceed and ok.pins is not None and ok.pins.get("hub:1") == k
    assert fingerprint(other) in (ok.message or "") and fingerprint(k) in (ok.message or "")
    match = decide_hub(pinned, "hub:1", other, "kh")
    assert match.proceed and match.pins is None and match.message is None


# -- the daemon's peers -------------------------------------------------------------------

def test_first_use_pins_new_peers_and_holds_a_changed_key_until_trusted() -> None:
    a, a2, b = key(), key(), key()
    peers = PeerPins(Pins())
    first = peers.see("peer:10.0.0.2:7000", a)
    assert first.verdict is PeerVerdict.NEW and first.link and first.save
    assert "is new" in (first.log_line() or "")
    again = peers.see("peer:10.0.0.2:7000", a)
    assert again.verdict is PeerVerdict.KNOWN and again.link and not again.save
    assert again.log_line() is None
    changed = peers.see("peer:10.0.0.2:7000", a2)
    assert changed.verdict is PeerVerdict.CHANGED and not changed.link and not changed.save
    assert f"lanchat trust {a2.node}" in (changed.log_line() or "")
    assert fingerprint(a) in (changed.log_line() or "")
    assert peers.held() == {"peer:10.0.0.2:7000": (a, a2)}
    assert peers.see("peer:10.0.0.2:7000", a2).verdict is PeerVerdict.CHANGED  # still held
    assert peers.trust(b.node) == []  # nothing waits for b
    assert peers.trust(a2.node) == ["peer:10.0.0.2:7000"]
    assert peers.held() == {}
    assert peers.see("peer:10.0.0.2:7000", a2).verdict is PeerVerdict.KNOWN
    assert peers.pins.get("peer:10.0.0.2:7000") == a2
    # the old key is now the changed one
    assert peers.see("peer:10.0.0.2:7000", a).verdict is PeerVerdict.CHANGED


def test_a_held_change_is_dropped_when_the_pinned_key_comes_back() -> None:
    a, m = key(), key()
    peers = PeerPins(Pins().pinned("mdns:alice", a))
    assert not peers.see("mdns:alice", m).link
    assert peers.see("mdns:alice", a).verdict is PeerVerdict.KNOWN
    assert peers.held() == {}
    assert peers.trust(m.node) == []  # the impostor cannot be trusted after the fact


def test_trust_always_accepts_a_change_loudly() -> None:
    a, a2 = key(), key()
    peers = PeerPins(Pins().pinned("mdns:alice", a), TrustPolicy.ALWAYS)
    decision = peers.see("mdns:alice", a2)
    assert decision.verdict is PeerVerdict.CHANGED_ACCEPTED and decision.link and decision.save
    assert 'trust = "always"' in (decision.log_line() or "")
    assert peers.pins.get("mdns:alice") == a2


def test_a_full_pin_store_links_new_peers_without_pinning_them() -> None:
    full = Pins({f"h{i}:1": key() for i in range(MAX_KNOWN_PINS)})
    peers = PeerPins(full)
    decision = peers.see("newcomer:1", key())
    assert decision.verdict is PeerVerdict.NEW and decision.link and not decision.save
    assert "full" in (decision.log_line() or "")
    assert len(peers.pins) == MAX_KNOWN_PINS


def test_trust_policy_parses_only_its_two_values() -> None:
    assert TrustPolicy.parse("first-use") is TrustPolicy.FIRST_USE
    assert TrustPolicy.parse("always") is TrustPolicy.ALWAYS
    for bad in ("First-Use", "never", "", None, 1):
        with pytest.raises(ValidationError):
            TrustPolicy.parse(bad)


# -- the files ----------------------------------------------------------------------------

def test_save_is_atomic_0600_and_load_reads_it_back(tmp_path: Path) -> None:
    path = tmp_path / "state" / "known_hubs"
    assert len(pinfile.load(str(path))) == 0  # no file: no pins
    old_umask = os.umask(0)
    try:
        pins = Pins().pinned("hub:7000", key())
        pinfile.save(str(path), pins, HUBS_HEADER)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert pinfile.load(str(path)) == pins
    assert sorted(p.name for p in path.parent.iterdir()) == ["known_hubs"]  # no temp left


def test_load_refuses_files_others_could_write_links_and_non_files(tmp_path: Path) -> None:
    path = tmp_path / "known_peers"
    pinfile.save(str(path), Pins().pinned("peer:h:1", key()), PEERS_HEADER)
    path.chmod(0o620)
    with pytest.raises(PinFileError, match="chmod 600"):
        pinfile.load(str(path))
    path.chmod(0o644)  # readable is fine: a pin is not secret
    assert len(pinfile.load(str(path))) == 1
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(PinFileError, match="symbolic link"):
        pinfile.load(str(link))
    with pytest.raises(PinFileError, match="regular file"):
        pinfile.load(str(tmp_path))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(PinFileError, match="regular file"):
        pinfile.load(str(fifo))  # and does not hang


def test_load_refuses_a_huge_or_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "known_hubs"
    path.write_bytes(b"#" * (MAX_PIN_FILE_BYTES + 1) + b"\n")
    path.chmod(0o600)
    with pytest.raises(PinFileError, match="longer"):
        pinfile.load(str(path))
    path.write_bytes(b"hub:7000 nonsense\n")
    with pytest.raises(PinFileError, match=f"{path}, line 1"):
        pinfile.load(str(path))


def test_known_hubs_lives_in_the_users_state_directory() -> None:
    assert pinfile.known_hubs_path({"HOME": "/home/u"}) == "/home/u/.local/state/lanchat/known_hubs"
    assert pinfile.known_hubs_path({"HOME": "/home/u", "XDG_STATE_HOME": "/s",
                                    "STATE_DIRECTORY": "/var/lib/x"}) == "/s/lanchat/known_hubs"
    with pytest.raises(PinFileError):
        pinfile.known_hubs_path({})


WRITER = """
import secrets, sys
from lanchat import pinfile
from lanchat.feed import SigningKey
from lanchat.pins import HUBS_HEADER
path, who = sys.argv[1], sys.argv[2]
for i in range(40):
    k = SigningKey(secrets.token_bytes(32)).public
    pinfile.update(path, lambda p: p.pinned(f"{who}{i}:1", k), HUBS_HEADER)
"""


def test_concurrent_updates_lose_no_pin(tmp_path: Path) -> None:
    """Two processes each add 40 pins at once: all 80 are in the file afterwards."""
    path = str(tmp_path / "known_hubs")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, path, who])
             for who in ("a", "b")]
    try:
        for proc in procs:
            assert proc.wait(50) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    pins = pinfile.load(path)
    assert sorted(name for name, _ in pins) == sorted(
        [f"a{i}:1" for i in range(40)] + [f"b{i}:1" for i in range(40)])
