"""``lanchat``: the command line, a thin formatter over :class:`lanchat.client.ControlClient`.

Data goes to stdout, messages and errors to stderr, one line each, no
tracebacks.  Every piece of network text printed for humans goes through
:mod:`lanchat.render` (escape sequences become visible and inert); ``--json``
prints the daemon's objects unchanged, with every control character a JSON
escape (:func:`lanchat.render.safe_json`).

Exit status (documented in ``lanchat(1)``): 0 ok, 1 error (a JSON-RPC error
prints its message), 2 usage, 3 daemon not reachable, 4 permission denied on
the socket, 130 interrupted.

Imports stay light (conventions.md §6.6): no zeroconf, sqlite3 or daemon
module is loaded, so ``lanchat send`` starts fast.  What only other commands
need (the message model, ``datetime``, ``threading``, ``signal``) is imported
inside them; ``tests/test_cli_unit.py`` lists what ``send`` may not load.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from lanchat import __version__
from lanchat.client import (
    ConnectionLost,
    ControlClient,
    ControlTimeout,
    DaemonNotRunning,
    PermissionDenied,
    RpcError,
)
from lanchat.errors import LanchatError, ValidationError
from lanchat.fields import validate_text
from lanchat.limits import MAX_STDIN_COUNT_BYTES, MAX_TEXT_BYTES, SEND_ATTEMPTS
from lanchat.paths import socket_candidates, socket_path
from lanchat.render import format_message, format_presence, neutralise, safe_json

TYPE_CHECKING = False  # not typing's: importing typing costs `lanchat send` ~3 ms (HACKING.md)
if TYPE_CHECKING:
    from typing import Any

    from lanchat.completion import Words

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_PERMISSION = 4
EXIT_INTERRUPTED = 130

PROG = "lanchat"


class CliError(Exception):
    """A failure to report as ``lanchat: <message>`` with exit status ``status``."""

    def __init__(self, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.status = status


# -- output helpers -------------------------------------------------------------------

def _out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()  # per line: `lanchat tail --json | jq` must stream


def _json(obj: Any) -> None:
    # The daemon's values unchanged, but never a raw C1 or bidi control for the terminal.
    _out(safe_json(json.dumps(obj, ensure_ascii=False)))


def _err(line: str) -> None:
    sys.stderr.write(f"{PROG}: {line}\n")
    sys.stderr.flush()


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    rows = [[neutralise(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    for row in [list(headers), *rows]:
        _out("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _when(ts: Any) -> str:
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))
    except (OverflowError, OSError, ValueError):
        return "-"


def _print_item(method: str, params: Any, *, show_room: bool,
                out: Callable[[str], None] = _out, err: Callable[[str], None] = _err) -> None:
    """Print one notification's item for humans; skip (with a note) anything malformed.

    ``out`` and ``err`` print one line (the chat passes its console's, which keep the
    line being typed intact)."""
    from lanchat.model import Message, Presence  # dataclasses: ~10 ms that `send` does not need

    try:
        if method == "message":
            out(format_message(Message.from_dict(params), show_room=show_room,
                               now=time.time()))
        elif method == "presence":
            out(format_presence(Presence.from_dict(params), timestamp=True))
    except ValidationError as exc:
        err(f"skipped a malformed {neutralise(method)} from lanchatd: {neutralise(str(exc))}")


def _print_messages(messages: Iterable[Any], *, as_json: bool, show_room: bool,
                    out: Callable[[str], None] = _out) -> None:
    for m in messages:
        if as_json:
            _json(m)
        else:
            _print_item("message", m, show_room=show_room, out=out)


# -- argument parsing helpers ------------------------------------------------------------

_AGO = r"(\d+(?:\.\d+)?)\s*([smhdw])"  # compiled on first use (re caches it), not at import
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(value: str, now: float) -> float:
    """``--since``: ``10m``/``2h``/``1d`` ago, an ISO time (local if no zone), or epoch seconds."""
    import datetime as _dt

    v = value.strip()
    m = re.fullmatch(_AGO, v)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        epoch = float(v)
    except ValueError:
        pass
    else:
        if 0 <= epoch < float("inf"):  # NaN fails this comparison too
            return epoch
    try:
        dt = _dt.datetime.fromisoformat(v)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a time: use 10m, 2h, 1d, an ISO time or epoch seconds"
        ) from None
    if dt.tzinfo is None:
        dt = dt.astimezone()  # naive ISO times are local, as a user typed them
    return dt.timestamp()


def _since_arg(value: str) -> float:
    return parse_since(value, time.time())


def _count(lo: int, hi: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"must be from {lo} to {hi}")
        return n
    return parse


# -- commands ------------------------------------------------------------------------------

def _client(args: argparse.Namespace) -> ControlClient:
    client = ControlClient(args.socket_path, timeout=args.timeout)
    client.connect()
    return client


def _read_stdin_text() -> str:
    """Standard input less one final newline.  A text over the limit is reported with its
    real size, counted up to MAX_STDIN_COUNT_BYTES (then "over" that)."""
    cap = MAX_STDIN_COUNT_BYTES + 3  # room for a final CRLF, and one byte to see "more"
    data = sys.stdin.buffer.read(cap)
    if data.endswith(b"\n"):
        data = data[:-2] if data.endswith(b"\r\n") else data[:-1]
    if len(data) > MAX_TEXT_BYTES:
        size = (f"over {MAX_STDIN_COUNT_BYTES}" if len(data) > MAX_STDIN_COUNT_BYTES
                else str(len(data)))
        raise CliError(f"text is {size} bytes; the limit is {MAX_TEXT_BYTES}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CliError("standard input is not valid UTF-8") from None
    if not text:
        raise CliError("nothing to send (standard input was empty)")
    return text


def cmd_send(args: argparse.Namespace) -> int:
    if args.text == ["-"] or (not args.text and not sys.stdin.isatty()):
        text = _read_stdin_text()
    elif not args.text:
        args.parser.error("send needs TEXT (or '-' to read standard input)")
    else:
        text = " ".join(args.text)
    try:
        validate_text(text)
    except ValidationError as exc:
        raise CliError(str(exc)) from None
    # One key for every try: the daemon stores the message once however many tries
    # reach it (os.urandom, not secrets: `send` starts fast -- HACKING.md).
    key = os.urandom(12).hex()
    for attempt in range(1, SEND_ATTEMPTS + 1):
        try:
            with _client(args) as client:
                msg = client.call("send", text=text, room=args.room, to=args.to, key=key)
            break
        except (ControlTimeout, ConnectionLost) as exc:
            if attempt == SEND_ATTEMPTS:
                raise
            _err(f"{exc}; trying again ({attempt + 1}/{SEND_ATTEMPTS}, same message)")
    if args.json:
        _json(msg)
    return EXIT_OK


def _follow(notes: Iterator[dict[str, Any]], *, as_json: bool, show_room: bool,
            out: Callable[[str], None] = _out, err: Callable[[str], None] = _err) -> int:
    for note in notes:
        method = note.get("method")
        params = note.get("params")
        if method == "overflow":
            reason = params.get("reason", "") if isinstance(params, dict) else ""
            raise CliError(f"lanchatd dropped this stream: {neutralise(str(reason))}")
        if as_json:
            if method == "message":
                _json(params)
        elif isinstance(method, str):
            _print_item(method, params, show_room=show_room, out=out, err=err)
    return EXIT_OK  # pragma: no cover - notifications() ends by raising


def cmd_tail(args: argparse.Namespace) -> int:
    show_room = args.room is None
    with _client(args) as client:
        if not args.follow:
            if args.n:
                msgs = client.call("history", room=args.room, limit=args.n)
                _print_messages(msgs, as_json=args.json, show_room=show_room)
            return EXIT_OK
        backlog, notes = client.subscribe(room=args.room, backlog=args.n,
                                          presence=not args.json)
        _print_messages(backlog, as_json=args.json, show_room=show_room)
        try:
            return _follow(notes, as_json=args.json, show_room=show_room)
        except ConnectionLost:
            raise CliError("lanchatd closed the connection (it stopped or restarted)") from None


def cmd_history(args: argparse.Namespace) -> int:
    with _client(args) as client:
        msgs = client.call("history", room=args.room, limit=args.limit, since=args.since)
    _print_messages(msgs, as_json=args.json, show_room=args.room is None)
    return EXIT_OK


def _list_command(args: argparse.Namespace, method: str, headers: list[str],
                  row: Callable[[dict[str, Any]], list[str]]) -> int:
    """Call a method that returns a list; print it as JSON or as a table of ``row``s."""
    with _client(args) as client:
        items = client.call(method)
    if args.json:
        _json(items)
    else:
        _table(headers, [row(item) for item in items if isinstance(item, dict)])
    return EXIT_OK


def cmd_users(args: argparse.Namespace) -> int:
    return _list_command(args, "users", ["NICK", "HOST", "ROOM", "NODE", "VIA", "SINCE"],
                         lambda u: [str(u.get("nick", "")), str(u.get("host", "")),
                                    "#" + str(u.get("room", "")),
                                    "local" if u.get("local") else str(u.get("node", "")),
                                    str(u.get("via", "")) + (" (plain)" if u.get("plain") else ""),
                                    _when(u.get("since"))])


def cmd_peers(args: argparse.Namespace) -> int:
    return _list_command(args, "peers", ["NODE", "NAME", "ADDRESS", "PORT", "STATE", "LAST SEEN",
                                         "FINGERPRINT"],
                         lambda p: [str(p.get("node", "")), str(p.get("name", "")),
                                    str(p.get("address", "")), str(p.get("port", "")),
                                    _peer_state(p), _when(p.get("last_seen")),
                                    str(p.get("fingerprint") or "")])


def cmd_trust(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.call("trust", node=args.node)
    if args.json:
        _json(result)
    elif isinstance(result, dict):
        names = result.get("names")
        where = ", ".join(str(n) for n in names) if isinstance(names, list) else ""
        _out(neutralise(f"trusted node {result.get('node')} for {where}; linking again"))
    return EXIT_OK


def _peer_state(peer: dict[str, Any]) -> str:
    """A peer's state, and loudly whether its node forked its feed (signed two histories)."""
    state, forked = str(peer.get("state", "")), peer.get("forked")
    if forked is None:
        return state
    mark = f"FORKED at #{forked}"
    return mark if state == "forked" else f"{state}, {mark}"


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.call("status")
    if args.json:
        _json(status)
        return EXIT_OK
    if isinstance(status, dict):
        width = max((len(str(k)) for k in status), default=0)
        for key, value in status.items():
            shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            _out(f"{neutralise(str(key)).ljust(width)}  {neutralise(shown)}")
    return EXIT_OK


def cmd_nick(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.call("nick", nick=args.name)
    if args.json:
        _json(result)
    return EXIT_OK


def full_screen_terminal() -> bool:
    """True when ``chat`` and ``connect`` open the full-screen client: standard input and
    output are both terminals, and ``TERM`` names one that can draw (not unset or dumb)."""
    return (sys.stdin.isatty() and sys.stdout.isatty()
            and os.environ.get("TERM", "") not in ("", "dumb"))


CHAT_HELP = "commands: /nick NAME, /me ACTION, /quit (or Ctrl-D)"


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive chat: the full-screen client on a terminal (lanchat.chatscreen), else
    the line mode, where a thread prints the subscription while this one reads stdin.

    Two connections: the listener's blocks in ``recv`` for the stream, the
    sender's makes calls, so neither waits for the other.  Lines are read and
    printed through a :class:`lanchat.lineedit.LineConsole`: on a terminal it
    edits with readline and prints incoming lines above the half-typed one.
    When the stream ends on its own (the daemon went away), the printer ends
    this thread's read with :meth:`~lanchat.lineedit.LineConsole.wake`.
    """
    if not args.plain and full_screen_terminal():
        from lanchat import chatscreen  # prompt_toolkit: only for the screen, never `send`

        return chatscreen.run_daemon(args.socket_path, args.timeout, room=args.room)

    import threading

    from lanchat.lineedit import LineConsole  # readline and signal: not for `send`

    room = args.room
    closing = threading.Event()
    gone: list[str] = []

    with _client(args) as sender, ControlClient(args.socket_path, args.timeout) as listener, \
            LineConsole(sys.stdout, sys.stderr, sys.stdin) as console:
        backlog, notes = listener.subscribe(room=room, backlog=args.n)
        _print_messages(backlog, as_json=False, show_room=False, out=console.out)

        def pump() -> None:
            reason = "lanchatd closed the connection (it stopped or restarted)"
            try:
                _follow(notes, as_json=False, show_room=False, out=console.out,
                        err=lambda line: console.err(f"{PROG}: {line}"))
            except CliError as exc:
                reason = str(exc)
            except LanchatError:
                pass
            if closing.is_set():
                return  # we stopped it: the user left
            gone.append(reason)
            console.wake()

        printer = threading.Thread(target=pump, name="chat-printer")
        try:
            printer.start()
            if sys.stdin.isatty():
                console.err(f"* {CHAT_HELP}")
            while (line := console.read()) is not None:
                if not _chat_line(sender, line, room):
                    break
        finally:
            closing.set()
            listener.interrupt()
            printer.join(5.0)
        if gone:
            raise CliError(gone[0])
    return EXIT_OK


def _chat_line(client: ControlClient, line: str, room: str | None) -> bool:
    """Handle one typed line; False to leave the chat."""
    if not line.strip():
        return True
    if line.strip() in ("/quit", "/exit"):
        return False
    if line.startswith("/nick"):
        name = line[5:].strip()
        if not name:
            _err("usage: /nick NAME")
            return True
        try:
            client.call("nick", nick=name)
        except RpcError as exc:
            _err(neutralise(exc.message))
        return True
    if line.strip() == "/help":
        sys.stderr.write(f"* {CHAT_HELP}\n")
        return True
    if line.startswith("/") and not line.startswith(("/me ", "//")):
        _err(f"unknown command {neutralise(line.split(maxsplit=1)[0])} -- {CHAT_HELP}")
        return True
    text = line[1:] if line.startswith("//") else line
    try:
        client.call("send", text=text, room=room or "lobby")
    except RpcError as exc:
        _err(neutralise(exc.message))
    return True


def completion_words() -> dict[str, Words]:
    """What bash completes for ``lanchat`` and ``lanchatd``, read from their parsers.

    ``connect`` is completed from the hub client's parser: :func:`main` hands it
    every word after ``connect``.
    """
    from lanchat import completion, config, hubclient  # only `completion bash` needs them

    return {
        "lanchat": completion.words_of(build_parser(),
                                       delegated={"connect": hubclient.build_parser()}),
        "lanchatd": completion.words_of(config.daemon_parser()),
    }


def completion_script() -> str:
    """The bash completion script ``lanchat completion bash`` prints."""
    from lanchat import completion

    header = (
        f"Generated from the argument parsers by `lanchat completion bash` "
        f"(lanchat {__version__}).\n"
        "Install (scripts/install does this):\n"
        "  dir=${XDG_DATA_HOME:-~/.local/share}/bash-completion/completions\n"
        '  mkdir -p "$dir" && lanchat completion bash > "$dir/lanchat" '
        '&& ln -sf lanchat "$dir/lanchatd"\n'
    )
    return completion.bash_script(completion_words(), header=header)


def cmd_completion(args: argparse.Namespace) -> int:
    sys.stdout.write(completion_script())
    sys.stdout.flush()
    return EXIT_OK


def cmd_connect(args: argparse.Namespace) -> int:
    # Imported lazily: the hub client is only needed by this subcommand.
    from lanchat import hubclient  # type: ignore[attr-defined,unused-ignore]

    def screen(host: str, port: int, nick: str, room: str | None,
               security: hubclient.Security) -> int:
        from lanchat import chatscreen  # prompt_toolkit: only for the screen

        return chatscreen.run_hub(host, port, nick, room=room, security=security)

    result: int = hubclient.main(args.rest, screen=screen if full_screen_terminal() else None)
    return result


# -- the parser ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The ``lanchat`` argument parser (also what the man page and completion describe)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Talk to the local lanchatd: send, read and follow the LAN chat.",
        epilog="examples:\n  lanchat send 'lunch?'\n  echo hi | lanchat send -\n"
               "  lanchat tail -n 20\n  lanchat history --since 2h --json | jq .text\n"
               "  lanchat users",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # Global options are accepted before and after the subcommand; SUPPRESS keeps the
    # subcommand's copy from resetting a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS,
                        help="control socket (default: $LANCHAT_SOCKET, "
                             "$XDG_RUNTIME_DIR/lanchat/control.sock, /run/lanchat/control.sock)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON (NDJSON for streams) with the daemon's field names")
    common.add_argument("--timeout", type=float, metavar="SECONDS", default=argparse.SUPPRESS,
                        help="give up on an unresponsive daemon after this long (default 5)")
    for action in common._actions:
        parser._add_action(action)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str,
            ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, parents=[common])
        p.set_defaults(func=func, parser=p)
        return p

    p = add("send", cmd_send, "send a message (TEXT words, or '-' to read standard input)")
    p.add_argument("text", nargs="*", metavar="TEXT")
    p.add_argument("--room", default="lobby", help="room to post in (default: lobby)")
    p.add_argument("--to", metavar="NICK", help="send a direct message to NICK, wherever they "
                   "are (NICK@HOST or NICK@NODE-PREFIX if the nick is on several nodes)")

    p = add("tail", cmd_tail, "print the last messages and follow new ones until Ctrl-C")
    p.add_argument("-n", "--limit", dest="n", type=_count(0, 1000), default=10, metavar="N",
                   help="messages to show first (default 10)")
    p.add_argument("--room", help="only this room (default: every room)")
    p.add_argument("-f", "--follow", action="store_true", default=True,
                   help="keep following (the default)")
    p.add_argument("--no-follow", dest="follow", action="store_false",
                   help="print the last N messages and exit")

    p = add("history", cmd_history, "print stored messages, oldest first")
    p.add_argument("--room", help="only this room (default: every room)")
    p.add_argument("-n", "--limit", type=_count(1, 1000), default=50, metavar="N",
                   help="at most N (default 50)")
    p.add_argument("--since", type=_since_arg, metavar="WHEN",
                   help="only newer messages: 10m, 2h, 1d ago, an ISO time or epoch seconds")

    add("users", cmd_users, "list the people connected across the network")
    add("peers", cmd_peers, "list the other daemons found on the network")
    p = add("trust", cmd_trust, "accept the changed key of a peer that `peers` shows as "
            "'key changed' (NODE: its new node id)")
    p.add_argument("node", metavar="NODE")
    add("status", cmd_status, "show the daemon's status")
    p = add("nick", cmd_nick, "change this node's nickname")
    p.add_argument("name", metavar="NAME")

    p = add("chat", cmd_chat, "chat interactively through the daemon (/quit or Ctrl-D leaves)")
    p.add_argument("--plain", action="store_true",
                   help="line mode even on a terminal (lines edited with readline) instead "
                        "of the full-screen client; pipes and TERM=dumb always get it")
    p.add_argument("--room", default="lobby", help="room to chat in (default: lobby)")
    p.add_argument("-n", "--limit", dest="n", type=_count(0, 1000), default=10, metavar="N",
                   help="recent messages to show first (default 10)")

    p = add("connect", cmd_connect, "join a hub directly over TCP (no local daemon needed)")
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="ARGS")

    p = add("completion", cmd_completion, "print a shell completion script")
    p.add_argument("shell", choices=["bash"])
    return parser


def _finish_args(args: argparse.Namespace) -> None:
    args.json = getattr(args, "json", False)
    args.timeout = getattr(args, "timeout", 5.0)
    args.socket_path = socket_path(os.environ, getattr(args, "socket", None))
    args.sockets_looked_at = socket_candidates(os.environ, getattr(args, "socket", None))


def _safe_streams() -> None:
    # A terminal or pipe whose encoding cannot show a character must not turn a
    # chat line into a traceback.
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="replace")


def _not_running_hint(path: str, looked_at: Sequence[str]) -> str:
    """Name every socket path the CLI looked for, up to ``path``, the one it tried (a
    stale user socket is tried, and named, alone)."""
    places = list(looked_at[:looked_at.index(path) + 1]) if path in looked_at else [path]
    return (f"lanchatd is not running (no socket at {' nor at '.join(places)}). "
            "Start it with: lanchatd "
            "(or: systemctl --user start lanchatd, or: sudo systemctl start lanchatd)")


def _command_index(parser: argparse.ArgumentParser, raw: Sequence[str]) -> int | None:
    """Where the subcommand is in ``raw``: the first word that is neither a global option
    nor a global option's value (so ``send please connect`` is a send, not a connect)."""
    takes_value = {opt for action in parser._actions if action.nargs != 0
                   for opt in action.option_strings}
    i = 0
    while i < len(raw):
        word = raw[i]
        if not word.startswith("-") or word == "-":
            return i
        i += 2 if word in takes_value else 1
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lanchat``; return the exit status."""
    _safe_streams()
    parser = build_parser()
    raw = list(sys.argv[1:] if argv is None else argv)
    where = _command_index(parser, raw)
    if where is not None and raw[where] == "connect":
        # `connect` has its own parser (lanchat.hubclient): hand it everything after
        # the word, options first or not (`lanchat connect --udp HOST`, `connect --help`).
        args = parser.parse_args(raw[:where + 1])
        args.rest = raw[where + 1:]
    else:
        args = parser.parse_args(raw)  # exits 2 on a usage error, as argparse does
    _finish_args(args)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # CPython's recipe (signal docs): point stdout at devnull so the interpreter's
        # final flush does not raise again, and exit non-zero.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERROR
    except DaemonNotRunning as exc:
        _err(_not_running_hint(exc.path, args.sockets_looked_at))
        return EXIT_NOT_RUNNING
    except PermissionDenied as exc:
        _err(f"permission denied on {exc.path}; add yourself to group 'lanchat' "
             "(sudo adduser $USER lanchat) and log in again")
        return EXIT_PERMISSION
    except RpcError as exc:
        _err(neutralise(exc.message))
        return EXIT_ERROR
    except ControlTimeout as exc:
        _err(str(exc))
        return EXIT_ERROR
    except CliError as exc:
        _err(str(exc))
        return exc.status
    except LanchatError as exc:
        _err(neutralise(str(exc)))
        return EXIT_ERROR


