"""Scoring of the demo: engine columns matched to the simulated truth after drift, accuracy."""

import h5py
import numpy as np
import pytest

from segdepth.demo import column_accuracy, pipeline_figures
from streamer.protocol import decode, encode, encode_frame, make_header
from streamer.session_file import SessionWriter

T, SIDE, PIXEL_PM = 20, 64, 5.3


def write_truth(path):
    cols = np.array(
        [(0, 20.0, 20.0, 2), (1, 40.0, 20.0, 2), (2, 20.0, 45.0, 2), (3, 40.0, 45.0, 1)],
        dtype=[("id", "i8"), ("x_px", "f4"), ("y_px", "f4"), ("species", "u1")],
    )
    depth = np.tile(np.array([5, 6, 4, 7], dtype=np.uint8), (T, 1))
    depth[10:, 1] = 5  # a vacancy in O column 1 at frame 10
    drift = np.stack([0.3 * np.arange(T), -0.2 * np.arange(T)], axis=1)
    with h5py.File(path, "w") as f:
        f["frames"] = np.zeros((T, SIDE, SIDE), np.uint16)
        f["sequence"] = np.arange(T)
        f["truth/columns"] = cols
        f["truth/depth"] = depth
        f["truth/drift_px"] = drift
        f["truth"].attrs["events"] = '[{"column_id": 1, "start_frame": 10, "end_frame": 20}]'
        f.attrs["pixel_size_pm"] = PIXEL_PM
    return cols, depth, drift


def write_recording(path, cols, depth, drift, rng):
    """Engine sees O columns 0 and 1 (ids 10, 11) and a spurious one (id 99); column 1's
    single-frame depth is wrong on odd frames, its filtered depth always right."""
    writer = None
    for t in range(T):
        frame = decode(
            encode_frame(
                np.zeros((SIDE, SIDE), np.uint16),
                session="s",
                seq=t,
                source="test",
                pixel_size_pm=PIXEL_PM,
            )
        )
        writer = writer or SessionWriter(path, frame)
        row = writer.add_frame(frame)
        ids, xs, ys, est, filt = [10, 11, 99], [], [], [], []
        for k in (0, 1):
            xs.append(float(cols["x_px"][k] + drift[t, 1] + rng.normal(0, 0.5)))
            ys.append(float(cols["y_px"][k] + drift[t, 0] + rng.normal(0, 0.5)))
            wrong = k == 1 and t % 2 == 1
            est.append(int(depth[t, k]) + (2 if wrong else 0))
            filt.append(int(depth[t, k]))
        xs.append(60.0), ys.append(3.0), est.append(1), filt.append(1)
        table = {
            "id": ids,
            "x_px": xs,
            "y_px": ys,
            "species": [2, 2, 2],
            "depth": est,
            "expected_depth": [float(e) for e in est],
            "confidence": [0.9] * 3,
            "depth_filtered": filt,
            "expected_filtered": [float(v) for v in filt],
        }
        head = make_header(
            "result",
            session="s",
            seq=t,
            source="engine",
            model_id="m",
            backend="torch-cpu",
            batch_size=1,
            latency_ms=10.0 + t,
            frame_seq=t,
            columns=table,
            ood_warning=t % 3 == 0,
            ood_turn_score=0.1 if t % 4 == 0 else None,
        )
        maps = {
            "depth": np.zeros((SIDE, SIDE), np.uint8),
            "confidence": np.ones((SIDE, SIDE), np.float32),
            "species": np.zeros((SIDE, SIDE), np.uint8),
        }
        writer.add_result(row, decode(encode(head, maps)))
    writer.close()


def test_column_accuracy_matches_by_position_after_drift(tmp_path):
    rng = np.random.default_rng(0)
    session, recording = tmp_path / "session.h5", tmp_path / "recording.h5"
    cols, depth, drift = write_truth(session)
    write_recording(recording, cols, depth, drift, rng)
    acc = column_accuracy(recording, session, match_A=0.5)
    assert acc["oxygen_columns"] == 3 and acc["matched"] == 2
    by_truth = {c["truth_id"]: c for c in acc["columns"]}
    assert by_truth[0]["engine_id"] == 10 and by_truth[0]["accuracy"] == 1.0
    assert by_truth[1]["engine_id"] == 11 and by_truth[1]["accuracy"] == pytest.approx(0.5)
    assert by_truth[1]["accuracy_filtered"] == 1.0 and by_truth[1]["truth_depths"] == [5, 6]
    assert by_truth[1]["mae_expected"] == pytest.approx(1.0)
    assert by_truth[2]["matched"] is False  # no engine column near it
    assert [c["truth_id"] for c in acc["columns"] if c["vacancy_event"]] == [1]
    assert acc["accuracy"] == pytest.approx(0.75) and acc["accuracy_filtered"] == 1.0
    assert acc["detection_rate"] == pytest.approx(2 / 3)


def test_pipeline_figures_count_processed_and_lost(tmp_path):
    rng = np.random.default_rng(1)
    session, recording = tmp_path / "session.h5", tmp_path / "recording.h5"
    cols, depth, drift = write_truth(session)
    write_recording(recording, cols, depth, drift, rng)
    stats = {
        "stats": {
            "skipped": 0,
            "throughput_frames_per_s": 12.5,
            "backend": "torch-cpu",
            "model_id": "m",
        }
    }
    fig = pipeline_figures(recording, stats, frames_sent=T + 2)
    assert fig["frames_processed"] == T and fig["frames_lost"] == 2
    assert fig["latency_ms"]["p50"] == pytest.approx(np.percentile(10.0 + np.arange(T), 50))
    assert fig["throughput_frames_per_s"] == 12.5
    warned = len(range(0, T, 3))
    assert fig["ood"] == {"frames_warned": warned, "frames_turn_checked": len(range(0, T, 4))}
