"""``lanchatd``: reads the configuration, wires the pieces together, runs until told to stop.

This is the one module that knows every other one.  It builds the store, the
router, the hub, the control socket and (when enabled) discovery and links,
hands each the small interface it asks for, and owns the process: signals
(TERM/INT stop, HUP reloads), systemd notifications and the watchdog, periodic
retention, and an orderly shutdown -- mDNS goodbye first, then links and
clients closed, then the store.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import resource
import select
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from lanchat import __version__, auth, config, feed, keyfile, pinfile, sdlisten, sdnotify, tlsid
from lanchat.control import AlreadyRunning, ControlServer
from lanchat.errors import ConfigError, LanchatError
from lanchat.hub import Hub
from lanchat.limits import (
    LINE_TIMEOUT_S,
    NICK_TIMEOUT_S,
    SEND_STALL_TIMEOUT_S,
    SHUTDOWN_TIMEOUT_S,
    TLS_HANDSHAKE_TIMEOUT_S,
    UDP_IDLE_TIMEOUT_S,
)
from lanchat.links import Identity, LinkManager
from lanchat.logsetup import set_level, setup_logging
from lanchat.memtrim import Trimmer
from lanchat.model import Draft, Message, User
from lanchat.pins import PeerPins, TrustPolicy
from lanchat.router import Router, Subscriber
from lanchat.store import Store

log = logging.getLogger("lanchatd")

#: Seconds between two retention passes over the history (the first runs at start-up).
PRUNE_INTERVAL_S = 3600.0

#: Messages one retention step deletes (one short transaction on the router thread,
#: ~0.1 s here).  A pass is a sequence of steps, one per turn of the main loop, so
#: sends interleave with it and the watchdog is still fed while millions of rows go
#: (deleted in one transaction, 500,000 rows held the writer for 5.6 s).
PRUNE_BATCH_ROWS = 10_000

#: Seconds between the main loop's looks at the connection count, to give memory
#: back after a crowd has left (lanchat.memtrim).
TRIM_CHECK_S = 5.0

#: Stack size for every thread the daemon starts.  The default (8 MiB of
#: address space) is far more than a reader or writer loop needs; small stacks
#: keep thousands of connections cheap.
THREAD_STACK_BYTES = 256 * 1024

#: Exit status for a configuration error (sysexits.h EX_CONFIG; systemd shows it as "CONFIG").
EXIT_CONFIG = 78


class Daemon:
    """One running lanchatd: the pieces, wired.  :meth:`start`, then :meth:`close`.

    Implements the control socket's backend on top of the router.
    ``control_sock`` is a listening control socket systemd passed us
    (:mod:`lanchat.sdlisten`); the daemon then serves it instead of binding
    ``cfg.socket``, and owns (closes) it.
    Thread-safety: ``start``/``close``/``reload`` are called from the main
    thread; the backend methods from control-connection threads.
    """

    def __init__(self, cfg: config.Config, control_sock: socket.socket | None = None) -> None:
        self.cfg = cfg
        self._control_sock = control_sock
        self.hostname = socket.gethostname() or "localhost"
        self.started = time.time()
        self.key = _read_secret(cfg)  # first: a bad secret_file fails before anything opens
        #: The node's Ed25519 identity (issue 13): its key names the node.
        self.identity = keyfile.load_identity(
            cfg.state_dir, machine_id_path=os.environ.get("LANCHAT_MACHINE_ID_FILE",
                                                          keyfile.MACHINE_ID_PATH))
        self._pruned = 0  # messages the retention pass under way removed so far
        note = self.identity.note()
        if note is not None:
            log.warning("%s", note)
        #: Pinned peers (issue 14): read before anything opens, so a corrupt file stops
        #: the daemon with its line number instead of being quietly not checked.
        self._pins_path = os.path.join(cfg.state_dir, pinfile.KNOWN_PEERS)
        self.peer_pins = PeerPins(pinfile.load(self._pins_path), TrustPolicy.parse(cfg.trust))
        self.store = Store(Path(cfg.state_dir) / "history.db",
                           max_age_days=cfg.max_age_days, max_messages=cfg.max_messages,
                           node_id=self.identity.node)
        self.router = Router(self.store, node=self.store.node_id, host=self.hostname,
                             nick=cfg.nick, name=cfg.name, key=self.identity.key)
        self.hub: Hub | None = None
        self.control: ControlServer | None = None
        self.links: LinkManager | None = None
        self.discovery: Any = None  # lanchat.discovery.Discovery, imported only when enabled

    @property
    def node(self) -> str:
        return self.router.node

    @property
    def fingerprint(self) -> str:
        """What people compare to check this node's key.

        Made when first asked (``status``), not at start-up: the iterated hash costs
        ~7 ms that nothing on the way to serving needs; feed.fingerprint remembers it.
        """
        return feed.fingerprint(self.identity.key.public)

    def start(self) -> None:
        """Start every piece; on failure, stop what was started and re-raise."""
        try:
            self.router.start()
            self.control = ControlServer(self._control_path(), self,
                                         mode=self.cfg.socket_mode,
                                         group=self.cfg.socket_group, sock=self._control_sock)
            self._control_sock = None  # the server owns it now
            self.control.start()
            # One server context for the hub's TLS clients and the links: each one built
            # makes and signs the certificate and loads it (~3-6 ms at start-up).
            tls = tlsid.server_context(self.identity.key, scratch_dir=self.cfg.state_dir)
            self.hub = Hub(self.router, name=self.cfg.name, bind=self.cfg.bind,
                           port=self.cfg.port, udp=self.cfg.udp, max_rate=self.cfg.max_rate,
                           max_connections=self.cfg.max_connections,
                           max_connections_per_ip=self.cfg.max_connections_per_ip,
                           line_timeout=_env_seconds("LANCHAT_LINE_TIMEOUT_S", LINE_TIMEOUT_S),
                           nick_timeout=_env_seconds("LANCHAT_NICK_TIMEOUT_S", NICK_TIMEOUT_S),
                           udp_idle_timeout=_env_seconds("LANCHAT_UDP_IDLE_TIMEOUT_S",
                                                         UDP_IDLE_TIMEOUT_S),
                           stall_timeout=_env_seconds("LANCHAT_SEND_STALL_TIMEOUT_S",
                                                      SEND_STALL_TIMEOUT_S),
                           udp_stranger_scale=_env_seconds("LANCHAT_UDP_UNREGISTERED_SCALE",
                                                           1.0),
                           key=self.key, plain_clients=self.cfg.plain_clients,
                           tls=tls,
                           tls_handshake_timeout=_env_seconds(
                               "LANCHAT_TLS_HANDSHAKE_TIMEOUT_S", TLS_HANDSHAKE_TIMEOUT_S))
            self.links = LinkManager(
                self.router, self.store,
                Identity(node=self.node, name=self.cfg.name, host=self.hostname,
                         port=self.hub.port, key=self.identity.key),
                static_peers=[config.parse_peer(p) for p in self.cfg.peers], key=self.key,
                pins=self.peer_pins, pins_path=self._pins_path, tls_server=tls)
            self.hub.link_acceptor = self.links
            self.hub.start()
            self.links.start()
            if self.cfg.discovery:
                self._start_discovery()
        except BaseException:
            self.close()
            raise

    def _control_path(self) -> str:
        """The control socket's path: systemd's when it passed one, else ``cfg.socket``."""
        sock = self._control_sock
        if sock is None:
            return self.cfg.socket
        name = sock.getsockname()
        if not isinstance(name, str) or not name:  # unnamed, or abstract (bytes)
            return self.cfg.socket
        if name != self.cfg.socket:
            log.warning("control socket: systemd passed %s, not the configured %s; serving %s",
                        name, self.cfg.socket, name)
        return name

    def _start_discovery(self) -> None:
        # Imported here: zeroconf is only loaded by a daemon that advertises.
        from lanchat.discovery import Discovery, PeerAd

        assert self.hub is not None and self.links is not None
        links = self.links

        def found(ad: PeerAd) -> None:
            links.peer_found(ad.node, ad.name, ad.addresses, ad.port)

        self.discovery = Discovery(
            node_id=self.node, name=self.cfg.name, port=self.hub.port,
            udp_port=self.hub.udp_port, interfaces=list(self.cfg.interfaces) or None,
            ip_version=self.cfg.ip_version,  # type: ignore[arg-type]
            on_found=found, on_lost=links.peer_lost, auth=self.key is not None,
            on_twin=lambda ad: links.twin_found(ad.addresses, ad.port))
        self.discovery.start()

    def close(self) -> None:
        """Orderly shutdown: mDNS goodbye, links, clients, then the store.  Idempotent.

        Done within SHUTDOWN_TIMEOUT_S whatever peers and clients do: each step
        gets what is left of it.  The store is closed only once the router --
        its one writer -- has stopped.
        """
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        if self.discovery is not None:
            self.discovery.close()
        if self.links is not None:
            self.links.close(timeout=left())
        if self.hub is not None:
            self.hub.close(timeout=max(0.0, left() - 1.0))  # + 1 s to force the stuck
        if self.control is not None:
            self.control.close(timeout=left())
        if self._control_sock is not None:  # start() failed before the server took it
            self._control_sock.close()
            self._control_sock = None
        if self.router.close(timeout=left()):
            self.store.close()
        else:
            log.error("the router did not stop within %g s; leaving the history as it is "
                      "(every acknowledged message is already on disk)", SHUTDOWN_TIMEOUT_S)

    def reload(self, new: config.Config) -> None:
        """Apply what can change without a restart (SIGHUP); log what cannot.

        A changed ``max_age_days`` or ``max_messages`` is applied at once by a
        retention pass.  Keys that need a restart keep their running values in
        ``self.cfg``, so that ``status`` shows what is in effect, and the next
        reload warns about them again.
        """
        changes = config.diff(self.cfg, new)
        for key in changes.restart:
            log.warning("config: %s changed; restart lanchatd to apply it", key)
        if "log_level" in changes.apply:
            set_level(new.log_level)
        if "max_rate" in changes.apply and self.hub is not None:
            self.hub.set_max_rate(new.max_rate)
        if "nick" in changes.apply:
            try:
                self.router.set_nick(new.nick)
            except LanchatError as exc:
                log.warning("config: cannot change nick to %r: %s", new.nick, exc)
        if "peers" in changes.apply and self.links is not None:
            self.links.set_static_peers([config.parse_peer(p) for p in new.peers])
        retention = "max_age_days" in changes.apply or "max_messages" in changes.apply
        if retention:
            # Only the main thread asks for a pass (and waits for it), so no pass
            # is reading these while they change.
            self.store.max_age_days = new.max_age_days
            self.store.max_messages = new.max_messages
        self.cfg = dataclasses.replace(new, **{k: old for k, (old, _) in changes.restart.items()})
        if retention:
            self.prune_all()
        log.info("configuration reloaded")

    def prune(self) -> bool:
        """One retention step (at most PRUNE_BATCH_ROWS messages) on the router thread,
        the store's only writer.  True if there may be more to remove: call again.

        Called by the main thread: at start-up, every PRUNE_INTERVAL_S, and
        after a reload that changes the retention; a pass logs one line when
        it ends.
        """
        try:
            removed = self.router.prune(limit=PRUNE_BATCH_ROWS)
        except LanchatError as exc:
            log.warning("retention pass failed: %s", exc)
            removed = 0
        self._pruned += removed
        if removed >= PRUNE_BATCH_ROWS:
            return True
        if self._pruned:
            log.info("retention: removed %d old message(s)", self._pruned)
        self._pruned = 0
        return False

    def prune_all(self) -> None:
        """A whole retention pass now, step by step (bounded: the steps needed for every
        message the store held when it began, and one more)."""
        steps = 1 + self.store.count() // PRUNE_BATCH_ROWS
        for _ in range(steps):
            if not self.prune():
                return

    # -- the control socket's backend --------------------------------------------

    def send(self, text: str, *, room: str, to: str | None, uid: int | None,
             key: str | None = None) -> Message:
        draft = Draft(text=text, nick=self.router.nick, host=self.hostname, room=room,
                      to=to, uid=uid, key=key)
        return self.router.send(draft)

    def history(self, *, room: str | None, limit: int, before: float | None,
                since: float | None) -> list[Message]:
        return self.router.history(room=room, limit=limit, before=before, since=since)

    def subscribe(self, sink: Any, *, backlog: int) -> list[Message]:
        rooms: frozenset[str] | None = getattr(sink, "rooms", None)
        return self.router.subscribe(sink, backlog=backlog, rooms=rooms)

    def unsubscribe(self, sink: Subscriber) -> None:
        self.router.unsubscribe(sink)

    def users(self) -> list[User]:
        return self.router.users()

    def peers(self) -> list[dict[str, Any]]:
        return self.links.peers() if self.links is not None else []

    def trust(self, node: str) -> list[str]:
        """``lanchat trust NODE``: the pin names where node ``node``'s changed key is now
        accepted (empty: no change of that node waits)."""
        return self.links.trust(node) if self.links is not None else []

    def status(self) -> dict[str, Any]:
        hub = self.hub
        return {
            "version": __version__,
            "node": self.node,
            "key": self.identity.key.public.text,
            "fingerprint": self.fingerprint,
            "nick": self.router.nick,
            "name": self.cfg.name,
            "host": self.hostname,
            "port": hub.port if hub is not None else None,
            "udp_port": hub.udp_port if hub is not None else None,
            "peers": len(self.peers()),
            "linked": sum(1 for p in self.peers() if p.get("state") == "linked"),
            "users": len(self.router.users()),
            "clients": hub.client_count if hub is not None else 0,
            "links": self.links.link_count if self.links is not None else 0,
            "uptime_s": round(time.time() - self.started, 3),
            "discovery": self.cfg.discovery,
            "state_dir": self.cfg.state_dir,
            "socket": self.control.path if self.control is not None else self.cfg.socket,
        }

    def set_nick(self, nick: str) -> str:
        return self.router.set_nick(nick)


def _env_seconds(var: str, default: float) -> float:
    """An internal knob for tests, not configuration: ``$LANCHAT_LINE_TIMEOUT_S``,
    ``$LANCHAT_NICK_TIMEOUT_S``, ``$LANCHAT_UDP_IDLE_TIMEOUT_S`` and
    ``$LANCHAT_SEND_STALL_TIMEOUT_S`` shorten the hub's deadlines so that a test can
    watch a slow-loris client, a silent nickname prompt, a silent UDP client or a
    client that stopped reading being dropped without waiting minutes;
    ``$LANCHAT_UDP_UNREGISTERED_SCALE`` (a factor, not seconds) speeds up the rate
    limits on answers to new UDP addresses, so that a test can fill the 512-per-address
    UDP cap without waiting eight minutes; ``$LANCHAT_TLS_HANDSHAKE_TIMEOUT_S`` lets a
    test watch a stalled TLS handshake being dropped.  Not a config key and not
    in the man pages; a bad value is ignored.  (``$LANCHAT_MACHINE_ID_FILE``, read in
    :class:`Daemon`, names the file to read instead of ``/etc/machine-id``, so that a
    test can play a state directory copied to another machine.)
    """
    try:
        value = float(os.environ[var])
    except (KeyError, ValueError):
        return default
    return value if 0 < value < float("inf") else default


def _read_secret(cfg: config.Config) -> bytes | None:
    """The shared secret's key, from ``secret`` or ``secret_file``; None when unset."""
    if cfg.secret:
        return auth.load_secret(cfg.secret)
    if cfg.secret_file:
        try:
            return auth.read_secret_file(cfg.secret_file)
        except OSError as exc:
            raise ConfigError(f"secret_file {cfg.secret_file}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise ConfigError(f"secret_file {cfg.secret_file}: {exc}") from None
    return None


def _raise_fd_limit() -> None:
    """Allow as many open files as the hard limit permits: every chat client is one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE,
                               (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    return config.daemon_parser().parse_args(argv)


def _load_config(ns: argparse.Namespace) -> config.Config:
    return config.load(flags=config.flags_from_args(ns), config_flag=ns.config,
                       env=os.environ, hostname=socket.gethostname())


def main(argv: list[str] | None = None) -> int:
    """Run lanchatd in the foreground until SIGTERM or SIGINT.  Returns the exit status."""
    ns = _parse_args(argv)
    try:
        cfg = _load_config(ns)
    except ConfigError as exc:
        print(f"lanchatd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if ns.check_config:
        print(config.render(cfg), end="")
        return 0
    setup_logging(cfg.log_level)
    threading.stack_size(THREAD_STACK_BYTES)
    _raise_fd_limit()
    try:
        control_sock = sdlisten.take_control_socket()
    except ConfigError as exc:  # systemd passed something we cannot serve: restarts won't help
        print(f"lanchatd: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    stop = threading.Event()
    reload_wanted = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        (reload_wanted if signum == signal.SIGHUP else stop).set()

    # A signal sent to the process may be delivered to any of its threads; CPython
    # then runs the handler in the main thread only when that thread next runs
    # Python code -- a main thread asleep in a wait would sleep on.  The wakeup fd
    # gets a byte for every signal whichever thread took it, and the main loop
    # sleeps in select() on it.
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)

    try:
        daemon = Daemon(cfg, control_sock)
        daemon.start()
    except AlreadyRunning as exc:
        print(f"lanchatd: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"lanchatd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except LanchatError as exc:
        print(f"lanchatd: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"lanchatd: cannot start: {exc.strerror or exc}"
              f"{' (' + exc.filename + ')' if exc.filename else ''}", file=sys.stderr)
        return 1

    assert daemon.hub is not None and daemon.control is not None
    host, port = daemon.hub.address
    print(f"lanchatd {__version__}: node {daemon.node} {cfg.name!r} listening on "
          f"{host}:{port} (TCP{'+UDP' if cfg.udp else ''}), control socket "
          f"{daemon.control.path}{' (from systemd)' if daemon.control.inherited else ''}",
          file=sys.stderr, flush=True)
    sdnotify.notify(f"READY=1\nSTATUS=listening on {host}:{port}")

    watchdog = sdnotify.watchdog_interval(os.environ, os.getpid())
    next_prune = time.monotonic()  # the first retention pass right after start-up
    trimmer = Trimmer()
    try:
        while not stop.is_set():
            now = time.monotonic()
            timeout = min(watchdog or TRIM_CHECK_S, TRIM_CHECK_S, max(0.0, next_prune - now))
            select.select([wake_r], [], [], timeout)
            with contextlib.suppress(BlockingIOError):
                wake_r.recv(4096)  # the signal numbers; the handlers already ran
            if stop.is_set():
                break
            if reload_wanted.is_set():
                reload_wanted.clear()
                try:
                    daemon.reload(_load_config(ns))
                except ConfigError as exc:
                    log.error("reload refused, keeping the running configuration: %s", exc)
            if watchdog:
                sdnotify.notify("WATCHDOG=1")
            trimmer.check(daemon.hub.client_count)
            if time.monotonic() >= next_prune:
                more = daemon.prune()
                # More to remove: the next step right after this turn of the loop.
                next_prune = time.monotonic() + (0.0 if more else PRUNE_INTERVAL_S)
    finally:
        sdnotify.notify("STOPPING=1")
        log.info("shutting down")
        daemon.close()
        signal.set_wakeup_fd(-1)
        wake_r.close()
        wake_w.close()
    _exit_despite_stragglers()
    return 0


def _exit_despite_stragglers() -> None:
    """Exit now if a thread outlived the shutdown: the interpreter would wait for it.

    Every piece was given its share of SHUTDOWN_TIMEOUT_S and the history is
    closed; a thread still running is stuck on a peer (a bug, logged with its
    name), and must not keep the process -- and systemd's stop -- waiting.
    """
    main = threading.current_thread()
    late = [t.name for t in threading.enumerate()
            if t is not main and t.is_alive() and not t.daemon]
    if late:
        log.error("threads still running after shutdown: %s; exiting anyway", ", ".join(late))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main())
