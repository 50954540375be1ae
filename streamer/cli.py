"""Subcommands of the streamer package: ``record``, ``watch``, ``bench transport``,
``bench record`` (heavy modules are imported inside the handlers). Defaults are the config
dataclasses' (streamer.recorder.RecorderConfig, streamer.watcher.WatchConfig,
streamer.source.SourceConfig, streamer.bench.*BenchConfig), read through streamer.cli_support."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

from streamer import security
from streamer.cli_support import (
    add_json_option,
    config_option,
    default_of,
    endpoint,
    given,
    install_stop_signals,
    list_of,
    output_file,
    positive_float,
    positive_int,
)
from streamer.sockets import FRAMES_TO_RECORDER, MODES

RECORDER = "streamer.recorder:RecorderConfig"
WATCH = "streamer.watcher:WatchConfig"
SOURCE = "streamer.source:SourceConfig"
TRANSPORT_BENCH = "streamer.bench:TransportBenchConfig"
RECORD_BENCH = "streamer.bench:RecordBenchConfig"


def record_config(args: argparse.Namespace):
    """The streamer.recorder.RecorderConfig of a ``record`` command line."""
    from streamer.recorder import RecorderConfig

    results = {"results": None} if args.results and args.results.lower() == "none" else {}
    return RecorderConfig(
        out=args.out,
        **{
            **given(
                args,
                "frames",
                "results",
                "compress",
                "flush_interval_s",
                "grace_s",
                "min_free_mib",
                "hwm",
                "overwrite",
            ),
            **results,
        },
    )


def _record(args: argparse.Namespace) -> int:
    from streamer.recorder import WRITE_ERROR, Recorder

    security.apply_options(args)
    summary = Recorder(record_config(args)).run()
    print(summary.table(), flush=True)
    if summary.stopped_by == WRITE_ERROR:
        # HDF5 cannot be shut down cleanly after a failed write (it may crash at exit); the
        # file on disk keeps what was flushed before, so leave at once.
        sys.stderr.flush()
        os._exit(1)
    return 1 if summary.error else 0


def watch_config(args: argparse.Namespace):
    """The streamer.watcher.WatchConfig of a ``watch`` command line (its default outputs, changed
    by the output options given)."""
    from streamer.watcher import WatchConfig

    return WatchConfig(
        folder=args.folder,
        outputs=source_outputs(args, WatchConfig),
        **given(args, "poll_s", "settle_s", "existing", "pixel_size_pm"),
    )


def _watch(args: argparse.Namespace) -> int:
    from streamer.watcher import FolderWatcher

    security.apply_options(args)
    watcher = FolderWatcher(watch_config(args), stop=install_stop_signals())
    stats = watcher.run()
    print(
        f"published {stats['files']} files, {stats['frames']} frames; per output: "
        f"{ {k: v for k, v in stats.items() if isinstance(v, dict)} }",
        flush=True,
    )
    return 0


def _recover(args: argparse.Namespace) -> int:
    from streamer.session_file import recover

    info = recover(args.file)
    print(
        f"{info['path']}: {info['rows']} rows kept, {info['dropped_rows']} dropped (no "
        f"sequence number or timestamp); session {info['session_id']!r}, last frame "
        f"{info['last_seq']}. It now opens with plain h5py.",
        flush=True,
    )
    return 0


def _keys(args: argparse.Namespace) -> int:
    keys = security.make_keys(args.dir, overwrite=args.force)
    print(
        f"keys in {keys.folder}: server.key(_secret), client.key(_secret), allowed/ "
        f"(1 client). Pass --keys {keys.folder} to every program.",
        flush=True,
    )
    return 0


def _bench_transport(args: argparse.Namespace) -> int:
    from streamer.bench import TransportBenchConfig, run_transport_bench

    run_transport_bench(
        TransportBenchConfig(**given(args, "seconds", "size", "dtypes", "transport", "repeats")),
        args.json,
    )
    return 0


def _bench_record(args: argparse.Namespace) -> int:
    from streamer.bench import RecordBenchConfig, run_record_bench

    run_record_bench(
        RecordBenchConfig(**given(args, "seconds", "size", "dtypes", "dir", "compress")), args.json
    )
    return 0


OUTPUT_OPTIONS = ("mode", "to_engine", "to_recorder", "to_viewer", "hwm")


def add_output_options(p: argparse.ArgumentParser, config: str) -> None:
    """Options of a frame source's outputs: field ``outputs`` (a streamer.source.SourceConfig)
    of ``config`` ("module:Class") holds their defaults; :func:`source_outputs` reads them."""
    config_option(
        p,
        "--mode",
        config,
        field="outputs.mode",
        choices=MODES,
        help="live: never waits, a slow consumer loses frames (counted); replay: "
        "lossless, waits for consumers",
    )
    config_option(
        p,
        "--to-engine",
        config,
        field="outputs.to_engine",
        type=endpoint,
        help="bind endpoint for the engine ('none' to skip); in replay mode every "
        "point-to-point output waits for its reader",
    )
    p.add_argument(
        "--to-recorder",
        type=endpoint,
        default=None,
        help=f"bind endpoint for the recorder ('none' to skip, the default; the "
        f"usual one is {FRAMES_TO_RECORDER})",
    )
    config_option(
        p,
        "--to-viewer",
        config,
        field="outputs.to_viewer",
        type=endpoint,
        help="PUB endpoint for viewers ('none' to skip); never waits",
    )
    config_option(
        p,
        "--hwm",
        config,
        field="outputs.hwm",
        type=positive_int,
        help="messages queued per output before waiting (replay) or dropping (live)",
    )


def source_outputs(args: argparse.Namespace, config: type):
    """The outputs of a source's command line: ``config``'s default outputs, changed by the
    output options given (:func:`add_output_options`)."""
    return replace(default_of(config, "outputs"), **given(args, *OUTPUT_OPTIONS))


def _add_bench_common(p: argparse.ArgumentParser, config: str, default_json: str) -> None:
    config_option(
        p, "--seconds", config, type=positive_float, help="duration of each measurement, s"
    )
    config_option(p, "--size", config, type=positive_int, help="frame side, px")
    config_option(
        p, "--dtypes", config, **list_of(str), help="frame dtypes (comma- or space-separated)"
    )
    add_json_option(p, default_json)


def _add_record(commands) -> None:
    rec = commands.add_parser(
        "record",
        help="record frames and engine results into one HDF5 session file",
        description="Connect to a frame source and to the engine's results and write one HDF5 "
        "session file (SWMR: readable while written; docs/SESSION_FILE.md). Stops "
        "on the source's end of stream (after the results for all frames, or "
        "--grace-s), on Ctrl-C/SIGTERM, or when the disk fills up; prints a summary.",
    )
    rec.add_argument(
        "--out", required=True, type=output_file, metavar="SESSION.h5", help="file to write"
    )
    config_option(rec, "--frames", RECORDER, type=endpoint, help="endpoint of the frame source")
    config_option(
        rec,
        "--results",
        RECORDER,
        type=endpoint,
        help="endpoint of the engine's results, 'none' for frames only",
    )
    config_option(
        rec,
        "--compress",
        RECORDER,
        action="store_true",
        help="lossless Bitshuffle+LZ4 compression (readers need hdf5plugin)",
    )
    config_option(
        rec,
        "--flush-s",
        RECORDER,
        dest="flush_interval_s",
        type=float,
        metavar="FLUSH_S",
        help="longest time between flushes to disk, s",
    )
    config_option(
        rec,
        "--grace-s",
        RECORDER,
        type=float,
        help="after the end of stream, wait this long without news for missing "
        "results, s; a CPU engine can be minutes behind the frames, and the "
        "engine's own eos ends the wait early",
    )
    config_option(
        rec,
        "--min-free-mib",
        RECORDER,
        type=float,
        help="stop cleanly when less than this is free on the disk, MiB",
    )
    config_option(rec, "--hwm", RECORDER, type=positive_int, help="messages queued per input")
    config_option(
        rec,
        "--overwrite",
        RECORDER,
        action="store_true",
        help="replace a finished recording at --out (refused otherwise; an unfinished one "
        "is recovered and continued in NAME.1.h5 beside it)",
    )
    security.add_options(rec)
    rec.set_defaults(func=_record)


def _add_watch(commands) -> None:
    watch = commands.add_parser(
        "watch",
        help="publish new camera files of a folder as they appear",
        description="Watch a folder and publish each new camera file (TIFF, MRC, DM3/DM4) once "
        "it is complete, and K3 In-Situ datasets (NAME.dm4 + NAME.raw, "
        "NAME.raw_1, ...) frame by frame as they are written. Ctrl-C ends the "
        "stream.",
    )
    watch.add_argument("folder", help="folder to watch")
    config_option(
        watch,
        "--existing",
        WATCH,
        action="store_true",
        help="also publish the files already in the folder",
    )
    config_option(
        watch, "--poll-s", WATCH, type=positive_float, help="time between folder scans, s"
    )
    config_option(
        watch,
        "--settle-s",
        WATCH,
        type=positive_float,
        help="a file unchanged this long is complete, s",
    )
    config_option(
        watch,
        "--pixel-size-pm",
        WATCH,
        type=positive_float,
        help="pixel size in pm for files that do not state it",
    )
    add_output_options(watch, WATCH)
    security.add_options(watch)
    watch.set_defaults(func=_watch)


def _add_recover(commands) -> None:
    rc = commands.add_parser(
        "recover",
        help="make a recording left by a killed recorder open with plain h5py",
        description="Rewrite a session file whose recorder was killed (SIGKILL, power cut): "
        "rows with their sequence number and timestamp are kept, the rest "
        "dropped; afterwards h5py.File(path, 'r') opens it. Needs as much free "
        "space as the file. A restarted `segdepth record` does this by itself "
        "for the file it finds unfinished at --out.",
    )
    rc.add_argument("file", help="session file (.h5)")
    rc.set_defaults(func=_recover)


def _add_keys(commands) -> None:
    keys = commands.add_parser(
        "keys",
        help="make CURVE key files for encrypted, authenticated links",
        description="Create DIR with a server and a client CURVE key pair and DIR/allowed/ "
        "(the client public keys servers admit). Give the same DIR to every "
        "program (--keys DIR, or SEGDEPTH_KEYS=DIR for serve and view); copy "
        "another client's .key into DIR/allowed/ to admit it.",
    )
    keys.add_argument("dir", help="folder to create")
    keys.add_argument("--force", action="store_true", help="replace existing keys")
    keys.set_defaults(func=_keys)


def _add_benches(bench) -> None:
    bt = bench.add_parser(
        "transport",
        help="frames/s and GB/s through the protocol vs bare pyzmq",
        description="Send frames between two processes through the full protocol (encode, "
        "PUSH/PULL, decode) and, in the same run, bare pyzmq multipart sends of the "
        "same bytes over the same transport (the ceiling). Prints a table, writes "
        "JSON.",
    )
    _add_bench_common(bt, TRANSPORT_BENCH, "benchmarks/transport.json")
    config_option(
        bt,
        "--transport",
        TRANSPORT_BENCH,
        choices=("tcp", "ipc"),
        help="tcp (loopback) or ipc (Unix socket)",
    )
    config_option(
        bt,
        "--repeats",
        TRANSPORT_BENCH,
        type=positive_int,
        help="interleaved repeats of each measurement; the median is reported",
    )
    bt.set_defaults(func=_bench_transport)

    br = bench.add_parser(
        "record",
        help="recorder frames/s and GB/s vs a raw sequential write",
        description="Stream frames from another process into the recorder (HDF5, SWMR) and, in "
        "the same run, write the same bytes sequentially to a raw file on the same "
        "disk (the ceiling). Prints a table, writes JSON.",
    )
    _add_bench_common(br, RECORD_BENCH, "benchmarks/record.json")
    br.add_argument(
        "--dir", default=None, help="folder for the files (default: a temporary folder under runs/)"
    )
    config_option(
        br, "--compress", RECORD_BENCH, action="store_true", help="also measure Bitshuffle+LZ4"
    )
    br.set_defaults(func=_bench_record)


def register(commands: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    """Add ``record``, ``watch``, ``recover``, ``keys``, ``bench transport``, ``bench record``."""
    _add_record(commands)
    _add_watch(commands)
    _add_recover(commands)
    _add_keys(commands)
    _add_benches(bench)
