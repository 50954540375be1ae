# $BACKGROUND$
"""Live K3 bridge: run inside Gatan Microscopy Suite's Python to publish the live view.

GMS has no frame-complete event for the live view, so the bridge polls the live-view image and
publishes a frame whenever its pixels changed (a strided sample is compared). A copy goes out only
once the live view has held still for ``settle_s`` after it was taken, so a copy taken while GMS
was part-way through writing a frame is replaced by the finished frame, never sent. Frames go
out in **live** mode: the camera never waits for a slow consumer; losses are counted as sequence
gaps (docs/K3_BRIDGE.md).

GMS's numpy view of a DM image has the dimensions flipped: DM (x = width, y = height) is numpy
(height, width), which is what the protocol wants for (H, W) frames.

Only :func:`main` touches ``DigitalMicrograph`` (importable inside GMS only); the rest runs and
is tested anywhere. Configuration: edit :data:`CONFIG` below, or set ``SEGDEPTH_K3_*``
environment variables (see :func:`config_from_env`). The first line (``# $BACKGROUND$``) asks
GMS to run the script on a background thread so the UI stays responsive.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamer.camera_files import PM_PER_UNIT
from streamer.source import FrameSender, SourceConfig

log = logging.getLogger("segdepth.k3_bridge")


@dataclass
class BridgeConfig:
    """Bridge settings. Endpoints are bound here (on the microscope PC); to serve an engine on
    another PC, bind the microscope PC's network address instead of 127.0.0.1."""

    #: name of the live-view image window; "" takes the front image.
    image_name: str = ""
    #: time between looks at the live view, s (well below the display frame time).
    poll_s: float = 0.002
    #: pixel size in pm when the image's calibration is missing (NaN: unknown).
    pixel_size_pm: float = math.nan
    #: dose in electrons per pixel per frame, if known (NaN: not sent).
    dose_e_per_px: float = math.nan
    #: take every n-th row and column for change detection.
    sample_stride: int = 7
    #: a copy goes out only if the live view still matches it this long after it was taken, s
    #: (below the live view's frame time; a writer stalled longer mid-frame can still tear).
    settle_s: float = 0.005
    #: stop after this many frames (0: until stopped).
    max_frames: int = 0
    to_engine: str = "tcp://127.0.0.1:5555"
    to_recorder: str = "tcp://127.0.0.1:5556"
    to_viewer: str = "tcp://127.0.0.1:5559"


CONFIG = BridgeConfig()


def config_from_env(base: BridgeConfig = CONFIG) -> BridgeConfig:
    """``base`` with fields overridden by ``SEGDEPTH_K3_<FIELD>`` environment variables."""
    values: dict[str, Any] = {}
    for name, value in vars(base).items():
        raw = os.environ.get(f"SEGDEPTH_K3_{name.upper()}")
        if raw is not None:
            values[name] = type(value)(raw)
    return BridgeConfig(**{**vars(base), **values})


def pixel_size_pm(scale: float, unit: str, default: float = math.nan) -> float:
    """A DM dimension calibration (scale per pixel in ``unit``) in pm per pixel."""
    per_unit = PM_PER_UNIT.get(unit.strip())
    return float(scale) * per_unit if per_unit and scale > 0 else default


class ChangeDetector:
    """Tells new frames from the same frame seen again, by a strided pixel sample, and lets a
    copy out only once the view has held still for ``settle_s`` seconds after it was taken."""

    def __init__(self, stride: int = 7, settle_s: float = 0.0):
        self.stride = stride
        self.settle_s = settle_s
        #: copies dropped because the view changed before they settled (torn or superseded).
        self.unsettled = 0
        self._sent: np.ndarray | None = None  # sample of the last frame sent
        self._pending: np.ndarray | None = None  # copy waiting to settle
        self._pending_t = 0.0
        #: ``now`` at which the last returned copy was taken, s.
        self.taken_s = 0.0

    def sample(self, view: np.ndarray) -> np.ndarray:
        return np.array(view[:: self.stride, :: self.stride], copy=True)

    def _same(self, a: np.ndarray | None, b: np.ndarray) -> bool:
        return a is not None and a.shape == b.shape and np.array_equal(a, b)

    def new_frame(self, view: np.ndarray, now: float) -> np.ndarray | None:
        """A copy of a new frame of ``view`` once it has settled, else None; ``now`` in s."""
        sample = self.sample(view)
        if self._pending is not None:
            if self._same(self._pending[:: self.stride, :: self.stride], sample):
                if now - self._pending_t < self.settle_s:
                    return None
                frame, self._pending, self._sent = self._pending, None, sample
                self.taken_s = self._pending_t
                return frame
            self._pending = None
            self.unsettled += 1
        if self._same(self._sent, sample):
            return None
        self._pending, self._pending_t = np.array(view, copy=True), now
        return None


def run_bridge(
    read_view: Callable[[], np.ndarray],
    sender: FrameSender,
    config: BridgeConfig,
    pixel_pm: float,
    stop: threading.Event,
) -> int:
    """Poll ``read_view`` (the live image as numpy) and send each new frame until ``stop``;
    then send eos. Returns the number of frames published."""
    detector = ChangeDetector(config.sample_stride, config.settle_s)
    dose = config.dose_e_per_px if math.isfinite(config.dose_e_per_px) else None
    n = 0
    try:
        while not stop.is_set() and not (config.max_frames and n >= config.max_frames):
            frame = detector.new_frame(read_view(), time.monotonic())
            if frame is None:
                stop.wait(config.poll_s)
                continue
            t_acq = time.time() - (time.monotonic() - detector.taken_s)
            sender.send(frame, pixel_size_pm=pixel_pm, t_acq=t_acq, dose_e_per_px=dose)
            n += 1
    finally:
        sender.end()
        log.info("%d copies not sent: the view changed before they settled", detector.unsettled)
    return n


def main() -> None:  # pragma: no cover - runs inside GMS only
    import DigitalMicrograph as DM  # noqa: N813  (GMS's module, present only inside GMS)

    logging.basicConfig(level=logging.INFO)
    config = config_from_env()
    image = DM.FindImageByName(config.image_name) if config.image_name else DM.GetFrontImage()
    if image is None or not image.IsValid():
        raise RuntimeError(
            "no live-view image found: start the live view (or name its window "
            "in BridgeConfig.image_name)"
        )
    pixel_pm = pixel_size_pm(
        image.GetDimensionScale(0), image.GetDimensionUnitString(0), config.pixel_size_pm
    )
    sender = FrameSender(
        SourceConfig(
            mode="live",
            to_engine=config.to_engine,
            to_recorder=config.to_recorder,
            to_viewer=config.to_viewer,
        ),
        source="k3",
    )
    log.info(
        "K3 bridge: publishing %s (%d x %d px, %.2f pm/px), session %s",
        image.GetName(),
        image.GetDimensionSize(0),
        image.GetDimensionSize(1),
        pixel_pm,
        sender.session,
    )
    stop = threading.Event()

    def read_view() -> np.ndarray:
        view = image.GetNumArray()
        if not image.IsValid():  # the live-view window was closed: that ends the session
            stop.set()
        return view

    try:
        n = run_bridge(read_view, sender, config, pixel_pm, stop)
    except KeyboardInterrupt:
        n = sender.seq
    finally:
        stats = sender.stats()
        sender.close()
    log.info("K3 bridge stopped after %d frames: %s", n, stats)


if __name__ == "__main__":
    main()
