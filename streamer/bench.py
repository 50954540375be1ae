"""Transport and recorder benchmarks, each beside its ceiling measured in the same run.

``segdepth bench transport``: frames between two processes through the full protocol (encode,
the credit/acknowledgement link in replay mode, decode with the NaN check), the same with CURVE
encryption, against bare pyzmq PUSH/PULL multipart sends of the same bytes over the same
transport. ``segdepth bench record``: frames from another process into
the recorder (HDF5, SWMR) against a raw sequential write of the same bytes to the same disk;
both timed up to an fsync of the file. Prints a table and writes JSON.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from streamer.cli_support import machine_info, write_json
from streamer.sockets import free_tcp_endpoint

N_DISTINCT = 8  # distinct frames cycled by a sender (counting-mode noise)
#: the protocol path without the receiver's NaN/Inf scan (float frames only): shows its cost.
PROTOCOL_NO_CHECK = "protocol, no NaN scan"
#: the protocol path with CURVE encryption and the ZAP allow-list (streamer.security); an
#: encrypted link compresses its buffers by default (streamer.protocol.compress_parts).
PROTOCOL_CURVE = "protocol + CURVE"
#: the same, buffers sent raw (as before compression): the cost of the cipher alone.
PROTOCOL_CURVE_RAW = "protocol + CURVE, raw buffers"


@dataclass
class Row:
    """One measurement."""

    bench: str
    path: str
    dtype: str
    shape: list
    frames: int
    seconds: float
    frames_per_s: float
    gb_per_s: float
    vs_ceiling: float = 1.0


def _frames(size: int, dtype: str, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.poisson(2.0, (size, size)).astype(dtype) for _ in range(N_DISTINCT)]


def _endpoint(transport: str) -> str:
    if transport == "ipc":
        return f"ipc://{tempfile.mkdtemp(prefix='segdepth-bench-')}/sock"
    return free_tcp_endpoint()


# --- transport -------------------------------------------------------------------------------
def _transport_sender(
    endpoint: str, path: str, size: int, dtype: str, seconds: float, keys: str | None
) -> None:
    """Child process: send frames for ``seconds`` (after the receiver connects), then the end."""
    import zmq

    from streamer.protocol import encode_control, encode_frame
    from streamer.security import KEYS_ENV
    from streamer.sockets import Output, _send_parts, shutdown

    if keys:
        os.environ[KEYS_ENV] = keys
    frames = _frames(size, dtype)
    seq = 0
    if path != "bare":
        out = Output(
            endpoint,
            mode="replay",
            hwm=16,
            linger_s=10,
            compress=False if path == PROTOCOL_CURVE_RAW else None,
        )
        out.wait_for_reader(30)
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            out.send(
                encode_frame(
                    frames[seq % N_DISTINCT],
                    session="bench",
                    seq=seq,
                    source="bench",
                    pixel_size_pm=5.3,
                )
            )
            seq += 1
        out.send(encode_control("eos", session="bench", seq=seq, source="bench"))
        out.close()
    else:  # bare pyzmq PUSH: a fixed header, the same array bytes, copy=False
        sock: zmq.Socket = zmq.Context.instance().socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, 16)
        sock.bind(endpoint)
        sock.poll(30_000, zmq.POLLOUT)
        header = b"\x00" * 160
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            _send_parts(sock, [b"frame", header, frames[seq % N_DISTINCT]], 0)
            seq += 1
        sock.send_multipart([b"eos", b""])
        sock.close(10_000)
    shutdown()  # a multiprocessing child skips atexit


def _receive(endpoint: str, path: str, keys: str | None) -> tuple[int, float, int]:
    """(frames, seconds, bytes) received after the first frame (the clock starts there) until
    the end message."""
    import zmq

    from streamer.security import KEYS_ENV
    from streamer.sockets import Input

    old = os.environ.pop(KEYS_ENV, None)
    if keys:
        os.environ[KEYS_ENV] = keys
    try:
        if path != "bare":
            inp = Input(endpoint, hwm=16, check_finite=path != PROTOCOL_NO_CHECK)
            sock = inp.socket
        else:
            sock = zmq.Context.instance().socket(zmq.PULL)
            sock.setsockopt(zmq.RCVHWM, 16)
            sock.connect(endpoint)
    finally:
        os.environ.pop(KEYS_ENV, None)
        if old is not None:
            os.environ[KEYS_ENV] = old
    n, nbytes, t_first, t_last = 0, 0, None, 0.0
    try:
        while True:
            if path != "bare":
                msg = inp.recv(timeout_s=60)
                if msg is None or msg.kind == "eos":
                    break
                size = msg.arrays["frame"].nbytes
            else:
                if not sock.poll(60_000):
                    break
                parts = sock.recv_multipart(copy=False)
                if parts[0].bytes == b"eos":
                    break
                size = len(parts[2])
            t_last = time.perf_counter()
            if t_first is None:
                t_first = t_last
            else:
                n, nbytes = n + 1, nbytes + size
    finally:
        if path != "bare":
            inp.close()
        else:
            sock.close(0)
    return n, (t_last - t_first) if t_first is not None else 0.0, nbytes


def measure_transport(
    size: int, dtype: str, path: str, seconds: float, transport: str, keys: str | None = None
) -> Row:
    """One measurement; ``keys`` (a key folder) is used by the CURVE path only."""
    endpoint = _endpoint(transport)
    keys = keys if path in (PROTOCOL_CURVE, PROTOCOL_CURVE_RAW) else None
    child = mp.get_context("spawn").Process(
        target=_transport_sender, args=(endpoint, path, size, dtype, seconds, keys)
    )
    child.start()
    try:
        n, elapsed, nbytes = _receive(endpoint, path, keys)
    finally:
        child.join(timeout=60)
    return Row(
        "transport",
        "bare pyzmq" if path == "bare" else path,
        dtype,
        [size, size],
        n,
        elapsed,
        n / elapsed if elapsed else 0.0,
        nbytes / elapsed / 1e9 if elapsed else 0.0,
    )


# --- recorder --------------------------------------------------------------------------------
def _record_sender(endpoint: str, size: int, dtype: str, seconds: float, max_frames: int):
    """Child process: a replay-mode source sending to the recorder, then eos."""
    from streamer.sockets import shutdown
    from streamer.source import FrameSender, SourceConfig

    frames = _frames(size, dtype)
    sender = FrameSender(
        SourceConfig(mode="replay", to_engine=None, to_recorder=endpoint, to_viewer=None),
        source="bench",
    )
    sender.send(frames[0], pixel_size_pm=5.3)  # waits for the recorder to connect
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end and sender.seq < max_frames:
        sender.send(frames[sender.seq % N_DISTINCT], pixel_size_pm=5.3)
    sender.end()
    sender.close()
    shutdown()  # a multiprocessing child skips atexit


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def measure_recorder(
    size: int, dtype: str, seconds: float, folder: Path, max_frames: int, compress: bool
) -> Row:
    import h5py

    from streamer.recorder import Recorder, RecorderConfig

    endpoint = _endpoint("tcp")
    out = folder / f"bench-{dtype}{'-lz4' if compress else ''}.h5"
    child = mp.get_context("spawn").Process(
        target=_record_sender, args=(endpoint, size, dtype, seconds, max_frames)
    )
    child.start()
    try:
        summary = Recorder(
            RecorderConfig(
                out=str(out),
                frames=endpoint,
                results=None,
                compress=compress,
                min_free_mib=256,
                overwrite=True,  # a scratch file per round
            )
        ).run()
        _fsync(out)
        t_end = time.time()
    finally:
        child.join(timeout=60)
    if summary.error:
        raise RuntimeError(summary.error)
    with h5py.File(out, "r") as f:
        t_first = float(f["received_s"][0])
    n = summary.frames - 1  # intervals after the first frame arrived
    elapsed = t_end - t_first
    frame_bytes = size * size * np.dtype(dtype).itemsize
    out.unlink()
    return Row(
        "record",
        "recorder (lz4)" if compress else "recorder",
        dtype,
        [size, size],
        n,
        elapsed,
        n / elapsed,
        n * frame_bytes / elapsed / 1e9,
    )


def measure_raw_write(size: int, dtype: str, n_frames: int, folder: Path) -> Row:
    """Write ``n_frames`` frames back to back to one file, up to its fsync."""
    frames = _frames(size, dtype)
    out = folder / f"bench-{dtype}.raw"
    t0 = time.perf_counter()
    n = 0
    with open(out, "wb", buffering=0) as fh:
        while n < n_frames:
            fh.write(frames[n % N_DISTINCT].data)
            n += 1
        os.fsync(fh.fileno())
    elapsed = time.perf_counter() - t0
    out.unlink()
    return Row(
        "record",
        "raw sequential write",
        dtype,
        [size, size],
        n,
        elapsed,
        n / elapsed,
        n * frames[0].nbytes / elapsed / 1e9,
    )


@dataclass
class TransportBenchConfig:
    """``segdepth bench transport``: ``seconds`` per measurement, frames of ``size``² px of each
    of ``dtypes``, over ``transport`` (tcp loopback or ipc), median of ``repeats``."""

    seconds: float = 5.0
    size: int = 1024
    dtypes: list[str] = field(default_factory=lambda: ["uint16", "float32"])
    transport: str = "tcp"
    repeats: int = 3


@dataclass
class RecordBenchConfig:
    """``segdepth bench record``: ``seconds`` per measurement, frames of ``size``² px of each of
    ``dtypes``, files in ``dir`` (None: a temporary folder under runs/), also with Bitshuffle+LZ4
    when ``compress``."""

    seconds: float = 5.0
    size: int = 1024
    dtypes: list[str] = field(default_factory=lambda: ["uint16", "float32"])
    dir: str | None = None
    compress: bool = False


# --- reporting -------------------------------------------------------------------------------
def _report(rows: list[Row], json_path: str, extra: dict) -> None:
    print(
        f"{'bench':<10} {'path':<22} {'dtype':<8} {'frames':>7} {'s':>6} {'frames/s':>9} "
        f"{'GB/s':>6} {'vs ceiling':>10}"
    )
    for r in rows:
        print(
            f"{r.bench:<10} {r.path:<22} {r.dtype:<8} {r.frames:>7} {r.seconds:>6.2f} "
            f"{r.frames_per_s:>9.0f} {r.gb_per_s:>6.2f} {r.vs_ceiling:>9.0%}"
        )
    write_json(json_path, {"rows": [asdict(r) for r in rows], "machine": machine_info(), **extra})


def _median(rows: list[Row]) -> Row:
    return sorted(rows, key=lambda r: r.frames_per_s)[len(rows) // 2]


def run_transport_bench(cfg: TransportBenchConfig, json_path: str) -> list[Row]:
    import zmq

    from streamer.security import make_keys

    rows = []
    keys = str(make_keys(Path(tempfile.mkdtemp(prefix="segdepth-bench-keys-")) / "keys").folder)
    for dtype in cfg.dtypes:
        paths = ["bare", "protocol", PROTOCOL_CURVE_RAW, PROTOCOL_CURVE]
        if np.dtype(dtype).kind == "f":
            paths.append(PROTOCOL_NO_CHECK)
        runs: dict[str, list[Row]] = {path: [] for path in paths}
        for _ in range(cfg.repeats):  # interleaved, so all see the same machine load
            for path in paths:
                runs[path].append(
                    measure_transport(cfg.size, dtype, path, cfg.seconds, cfg.transport, keys)
                )
        bare = _median(runs["bare"])
        rows.append(bare)
        for path in paths[1:]:
            ours = _median(runs[path])
            ours.vs_ceiling = ours.frames_per_s / bare.frames_per_s if bare.frames_per_s else 0.0
            rows.append(ours)
    _report(
        rows,
        json_path,
        {
            "transport": cfg.transport,
            "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(),
            "seconds": cfg.seconds,
            "repeats": cfg.repeats,
            "config": asdict(cfg),
            "note": "median of interleaved repeats",
        },
    )
    return rows


def run_record_bench(cfg: RecordBenchConfig, json_path: str) -> list[Row]:
    import h5py

    folder = Path(cfg.dir) if cfg.dir else Path("runs") / "bench-record"
    folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=folder))
    max_bytes = min(4 << 30, shutil.disk_usage(work).free // 4)
    rows = []
    try:
        for dtype in cfg.dtypes:
            max_frames = int(max_bytes // (cfg.size**2 * np.dtype(dtype).itemsize))
            recs = [
                measure_recorder(cfg.size, dtype, cfg.seconds, work, max_frames, compress)
                for compress in ([False, True] if cfg.compress else [False])
            ]
            raw = measure_raw_write(cfg.size, dtype, recs[0].frames, work)  # the same bytes
            rows.append(raw)
            for rec in recs:
                rec.vs_ceiling = rec.gb_per_s / raw.gb_per_s if raw.gb_per_s else 0.0
                rows.append(rec)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _report(
        rows,
        json_path,
        {
            "folder": str(folder.resolve()),
            "h5py": h5py.__version__,
            "hdf5": h5py.version.hdf5_version,
            "seconds": cfg.seconds,
            "config": asdict(cfg),
            "note": "both paths timed up to an fsync of their file",
        },
    )
    return rows
