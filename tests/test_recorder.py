"""The HDF5 session recorder over real sockets: alignment, columns, crashes, full disks."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from streamer.protocol import encode, encode_control, encode_frame, make_header
from streamer.recorder import Recorder, RecorderConfig
from streamer.session_file import SessionWriter, open_session
from streamer.sockets import Output

SHAPE = (32, 48)


def frame_of(seq: int) -> np.ndarray:
    return (np.arange(np.prod(SHAPE)).reshape(SHAPE) + seq).astype(np.uint16)


def frame_parts(seq: int, session="sess"):
    return encode_frame(
        frame_of(seq),
        session=session,
        seq=seq,
        source="test",
        pixel_size_pm=5.3,
        dose_e_per_px=2.0 + seq,
        t_acq=1000.0 + 0.01 * seq,
    )


def result_parts(seq: int, column_ids: list[int], session="sess"):
    n = len(column_ids)
    cols = {
        "id": column_ids,
        "x_px": [float(c) for c in column_ids],
        "y_px": [2.0 * c for c in column_ids],
        "species": [1 + c % 2 for c in column_ids],
        "depth": [c % 11 for c in column_ids],
        "expected_depth": [c + 0.5 for c in column_ids],
        "confidence": [0.9] * n,
        "depth_filtered": [c % 11 for c in column_ids],
        "expected_filtered": [c + 0.25 for c in column_ids],
    }
    probs = np.zeros((n, 11), np.float32)
    probs[np.arange(n), [c % 11 for c in column_ids]] = 1.0
    head = make_header(
        "result",
        session=session,
        seq=seq,
        source="engine",
        model_id="m-1",
        backend="torch-cpu",
        batch_size=4,
        latency_ms=3.5,
        frame_seq=seq,
        skipped=0,
        pixel_size_pm=5.3,
        drift_px=[0.5, -0.25],
        columns=cols,
        ood_score=seq / 100,
        ood_turn_score=seq / 200 if seq % 4 == 0 else None,
        ood_warning=seq >= 35,
    )
    return encode(
        head,
        {
            "depth": np.full(SHAPE, seq % 11, np.uint8),
            "confidence": np.full(SHAPE, 0.5, np.float32),
            "species": np.ones(SHAPE, np.uint8),
            "column_probabilities": probs,
            "column_probabilities_filtered": probs,
        },
    )


def start_recorder(config: RecorderConfig):
    rec = Recorder(config)
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("summary", rec.run()))
    thread.start()
    return rec, thread, box


def test_frames_and_results_in_any_order_are_aligned(tmp_path, endpoint_factory):
    fep, rep = endpoint_factory(), endpoint_factory()
    out = tmp_path / "s.h5"
    n = 40
    with Output(fep) as frames, Output(rep) as results:
        rec, thread, box = start_recorder(
            RecorderConfig(out=str(out), frames=fep, results=rep, grace_s=2)
        )
        # results for frames 0..4 come first; later columns appear over time
        for seq in range(5):
            assert results.send(result_parts(seq, [10, 11]), timeout_s=5)
        time.sleep(0.2)
        for seq in range(n):
            assert frames.send(frame_parts(seq), timeout_s=5)
            if seq >= 5:
                ids = [10, 11] if seq < 20 else [10, 11, 12]  # column 12 appears at frame 20
                if seq != 30:  # the engine skipped frame 30
                    assert results.send(result_parts(seq, ids), timeout_s=5)
        assert frames.send(encode_control("eos", session="sess", seq=n, source="test"), timeout_s=5)
        thread.join(timeout=20)
    summary = box["summary"]
    assert summary.stopped_by == "eos" and summary.error is None
    assert (summary.frames, summary.results, summary.lost) == (n, n - 1, 0)
    with h5py.File(out, "r") as f:
        assert f.attrs["complete"] == 1 and f.attrs["protocol_version"] == 1
        assert f.attrs["pixel_size_pm"] == pytest.approx(5.3)
        assert f.attrs["frame_interval_s"] == pytest.approx(0.01, rel=1e-3)
        assert f.attrs["git_revision"] and f.attrs["model_id"] == "m-1"
        assert f.attrs["backend"] == "torch-cpu"
        np.testing.assert_array_equal(f["sequence"][:], np.arange(n))
        for seq in (0, 7, 39):
            np.testing.assert_array_equal(f["frames"][seq], frame_of(seq))
        np.testing.assert_allclose(f["frame_dose_e_per_px"][:3], [2, 3, 4])
        res = f["results"]
        assert res["has_result"][30] == 0 and res["has_result"][:30].all()
        assert res["depth"][7, 0, 0] == 7 and res["depth"][30, 0, 0] == 255
        assert res["model_id"][0] == b"m-1" and res["latency_ms"][3] == pytest.approx(3.5)
        np.testing.assert_allclose(res["drift_px"][3], [0.5, -0.25])
        assert res["ood_score"][7] == pytest.approx(0.07) and np.isnan(res["ood_score"][30])
        assert list(res["ood_warning"][[7, 30, 36]]) == [0, -1, 1]
        turn = res["ood_turn_score"][:]  # NaN: not checked, or no result
        assert turn[8] == pytest.approx(0.04, rel=1e-6) and np.isnan(turn[[7, 30, 33]]).all()
        cols = f["columns"]
        np.testing.assert_array_equal(cols["id"][:], [10, 11, 12])
        np.testing.assert_array_equal(cols["first_row"][:], [0, 0, 20])
        np.testing.assert_array_equal(cols["species"][:], [1, 2, 1])
        probs = cols["column_probabilities"]
        assert probs.shape == (n, 3, 11)
        assert np.isnan(probs[19, 2]).all() and probs[20, 2, 12 % 11] == 1.0
        assert probs[5, 0, 10] == 1.0 and probs[5, 1, 0] == 1.0
        assert np.isnan(probs[30]).all()  # no result for frame 30
        assert cols["expected_depth"][25, 1] == pytest.approx(11.5)
        assert cols["depth"][10, 2] == -1  # absent column


def test_a_result_before_its_frame_is_acknowledged_only_once_written(tmp_path, endpoint_factory):
    """A result waiting for its frame is not on disk: acknowledging it would let a recorder
    crash lose it. Its acknowledgement waits for the frame; a result whose frame was passed
    (lost) is counted and no longer holds the link back."""
    fep, rep = endpoint_factory(), endpoint_factory()
    out = tmp_path / "s.h5"

    def acknowledged(output: Output, upto: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            output.service()
            if output.acknowledged_upto >= upto:
                return True
            time.sleep(0.05)
        return False

    with Output(fep) as frames, Output(rep) as results:
        rec, thread, box = start_recorder(
            RecorderConfig(out=str(out), frames=fep, results=rep, grace_s=2, flush_interval_s=0.1)
        )
        assert frames.send(frame_parts(0), timeout_s=5)
        assert results.send(result_parts(0, [1]), timeout_s=5)
        assert acknowledged(results, results.last_sent, 5)  # written with its frame
        for seq in (1, 2):  # before their frames
            assert results.send(result_parts(seq, [1]), timeout_s=5)
        assert not acknowledged(results, results.last_sent - 1, 1.0)
        assert frames.send(frame_parts(1), timeout_s=5)
        assert frames.send(frame_parts(3), timeout_s=5)  # frame 2 never comes
        assert results.send(result_parts(3, [1]), timeout_s=5)
        assert acknowledged(results, results.last_sent, 5)
        assert frames.send(encode_control("eos", session="sess", seq=4, source="test"), timeout_s=5)
        thread.join(timeout=20)
    summary = box["summary"]
    assert summary.stopped_by == "eos" and summary.results_without_frame == 1
    with h5py.File(out, "r") as f:
        np.testing.assert_array_equal(f["sequence"][:], [0, 1, 3])
        assert f["results/has_result"][:].all()


def _wait_for_frames(path: Path, n: int, timeout_s: float = 20) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            try:
                with h5py.File(path, "r", swmr=True) as f:
                    if f["frames"].shape[0] >= n:
                        return f["frames"].shape[0]
            except (OSError, KeyError):
                pass
        time.sleep(0.1)
    raise AssertionError(f"{path} never held {n} frames")


def test_sigkill_mid_session_leaves_a_readable_file(tmp_path, endpoint_factory, segdepth_cmd):
    fep = endpoint_factory()
    out = tmp_path / "killed.h5"
    proc = subprocess.Popen(
        [
            *segdepth_cmd,
            "record",
            "--out",
            str(out),
            "--frames",
            fep,
            "--results",
            "none",
            "--flush-s",
            "0.2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    stop = threading.Event()
    sent = []

    def feed():
        with Output(fep, linger_s=0) as frames:
            frames.stop = stop
            seq = 0
            while not stop.is_set():
                if frames.send(frame_parts(seq)):
                    sent.append(seq)
                seq += 1
                time.sleep(0.002)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        seen = _wait_for_frames(out, 200)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        stop.set()
        feeder.join()
    session = open_session(out)  # the SWMR flag is still set: opened with swmr=True
    try:
        n = len(session)
        assert n >= seen  # every frame seen flushed before the kill is there
        np.testing.assert_array_equal(session.sequence, np.arange(n))
        for i in (0, n // 2, n - 1):
            np.testing.assert_array_equal(session.frames[i], frame_of(i))
        assert session.pixel_size_pm == pytest.approx(5.3)
    finally:
        session.close()


def test_sigint_stops_with_a_summary_and_a_complete_file(tmp_path, endpoint_factory, segdepth_cmd):
    fep = endpoint_factory()
    out = tmp_path / "int.h5"
    proc = subprocess.Popen(
        [*segdepth_cmd, "record", "--out", str(out), "--frames", fep, "--results", "none"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    with Output(fep) as frames:
        for seq in range(10):
            assert frames.send(frame_parts(seq), timeout_s=20)
        _wait_for_frames(out, 10)
    proc.send_signal(signal.SIGINT)
    text, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, text
    assert "frames" in text and "SIGINT" in text
    with h5py.File(out, "r") as f:
        assert f.attrs["complete"] == 1 and f["frames"].shape[0] == 10
    # a second recording at the same --out is refused in one line: the finished file stays
    again = [*segdepth_cmd, "record", "--out", str(out), "--frames", fep, "--results", "none"]
    refused = subprocess.run(again, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert str(out) in refused.stderr and "--overwrite" in refused.stderr
    with h5py.File(out, "r") as f:
        assert f.attrs["complete"] == 1 and f["frames"].shape[0] == 10
    # ... unless the user says so
    proc = subprocess.Popen(
        [*again, "--overwrite"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    with Output(fep) as frames:
        for seq in range(3):
            assert frames.send(frame_parts(seq, session="second"), timeout_s=20)
        assert frames.flush(timeout_s=20)  # acknowledged: on disk
    proc.send_signal(signal.SIGINT)
    text, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, text
    with h5py.File(out, "r") as f:
        assert f["frames"].shape[0] == 3 and f.attrs["session_id"] == "second"


def test_source_crash_and_restart_is_picked_up(tmp_path, endpoint_factory):
    fep = endpoint_factory()
    out = tmp_path / "restart.h5"
    rec, thread, box = start_recorder(RecorderConfig(out=str(out), frames=fep, results=None))
    first = Output(fep, linger_s=1)
    for seq in range(5):
        assert first.send(frame_parts(seq, session="one"), timeout_s=10)
    _wait_for_frames(out, 5)
    first.close(linger_s=0)  # the source crashes without an eos
    with Output(fep) as second:  # ... and comes back with a new session: a new recording
        for seq in range(7):
            assert second.send(frame_parts(seq, session="two"), timeout_s=10)
        assert second.send(encode_control("eos", session="two", seq=7, source="t"), timeout_s=10)
        assert second.flush(timeout_s=10)  # the recorder took all (and refused them)
        rec.stop.set()
        thread.join(timeout=20)
    summary = box["summary"]
    assert summary.frames == 5 and summary.stopped_by == "stop" and summary.lost == 0
    assert summary.foreign == {"frame": 7, "eos": 1} and summary.session == "one"


def test_malformed_and_mismatched_messages_are_counted(tmp_path, endpoint_factory):
    fep = endpoint_factory()
    out = tmp_path / "bad.h5"
    rec, thread, box = start_recorder(RecorderConfig(out=str(out), frames=fep, results=None))
    with Output(fep) as frames:
        frames.send(frame_parts(0), timeout_s=10)
        frames.send([b"frame", b"\x92\x01"])  # valid msgpack, not a header
        frames.send(
            encode_frame(
                np.zeros((4, 4), np.uint16), session="sess", seq=1, source="t", pixel_size_pm=5.3
            )
        )  # wrong shape for this file
        frames.send(result_parts(1, [1]))  # a result on the frame socket
        frames.send(frame_parts(2))
        frames.send(encode_control("eos", session="sess", seq=3, source="t"))
        thread.join(timeout=20)
    summary = box["summary"]
    assert summary.frames == 2
    assert summary.malformed == {"msgpack": 1, "shape": 1, "topic": 1}


def test_disk_full_stops_cleanly_keeping_what_was_written(tmp_path, endpoint_factory, monkeypatch):
    fep = endpoint_factory()
    out = tmp_path / "full.h5"
    real_add = SessionWriter.add_frame

    def add_frame(self, msg):
        if self.n_frames >= 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_add(self, msg)

    monkeypatch.setattr(SessionWriter, "add_frame", add_frame)
    rec, thread, box = start_recorder(
        RecorderConfig(out=str(out), frames=fep, results=None, flush_interval_s=0.0)
    )
    with Output(fep, linger_s=1) as frames:  # the recorder stops with frames unacknowledged
        for seq in range(6):
            frames.send(frame_parts(seq), timeout_s=10)
        _wait_for_frames(out, 6)
        frames.send(frame_parts(6), timeout_s=10)
        thread.join(timeout=20)
    summary = box["summary"]
    assert summary.stopped_by == "write error"
    assert "No space left" in summary.error and "keeps the 6 frames" in summary.error
    session = open_session(out)
    assert len(session) == 6
    np.testing.assert_array_equal(session.frames[5], frame_of(5))
    session.close()


def test_low_free_space_stops_before_writing(tmp_path, endpoint_factory):
    fep = endpoint_factory()
    out = tmp_path / "nospace.h5"
    rec, thread, box = start_recorder(
        RecorderConfig(out=str(out), frames=fep, results=None, min_free_mib=1e12)
    )
    with Output(fep, linger_s=1) as frames:
        # the recorder asks the disk as it starts, and may stop before this frame reaches it
        sent = frames.send(frame_parts(0), timeout_s=2)
        thread.join(timeout=20)
        assert not thread.is_alive()
        # either way the frame was never acknowledged as written: its source keeps it
        assert not (sent and frames.flush(timeout_s=0.5))
    assert box["summary"].stopped_by == "disk full" and "MiB free" in box["summary"].error
    assert not out.exists()


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("mounting a small tmpfs needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _feed_until_stopped(fep: str, n: int = 40) -> int:
    big = np.ones((256, 256), np.uint16)  # 128 kB a frame: 4 MiB above the reserve: ~7 rows
    sent = 0
    with Output(fep, linger_s=0) as frames:
        for seq in range(n):
            if not frames.send(
                encode_frame(big * seq, session="s", seq=seq, source="t", pixel_size_pm=5.3),
                timeout_s=3,
            ):
                break
            sent += 1
            time.sleep(0.02)
    return sent


def _check_intact(path: Path, n_min: int) -> None:
    session = open_session(path)
    try:
        assert len(session) >= n_min
        for i in range(n_min):
            assert (session.frames[i] == i).all()
    finally:
        session.close()


def test_small_disk_stops_at_the_margin_with_a_complete_file(tiny_tmpfs, endpoint_factory):
    fep = endpoint_factory()
    out = tiny_tmpfs / "margin.h5"
    rec, thread, box = start_recorder(
        RecorderConfig(
            out=str(out), frames=fep, results=None, min_free_mib=16, flush_interval_s=0.0
        )
    )
    _feed_until_stopped(fep)
    thread.join(timeout=20)
    summary = box["summary"]
    assert summary.stopped_by == "disk full" and "MiB free" in summary.error
    assert 3 < summary.frames < 40
    with h5py.File(out, "r") as f:  # closed properly: opens without swmr
        assert f["frames"].shape[0] == summary.frames and f.attrs["complete"] == 1
    _check_intact(out, summary.frames)


def test_a_reserve_below_the_minimum_is_refused(tmp_path, segdepth_cmd):
    """--min-free-mib 0 let libhdf5 hit ENOSPC (and crash); it is refused at once, naming the
    option and the minimum."""
    proc = subprocess.run(
        [*segdepth_cmd, "record", "--out", str(tmp_path / "x.h5"), "--min-free-mib", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "--min-free-mib 0 is too small" in proc.stderr and "16 MiB" in proc.stderr
    assert not (tmp_path / "x.h5").exists()


def test_compressed_recording_is_lossless(tmp_path, endpoint_factory):
    fep = endpoint_factory()
    out = tmp_path / "lz4.h5"
    rec, thread, box = start_recorder(
        RecorderConfig(out=str(out), frames=fep, results=None, compress=True)
    )
    with Output(fep) as frames:
        for seq in range(8):
            frames.send(frame_parts(seq), timeout_s=10)
        frames.send(encode_control("eos", session="sess", seq=8, source="t"))
        thread.join(timeout=20)
    assert box["summary"].frames == 8
    with h5py.File(out, "r") as f:
        assert f.attrs["compression"] == "bitshuffle-lz4"
        assert "32008" in f["frames"]._filters  # the Bitshuffle filter (LZ4 inside)
    session = open_session(out)
    for i in range(8):
        np.testing.assert_array_equal(session.frames[i], frame_of(i))
    session.close()
