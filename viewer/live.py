"""The live feed: a worker thread subscribed to the engine's results and the source's frames.

The worker owns its ZeroMQ sockets (:class:`streamer.sockets.Subscriber`), decodes every
message, appends every result's column table to a :class:`~viewer.history.ColumnHistory`
(small), and keeps only the newest result and a few recent frames (large) for the GUI thread,
which takes them from a timer. It never blocks the publishers: PUB/SUB drops what a slow viewer
cannot take.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

from streamer.protocol import Message
from streamer.sockets import Subscriber
from viewer.history import ColumnHistory

#: seconds over which message rates are averaged.
RATE_WINDOW_S = 2.0
#: frames kept so that a result can be shown beside the frame it answers.
RECENT_FRAMES = 16
POLL_MS = 50


@dataclass(frozen=True)
class FeedStats:
    """What the status bar shows. Rates in messages/s over the last 2 s, latency in ms.

    ``idle_s``: seconds since the last message of any kind (since the start if none came).
    ``results_lost``: results missing as sequence gaps here (the viewer's PUB/SUB drops);
    ``engine_skipped``: frames the engine dropped under overload (from the newest result);
    ``frames_lost``: raw frames missing as sequence gaps here.
    """

    results_per_s: float
    frames_per_s: float
    results_received: int
    latency_ms: float | None
    results_lost: int
    engine_skipped: int
    frames_lost: int
    backend: str
    model_id: str
    idle_s: float
    ever_received: bool
    malformed: int


class _Rate:
    def __init__(self) -> None:
        self.times: deque[float] = deque()

    def tick(self, now: float) -> None:
        self.times.append(now)

    def per_s(self, now: float) -> float:
        while self.times and self.times[0] < now - RATE_WINDOW_S:
            self.times.popleft()
        return len(self.times) / RATE_WINDOW_S


class LiveFeed:
    """Subscribe to ``results`` endpoints (and ``frames`` endpoints) on a worker thread.

    ``history`` receives every result's column table. :meth:`take` gives the GUI the newest
    result and its frame; :meth:`stats` the counters. Call :meth:`start`, then :meth:`stop`.
    """

    def __init__(
        self,
        results: Sequence[str],
        frames: Sequence[str] = (),
        history: ColumnHistory | None = None,
    ):
        self.results_endpoints = list(results)
        self.frames_endpoints = list(frames)
        self.history = history if history is not None else ColumnHistory()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._result: Message | None = None
        self._frames: OrderedDict[int, Message] = OrderedDict()
        self._generation = 0
        self._result_rate, self._frame_rate = _Rate(), _Rate()
        self._received = 0
        self._started = time.monotonic()
        self._last_message: float | None = None
        self._counters = {"results_lost": 0, "frames_lost": 0, "malformed": 0}

    def start(self) -> LiveFeed:
        if not self.results_endpoints and not self.frames_endpoints:
            raise ValueError("no endpoint to subscribe to")
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="viewer-feed", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        # one SUB socket connected to every endpoint; results and frames are told apart by kind
        sub = Subscriber(
            self.results_endpoints + self.frames_endpoints,
            topics=("result", "frame", "heartbeat", "eos"),
            name="viewer",
        )
        try:
            while not self._stop.is_set():
                if sub.socket.poll(POLL_MS):
                    self._take_in(sub.drain(limit=64))
                with self._lock:
                    self._counters = {
                        "results_lost": sub.sequences["result"].lost,
                        "frames_lost": sub.sequences["frame"].lost,
                        "malformed": sub.malformed.total,
                    }
        finally:
            sub.close()

    def _take_in(self, messages: list[Message]) -> None:
        if not messages:
            return
        now = time.monotonic()
        for msg in messages:
            if msg.kind == "result":
                self.history.append(msg.header, msg.arrays)
        with self._lock:
            self._last_message = now
            for msg in messages:
                if msg.kind == "result":
                    self._result_rate.tick(now)
                    self._result = msg
                    self._received += 1
                    self._generation += 1
                elif msg.kind == "frame":
                    self._frame_rate.tick(now)
                    self._frames[msg.seq] = msg
                    while len(self._frames) > RECENT_FRAMES:
                        self._frames.popitem(last=False)
                    if self._result is None:  # frames only: each one is news
                        self._generation += 1

    def take(self) -> tuple[int, Message | None, Message | None]:
        """(generation, newest result, the frame it answers or else the newest frame).

        ``generation`` grows with every message that changes what should be shown.
        """
        with self._lock:
            result = self._result
            frame = None
            if result is not None:
                frame = self._frames.get(int(result.header.get("frame_seq", result.seq)))
            if frame is None and self._frames:
                frame = next(reversed(self._frames.values()))
            return self._generation, result, frame

    def stats(self) -> FeedStats:
        now = time.monotonic()
        with self._lock:
            head = self._result.header if self._result is not None else {}
            last = self._last_message
            return FeedStats(
                results_per_s=self._result_rate.per_s(now),
                frames_per_s=self._frame_rate.per_s(now),
                results_received=self._received,
                latency_ms=head.get("latency_ms"),
                results_lost=self._counters["results_lost"],
                engine_skipped=int(head.get("skipped", 0) or 0),
                frames_lost=self._counters["frames_lost"],
                backend=str(head.get("backend", "")),
                model_id=str(head.get("model_id", "")),
                idle_s=now - (last if last is not None else self._started),
                ever_received=last is not None,
                malformed=self._counters["malformed"],
            )
