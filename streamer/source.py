"""What every frame source shares: numbering, sending to engine/recorder/viewers, pacing, eos.

Used by the replayer, the folder watcher and the K3 bridge, so all of them put the same
sequence numbers, session id and ``mode`` on the wire and end with an ``eos``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np

from streamer.protocol import encode_control, encode_frame
from streamer.sockets import (
    DEFAULT_HWM,
    FRAMES_TO_ENGINE,
    FRAMES_TO_VIEWER,
    MODES,
    Output,
    Publisher,
)

log = logging.getLogger(__name__)


@dataclass
class SourceConfig:
    """Where a source sends its frames. An endpoint of None (or "none") is not opened.

    In ``replay`` mode every point-to-point output waits for its receiver: leave out the ones
    nobody will read. Viewers (PUB) never hold a source back.
    """

    mode: str = "replay"
    to_engine: str | None = FRAMES_TO_ENGINE
    to_recorder: str | None = None
    to_viewer: str | None = FRAMES_TO_VIEWER
    hwm: int = DEFAULT_HWM
    #: how long the final eos may wait for a receiver, s.
    eos_timeout_s: float = 10.0
    #: how long closing may wait for receivers to acknowledge everything after the user
    #: stopped the source (Ctrl-C), s; an undisturbed end waits the outputs' full linger.
    stopped_linger_s: float = 0.5


def _enabled(endpoint: str | None) -> TypeGuard[str]:
    return endpoint is not None and endpoint != "" and endpoint.lower() != "none"


class FrameSender:
    """Numbers frames of one session and sends them to every configured output.

    ``source``: a short name of the origin (file path, ``k3``...). ``stop``: an event that
    interrupts waiting sends (default: a new one); ``send`` then returns False.
    """

    def __init__(
        self,
        config: SourceConfig,
        *,
        source: str,
        session: str | None = None,
        stop: threading.Event | None = None,
    ):
        if config.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {config.mode!r}")
        self.config = config
        self.source = source
        self.session = session or uuid.uuid4().hex[:12]
        self.seq = 0
        self.stop = stop or threading.Event()
        self.outputs: dict[str, Output] = {}
        self.viewer: Publisher | None = None
        self._interrupted = False
        try:
            for name in ("to_engine", "to_recorder"):
                endpoint = getattr(config, name)
                if _enabled(endpoint):
                    out = Output(endpoint, mode=config.mode, hwm=config.hwm)
                    out.stop = self.stop
                    self.outputs[name] = out
            if _enabled(config.to_viewer):
                self.viewer = Publisher(config.to_viewer)
        except Exception:
            self.close()
            raise

    def send(
        self,
        frame: np.ndarray,
        *,
        pixel_size_pm: float,
        t_acq: float | None = None,
        dose_e_per_px: float | None = None,
        **fields: Any,
    ) -> bool:
        """Send one (H, W) frame; True unless stopped. Never blocks in live mode."""
        extra = dict(fields)
        if dose_e_per_px is not None and math.isfinite(dose_e_per_px):
            extra["dose_e_per_px"] = float(dose_e_per_px)
        parts = encode_frame(
            frame,
            session=self.session,
            seq=self.seq,
            source=self.source,
            pixel_size_pm=pixel_size_pm,
            t_acq=t_acq,
            mode=self.config.mode,
            **extra,
        )
        self.seq += 1
        for out in self.outputs.values():
            if not out.send(parts) and self.stop.is_set():
                return False
        if self.viewer is not None:
            self.viewer.send(parts)
        return True

    def end(self) -> None:
        """Send ``eos`` (``seq`` = frames sent) to every output, waiting a bounded time (a
        moment only when the source was stopped: Ctrl-C must act at once)."""
        parts = encode_control("eos", session=self.session, seq=self.seq, source=self.source)
        self._interrupted = self.stop.is_set()
        timeout = self.config.stopped_linger_s if self._interrupted else self.config.eos_timeout_s
        for name, out in self.outputs.items():
            out.stop = threading.Event()  # a stopped source still says goodbye (bounded wait)
            if not out.send(parts, timeout_s=timeout, wait=True):
                log.warning(
                    "eos to %s (%s) not delivered within %.1f s", name, out.endpoint, timeout
                )
        if self.viewer is not None:
            self.viewer.send(parts)

    def stats(self) -> dict[str, Any]:
        """Frames numbered, and per output the messages sent and dropped."""
        return {
            "frames": self.seq,
            "session": self.session,
            **{name: o.stats() for name, o in self.outputs.items()},
        }

    def close(self) -> None:
        """Close every output: each waits for its reader to acknowledge what it holds (its
        linger; a moment only when the source was stopped)."""
        interrupted = self._interrupted or self.stop.is_set() and not self.seq
        self.stop.set()
        for out in self.outputs.values():
            out.close(self.config.stopped_linger_s if interrupted else None)
        if self.viewer is not None:
            self.viewer.close()


def progress(total: int | None, desc: str):
    """A tqdm progress bar over frames (shown on terminals only)."""
    from tqdm import tqdm

    return tqdm(total=total, unit=" frames", desc=desc, disable=None)


class Pacer:
    """Waits until each frame's due time: ``wait(offset_s)`` returns at start + offset / speed.

    A source that falls behind does not burst to catch up by more than ``max_lag_s``.
    ``stop`` interrupts the wait (it then returns False).
    """

    def __init__(self, stop: threading.Event, speed: float = 1.0, max_lag_s: float = 0.5):
        self.stop = stop
        self.speed = speed
        self.max_lag_s = max_lag_s
        self._start: float | None = None

    def restart(self, offset_s: float) -> None:
        """Make ``offset_s`` due now (e.g. once the first frame went out: time spent waiting
        for consumers to connect must not be caught up in a burst)."""
        self._start = time.monotonic() - offset_s / self.speed

    def wait(self, offset_s: float) -> bool:
        now = time.monotonic()
        if self._start is None:
            self._start = now - offset_s / self.speed
        due = self._start + offset_s / self.speed
        if now - due > self.max_lag_s:  # fell behind: shift the schedule, do not burst
            self._start += now - due - self.max_lag_s
        delay = due - now
        return not self.stop.wait(delay) if delay > 0 else not self.stop.is_set()
