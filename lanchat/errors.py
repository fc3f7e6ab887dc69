"""The few exception types lanchat raises, named by who is at fault.

Modelled on h11 (``LocalProtocolError`` / ``RemoteProtocolError``) and trio
(``ClosedResourceError`` / ``BrokenResourceError``): callers decide what to do by
*who* caused a failure, not by parsing messages.  Everything derives from
:class:`LanchatError`, so an edge (the CLI, a JSON-RPC handler, a hub
connection) can catch one base class and turn it into a clear message.

Each error carries a short machine-readable ``code`` (``"frame-too-long"``,
``"nick-taken"``, …) that the hub's JSON protocol and the control API send on
the wire, and a human sentence in ``str(exc)``.
"""

from __future__ import annotations


class LanchatError(Exception):
    """Base class of every error lanchat raises on purpose."""

    code = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class ValidationError(LanchatError, ValueError):
    """A value (nick, room, text, message field) breaks the message model's rules.

    Raised when a model object is built, so an invalid object never exists.
    """

    code = "invalid"


class RemoteProtocolError(LanchatError):
    """The other side broke the protocol (bad frame, bad JSON, wrong field).

    The usual answer is an error reply and, when the stream can no longer be
    trusted (a frame over the limit), dropping that peer -- never the daemon.
    """

    code = "protocol"


class FrameTooLong(RemoteProtocolError):
    """A line grew past the frame limit before its newline arrived."""

    code = "frame-too-long"


class LocalProtocolError(LanchatError):
    """We were asked to do something the protocol forbids (a bug on our side)."""

    code = "local-protocol"


class NickInUse(LanchatError):
    """The nickname is already taken on this hub."""

    code = "nick-taken"


class StoreError(LanchatError):
    """The history store could not accept a write (disk full, read-only, corrupt).

    Nothing was acknowledged: the caller reports the failure to its sender.
    """

    code = "store"


class ClosedError(LanchatError):
    """The resource was closed by us (daemon shutting down, connection closed)."""

    code = "closed"


class RouterTimeout(LanchatError):
    """The router did not take and answer a hand-off in time (overloaded or wedged).

    The caller gives up on that request -- a link or connection ends -- rather
    than wait for ever on a thread nobody can wake.
    """

    code = "timeout"


class BrokenError(LanchatError):
    """The resource was closed by something else (peer vanished, socket reset)."""

    code = "broken"


class LimitExceeded(LanchatError):
    """A bound that protects the daemon was hit (rate, queue, connections)."""

    code = "limit"


class ConfigError(LanchatError):
    """A configuration file, flag or environment variable is wrong."""

    code = "config"


class NoSuchUser(LanchatError):
    """A direct message names nobody connected anywhere on the network."""

    code = "no-such-user"


class AmbiguousUser(LanchatError):
    """A direct message names a nick used on several nodes: it must say which (``nick@node``)."""

    code = "ambiguous-user"


class NoSealKey(LanchatError):
    """A direct message to a node whose X25519 key we have not seen: it cannot be sealed.

    Never sent in clear instead (lanchat.seal): the sender tries again once that node's
    signed roster has reached us (it is linked, or was since this daemon started).
    """

    code = "no-key"
