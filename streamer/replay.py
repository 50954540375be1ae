"""``segdepth replay``: publish a session file or a folder of camera files as a frame stream.

Sources: a session file (recorded by ``segdepth record`` or simulated, docs/CONTRACTS.md
"Session file"), or a folder of camera files (TIFF, MRC, DM3/DM4, K3 In-Situ datasets) in name
order. Timing: the recorded rate (default; from the timestamps or the frame interval), a given
rate, or as fast as the consumers take them. Frames carry ``dose_e_per_px`` when known; the
stream ends with an ``eos``. Imports only ``streamer``, numpy and h5py (through streamer).
"""

from __future__ import annotations

import argparse
import logging
import math
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streamer import security
from streamer.camera_files import iter_folder
from streamer.cli import add_output_options, source_outputs
from streamer.cli_support import install_stop_signals
from streamer.session_file import open_session
from streamer.source import FrameSender, Pacer, SourceConfig, progress

log = logging.getLogger(__name__)
TIMINGS = ("recorded", "rate", "max")


@dataclass
class ReplayConfig:
    """What to replay and how fast."""

    source: str
    #: ``recorded`` (the session's own rate), ``rate`` (``rate_hz``) or ``max`` (no pacing).
    timing: str = "recorded"
    #: frames per second for ``timing="rate"``.
    rate_hz: float | None = None
    loop: bool = False
    #: pixel size in pm for sources that do not state it (NaN: unknown).
    pixel_size_pm: float | None = None
    outputs: SourceConfig = field(default_factory=SourceConfig)


@dataclass
class _Frame:
    frame: np.ndarray
    t_rec: float | None  # recorded acquisition time, s (None: unknown)
    pixel_size_pm: float
    dose: float


def _session_frames(path: Path) -> tuple[Generator[_Frame, None, None], int, float]:
    session = open_session(path)

    def frames() -> Generator[_Frame, None, None]:
        try:
            for i, frame in session.iter_frames():
                t = None if session.timestamps_s is None else float(session.timestamps_s[i])
                if t is None and math.isfinite(session.frame_interval_s):
                    t = i * session.frame_interval_s
                yield _Frame(frame, t, session.pixel_size_pm, session.dose(i))
        finally:
            session.close()

    return frames(), len(session), session.frame_interval_s


def _folder_frames(path: Path) -> tuple[Generator[_Frame, None, None], int | None, float]:
    def frames() -> Generator[_Frame, None, None]:
        for stack in iter_folder(path):
            for i in range(len(stack)):
                yield _Frame(
                    np.asarray(stack.frames[i]), None, stack.pixel_size_pm, stack.dose_e_per_px
                )

    return frames(), None, math.nan


def open_frames(source: str | Path) -> tuple[Generator[_Frame, None, None], int | None, float]:
    """(frames, count or None, frame interval in s or NaN) of a session file or folder."""
    path = Path(source)
    if path.is_dir():
        return _folder_frames(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such session file or folder")
    return _session_frames(path)


def replay(config: ReplayConfig, stop: threading.Event | None = None) -> dict:
    """Publish the source (``loop``: again and again) and end with eos; returns the stats."""
    if config.timing not in TIMINGS:
        raise ValueError(f"timing must be one of {TIMINGS}")
    if config.timing == "rate" and not (config.rate_hz and config.rate_hz > 0):
        raise ValueError("timing 'rate' needs a positive rate_hz")
    open_frames(config.source)[0].close()  # a missing or unreadable source fails at once
    sender = FrameSender(config.outputs, source=Path(config.source).name, stop=stop)
    pacer = Pacer(sender.stop)
    t0, sent, passes, pass_offset, warned = time.monotonic(), 0, 0, 0.0, False
    try:
        while not sender.stop.is_set():
            frames, count, interval = open_frames(config.source)
            step = interval if math.isfinite(interval) else 0.0
            timing = config.timing
            if timing == "recorded" and count is None and not math.isfinite(interval):
                log.warning(
                    "%s does not say its frame rate: replaying as fast as consumers "
                    "take frames (use --rate HZ to pace it)",
                    config.source,
                )
                timing = "max"
            first_t: float | None = None
            rel = 0.0
            with progress(count, f"replay pass {passes + 1}") as bar:
                for i, item in enumerate(frames):
                    if item.t_rec is not None:
                        first_t = item.t_rec if first_t is None else first_t
                        rel = item.t_rec - first_t
                    else:
                        rel = i * step
                    if timing == "recorded":
                        ok = pacer.wait(pass_offset + rel)
                    elif timing == "rate":
                        ok = pacer.wait(sent / config.rate_hz)  # type: ignore[operator]  # rate_hz checked > 0 above
                    else:
                        ok = not sender.stop.is_set()
                    pixel = (
                        item.pixel_size_pm if config.pixel_size_pm is None else config.pixel_size_pm
                    )
                    if not math.isfinite(pixel) and not warned:
                        warned = True
                        log.warning(
                            "%s does not state its pixel size; the engine needs it: "
                            "pass --pixel-size-pm",
                            config.source,
                        )
                    t_acq = None if item.t_rec is None else item.t_rec + pass_offset
                    if not ok or not sender.send(
                        item.frame, pixel_size_pm=pixel, t_acq=t_acq, dose_e_per_px=item.dose
                    ):
                        break
                    if sent == 0:
                        pacer.restart(pass_offset + rel if timing == "recorded" else 0.0)
                    sent += 1
                    bar.update(1)
            passes += 1
            pass_offset += rel + step
            if not config.loop:
                break
    finally:
        sender.end()
        sender.close()
        stats = sender.stats()
    elapsed = time.monotonic() - t0
    stats.update(passes=passes, elapsed_s=elapsed, rate_hz=sent / elapsed if elapsed else 0.0)
    return stats


def register(commands: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    """Add ``segdepth replay``."""
    p = commands.add_parser(
        "replay",
        help="publish a recorded/simulated session file or a folder of camera files",
        description="Publish the frames of a session file (HDF5: recorded by `segdepth "
        "record` or simulated) or of a folder of camera files (TIFF, MRC, "
        "DM3/DM4, K3 In-Situ NAME.dm4 + NAME.raw*) in the SegDepth Live protocol, "
        "ending with an end-of-stream message.",
    )
    p.add_argument("source", help="session file (.h5) or folder of camera files")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--rate", type=float, metavar="HZ", help="frames per second")
    rate.add_argument(
        "--recorded-rate",
        action="store_true",
        help="the session's own frame rate (default; a folder without timing "
        "information falls back to --max-rate)",
    )
    rate.add_argument(
        "--max-rate",
        action="store_true",
        help="as fast as the consumers take frames (replay mode) or as fast as "
        "possible (live mode)",
    )
    add_output_options(p, "streamer.replay:ReplayConfig")
    p.add_argument("--loop", action="store_true", help="start again at the end, until Ctrl-C")
    p.add_argument(
        "--pixel-size-pm",
        type=float,
        help="pixel size in pm, overriding what the files say (sent with frames)",
    )
    security.add_options(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    timing = "rate" if args.rate else "max" if args.max_rate else "recorded"
    config = ReplayConfig(
        source=args.source,
        timing=timing,
        rate_hz=args.rate,
        loop=args.loop,
        pixel_size_pm=args.pixel_size_pm,
        outputs=source_outputs(args, ReplayConfig),
    )
    security.apply_options(args)
    stats = replay(config, install_stop_signals())
    log.info(
        "replayed %d frames in %.1f s (%.1f frames/s), per output: %s",
        stats["frames"],
        stats["elapsed_s"],
        stats["rate_hz"],
        {k: v for k, v in stats.items() if isinstance(v, dict)},
    )
    return 0
