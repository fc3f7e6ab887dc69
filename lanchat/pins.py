"""Pinned keys, trust on first use: ``lanchat connect``'s known hubs and the daemon's peers.

SSH's ``known_hosts``, for lanchat's node keys.  The first time a name (a hub's address, a
peer's address or mDNS instance) is met, its key is pinned and its fingerprint shown; after
that the same name must present the same key, and a different one is refused loudly until
someone who knows why it changed accepts it.  A node id already names its key
(``PublicKey.for_node``), so where the id is known beforehand (mDNS TXT ``id``, ``--peer``
with an id) no pin is needed to authenticate; the pin is what catches "this *name* now has
another identity": a reinstalled hub, a state directory lost, or someone impersonating it.

File format (``known_hubs`` and ``known_peers`` alike), ASCII, one pin a line::

    # comments and blank lines are kept out of the data and may appear anywhere
    NAME NODE-ID KEY

``NAME`` is a pin name (:func:`check_name`: ``host:port``, ``[v6 address]:port``,
``mdns:<instance>``), ``NODE-ID`` the 32 hex digits of the key's node id (redundant on
purpose: a person can grep for what ``lanchat peers`` shows, and a line whose id and key
disagree is corrupt), ``KEY`` the 43 base64url characters of the Ed25519 key.  Fields are
separated by one space; lines end with ``\\n``.  Parsing is strict (:meth:`Pins.parse`): a
file that breaks any rule is refused with its line number, never partly used, because a pin
file that is quietly misread is a pin that is quietly not checked.

Daemon peers (issue 14, item 4): :class:`PeerPins` decides, under the configured
:class:`TrustPolicy`, whether a peer may link, and holds key changes until ``lanchat trust
NODE``.

Pure: no I/O (:mod:`lanchat.pinfile` reads and writes the files).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from lanchat.errors import LanchatError, ValidationError
from lanchat.feed import PublicKey, fingerprint
from lanchat.limits import MAX_KNOWN_PINS, MAX_PIN_NAME_CHARS

__all__ = [
    "HUBS_HEADER",
    "PEERS_HEADER",
    "HubDecision",
    "PeerDecision",
    "PeerPins",
    "PeerVerdict",
    "PinCheck",
    "PinFileError",
    "PinStatus",
    "Pins",
    "TrustPolicy",
    "accept_key_command",
    "changed_hub_message",
    "check_name",
    "decide_hub",
    "hub_name",
    "new_hub_message",
]

HUBS_HEADER = ("# lanchat known hubs: NAME NODE-ID KEY, one hub a line; written by "
               "`lanchat connect` (see lanchat(1))")
PEERS_HEADER = ("# lanchat known peers: NAME NODE-ID KEY, one peer a line; written by lanchatd "
                "(see lanchatd(8), `lanchat trust`)")

#: A pin name: printable ASCII without white space or ``#``; brackets only around an
#: IPv6 address.  Kept narrow so a name can never break a line or hide in a log.
_NAME_RE = re.compile(r"[A-Za-z0-9._~%:@/+=\[\]-]+")
_NODE_RE = re.compile(r"[0-9a-f]{32}")
#: A host name, IPv4 address or IPv6 address (with its zone after ``%``).
_HOST_RE = re.compile(r"[A-Za-z0-9._%:-]+")


class PinFileError(LanchatError):
    """A pin file (or a pin name) is not well-formed; the message says where and why."""

    code = "pin-file"


def check_name(name: object) -> str:
    """Return ``name`` if it can be a pin name, else raise :class:`ValidationError`."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_PIN_NAME_CHARS:
        raise ValidationError(f"a pin name is 1-{MAX_PIN_NAME_CHARS} characters",
                              code="bad-pin-name")
    if not _NAME_RE.fullmatch(name):
        raise ValidationError(f"pin name {name!r} has a character other than letters, digits "
                              "and ._~%:@/+=[]-", code="bad-pin-name")
    return name


def hub_name(host: str, port: int) -> str:
    """The pin name of the hub at ``host`` port ``port``: ``host:port``, lower case, an
    IPv6 address in brackets (``[fe80::1%eth0]:7000``), no trailing dot."""
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ValidationError(f"port {port!r} is not 1-65535", code="bad-pin-name")
    host = host.lower().removesuffix(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not _HOST_RE.fullmatch(host):
        raise ValidationError(f"host {host!r} cannot be pinned", code="bad-pin-name")
    return check_name(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")


class PinStatus(enum.Enum):
    """What a presented key is, for a name."""

    #: The name was not pinned: pin it, show the fingerprint.
    NEW = "new"
    #: The name is pinned to this key.
    MATCH = "match"
    #: The name is pinned to another key: refuse (loudly) unless accepted.
    CHANGED = "changed"


@dataclass(frozen=True, slots=True)
class PinCheck:
    """The result of :meth:`Pins.check`: the key presented, and the pinned one if any."""

    name: str
    status: PinStatus
    key: PublicKey
    #: The pinned key (None when the name is new).
    old: PublicKey | None = None


class Pins:
    """An ordered, bounded map of pin name to key: one pin file's content.  Immutable:
    :meth:`pinned` and :meth:`without` return new maps."""

    __slots__ = ("_map",)

    def __init__(self, pins: Mapping[str, PublicKey] | None = None) -> None:
        items = dict(pins or {})
        if len(items) > MAX_KNOWN_PINS:
            raise PinFileError(f"more than {MAX_KNOWN_PINS} pins")
        for name in items:
            check_name(name)
        self._map = items

    @classmethod
    def parse(cls, data: bytes, source: str = "pin file") -> Pins:
        """The pins in a file's bytes; raises :class:`PinFileError` naming the line."""
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise PinFileError(f"{source}: not ASCII") from None
        if text and not text.endswith("\n"):
            raise PinFileError(f"{source}: the last line does not end with a newline "
                               "(was the file cut short?)")
        pins: dict[str, PublicKey] = {}
        for number, line in enumerate(text.split("\n")[:-1], 1):
            if not line or line.startswith("#"):
                continue
            where = f"{source}, line {number}"
            fields = line.split(" ")
            if len(fields) != 3:
                raise PinFileError(f"{where}: a pin is NAME NODE-ID KEY, one space apart")
            name, node, key_text = fields
            try:
                check_name(name)
            except ValidationError as exc:
                raise PinFileError(f"{where}: {exc}") from None
            if name in pins:
                raise PinFileError(f"{where}: {name} is pinned twice")
            if not _NODE_RE.fullmatch(node):
                raise PinFileError(f"{where}: the node id is 32 lowercase hex digits")
            try:
                key = PublicKey.for_node(node, PublicKey.from_text(key_text).raw)
            except ValidationError as exc:
                raise PinFileError(f"{where}: {exc}") from None
            if len(pins) == MAX_KNOWN_PINS:
                raise PinFileError(f"{where}: more than {MAX_KNOWN_PINS} pins")
            pins[name] = key
        return cls(pins)

    def format(self, header: str) -> bytes:
        """The file's bytes: ``header`` (a ``#`` comment line), then one line per pin."""
        if not header.startswith("#") or "\n" in header or not header.isascii():
            raise ValueError("the header is one ASCII comment line")
        lines = [header] + [f"{name} {key.node} {key.text}" for name, key in self._map.items()]
        return ("\n".join(lines) + "\n").encode("ascii")

    def get(self, name: str) -> PublicKey | None:
        return self._map.get(name)

    def check(self, name: str, key: PublicKey) -> PinCheck:
        """Is ``key`` the one pinned for ``name``?  (Changes nothing.)"""
        old = self._map.get(check_name(name))
        if old is None:
            return PinCheck(name, PinStatus.NEW, key)
        return PinCheck(name, PinStatus.MATCH if old == key else PinStatus.CHANGED, key, old)

    def pinned(self, name: str, key: PublicKey) -> Pins:
        """A copy with ``name`` pinned to ``key`` (replacing an old pin of ``name``)."""
        return Pins({**self._map, check_name(name): key})

    def without(self, name: str) -> Pins:
        return Pins({n: k for n, k in self._map.items() if n != name})

    @property
    def full(self) -> bool:
        return len(self._map) >= MAX_KNOWN_PINS

    def names_of(self, node: str) -> list[str]:
        """The names pinned to node ``node``'s key."""
        return [name for name, key in self._map.items() if key.node == node]

    def __len__(self) -> int:
        return len(self._map)

    def __iter__(self) -> Iterator[tuple[str, PublicKey]]:
        return iter(list(self._map.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pins) and other._map == self._map

    def __hash__(self) -> int:
        return hash(tuple(self._map.items()))


# -- lanchat connect's messages -----------------------------------------------------------

def accept_key_command(name: str, key: PublicKey) -> str:
    """The command that accepts ``key`` for hub ``name``: it names the new node id, so the
    acceptance holds for that key only (a key that changes again is refused again)."""
    return f"lanchat connect --accept-key {key.node} {name}"


def new_hub_message(check: PinCheck, path: str) -> str:
    """What ``lanchat connect`` prints at first contact (then it pins the key)."""
    return (f"first contact with hub {check.name}: node {check.key.node}\n"
            f"  fingerprint {fingerprint(check.key)}\n"
            f"Its key is now pinned in {path}. To be sure you reached the right hub, compare "
            "this fingerprint with `lanchat status` on the hub's machine.")


def changed_hub_message(check: PinCheck, path: str) -> str:
    """SSH's warning, for a known hub that presents another key.  ``lanchat connect``
    prints it and exits non-zero without sending anything."""
    if check.status is not PinStatus.CHANGED or check.old is None:
        raise ValueError("not a changed key")
    rule = "@" * 64
    return (f"{rule}\n@    WARNING: THE KEY OF HUB {check.name} HAS CHANGED!\n{rule}\n"
            "Someone may be impersonating this hub (a man in the middle), or the hub was "
            "reinstalled,\nlost its state directory or was moved to another machine.\n"
            f"  pinned:    node {check.old.node}  fingerprint {fingerprint(check.old)}\n"
            f"  presented: node {check.key.node}  fingerprint {fingerprint(check.key)}\n"
            f"The pin is in {path}. Not connected: nothing was sent.\n"
            "If you know why the key changed, compare the presented fingerprint with "
            "`lanchat status`\non the hub's machine, then accept the new key with:\n"
            f"  {accept_key_command(check.name, check.key)}")


@dataclass(frozen=True, slots=True)
class HubDecision:
    """``lanchat connect``'s whole decision on the key a hub presented."""

    check: PinCheck
    #: Go on (a match, a new hub, a change the user accepted); else refuse, sending nothing.
    proceed: bool
    #: The pins to save, or None when they stay as they are.
    pins: Pins | None
    #: What to print (to stderr), or None.
    message: str | None


def decide_hub(pins: Pins, name: str, key: PublicKey, path: str, *,
               accept: str | None = None) -> HubDecision:
    """Decide on hub ``name`` presenting ``key``, the pins of ``path`` being ``pins``.

    ``accept`` is ``--accept-key NODE``: a changed key is accepted only if it is that
    node's, and with it any other key is refused, even at first contact (the user said
    which hub they expect).  Run it inside ``pinfile.update`` so that two clients at once
    decide on the same file.
    """
    check = pins.check(name, key)
    if accept is not None and accept != key.node:
        text = (f"hub {name} presented node {key.node} (fingerprint {fingerprint(key)}), "
                f"not node {accept} as --accept-key says. Not connected: nothing was sent.")
        if check.status is PinStatus.CHANGED:
            text = changed_hub_message(check, path) + "\n" + text
        return HubDecision(check, False, None, text)
    if check.status is PinStatus.MATCH:
        return HubDecision(check, True, None, None)
    if check.status is PinStatus.NEW:
        return HubDecision(check, True, pins.pinned(name, key), new_hub_message(check, path))
    if accept is None:
        return HubDecision(check, False, None, changed_hub_message(check, path))
    assert check.old is not None
    return HubDecision(check, True, pins.pinned(name, key),
                       f"hub {name}: the new key is accepted as you asked and pinned in "
                       f"{path}: node {key.node}, fingerprint {fingerprint(key)} (it was node "
                       f"{check.old.node}, fingerprint {fingerprint(check.old)})")


# -- the daemon's peers -------------------------------------------------------------------

class TrustPolicy(enum.Enum):
    """The config key ``trust``: what a daemon does with a peer's key it has not pinned."""

    #: A new name is pinned at first contact; a changed key is held (logged, ``key
    #: changed`` in ``lanchat peers``) until ``lanchat trust NODE``.  The default.
    FIRST_USE = "first-use"
    #: As first-use, but a changed key is accepted at once (logged loudly, re-pinned): for
    #: a lab where machines are reinstalled all the time and nobody runs ``lanchat trust``.
    ALWAYS = "always"

    @classmethod
    def parse(cls, value: object) -> TrustPolicy:
        for policy in cls:
            if value == policy.value:
                return policy
        raise ValidationError(f"trust must be one of {[p.value for p in cls]}, not {value!r}",
                              code="bad-trust")


class PeerVerdict(enum.Enum):
    NEW = "new"
    KNOWN = "known"
    #: Refused: waits for ``lanchat trust NODE``.
    CHANGED = "key changed"
    #: Accepted under ``trust = "always"``.
    CHANGED_ACCEPTED = "key changed, accepted"


@dataclass(frozen=True, slots=True)
class PeerDecision:
    """What to do with a peer that proved it holds ``key`` and is known as ``name``."""

    verdict: PeerVerdict
    name: str
    key: PublicKey
    old: PublicKey | None = None
    #: True when the pins changed: the caller writes the file.
    save: bool = False

    @property
    def link(self) -> bool:
        return self.verdict is not PeerVerdict.CHANGED

    def log_line(self) -> str | None:
        """The one log line this decision deserves (None for a known peer)."""
        if self.verdict is PeerVerdict.KNOWN:
            return None
        key = f"node {self.key.node} (fingerprint {fingerprint(self.key)})"
        if self.verdict is PeerVerdict.NEW:
            kept = "pinned" if self.save else "not pinned: the pin file is full"
            return f"peer {self.name} is new: {key}, {kept}"
        assert self.old is not None
        was = f"node {self.old.node} (fingerprint {fingerprint(self.old)})"
        if self.verdict is PeerVerdict.CHANGED:
            return (f"peer {self.name} presented another key: {key}, pinned was {was}; not "
                    f"linked. If the change is expected: lanchat trust {self.key.node}")
        return (f"peer {self.name} presented another key: {key}, pinned was {was}; accepted "
                "and pinned because trust = \"always\"")


class PeerPins:
    """The daemon's pinned peers and the key changes that wait for ``lanchat trust``.

    Not thread-safe: one thread owns it (the link manager's); the caller saves
    :attr:`pins` whenever a decision says ``save``.  Held changes live in memory only:
    after a restart the peer's next link attempt holds it again.
    """

    def __init__(self, pins: Pins, policy: TrustPolicy = TrustPolicy.FIRST_USE) -> None:
        self.pins = pins
        self.policy = policy
        #: name -> the new key it presented (at most one per pinned name: bounded).
        self._held: dict[str, PublicKey] = {}

    def see(self, name: str, key: PublicKey) -> PeerDecision:
        """Decide on a peer known as ``name`` that proved it holds ``key`` (over TLS)."""
        check = self.pins.check(name, key)
        if check.status is PinStatus.MATCH:
            self._held.pop(name, None)  # the old key is back: nothing waits any more
            return PeerDecision(PeerVerdict.KNOWN, name, key)
        if check.status is PinStatus.NEW:
            if self.pins.full:
                return PeerDecision(PeerVerdict.NEW, name, key)
            self.pins = self.pins.pinned(name, key)
            return PeerDecision(PeerVerdict.NEW, name, key, save=True)
        if self.policy is TrustPolicy.ALWAYS:
            self.pins = self.pins.pinned(name, key)
            self._held.pop(name, None)
            return PeerDecision(PeerVerdict.CHANGED_ACCEPTED, name, key, check.old, save=True)
        self._held[name] = key
        return PeerDecision(PeerVerdict.CHANGED, name, key, check.old)

    def held(self) -> dict[str, tuple[PublicKey, PublicKey]]:
        """name -> (pinned key, presented key) of each change waiting: ``key changed``."""
        out: dict[str, tuple[PublicKey, PublicKey]] = {}
        for name, new in self._held.items():
            old = self.pins.get(name)
            if old is not None:
                out[name] = (old, new)
        return out

    def trust(self, node: str) -> list[str]:
        """``lanchat trust NODE``: pin node ``node``'s key for every name where it waits.

        Returns those names (empty: no change waits for that node; say so).  The caller
        saves the pins and lets those peers link again.
        """
        names = [name for name, key in self._held.items() if key.node == node]
        for name in names:
            self.pins = self.pins.pinned(name, self._held.pop(name))
        return names
