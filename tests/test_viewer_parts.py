"""Viewer building blocks: history ring buffers and events, colours, picking, recorder control,
the command lines."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pyqtgraph as pg  # noqa: E402
import pytest  # noqa: E402

from viewer.colormaps import DEPTH_COLOURS, continuous_lut, depth_lut  # noqa: E402
from viewer.history import ColumnHistory, column_table  # noqa: E402
from viewer.image_panels import ImagePanels  # noqa: E402
from viewer.recording import RecordingProcess, record_command  # noqa: E402
from viewer.window import ViewerConfig, nearest_column  # noqa: E402


def result(seq: int, ids, depth_filtered, species=None, session="s", t=None):
    n = len(ids)
    probs = np.zeros((n, 11), np.float32)
    probs[np.arange(n), depth_filtered] = 1.0
    head = {
        "session": session,
        "seq": seq,
        "t_acq": 100.0 + seq if t is None else t,
        "columns": {
            "id": list(ids),
            "x_px": [10.0 * i for i in ids],
            "y_px": [5.0] * n,
            "species": species or [2] * n,
            "depth": list(depth_filtered),
            "expected_depth": [float(d) for d in depth_filtered],
            "confidence": [1.0] * n,
            "depth_filtered": list(depth_filtered),
            "expected_filtered": [float(d) for d in depth_filtered],
        },
    }
    return head, {"column_probabilities": probs, "column_probabilities_filtered": probs}


def test_history_keeps_the_last_results_per_column_and_marks_absences():
    h = ColumnHistory(capacity=5)
    for seq in range(8):
        ids = [1, 2] if seq != 6 else [2, 7]  # column 1 missing at 6, column 7 new
        h.append(*result(seq, ids, [seq % 11, 3]))
    s1 = h.series(1)
    np.testing.assert_array_equal(s1.seq, [3, 4, 5, 6, 7])
    np.testing.assert_allclose(s1.t_s, [3, 4, 5, 6, 7])
    np.testing.assert_allclose(s1.expected, [3, 4, 5, np.nan, 7])
    assert s1.probabilities[0, 3] == 1.0 and np.isnan(s1.probabilities[3]).all()
    assert np.isnan(h.series(7).expected[:3]).all() and h.series(7).expected[3] == 3
    assert h.series(99) is None


def test_history_events_are_changes_of_the_filtered_depth():
    h = ColumnHistory()
    depths = [[5, 2], [5, 2], [4, 2], [4, 3], [5, 3]]
    for seq, d in enumerate(depths):
        h.append(*result(seq, [10, 11], d, species=[2, 1]))
    events = h.recent_events(species=2)
    assert [(e.seq, e.column_id, e.old, e.new) for e in events] == [(4, 10, 4, 5), (2, 10, 5, 4)]
    assert [(e.column_id, e.species) for e in h.recent_events(species=1)] == [(11, 1)]
    assert [e.seq for e in h.recent_events(species=2, until_seq=3)] == [2]


def test_history_takes_the_engines_events_where_results_carry_them():
    h = ColumnHistory()
    for seq, d in enumerate([[6], [5], [4], [4]]):  # the filtered depth flickers through 5
        head, arrays = result(seq, [10], d)
        head["events"] = (
            [{"column_id": 10, "species": 2, "frame": 1, "time_s": 101.0, "before": 6, "after": 4}]
            if seq == 3
            else []
        )
        h.append(head, arrays)
    assert [(e.seq, e.t_s, e.old, e.new) for e in h.recent_events()] == [(1, 1.0, 6, 4)]


def test_a_new_session_clears_the_history():
    h = ColumnHistory()
    h.append(*result(0, [1], [4], session="a"))
    h.append(*result(0, [5], [4], session="b", t=500.0))
    assert h.series(1) is None and h.ids() == [5] and h.t0 == 500.0


def test_column_table_tolerates_missing_fields():
    t = column_table({"columns": {"id": [1, 2], "x_px": [1.0, 2.0]}})
    assert t["y_px"].shape == (2,) and np.isnan(t["y_px"]).all()
    assert (t["depth_filtered"] == -1).all()
    assert column_table({})["id"].size == 0


def test_nearest_column_within_radius():
    table = column_table(result(0, [1, 2, 3], [0, 0, 0])[0])  # x = 10, 20, 30; y = 5
    assert nearest_column(table, 21.0, 7.0, 5.0) == 1
    assert nearest_column(table, 21.0, 70.0, 5.0) is None


def test_depth_map_pixels_get_their_legend_colour(qtbot):
    panels = ImagePanels()
    qtbot.addWidget(panels)
    depth = np.tile(np.arange(11, dtype=np.uint8), (3, 1))
    panels.set_result({"depth": depth}, {})
    panels.depth_image.render()
    q = panels.depth_image.qimage
    for d in range(11):
        rgb = q.pixelColor(d, 1).getRgb()[:3]
        assert rgb == pg.mkColor(DEPTH_COLOURS[d]).getRgb()[:3], d
    assert depth_lut().shape == (11, 4) and continuous_lut("inferno").shape == (256, 4)
    with pytest.raises(ValueError, match="unknown colormap"):
        continuous_lut("rainbow")


def test_config_rejects_a_refresh_rate_above_30_hz():
    with pytest.raises(ValueError, match="refresh_hz"):
        ViewerConfig(refresh_hz=60)


def test_record_button_runs_and_stops_a_segdepth_record_process(tmp_path, endpoint_factory):
    assert record_command(tmp_path / "x.h5")[:4] == [sys.executable, "-m", "segdepth", "record"]
    rec = RecordingProcess(tmp_path, ["--frames", endpoint_factory(), "--results", "none"])
    path = rec.start()
    assert path.parent == tmp_path and path.suffix == ".h5"
    assert rec.running
    time.sleep(2.0)  # let it install its signal handlers
    assert rec.running, "the recorder exited on its own"
    code = rec.stop()
    assert code == 0 and not rec.running


@pytest.mark.parametrize("module", ["viewer", "viewer.bench"])
def test_command_lines_explain_their_options(module):
    out = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "--size" in out.stdout and "usage:" in out.stdout
