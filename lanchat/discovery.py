"""mDNS/DNS-SD: advertise this hub and find the others.  The only module that imports zeroconf.

The contract (DESIGN.md, "mDNS/DNS-SD"): service type ``_lanchat._tcp.local.``, instance name =
the node's display name, TXT ``txtvers=1``, ``v`` (protocol version), ``id`` (node id), ``udp``
(UDP port, when enabled) and ``auth=1`` when the hub needs a shared secret.

How it runs (conventions.md §1, python-zeroconf 0.154): one threaded ``Zeroconf``
(``use_asyncio=False``) on an explicit list of interfaces, one registered service and one
``ServiceBrowser``.  The browser's handler runs on zeroconf's browser thread; an exception there
ends that thread and silently loses every later event, and blocking there delays every other
event, so the handler only records ``name -> latest change`` in a bounded, coalescing table and
wakes our own worker thread ("lanchat-discovery").  The worker resolves names (cache first, then
one bounded network request), keeps the peer table, calls ``on_found``/``on_lost``, performs
``update()`` requests and polls the interface set.  It is the only thread that touches the
registration after ``start()``, so no lock is ever held across zeroconf's blocking calls.

What discovery does *not* tell you: that a peer crashed.  python-zeroconf clamps received PTR
TTLs to at least 1125 s, so a peer that vanishes without a goodbye stays "found" for 19-75
minutes (conventions.md §1.7).  ``on_lost`` means "said goodbye"; liveness comes from links.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import logging
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Literal, TypeVar

import ifaddr
from zeroconf import Error as ZeroconfError
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from lanchat.errors import ClosedError, ValidationError
from lanchat.model import validate_node

log = logging.getLogger(__name__)

#: DNS-SD service type of a lanchat hub (DESIGN.md); the trailing dot is required.
SERVICE_TYPE = "_lanchat._tcp.local."

#: Version of the daemon protocol, advertised as TXT ``v``.
PROTOCOL_VERSION = 1

#: Version of the TXT layout itself (RFC 6763 §6.7), advertised first as ``txtvers``.
TXT_VERSION = 1

#: An instance name is one DNS label: at most 63 bytes of UTF-8 (RFC 6763 §4.1.1).
MAX_LABEL_BYTES = 63

#: Bytes kept free for python-zeroconf's conflict rename ("-2" … "-999"): it appends the
#: suffix and re-validates, so a label already at 63 bytes would fail to register on conflict.
RENAME_RESERVE_BYTES = 4

#: Longest TXT item ("key=value"): its length is one byte on the wire (RFC 6763 §6.1).
MAX_TXT_ITEM_BYTES = 255

#: Seconds one resolve may wait for the network after a cache miss.
RESOLVE_TIMEOUT_S = 3.0

#: Seconds between checks of the interface set (DHCP, Wi-Fi, cable).  Cheap: one
#: getifaddrs() and one ioctl per interface; no netlink listener needed (conventions.md §1.5).
INTERFACE_POLL_S = 30.0

#: Most peers remembered at once: the peer table is fed by the network, so it is bounded.
MAX_PEERS = 1024

#: Most service names waiting for the worker.  Changes for the same name coalesce, so this is
#: only reached by a flood of distinct names; the excess is dropped (and logged).
MAX_PENDING = 1024

#: Seconds close() waits for the worker (which may be inside one resolve).
CLOSE_JOIN_TIMEOUT_S = RESOLVE_TIMEOUT_S + 5.0

#: Seconds update() waits for the worker to apply it (a rename probes for ~2 s).
UPDATE_TIMEOUT_S = 15.0

#: Interface-name prefixes left out of the automatic choice: containers, VMs, VPNs, bridges.
EXCLUDED_PREFIXES = ("lo", "docker", "br-", "veth", "virbr", "tun", "tap", "vnet", "wg")

IpVersion = Literal["v4", "v6", "all"]
_T = TypeVar("_T")

_IP_VERSIONS: dict[str, IPVersion] = {
    "v4": IPVersion.V4Only,
    "v6": IPVersion.V6Only,
    "all": IPVersion.All,
}

# <linux/if.h> and <linux/sockios.h>: the interface flags ioctl and the bits we need.
_SIOCGIFFLAGS = 0x8913
_IFF_UP = 0x1
_IFF_LOOPBACK = 0x8
_IFF_RUNNING = 0x40       # operational: up *and* has carrier
_IFF_MULTICAST = 0x1000
_LINK_LOCAL_V4 = ipaddress.ip_network("169.254.0.0/16")


@dataclass(frozen=True)
class PeerAd:
    """One lanchat hub as advertised on the LAN, as resolved by us.

    ``node`` identifies the daemon (it survives renames); ``name`` is the instance name it
    actually holds (python-zeroconf renames "alice" to "alice-2" on a conflict) and
    ``service_name`` the full mDNS name.  ``addresses`` may hold IPv6 link-local addresses with a
    ``%scope`` suffix, ready for ``socket.getaddrinfo``.
    """

    node: str
    name: str
    addresses: tuple[str, ...]
    port: int
    udp_port: int | None
    version: int
    auth: bool
    service_name: str


# -- pure helpers: names and TXT ----------------------------------------------------------------

def instance_label(name: str) -> str:
    """The DNS-SD instance label we advertise for display name ``name``.

    A ``.`` would silently become a label boundary on the wire, so it becomes ``-``; control
    characters become spaces; the result is trimmed and cut to ``MAX_LABEL_BYTES -
    RENAME_RESERVE_BYTES`` bytes of UTF-8 on a character boundary.  Never empty ("lanchat").
    """
    cleaned = "".join(
        "-" if ch == "." else " " if (ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0) else ch
        for ch in name
    ).strip()
    limit = MAX_LABEL_BYTES - RENAME_RESERVE_BYTES
    raw = cleaned.encode("utf-8")
    if len(raw) > limit:
        # Cut the bytes, then drop a partial trailing character (errors="ignore" only ever
        # removes the incomplete sequence at the cut, since the input was valid UTF-8).
        cleaned = raw[:limit].decode("utf-8", errors="ignore").rstrip()
    return cleaned or "lanchat"


def label_of(service_name: str) -> str:
    """The instance label of a full service name (``"alice-2._lanchat._tcp.local."`` ->
    ``"alice-2"``); the name itself if it is not of our type."""
    suffix = "." + SERVICE_TYPE
    if service_name.lower().endswith(suffix.lower()):
        return service_name[: -len(suffix)]
    return service_name


def build_txt(*, node_id: str, udp_port: int | None, auth: bool = False) -> dict[str, str]:
    """The TXT record, ``txtvers`` first (RFC 6763 §6.7), each item within 255 bytes.

    Raises ValueError if an item would not fit (it cannot with a valid node id; the check keeps
    python-zeroconf's own ``ValueError: bytes must be in range(0, 256)`` from surfacing later).
    """
    txt = {"txtvers": str(TXT_VERSION), "v": str(PROTOCOL_VERSION), "id": node_id}
    if udp_port is not None:
        txt["udp"] = str(udp_port)
    if auth:
        txt["auth"] = "1"
    for key, value in txt.items():
        size = len(key.encode()) + 1 + len(value.encode("utf-8"))
        if size > MAX_TXT_ITEM_BYTES:
            raise ValueError(f"TXT item {key!r} is {size} bytes, over {MAX_TXT_ITEM_BYTES}")
    return txt


def _port_or_none(value: str | None) -> int | None:
    if value is None or not value.isdigit():
        return None
    port = int(value)
    return port if 0 < port < 65536 else None


def peer_from_txt(service_name: str, props: Mapping[str, str | None],
                  addresses: Sequence[str], port: int | None) -> PeerAd | None:
    """Build a PeerAd from what a resolve returned, or None if it is not a usable lanchat hub
    (no valid ``id``, no numeric ``v``, no address or no port).  Keys are case-insensitive
    (RFC 6763 §6.4); the first occurrence wins, which the decoded dict already did."""
    lowered: dict[str, str | None] = {}
    for key, value in props.items():
        lowered.setdefault(key.lower(), value)
    try:
        node = validate_node(lowered.get("id"))
    except ValidationError:
        return None
    version_s = lowered.get("v")
    if version_s is None or not version_s.isdigit() or len(version_s) > 6:
        return None
    if not addresses or port is None or not 0 < port < 65536:
        return None
    auth = lowered.get("auth", "0") not in ("0", "")
    return PeerAd(node=node, name=label_of(service_name), addresses=tuple(addresses),
                  port=port, udp_port=_port_or_none(lowered.get("udp")),
                  version=int(version_s), auth=auth, service_name=service_name)


# -- interfaces ---------------------------------------------------------------------------------

def _if_flags(name: str) -> int | None:
    """The interface's flags (SIOCGIFFLAGS) in our network namespace, None if it is gone."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            req = struct.pack("16sH14x", name.encode()[:15], 0)
            res = fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, req)
    except OSError:
        return None
    flags: int = struct.unpack("16sH14x", res)[1]
    return flags


@dataclass(frozen=True)
class Interfaces:
    """What zeroconf should use and what we advertise, from one look at the interfaces.

    ``zc`` is zeroconf's ``interfaces=`` list (IPv4 addresses and IPv6 interface indexes);
    ``addresses`` are the addresses put in our A/AAAA records.
    """

    zc: tuple[str | int, ...]
    addresses: tuple[str, ...]


def find_interfaces(wanted: Sequence[str] | None, ip_version: IpVersion) -> Interfaces:
    """Choose interfaces and addresses.  ``wanted`` names interfaces (``eth0``) or addresses;
    None or empty means automatic: every up, running, multicast-capable interface that is not
    loopback nor a container/VM/VPN interface (EXCLUDED_PREFIXES), IPv4 without 169.254/16, and
    with v6/all also its global and link-local IPv6 addresses.  An interface without carrier is
    left out, so the caller can notice it come back.  A wanted interface that does not exist
    (yet) is simply absent from the result.
    """
    want_v4 = ip_version in ("v4", "all")
    want_v6 = ip_version in ("v6", "all")
    wanted = [w.strip() for w in (wanted or []) if w.strip()]
    want_addrs: set[str] = set()
    want_names: set[str] = set()
    for w in wanted:
        try:
            want_addrs.add(str(ipaddress.ip_address(w.split("%", 1)[0])))
        except ValueError:
            want_names.add(w)
    zc: list[str | int] = []
    addresses: list[str] = []
    for adapter in ifaddr.get_adapters():
        name = adapter.name
        flags = _if_flags(name)
        if flags is None or flags & _IFF_LOOPBACK:
            continue
        if not (flags & _IFF_UP and flags & _IFF_RUNNING and flags & _IFF_MULTICAST):
            continue
        by_name = name in want_names
        if not wanted and name.startswith(EXCLUDED_PREFIXES):
            continue
        v6_here = False
        for ip in adapter.ips:
            if isinstance(ip.ip, tuple):            # IPv6: (address, flowinfo, scope_id)
                addr6 = ipaddress.IPv6Address(ip.ip[0].split("%", 1)[0])
                if not want_v6 or addr6.is_loopback or addr6.is_multicast:
                    continue
                if wanted and not by_name and str(addr6) not in want_addrs:
                    continue
                addresses.append(str(addr6))
                v6_here = True
            else:
                addr4 = ipaddress.IPv4Address(ip.ip)
                if not want_v4 or addr4.is_loopback or (not wanted and addr4 in _LINK_LOCAL_V4):
                    continue
                if wanted and not by_name and str(addr4) not in want_addrs:
                    continue
                zc.append(str(addr4))
                addresses.append(str(addr4))
        if v6_here and adapter.index is not None:
            # IPV6_JOIN_GROUP wants an interface index, once per interface.
            zc.append(adapter.index)
    # IPv4 first: some mDNS implementations only use the first advertised address.
    addresses.sort(key=lambda a: ":" in a)
    return Interfaces(zc=tuple(zc), addresses=tuple(addresses))


# -- resolving ----------------------------------------------------------------------------------

def _resolve(zc: Zeroconf, name: str, timeout_s: float, version: IPVersion) -> PeerAd | None:
    """Resolve one service name: the cache first (no traffic), then one bounded request.

    Blocking; never call it on zeroconf's loop thread.  None if incomplete or not lanchat.
    """
    info = ServiceInfo(SERVICE_TYPE, name)
    if not info.load_from_cache(zc) and not info.request(zc, max(1.0, timeout_s * 1000.0)):
        return None
    addresses = info.parsed_scoped_addresses(version)
    return peer_from_txt(name, info.decoded_properties, addresses, info.port)


def _safe_call(fn: Callable[[_T], None], arg: _T, what: str) -> None:
    try:
        fn(arg)
    except Exception:
        # A consumer's bug must not end discovery for the whole daemon.
        log.exception("discovery %s callback raised", what)


# -- the long-lived advertiser/browser -----------------------------------------------------------

class Discovery:
    """Advertise this hub and report other hubs on the LAN.

    ``on_found(peer)`` is called when a hub is first resolved and again whenever its
    advertisement changes (address, port, name, TXT); ``on_lost(node_id)`` when it says goodbye
    (or its PTR record expires).  Peers are keyed by node id: a hub renamed "alice-2" is the same
    peer, our own advertisement is never reported, and two hubs with the same display name are
    two peers with different ``node`` and ``name``.  An ad with our own node id under another
    service name goes to ``on_twin`` (if given) instead: two daemons may hold one key.  The
    callbacks run on the worker thread "lanchat-discovery", one at a time; they must not
    block for long (hand off to a queue).
    An exception in a callback is logged and ignored.

    Thread-safety: ``start``, ``update`` and ``close`` may be called from any thread (not from
    zeroconf's threads).  After ``start`` only the worker thread touches zeroconf's registration
    and browser; ``update`` hands its work to the worker and waits.  ``close`` may also be
    called from a callback.
    """

    def __init__(
        self,
        *,
        node_id: str,
        name: str,
        port: int,
        udp_port: int | None = None,
        interfaces: list[str] | None = None,
        ip_version: IpVersion = "v4",
        on_found: Callable[[PeerAd], None],
        on_lost: Callable[[str], None],
        auth: bool = False,
        interface_poll_s: float = INTERFACE_POLL_S,
        on_twin: Callable[[PeerAd], None] | None = None,
    ) -> None:
        self.node_id = validate_node(node_id)
        if not 0 < port < 65536:
            raise ValueError(f"port must be 1-65535, not {port}")
        if udp_port is not None and not 0 < udp_port < 65536:
            raise ValueError(f"udp_port must be 1-65535, not {udp_port}")
        if ip_version not in _IP_VERSIONS:
            raise ValueError(f"ip_version must be one of {sorted(_IP_VERSIONS)}")
        self._name = name
        self._port = port
        self._udp_port = udp_port
        self._auth = auth
        self._txt = build_txt(node_id=node_id, udp_port=udp_port, auth=auth)
        self._wanted = list(interfaces or [])
        self._ip_version: IpVersion = ip_version
        self._zc_version = _IP_VERSIONS[ip_version]
        self._on_found = on_found
        self._on_lost = on_lost
        self._on_twin = on_twin
        self._poll_s = interface_poll_s
        self._server = f"lanchat-{node_id}.local."

        self._cv = threading.Condition()
        # guarded by _cv: the browser handler writes, the worker takes.
        self._pending: dict[str, ServiceStateChange] = {}
        self._commands: list[tuple[Callable[[], None], Future[None]]] = []
        self._stopping = False
        self._overflowing = False

        # Owned by the thread that calls start() until the worker starts, then by the worker
        # only, then by close() after the worker has been joined.
        self._zc: Zeroconf | None = None
        self._browser: ServiceBrowser | None = None
        self._info: ServiceInfo | None = None
        self._applied: Interfaces | None = None
        self._peers: dict[str, PeerAd] = {}          # node -> latest ad
        self._names: dict[str, str] = {}             # lowercased service name -> node

        self._thread: threading.Thread | None = None
        self._state_lock = threading.Lock()          # guards _started, _closed
        self._started = False
        self._closed = False
        self._worker_tears_down = False              # close() was called on the worker
        self._advertised = ""                        # str swap is atomic; read by any thread
        self._service_name = ""

    # -- public ---------------------------------------------------------------------------------

    @property
    def advertised_name(self) -> str:
        """The instance name we actually hold (e.g. "alice-2" after a conflict), "" before
        start()."""
        return self._advertised

    @property
    def service_name(self) -> str:
        """Our full mDNS service name (``"alice-2._lanchat._tcp.local."``)."""
        return self._service_name

    def start(self) -> None:
        """Open zeroconf, register our service (probing takes ~1.5-2 s and may rename us), start
        browsing and the worker thread.

        Raises OSError if the multicast sockets cannot be opened, ``zeroconf.Error`` on a
        registration failure; on any failure everything opened so far is closed again.  With no
        usable interface yet it still starts, and the interface poll brings the network in
        when it appears.
        """
        with self._state_lock:
            if self._started or self._closed:
                raise RuntimeError("Discovery.start() may only be called once")
            self._started = True
        found = find_interfaces(self._wanted, self._ip_version)
        if not found.zc:
            log.warning("mDNS: no usable network interface (wanted: %s); checking every %g s",
                        self._wanted or "auto", self._poll_s)
        try:
            self._zc = Zeroconf(interfaces=list(found.zc), ip_version=self._zc_version,
                                use_asyncio=False)
            self._info = self._make_info(instance_label(self._name), found.addresses, self._port)
            self._zc.register_service(self._info, allow_name_change=True)
            self._note_registered()
            self._applied = found
            self._browser = ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[self._on_change])
            self._thread = threading.Thread(target=self._run, name="lanchat-discovery")
            self._thread.start()
        except BaseException:
            self._teardown()
            raise
        log.info("mDNS: advertising %r on %s", self._service_name,
                 ", ".join(found.addresses) or "(no interface yet)")

    def update(self, name: str | None = None, port: int | None = None) -> None:
        """Re-announce our service, with a new display name and/or port if given.

        A port change keeps the registered name and host name and publishes new records.  A
        name change has to withdraw the old instance (goodbye) and probe for the new one, so
        peers see the node lost and found again.  With no arguments it simply re-announces.
        Blocks until done (a rename takes ~2 s).  Raises ClosedError after close() and
        TimeoutError if the worker does not get to it in UPDATE_TIMEOUT_S.
        """
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port must be 1-65535, not {port}")
        if threading.current_thread() is self._thread:
            self._do_update(name, port)           # called from a callback: we are the worker
            return
        fut: Future[None] = Future()
        with self._cv:
            if self._stopping or self._thread is None:
                raise ClosedError("discovery is not running")
            self._commands.append((lambda: self._do_update(name, port), fut))
            self._cv.notify()
        try:
            fut.result(UPDATE_TIMEOUT_S)
        except FutureTimeout as exc:
            raise TimeoutError("discovery update timed out") from exc

    def close(self) -> None:
        """Stop browsing, withdraw our service (goodbye packets, ~0.4 s), close zeroconf and
        stop the worker.  Idempotent; never raises.  Called from a callback, it returns at once
        and the worker finishes the job when the callback returns.
        """
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
        with self._cv:
            self._stopping = True
            commands, self._commands = self._commands, []
            self._cv.notify_all()
        for _fn, fut in commands:
            fut.set_exception(ClosedError("discovery closed"))
        thread = self._thread
        if thread is threading.current_thread():
            self._worker_tears_down = True          # done when the callback unwinds
            return
        if thread is not None:
            # The worker is at most inside one resolve (RESOLVE_TIMEOUT_S) or one update; it
            # must be gone before we touch the browser and the registration it owns.
            thread.join(CLOSE_JOIN_TIMEOUT_S)
            if thread.is_alive():
                # Still say goodbye: zeroconf's calls are thread-safe, and peers that keep a
                # stale entry for an hour are worse than racing a stuck worker.
                log.error("mDNS worker did not stop within %g s", CLOSE_JOIN_TIMEOUT_S)
        self._teardown()

    # -- zeroconf's browser thread --------------------------------------------------------------

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                   state_change: ServiceStateChange) -> None:
        """Runs on zeroconf's browser thread: record the change and wake the worker, nothing
        more.  Must never raise (that would end the browser thread) nor block."""
        try:
            with self._cv:
                if self._stopping:
                    return
                if name not in self._pending and len(self._pending) >= MAX_PENDING:
                    if not self._overflowing:
                        self._overflowing = True
                        log.warning("mDNS: over %d services pending; dropping events",
                                    MAX_PENDING)
                    return
                # Coalesce: only the latest change of a name matters (we resolve its current
                # state anyway); Removed then Added becomes Added, and vice versa.
                self._pending[name] = state_change
                self._cv.notify()
        except Exception:
            log.exception("mDNS browser handler failed")

    # -- the worker thread ----------------------------------------------------------------------

    def _run(self) -> None:
        next_poll = time.monotonic() + self._poll_s
        while True:
            try:
                with self._cv:
                    while not (self._pending or self._commands or self._stopping):
                        remaining = next_poll - time.monotonic()
                        if remaining <= 0:
                            break
                        self._cv.wait(remaining)
                    if self._stopping:
                        break
                    commands, self._commands = self._commands, []
                    item = None
                    if self._pending:
                        first = next(iter(self._pending))
                        item = (first, self._pending.pop(first))
                    if not self._pending:
                        self._overflowing = False
                for fn, fut in commands:
                    if not fut.set_running_or_notify_cancel():
                        continue
                    try:
                        fn()
                    except Exception as exc:  # noqa: BLE001 -- re-raised in update()'s caller
                        fut.set_exception(exc)
                    else:
                        fut.set_result(None)
                if item is not None:
                    self._handle(*item)
                if time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + self._poll_s
                    self._check_interfaces()
            except Exception:
                # A bug or an unexpected zeroconf error: log it and keep serving.  Every step
                # above is bounded, so this cannot spin without progress for long.
                log.exception("mDNS worker step failed")
        if self._worker_tears_down:
            self._teardown()

    def _handle(self, name: str, change: ServiceStateChange) -> None:
        key = name.lower()
        if change is ServiceStateChange.Removed:
            self._forget(key)
            return
        if key == self._service_name.lower():
            return                                  # ourselves; no need to resolve
        zc = self._zc
        assert zc is not None
        try:
            peer = _resolve(zc, name, RESOLVE_TIMEOUT_S, self._zc_version)
        except (ZeroconfError, OSError, RuntimeError) as exc:
            log.debug("mDNS: resolving %r failed: %s", name, exc)
            return
        if peer is None:
            log.debug("mDNS: %r did not resolve to a usable lanchat hub", name)
            return
        if peer.node == self.node_id:
            # Our node id under a name that is not ours: another process with our key (a
            # cloned VM that kept its machine id), or a stale ad of ours.  on_twin dials it:
            # the handshake tells the two apart.  Never reported as a peer.
            if self._on_twin is not None:
                _safe_call(self._on_twin, peer, "on_twin")
            return
        if peer.node not in self._peers and len(self._peers) >= MAX_PEERS:
            log.warning("mDNS: %d peers known; ignoring %r", MAX_PEERS, name)
            return
        if key not in self._names and len(self._names) >= 2 * MAX_PEERS:
            log.warning("mDNS: too many service names; ignoring %r", name)
            return
        self._names[key] = peer.node
        if self._peers.get(peer.node) != peer:
            self._peers[peer.node] = peer
            _safe_call(self._on_found, peer, "on_found")

    def _forget(self, key: str) -> None:
        node = self._names.pop(key, None)
        if node is None:
            return
        others = [n for n, nd in self._names.items() if nd == node]
        if others:
            # The node is still advertised under another name (it was renamed): refresh the
            # ad from that name instead of reporting it lost.
            with self._cv:
                self._pending.setdefault(others[0], ServiceStateChange.Updated)
            return
        if self._peers.pop(node, None) is not None:
            _safe_call(self._on_lost, node, "on_lost")

    def _check_interfaces(self) -> None:
        """Follow changes of the interface set: new sockets, new A/AAAA records, a re-announce
        and a fresh browse query on any interface that (re)appeared."""
        found = find_interfaces(self._wanted, self._ip_version)
        if found == self._applied:
            return
        zc, info, old = self._zc, self._info, self._applied
        assert zc is not None and info is not None and old is not None
        log.info("mDNS: interfaces changed: %s -> %s", list(old.addresses), list(found.addresses))
        if found.addresses and set(found.addresses) != set(old.addresses):
            # Records first, so the re-announce on a new socket carries the new addresses.  With
            # no address left we keep the old records rather than announce an empty set.
            self._info = self._make_info(label_of(info.name), found.addresses, info.port or 0,
                                         keep_name=True)
            zc.update_service(self._info)
        zc.update_interfaces(list(found.zc))       # re-announces when a socket was added
        self._applied = found
        if set(found.zc) - set(old.zc):
            self._restart_browser()

    def _restart_browser(self) -> None:
        """A new browser sends a query at once, so hubs that appeared while our link was down
        are found now rather than at the old browser's next (backed-off) query."""
        zc = self._zc
        assert zc is not None
        if self._browser is not None:
            self._browser.cancel()
        self._browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[self._on_change])

    def _do_update(self, name: str | None, port: int | None) -> None:
        zc, info = self._zc, self._info
        assert zc is not None and info is not None
        addresses = tuple(info.parsed_addresses())
        new_port = info.port if port is None else port
        assert new_port is not None
        if name is not None and instance_label(name) != instance_label(self._name):
            zc.unregister_service(info)
            self._name = name
            self._info = self._make_info(instance_label(name), addresses, new_port)
            zc.register_service(self._info, allow_name_change=True)
            self._note_registered()
            return
        if name is not None:
            self._name = name
        # Same ServiceInfo name and server: update_service replaces the records in place.
        self._info = self._make_info(label_of(info.name), addresses, new_port, keep_name=True)
        zc.update_service(self._info)

    # -- helpers --------------------------------------------------------------------------------

    def _make_info(self, label: str, addresses: Sequence[str], port: int, *,
                   keep_name: bool = False) -> ServiceInfo:
        # keep_name: the label is the one already registered (maybe renamed), used verbatim.
        if not keep_name:
            label = instance_label(label)
        return ServiceInfo(
            SERVICE_TYPE,
            f"{label}.{SERVICE_TYPE}",
            port=port,
            properties=dict(self._txt),
            # Our own host name: never <hostname>.local, which avahi owns (conventions.md §1.2).
            server=self._server,
            # zeroconf does not fill in addresses; without them peers get an NSEC, no A record.
            parsed_addresses=list(addresses),
        )

    def _note_registered(self) -> None:
        assert self._info is not None
        # allow_name_change renames info.name in place on a conflict: read it back.
        self._service_name = self._info.name
        self._advertised = label_of(self._info.name)

    def _teardown(self) -> None:
        """Cancel the browser, say goodbye, close zeroconf.  Runs once, on one thread."""
        browser, self._browser = self._browser, None
        zc, self._zc = self._zc, None
        if browser is not None:
            with contextlib.suppress(RuntimeError):
                browser.cancel()
        if zc is not None:
            try:
                # Three goodbye packets, 125 ms apart (RFC 6762 §10.1): peers drop us at once.
                zc.unregister_all_services()
            except (ZeroconfError, OSError, RuntimeError) as exc:
                log.warning("mDNS: goodbye failed: %s", exc)
            try:
                zc.close()
            except (ZeroconfError, OSError, RuntimeError) as exc:
                log.warning("mDNS: close failed: %s", exc)


# -- one-shot browse ----------------------------------------------------------------------------

def browse_hubs(timeout: float, *, interfaces: list[str] | None = None,
                ip_version: IpVersion = "v4") -> list[PeerAd]:
    """Browse for ``timeout`` seconds and return the hubs resolved, one per node, sorted by
    name.  For ``lanchat connect`` without a host.  Advertises nothing.  Returns [] when there
    is no usable interface.  Raises OSError if the multicast sockets cannot be opened.
    """
    version = _IP_VERSIONS[ip_version]
    found_ifaces = find_interfaces(interfaces, ip_version)
    if not found_ifaces.zc:
        return []
    events: queue.Queue[tuple[str, ServiceStateChange]] = queue.Queue(maxsize=MAX_PENDING)

    def on_change(zeroconf: Zeroconf, service_type: str, name: str,
                  state_change: ServiceStateChange) -> None:
        # zeroconf's browser thread: enqueue only, never raise.
        with contextlib.suppress(queue.Full):
            events.put_nowait((name, state_change))

    zc = Zeroconf(interfaces=list(found_ifaces.zc), ip_version=version, use_asyncio=False)
    browser: ServiceBrowser | None = None
    peers: dict[str, PeerAd] = {}
    names: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    try:
        browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                name, change = events.get(timeout=remaining)
            except queue.Empty:
                break
            key = name.lower()
            if change is ServiceStateChange.Removed:
                node = names.pop(key, None)
                if node is not None and node not in names.values():
                    peers.pop(node, None)
                continue
            try:
                peer = _resolve(zc, name, min(RESOLVE_TIMEOUT_S, remaining), version)
            except (ZeroconfError, OSError, RuntimeError) as exc:
                log.debug("mDNS: resolving %r failed: %s", name, exc)
                continue
            if peer is not None and (peer.node in peers or len(peers) < MAX_PEERS):
                names[key] = peer.node
                peers[peer.node] = peer
    finally:
        if browser is not None:
            browser.cancel()
        zc.close()
    return sorted(peers.values(), key=lambda p: (p.name.lower(), p.node))
