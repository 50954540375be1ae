"""The folder watcher on real files written by the test while it watches, over real sockets."""

from __future__ import annotations

import io
import signal
import subprocess
import threading
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import tifffile

from streamer.dm_writer import write_dm4
from streamer.sockets import Input
from streamer.source import SourceConfig
from streamer.watcher import FolderWatcher, WatchConfig

SETTLE_S = 0.6


def start_watcher(folder: Path, ep: str, settle_s: float = SETTLE_S, **kw):
    stop = threading.Event()
    watcher = FolderWatcher(
        WatchConfig(
            str(folder),
            poll_s=0.05,
            settle_s=settle_s,
            outputs=SourceConfig(mode="replay", to_engine=ep, to_viewer=None),
            **kw,
        ),
        stop,
    )
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("stats", watcher.run()))
    thread.start()
    return stop, thread, box


def receive(inp: Input, n: int, timeout_s: float = 20) -> list:
    got = []
    while len(got) < n:
        msg = inp.recv(timeout_s=timeout_s)
        assert msg is not None, f"only {len(got)} of {n} frames"
        if msg.kind == "frame":
            got.append(msg)
    return got


def write_slowly(path: Path, data: bytes, pieces: int, pause_s: float) -> None:
    """Write ``data`` to ``path`` in ``pieces`` appends, pausing between them (a camera)."""
    step = -(-len(data) // pieces)
    with open(path, "wb") as fh:
        for start in range(0, len(data), step):
            fh.write(data[start : start + step])
            fh.flush()
            time.sleep(pause_s)


def tiff_bytes(stack: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, stack, photometric="minisblack")
    return buf.getvalue()


def test_new_files_are_published_once_complete(tmp_path, endpoint_factory):
    ep = endpoint_factory()
    rng = np.random.default_rng(0)
    old = rng.integers(0, 9, (16, 16)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "0_before.tif", old)  # there before: not published
    stack = rng.integers(0, 999, (4, 64, 64)).astype(np.uint16)
    mrc = rng.integers(0, 99, (2, 64, 64)).astype(np.int16)
    dm = rng.random((64, 64)).astype(np.float32)
    with Input(ep) as inp:
        stop, thread, box = start_watcher(tmp_path, ep)
        try:
            write_slowly(
                tmp_path / "1_stack.tif", tiff_bytes(stack), pieces=4, pause_s=SETTLE_S / 3
            )
            got = receive(inp, 4)
            with mrcfile.new(tmp_path / "2_frames.mrc") as m:
                m.set_data(mrc)
            write_dm4(tmp_path / "3_image.dm4", dm, pixel_size_pm=5.3)
            got += receive(inp, 3)
            assert inp.recv(timeout_s=2 * SETTLE_S) is None  # nothing else, nothing twice
        finally:
            stop.set()
            thread.join(timeout=20)
        eos = inp.recv(timeout_s=10)
    assert eos is not None and eos.kind == "eos" and eos.seq == 7
    for msg, frame in zip(got, [*stack, *mrc, dm]):
        np.testing.assert_array_equal(msg.arrays["frame"], frame)
    assert got[-1].header["pixel_size_pm"] == pytest.approx(5.3)
    assert [m.seq for m in got] == list(range(7))
    assert box["stats"]["files"] == 3


@pytest.mark.parametrize("director_lead_s", [0.0, 2 * SETTLE_S])
def test_k3_insitu_dataset_streams_while_written(tmp_path, endpoint_factory, director_lead_s):
    """Director first (its raw files at once, or only after it has settled), then raw files
    growing in pieces that cut frames across file boundaries: every frame goes out once its
    bytes are there, intact and in order."""
    ep = endpoint_factory()
    frames = np.random.default_rng(3).integers(0, 4000, (9, 48, 40)).astype(np.uint16)
    raw = frames.tobytes()
    frame_bytes, per_file = frames[0].nbytes, 10_000  # 3840 B frames over 10 kB files
    write_dm4(
        tmp_path / "run.dm4.part",
        frames[0],
        pixel_size_pm=5.3,
        image_tags={"In-situ": {"Recorded": {"# Frames": len(frames)}}},
    )
    with Input(ep) as inp:
        stop, thread, box = start_watcher(tmp_path, ep)
        try:
            (tmp_path / "run.dm4.part").rename(tmp_path / "run.dm4")
            time.sleep(director_lead_s)
            got = []
            for k, start in enumerate(range(0, len(raw), per_file)):
                part = raw[start : start + per_file]
                name = tmp_path / ("run.raw" if k == 0 else f"run.raw_{k}")
                write_slowly(name, part, pieces=3, pause_s=0.05)
                complete = (start + len(part)) // frame_bytes
                got += receive(inp, complete - len(got))  # streamed before the next file
            assert inp.recv(timeout_s=2 * SETTLE_S) is None
        finally:
            stop.set()
            thread.join(timeout=20)
    assert len(got) == len(frames)
    for msg, frame in zip(got, frames):
        np.testing.assert_array_equal(msg.arrays["frame"], frame)
        assert msg.header["pixel_size_pm"] == pytest.approx(5.3)


def test_bad_files_are_skipped_and_watching_goes_on(tmp_path, endpoint_factory, caplog):
    ep = endpoint_factory()
    good = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    with Input(ep) as inp:
        stop, thread, _ = start_watcher(tmp_path, ep)
        try:
            (tmp_path / "a_broken.mrc").write_bytes(b"\x10" * 2000)  # not an MRC image mode
            time.sleep(2 * SETTLE_S)
            tifffile.imwrite(tmp_path / "b_good.tif", good)
            msg = receive(inp, 1)[0]
        finally:
            stop.set()
            thread.join(timeout=20)
    np.testing.assert_array_equal(msg.arrays["frame"], good)
    assert "skipping" in caplog.text and "a_broken.mrc" in caplog.text


def test_a_file_that_never_becomes_readable_is_given_up(tmp_path, endpoint_factory, caplog):
    ep = endpoint_factory()
    good = np.ones((8, 8), np.uint16)
    with Input(ep) as inp:
        stop, thread, _ = start_watcher(tmp_path, ep, settle_s=0.1)
        try:
            (tmp_path / "a_garbage.tif").write_bytes(b"not a tiff at all" * 10)
            deadline = time.monotonic() + 10
            while "unreadable and unchanged" not in caplog.text:
                assert time.monotonic() < deadline, "the garbage file was never given up"
                time.sleep(0.1)
            tifffile.imwrite(tmp_path / "b_good.tif", good)
            msg = receive(inp, 1)[0]
        finally:
            stop.set()
            thread.join(timeout=20)
    np.testing.assert_array_equal(msg.arrays["frame"], good)


def test_watch_cli_publishes_and_ends_with_eos_on_sigint(tmp_path, endpoint_factory, segdepth_cmd):
    ep = endpoint_factory()
    frame = np.full((32, 32), 7, np.uint16)
    tifffile.imwrite(tmp_path / "existing.tif", frame)
    proc = subprocess.Popen(
        [
            *segdepth_cmd,
            "watch",
            str(tmp_path),
            "--existing",
            "--settle-s",
            "0.3",
            "--poll-s",
            "0.05",
            "--mode",
            "replay",
            "--to-engine",
            ep,
            "--to-viewer",
            "none",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    with Input(ep) as inp:
        msg = receive(inp, 1, timeout_s=60)[0]
        np.testing.assert_array_equal(msg.arrays["frame"], frame)
        assert msg.header["mode"] == "replay"
        proc.send_signal(signal.SIGINT)
        eos = inp.recv(timeout_s=20)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert eos is not None and eos.kind == "eos" and eos.seq == 1
    assert "published 1 files, 1 frames" in out
