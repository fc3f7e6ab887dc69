"""The line mode's console: reading typed lines and printing incoming ones without garbling.

Used by ``lanchat chat`` and ``lanchat connect`` only (``lanchat send`` never imports
it, nor ``readline``).  On a terminal (stdin and stdout both ttys) typed lines are read
with the stdlib :mod:`readline`, so arrow keys edit the line and Up/Down walk this
session's history, and a line that arrives while the user types is printed *above*
the half-typed input, which is then drawn again.  Anywhere else (pipes, scripts) lines
are read and printed plainly.

Thread-safety: readline's state belongs to the main thread, which sits in ``input()``
with the GIL released; touching it from the receiver thread would race with a key
being handled.  So on a terminal the receiver thread only queues a line and sends
the main thread :data:`WAKE_SIGNAL`; Python runs the handler in the main thread,
between two keys (readline polls stdin and checks for signals), where it clears the
input line, prints what is queued, and asks readline to draw the prompt and buffer
again.  The same signal ends a read when the stream is gone (:meth:`wake`).  A signal
that lands while the main thread is not waiting in readline's poll (handling a key,
or running the previous handler) is only acted on at the next interruption of that
poll, so the sender repeats it until the main thread has done what was asked (see
:meth:`LineConsole._kick`).  Without a terminal, printing is a lock-guarded write
from any thread, one whole line at a time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, TextIO

from lanchat.limits import CONSOLE_KICK_INTERVAL_S, CONSOLE_MAX_KICKS

#: Sent to the main thread when a line is queued for it or the stream has ended.
WAKE_SIGNAL = signal.SIGUSR1

#: Clear from the cursor to the end of the line (ECMA-48 EL).
_CLEAR_EOL = "\x1b[K"


class _Woken(Exception):
    """Raised in the main thread, out of a blocking read, by :meth:`LineConsole.wake`."""


class LineConsole:
    """Reads typed lines and prints lines from any thread (see the module docstring).

    Must be created, used as a context manager and read from in the main thread.
    """

    def __init__(self, out: TextIO, err: TextIO, stdin: TextIO, *, prompt: str = "> ") -> None:
        self._out = out
        self._err = err
        self._stdin = stdin
        self.interactive = _isatty(stdin) and _isatty(out)
        self.prompt = prompt if self.interactive else ""
        self._dumb = os.environ.get("TERM", "") in ("", "dumb")
        self._lock = threading.Lock()  # guards: writes to both streams, _queue
        self._queue: deque[tuple[TextIO, str]] = deque()
        self._main = threading.get_ident()
        self._reading = False   # main thread only: inside read()
        self._idle = threading.Event()  # set while the main thread is not inside read()
        self._idle.set()
        self._woken = threading.Event()
        self._drained = threading.Event()  # set by the main thread when the queue is empty
        self._closed = False    # after __exit__: no more signals (the handler is gone)
        self.broken = False     # stdout went away (a closed pipe)
        self._previous: Any = None
        self._readline: Any = None
        self._on_new_line: Callable[[], object] | None = None

    # -- set-up -----------------------------------------------------------------------------

    def __enter__(self) -> LineConsole:
        self._previous = signal.signal(WAKE_SIGNAL, self._on_signal)
        if self.interactive:
            import readline  # only here: it costs start-up time and touches the terminal

            self._readline = readline
            readline.set_completer(None)
            readline.parse_and_bind("tab: tab-insert")  # no file-name completion in a chat
            self._on_new_line = _rl_on_new_line(readline)
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed = True
        signal.signal(WAKE_SIGNAL, self._previous)
        self._drain()

    # -- reading (main thread) --------------------------------------------------------------

    def read(self) -> str | None:
        """The next typed line without its newline; None at EOF or after :meth:`wake`."""
        try:
            self._idle.clear()
            self._drain()  # what this thread printed while a receiver held the lock
            self._reading = True
            if self._woken.is_set():
                return None
            if self.interactive:
                return input(self.prompt)
            line = self._stdin.readline()
            return line.rstrip("\r\n") if line else None
        except (EOFError, _Woken):
            return None
        finally:
            self._reading = False
            self._idle.set()
            self._drain()

    def wake(self) -> None:
        """From any thread: end the current (or next) :meth:`read` with None."""
        self._woken.set()
        if threading.get_ident() != self._main:
            self._kick(self._idle)

    # -- printing (any thread) --------------------------------------------------------------

    def out(self, text: str) -> None:
        self.write(self._out, text)

    def err(self, text: str) -> None:
        self.write(self._err, text)

    def write(self, stream: TextIO, text: str) -> None:
        """Print one line (``text`` without its newline) on ``stream``."""
        if not self.interactive:
            with self._lock:
                self._put(stream, text)
            return
        with self._lock:
            self._queue.append((stream, text))
            self._drained.clear()
        if threading.get_ident() == self._main:
            self._drain()
        else:
            self._kick(self._drained)

    # -- internals --------------------------------------------------------------------------

    def _kick(self, done: threading.Event) -> None:
        """Signal the main thread until it sets ``done``: one signal can go unnoticed
        (module docstring).  Bounded: a main thread busy elsewhere drains when it next
        reads."""
        for _ in range(CONSOLE_MAX_KICKS):
            if self._closed or done.is_set():
                return
            with contextlib.suppress(ProcessLookupError):  # the main thread has ended
                signal.pthread_kill(self._main, WAKE_SIGNAL)
            done.wait(CONSOLE_KICK_INTERVAL_S)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._drain()
        if self._woken.is_set() and self._reading:
            raise _Woken

    def _drain(self) -> None:
        """Main thread: print what is queued, above the input line if one is being read."""
        # Not blocking: a signal that arrives while this thread holds the lock (in
        # write() or here) leaves the queue to the holder, which drains it before leaving.
        while self._lock.acquire(blocking=False):
            try:
                if not self._queue:
                    self._drained.set()
                    return
                items = list(self._queue)
                self._queue.clear()
                redraw = self._reading and self._readline is not None
                if redraw:
                    self._clear_input_line()
                for stream, text in items:
                    self._put(stream, text)
                if redraw:
                    self._redraw()
            finally:
                self._lock.release()

    def _put(self, stream: TextIO, text: str) -> None:
        try:
            stream.write(text + "\n")
            stream.flush()
        except (BrokenPipeError, ValueError):
            self.broken = True

    def _clear_input_line(self) -> None:
        if self._dumb:  # no escape sequences on a dumb terminal: overwrite with blanks
            width = len(self.prompt) + len(self._readline.get_line_buffer())
            self._out.write("\r" + " " * width + "\r")
        else:
            self._out.write("\r" + _CLEAR_EOL)
        self._out.flush()

    def _redraw(self) -> None:
        """Draw the prompt and the half-typed line again, the cursor where it was."""
        if self._on_new_line is not None:
            self._on_new_line()           # readline forgets what it had drawn...
            self._readline.redisplay()    # ...so it draws all of it, cursor at its point
        else:  # pragma: no cover - a readline without rl_on_new_line (libedit)
            self._out.write(self.prompt + self._readline.get_line_buffer())
            self._out.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (ValueError, AttributeError):
        return False


def _rl_on_new_line(readline: Any) -> Callable[[], object] | None:
    """GNU readline's ``rl_on_new_line`` (the stdlib module does not expose it), or None.

    It tells readline that the cursor is at the start of an empty line, so the next
    ``redisplay()`` draws the prompt and the whole buffer instead of only what changed.
    """
    try:
        import ctypes

        lib = ctypes.CDLL(readline.__file__)
        func: Callable[[], object] = lib.rl_on_new_line
    except (OSError, AttributeError, ImportError):  # pragma: no cover - libedit, or no ctypes
        return None
    return func
