"""Small files only their owner may change: read one safely, write one durably.

The node's key (:mod:`lanchat.keyfile`) and the pin files (:mod:`lanchat.pinfile`) are
both files whose content decides whom a daemon or a user trusts, so both are read the same
careful way: never through a symbolic link, never a FIFO or device put in the file's place
(it would hang the reader), only a file of this user's own that no one else may change, and
never more than a bound.  What is wrong is said in the caller's words (its exception type
and the reason that matters for that file).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from lanchat.errors import LanchatError


@dataclass(frozen=True, slots=True)
class Rules:
    """How a kind of private file is checked, and how its problems are worded."""

    #: The exception raised (a LanchatError subclass taking one message).
    error: type[LanchatError]
    #: What the file is, e.g. "the key file" (in "... must be a regular file").
    what: str
    #: Permission bits that must not be set (0o077: no one else may even read it).
    forbidden: int
    #: Why another owner matters, with its separator, e.g. "; a node's key is its own".
    owner_why: str
    #: What the forbidden bits allow and what to do, after "has mode 0644: ".
    mode_why: str


def read_private(path: str, rules: Rules, max_bytes: int) -> bytes | None:
    """At most ``max_bytes + 1`` bytes of ``path`` (the caller tells "too long" by the +1),
    or None if there is no such file.  Raises ``rules.error``."""
    err = rules.error
    try:
        # O_NONBLOCK: a FIFO put in its place must not hang us (no effect on a regular file)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise err(f"{path} is a symbolic link; {rules.what} must be a regular file"
                      ) from None
        raise err(f"cannot open {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise err(f"{path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise err(f"{path} belongs to uid {st.st_uid}, not to this user "
                      f"(uid {os.geteuid()}){rules.owner_why}")
        mode = stat.S_IMODE(st.st_mode)
        if mode & rules.forbidden:
            raise err(f"{path} has mode {mode:04o}: {rules.mode_why.format(path=path)}")
        return os.read(fd, max_bytes + 1)
    except OSError as exc:
        raise err(f"cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def fsync_dir(directory: str) -> None:
    """Make a rename or link in ``directory`` survive a power cut (best effort)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def durable_temp(directory: str, prefix: str, data: bytes) -> Iterator[str]:
    """A new file in ``directory`` (mode 0600 from the start) holding ``data``, written and
    fsynced; its path, for the caller to rename or link into place (then :func:`fsync_dir`).

    Whatever is still at that path on leaving is removed.  Raises OSError.
    """
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
