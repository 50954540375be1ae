"""The session recorder: frames and engine results from two PULL sockets into one HDF5 file.

Frames and results arrive on separate sockets in any order; a result is stored in the row of the
frame it answers (matched by session and sequence number; a result that comes first waits).
The recorder stops on the source's ``eos`` once every frame has its result (or the engine sent
its own ``eos``, or ``grace_s`` passed without news), on SIGINT/SIGTERM, or when the disk fills
up; it then prints a summary. What was flushed before a crash stays readable (SWMR).
"""
from __future__ import annotations

import json
import logging
import shutil
import signal
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import zmq

from streamer.protocol import Message, ProtocolError
from streamer.session_file import RESULT_MAPS, SessionWriter, config_json
from streamer.sockets import DEFAULT_HWM, FRAMES_TO_RECORDER, RESULTS_TO_RECORDER, Input
from streamer.source import progress

log = logging.getLogger(__name__)
#: ``stopped_by`` after HDF5 failed to write (the file keeps what was flushed before).
WRITE_ERROR = "write error"


@dataclass
class RecorderConfig:
    """How to record. Endpoints are connected to (the senders bind)."""

    out: str
    frames: str = FRAMES_TO_RECORDER
    #: results endpoint; None records frames only.
    results: str | None = RESULTS_TO_RECORDER
    #: lossless Bitshuffle+LZ4 compression of frames and maps (readers import hdf5plugin).
    compress: bool = False
    #: longest time between flushes to disk, s (what a crash can lose).
    flush_interval_s: float = 0.5
    #: after the source's eos, how long to wait without news for outstanding results, s.
    grace_s: float = 120.0
    #: stop recording cleanly when less than this is free on the output disk, MiB.
    min_free_mib: float = 64.0
    #: queue length of each input socket, messages.
    hwm: int = DEFAULT_HWM
    #: results kept while waiting for their frame (each holds its maps: ~6 MB at 1024^2);
    #: beyond, the oldest is dropped and counted.
    max_pending_results: int = 64


@dataclass
class RecordSummary:
    """What a recording holds and why it stopped."""

    path: str
    frames: int = 0
    results: int = 0
    lost: int = 0
    malformed: dict[str, int] = field(default_factory=dict)
    results_without_frame: int = 0
    stopped_by: str = "running"
    error: str | None = None
    elapsed_s: float = 0.0

    def table(self) -> str:
        rows = [("file", self.path), ("frames", self.frames), ("results", self.results),
                ("frames lost (sequence gaps)", self.lost),
                ("malformed messages", sum(self.malformed.values())),
                ("results without a frame", self.results_without_frame),
                ("stopped by", self.stopped_by), ("elapsed, s", f"{self.elapsed_s:.1f}")]
        text = "\n".join(f"{k:<30} {v}" for k, v in rows)
        if self.malformed:
            text += f"\n{'malformed by reason':<30} {self.malformed}"
        if self.error:
            text += f"\nERROR: {self.error}"
        return text


class Recorder:
    """Records one session; :meth:`run` blocks until it stops and returns the summary."""

    def __init__(self, config: RecorderConfig):
        self.config = config
        self.summary = RecordSummary(path=str(config.out))
        self.stop = threading.Event()
        self.writer: SessionWriter | None = None
        self._rows: dict[tuple[str, int], int] = {}
        self._pending: OrderedDict[tuple[str, int], Message] = OrderedDict()
        self._session: str | None = None
        self._sessions: set[str] = set()
        self._eos_frames = False
        self._eos_results = False
        self._last_news = time.monotonic()
        self._last_disk_check = 0.0
        self._free_estimate = 0

    # --- message handling ----------------------------------------------------------------
    def _reject(self, inp: Input, reason: str, detail: str) -> None:
        inp.malformed.record(ProtocolError(reason, detail))

    def _on_frame(self, msg: Message, inp: Input) -> None:
        frame = msg.arrays["frame"]
        if self.writer is None:
            self._check_disk(force=True, writing=frame.nbytes)
            if self.stop.is_set():
                return
            self.writer = SessionWriter(
                self.config.out, msg, compress=self.config.compress,
                flush_interval_s=self.config.flush_interval_s,
                attrs={"recorder_config": config_json(self.config)})
            log.info("recording %s: %s %s frames", self.config.out, frame.shape, frame.dtype)
        elif frame.shape != self.writer.shape or frame.dtype != self.writer.dtype:
            self._reject(inp, "shape", f"frame {frame.shape} {frame.dtype} does not match the "
                                       f"session's {self.writer.shape} {self.writer.dtype}")
            return
        else:
            self._check_disk(writing=frame.nbytes)
            if self.stop.is_set():
                return
        key = (msg.header["session"], msg.seq)
        self._session = key[0]
        self._sessions.add(key[0])
        self._rows[key] = row = self.writer.add_frame(msg)
        result = self._pending.pop(key, None)
        if result is not None:
            self.writer.add_result(row, result)

    def _on_result(self, msg: Message, inp: Input) -> None:
        head = msg.header
        seq = head.get("frame_seq", msg.seq)
        session = head["session"]
        if session not in self._sessions and self._session is not None:
            session = self._session  # an engine naming its own session answers the source's
        key = (session, int(seq) if isinstance(seq, int) else -1)
        shape = self.writer.shape if self.writer else None
        for name in RESULT_MAPS:
            arr = msg.arrays.get(name)
            if arr is not None and shape is not None and arr.shape != shape:
                self._reject(inp, "shape", f"result map {name!r} {arr.shape} does not match "
                                           f"the frames {shape}")
                return
        row = self._rows.get(key)
        if row is not None:
            self.writer.add_result(row, msg)
            return
        self._pending[key] = msg
        if len(self._pending) > self.config.max_pending_results:
            self._pending.popitem(last=False)
            self.summary.results_without_frame += 1

    def _handle(self, msg: Message, inp: Input, is_results: bool) -> None:
        self._last_news = time.monotonic()
        if msg.kind == "frame":
            self._on_frame(msg, inp)
        elif msg.kind == "result":
            self._on_result(msg, inp)
        elif msg.kind == "eos":
            if is_results:
                self._eos_results = True
            else:
                self._eos_frames = True
                log.info("end of stream from %s after %d frames", msg.header["source"], msg.seq)

    # --- stopping ------------------------------------------------------------------------
    def _check_disk(self, force: bool = False, writing: int = 0) -> None:
        """Stop before the disk fills up: HDF5 cannot recover from a failed write. Checked once
        a second, and whenever the bytes written since the last check may have used the
        margin up."""
        now = time.monotonic()
        self._free_estimate -= writing
        margin = self.config.min_free_mib * 2**20
        if not force and now - self._last_disk_check < 1.0 and self._free_estimate > margin:
            return
        self._last_disk_check = now
        folder = Path(self.config.out).resolve().parent
        self._free_estimate = shutil.disk_usage(folder).free - writing
        free_mib = self._free_estimate / 2**20
        if free_mib < self.config.min_free_mib:
            self._fail("disk full", f"only {free_mib:.1f} MiB free on {folder} (the minimum is "
                                    f"{self.config.min_free_mib:g} MiB, --min-free-mib)")

    def _fail(self, why: str, detail: str) -> None:
        """Stop with an error. After a write error only what was flushed is certain."""
        writer, fatal = self.writer, why == WRITE_ERROR
        n = 0 if writer is None else writer.n_flushed if fatal else writer.n_frames
        kept = f"the {n} frames {'flushed before' if fatal else 'recorded'}"
        self.summary.error = (f"recording stopped ({why}): {detail}. {self.config.out} keeps "
                              f"{kept}; free some space and start a new recording.")
        self.summary.stopped_by = why
        log.error(self.summary.error)
        self.stop.set()

    def _finished(self) -> bool:
        if not self._eos_frames:
            return False
        if self.config.results is None or self._eos_results:
            return True
        writer = self.writer
        if writer is None or writer.n_results >= writer.n_frames:
            return True
        return time.monotonic() - self._last_news > self.config.grace_s

    # --- main loop -----------------------------------------------------------------------
    def run(self) -> RecordSummary:
        """Record until eos, a signal, ``stop`` or a write error; return the summary."""
        cfg, t0 = self.config, time.monotonic()
        frames_in = Input(cfg.frames, hwm=cfg.hwm, accept=("frame", "eos", "heartbeat"),
                          name="recorder frames")
        inputs = [(frames_in, False)]
        if cfg.results:
            inputs.append((Input(cfg.results, hwm=cfg.hwm,
                                 accept=("result", "eos", "heartbeat"),
                                 name="recorder results"), True))
        poller = zmq.Poller()
        for inp, _ in inputs:
            poller.register(inp.socket, zmq.POLLIN)
        restore = self._install_signal_handlers()
        bar = progress(None, "recording")
        try:
            while not self.stop.is_set():
                ready = dict(poller.poll(100))
                for inp, is_results in inputs:
                    if inp.socket in ready:
                        for msg in inp.drain(16):  # bounded: flushes stay on time
                            self._handle(msg, inp, is_results)
                if self.writer is not None:
                    bar.update(self.writer.n_frames - bar.n)
                    self.writer.flush()
                self._check_disk()
                if self._finished():
                    self.summary.stopped_by = "eos"
                    break
        except (OSError, RuntimeError) as exc:  # h5py reports a failed flush as RuntimeError
            self._fail(WRITE_ERROR, f"{type(exc).__name__}: {exc}")
        finally:
            bar.close()
            restore()
            self._close(frames_in, [inp for inp, _ in inputs], t0)
        return self.summary

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def on_signal(signum, _frame):
            self.summary.stopped_by = signal.Signals(signum).name
            self.stop.set()

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return lambda: [signal.signal(s, h) for s, h in old.items()]

    def _close(self, frames_in: Input, inputs: list[Input], t0: float) -> None:
        s = self.summary
        s.lost = frames_in.lost
        s.malformed = {}
        for inp in inputs:
            for reason, n in inp.malformed.as_dict().items():
                s.malformed[reason] = s.malformed.get(reason, 0) + n
            inp.close()
        s.results_without_frame += len(self._pending)
        s.elapsed_s = time.monotonic() - t0
        if s.stopped_by == "running":
            s.stopped_by = "stop"
        if self.writer is not None:
            s.frames, s.results = self.writer.n_frames, self.writer.n_results
            if s.stopped_by != WRITE_ERROR:
                try:
                    self.writer.flush(force=True)
                    self.writer.close({"summary": json.dumps(asdict(s)),
                                       "frames_lost": s.lost,
                                       "stopped_by": s.stopped_by})
                except (OSError, RuntimeError) as exc:
                    self._fail(WRITE_ERROR, f"{type(exc).__name__}: {exc}")
                    self.writer.abandon()
            else:
                self.writer.abandon()
            if s.stopped_by == WRITE_ERROR:  # beyond the last flush nothing is certain
                s.frames = self.writer.n_flushed
