"""Newline framing with a hard frame limit, and strict JSON lines.

The one framing codec: the hub (text and JSON mode), UDP datagrams, daemon
links and the control socket all speak "one frame per ``\\n``-terminated line".
Bytes in, frames out; no I/O (the sans-IO style of h11 and wsproto).

The limit is enforced *while* buffering: a peer that sends a megabyte without a
newline is refused as soon as the buffer passes the limit, not after it has
made us hold the whole thing.
"""

from __future__ import annotations

import json
import math

from lanchat.errors import FrameTooLong, RemoteProtocolError

TYPE_CHECKING = False  # not typing's: importing typing costs `lanchat send` ~3 ms (HACKING.md)
if TYPE_CHECKING:
    from typing import Any


class LineDecoder:
    """Split a byte stream into lines of at most ``max_frame`` bytes.

    ``feed`` returns the complete lines, without their ``\\n`` and without one
    trailing ``\\r`` (so CRLF clients such as telnet work).  After
    :class:`FrameTooLong` the decoder is poisoned: the stream has lost its
    framing and the caller must drop the connection.
    """

    __slots__ = ("_broken", "_buf", "max_frame")

    def __init__(self, max_frame: int) -> None:
        if max_frame < 2:
            raise ValueError("max_frame must be at least 2")
        self.max_frame = max_frame
        self._buf = bytearray()
        self._broken = False

    @property
    def pending(self) -> int:
        """Bytes of an unfinished line held back, waiting for its newline."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return every line it completed.  Raises :class:`FrameTooLong`."""
        if self._broken:
            raise FrameTooLong("stream already exceeded the frame limit")
        lines: list[bytes] = []
        start = 0
        if self._buf:
            nl = data.find(b"\n")
            if nl < 0:
                self._buf += data
                self._check_pending()
                return lines
            self._buf += data[: nl + 1]
            self._emit(bytes(self._buf), lines)
            self._buf.clear()
            start = nl + 1
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                break
            self._emit(data[start : nl + 1], lines)
            start = nl + 1
        if start < len(data):
            self._buf += data[start:]
            self._check_pending()
        return lines

    def _emit(self, frame: bytes, out: list[bytes]) -> None:
        # ``frame`` ends with b"\n"; the limit counts the newline.
        if len(frame) > self.max_frame:
            self._broken = True
            raise FrameTooLong(f"line longer than {self.max_frame} bytes")
        end = -2 if frame.endswith(b"\r\n") else -1
        out.append(frame[:end])

    def _check_pending(self) -> None:
        if len(self._buf) >= self.max_frame:
            self._broken = True
            self._buf.clear()
            raise FrameTooLong(f"line longer than {self.max_frame} bytes")

    def eof(self) -> bytes:
        """The stream ended: return (and forget) an unfinished line, possibly ``b""``."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


def decode_utf8(line: bytes) -> str:
    """Decode one frame as UTF-8 or raise :class:`RemoteProtocolError`."""
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError(
            f"invalid UTF-8 at byte {exc.start}", code="bad-utf8"
        ) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 overflows to inf: as bad as a literal Infinity
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def loads_line(line: bytes | str) -> Any:
    """Parse one JSON frame strictly (UTF-8, no NaN/Infinity, no overflowing numbers).

    Raises :class:`RemoteProtocolError`.
    """
    text = decode_utf8(line) if isinstance(line, bytes) else line
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:
        raise RemoteProtocolError(f"invalid JSON: {exc}", code="bad-json") from None


def dumps_line(obj: Any) -> bytes:
    """Encode ``obj`` as one compact JSON frame, ``\\n``-terminated, UTF-8.

    ``json.dumps`` never emits a raw newline without ``indent``, so the result
    is always exactly one frame.  A lone surrogate (a peer may send ``"\\ud800"``,
    which :func:`loads_line` accepts as JSON) is written back as that same
    ``\\ud800`` escape -- the only place UTF-8 cannot hold it is inside a JSON
    string -- so every frame is valid UTF-8 and decodes to the value encoded,
    instead of poisoning whoever receives it (RFC 8259 section 8.1).
    """
    return (
        json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False) + "\n"
    ).encode("utf-8", "backslashreplace")


def is_finite_number(value: object) -> bool:
    """True for an int or finite float that is not a bool (JSON numbers we accept)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, float) and math.isfinite(value)
