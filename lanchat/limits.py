"""Every bound that a remote party can push against, in one place.

Each constant says why it has the value it has.  Whatever the network feeds us
-- frame size, nick and text length, queue depth, history page size -- is
bounded here, so that no peer can make the daemon grow without limit.  Values a
user may need to tune also have a config key (see ``lanchatd.toml(5)``).
"""

from __future__ import annotations

#: Longest chat text, in bytes of UTF-8: a screenful, far below any frame limit.
MAX_TEXT_BYTES = 4096

#: Longest nickname, in characters: fits a terminal column and an mDNS label.
MAX_NICK_CHARS = 32

#: Longest room name, in characters: short enough to type, long enough to describe.
MAX_ROOM_CHARS = 32

#: Longest host name carried in a message (DNS names are at most 253 octets).
MAX_HOST_CHARS = 253

#: Longest hub frame (one line of text or JSON), in bytes, newline included.
#: A message at MAX_TEXT_BYTES, JSON-escaped (every byte may become ``\\u00XX``,
#: six bytes) plus its envelope, fits; anything longer is hostile.
MAX_FRAME_BYTES = 32 * 1024

#: Longest control-socket (JSON-RPC) line: a batch of sends plus slack.
MAX_RPC_LINE_BYTES = 1024 * 1024

#: Bytes queued for one hub client before it is judged too slow and cut off.
#: Roughly 4,000 typical chat lines; a healthy client drains this in well under
#: a second on a LAN, a stalled one never does.
MAX_OUTBOX_BYTES = 512 * 1024

#: Seconds a hub writer may stay blocked in one send before the client is cut
#: off as stalled (its kernel buffer is full and it is not reading).
SEND_STALL_TIMEOUT_S = 10.0

#: Seconds an idle writer thread lingers before exiting; it is restarted on the
#: next delivery.  Keeps idle connections at one thread each.
WRITER_IDLE_EXIT_S = 5.0

#: Most events waiting for the router thread before publishers are made to
#: wait (back-pressure onto the TCP connections that flood).
MAX_ROUTER_QUEUE = 20_000

#: Largest batch the router commits to SQLite in one transaction.
MAX_COMMIT_BATCH = 1024

#: Largest page of history one request may ask for.
MAX_HISTORY_PAGE = 1000

#: Seconds a UDP client is remembered after its last datagram.  A client sends
#: any datagram (an empty one, or ``/ping``) at least this often to stay joined.
UDP_IDLE_TIMEOUT_S = 120.0

#: Most UDP clients registered at once (each costs a dict entry and a fan-out).
MAX_UDP_CLIENTS = 1024

#: Largest UDP datagram we accept or send (a safe size for one LAN frame is
#: smaller, but the loopback and fragmented LAN paths carry this fine).
MAX_DATAGRAM_BYTES = 8192

#: Seconds a text-mode client may take to choose a nickname before being dropped.
NICK_TIMEOUT_S = 120.0

#: Attempts a text-mode client gets to choose a valid, free nickname.
MAX_NICK_ATTEMPTS = 10
