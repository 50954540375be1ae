"""The replayer: session files (simulated and recorded) and folders of camera files, over real
sockets, in-process and as the ``segdepth replay`` subprocess."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import h5py
import mrcfile
import numpy as np
import pytest
import tifffile

from streamer.dm_writer import write_dm4, write_k3_insitu
from streamer.recorder import Recorder, RecorderConfig
from streamer.replay import ReplayConfig, replay
from streamer.sockets import Input
from streamer.source import SourceConfig


def write_sim_session(path: Path, n: int = 12, interval_s: float = 0.05) -> np.ndarray:
    """A session file as docs/CONTRACTS.md "Session file" describes it (the simulator's)."""
    frames = np.random.default_rng(1).poisson(3.0, (n, 24, 32)).astype(np.uint16)
    with h5py.File(path, "w") as f:
        f["frames"] = frames
        f["timestamps_s"] = 5000.0 + interval_s * np.arange(n)
        f["sequence"] = np.arange(n)
        f.attrs.update(
            pixel_size_pm=5.3,
            dose_e_per_px=3.0,
            frame_interval_s=interval_s,
            session_id="sim-1",
            source="simulated",
        )
    return frames


def collect(endpoint: str, timeout_s: float = 20) -> tuple[list, dict]:
    """Every frame until eos from ``endpoint``: (messages, eos header)."""
    got = []
    with Input(endpoint) as inp:
        while True:
            msg = inp.recv(timeout_s=timeout_s)
            assert msg is not None, f"no eos after {len(got)} frames"
            if msg.kind == "eos":
                return got, msg.header
            got.append(msg)


def run_replay_thread(config: ReplayConfig, stop: threading.Event | None = None):
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("stats", replay(config, stop)))
    thread.start()
    return thread, box


def outputs(engine: str, **kw) -> SourceConfig:
    return SourceConfig(to_engine=engine, to_recorder=None, to_viewer=None, **kw)


def test_simulated_session_replays_every_frame_with_metadata(tmp_path, endpoint_factory):
    frames = write_sim_session(tmp_path / "sim.h5")
    ep = endpoint_factory()
    thread, box = run_replay_thread(
        ReplayConfig(str(tmp_path / "sim.h5"), timing="max", outputs=outputs(ep))
    )
    got, eos = collect(ep)
    thread.join()
    assert [m.seq for m in got] == list(range(len(frames))) and eos["seq"] == len(frames)
    for msg, frame in zip(got, frames):
        np.testing.assert_array_equal(msg.arrays["frame"], frame)
        assert msg.header["pixel_size_pm"] == pytest.approx(5.3)
        assert msg.header["dose_e_per_px"] == pytest.approx(3.0)
        assert msg.header["mode"] == "replay"
    np.testing.assert_allclose([m.header["t_acq"] for m in got], 5000 + 0.05 * np.arange(12))
    assert box["stats"]["to_engine"] == {
        "sent": 13,
        "dropped": 0,
        "resent": 0,
        "refused_readers": 0,
        "unacknowledged": 0,
    }


def test_recorded_rate_paces_the_stream(tmp_path, endpoint_factory):
    write_sim_session(tmp_path / "sim.h5", n=10, interval_s=0.05)
    ep = endpoint_factory()
    thread, _ = run_replay_thread(ReplayConfig(str(tmp_path / "sim.h5"), outputs=outputs(ep)))
    got = []
    with Input(ep) as inp:
        while len(got) < 10:
            msg = inp.recv(timeout_s=10)
            got.append((msg.seq, time.monotonic()))
    thread.join()
    # 9 intervals of 50 ms: the pacer may not release the last frame before 0.45 s
    assert got[-1][1] - got[0][1] >= 0.44


def test_a_recording_replays_like_a_simulated_session(tmp_path, endpoint_factory):
    frames = write_sim_session(tmp_path / "sim.h5", n=30)
    rec_ep, eng_ep = endpoint_factory(), endpoint_factory()
    recorder = Recorder(RecorderConfig(out=str(tmp_path / "rec.h5"), frames=rec_ep, results=None))
    rthread = threading.Thread(target=recorder.run)
    rthread.start()
    thread, _ = run_replay_thread(
        ReplayConfig(
            str(tmp_path / "sim.h5"),
            timing="max",
            outputs=SourceConfig(to_engine=None, to_recorder=rec_ep, to_viewer=None),
        )
    )
    thread.join(timeout=30)
    rthread.join(timeout=30)
    with h5py.File(tmp_path / "rec.h5", "r") as f:
        assert f.attrs["dose_e_per_px"] == pytest.approx(3.0)
        assert f.attrs["frame_interval_s"] == pytest.approx(0.05)
    thread, _ = run_replay_thread(
        ReplayConfig(str(tmp_path / "rec.h5"), timing="max", outputs=outputs(eng_ep))
    )
    got, eos = collect(eng_ep)
    thread.join()
    assert len(got) == 30 and eos["seq"] == 30
    np.testing.assert_array_equal(np.stack([m.arrays["frame"] for m in got]), frames)
    np.testing.assert_allclose([m.header["t_acq"] for m in got], 5000 + 0.05 * np.arange(30))


def test_loop_continues_numbering_until_stopped(tmp_path, endpoint_factory):
    write_sim_session(tmp_path / "sim.h5", n=5)
    ep = endpoint_factory()
    stop = threading.Event()
    thread, box = run_replay_thread(
        ReplayConfig(
            str(tmp_path / "sim.h5"), timing="rate", rate_hz=200, loop=True, outputs=outputs(ep)
        ),
        stop,
    )
    seqs = []
    with Input(ep) as inp:
        while True:
            msg = inp.recv(timeout_s=10)
            if msg.kind == "eos":
                break
            seqs.append(msg.seq)
            if len(seqs) == 13:
                stop.set()
    thread.join()
    assert seqs == list(range(len(seqs))) and len(seqs) >= 13
    assert box["stats"]["passes"] >= 3


def write_camera_folder(folder: Path) -> list[tuple[np.ndarray, float]]:
    """TIFF, MRC, DM4 and a K3 In-Situ dataset; returns (frame, pixel pm) in name order."""
    rng = np.random.default_rng(2)
    a = rng.integers(0, 500, (2, 16, 20)).astype(np.uint16)
    b = rng.integers(0, 500, (3, 16, 20)).astype(np.int16)
    c = rng.random((16, 20)).astype(np.float32)
    d = rng.integers(0, 500, (5, 16, 20)).astype(np.uint16)
    tifffile.imwrite(
        folder / "a_stack.tif", a, resolution=(1e10 / 5.3, 1e10 / 5.3), resolutionunit="CENTIMETER"
    )
    with mrcfile.new(folder / "b_stack.mrc") as m:
        m.set_data(b)
        m.voxel_size = 0.053  # Å
    write_dm4(folder / "c_single.dm4", c, pixel_size_pm=6.0)
    # 5 frames of 640 bytes over raw files of 1000 bytes: frames 1 and 3 straddle two files
    write_k3_insitu(folder, "d_insitu", d, bytes_per_raw_file=1000, pixel_size_pm=7.0)
    return [(f, 5.3) for f in a] + [(f, 5.3) for f in b] + [(c, 6.0)] + [(f, 7.0) for f in d]


def test_folder_of_camera_files_via_the_cli(tmp_path, endpoint_factory, segdepth_cmd):
    folder = tmp_path / "cam"
    folder.mkdir()
    expected = write_camera_folder(folder)
    ep = endpoint_factory()
    proc = subprocess.Popen(
        [
            *segdepth_cmd,
            "replay",
            str(folder),
            "--max-rate",
            "--to-engine",
            ep,
            "--to-viewer",
            "none",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    got, eos = collect(ep, timeout_s=60)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert len(got) == len(expected) == eos["seq"]
    for msg, (frame, pixel) in zip(got, expected):
        np.testing.assert_array_equal(msg.arrays["frame"], frame)
        assert msg.header["pixel_size_pm"] == pytest.approx(pixel, rel=1e-4)


def test_missing_source_is_a_clear_error(tmp_path, segdepth_cmd):
    out = subprocess.run(
        [
            *segdepth_cmd,
            "replay",
            str(tmp_path / "nope.h5"),
            "--to-engine",
            "none",
            "--to-viewer",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "no such session file or folder" in out.stderr


def test_a_slow_reader_gets_every_frame_after_the_replayer_exits(
    tmp_path, endpoint_factory, segdepth_cmd
):
    """Replay mode stays lossless past the source's exit: frames still queued for a reader
    that needs seconds to drain them are delivered, not dropped when the replayer closes."""
    n = 14
    frames = np.random.default_rng(2).integers(0, 60000, (n, 2048, 2048)).astype(np.uint16)
    with h5py.File(tmp_path / "big.h5", "w") as f:  # 8 MiB frames: beyond the socket buffers
        f["frames"] = frames
        f["timestamps_s"] = np.arange(n, dtype=float)
        f["sequence"] = np.arange(n)
        f.attrs.update(pixel_size_pm=5.3, dose_e_per_px=3.0, session_id="big", source="test")
    ep = endpoint_factory()
    proc = subprocess.Popen(
        [
            *segdepth_cmd,
            "replay",
            str(tmp_path / "big.h5"),
            "--max-rate",
            "--to-engine",
            ep,
            "--to-viewer",
            "none",
            "--hwm",
            "8",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    got = []
    with Input(ep, hwm=1) as inp:
        while True:
            msg = inp.recv(timeout_s=60)
            assert msg is not None, f"no eos after {len(got)} frames"
            if msg.kind == "eos":
                break
            got.append(np.array(msg.arrays["frame"]))
            time.sleep(0.6)  # > 5 s to drain the replayer's queue after it has finished
    out, _ = proc.communicate(timeout=150)
    assert proc.returncode == 0, out
    assert len(got) == n
    np.testing.assert_array_equal(np.stack(got), frames)
