"""Events in the recording (table + CSV), ``segdepth analyze`` and ``evaluate-session`` on a
synthetic session and recording with known changes."""

import csv
import json

import h5py
import numpy as np
import pytest

from engine.hmm import HMMConfig
from segdepth.evaluate import analyze, evaluate, format_report
from streamer.domain import N_DEPTHS
from streamer.protocol import decode, encode, encode_frame, make_header
from streamer.session_file import EVENT_DTYPE, SessionWriter

T, SIDE, PIXEL_PM, DT = 40, 64, 5.3, 0.13
#: truth columns: (x, y, species, depth per frame)
DEPTHS = {
    0: [6] * 15 + [4] * 25,  # a 2-atom loss, never regained
    1: [5] * 40,  # static
    2: [3] * 10 + [2] * 15 + [3] * 15,
}  # a 1-atom loss and regain


def write_truth(path):
    cols = np.array(
        [(0, 20.0, 20.0, 2), (1, 40.0, 20.0, 2), (2, 20.0, 45.0, 1)],
        dtype=[("id", "i8"), ("x_px", "f4"), ("y_px", "f4"), ("species", "u1")],
    )
    with h5py.File(path, "w") as f:
        f["frames"] = np.zeros((T, SIDE, SIDE), np.uint16)
        f["truth/columns"] = cols
        f["truth/depth"] = np.array([DEPTHS[k] for k in range(3)], np.uint8).T
        f["truth/drift_px"] = np.zeros((T, 2))
        f["truth"].attrs["events"] = "[]"
        f.attrs["pixel_size_pm"] = PIXEL_PM
    return cols


def posterior(depth, rng):
    """A hedging network: 0.55 on the truth, 0.2 on each neighbour, noisy."""
    row = np.full(N_DEPTHS, 0.01) + rng.uniform(0, 0.01, N_DEPTHS)
    row[depth], row[depth - 1], row[depth + 1] = 0.55, 0.2, 0.2
    return row / row.sum()


def write_recording(path, cols, rng):
    """Results with the truth columns (engine ids 10-12) and one live event in the header."""
    writer = None
    for t in range(T):
        frame = decode(
            encode_frame(
                np.zeros((SIDE, SIDE), np.uint16),
                session="s",
                seq=t,
                source="test",
                pixel_size_pm=PIXEL_PM,
                t_acq=1000 + t * DT,
            )
        )
        writer = writer or SessionWriter(path, frame)
        row = writer.add_frame(frame)
        probs = np.array([posterior(DEPTHS[k][t], rng) for k in range(3)], np.float32)
        table = {
            "id": [10, 11, 12],
            "x_px": [float(c) for c in cols["x_px"]],
            "y_px": [float(c) for c in cols["y_px"]],
            "species": [2, 2, 1],
            "depth": [int(d) for d in probs.argmax(axis=1)],
        }
        events = (
            [
                {
                    "column_id": 10,
                    "species": 2,
                    "frame": 15,
                    "time_s": 1000 + 15 * DT,
                    "before": 6,
                    "after": 4,
                    "probability": 0.93,
                    "detected_frame": 17,
                    "delay_frames": 2,
                    "delay_s": 2 * DT,
                }
            ]
            if t == 17
            else []
        )
        head = make_header(
            "result",
            session="s",
            seq=t,
            source="engine",
            model_id="m",
            backend="torch-cpu",
            batch_size=1,
            latency_ms=10.0,
            frame_seq=t,
            columns=table,
            events=events,
        )
        maps = {"column_probabilities": probs, "column_probabilities_filtered": probs}
        writer.add_result(row, decode(encode(head, maps)))
    writer.close()


@pytest.fixture()
def files(tmp_path):
    rng = np.random.default_rng(0)
    session, recording = tmp_path / "session.h5", tmp_path / "recording.h5"
    write_recording(recording, write_truth(session), rng)
    return session, recording


def test_live_events_are_recorded_and_analyze_writes_smoothed_events(files, tmp_path):
    _, recording = files
    with h5py.File(recording, "r") as f:
        live = f["events"][:]
    assert live.dtype == EVENT_DTYPE and len(live) == 1
    assert (live["column_id"][0], live["before"][0], live["after"][0]) == (10, 6, 4)
    assert live["delay_s"][0] == pytest.approx(2 * DT)

    info = analyze(recording, None, HMMConfig())
    with h5py.File(recording, "r") as f:
        g = f["analysis"]
        events = g["events"][:]
        assert g["probabilities"].shape == (T, 3, N_DEPTHS)
        assert (g["depth"][:, 0] == DEPTHS[0]).mean() > 0.9
        assert np.nanmax(g["change_probability"][:, 1]) < 0.5  # the static column
        assert json.loads(g.attrs["config"])["change_rate_per_s"] == HMMConfig().change_rate_per_s
    found = {
        (int(e["column_id"]), int(e["before"]), int(e["after"])): int(e["frame"]) for e in events
    }
    assert abs(found[(10, 6, 4)] - 15) <= 1  # the 2-atom loss, as one event
    assert abs(found[(12, 3, 2)] - 10) <= 1 and abs(found[(12, 2, 3)] - 25) <= 1
    assert len(events) == 3
    smoothed_csv, live_csv = info["csv"]
    rows = list(csv.DictReader(open(smoothed_csv)))
    assert len(rows) == 3 and set(rows[0]) == set(EVENT_DTYPE.names)
    assert list(csv.DictReader(open(live_csv)))[0]["after"] == "4"
    # --out: the analysis goes into a new file, the recording is left alone
    analyze(recording, tmp_path / "analysis.h5", HMMConfig())
    with h5py.File(tmp_path / "analysis.h5", "r") as f:
        assert len(f["analysis/events"]) == 3


def test_evaluate_session_scores_readings_against_truth_and_constant(files):
    session, recording = files
    result, columns = evaluate(session, recording, HMMConfig(), k=5)
    assert result["matched_columns"] == 3 and result["event_columns"] == 2
    r = result["readings"]
    smoother, legacy = r["smoother"], r["legacy_filter"]
    assert smoother["true_events"] == 3 and smoother["recall"] == 1.0
    assert smoother["right_size"] == 1.0 and smoother["multi_atom_right_size"] == 1.0
    assert smoother["false_changes_per_100_static"] == 0
    # live: the 2-atom loss at once, as one event; the 1-atom changes with this hedging
    # evidence (2.75:1 per frame) need more than k frames to reach the threshold
    assert r["filter"]["multi_atom_right_size"] == 1.0 and r["filter"]["mean_delay_frames"] <= 3
    assert legacy["multi_atom_right_size"] == 0  # +-1 atom per frame: 6 -> 5 -> 4
    assert smoother["event"] > smoother["event_constant"]
    assert legacy["event"] < smoother["event"] == 1.0
    assert "smoother" in format_report(result)
