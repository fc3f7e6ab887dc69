"""Give freed memory back to the system after a crowd of connections leaves.

Each connection's reader thread allocates from one of glibc's per-thread malloc
arenas.  When thousands of connections come and go, the arenas keep the freed
pages: the daemon's RSS stays at its peak long after the crowd has gone (tens
of MiB after 2,000 connections).  ``malloc_trim(0)`` walks every arena and
returns its free pages to the kernel.  It is a glibc extension, so on other C
libraries :func:`trim` does nothing.

:class:`Trimmer` decides *when*: the daemon's main loop asks it every few
seconds with the current connection count, and it trims once the count has
fallen well below the peak seen since the last trim -- never on a steady load,
where trimming would only make malloc ask the kernel again.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

#: Connections that must have left (from the peak since the last trim) before a trim.
TRIM_AFTER_DROP = 200


@functools.cache
def _load_malloc_trim() -> Callable[[int], int] | None:
    # Looked up at the first trim, not at import: ctypes is ~3 ms of every daemon's
    # start-up (python -X importtime) and most daemons never trim.
    import ctypes

    # The process's own symbols (the C library is loaded already): no
    # ctypes.util.find_library, which runs ldconfig in a subprocess.
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def trim() -> bool:
    """Return free heap pages to the kernel; False where the C library cannot."""
    malloc_trim = _load_malloc_trim()
    if malloc_trim is None:
        return False
    malloc_trim(0)  # ctypes releases the GIL for the call: the hub keeps serving
    return True


class Trimmer:
    """Trims after the connection count falls by :data:`TRIM_AFTER_DROP` from its peak."""

    def __init__(self, drop: int = TRIM_AFTER_DROP) -> None:
        self._drop = drop
        self._peak = 0

    def check(self, connections: int) -> bool:
        """Note the current count; trim (and return True) if enough connections left."""
        if connections > self._peak:
            self._peak = connections
            return False
        if self._peak - connections < self._drop:
            return False
        log.debug("%d connection(s) left since the peak of %d: trimming the heap",
                  self._peak - connections, self._peak)
        self._peak = connections
        return trim()
