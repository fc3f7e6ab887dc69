"""Every bound that a remote party can push against, in one place.

Each constant says why it has the value it has.  Whatever the network feeds us
-- frame size, nick and text length, queue depth, history page size -- is
bounded here, so that no peer can make the daemon grow without limit.  Values a
user may need to tune also have a config key (see ``lanchatd.toml(5)``).
"""

from __future__ import annotations

#: Longest chat text, in bytes of UTF-8: a screenful, far below any frame limit.
MAX_TEXT_BYTES = 4096

#: How much of a too-long standard input ``lanchat send -`` reads to say how long it
#: was; past this it says "over" (a pipe may never end: ``yes | lanchat send -``).
MAX_STDIN_COUNT_BYTES = 1024 * 1024

#: Longest nickname, in characters: fits a terminal column and an mDNS label.
MAX_NICK_CHARS = 32

#: Longest room name, in characters: short enough to type, long enough to describe.
MAX_ROOM_CHARS = 32

#: Longest host name carried in a message (DNS names are at most 253 octets).
MAX_HOST_CHARS = 253

#: Longest client key of a control ``send`` (its idempotency key): room for a UUID or
#: any random token; each is stored with its message until retention removes it.
MAX_SEND_KEY_CHARS = 64

#: Tries ``lanchat send`` makes (same key, so at most one message is stored) when the
#: daemon does not answer within ``--timeout``: a brief stall is ridden out, a dead
#: daemon costs at most this many timeouts.
SEND_ATTEMPTS = 3

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

#: Bytes of one control-socket batch's reply: JSON-RPC answers a batch in one array, so
#: it is held whole; past this, the batch's remaining requests are answered with a
#: ``limit`` error instead of run.  A 1 MiB batch of ``history`` calls would otherwise
#: build thousands of pages (gigabytes) at once.  Half an outbox: the reply, with the
#: response that passed the bound, still fits in the connection's queue.
MAX_RPC_BATCH_REPLY_BYTES = MAX_OUTBOX_BYTES // 2

#: Seconds a hub writer may stay blocked in one send before the client is cut
#: off as stalled (its kernel buffer is full and it is not reading).
SEND_STALL_TIMEOUT_S = 10.0

#: Seconds a receiver cut off for not reading keeps its connection, the notice
#: saying why queued behind what its kernel buffer still holds: a client that was
#: only paused (a suspended laptop, a stuck UI) reads on and learns why it was
#: dropped, instead of finding the connection simply gone.
CUT_NOTICE_GRACE_S = 30.0

#: Seconds an idle writer thread (lanchat.stream.Outbox: control connections and daemon
#: links) lingers before exiting; it is restarted on the next delivery.  Keeps those idle
#: connections at one thread each.  Hub clients have no writer thread (lanchat.hubloop).
WRITER_IDLE_EXIT_S = 5.0

#: Most events waiting for the router thread before publishers are made to
#: wait (back-pressure onto the TCP connections that flood).
MAX_ROUTER_QUEUE = 20_000

#: Largest batch the router commits to SQLite in one transaction.
MAX_COMMIT_BATCH = 1024

#: Group commit: the router starts storing messages at most this often.  What is said
#: meanwhile gathers and is stored, signed, fsynced and fanned out once (PostgreSQL's
#: commit_delay, in spirit).  A hub that was quiet this long commits at once, so only a
#: busy one waits, and at most this long.  At 1,000 msg/s to 100 clients (bench/README.md)
#: 4 ms took the server's CPU per delivery from 7.5-7.8 to 5.7-5.9 us and its p50 from 2.8
#: to 4.4-5.3 ms; with TLS, p50 from 7.1 to 4.9-5.7 ms.
COMMIT_PACE_S = 0.004

#: Most peers' runs the router stores in one transaction (runs queue up in a catch-up:
#: one fsync for them all instead of one per run; at most 32 x MAX_RUN_ENTRIES messages).
MAX_RUNS_PER_COMMIT = 32

#: Runs a link hands to the router before it waits for the first one's answer: the link
#: parses and verifies the next runs while the router stores earlier ones, and runs that
#: wait together are stored in one transaction.  With RUNS_IN_FLIGHT_BYTES, bounds what a
#: link holds in memory: a catch-up's runs of 64 chat lines are ~20 KiB each, so it is the
#: count that stops them; a peer sending runs of large entries is stopped by the bytes.
RUNS_IN_FLIGHT = 32

#: Most entry body bytes of the runs a link has in flight (see RUNS_IN_FLIGHT): a link whose
#: runs in flight exceed it waits for the oldest answers first (a single run larger than
#: this, up to 64 x MAX_ENTRY_BODY_BYTES, is waited for at once).
RUNS_IN_FLIGHT_BYTES = 1024 * 1024

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

# -- flood limits (the hub's per-connection rates; see lanchat.ratelimit) -------------

#: Messages per second per hub connection unless ``max_rate`` / ``--max-rate`` says
#: otherwise (0 = unlimited): faster than anyone types, too slow to drown a room.
DEFAULT_MAX_RATE = 20.0

#: A connection's message burst is MESSAGE_BURST_S seconds of its rate, and at least
#: MIN_MESSAGE_BURST messages: a short paste goes through whole.
MESSAGE_BURST_S = 2.0
MIN_MESSAGE_BURST = 10

#: Seconds between two "rate limit" notices to one client: it learns which limit it
#: hit without the notices themselves becoming a flood.
RATE_NOTICE_INTERVAL_S = 1.0

#: A client that keeps sending more than FLOOD_FACTOR times its limit for about
#: FLOOD_GRACE_S seconds (beyond its burst) is not typing: it is disconnected.
FLOOD_FACTOR = 10.0
FLOOD_GRACE_S = 5.0

#: Commands other than messages (/users, /help, /nick, ping ...) per second per
#: connection, and their burst.  Cheap, but each costs a reply: a ``/users`` flood
#: must not burn the hub's CPU.  Generous, and not affected by ``max_rate``.
COMMAND_RATE = 50.0
COMMAND_BURST = 200.0

#: Messages per second a daemon link may push at us, and its burst.  A link carries
#: a whole network's traffic and replays backlogs, so the bound is generous; it
#: throttles (stops reading) rather than drops, because links must lose nothing.
LINK_MAX_RATE = 10_000.0
LINK_BURST = 100_000.0

#: Messages per second from one source address, over all its hub connections (TCP and
#: UDP), as a multiple of ``max_rate``, with MESSAGE_BURST_S of that as its burst: a host
#: may have a few people typing at once, but a client that reconnects gets no fresh
#: burst from it (120 reconnects in 3 s pushed 4,800 lines, a burst each).
SOURCE_RATE_FACTOR = 4.0

#: Source addresses whose message buckets are kept at once; the least recently seen is
#: forgotten first.  A LAN has far fewer hosts; each costs a few hundred bytes.
MAX_TRACKED_SOURCES = 4096

#: Answers (greeting, welcome, refusals) the UDP endpoint sends to addresses that are
#: not registered clients: per second per source address, and in all, with bursts.
#: A datagram's source address is not proven, so without a bound spoofed datagrams
#: make us send -- and register for UDP_IDLE_TIMEOUT_S of room traffic -- any
#: address they name, as often as they like.
#: In all: a room's worth of people (re)joining at once, after an outage, is let in.
UDP_UNREGISTERED_RATE = 1.0
UDP_UNREGISTERED_BURST = 5.0
UDP_UNREGISTERED_TOTAL_RATE = 100.0
UDP_UNREGISTERED_TOTAL_BURST = 400.0

# -- connection limits ------------------------------------------------------------------

#: Hub connections (TCP chat clients) at once unless ``max_connections`` says
#: otherwise: each costs a socket and a few KiB (no thread: the I/O loops serve them).
DEFAULT_MAX_CONNECTIONS = 1024

#: Hub connections from one source address unless ``max_connections_per_ip`` says
#: otherwise (0 = unlimited): one host cannot take every slot.
DEFAULT_MAX_CONNECTIONS_PER_IP = 64

#: Most I/O threads (lanchat.hubloop) the hub runs: it runs one per core it may use, up
#: to this.  Each serves its share of the TCP connections through one ``selectors``
#: loop, so connections cost no thread; past a few cores, Python's global lock keeps
#: more loops from running at once anyway.
MAX_IO_THREADS = 4

#: Daemon links accepted at once.  Counted apart from chat clients, so that a flood
#: of clients cannot lock out peers; a LAN rarely has more daemons than this.
MAX_DAEMON_LINKS = 64

#: Keys whose fingerprint (lanchat.feed.fingerprint, ~4-7 ms each) is remembered: our
#: own, every linked peer's and its pinned one's, with room to spare.
FINGERPRINT_CACHE_KEYS = 4 * MAX_DAEMON_LINKS

#: Link handshakes (a daemon's hello until it has proved the shared secret) at once,
#: and from one address.  They are counted apart from links, so that connections
#: that never finish a handshake can hold no link slot; a LAN's daemons handshake
#: one at a time per peer, in milliseconds.  Past the total the oldest is evicted.
MAX_LINK_HANDSHAKES = 16
MAX_LINK_HANDSHAKES_PER_IP = 4

#: Seconds from a daemon's hello to its proof of the shared secret, in all, before
#: the handshake is dropped: a daemon answers at once (its dialer gives up on a
#: welcome after 3 s), a connection trickling a byte at a time never finishes.
LINK_HANDSHAKE_TIMEOUT_S = 5.0

#: Connections over a client limit held at once while we wait to see whether they
#: are daemons (which do not count as clients); any more are refused at once.
MAX_PENDING_OVER_LIMIT = 16

#: Seconds a connection over a client limit has to introduce itself as a daemon
#: before it is refused: a dialing daemon sends its hello as soon as it connects.
LINK_HELLO_GRACE_S = 1.0

#: UDP clients from one source address: at most half of MAX_UDP_CLIENTS, so one
#: host (or one spoofed address) cannot take every UDP slot.
MAX_UDP_CLIENTS_PER_IP = MAX_UDP_CLIENTS // 2

# -- timeouts ---------------------------------------------------------------------------

#: Seconds a connection may hold an unfinished line (bytes without their newline)
#: before it is dropped: a "slow loris" trickling a line that never ends would
#: otherwise hold a connection slot and a buffer forever.  No one types for 30 s without
#: Enter in ``nc`` -- a terminal sends the line only on Enter.
LINE_TIMEOUT_S = 30.0

#: There is no idle timeout for chat clients: people stay connected, silent, for
#: hours.  Dead peers are reaped by TCP keepalive instead: a peer silent for
#: KEEPALIVE_IDLE_S is probed every KEEPALIVE_INTERVAL_S, and dropped after
#: KEEPALIVE_COUNT unanswered probes (about ten minutes in all).
KEEPALIVE_IDLE_S = 300
KEEPALIVE_INTERVAL_S = 60
KEEPALIVE_COUNT = 5

# -- time -----------------------------------------------------------------------------

#: Seconds a message's time may be ahead of ours before it counts as "in the future":
#: LAN clocks kept by NTP agree to well under a second, a clock set by hand to within a
#: few minutes.  A message further ahead is stored as sent but shown marked, kept by
#: retention for as long as one received now, and never moves our own clock.
FUTURE_SKEW_S = 300.0

#: Seconds lanchatd takes at most to shut down on SIGTERM, whatever its peers and
#: clients do: below systemd's TimeoutStopSec=10s, so it is never killed mid-flush.
SHUTDOWN_TIMEOUT_S = 8.0

#: Seconds a shutdown gives its links to say bye together before it cuts the ones
#: whose peers stopped reading (their goodbye could not be sent anyway).
LINK_BYE_GRACE_S = 1.0

#: Seconds a thread waits for the router to take and answer one hand-off (a link's
#: batch, a join, ``lanchat send``) before it gives up and drops that connection: a
#: healthy router answers in milliseconds even under load (one commit of at most
#: MAX_COMMIT_BATCH messages), so this only ends waits that would otherwise be for ever.
ROUTER_HANDOFF_TIMEOUT_S = 30.0

# -- signed feeds (lanchat.feed) ----------------------------------------------------------

#: Longest signed entry body, in bytes.  The body is ASCII JSON (``ensure_ascii``): a text
#: of MAX_TEXT_BYTES made of control characters becomes ``\\u00XX`` (6 bytes each), astral
#: characters in nick, host and ``to`` become 12-byte surrogate pairs; with the fixed fields
#: that is about 28 KiB at worst (tests/test_feed.py builds it), so anything longer is hostile.
MAX_ENTRY_BODY_BYTES = 32 * 1024

#: Most entries one signature vouches for: a run (consecutive entries of one origin, the
#: last one signed, the rest held by the hash chain) is at most this long, so it fits one
#: ``msgs`` frame (linkproto.MAX_BATCH, the same number).
MAX_RUN_ENTRIES = 64

#: An origin signs every entry whose seq is a multiple of this, besides the last entry of
#: every batch it appends: from any seq, a signed entry is at most MAX_RUN_ENTRIES - 1
#: entries ahead, so every stretch of a feed can be sent as runs of at most MAX_RUN_ENTRIES.
SIGN_INTERVAL = MAX_RUN_ENTRIES

# -- origins (each daemon's feed of messages; see lanchat.linkproto) ----------------------

#: Most origins (node ids) a daemon keeps a cursor for.  A network has at most
#: presence.MAX_NODES daemons at once; node ids change rarely (a reinstall, a cloned
#: state directory that makes itself a new identity), so four times that leaves room
#: for the ones retention has not yet emptied.  Past it, an origin that holds no
#: retained message is forgotten first; if none does, a new origin is refused.  At
#: about 40 bytes of cursor each (more in a ``sync``), the whole map stays under 200 KiB.
MAX_ORIGINS = 4096

#: New origins one link may introduce at once, and per second after that (a token
#: bucket per link).  A daemon joining a full network learns every live origin --
#: at most presence.MAX_NODES -- from its first link; after that a new origin is a
#: new daemon, a few a day.  A peer inventing origins is held to this, so one link
#: cannot fill MAX_ORIGINS on its own in less than about an hour.
NEW_ORIGINS_BURST = 1024
NEW_ORIGINS_PER_S = 1.0

#: Most cursors in one ``sync`` frame: a longer map is sent as pages (``more: true``
#: on all but the last).  Below the 16,384 that daemons before paging refused, so an
#: old peer reads every page (as a whole sync of its own; see lanchat-protocol(7)).
MAX_SYNC_PAGE = 4096

#: Most cursors a receiver accumulates from the pages of one ``sync``; cursors past
#: it are ignored (the peer is then sent those origins again, which it drops as
#: duplicates), never a protocol error: a sync between honest daemons never fails.
MAX_SYNC_CURSORS = 4 * MAX_ORIGINS

# -- rosters (who is connected where; see lanchat.presence) -------------------------------

#: Most users one node's roster may list: a hub's default client limits (1024 TCP
#: connections and 1024 UDP clients) twice over, for a hub configured above them.  A
#: roster listing more is refused whole (logged once per link; the link stays up).
MAX_ROSTER_USERS = 4096

#: Longest signed roster body, in bytes (ASCII JSON, kept verbatim to be relayed): a user
#: takes 100-150 bytes (about 380 with a long host name), so MAX_ROSTER_USERS of them fit
#: several times over; as a JSON string in a frame, every character escaped at worst
#: doubles it, still below linkproto.MAX_LINK_FRAME (4 MiB).  Kept beside the parsed
#: users, the bytes add about a quarter to the ~650 bytes a user costs in memory.
MAX_ROSTER_BODY_BYTES = 1536 * 1024

#: Most users of other nodes a daemon holds, over all rosters: a roster that would
#: take the total past it is refused.  A user costs about 650 bytes in memory (the
#: issue measured 6.5 MB for 10,000), so all rosters together stay near 21 MB,
#: where 1,024 nodes of 10,000 users each would have been about 6.7 GB.
MAX_NETWORK_USERS = 32_768

#: A roster change that makes more than this many people join (or leave) one room is
#: shown as one notice per room (``* bob and 36 others joined #lobby``), not one each:
#: a node coming back with thousands of users must not flood every text client.
PRESENCE_SUMMARY_OVER = 10

#: A room with more than this many members on this hub is *big*: its join and leave
#: notices (ours and the network's) are held for up to PRESENCE_BATCH_S and sent as one
#: notice per kind (``* bob and 36 others joined #lobby``).  Below it every join and leave
#: is shown at once, as in any chat; above it one notice per person would cost the hub the
#: square of the room (5,000 joins x 5,000 members = 25 million lines) and cut the members
#: who cannot read that fast -- whose own leave notices would then flood the rest.
BIG_ROOM_OVER = 50

#: Seconds a big room's join and leave notices are held to be summed up: short enough
#: that a newcomer is announced while people still notice, long enough that a rush of
#: joins (or a hub restart) becomes a handful of lines.
PRESENCE_BATCH_S = 0.5

#: Most nicks a welcome (and ``/join``'s confirmation) names; past it, the count of the
#: rest (``with alice, bob, ... and 4,990 others``).  ``/users`` still lists everyone.
#: A welcome naming the whole of a room of 5,000 is 50 KB per joiner.
WELCOME_MAX_NAMES = 10

#: The line mode's console (lanchat.lineedit) signals the main thread again every this many
#: seconds until it has printed what a receiver thread queued (or left its read, for a
#: wake-up): a signal that lands while the main thread is busy inside readline, or in the
#: handler of the previous one, is only acted on at the next one.
CONSOLE_KICK_INTERVAL_S = 0.05

#: At most this many signals per queued line or wake-up (5 s in all): a main thread that
#: takes longer is not in a read (it prints what is queued when it next reads a line).
CONSOLE_MAX_KICKS = 100

# -- private by default (issue 14: lanchat.tlsid, sniff, pins, seal) ----------------------

#: Seconds a TLS handshake (hub client or link) may take, from the first byte to the
#: end of the handshake.  A LAN handshake takes a few milliseconds; a peer that has not
#: finished after this is stalling and holds a connection slot for nothing.
TLS_HANDSHAKE_TIMEOUT_S = 10.0

#: Seconds the hub waits for a new TCP connection's first byte before it takes the client
#: for a plain text user and sends the greeting: a text client (``nc``) waits to be
#: greeted, while a TLS client sends its ClientHello at once, so silence means plain.
#: Above Linux's minimum retransmission timeout (200 ms), so a ClientHello whose first
#: segment was lost once still arrives in time; short enough that a person at ``nc``
#: barely notices the prompt's delay.
FIRST_BYTE_GRACE_S = 0.3

#: Longest peer certificate (DER) we parse.  Ours is about 300 bytes (an Ed25519 key, a
#: name, two dates, a signature); 4 KiB leaves room for another implementation's
#: extensions and refuses a certificate built to make the parser work.
MAX_PEER_CERT_BYTES = 4096

#: Longest known_hubs or known_peers file read, in bytes: MAX_KNOWN_PINS lines of about
#: 120 bytes (a name, a node id, a key) each, with room for comments.
MAX_PIN_FILE_BYTES = 1024 * 1024

#: Most pins (hubs in known_hubs, peers in known_peers) one file may hold.  A person
#: meets a few hubs; a daemon pins at most every peer it ever links to (presence allows
#: 1,024 live nodes at once).  Past it the file is refused as corrupt, never trimmed.
MAX_KNOWN_PINS = 4096

#: Longest pin name (``host:port``, ``[v6 address]:port``, ``mdns:<instance>``): a DNS
#: name (253) with a port and a prefix.
MAX_PIN_NAME_CHARS = 300

#: Longest signed X25519 key record (lanchat.seal): its body is about 130 bytes of ASCII
#: JSON; anything much longer is not one.
MAX_DH_RECORD_BYTES = 512

#: A sealed direct message's plaintext is padded to a multiple of this many bytes, so its
#: size says only roughly how long the text is (a 2-byte length comes first).
SEAL_PAD_BYTES = 64

#: Longest plaintext a seal holds, in bytes: one message text.
MAX_SEALED_TEXT_BYTES = MAX_TEXT_BYTES

#: Longest sealed direct message in a feed entry's ``seal`` field, in characters: the
#: largest seal (lanchat.seal.MAX_SEAL_BYTES, 4,372 bytes for a text of
#: MAX_SEALED_TEXT_BYTES) in base64url without padding.  Beyond MAX_TEXT_BYTES, which is
#: why a seal has its own field and bound (tests/test_seal.py holds the two in step);
#: the entry body bound (MAX_ENTRY_BODY_BYTES) has room for it.
MAX_SEAL_TEXT_CHARS = 5830

#: Whose X25519 key records a daemon keeps (one per node, the newest ``ver``): as many as
#: the nodes a network roster tracks (presence.MAX_NODES); a record of one more node is
#: not kept (a direct message to it fails until one is forgotten).
MAX_DH_RECORDS = 1024
# -- the full-screen chat client (lanchat.chatmodel, lanchat.chatscreen) ------------------------

#: Lines a chat screen keeps per buffer (room or conversation): a long day in a busy room,
#: a few hundred KB; older lines are dropped from the screen (the daemon keeps the history).
SCREEN_MAX_LINES = 5000

#: Messages loaded into a room's buffer when it is first shown (``lanchat chat``).
SCREEN_HISTORY_ON_ENTRY = 100

#: A paste of more lines than this asks before sending them (one message per line).
SCREEN_PASTE_CONFIRM_OVER = 3

#: Most lines one paste may send: a pasted file is not a conversation.
SCREEN_MAX_PASTE_LINES = 200

#: More join/leave notices than this in a row are folded into one line of the buffer.
SCREEN_FOLD_PRESENCE_OVER = 3

#: Typed lines kept for Up/Down.
SCREEN_INPUT_HISTORY = 500

#: Reconnecting to a daemon (or hub) that went away: first wait, then doubled up to the most.
SCREEN_RECONNECT_FIRST_S = 0.5
SCREEN_RECONNECT_MAX_S = 8.0
