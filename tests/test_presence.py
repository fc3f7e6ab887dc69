"""Versioned per-node rosters (lanchat.presence): ordering, gone, diffs, limits.

Pure: rosters are built by hand and applied in every order a mesh could deliver them.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lanchat.errors import AmbiguousUser, NoSuchUser, ValidationError
from lanchat.feed import SigningKey, b64encode
from lanchat.model import Presence, User
from lanchat.presence import (
    MAX_NETWORK_USERS,
    MAX_NODES,
    MAX_ROSTER_USERS,
    ROSTER_DOMAIN,
    Change,
    HeldNotices,
    NetworkRoster,
    NodeRoster,
    parse_signed_roster,
    resolve_mailbox,
    resolve_recipient,
    sign_roster,
)
from lanchat.seal import DhKey, DhRecord

ME = "00" * 8
NODE_B = "b2" * 8
NODE_C = "c3" * 8


def user(nick: str, node: str = NODE_B, room: str = "lobby") -> User:
    return User(nick=nick, host="h", node=node, local=False, since=1.0, room=room)


def roster(node: str = NODE_B, ver: int = 1, *nicks: str, gone: bool = False,
           room: str = "lobby") -> NodeRoster:
    return NodeRoster(node=node, ver=ver, name=f"n-{node[:4]}", host="h",
                      users=tuple(user(n, node, room) for n in nicks), gone=gone)


def kinds(changes: list[Change] | None) -> set[tuple[str, str]]:
    assert changes is not None
    return {(c.kind, c.user.nick) for c in changes}


# -- ordering --------------------------------------------------------------------------------

def test_newer_than_orders_by_version_then_gone() -> None:
    assert roster(ver=1).newer_than(None)
    assert roster(ver=2).newer_than(roster(ver=1))
    assert not roster(ver=1).newer_than(roster(ver=2))
    assert not roster(ver=1).newer_than(roster(ver=1))           # same: not news
    assert roster(ver=1, gone=True).newer_than(roster(ver=1))     # gone wins a tie
    assert not roster(ver=1).newer_than(roster(ver=1, gone=True))
    assert roster(ver=2).newer_than(roster(ver=1, gone=True))     # came back
    assert not roster(ver=1, gone=True).newer_than(roster(ver=2))


# -- dict form -------------------------------------------------------------------------------

def test_roster_round_trips_and_users_are_remote_on_the_roster_node() -> None:
    r = roster(NODE_C, 42, "carol", "dave", room="dev")
    back = NodeRoster.from_dict(r.to_dict())
    assert back == r
    assert all(u.node == NODE_C and not u.local for u in back.users)


def test_a_rosters_links_round_trip_bounded_and_without_itself() -> None:
    """The links a node lists (lanchat.relay) travel with its roster, checked and bounded."""
    d = roster(NODE_B, 3).to_dict()
    d["links"] = [NODE_C, ME, NODE_B, NODE_C]
    r = NodeRoster.from_dict(d)
    assert r.links == tuple(sorted({NODE_C, ME}))  # itself and repeats dropped
    assert NodeRoster.from_dict(r.to_dict()) == r
    assert NodeRoster.from_dict(roster(NODE_B, 3).to_dict()).links == ()  # none listed
    too_many = [f"{i:016x}" for i in range(MAX_NODES + 1)]
    for bad in ("x", [1], ["not a node"], too_many):
        d["links"] = bad
        with pytest.raises(ValidationError):
            NodeRoster.from_dict(d)
    net = NetworkRoster(ME)
    net.apply(NodeRoster.from_dict({**r.to_dict(), "links": [NODE_C]}), via="l")
    gone = net.mark_gone(NODE_B)
    assert gone is not None and gone[0].links == ()  # an unreachable node is linked to none


def test_users_claiming_another_node_are_pinned_to_the_roster_node() -> None:
    d = roster(NODE_C, 1, "carol").to_dict()
    d["users"][0]["node"] = NODE_B   # ignored: a node only speaks for its own users
    d["users"][0]["local"] = True
    (u,) = NodeRoster.from_dict(d).users
    assert u.node == NODE_C and u.local is False


@pytest.mark.parametrize("change", [
    {"node": "XYZ"}, {"node": None},
    {"ver": -1}, {"ver": 1.5}, {"ver": True}, {"ver": None},
    {"name": ""}, {"name": "x" * 254}, {"name": "a\nb"}, {"name": 3},
    {"host": ""}, {"host": "a b"},
    {"users": {}}, {"users": ["x"]},
    {"users": [{"nick": "bad nick", "host": "h", "since": 1}]},
    {"users": [{"nick": "ok", "host": "h", "since": "1"}]},
    {"users": [{"nick": "ok", "host": "h", "since": True}]},
    {"users": [{"nick": "ok", "host": "h", "since": 1, "room": "Bad Room"}]},
    {"users": [{"nick": "ok", "host": "h", "since": 1, "via": "x" * 17}]},
])
def test_bad_rosters_are_refused(change: dict[str, Any]) -> None:
    d = roster(NODE_C, 1, "carol").to_dict()
    d.update(change)
    with pytest.raises(ValidationError):
        NodeRoster.from_dict(d)


def test_non_object_roster_is_refused() -> None:
    for bad in (None, [], "roster", 5):
        with pytest.raises(ValidationError):
            NodeRoster.from_dict(bad)


def test_roster_user_limit() -> None:
    base = roster(NODE_C, 1).to_dict()
    one = {"nick": "u", "host": "h", "since": 1}
    NodeRoster.from_dict({**base, "users": [one] * MAX_ROSTER_USERS})
    with pytest.raises(ValidationError):
        NodeRoster.from_dict({**base, "users": [one] * (MAX_ROSTER_USERS + 1)})


# -- NetworkRoster.apply ----------------------------------------------------------------------

def test_apply_reports_joins_and_leaves_and_ignores_old_news() -> None:
    net = NetworkRoster(ME)
    link = object()
    assert kinds(net.apply(roster(NODE_B, 1, "bob", "ben"), link)) == {("join", "bob"),
                                                                      ("join", "ben")}
    assert net.apply(roster(NODE_B, 1, "bob", "ben"), link) is None       # duplicate
    assert net.apply(roster(NODE_B, 0, "old"), link) is None              # late
    assert kinds(net.apply(roster(NODE_B, 3, "bob", "bea"), link)) == {("leave", "ben"),
                                                                      ("join", "bea")}
    assert {u.nick for u in net.users()} == {"bob", "bea"}
    assert net.apply(roster(NODE_B, 2, "zed"), link) is None              # overtaken


def test_a_room_move_is_a_leave_and_a_join() -> None:
    net = NetworkRoster(ME)
    net.apply(roster(NODE_B, 1, "bob"), None)
    changes = net.apply(roster(NODE_B, 2, "bob", room="dev"), None)
    assert changes is not None
    assert [(c.kind, c.user.room) for c in changes] == [("leave", "lobby"), ("join", "dev")]


def test_own_roster_is_never_applied() -> None:
    net = NetworkRoster(ME)
    assert net.apply(roster(ME, 99, "me"), object()) is None
    assert net.users() == [] and net.get(ME) is None


def test_node_limit() -> None:
    net = NetworkRoster(ME)
    for i in range(MAX_NODES):
        assert net.apply(roster(f"{i + 1:016x}", 1), None) is not None
    assert net.apply(roster("f" * 16, 1, "x"), None) is None
    assert net.get("f" * 16) is None
    # Known nodes still update at the limit.
    assert net.apply(roster(f"{1:016x}", 2, "y"), None) is not None


# -- gone, vouched_by -------------------------------------------------------------------------

def test_mark_gone_removes_users_and_a_newer_roster_brings_them_back() -> None:
    net = NetworkRoster(ME)
    net.apply(roster(NODE_B, 5, "bob"), "link-b")
    marked = net.mark_gone(NODE_B)
    assert marked is not None
    gone, changes = marked
    assert gone.gone and gone.ver == 5 and gone.users == () and gone.node == NODE_B
    assert kinds(changes) == {("leave", "bob")}
    assert net.users() == []
    assert net.mark_gone(NODE_B) is None                 # already gone
    assert net.mark_gone(NODE_C) is None                 # never known
    assert net.apply(roster(NODE_B, 5, "bob"), "link-b") is None  # same version: still gone
    assert kinds(net.apply(roster(NODE_B, 6, "bob"), "link-b")) == {("join", "bob")}


def test_a_relayed_gone_of_the_same_version_wins() -> None:
    net = NetworkRoster(ME)
    net.apply(roster(NODE_C, 4, "carol"), "link-b")
    assert kinds(net.apply(roster(NODE_C, 4, gone=True), "link-b")) == {("leave", "carol")}
    assert net.apply(roster(NODE_C, 3, gone=True), "link-b") is None


def test_only_the_link_that_brought_a_roster_withdraws_it_at_its_version() -> None:
    """``gone`` is nobody's signature: taken from the voucher only, at its version."""
    net = NetworkRoster(ME)
    lb, lc = object(), object()
    net.apply(roster(NODE_C, 4, "carol"), lb)
    assert net.withdraw(NODE_C, 4, lc) is None      # not the link that brought it
    assert net.withdraw(NODE_C, 5, lb) is None      # not the version held (cannot raise it)
    assert net.withdraw(NODE_C, 3, lb) is None
    assert net.withdraw(NODE_B, 1, lb) is None      # never known
    assert [u.nick for u in net.users()] == ["carol"]
    assert kinds(net.withdraw(NODE_C, 4, lb)) == {("leave", "carol")}
    assert net.withdraw(NODE_C, 4, lb) is None      # already gone
    gone = net.get(NODE_C)
    assert gone is not None and gone.gone and gone.signed is None
    assert kinds(net.apply(roster(NODE_C, 5, "carol"), lc)) == {("join", "carol")}


def test_vouched_by_follows_the_link_of_the_newest_roster() -> None:
    net = NetworkRoster(ME)
    lb, lc = object(), object()
    net.apply(roster(NODE_B, 1, "bob"), lb)
    net.apply(roster(NODE_C, 1, "carol"), lb)       # C relayed through B
    assert sorted(net.vouched_by(lb)) == sorted([NODE_B, NODE_C])
    assert net.vouched_by(lc) == []
    net.apply(roster(NODE_C, 1, "carol"), lc)       # same version direct: not news, via unchanged
    assert sorted(net.vouched_by(lb)) == sorted([NODE_B, NODE_C])
    net.apply(roster(NODE_C, 2, "carol"), lc)       # newer direct
    assert net.vouched_by(lb) == [NODE_B]
    assert net.vouched_by(lc) == [NODE_C]


def test_snapshot_includes_gone_rosters() -> None:
    net = NetworkRoster(ME)
    net.apply(roster(NODE_B, 1, "bob"), None)
    net.apply(roster(NODE_C, 1, "carol"), None)
    net.mark_gone(NODE_C)
    snap = {r.node: r for r in net.snapshot()}
    assert snap[NODE_B].users and snap[NODE_C].gone


# -- convergence in any order -------------------------------------------------------------------

_versions = st.lists(st.tuples(st.integers(0, 6), st.booleans(),
                               st.sets(st.sampled_from(["a", "b", "c", "d"]))),
                     min_size=1, max_size=8)


@given(_versions, st.randoms(use_true_random=False))
def test_any_delivery_order_converges_to_the_newest(
        items: list[tuple[int, bool, set[str]]], rnd: Any) -> None:
    # Rosters of one version are identical (a node publishes one roster per version);
    # a gone copy of a version carries no users.
    by_ver = {ver: sorted(nicks) for ver, _g, nicks in items}
    rosters = [roster(NODE_B, ver, *([] if gone else by_ver[ver]), gone=gone)
               for ver, gone, _n in items]
    newest = max(rosters, key=lambda r: (r.ver, r.gone))
    orders = [rosters, list(reversed(rosters))]
    shuffled = list(rosters)
    rnd.shuffle(shuffled)
    orders.append(shuffled)
    for order in orders:
        net = NetworkRoster(ME)
        shown: set[str] = set()
        for r in itertools.chain(order, order):       # and every one twice
            for c in net.apply(r, None) or []:
                (shown.add if c.kind == "join" else shown.discard)(c.user.nick)
        assert net.get(NODE_B) == newest
        # The join/leave notices add up to the users actually listed.
        assert shown == {u.nick for u in net.users()}


def test_a_direct_roster_revives_a_node_marked_gone_at_the_same_version() -> None:
    """A link that dropped and came back (no restart, no user change) resends the same version:
    relayed it is old news, but straight from the node it proves the node is back."""
    net = NetworkRoster(ME)
    net.apply(roster(NODE_B, 5, "bob"), "link-1")
    net.mark_gone(NODE_B)
    assert net.apply(roster(NODE_B, 5, "bob"), "relay") is None
    assert kinds(net.apply(roster(NODE_B, 5, "bob"), "link-2", direct=True)) == {("join", "bob")}
    assert net.vouched_by("link-2") == [NODE_B]
    assert net.apply(roster(NODE_B, 5, "bob"), "link-2", direct=True) is None  # not twice
    assert net.apply(roster(NODE_B, 4, "old"), "link-2", direct=True) is None  # never older
    net.mark_gone(NODE_B)
    assert net.apply(roster(NODE_B, 5, gone=True), "link-2", direct=True) is None


def test_resolve_recipient_needs_one_user_and_lists_the_candidates() -> None:
    def user(nick: str, node: str) -> User:
        return User(nick=nick, host="10.0.0.9", node=node, local=False, since=0.0,
                    room="lobby", via="tcp")

    n1, n2 = "1a2b3c4d00000000", "9f8e7d6c00000000"
    users = [user("Bob", n1), user("bob", n2), user("carol", n2), user("x@y", n1)]
    hosts = {n1: "host1", n2: "host2"}
    assert resolve_recipient("CAROL", users, hosts).node == n2
    assert resolve_recipient("bob@host2", users, hosts).node == n2
    assert resolve_recipient("bob@HOST1", users, hosts).node == n1
    assert resolve_recipient("bob@9f8e", users, hosts).node == n2
    assert resolve_recipient("x@y", users, hosts).nick == "x@y"  # a whole nick wins
    with pytest.raises(AmbiguousUser) as amb:
        resolve_recipient("bob", users, hosts)
    assert "Bob@1a2b3c4d (on host1)" in str(amb.value)
    assert "bob@9f8e7d6c (on host2)" in str(amb.value)
    for missing in ("dave", "bob@host3", "bob@9f8", "carol@host1"):  # 3 digits: too short
        with pytest.raises(NoSuchUser, match="no such user: "):
            resolve_recipient(missing, users, hosts)


# -- bounds and who may speak for a node (issue 13, case 8) -------------------------------------

def test_rosters_together_hold_at_most_max_network_users() -> None:
    net = NetworkRoster(ME)
    per = MAX_ROSTER_USERS
    full = MAX_NETWORK_USERS // per
    nodes = [f"{i + 1:016x}" for i in range(full + 1)]
    for node in nodes[:full]:
        assert net.apply(roster(node, 1, *(f"u{i}" for i in range(per))), "link") is not None
    with pytest.raises(ValidationError) as exc:
        net.apply(roster(nodes[full], 1, "one too many"), "link")
    assert exc.value.code == "roster-limit"
    assert len(net.users()) == MAX_NETWORK_USERS
    # Shrinking is always allowed, and makes room.
    assert net.apply(roster(nodes[0], 2, "few"), "link") is not None
    assert net.apply(roster(nodes[full], 1, "now fits"), "link") is not None


def test_a_nodes_own_roster_overrides_a_relayed_one_whatever_its_version() -> None:
    net = NetworkRoster(ME)
    relay, direct = object(), object()
    net.apply(roster(NODE_B, 2**62), relay)  # forged: "B has nobody", far ahead
    changes = net.apply(roster(NODE_B, 5, "bob"), direct, direct=True)
    assert kinds(changes) == {("join", "bob")}
    net.claim(NODE_B, direct)
    # From then on B's own link decides by version as usual.
    assert net.apply(roster(NODE_B, 4, "old"), direct, direct=True) is None
    assert kinds(net.apply(roster(NODE_B, 6, "bob", "ann"), direct, direct=True)) == {
        ("join", "ann")}


def _notice(kind: str, nick: str, room: str = "lobby", reason: str | None = None) -> Presence:
    return Presence(kind=kind, nick=nick, host="h", node=NODE_B, room=room,  # type: ignore[arg-type]
                    ts=1.0, reason=reason)


def test_held_notices_are_summed_up_per_room_kind_and_reason() -> None:
    held = HeldNotices(0.5)
    assert not held and held.due is None
    held.hold(_notice("join", "a"), "sub-a", now=10.0)
    assert held.due == 10.5
    for nick in "bcd":
        held.hold(_notice("join", nick), f"sub-{nick}", now=10.2)
    held.hold(_notice("join", "x", room="other"), "sub-x", now=10.3)
    held.hold(_notice("leave", "e", reason="too slow"), None, now=10.3, people=37)
    held.hold(_notice("leave", "f", reason="quit"), "sub-f", now=10.4)
    assert held.due == 10.5  # the first notice sets when all go
    out = held.take()
    assert not held and held.due is None and held.take() == []
    got = {(p.kind, p.room, p.nick, p.others, p.reason): source for p, source in out}
    assert got == {
        ("join", "lobby", "a", 3, None): None,           # a and 3 others
        ("join", "other", "x", 0, None): "sub-x",        # alone: as it came, with its source
        ("leave", "lobby", "e", 36, "too slow"): None,    # one notice for 37 people
        ("leave", "lobby", "f", 0, "quit"): "sub-f",
    }
# -- the X25519 key record in a signed roster (issue 14 item 3) -------------------------------

def test_a_signed_roster_carries_its_nodes_key_record_and_only_its_own() -> None:
    ann, bea = SigningKey(b"\x0a" * 32), SigningKey(b"\x0b" * 32)
    record = DhRecord.make(ann, DhKey.derive(ann, 1), 1)

    def frame(r: NodeRoster, key: SigningKey = ann) -> dict[str, Any]:
        return {"type": "roster", **(sign_roster(key, r).signed.to_wire())}  # type: ignore[union-attr]

    base = NodeRoster(node=ann.node, ver=3, name="ann's", host="h", users=())
    got = parse_signed_roster(frame(NodeRoster(**{**_fields(base), "dh": record})))
    assert got.dh == record and got.dh is not None and got.dh.key == record.key
    assert parse_signed_roster(frame(base)).dh is None  # none published: none held
    # another node's record inside ann's roster (signed by ann): refused
    other = DhRecord.make(bea, DhKey.derive(bea, 1), 1)
    with pytest.raises(ValidationError) as err:
        parse_signed_roster(frame(NodeRoster(**{**_fields(base), "dh": other})))
    assert err.value.code == "bad-roster"
    # a record whose own signature is broken, although ann signed the roster around it
    doc = base.to_dict()
    doc["dh"] = {"b": record.body.decode(), "s": "A" * 86}
    body = json.dumps(doc, separators=(",", ":"))
    forged = {"b": body, "s": b64encode(ann.sign(ROSTER_DOMAIN + body.encode())),
              "k": ann.public.text}
    with pytest.raises(ValidationError, match="not signed by its key"):
        parse_signed_roster(forged)
    # a node known only by its roster or record is reachable as nick@node-prefix
    assert resolve_mailbox(f"carol@{ann.node[:8]}", {ann.node: "", bea.node: "h2"}) == (
        "carol", ann.node)
    assert resolve_mailbox("carol@h2", {ann.node: "", bea.node: "h2"}) == ("carol", bea.node)
    assert resolve_mailbox("carol@nowhere", {ann.node: ""}) is None
    assert resolve_mailbox("carol", {ann.node: ""}) is None
    with pytest.raises(AmbiguousUser):
        resolve_mailbox("carol@h", {ann.node: "h", bea.node: "h"})


def _fields(r: NodeRoster) -> dict[str, Any]:
    return {f: getattr(r, f) for f in ("node", "ver", "name", "host", "users", "gone", "links")}
