"""A thread for each of thousands of connections: start it, join it, nothing more.

The hub runs one reader thread per TCP connection, and idle connections are
what a chat hub has most of.  A :class:`threading.Thread` carries about 2.3 KiB
of Python objects besides the thread itself (measured with tracemalloc at 1,000
idle connections: its ``Event`` with a ``Condition`` and a deque, the tstate
lock, an excepthook closure, the registry entry) -- 11 MiB at 5,000
connections, for features the hub never uses.  :class:`LightThread` is a
``_thread`` thread and one lock that is held while it runs: ~150 bytes.

What it gives up: it is not listed by :func:`threading.enumerate` (a debugger
shows it unnamed), the interpreter does not wait for it at exit (the hub joins
its readers itself when it closes), and :func:`threading.current_thread` in it
returns a stand-in "Dummy" thread that threading keeps for good (one per thread
stack address: 1,700 of them, 2.5 KiB each, after a churn of 2,000 clients,
when readers joined writers with ``Thread.join``, which calls it).  So nothing
that runs in a LightThread may call it: log lines show no thread names, and a
reader waits for its writer with :meth:`join` here -- writers are LightThreads.
"""

from __future__ import annotations

import _thread
from collections.abc import Callable


class LightThread:
    """Runs ``target()`` on a new thread once :meth:`start` is called."""

    __slots__ = ("_done", "_target", "ident", "name")

    def __init__(self, target: Callable[[], object], name: str) -> None:
        self._target: Callable[[], object] | None = target
        self.name = name
        self.ident: int | None = None  # the thread's, once it runs (threading.get_ident())
        self._done = _thread.allocate_lock()  # held from start() until target returns

    def __repr__(self) -> str:
        return f"<LightThread {self.name} {'running' if self.is_alive() else 'idle'}>"

    def start(self) -> None:
        """Start the thread.  Raises ``RuntimeError`` if the system can't make one."""
        self._done.acquire()
        try:
            _thread.start_new_thread(self._run, ())
        except BaseException:
            self._done.release()
            raise

    def _run(self) -> None:
        self.ident = _thread.get_ident()
        assert self._target is not None  # start() runs a LightThread once
        try:
            self._target()
        finally:
            # The target is usually a bound method of the object that holds this
            # thread: a reference cycle, which would keep a finished connection's
            # objects until the cyclic GC happens to run (7 MiB after 2,000 left).
            self._target = None
            self._done.release()

    def join(self, timeout: float | None = None) -> None:
        """Wait until the thread has finished (or ``timeout`` seconds have passed)."""
        if self._done.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            self._done.release()

    def is_alive(self) -> bool:
        return self._done.locked()
