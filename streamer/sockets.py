"""ZeroMQ links between SegDepth Live processes, speaking :mod:`streamer.protocol`.

Point-to-point links are PUSH (bind, at the sender: :class:`Output`) -> PULL (connect, at the
receiver: :class:`Input`). The delivery *mode* is the sender's:

* ``replay`` -- lossless and back-pressured: :meth:`Output.send` waits while the receiver's queue
  is full (or while no receiver is connected). It polls in short slices so that a shutdown
  (``Output.stop``, SIGINT) or the optional timeout interrupts it; it then returns False.
* ``live`` -- the sender never blocks: a message that cannot be queued at once is dropped and
  counted in ``Output.dropped``; the receiver sees the loss as a gap in sequence numbers
  (``Input.sequences["frame"]``).

Viewers get PUB/SUB (:class:`Publisher` bind / :class:`Subscriber` connect) with a small
high-water mark: the newest messages, lossy by design (PUB drops silently at its HWM; ZeroMQ's
CONFLATE does not work for multipart messages, so a viewer drains with :meth:`Subscriber.drain`).

Buffers of at least :data:`ZERO_COPY_MIN_BYTES` are sent zero-copy: the caller must not modify
an array after handing it to ``send``. Received arrays are read-only views on the message memory.

Messages in flight towards a receiver that crashes (its queues and the kernel's socket buffers)
are lost with it; when it comes back it is picked up again automatically (the connect side
reconnects), and the frames it missed show up as a sequence gap. Sockets bind/connect to
whatever endpoint is given; the defaults below are loopback only.
"""
from __future__ import annotations

import atexit
import logging
import socket
import threading
import time
from typing import Any, Collection, Sequence

import zmq

from streamer.protocol import (MalformedCounter, Message, ProtocolError, SequenceTracker,
                               decode)

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


def _bind(sock: zmq.Socket, endpoint: str, retry_s: float = 2.0) -> None:
    """Bind, retrying briefly while the address is still held (a just-closed socket of this or a
    restarted process releases it asynchronously)."""
    deadline = time.monotonic() + retry_s
    while True:
        try:
            sock.bind(endpoint)
            return
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                sock.close(0)
                raise
            time.sleep(POLL_SLICE_S)


class Output:
    """Sending end of a point-to-point link (PUSH, binds ``endpoint``).

    ``mode``: ``replay`` (lossless, waits for the receiver) or ``live`` (never blocks, drops and
    counts). ``hwm``: messages queued before back-pressure (replay) or dropping (live).
    ``linger_s``: how long :meth:`close` (and process exit) may wait to deliver queued messages;
    default :data:`REPLAY_LINGER_S` in replay mode (lossless: a slow receiver still gets every
    queued frame after the source has finished), :data:`LIVE_LINGER_S` in live mode.
    Counters: ``sent``, ``dropped`` (live mode only). Set ``stop`` (a threading.Event) to
    interrupt a waiting :meth:`send` from another thread or a signal handler.
    """

    def __init__(self, endpoint: str, *, mode: str = "replay", hwm: int = DEFAULT_HWM,
                 ctx: zmq.Context | None = None, linger_s: float | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.endpoint = endpoint
        self.mode = mode
        self.sent = 0
        self.dropped = 0
        self.stop = threading.Event()
        self.socket = (ctx or zmq.Context.instance()).socket(zmq.PUSH)
        self.socket.setsockopt(zmq.SNDHWM, hwm)
        if linger_s is None:
            linger_s = REPLAY_LINGER_S if mode == "replay" else LIVE_LINGER_S
        self.socket.setsockopt(zmq.LINGER, int(linger_s * 1000))
        _bind(self.socket, endpoint)

    def send(self, parts: Sequence[Any], timeout_s: float | None = None, *,
             wait: bool | None = None) -> bool:
        """Send one encoded message (:func:`streamer.protocol.encode` parts); True if queued.

        ``wait`` (default: True in replay mode, False in live mode) waits for room, at most
        ``timeout_s`` seconds (None: until sent or ``stop`` is set). A message not queued is
        counted in ``dropped`` when it was not waited for. Control messages (``eos``) of a live
        source should be sent with ``wait=True`` and a timeout.
        """
        if wait is None:
            wait = self.mode == "replay"
        if not wait:
            try:
                _send_parts(self.socket, parts, zmq.NOBLOCK)
            except zmq.Again:
                self.dropped += 1
                return False
            self.sent += 1
            return True
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.stop.is_set():
            try:  # the common case first: room in the queue, no poll needed
                _send_parts(self.socket, parts, zmq.NOBLOCK)
                self.sent += 1
                return True
            except zmq.Again:
                pass
            left = POLL_SLICE_S if deadline is None else min(POLL_SLICE_S,
                                                            deadline - time.monotonic())
            if left < 0:
                return False
            self.socket.poll(max(1, int(left * 1000)), zmq.POLLOUT)
        return False

    def close(self, linger_s: float | None = None) -> None:
        """Close the socket, waiting up to ``linger_s`` (default: the constructor's) to deliver."""
        self.socket.close(None if linger_s is None else int(linger_s * 1000))

    def __enter__(self) -> "Output":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Receiver:
    """Shared receiving logic: decode, count malformed messages and sequence gaps."""

    def __init__(self, sock: zmq.Socket, endpoints: str | Sequence[str], hwm: int,
                 accept: Collection[str] | None, check_finite: bool, name: str):
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        self.accept = None if accept is None else frozenset(accept)
        self.check_finite = check_finite
        self.malformed = MalformedCounter(name)
        #: gaps in sequence numbers per kind (``frame``, ``result``).
        self.sequences = {"frame": SequenceTracker(), "result": SequenceTracker()}
        self.socket = sock
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        for ep in self.endpoints:
            sock.connect(ep)

    def _decode(self, parts: list) -> Message | None:
        try:
            msg = decode(parts, check_finite=self.check_finite)
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

    def recv(self, timeout_s: float | None = None) -> Message | None:
        """The next valid message, or None after ``timeout_s`` seconds (None: wait forever).

        Malformed messages are counted in ``malformed`` and skipped (the wait goes on).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:  # the common case first: a message waiting, no poll needed
                msg = self._decode(self.socket.recv_multipart(zmq.NOBLOCK, copy=False))
                if msg is not None:
                    return msg
                continue
            except zmq.Again:
                pass
            left = POLL_SLICE_S if deadline is None else min(POLL_SLICE_S,
                                                            deadline - time.monotonic())
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
            msg = self._decode(parts)
            if msg is not None:
                out.append(msg)
        return out

    @property
    def lost(self) -> int:
        """Frames missing as sequence gaps so far."""
        return self.sequences["frame"].lost

    def stats(self) -> dict[str, Any]:
        """Counters for a summary: per-kind sequence tracking and malformed counts by reason."""
        return {"frames": self.sequences["frame"].as_dict(),
                "results": self.sequences["result"].as_dict(),
                "malformed": self.malformed.as_dict()}

    def close(self) -> None:
        self.socket.close(0)

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Input(_Receiver):
    """Receiving end of a point-to-point link (PULL, connects to one or more ``endpoint``\\ s).

    ``accept``: the kinds expected here (others are counted as malformed, reason ``topic``);
    None accepts all. ``check_finite``: reject float buffers holding NaN/Inf. Counters:
    ``malformed`` (:class:`~streamer.protocol.MalformedCounter`), ``sequences`` (gaps per kind).
    """

    def __init__(self, endpoint: str | Sequence[str], *, hwm: int = DEFAULT_HWM,
                 ctx: zmq.Context | None = None, accept: Collection[str] | None = None,
                 check_finite: bool = True, name: str | None = None):
        sock = (ctx or zmq.Context.instance()).socket(zmq.PULL)
        super().__init__(sock, endpoint, hwm, accept, check_finite, name or f"input {endpoint}")


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

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Subscriber(_Receiver):
    """Viewer side (SUB, connects): receives ``topics`` (message kinds; default all).

    Lossy by design: use :meth:`drain` on a timer and keep the newest messages.
    """

    def __init__(self, endpoint: str | Sequence[str], *, topics: Collection[str] = ("",),
                 hwm: int = VIEWER_HWM, ctx: zmq.Context | None = None,
                 check_finite: bool = True, name: str | None = None):
        sock = (ctx or zmq.Context.instance()).socket(zmq.SUB)
        for topic in topics:
            sock.setsockopt(zmq.SUBSCRIBE, topic.encode("ascii"))
        super().__init__(sock, endpoint, hwm, None, check_finite,
                         name or f"subscriber {endpoint}")
