"""Helper for tests/test_store.py: append to a store until killed.

Usage: ``python store_killer.py DB_PATH [MAX_APPENDS] [MAX_SECONDS]``

Appends one message per transaction and, only after ``append_local`` has
returned (the commit is done), prints its seq on its own line and flushes.
Every line on stdout is therefore an acknowledged, committed message.  The
loop is bounded (default 5,000 appends or 20 s) so that a test that fails to
kill it still ends.
"""

from __future__ import annotations

import sys
import time

from lanchat.model import Draft
from lanchat.store import Store


def main(argv: list[str]) -> int:
    path = argv[1]
    max_appends = int(argv[2]) if len(argv) > 2 else 5000
    max_seconds = float(argv[3]) if len(argv) > 3 else 20.0
    deadline = time.monotonic() + max_seconds
    # A text of some size makes each commit write a few pages, so the kill is
    # likely to land in the middle of one.
    text = "x" * 1500
    with Store(path) as store:
        for _ in range(max_appends):
            if time.monotonic() > deadline:
                break
            (message,) = store.append_local(
                [Draft(text=text, nick="killer", host="localhost")], ts=time.time())
            sys.stdout.write(f"{message.seq}\n")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
