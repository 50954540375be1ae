"""``segdepth watch``: publish new camera files in a folder as they appear.

A camera file (TIFF, MRC, DM3/DM4) is published once it is complete: its size and modification
time unchanged for ``settle_s`` and its reader finding all the data. A K3 In-Situ dataset
(``NAME.dm4`` director + ``NAME.raw``, ``NAME.raw_1``, ...) is streamed while it is written:
each frame goes out as soon as its bytes are on disk (memory-mapped; a frame may straddle two
raw files), and the dataset is finished when it stops growing for ``settle_s``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streamer.camera_files import (
    Incomplete,
    K3InSituDataset,
    camera_files,
    is_k3_director,
    raw_files,
    read_camera_file,
)
from streamer.source import FrameSender, SourceConfig

log = logging.getLogger(__name__)
#: a file still unreadable after this many settle times without changing is skipped.
GIVE_UP_SETTLES = 10


@dataclass
class WatchConfig:
    """What to watch and where to send it."""

    folder: str
    #: time between scans of the folder, s.
    poll_s: float = 0.2
    #: a file unchanged (size, mtime) this long is complete; a K3 dataset this long is over, s.
    settle_s: float = 1.0
    #: publish the files already in the folder at start too.
    existing: bool = False
    #: pixel size in pm for files that do not state it (overrides none that do).
    pixel_size_pm: float | None = None
    outputs: SourceConfig = field(default_factory=lambda: SourceConfig(mode="live"))


@dataclass
class _K3State:
    dataset: K3InSituDataset
    next_frame: int = 0
    last_growth: float = field(default_factory=time.monotonic)


class FolderWatcher:
    """Scans ``config.folder`` every ``poll_s`` and publishes what is complete."""

    def __init__(self, config: WatchConfig, stop: threading.Event | None = None):
        self.config = config
        self.folder = Path(config.folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder}: no such folder")
        self.sender = FrameSender(config.outputs, source=f"watch:{self.folder.name}", stop=stop)
        self.stop = self.sender.stop
        self.done: set[Path] = set() if config.existing else set(camera_files(self.folder))
        self.files_published = 0
        self._seen: dict[Path, tuple[int, float, float]] = {}  # size, mtime, unchanged since
        self._k3: dict[Path, _K3State] = {}

    def _pixel(self, stated: float) -> float:
        if self.config.pixel_size_pm is not None and not math.isfinite(stated):
            return self.config.pixel_size_pm
        return stated

    def _settled(self, path: Path, now: float) -> bool:
        st = path.stat()
        key = (st.st_size, st.st_mtime)
        seen = self._seen.get(path)
        if seen is None or seen[:2] != key:
            self._seen[path] = (*key, now)
            return False
        return now - seen[2] >= self.config.settle_s

    def _publish_file(self, path: Path) -> None:
        try:
            stack = read_camera_file(path)
        except Incomplete as exc:
            unchanged_s = time.monotonic() - self._seen[path][2]
            if unchanged_s > GIVE_UP_SETTLES * self.config.settle_s:
                log.error(
                    "skipping %s: unreadable and unchanged for %.0f s (%s)", path, unchanged_s, exc
                )
                self.done.add(path)
            else:
                log.debug("not complete yet: %s", exc)
            return
        except (ValueError, OSError) as exc:
            log.error("skipping %s: %s", path, exc)
            self.done.add(path)
            return
        try:
            pixel = self._pixel(stack.pixel_size_pm)
            for i in range(len(stack)):
                if not self.sender.send(
                    np.asarray(stack.frames[i]),
                    pixel_size_pm=pixel,
                    dose_e_per_px=stack.dose_e_per_px,
                ):
                    return
        finally:
            stack.close()
        self.done.add(path)
        self.files_published += 1
        log.info("published %s (%d frames)", path.name, len(stack))

    def _stream_k3(self, path: Path, now: float) -> None:
        state = self._k3.get(path)
        if state is None:
            try:
                state = self._k3[path] = _K3State(K3InSituDataset(path))
            except Incomplete:
                return
        ds = state.dataset
        available = ds.refresh()
        if available > state.next_frame:
            state.last_growth = now
        pixel = self._pixel(ds.pixel_size_pm)
        while state.next_frame < available:
            if not self.sender.send(ds.frame(state.next_frame), pixel_size_pm=pixel):
                return
            state.next_frame += 1
        finished = ds.recorded_frames is not None and state.next_frame >= ds.recorded_frames
        stalled = (
            state.next_frame > 0
            and now - state.last_growth >= self.config.settle_s
            and all(self._settled(p, now) for p in raw_files(path))
        )
        if finished or stalled:  # (a director without raw data yet waits for it)
            self.done.add(path)
            del self._k3[path]
            self.files_published += 1
            log.info("published K3 In-Situ dataset %s (%d frames)", path.name, state.next_frame)

    def poll_once(self) -> None:
        """One scan: publish every file (or new K3 frames) that became ready."""
        now = time.monotonic()
        for path in camera_files(self.folder):
            if path in self.done or self.stop.is_set():
                continue
            try:
                if path in self._k3:
                    self._stream_k3(path, now)
                elif not self._settled(path, now):
                    continue
                elif is_k3_director(path):
                    self._stream_k3(path, now)
                else:
                    self._publish_file(path)
            except FileNotFoundError:  # removed while we looked
                self._seen.pop(path, None)

    def run(self) -> dict:
        """Watch until ``stop`` is set; then send eos. Returns the sender's stats."""
        log.info("watching %s for new camera files", self.folder)
        try:
            while not self.stop.is_set():
                self.poll_once()
                self.stop.wait(self.config.poll_s)
        finally:
            self.sender.end()
            stats = self.sender.stats()
            self.sender.close()
        stats["files"] = self.files_published
        return stats
