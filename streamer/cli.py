"""Subcommands of the streamer package: ``record``, ``watch``, ``bench transport``,
``bench record`` (heavy modules are imported inside the handlers)."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from streamer.sockets import (DEFAULT_HWM, FRAMES_TO_ENGINE, FRAMES_TO_RECORDER,
                              FRAMES_TO_VIEWER, MODES, RESULTS_TO_RECORDER)

log = logging.getLogger(__name__)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _record(args: argparse.Namespace) -> int:
    from streamer.recorder import WRITE_ERROR, Recorder, RecorderConfig
    results = None if args.results.lower() == "none" else args.results
    config = RecorderConfig(out=args.out, frames=args.frames, results=results,
                            compress=args.compress, flush_interval_s=args.flush_s,
                            grace_s=args.grace_s, min_free_mib=args.min_free_mib, hwm=args.hwm)
    summary = Recorder(config).run()
    print(summary.table(), flush=True)
    if summary.stopped_by == WRITE_ERROR:
        # HDF5 cannot be shut down cleanly after a failed write (it may crash at exit); the
        # file on disk keeps what was flushed before, so leave at once.
        sys.stderr.flush()
        os._exit(1)
    return 1 if summary.error else 0


def _watch(args: argparse.Namespace) -> int:
    from streamer.source import SourceConfig
    from streamer.watcher import FolderWatcher, WatchConfig
    config = WatchConfig(folder=args.folder, poll_s=args.poll_s, settle_s=args.settle_s,
                         existing=args.existing, pixel_size_pm=args.pixel_size_pm,
                         outputs=SourceConfig(mode=args.mode, to_engine=args.to_engine,
                                              to_recorder=args.to_recorder,
                                              to_viewer=args.to_viewer, hwm=args.hwm))
    try:
        watcher = FolderWatcher(config, stop=_stop_on_signals())
    except FileNotFoundError as exc:
        log.error("%s", exc)
        return 2
    stats = watcher.run()
    print(f"published {stats['files']} files, {stats['frames']} frames; per output: "
          f"{ {k: v for k, v in stats.items() if isinstance(v, dict)} }", flush=True)
    return 0


def _bench_transport(args: argparse.Namespace) -> int:
    from streamer.bench import run_transport_bench
    run_transport_bench(args)
    return 0


def _bench_record(args: argparse.Namespace) -> int:
    from streamer.bench import run_record_bench
    run_record_bench(args)
    return 0


def _add_outputs(p: argparse.ArgumentParser, mode_default: str) -> None:
    p.add_argument("--mode", choices=MODES, default=mode_default,
                   help=f"live: never waits, a slow consumer loses frames (counted); replay: "
                        f"lossless, waits for consumers. Default: {mode_default}")
    p.add_argument("--to-engine", default=FRAMES_TO_ENGINE,
                   help=f"bind endpoint for the engine ('none' to skip; default "
                        f"{FRAMES_TO_ENGINE})")
    p.add_argument("--to-recorder", default="none",
                   help=f"bind endpoint for the recorder ('none' to skip, the default; the "
                        f"usual one is {FRAMES_TO_RECORDER})")
    p.add_argument("--to-viewer", default=FRAMES_TO_VIEWER,
                   help=f"PUB endpoint for viewers ('none' to skip; default {FRAMES_TO_VIEWER})")
    p.add_argument("--hwm", type=int, default=DEFAULT_HWM,
                   help=f"messages queued per output (default {DEFAULT_HWM})")


def _add_bench_common(p: argparse.ArgumentParser, default_json: str) -> None:
    p.add_argument("--seconds", type=float, default=5.0,
                   help="duration of each measurement, s (default 5)")
    p.add_argument("--size", type=int, default=1024, help="frame side, px (default 1024)")
    p.add_argument("--dtypes", default="uint16,float32",
                   help="comma-separated frame dtypes (default uint16,float32)")
    p.add_argument("--json", default=default_json, help=f"output JSON (default {default_json})")


def register(commands: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    """Add ``record``, ``watch``, ``bench transport`` and ``bench record``."""
    rec = commands.add_parser(
        "record", help="record frames and engine results into one HDF5 session file",
        description="Connect to a frame source and to the engine's results and write one HDF5 "
                    "session file (SWMR: readable while written; docs/SESSION_FILE.md). Stops "
                    "on the source's end of stream (after the results for all frames, or "
                    "--grace-s), on Ctrl-C/SIGTERM, or when the disk fills up; prints a summary.")
    rec.add_argument("--out", required=True, metavar="SESSION.h5", help="file to write")
    rec.add_argument("--frames", default=FRAMES_TO_RECORDER,
                     help=f"endpoint of the frame source (default {FRAMES_TO_RECORDER})")
    rec.add_argument("--results", default=RESULTS_TO_RECORDER,
                     help=f"endpoint of the engine's results, 'none' for frames only (default "
                          f"{RESULTS_TO_RECORDER})")
    rec.add_argument("--compress", action="store_true",
                     help="lossless Bitshuffle+LZ4 compression (readers need hdf5plugin)")
    rec.add_argument("--flush-s", type=float, default=0.5,
                     help="longest time between flushes to disk, s (default 0.5)")
    rec.add_argument("--grace-s", type=float, default=120.0,
                     help="after the end of stream, wait this long without news for missing "
                          "results, s; a CPU engine can be minutes behind the frames, and the "
                          "engine's own eos ends the wait early (default 120)")
    rec.add_argument("--min-free-mib", type=float, default=64.0,
                     help="stop cleanly when less than this is free on the disk, MiB (default 64)")
    rec.add_argument("--hwm", type=int, default=DEFAULT_HWM,
                     help=f"messages queued per input (default {DEFAULT_HWM})")
    rec.set_defaults(func=_record)

    watch = commands.add_parser(
        "watch", help="publish new camera files of a folder as they appear",
        description="Watch a folder and publish each new camera file (TIFF, MRC, DM3/DM4) once "
                    "it is complete, and K3 In-Situ datasets (NAME.dm4 + NAME.raw, "
                    "NAME.raw_1, ...) frame by frame as they are written. Ctrl-C ends the "
                    "stream.")
    watch.add_argument("folder", help="folder to watch")
    watch.add_argument("--existing", action="store_true",
                       help="also publish the files already in the folder")
    watch.add_argument("--poll-s", type=float, default=0.2,
                       help="time between folder scans, s (default 0.2)")
    watch.add_argument("--settle-s", type=float, default=1.0,
                       help="a file unchanged this long is complete, s (default 1)")
    watch.add_argument("--pixel-size-pm", type=float,
                       help="pixel size in pm for files that do not state it")
    _add_outputs(watch, "live")
    watch.set_defaults(func=_watch)

    bt = bench.add_parser(
        "transport", help="frames/s and GB/s through the protocol vs bare pyzmq",
        description="Send frames between two processes through the full protocol (encode, "
                    "PUSH/PULL, decode) and, in the same run, bare pyzmq multipart sends of the "
                    "same bytes over the same transport (the ceiling). Prints a table, writes "
                    "JSON.")
    _add_bench_common(bt, "benchmarks/transport.json")
    bt.add_argument("--transport", choices=("tcp", "ipc"), default="tcp",
                    help="tcp (loopback) or ipc (Unix socket); default tcp")
    bt.add_argument("--repeats", type=int, default=3,
                    help="interleaved repeats of each measurement; the median is reported "
                         "(default 3)")
    bt.set_defaults(func=_bench_transport)

    br = bench.add_parser(
        "record", help="recorder frames/s and GB/s vs a raw sequential write",
        description="Stream frames from another process into the recorder (HDF5, SWMR) and, in "
                    "the same run, write the same bytes sequentially to a raw file on the same "
                    "disk (the ceiling). Prints a table, writes JSON.")
    _add_bench_common(br, "benchmarks/record.json")
    br.add_argument("--dir", default=None,
                    help="folder for the files (default: a temporary folder under runs/)")
    br.add_argument("--compress", action="store_true", help="also measure Bitshuffle+LZ4")
    br.set_defaults(func=_bench_record)
