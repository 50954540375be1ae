"""``segdepth view``: the live viewer's command line (``python -m viewer --help``)."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections import Counter

from streamer.sockets import FRAMES_TO_VIEWER, RESULTS_TO_VIEWER
from streamer.domain import SPECIES_O
from viewer.colormaps import COLORMAPS


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default unless it is empty (None, [], "", False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default in ([], ""):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="segdepth view",
        description="Watch SegDepth Live: raw frame, depth map (0-10 atoms) and confidence side "
                    "by side, columns coloured by species; click a column to plot its depth "
                    "probabilities over time. Subscribes to a running engine (default) or opens "
                    "a recorded session file.",
        formatter_class=HelpFormatter)
    src = p.add_argument_group("source")
    src.add_argument("--results", action="append", metavar="EP",
                     help="engine results endpoint to subscribe to (PUB/SUB; repeatable) "
                          f"[default: {RESULTS_TO_VIEWER}]")
    src.add_argument("--frames", action="append", metavar="EP",
                     help=f"raw frames endpoint (repeatable) [default: {FRAMES_TO_VIEWER}]")
    src.add_argument("--no-frames", action="store_true",
                     help="do not subscribe to raw frames (results only)")
    src.add_argument("--session", metavar="FILE",
                     help="open a recorded or simulated session file (HDF5) instead of a stream")
    src.add_argument("--frame", type=int, default=0, metavar="K",
                     help="session row to show first (0-based)")
    shot = p.add_argument_group("headless screenshot")
    shot.add_argument("--screenshot", metavar="PNG",
                      help="render the session or stream to this PNG offscreen and exit")
    shot.add_argument("--wait", type=float, default=10.0, metavar="S",
                      help="stream screenshot: seconds to wait for the first result")
    shot.add_argument("--collect", type=float, default=3.0, metavar="S",
                      help="stream screenshot: seconds of results gathered for the plots")
    shot.add_argument("--size", default="1600x1000", metavar="WxH",
                      help="window size in screen pixels")
    view = p.add_argument_group("display")
    view.add_argument("--pin", type=int, action="append", default=[], metavar="ID",
                      help="column id to pin at start (repeatable); a screenshot without pins "
                           "pins the oxygen column with the most occupancy events")
    view.add_argument("--levels", type=float, nargs=2, metavar=("LO", "HI"),
                      help="fixed display levels of the raw frame, counts [default: auto from "
                           "the first frame]")
    view.add_argument("--frame-cmap", default="gray", choices=COLORMAPS,
                      help="colormap of the raw frame")
    view.add_argument("--confidence-cmap", default="viridis", choices=COLORMAPS,
                      help="colormap of the confidence map")
    view.add_argument("--refresh-hz", type=float, default=30.0,
                      help="image updates per second (at most 30)")
    view.add_argument("--plots-hz", type=float, default=5.0,
                      help="updates per second of the pinned columns' plots (at most 30)")
    view.add_argument("--stale-s", type=float, default=5.0,
                      help="seconds without messages before the status bar reports the stream "
                           "as unreachable")
    view.add_argument("--history", type=int, default=2000, metavar="N",
                      help="results kept per column for the time-series plots")
    view.add_argument("--max-pins", type=int, default=3, help="columns pinned at most at once")
    view.add_argument("--pick-radius-px", type=float, default=20.0,
                      help="a click selects the nearest column within this radius, image pixels")
    rec = p.add_argument_group("recording")
    rec.add_argument("--record-dir", default=".",
                     help="folder of the session files the Record button writes")
    rec.add_argument("--record-args", default="", metavar="ARGS",
                     help="extra arguments for `segdepth record` (one quoted string)")
    return p


def _config(args: argparse.Namespace):
    from viewer.window import ViewerConfig
    frames = [] if args.no_frames else (args.frames or [FRAMES_TO_VIEWER])
    return ViewerConfig(results=args.results or [RESULTS_TO_VIEWER], frames=frames,
                        refresh_hz=args.refresh_hz, plots_hz=args.plots_hz, stale_s=args.stale_s,
                        history_len=args.history, max_pins=args.max_pins,
                        pick_radius_px=args.pick_radius_px, frame_cmap=args.frame_cmap,
                        confidence_cmap=args.confidence_cmap, record_dir=args.record_dir,
                        record_args=shlex.split(args.record_args))


def most_eventful_oxygen(window) -> int | None:
    """The O column with the most filtered-depth changes (else the first O column shown)."""
    events = Counter(e.column_id for e in window.history.recent_events(SPECIES_O, n=10 ** 6))
    if events:
        return events.most_common(1)[0][0]
    o = window.table["id"][window.table["species"] == SPECIES_O]
    return int(o[0]) if o.size else None


def _wait_for(app, condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app.processEvents()
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.screenshot:
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        print(f"error: --size must be WxH, got {args.size!r}", file=sys.stderr)
        return 2
    import pyqtgraph as pg
    from viewer.window import ViewerWindow
    app = pg.mkQApp("SegDepth Live")
    try:
        window = ViewerWindow(_config(args))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    window.resize(width, height)
    if args.session:
        try:
            window.open_session(args.session)
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if not 0 <= args.frame < len(window.session):
            print(f"error: --frame {args.frame} outside 0..{len(window.session) - 1}",
                  file=sys.stderr)
            return 2
        window.slider.setValue(args.frame)
    else:
        window.connect_live()
    if args.levels:
        window.set_frame_levels(tuple(args.levels))
    window.show()
    for cid in args.pin:
        window.pins.pin(cid)
    if not args.screenshot:
        return app.exec()
    return _screenshot(app, window, args)


def _screenshot(app, window, args: argparse.Namespace) -> int:
    code = 0
    if window.feed is not None:
        if _wait_for(app, lambda: window.result is not None, args.wait):
            _wait_for(app, lambda: False, args.collect)
        else:
            print(f"warning: no result within {args.wait:g} s; the screenshot shows the status "
                  f"message", file=sys.stderr)
            code = 1
    if not args.pin and window.result is not None:
        cid = most_eventful_oxygen(window)
        if cid is not None:
            window.pins.pin(cid)
    window.timer.stop()  # freeze what is drawn while it is grabbed
    window.refresh_plots()
    _wait_for(app, lambda: False, 0.3)
    window.export_png(args.screenshot)
    print(f"wrote {args.screenshot}")
    window.close()
    return code
