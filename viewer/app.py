"""``segdepth view``: the live viewer's command line (``python -m viewer --help``)."""

from __future__ import annotations

import argparse
import ctypes.util
import os
import shlex
import sys
import time
from collections import Counter

from streamer.cli_support import (
    HelpFormatter,
    UserError,
    config_option,
    given,
    one_line_errors,
    positive_float,
    positive_int,
)
from streamer.domain import SPECIES_O
from streamer.sockets import FRAMES_TO_VIEWER, RESULTS_TO_VIEWER
from viewer.colormaps import COLORMAPS

CONFIG = "viewer.window:ViewerConfig"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="segdepth view",
        description="Watch SegDepth Live: raw frame, depth map (0-10 atoms) and confidence side "
        "by side, columns coloured by species; click a column to plot its depth "
        "probabilities over time. Subscribes to a running engine (default) or opens "
        "a recorded session file.",
        formatter_class=HelpFormatter,
    )
    src = p.add_argument_group("source")
    src.add_argument(
        "--results",
        action="append",
        metavar="EP",
        help="engine results endpoint to subscribe to (PUB/SUB; repeatable) "
        f"[default: {RESULTS_TO_VIEWER}]",
    )
    src.add_argument(
        "--frames",
        action="append",
        metavar="EP",
        help=f"raw frames endpoint (repeatable) [default: {FRAMES_TO_VIEWER}]",
    )
    src.add_argument(
        "--no-frames", action="store_true", help="do not subscribe to raw frames (results only)"
    )
    src.add_argument(
        "--session",
        metavar="FILE",
        help="open a recorded or simulated session file (HDF5) instead of a stream",
    )
    src.add_argument(
        "--frame", type=int, default=0, metavar="K", help="session row to show first (0-based)"
    )
    shot = p.add_argument_group("headless screenshot")
    shot.add_argument(
        "--screenshot",
        metavar="PNG",
        help="render the session or stream to this PNG offscreen and exit",
    )
    shot.add_argument(
        "--wait",
        type=float,
        default=10.0,
        metavar="S",
        help="stream screenshot: seconds to wait for the first result",
    )
    shot.add_argument(
        "--collect",
        type=float,
        default=3.0,
        metavar="S",
        help="stream screenshot: seconds of results gathered for the plots",
    )
    shot.add_argument(
        "--size", default="1600x1000", metavar="WxH", help="window size in screen pixels"
    )
    view = p.add_argument_group("display")
    view.add_argument(
        "--pin",
        type=int,
        action="append",
        default=[],
        metavar="ID",
        help="column id to pin at start (repeatable); a screenshot without pins "
        "pins the oxygen column with the most occupancy events",
    )
    view.add_argument(
        "--levels",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        help="fixed display levels of the raw frame, counts [default: auto from the first frame]",
    )
    config_option(view, "--frame-cmap", CONFIG, choices=COLORMAPS, help="colormap of the raw frame")
    config_option(
        view, "--confidence-cmap", CONFIG, choices=COLORMAPS, help="colormap of the confidence map"
    )
    config_option(
        view,
        "--refresh-hz",
        CONFIG,
        type=positive_float,
        help="image updates per second (at most 30)",
    )
    config_option(
        view,
        "--plots-hz",
        CONFIG,
        type=positive_float,
        help="updates per second of the pinned columns' plots (at most 30)",
    )
    config_option(
        view,
        "--stale-s",
        CONFIG,
        type=positive_float,
        help="seconds without messages before the status bar reports the stream as unreachable",
    )
    config_option(
        view,
        "--history",
        CONFIG,
        dest="history_len",
        type=positive_int,
        metavar="N",
        help="results kept per column for the time-series plots",
    )
    config_option(
        view, "--max-pins", CONFIG, type=positive_int, help="columns pinned at most at once"
    )
    config_option(
        view,
        "--pick-radius-px",
        CONFIG,
        type=positive_float,
        help="a click selects the nearest column within this radius, image pixels",
    )
    rec = p.add_argument_group("recording")
    config_option(
        rec, "--record-dir", CONFIG, help="folder of the session files the Record button writes"
    )
    rec.add_argument(
        "--record-args",
        default="",
        metavar="ARGS",
        help="extra arguments for `segdepth record` (one quoted string)",
    )
    return p


def _config(args: argparse.Namespace):
    from viewer.window import ViewerConfig

    frames = [] if args.no_frames else (args.frames or [FRAMES_TO_VIEWER])
    return ViewerConfig(
        results=args.results or [RESULTS_TO_VIEWER],
        frames=frames,
        record_args=shlex.split(args.record_args),
        **given(
            args,
            "refresh_hz",
            "plots_hz",
            "stale_s",
            "history_len",
            "max_pins",
            "pick_radius_px",
            "frame_cmap",
            "confidence_cmap",
            "record_dir",
        ),
    )


def most_eventful_oxygen(window) -> int | None:
    """The O column with the most filtered-depth changes (else the first O column shown)."""
    events = Counter(e.column_id for e in window.history.recent_events(SPECIES_O, n=10**6))
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


def check_display(environ: dict[str, str] | None = None) -> None:
    """Refuse, in one line with the way out, to open a window where Qt cannot: no display, or
    no libxcb-cursor for Qt's xcb platform (Qt would abort with rc 250)."""
    env = os.environ if environ is None else environ
    qpa = env.get("QT_QPA_PLATFORM", "")
    if not sys.platform.startswith("linux") or qpa not in ("", "xcb", "wayland"):
        return
    way_out = (
        "for a PNG run `segdepth view --screenshot shot.png ...`, or set QT_QPA_PLATFORM=offscreen"
    )
    if not env.get("DISPLAY") and not env.get("WAYLAND_DISPLAY"):
        raise UserError(f"no display to open a window on (DISPLAY is not set): {way_out}")
    if (
        qpa != "wayland"
        and not env.get("WAYLAND_DISPLAY")
        and ctypes.util.find_library("xcb-cursor") is None
    ):
        raise UserError(
            f"Qt's xcb platform needs libxcb-cursor (apt-get install libxcb-cursor0); or {way_out}"
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command = "view"
    return one_line_errors(_run)(args)


def _run(args: argparse.Namespace) -> int:
    if args.screenshot:
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    else:
        check_display()
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise UserError(f"--size must be WxH, got {args.size!r}") from None
    import pyqtgraph as pg

    from viewer.window import ViewerWindow

    app = pg.mkQApp("SegDepth Live")
    window = ViewerWindow(_config(args))
    window.resize(width, height)
    if args.session:
        window.open_session(args.session)
        rows = len(window.session) if window.session is not None else 0
        if not 0 <= args.frame < rows:
            raise UserError(f"--frame {args.frame} outside 0..{rows - 1}")
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
            print(
                f"warning: no result within {args.wait:g} s; the screenshot shows the status "
                f"message",
                file=sys.stderr,
            )
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
