"""Opening session files in the viewer: slider, results, frames-only files, headless screenshot."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import subprocess  # noqa: E402
import sys  # noqa: E402

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from viewer.session_reader import SessionReader  # noqa: E402
from viewer.window import ViewerConfig, ViewerWindow  # noqa: E402

T, H, W = 12, 48, 64
#: columns of the test session: id, x_px, y_px, species (1 Ce, 2 O)
COLUMNS = [(3, 10.0, 12.0, 1), (5, 30.0, 12.0, 2), (8, 50.0, 30.0, 2)]


def column_depth(t: int) -> np.ndarray:
    """Column depths at row t: column 5 loses an atom from row 6 on."""
    return np.array([7, 4 if t < 6 else 3, 2])


def write_session(path, results: bool = True) -> np.ndarray:
    """A small session file in the recorder's layout (docs/CONTRACTS.md, docs/SESSION_FILE.md);
    rows 4 has no result. Returns the frames."""
    rng = np.random.default_rng(0)
    frames = rng.poisson(50, (T, H, W)).astype(np.uint16)
    frames[:, 0, 0] = np.arange(T)  # each frame distinguishable
    with h5py.File(path, "w") as f:
        f["frames"] = frames
        f["timestamps_s"] = 1000.0 + 0.1 * np.arange(T)
        f["sequence"] = np.arange(T, dtype=np.int64) + 100
        f.attrs.update(
            pixel_size_pm=5.3,
            dose_e_per_px=100.0,
            frame_interval_s=0.1,
            session_id="test-session",
            source="test",
        )
        if not results:
            return frames
        has = np.ones(T, np.uint8)
        has[4] = 0
        res = f.create_group("results")
        res["has_result"] = has
        depth = np.zeros((T, H, W), np.uint8)
        for t in range(T):
            for (_, x, y, _), d in zip(COLUMNS, column_depth(t)):
                depth[t, int(y) - 2 : int(y) + 3, int(x) - 2 : int(x) + 3] = d
        depth[4] = 255
        res["depth"] = depth
        res["confidence"] = np.full((T, H, W), 0.9, np.float32)
        res["species"] = np.zeros((T, H, W), np.uint8)
        res["latency_ms"] = np.full(T, 7.5, np.float32)
        res["ood_score"] = np.full(T, 0.1, np.float32)
        res["ood_warning"] = (np.arange(T) == 9).astype(np.int8)  # row 9 was flagged
        res["model_id"] = np.array([b"m-test"] * T, dtype="S64")
        res["backend"] = np.array([b"torch-cpu"] * T, dtype="S32")
        cols = f.create_group("columns")
        cols["id"] = np.array([c[0] for c in COLUMNS], np.int64)
        cols["species"] = np.array([c[3] for c in COLUMNS], np.uint8)
        cols["x_px"] = np.tile([c[1] for c in COLUMNS], (T, 1)).astype(np.float32)
        cols["y_px"] = np.tile([c[2] for c in COLUMNS], (T, 1)).astype(np.float32)
        dep = np.stack([column_depth(t) for t in range(T)])
        probs = np.full((T, len(COLUMNS), 11), 0.01, np.float32)
        for t in range(T):
            probs[t, np.arange(len(COLUMNS)), dep[t]] = 0.9
        cols["depth"] = dep.astype(np.int8)
        cols["expected_depth"] = dep.astype(np.float32)
        cols["confidence"] = np.full(dep.shape, 0.9, np.float32)
        cols["depth_filtered"] = dep.astype(np.int8)
        cols["expected_filtered"] = dep.astype(np.float32)
        cols["column_probabilities"] = probs
        cols["column_probabilities_filtered"] = probs
        for name in ("x_px", "y_px", "expected_depth", "expected_filtered"):
            cols[name][4] = np.nan
        cols["column_probabilities"][4] = np.nan
    return frames


@pytest.fixture
def window(qtbot):
    win = ViewerWindow(ViewerConfig())
    qtbot.addWidget(win)
    win.resize(1200, 800)
    win.show()
    yield win
    win.close()


def test_slider_moves_through_the_session(window, tmp_path):
    frames = write_session(tmp_path / "s.h5")
    window.open_session(tmp_path / "s.h5")
    assert window.slider_row.isVisible() and window.slider.maximum() == T - 1
    np.testing.assert_array_equal(window.images.frame_image.image, frames[0])
    window.slider.setValue(7)
    np.testing.assert_array_equal(window.images.frame_image.image, frames[7])
    assert window.result.seq == 107
    assert window.images.depth_image.image[12, 30] == 3  # column 5 after losing an atom
    assert "frame 8/12" in window.status.text() and "torch-cpu" in window.status.text()
    window.slider.setValue(4)  # a frame without result: no depth map, no columns
    assert window.result is None and window.images.depth_image.image is None
    assert "no engine result" in window.status.text()


def test_pinned_column_shows_the_whole_session_and_its_event(window, tmp_path):
    write_session(tmp_path / "s.h5")
    window.open_session(tmp_path / "s.h5")
    window.slider.setValue(9)
    assert window.pick_column(31.0, 13.0) == 5
    marker = window.images.pin_markers[0].data[0]
    assert (marker["x"], marker["y"]) == (30.0, 12.0)
    series = window.history.series(5)
    assert series.t_s.size == T - 1  # every row with a result
    np.testing.assert_allclose(series.expected_filtered, [4] * 5 + [3] * 6)
    curve = window.pins.rows[0].filtered  # its full data (getData() is clipped to the view)
    np.testing.assert_allclose(curve.yData, series.expected_filtered)
    assert window.pins.rows[0].markers[0].value() == pytest.approx(0.9)
    assert window.summary.events.count() == 1
    assert "#5" in window.summary.events.item(0).text()
    window.slider.setValue(2)  # before the event: not listed yet
    assert window.summary.events.count() == 0


def test_frames_only_session_shows_frames(window, tmp_path):
    frames = write_session(tmp_path / "f.h5", results=False)
    window.open_session(tmp_path / "f.h5")
    window.slider.setValue(3)
    np.testing.assert_array_equal(window.images.frame_image.image, frames[3])
    assert window.result is None


def test_reader_rejects_a_file_that_is_not_a_session(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["images"] = np.zeros((2, 4, 4))
    with pytest.raises(ValueError, match="not a session file"):
        SessionReader(tmp_path / "x.h5")
    (tmp_path / "t.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match="t.h5 is not an HDF5 session file"):
        SessionReader(tmp_path / "t.h5")
    with pytest.raises(FileNotFoundError):
        SessionReader(tmp_path / "missing.h5")


def test_screenshot_of_a_session_from_the_command_line(tmp_path):
    write_session(tmp_path / "s.h5")
    out = tmp_path / "shot.png"
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "viewer",
            "--session",
            str(tmp_path / "s.h5"),
            "--frame",
            "8",
            "--screenshot",
            str(out),
            "--size",
            "1000x700",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1000, 700)
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "viewer",
            "--session",
            str(tmp_path / "s.h5"),
            "--frame",
            "99",
            "--screenshot",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert bad.returncode == 2 and "--frame 99 outside" in bad.stderr


def test_a_file_written_by_the_recorder_opens(window, tmp_path):
    """The recorder's own writer (streamer.session_file) and the viewer's reader agree."""
    from streamer.protocol import decode
    from streamer.session_file import SessionWriter
    from viewer.synthetic import SceneConfig, SyntheticScene

    scene = SyntheticScene(SceneConfig(shape=(96, 128), spacing_px=32, hold=2))
    writer = None
    for k in range(6):
        frame = decode(scene.frame_parts(k, t_acq=50.0 + k))
        writer = writer or SessionWriter(tmp_path / "rec.h5", frame)
        row = writer.add_frame(frame)
        if k != 2:
            writer.add_result(row, decode(scene.result_parts(k, t_acq=50.0 + k)))
    writer.close()
    window.open_session(tmp_path / "rec.h5")
    window.slider.setValue(5)
    np.testing.assert_array_equal(window.images.frame_image.image, scene.frames[5 % 4])
    np.testing.assert_array_equal(
        window.images.depth_image.image, scene.maps[scene.state(5)]["depth"]
    )
    np.testing.assert_array_equal(window.table["id"], scene.ids)
    np.testing.assert_allclose(window.table["x_px"], scene.x_px)
    series = window.history.series(int(scene.ids[-1]))
    np.testing.assert_allclose(series.t_s, [0, 1, 3, 4, 5])
    probs = scene.probabilities[scene.state(5)][-1]
    np.testing.assert_allclose(series.probabilities[-1], probs, atol=1 / 254)
    window.slider.setValue(2)
    assert window.result is None


def test_a_flagged_frame_raises_the_out_of_distribution_alarm(window, tmp_path):
    write_session(tmp_path / "s.h5")
    window.open_session(str(tmp_path / "s.h5"))
    window.seek(8)
    assert "outside what the model knows" not in window.status.text()
    window.seek(9)
    assert "outside what the model knows" in window.status.text()
    assert "ff5050" in window.status.styleSheet()
