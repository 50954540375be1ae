"""The session recorder: frames and engine results from two PULL sockets into one HDF5 file.

Frames and results arrive on separate sockets in any order; a result is stored in the row of the
frame it answers (matched by session and sequence number; a result that comes first waits).
The recorder follows one session, the first whose frame it gets: frames, results and ``eos``
of any other session are refused and counted (``foreign``), so only the session's own source
ends a recording. It stops on that ``eos`` once every frame has its result (or the engine sent
its own ``eos``, or ``grace_s`` passed without news), on SIGINT/SIGTERM, or before the disk
fills up (a reserve of at least :data:`MIN_RESERVE_MIB` stays free); it then prints a summary.

Messages are acknowledged to their senders only once flushed to disk, so a recorder killed and
restarted loses nothing: the sender resends what was not on disk. A restarted recorder finds
its previous file unfinished, recovers it (:func:`streamer.session_file.recover`) and records
into ``NAME.1.h5`` (``.2``...) beside it, continuing that session's loss accounting.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import zmq

from streamer.protocol import Message, ProtocolError
from streamer.session_file import RESULT_MAPS, SessionWriter, config_json, needs_recovery, recover
from streamer.sockets import DEFAULT_HWM, FRAMES_TO_RECORDER, RESULTS_TO_RECORDER, Input
from streamer.source import progress

log = logging.getLogger(__name__)
#: ``stopped_by`` after HDF5 failed to write (the file keeps what was flushed before).
WRITE_ERROR = "write error"
#: smallest free-space reserve, MiB: HDF5 needs room to flush and close a file cleanly.
MIN_RESERVE_MIB = 16.0
#: bytes a row may need beyond its maps (metadata, column series, chunk index), B.
ROW_OVERHEAD_BYTES = 64 * 1024


def next_free_name(path: Path) -> Path:
    """``NAME.1.h5``, ``NAME.2.h5``... beside ``path``: the first that does not exist."""
    for k in range(1, 10_000):
        candidate = path.with_name(f"{path.stem}.{k}{path.suffix}")
        if not candidate.exists():
            return candidate
    raise FileExistsError(f"no free file name beside {path}")


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
    #: stop recording cleanly when less than this is free on the output disk, MiB
    #: (at least MIN_RESERVE_MIB).
    min_free_mib: float = 64.0
    #: queue length of each input socket, messages.
    hwm: int = DEFAULT_HWM
    #: results kept while waiting for their frame (each holds its maps: ~6 MB at 1024^2);
    #: beyond, the oldest is dropped and counted.
    max_pending_results: int = 64
    #: replace a complete recording found at ``out`` (otherwise it is refused; an unfinished
    #: one is always recovered and continued beside it).
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.min_free_mib >= MIN_RESERVE_MIB:
            raise ValueError(
                f"--min-free-mib {self.min_free_mib:g} is too small: the recorder "
                f"keeps at least {MIN_RESERVE_MIB:g} MiB free so that HDF5 can "
                f"close the file cleanly"
            )
        folder = Path(self.out).resolve().parent
        if not folder.is_dir():
            raise FileNotFoundError(
                f"cannot record to {self.out}: the folder {folder} does "
                f"not exist (create it, or choose another --out)"
            )
        if not os.access(folder, os.W_OK):
            raise PermissionError(
                f"cannot record to {self.out}: the folder {folder} is not "
                f"writable (choose another --out)"
            )
        if Path(self.out).exists() and not self.overwrite and not needs_recovery(self.out):
            raise FileExistsError(
                f"{self.out} already holds a finished file; choose another --out, or pass "
                f"--overwrite to replace it"
            )


@dataclass
class RecordSummary:
    """What a recording holds and why it stopped."""

    path: str
    frames: int = 0
    results: int = 0
    lost: int = 0
    malformed: dict[str, int] = field(default_factory=dict)
    results_without_frame: int = 0
    #: frames recorded that never got their result (e.g. queued in an engine that crashed).
    frames_without_result: int = 0
    #: results for a frame that already had one (a restarted engine answering again what
    #: its crashed predecessor had sent); the first is kept.
    duplicate_results: int = 0
    #: frames, results and eos of sessions other than the one recorded (refused).
    foreign: dict[str, int] = field(default_factory=dict)
    #: the session recorded, and the earlier file this one continues (after a crash).
    session: str = ""
    continues: str = ""
    stopped_by: str = "running"
    error: str | None = None
    elapsed_s: float = 0.0

    def table(self) -> str:
        rows = [
            ("file", self.path),
            ("frames", self.frames),
            ("results", self.results),
            ("frames lost (sequence gaps)", self.lost),
            ("malformed messages", sum(self.malformed.values())),
            ("results without a frame", self.results_without_frame),
            ("frames without a result", self.frames_without_result),
            ("duplicate results (ignored)", self.duplicate_results),
            ("other sessions refused", sum(self.foreign.values())),
            ("stopped by", self.stopped_by),
            ("elapsed, s", f"{self.elapsed_s:.1f}"),
        ]
        text = "\n".join(f"{k:<30} {v}" for k, v in rows)
        if self.malformed:
            text += f"\n{'malformed by reason':<30} {self.malformed}"
        if self.foreign:
            text += f"\n{'other sessions, by kind':<30} {self.foreign}"
        if self.continues:
            text += f"\n{'continues':<30} {self.continues}"
        if self.error:
            text += f"\nERROR: {self.error}"
        return text


class Recorder:
    """Records one session; :meth:`run` blocks until it stops and returns the summary."""

    def __init__(self, config: RecorderConfig):
        self.config = config
        self.out = Path(config.out)
        self.summary = RecordSummary(path=str(config.out))
        self.stop = threading.Event()
        self.writer: SessionWriter | None = None
        self._rows: dict[int, int] = {}
        self._answered: set[int] = set()  # sequence numbers of frames with a result
        self._pending: OrderedDict[int, Message] = OrderedDict()
        self._session: str | None = None
        self._resume: tuple[str, int] | None = None  # (session, last seq) of a crashed file
        self._eos_frames = False
        self._eos_results = False
        self._last_news = time.monotonic()
        self._last_disk_check = 0.0
        self._free_estimate = 0
        self._row_bytes = 0
        #: per input, the last message handled (written, refused or counted): acknowledged
        #: at the next flush; the results input's stands still while a result waits for its frame
        self._handled: dict[int, Message] = {}

    # --- the previous file -----------------------------------------------------------------
    def _take_over_previous(self) -> None:
        """An unfinished file at ``out`` (a killed recorder): recover it, record beside it."""
        if not self.out.exists() or not needs_recovery(self.out):
            return
        try:
            info = recover(self.out)
        except (OSError, ValueError) as exc:
            log.warning(
                "%s was left unfinished and could not be recovered (%s); recording beside it",
                self.out,
                exc,
            )
        else:
            log.warning(
                "%s was left unfinished by a stopped recorder: recovered (%d rows "
                "kept, %d dropped); this recording continues it",
                self.out,
                info["rows"],
                info["dropped_rows"],
            )
            if info["session_id"]:
                self._resume = (info["session_id"], info["last_seq"])
        self.summary.continues = str(self.out)
        self.out = next_free_name(self.out)
        self.summary.path = str(self.out)

    # --- message handling ----------------------------------------------------------------
    def _reject(self, inp: Input, reason: str, detail: str) -> None:
        inp.malformed.record(ProtocolError(reason, detail))

    def _foreign(self, kind: str, session: str) -> bool:
        """True (and counted) when ``session`` is not the one recorded."""
        if session == self._session:
            return False
        if not self.summary.foreign:
            log.warning(
                "refused a %s of session %r while recording session %r; further "
                "messages of other sessions are counted silently",
                kind,
                session,
                self._session,
            )
        self.summary.foreign[kind] = self.summary.foreign.get(kind, 0) + 1
        return True

    def _start(self, msg: Message) -> bool:
        """Open the file on the first frame; False if the disk has no room."""
        frame = msg.arrays["frame"]
        h, w = frame.shape
        self._row_bytes = frame.nbytes + h * w * 6 + ROW_OVERHEAD_BYTES
        self._check_disk(force=True)
        if self.stop.is_set():
            return False
        self._session = self.summary.session = msg.header["session"]
        self.writer = SessionWriter(
            self.out,
            msg,
            compress=self.config.compress,
            flush_interval_s=self.config.flush_interval_s,
            attrs={
                "recorder_config": config_json(self.config),
                "continues": os.path.basename(self.summary.continues),
            },
        )
        log.info(
            "recording %s: session %s, %s %s frames",
            self.out,
            self._session,
            frame.shape,
            frame.dtype,
        )
        return True

    def _on_frame(self, msg: Message, inp: Input) -> None:
        frame = msg.arrays["frame"]
        if self.writer is None:
            if not self._start(msg):
                return
        elif self._foreign("frame", msg.header["session"]):
            return
        elif frame.shape != self.writer.shape or frame.dtype != self.writer.dtype:
            self._reject(
                inp,
                "shape",
                f"frame {frame.shape} {frame.dtype} does not match the "
                f"session's {self.writer.shape} {self.writer.dtype}",
            )
            return
        else:
            self._check_disk()
            if self.stop.is_set():
                return
        assert self.writer is not None  # _start() opened it
        self._rows[msg.seq] = row = self.writer.add_frame(msg)
        self._free_estimate -= self._row_bytes
        result = self._pending.pop(msg.seq, None)
        if result is not None:
            self.writer.add_result(row, result)
            self._answered.add(msg.seq)
        if self._pending:  # frames come in order: a result for an earlier one has lost its frame
            for seq in [seq for seq in self._pending if seq < msg.seq]:
                del self._pending[seq]
                self.summary.results_without_frame += 1

    def _on_result(self, msg: Message, inp: Input) -> None:
        head = msg.header
        if self._session is not None and self._foreign("result", head["session"]):
            return
        seq = head.get("frame_seq", msg.seq)
        seq = int(seq) if isinstance(seq, int) and not isinstance(seq, bool) else msg.seq
        shape = self.writer.shape if self.writer else None
        for name in RESULT_MAPS:
            arr = msg.arrays.get(name)
            if arr is not None and shape is not None and arr.shape != shape:
                self._reject(
                    inp,
                    "shape",
                    f"result map {name!r} {arr.shape} does not match the frames {shape}",
                )
                return
        if seq in self._answered or seq in self._pending:  # resent by a restarted engine
            self.summary.duplicate_results += 1
            return
        row = self._rows.get(seq)
        if row is not None:
            assert self.writer is not None  # a row exists: the writer does
            self.writer.add_result(row, msg)
            self._answered.add(seq)
            return
        self._pending[seq] = msg
        if len(self._pending) > self.config.max_pending_results:
            self._pending.popitem(last=False)
            self.summary.results_without_frame += 1

    def _holds_ack(self) -> bool:
        """A result waits for a frame still to come (not one already in a crashed file)."""
        if self._resume is None:
            return bool(self._pending)
        return any(seq > self._resume[1] for seq in self._pending)

    def _handle(self, msg: Message, inp: Input, is_results: bool) -> None:
        self._last_news = time.monotonic()
        if msg.kind == "frame":
            self._on_frame(msg, inp)
        elif msg.kind == "result":
            self._on_result(msg, inp)
        elif msg.kind == "eos":
            if self._foreign("eos", msg.header["session"]):
                return
            if is_results:
                self._eos_results = True
            else:
                self._eos_frames = True
                log.info("end of stream from %s after %d frames", msg.header["source"], msg.seq)

    # --- stopping ------------------------------------------------------------------------
    def _check_disk(self, force: bool = False) -> None:
        """Stop before the disk fills up: HDF5 cannot recover from a failed write. Asks the
        disk once a second, and whenever the rows written since may have used the margin
        up (each row is counted at its frame, maps and overhead)."""
        now = time.monotonic()
        margin = self.config.min_free_mib * 2**20 + 2 * self._row_bytes
        if not force and now - self._last_disk_check < 1.0 and self._free_estimate > margin:
            return
        self._last_disk_check = now
        folder = self.out.resolve().parent
        free = shutil.disk_usage(folder).free
        self._free_estimate = free
        if free <= margin:
            self._fail(
                "disk full",
                f"{free / 2**20:.1f} MiB free on {folder}, the reserve is "
                f"{self.config.min_free_mib:g} MiB (--min-free-mib) plus "
                f"two rows",
            )

    def _fail(self, why: str, detail: str) -> None:
        """Stop with an error (logged once). After a write error only what was flushed is
        certain."""
        if self.summary.error is not None:
            return
        writer, fatal = self.writer, why == WRITE_ERROR
        n = 0 if writer is None else writer.n_flushed if fatal else writer.n_frames
        kept = f"the {n} frames {'flushed before' if fatal else 'recorded'}"
        self.summary.error = (
            f"recording stopped ({why}): {detail}. {self.out} keeps "
            f"{kept}; free some space and start a new recording."
        )
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

    def _flush(self, inputs: list[Input], force: bool = False) -> None:
        """Flush on the clock (or when half an input's credit waits for it), then acknowledge
        what is on disk, so senders resend only what a crash could lose."""
        due = force or any(inp.pending_ack >= max(1, inp.credit // 2) for inp in inputs)
        flushed = self.writer is None or self.writer.flush(force=due)
        for inp in inputs:
            last = self._handled.get(id(inp))  # never beyond what was written or refused
            if flushed and last is not None:
                inp.ack(upto=last)
            inp.service()

    # --- main loop -----------------------------------------------------------------------
    def run(self) -> RecordSummary:
        """Record until eos, a signal, ``stop`` or a write error; return the summary."""
        cfg, t0 = self.config, time.monotonic()
        self._take_over_previous()
        frames_in = Input(
            cfg.frames,
            hwm=cfg.hwm,
            accept=("frame", "eos", "heartbeat"),
            name="recorder frames",
            auto_ack=False,
        )
        if self._resume is not None:  # no gap before the first frame the crashed file lacks
            frames_in.sequences["frame"].resume_after(*self._resume)
        inputs = [(frames_in, False)]
        if cfg.results:
            inputs.append(
                (
                    Input(
                        cfg.results,
                        hwm=cfg.hwm,
                        accept=("result", "eos", "heartbeat"),
                        name="recorder results",
                        auto_ack=False,
                    ),
                    True,
                )
            )
        links = [inp for inp, _ in inputs]
        poller = zmq.Poller()
        for inp in links:
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
                            # written, refused or counted; a result waiting for its frame
                            # is not acknowledged (a crash would lose it) until that is written
                            if not self.stop.is_set() and not (is_results and self._holds_ack()):
                                self._handled[id(inp)] = msg
                            if self.stop.is_set():
                                break
                if self.stop.is_set():
                    break
                if self.writer is not None:
                    bar.update(self.writer.n_frames - bar.n)
                self._flush(links)
                self._check_disk()
                if self._finished():
                    self.summary.stopped_by = "eos"
                    break
        except (OSError, RuntimeError) as exc:  # h5py reports a failed flush as RuntimeError
            self._fail(WRITE_ERROR, f"{type(exc).__name__}: {exc}")
        finally:
            bar.close()
            restore()
            self._close(frames_in, links, t0)
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
        s.results_without_frame += len(self._pending)
        s.elapsed_s = time.monotonic() - t0
        if s.stopped_by == "running":
            s.stopped_by = "stop"
        flushed = self.writer is None
        if self.writer is not None:
            s.frames, s.results = self.writer.n_frames, self.writer.n_results
            if self.config.results is not None:
                s.frames_without_result = s.frames - s.results
            if s.stopped_by != WRITE_ERROR:
                try:
                    self.writer.flush(force=True)
                    flushed = True
                    self.writer.close(
                        {
                            "summary": json.dumps(asdict(s)),
                            "frames_lost": s.lost,
                            "stopped_by": s.stopped_by,
                        }
                    )
                except (OSError, RuntimeError) as exc:
                    self._fail(WRITE_ERROR, f"{type(exc).__name__}: {exc}")
                    self.writer.abandon()
            else:
                self.writer.abandon()
            if s.stopped_by == WRITE_ERROR:  # beyond the last flush nothing is certain
                s.frames = self.writer.n_flushed
        for inp in inputs:
            for reason, n in inp.malformed.as_dict().items():
                s.malformed[reason] = s.malformed.get(reason, 0) + n
            if flushed:
                # on disk: the senders may forget it (close() sends it); a message that
                # stopped the recording (disk full) stays with its sender for the next one
                last = self._handled.get(id(inp))
                if s.stopped_by != "disk full":
                    inp.ack()
                elif last is not None:
                    inp.ack(upto=last)
            inp.close()
