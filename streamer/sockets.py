"""ZeroMQ links between SegDepth Live processes, speaking :mod:`streamer.protocol`.

Point-to-point links are ROUTER (bind, at the sender: :class:`Output`) -> DEALER (connect, at
the receiver: :class:`Input`) with a small flow-control layer (docs/PROTOCOL.md "Link"):

* the receiver says ``ready`` (its credit: messages it may hold, and the last link sequence
  number it has finished with) when it connects and then at least every
  :data:`READY_INTERVAL_S`;
* the sender serves **one** reader: the first to say ready. Another reader is refused (it is
  told so and counted in ``Output.refused``) while the first is alive, so a stray second
  reader can never take half of a stream. When the reader dies, the next one to connect takes
  over and first gets every message the dead one had not acknowledged (the resend window,
  at most ``hwm`` messages): nothing is lost across a receiver restart;
* data messages are ``[b"data", link_seq (u64 little-endian), topic, header, buffers...]``.

The delivery *mode* is the sender's:

* ``replay`` -- lossless and back-pressured: :meth:`Output.send` waits while ``hwm`` messages
  are unacknowledged or no reader is connected (saying so in the log after
  :data:`NO_READER_NOTICE_S`). It polls in short slices so that ``Output.stop`` or the
  optional timeout interrupts it; it then returns False.
* ``live`` -- the sender never blocks: a message that cannot go out at once (no reader, window
  full) is dropped and counted in ``Output.dropped``; the receiver sees exactly those as gaps in
  sequence numbers (``Input.sequences["frame"]``, including before its first frame).

Viewers get PUB/SUB (:class:`Publisher` bind / :class:`Subscriber` connect) with a small
high-water mark: the newest messages, lossy by design (CONFLATE does not work for multipart
messages, so a viewer drains with :meth:`Subscriber.drain`).

Every receiver validates frames against :class:`~streamer.protocol.FrameLimits` before it
allocates for them, and sets ZMQ_MAXMSGSIZE from them (a bigger part closes the connection).
Every bind goes through :func:`streamer.security.secure_server` (CURVE + ZAP when keys are
configured; a non-loopback bind without keys is refused), every connect through
:func:`~streamer.security.secure_client`. Buffers of at least :data:`ZERO_COPY_MIN_BYTES` are
sent zero-copy: the caller must not modify an array after handing it to ``send``.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Collection, Sequence
from typing import Any

import msgpack
import zmq

from streamer.protocol import (
    DEFAULT_LIMITS,
    FrameLimits,
    MalformedCounter,
    Message,
    ProtocolError,
    SequenceTracker,
    compress_parts,
    decode,
)
from streamer.security import EndpointError, secure_client, secure_server, split_endpoint

#: default endpoints (docs/CONTRACTS.md "Sockets"); sender binds, receiver connects.
FRAMES_TO_ENGINE = "tcp://127.0.0.1:5555"
FRAMES_TO_RECORDER = "tcp://127.0.0.1:5556"
RESULTS_TO_RECORDER = "tcp://127.0.0.1:5557"
RESULTS_TO_VIEWER = "tcp://127.0.0.1:5558"
FRAMES_TO_VIEWER = "tcp://127.0.0.1:5559"

MODES = ("replay", "live")
#: default high-water mark (messages queued per socket, each side) of PUSH/PULL links.
DEFAULT_HWM = 32
#: high-water mark of viewer PUB/SUB links: a viewer only wants the newest messages.
VIEWER_HWM = 4
#: parts at least this large are sent without copying (below it zero-copy costs more).
ZERO_COPY_MIN_BYTES = 64 * 1024
#: slice of a blocking wait between checks of the stop flag, in seconds.
POLL_SLICE_S = 0.05
#: longest wait at process exit for queued messages to go out, in seconds.
EXIT_LINGER_S = 5.0
#: s a replay-mode output waits at close for a slow receiver to take what is still queued.
REPLAY_LINGER_S = 120.0
#: s a live-mode output waits at close (live data is not waited for).
LIVE_LINGER_S = 2.0
#: s between a receiver's ``ready`` messages (credit, acknowledgement, heartbeat).
READY_INTERVAL_S = 0.2
#: s a waiting sender goes without a reader before it says so in the log.
NO_READER_NOTICE_S = 1.5
#: s a closing sender waits for a new reader once its reader has left with messages
#: unacknowledged (a restarted recorder or engine takes that long to come back).
READERLESS_WAIT_S = 10.0
#: link message tags (docs/PROTOCOL.md "Link").
DATA, READY, WELCOME, REFUSED, PING = b"data", b"ready", b"welcome", b"refused", b"ping"
_SEQ = struct.Struct("<Q")

log = logging.getLogger(__name__)


def free_tcp_endpoint(host: str = "127.0.0.1") -> str:
    """A ``tcp://HOST:PORT`` endpoint on a port that is free right now (loopback by default)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


def shutdown(linger_s: float = EXIT_LINGER_S) -> None:
    """Let queued messages go out (at most ``linger_s``), then close every socket of the
    default context. Runs at exit; call it yourself before ``os._exit`` (e.g. at the end of a
    multiprocessing child). Without it, a process that exits right after a zero-copy send can
    crash while libzmq still reads buffers Python has already freed."""
    from streamer.security import stop_zap

    stop_zap(zmq.Context.instance())
    zmq.Context.instance().destroy(linger=int(linger_s * 1000))


# pyzmq's zero-copy garbage collector drops its references to sent buffers at exit; atexit
# runs handlers last-in first-out, so ours is registered after it exists and runs before it.
import zmq.utils.garbage  # noqa: E402,F401

atexit.register(shutdown)


def _nbytes(part: Any) -> int:
    nbytes = getattr(part, "nbytes", None)
    return len(part) if nbytes is None else int(nbytes)


def _send_parts(sock: zmq.Socket, parts: Sequence[Any], flags: int) -> None:
    """Send one multipart message; large parts zero-copy. Raises zmq.Again on a full queue.

    ZeroMQ applies the high-water mark to whole messages: once the first part is queued, the
    remaining parts are too, so a NOBLOCK send never leaves half a message behind.
    """
    last = len(parts) - 1
    for i, part in enumerate(parts):
        more = zmq.SNDMORE if i < last else 0
        sock.send(part, flags | more, copy=_nbytes(part) < ZERO_COPY_MIN_BYTES, track=False)


class EndpointInUse(OSError):
    """The address of an endpoint is held by another socket (the message names the fix)."""


def _bind(sock: zmq.Socket, endpoint: str, retry_s: float = 2.0) -> bool:
    """Secure and bind, retrying briefly while the address is still held (a just-closed socket
    of this or a restarted process releases it asynchronously); True when CURVE-encrypted.
    Raises EndpointError (no scheme, insecure non-loopback) or EndpointInUse."""
    try:
        split_endpoint(endpoint)
        encrypted = secure_server(sock, endpoint)
    except BaseException:
        sock.close(0)
        raise
    deadline = time.monotonic() + retry_s
    while True:
        try:
            sock.bind(endpoint)
            return encrypted
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EADDRINUSE and time.monotonic() < deadline:
                time.sleep(POLL_SLICE_S)
                continue
            sock.close(0)
            if exc.errno == zmq.EADDRINUSE:
                raise EndpointInUse(
                    f"{endpoint} is already in use (another segdepth serve/replay/watch "
                    f"still running?): stop it, or choose another port for this option"
                ) from None
            raise EndpointError(f"cannot bind {endpoint}: {exc}") from None


def _connect(sock: zmq.Socket, endpoint: str) -> bool:
    """Secure and connect; True when CURVE-encrypted (the peer proved its server key)."""
    try:
        split_endpoint(endpoint)
        encrypted = secure_client(sock)
        sock.connect(endpoint)
        return encrypted
    except zmq.ZMQError as exc:
        sock.close(0)
        raise EndpointError(f"cannot connect to {endpoint}: {exc}") from None
    except BaseException:
        sock.close(0)
        raise


class Output:
    """Sending end of a point-to-point link (ROUTER, binds ``endpoint``; one reader at a time).

    ``mode``: ``replay`` (lossless, waits for the reader) or ``live`` (never blocks, drops and
    counts). ``hwm``: messages unacknowledged at once (the resend window). ``linger_s``: how
    long :meth:`close` may wait for the reader to acknowledge what is outstanding; default
    :data:`REPLAY_LINGER_S` in replay mode, :data:`LIVE_LINGER_S` in live mode. Counters:
    ``sent`` (messages, first sends), ``dropped`` (live mode), ``resent`` (to a reader that
    replaced a dead one), ``refused`` (extra readers turned away), ``unacknowledged`` (left
    at close). Set ``stop`` (a threading.Event) to interrupt a waiting :meth:`send`.
    ``compress``: send buffers compressed (:func:`streamer.protocol.compress_parts`); default:
    when the link is CURVE-encrypted, where it cuts the bytes to encrypt 4-5x for noisy frames.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        mode: str = "replay",
        hwm: int = DEFAULT_HWM,
        ctx: zmq.Context | None = None,
        linger_s: float | None = None,
        compress: bool | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if hwm < 1:
            raise ValueError(f"hwm must be >= 1, got {hwm}")
        self.endpoint = endpoint
        self.mode = mode
        self.window = hwm
        self.sent = self.dropped = self.resent = self.refused = self.unacknowledged = 0
        self.stop = threading.Event()
        self.linger_s = (
            (REPLAY_LINGER_S if mode == "replay" else LIVE_LINGER_S)
            if linger_s is None
            else linger_s
        )
        self._instance = os.urandom(6).hex()
        self._next = 0
        self._unacked: deque[tuple[int, list]] = deque()
        self._peer: bytes | None = None
        self._credit = 0
        self._refused_ids: set[bytes] = set()
        self._no_reader_since: float | None = None
        self._said_no_reader = False
        self.socket = (ctx or zmq.Context.instance()).socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.socket.setsockopt(zmq.SNDHWM, 2 * hwm + 16)
        self.socket.setsockopt(zmq.MAXMSGSIZE, 4096)  # only small ready messages come in
        self.socket.setsockopt(zmq.LINGER, 1000)
        encrypted = _bind(self.socket, endpoint)
        self.compress = encrypted if compress is None else compress

    # --- the reader's side of the conversation ------------------------------------------
    def _service(self, timeout_ms: int = 0) -> None:
        """Handle every ``ready`` waiting (at most ``timeout_ms`` for the first)."""
        if timeout_ms and not self.socket.poll(timeout_ms, zmq.POLLIN):
            return
        while int(self.socket.getsockopt(zmq.EVENTS)) & zmq.POLLIN:  # cheaper than zmq.Again
            try:
                parts = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(parts) != 3 or parts[1] != READY:
                continue  # a peer that does not speak the link: ignore it
            try:
                info = msgpack.unpackb(parts[2], raw=False)
                credit, ack, sender = int(info["credit"]), int(info["ack"]), info["sender"]
            except Exception:  # likewise
                continue
            self._on_ready(parts[0], credit, ack, sender)

    def _alive(self, peer: bytes) -> bool:
        try:
            self.socket.send_multipart([peer, PING], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            return exc.errno != zmq.EHOSTUNREACH
        return True

    def _on_ready(self, peer: bytes, credit: int, ack: int, sender: str) -> None:
        if sender == self._instance:  # a reader this sender served: what it finished is safe
            while self._unacked and self._unacked[0][0] <= ack:
                self._unacked.popleft()
        if peer != self._peer:
            if self._peer is not None and self._alive(self._peer):
                if sender != self._instance:  # (late words of a former reader: no stranger)
                    self._refuse(peer)
                return
            self._accept(peer)
        self._credit = max(1, credit)

    def _refuse(self, peer: bytes) -> None:
        try:
            self.socket.send_multipart(
                [
                    peer,
                    REFUSED,
                    msgpack.packb(
                        {"reason": f"{self.endpoint} already has a reader (point-to-point link)"}
                    ),
                ],
                zmq.NOBLOCK,
            )
        except zmq.ZMQError:
            pass
        if peer not in self._refused_ids:
            self._refused_ids.add(peer)
            self.refused += 1
            log.warning(
                "%s: a second reader connected and was refused (this link serves one "
                "reader; viewers use the PUB feeds); refused so far: %d",
                self.endpoint,
                self.refused,
            )

    def _accept(self, peer: bytes) -> None:
        had = self._peer is not None
        self._peer, self._no_reader_since, self._said_no_reader = peer, None, False
        try:
            self.socket.send_multipart(
                [peer, WELCOME, msgpack.packb({"v": 1, "sender": self._instance})], zmq.NOBLOCK
            )
            for seq, parts in self._unacked:
                self._route(seq, parts)
        except zmq.ZMQError:
            self._peer = None
            return
        if self._unacked:
            self.resent += len(self._unacked)
            log.warning(
                "%s: a new reader took over; resent the %d messages the previous "
                "one had not acknowledged",
                self.endpoint,
                len(self._unacked),
            )
        elif had:
            log.info("%s: a new reader took over", self.endpoint)

    def _route(self, seq: int, parts: Sequence[Any]) -> None:
        _send_parts(self.socket, [self._peer, DATA, _SEQ.pack(seq), *parts], zmq.NOBLOCK)

    def _note_waiting(self) -> None:
        if self._peer is not None:
            return
        now = time.monotonic()
        if self._no_reader_since is None:
            self._no_reader_since = now
        elif not self._said_no_reader and now - self._no_reader_since > NO_READER_NOTICE_S:
            self._said_no_reader = True
            log.warning(
                "%s: no reader connected yet (start the program that reads it, or "
                "set this output to 'none'); waiting",
                self.endpoint,
            )

    @property
    def last_sent(self) -> int:
        """Link sequence number of the latest message sent (-1 before the first)."""
        return self._next - 1

    @property
    def acknowledged_upto(self) -> int:
        """Every message up to this link sequence number was acknowledged by a reader (as of
        the last :meth:`service`)."""
        return self._unacked[0][0] - 1 if self._unacked else self._next - 1

    def service(self) -> None:
        """Take in the reader's acknowledgements and credit waiting on the socket (call it
        between sends to keep :attr:`acknowledged_upto` current)."""
        self._service()

    @property
    def connected(self) -> bool:
        """Whether a reader is being served."""
        self._service()
        return self._peer is not None

    def wait_for_reader(self, timeout_s: float) -> bool:
        """Wait until a reader is connected (at most ``timeout_s``); True if one is."""
        deadline = time.monotonic() + timeout_s
        while not self.connected and time.monotonic() < deadline:
            self._service(int(POLL_SLICE_S * 1000))
        return self._peer is not None

    # --- sending ------------------------------------------------------------------------
    def _try_send(self, parts: Sequence[Any]) -> bool:
        self._service()
        while self._peer is not None and len(self._unacked) < min(self.window, self._credit):
            try:
                self._route(self._next, parts)
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EHOSTUNREACH:  # the reader is gone; keep the window
                    self._peer = None
                    continue
                if exc.errno == zmq.EAGAIN:
                    return False
                raise
            self._unacked.append((self._next, list(parts)))
            self._next += 1
            self.sent += 1
            return True
        return False

    def send(
        self, parts: Sequence[Any], timeout_s: float | None = None, *, wait: bool | None = None
    ) -> bool:
        """Send one encoded message (:func:`streamer.protocol.encode` parts); True if sent.

        ``wait`` (default: True in replay mode, False in live mode) waits for a reader and room
        in the window, at most ``timeout_s`` seconds (None: until sent or ``stop`` is set). A
        message not sent is counted in ``dropped`` when it was not waited for.
        """
        if wait is None:
            wait = self.mode == "replay"
        if self.compress:
            parts = compress_parts(parts)
        if self._try_send(parts):
            return True
        if not wait:
            self.dropped += 1
            return False
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.stop.is_set():
            left = (
                POLL_SLICE_S if deadline is None else min(POLL_SLICE_S, deadline - time.monotonic())
            )
            if left <= 0:
                return False
            self._note_waiting()
            self._service(max(1, int(left * 1000)))
            if self._try_send(parts):
                return True
        return False

    def flush(self, timeout_s: float, stop: threading.Event | None = None) -> bool:
        """Wait until the reader acknowledged everything sent (at most ``timeout_s``; ``stop``
        ends the wait); True if nothing is outstanding. A reader that replaces a dead one
        gets the outstanding messages first."""
        deadline = time.monotonic() + timeout_s
        readerless_since: float | None = None
        while (
            self._unacked
            and time.monotonic() < deadline
            and not (stop is not None and stop.is_set())
        ):
            if self._peer is not None and not self._alive(self._peer):
                self._peer = None  # the reader left (e.g. it finished at the eos)
            now = time.monotonic()
            if self._peer is None:
                readerless_since = readerless_since or now
                if now - readerless_since > READERLESS_WAIT_S:
                    break  # nobody came back to take the rest
            else:
                readerless_since = None
            self._note_waiting()
            self._service(int(POLL_SLICE_S * 1000))
        return not self._unacked

    def close(self, linger_s: float | None = None) -> None:
        """Wait up to ``linger_s`` (default: the constructor's) for the reader to acknowledge
        what is outstanding, then close; what is left is counted in ``unacknowledged``."""
        if not self.socket.closed:
            self.flush(self.linger_s if linger_s is None else linger_s)
            self.unacknowledged = len(self._unacked)
            if self._unacked:
                log.warning(
                    "%s: %d messages were never acknowledged by a reader",
                    self.endpoint,
                    len(self._unacked),
                )
            self._unacked.clear()
            self.socket.close(0)

    def stats(self) -> dict[str, int]:
        return {
            "sent": self.sent,
            "dropped": self.dropped,
            "resent": self.resent,
            "refused_readers": self.refused,
            "unacknowledged": self.unacknowledged,
        }

    def __enter__(self) -> Output:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Receiver:
    """Shared receiving logic: decode, validate, count malformed messages and sequence gaps."""

    def __init__(
        self,
        sock: zmq.Socket,
        endpoints: str | Sequence[str],
        hwm: int,
        accept: Collection[str] | None,
        check_finite: bool,
        name: str,
        limits: FrameLimits,
        allow_codec: bool | None = None,
    ):
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        self.accept = None if accept is None else frozenset(accept)
        self.check_finite = check_finite
        self.limits = limits
        self.malformed = MalformedCounter(name)
        #: gaps in sequence numbers per kind (``frame``, ``result``).
        self.sequences = {"frame": SequenceTracker(), "result": SequenceTracker()}
        self.socket = sock
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, limits.max_part_bytes)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        encrypted = all([_connect(sock, ep) for ep in self.endpoints])
        #: compressed buffers are taken from authenticated (CURVE) senders only, by default
        self.allow_codec = encrypted if allow_codec is None else allow_codec

    def _decode(self, parts: list) -> Message | None:
        try:
            msg = decode(
                parts,
                check_finite=self.check_finite,
                limits=self.limits,
                allow_codec=self.allow_codec,
            )
            if self.accept is not None and msg.kind not in self.accept:
                raise ProtocolError("topic", f"unexpected {msg.kind!r} message here")
        except ProtocolError as err:
            self.malformed.record(err)
            return None
        tracker = self.sequences.get(msg.kind)
        if tracker is not None:
            tracker.update(msg.header["session"], msg.seq)
        elif msg.kind == "eos" and self.sequences["frame"].session == msg.header["session"]:
            # frames sent after the last one received are lost too
            self.sequences["frame"].end(msg.header["session"], msg.seq)
        return msg

    def _take(self, parts: list) -> Message | None:
        """A received multipart message as a valid protocol message, or None."""
        return self._decode(parts)

    def _idle(self) -> None:
        """Called whenever nothing is waiting (a link sends its acknowledgements here)."""

    def recv(self, timeout_s: float | None = None) -> Message | None:
        """The next valid message, or None after ``timeout_s`` seconds (None: wait forever).

        Malformed messages are counted in ``malformed`` and skipped (the wait goes on).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:  # the common case first: a message waiting, no poll needed
                msg = self._take(self.socket.recv_multipart(zmq.NOBLOCK, copy=False))
                if msg is not None:
                    return msg
                continue
            except zmq.Again:
                pass
            self._idle()
            left = (
                POLL_SLICE_S if deadline is None else min(POLL_SLICE_S, deadline - time.monotonic())
            )
            if left <= 0:
                return None
            self.socket.poll(max(1, int(left * 1000)), zmq.POLLIN)

    def drain(self, limit: int = 1000) -> list[Message]:
        """Every valid message already waiting (at most ``limit``), without blocking."""
        out: list[Message] = []
        for _ in range(limit):
            try:
                parts = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            msg = self._take(parts)
            if msg is not None:
                out.append(msg)
        self._idle()
        return out

    @property
    def lost(self) -> int:
        """Frames missing as sequence gaps so far."""
        return self.sequences["frame"].lost

    def stats(self) -> dict[str, Any]:
        """Counters for a summary: per-kind sequence tracking and malformed counts by reason."""
        return {
            "frames": self.sequences["frame"].as_dict(),
            "results": self.sequences["result"].as_dict(),
            "malformed": self.malformed.as_dict(),
        }

    def close(self) -> None:
        self.socket.close(0)

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Input(_Receiver):
    """Receiving end of a point-to-point link (DEALER, connects to one sender's ``endpoint``).

    ``accept``: the kinds expected here (others are counted as malformed, reason ``topic``);
    None accepts all. ``check_finite``: reject float buffers holding NaN/Inf. ``limits``: the
    frames accepted (others counted as malformed with their reason). ``hwm``: the credit
    granted to the sender (messages in flight). ``auto_ack``: a message is acknowledged as
    :meth:`recv`/:meth:`drain` returns it (a reader killed before it has used the message
    loses it); with False the owner calls :meth:`ack` once the
    messages delivered so far are safe (e.g. on disk), and the sender resends the rest to a
    restarted reader. ``allow_codec``: accept compressed buffers (default: when the link is
    CURVE-encrypted, i.e. the sender is authenticated). Counters: ``malformed``,
    ``sequences`` (gaps per kind), ``duplicates`` (resent messages already held),
    ``refused`` (the sender's reason, while it has another reader; None otherwise).
    """

    def __init__(
        self,
        endpoint: str | Sequence[str],
        *,
        hwm: int = DEFAULT_HWM,
        ctx: zmq.Context | None = None,
        accept: Collection[str] | None = None,
        check_finite: bool = True,
        name: str | None = None,
        limits: FrameLimits = DEFAULT_LIMITS,
        auto_ack: bool = True,
        allow_codec: bool | None = None,
    ):
        endpoints = [endpoint] if isinstance(endpoint, str) else list(endpoint)
        if len(endpoints) != 1:
            raise ValueError("an Input reads exactly one sender's endpoint")
        self.credit = max(1, hwm)
        self.auto_ack = auto_ack
        self.duplicates = 0
        self.refused: str | None = None
        self._sender = ""  # instance id of the sender that welcomed this reader
        self._last = -1  # last link sequence number received from it
        self._acked = -1  # last one finished with
        self._acked_sent: int | None = None
        self._last_ready = 0.0
        sock = (ctx or zmq.Context.instance()).socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, b"r" + os.urandom(7))
        sock.setsockopt(zmq.SNDHWM, 4)  # stale ready messages are worthless: drop them
        # libzmq ends (does not retry) a connection whose peer broke ZMQ_MAXMSGSIZE or the
        # wire protocol: a monitor notices, and the link is opened again (counted: ``size``)
        self._monitor = sock.get_monitor_socket(
            zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_CONNECTED
        )
        self._dropped_at: float | None = None
        super().__init__(
            sock,
            endpoints[0],
            self.credit + 8,
            accept,
            check_finite,
            name or f"input {endpoints[0]}",
            limits,
            allow_codec,
        )
        self._ready()

    def _watch_connection(self) -> None:
        from zmq.utils.monitor import parse_monitor_message

        while self._monitor.poll(0):
            event = parse_monitor_message(self._monitor.recv_multipart())["event"]
            self._dropped_at = time.monotonic() if event == zmq.EVENT_DISCONNECTED else None
        if self._dropped_at is not None and time.monotonic() - self._dropped_at > 0.5:
            self._dropped_at = None  # dropped for good: the sender broke the limits
            self.malformed.record(
                ProtocolError(
                    "size",
                    f"the sender's connection was dropped (a part above "
                    f"{self.limits.max_part_bytes} bytes, or not ZMTP); reconnecting",
                )
            )
            try:
                self.socket.disconnect(self.endpoints[0])
            except zmq.ZMQError:
                pass
            self.socket.connect(self.endpoints[0])
            self._ready()

    def _ready(self) -> None:
        try:
            self.socket.send_multipart(
                [
                    READY,
                    msgpack.packb(
                        {"v": 1, "credit": self.credit, "ack": self._acked, "sender": self._sender}
                    ),
                ],
                zmq.NOBLOCK,
            )
        except zmq.Again:
            return
        self._acked_sent, self._last_ready = self._acked, time.monotonic()

    def _idle(self) -> None:
        self._watch_connection()
        if (
            self._acked != self._acked_sent
            or time.monotonic() - self._last_ready > READY_INTERVAL_S
        ):
            self._ready()

    def service(self) -> None:
        """Send the acknowledgement/heartbeat if due (call it when polling the socket
        yourself; :meth:`recv` and :meth:`drain` do it)."""
        self._idle()

    @property
    def pending_ack(self) -> int:
        """Messages delivered but not yet acknowledged (``auto_ack=False``)."""
        return self._last - self._acked

    def ack(self, upto: Message | None = None) -> None:
        """Acknowledge every message delivered so far, or up to and including ``upto``
        (``auto_ack=False``). Only records it: the acknowledgement goes out with the next
        :meth:`recv`, :meth:`drain` or :meth:`service` of the thread that owns the socket, so
        another thread (e.g. the one that published a frame's result) may call it."""
        last = self._last if upto is None else min(upto.link_seq, self._last)
        if upto is not None and upto.link_seq < 0:
            return
        if last > self._acked:
            self._acked = last

    def close(self) -> None:
        """Close, first telling the sender what was finished with (the rest is resent to the
        next reader)."""
        if not self.socket.closed:
            self._ready()
            self.socket.disable_monitor()
            self._monitor.close(0)
            self.socket.close(200)

    def _take(self, parts: list) -> Message | None:
        tag = parts[0].bytes if parts else b""
        if tag == DATA and len(parts) >= 2 and len(parts[1]) == _SEQ.size:
            seq = _SEQ.unpack(parts[1].bytes)[0]
            if seq <= self._last:
                self.duplicates += 1
                return None
            self._last = seq
            msg = self._decode(parts[2:])
            if msg is not None:
                msg.link_seq = seq
            if self.auto_ack:  # (manual: a skipped message is covered by the next ack())
                self._acked = seq
            if self._acked - (self._acked_sent or -1) >= max(1, self.credit // 2) or (
                self._acked != self._acked_sent
                and not int(self.socket.getsockopt(zmq.EVENTS)) & zmq.POLLIN
            ):
                self._ready()  # half the credit used, or caught up: acknowledge now
            return msg
        if tag == WELCOME:
            try:
                sender = str(msgpack.unpackb(parts[1].bytes, raw=False)["sender"])
            except Exception:
                sender = ""
            if sender != self._sender:  # a new sender: its link numbers start again
                self._sender, self._last, self._acked = sender, -1, -1
            if self.refused is not None:
                log.info("%s: now served by %s", self.malformed.where, self.endpoints[0])
            self.refused = None
            self._ready()
            return None
        if tag == REFUSED:
            if self.refused is None:
                try:
                    reason = str(msgpack.unpackb(parts[1].bytes, raw=False)["reason"])
                except Exception:
                    reason = "refused"
                self.refused = reason
                log.error(
                    "%s: refused: %s. Stop the other reader (or read a viewer feed); "
                    "this one keeps trying",
                    self.malformed.where,
                    reason,
                )
            return None
        if tag == PING:
            return None
        self.malformed.record(
            ProtocolError("parts", "not a link message (is the sender a SegDepth Live output?)")
        )
        return None


class Publisher:
    """Viewer feed (PUB, binds ``endpoint``): never blocks; drops silently at its small HWM."""

    def __init__(self, endpoint: str, *, hwm: int = VIEWER_HWM, ctx: zmq.Context | None = None):
        self.endpoint = endpoint
        self.sent = 0
        self.socket = (ctx or zmq.Context.instance()).socket(zmq.PUB)
        self.socket.setsockopt(zmq.SNDHWM, hwm)
        self.socket.setsockopt(zmq.LINGER, 0)
        _bind(self.socket, endpoint)

    def send(self, parts: Sequence[Any]) -> None:
        """Publish one encoded message to whoever is subscribed (none: it is discarded)."""
        _send_parts(self.socket, parts, zmq.NOBLOCK)
        self.sent += 1

    def close(self) -> None:
        self.socket.close(0)

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Subscriber(_Receiver):
    """Viewer side (SUB, connects): receives ``topics`` (message kinds; default all).

    Lossy by design: use :meth:`drain` on a timer and keep the newest messages.
    """

    def __init__(
        self,
        endpoint: str | Sequence[str],
        *,
        topics: Collection[str] = ("",),
        hwm: int = VIEWER_HWM,
        ctx: zmq.Context | None = None,
        check_finite: bool = True,
        name: str | None = None,
        limits: FrameLimits = DEFAULT_LIMITS,
    ):
        sock = (ctx or zmq.Context.instance()).socket(zmq.SUB)
        for topic in topics:
            sock.setsockopt(zmq.SUBSCRIBE, topic.encode("ascii"))
        super().__init__(
            sock, endpoint, hwm, None, check_finite, name or f"subscriber {endpoint}", limits
        )
        # a viewer joins the stream wherever it is: no loss counted before its first message
        self.sequences = {kind: SequenceTracker(count_start=False) for kind in self.sequences}
