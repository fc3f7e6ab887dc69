"""The node's identity key on disk: made on first start, mode 0600, bound to its machine.

The key file lives in the state directory as ``node.key``: one line of JSON,
``{"v": 1, "type": "ed25519", "seed", "public", "node", "machine_id"}`` (seed and public
key in base64url; ``machine_id`` is ``/etc/machine-id`` when the key was made, or null).
The public key and node id are redundant with the seed on purpose: a file whose parts
disagree is corrupt, and is refused rather than quietly becoming another identity.

Machine binding (issue 13, case 7): a copied state directory -- a cloned VM, a restored
``~/.local/state`` on a second computer -- would otherwise run a second daemon with the
same identity, and the two would sign different messages with one (origin, seq): a fork.
So the file remembers the machine it was made on; if the state directory finds itself on
another machine (both ids known and different), the old file is kept under another name
(``node.key.<old node id>.moved``, for the record) and a new identity is made.  The caller
logs one line saying so (:attr:`Identity.replaced`); history stays.  When either machine id
is unknown (no ``/etc/machine-id``, as in many containers) the key is kept: there is no way
to tell a clone from the original, and churning identities would be worse.

Safety of the secret: the file is written to a temporary file that ``mkstemp`` creates
with mode 0600 (umask cannot widen it), fsynced, then linked into place (``link`` does not
replace a file another process made meanwhile; where hard links are not supported,
``rename``), so no reader ever sees it partial or with wider permissions.  A key file that
others can read or write, that is not ours, not a regular file, or not well-formed is
refused with an error that says what to do: lanchat never repairs or replaces a key it
cannot trust.

Adapter: owns this one kind of I/O (the key file, and reading the machine id).
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
from dataclasses import dataclass

from lanchat import privfile
from lanchat.errors import LanchatError, ValidationError
from lanchat.feed import SEED_BYTES, SigningKey, b64decode, b64encode

#: The key file's name in the state directory.
KEY_FILE = "node.key"
#: Where systemd (and dbus) keep this machine's id: 32 lowercase hex digits.
MACHINE_ID_PATH = "/etc/machine-id"
#: Bytes read of a key file or machine-id file: either is one short line.
MAX_KEY_FILE_BYTES = 4096
#: Kept copies of replaced key files with one node id (a directory cloned again and again).
_MAX_KEPT = 100

_MACHINE_ID_RE = re.compile(r"[0-9a-f]{32}")
_FIELDS = {"v", "type", "seed", "public", "node", "machine_id"}


class KeyFileError(LanchatError):
    """The key file cannot be used: wrong permissions, owner, type or content, or I/O failed.

    The daemon stops with this message; the operator fixes the file (or moves it away to
    make a new identity).
    """

    code = "key-file"


@dataclass(frozen=True, slots=True)
class Replaced:
    """The identity given up because the state directory moved to another machine."""

    node: str
    #: Where the old key file was kept.
    kept_as: str
    old_machine: str
    machine: str


@dataclass(frozen=True, slots=True)
class Identity:
    """The node's key, where it lives, and what happened to it at this start."""

    key: SigningKey
    path: str
    #: True if no key file existed and this one was just made.
    created: bool
    #: Set when a key from another machine was replaced (log it: one line).
    replaced: Replaced | None = None

    @property
    def node(self) -> str:
        return self.key.node

    def note(self) -> str | None:
        """The one log line to write when this start replaced the identity, else None."""
        r = self.replaced
        if r is None:
            return None
        return (f"this state directory was made on machine {r.old_machine} and is now on "
                f"{r.machine}: new identity {self.node} (history kept; the old identity "
                f"{r.node} is kept in {r.kept_as})")


def read_machine_id(path: str = MACHINE_ID_PATH) -> str | None:
    """This machine's id, or None where there is none (missing, unreadable, not set up).

    systemd writes ``uninitialized`` there early in a first boot; that is "unknown" too.
    """
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_KEY_FILE_BYTES).decode("ascii", "replace").strip()
    except OSError:
        return None
    return text if _MACHINE_ID_RE.fullmatch(text) else None


def load_identity(state_dir: str, *, machine_id_path: str = MACHINE_ID_PATH) -> Identity:
    """Load the node's key from ``state_dir``, or make it; see the module docstring.

    Creates ``state_dir`` (mode 0700) if it does not exist.  Raises :class:`KeyFileError`.
    """
    machine = read_machine_id(machine_id_path)
    path = os.path.join(state_dir, KEY_FILE)
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(f"cannot create the state directory {state_dir}: {exc}") from None
    loaded = _read(path)
    if loaded is None:
        return Identity(_create(path, machine), path, created=True)
    key, old_machine = loaded
    if machine is None or old_machine is None or machine == old_machine:
        return Identity(key, path, created=False)
    kept = _keep_aside(path, key.node)
    return Identity(_create(path, machine), path, created=True,
                    replaced=Replaced(key.node, kept, old_machine, machine))


_RULES = privfile.Rules(
    error=KeyFileError, what="the key file", forbidden=0o077,
    owner_why="; a node's key is its own",
    mode_why="others may read or change this node's secret key. If it was not exposed, "
             "`chmod 600 {path}`; if it may have been, move it away to make a new identity")


def _read(path: str) -> tuple[SigningKey, str | None] | None:
    """The key and machine id in ``path``, or None if there is no such file."""
    data = privfile.read_private(path, _RULES, MAX_KEY_FILE_BYTES)
    if data is None:
        return None
    try:
        return _parse(data)
    except ValueError as exc:
        raise KeyFileError(f"{path} is not a lanchat key file ({exc}); restore it from a "
                           "backup, or move it away to make a new identity") from None


def _parse(data: bytes) -> tuple[SigningKey, str | None]:
    """Key and machine id from a key file's bytes; raises ValueError saying what is wrong."""
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ValueError("too long")
    try:
        doc = json.loads(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError("not JSON") from None
    if not isinstance(doc, dict) or set(doc) != _FIELDS:
        raise ValueError(f"the fields must be {sorted(_FIELDS)}")
    if type(doc["v"]) is not int or doc["v"] != 1 or doc["type"] != "ed25519":
        raise ValueError("not version 1 of an ed25519 key")
    machine = doc["machine_id"]
    if machine is not None and not (isinstance(machine, str)
                                    and _MACHINE_ID_RE.fullmatch(machine)):
        raise ValueError("machine_id must be 32 hex digits or null")
    try:
        key = SigningKey(b64decode(doc["seed"], SEED_BYTES))
    except (ValueError, ValidationError):
        raise ValueError("the seed is not 32 bytes of base64url") from None
    if doc["public"] != key.public.text or doc["node"] != key.node:
        raise ValueError("the public key or node id does not match the seed")
    return key, machine


def _create(path: str, machine: str | None) -> SigningKey:
    """Make a new key and put its file at ``path`` atomically, mode 0600 from the start.

    If another process made ``path`` meanwhile, its key is the one used.
    """
    key = SigningKey(secrets.token_bytes(SEED_BYTES))
    doc = {"v": 1, "type": "ed25519", "seed": b64encode(key.seed), "public": key.public.text,
           "node": key.node, "machine_id": machine}
    data = (json.dumps(doc) + "\n").encode("ascii")
    directory = os.path.dirname(path) or "."
    try:
        with privfile.durable_temp(directory, f".{KEY_FILE}.", data) as tmp:
            try:
                os.link(tmp, path)
            except FileExistsError:
                loaded = _read(path)  # another process won the race: use its key
                if loaded is None:
                    raise KeyFileError(f"{path} appeared and vanished while it was made"
                                       ) from None
                return loaded[0]
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP,
                                     errno.EMLINK):
                    raise
                os.rename(tmp, path)  # a file system without hard links
        privfile.fsync_dir(directory)
    except OSError as exc:
        raise KeyFileError(f"cannot write {path}: {exc.strerror or exc}") from None
    return key


def _keep_aside(path: str, node: str) -> str:
    """Rename the key file at ``path`` to a name of its own; return that name."""
    for i in range(_MAX_KEPT):
        kept = f"{path}.{node}.moved" + (f".{i}" if i else "")
        if not os.path.lexists(kept):
            try:
                os.rename(path, kept)
            except OSError as exc:
                raise KeyFileError(f"cannot move {path} aside: {exc.strerror}") from None
            privfile.fsync_dir(os.path.dirname(path) or ".")
            return kept
    raise KeyFileError(f"{path}: too many kept copies of identity {node}")
