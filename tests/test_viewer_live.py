"""The viewer's real widgets, offscreen, fed by a real PUB socket on a free loopback port."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PyQt6 import QtCore  # noqa: E402

from streamer.domain import SPECIES_O
from streamer.sockets import Publisher  # noqa: E402
from viewer.synthetic import SceneConfig, SyntheticScene  # noqa: E402
from viewer.window import ViewerConfig, ViewerWindow  # noqa: E402

SCENE = SyntheticScene(SceneConfig(shape=(160, 200), spacing_px=40, hold=3))


class Stream:
    """A publisher thread sending the scene's results (and frames) at ``rate_hz``."""

    def __init__(self, results_ep: str, frames_ep: str | None = None, rate_hz: float = 40.0):
        self.results_ep, self.frames_ep, self.rate_hz = results_ep, frames_ep, rate_hz
        self.sent = 0
        self.running = threading.Event()
        self.running.set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        res = Publisher(self.results_ep)
        frames = Publisher(self.frames_ep) if self.frames_ep else None
        try:
            while not self.stop.is_set():
                if self.running.is_set():
                    if frames is not None:
                        frames.send(SCENE.frame_parts(self.sent))
                    res.send(SCENE.result_parts(self.sent))
                    self.sent += 1
                time.sleep(1.0 / self.rate_hz)
        finally:
            res.close()
            if frames is not None:
                frames.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


@pytest.fixture
def live(qtbot, endpoint_factory):
    results_ep, frames_ep = endpoint_factory(), endpoint_factory()
    stream = Stream(results_ep, frames_ep)
    window = ViewerWindow(ViewerConfig(results=[results_ep], frames=[frames_ep], stale_s=1.0))
    qtbot.addWidget(window)
    window.resize(1200, 800)
    window.show()
    window.connect_live()
    yield window, stream
    window.close()
    stream.close()


def _shown_seq(window: ViewerWindow) -> int:
    return window.result.seq if window.result is not None else -1


def test_stream_updates_images(live, qtbot):
    window, stream = live
    qtbot.waitUntil(lambda: _shown_seq(window) >= 0, timeout=10000)
    first = _shown_seq(window)
    qtbot.waitUntil(lambda: _shown_seq(window) >= first + 6, timeout=10000)
    seq = _shown_seq(window)
    expected = SCENE.maps[SCENE.state(seq)]
    np.testing.assert_array_equal(window.images.depth_image.image, expected["depth"])
    np.testing.assert_array_equal(window.images.conf_image.image, expected["confidence"])
    qtbot.waitUntil(lambda: window.images.frame_image.image is not None, timeout=5000)
    frame = window.images.frame_image.image
    assert any(np.array_equal(frame, f) for f in SCENE.frames)
    # the overlay shows every column at its position, split by species
    shown = sum(len(s.data) for _, s in window.images.overlays)
    assert shown == SCENE.ids.size
    qtbot.waitUntil(lambda: "results/s" in window.status.text(), timeout=5000)
    assert "backend none" in window.status.text() and "model synthetic" in window.status.text()


def test_click_selects_nearest_column_and_its_plot_fills(live, qtbot):
    window, stream = live
    qtbot.waitUntil(lambda: window.result is not None, timeout=10000)
    k = int(np.flatnonzero(SCENE.species == SPECIES_O)[3])
    target = int(SCENE.ids[k])
    pos = window.images.widget_pos(SCENE.x_px[k] + 3, SCENE.y_px[k] - 2, view="depth")
    qtbot.mouseClick(window.images.viewport(), QtCore.Qt.MouseButton.LeftButton, pos=pos)
    qtbot.waitUntil(lambda: window.pins.pinned == [target], timeout=3000)
    row = window.pins.rows[0]

    def points() -> int:
        x = row.filtered.xData  # all of it (getData() is clipped to the view)
        return 0 if x is None else len(x)

    qtbot.waitUntil(lambda: points() >= 5, timeout=10000)
    n = points()
    qtbot.waitUntil(lambda: points() > n, timeout=10000)  # it keeps filling
    depth = int(window.table["depth"][np.flatnonzero(window.table["id"] == target)[0]])
    assert row.prob_curves[depth].isVisible() and len(row.prob_curves[depth].yData) >= n
    hidden = [c for c in row.prob_curves if not c.isVisible()]  # depths never above 1 %
    assert row.prob_curves[0] in hidden
    assert f"#{target}" in row.title.text and "O" in row.title.text
    # a click far from every column selects nothing
    window.pick_column(-500.0, -500.0)
    assert window.pins.pinned == [target]


def test_pause_stops_updates_and_resume_restarts_them(live, qtbot):
    window, stream = live
    qtbot.waitUntil(lambda: window.displayed >= 3, timeout=10000)
    window.pause_action.trigger()
    assert window.paused
    qtbot.wait(100)  # a tick that was already due may still land
    shown, image = window.displayed, window.images.depth_image.image
    sent = stream.sent
    qtbot.waitUntil(lambda: stream.sent >= sent + 10, timeout=10000)
    qtbot.wait(200)
    assert window.displayed == shown
    assert window.images.depth_image.image is image
    assert "PAUSED" in window.status.text()
    window.pause_action.trigger()
    qtbot.waitUntil(lambda: window.displayed > shown, timeout=5000)


def test_silent_stream_is_reported_in_the_status_bar(live, qtbot):
    window, stream = live
    qtbot.waitUntil(lambda: window.displayed >= 1, timeout=10000)
    stream.running.clear()
    qtbot.waitUntil(lambda: "No data since" in window.status.text(), timeout=5000)
    assert window.status.styleSheet()  # shown as an alarm
    stream.running.set()
    qtbot.waitUntil(lambda: "results/s" in window.status.text(), timeout=5000)


def test_unreachable_engine_shows_a_message_instead_of_freezing(qtbot, endpoint_factory):
    nowhere = endpoint_factory()  # nothing binds it
    window = ViewerWindow(ViewerConfig(results=[nowhere], frames=[], stale_s=0.5))
    qtbot.addWidget(window)
    window.show()
    window.connect_live()
    qtbot.waitUntil(lambda: "No data from" in window.status.text(), timeout=5000)
    assert nowhere in window.status.text()
    ticks = []
    window.timer.timeout.connect(lambda: ticks.append(1))
    qtbot.waitUntil(lambda: len(ticks) >= 3, timeout=3000)  # the GUI keeps running
    window.close()


def test_export_of_pinned_columns_and_of_the_view(live, qtbot, tmp_path):
    window, stream = live
    qtbot.waitUntil(lambda: window.result is not None, timeout=10000)
    ids = [int(i) for i in SCENE.ids[SCENE.species == SPECIES_O][:2]]
    for cid in ids:
        window.pins.pin(cid)
    qtbot.waitUntil(
        lambda: all(
            window.history.series(c) is not None and window.history.series(c).t_s.size >= 3
            for c in ids
        ),
        timeout=10000,
    )
    window.pause_action.trigger()
    n = window.export_csv(tmp_path / "pins.csv")
    lines = (tmp_path / "pins.csv").read_text().splitlines()
    assert len(lines) == n + 1 and n >= 6
    assert lines[0].startswith("column_id,species,seq,t_s,expected_atoms")
    assert {int(line.split(",")[0]) for line in lines[1:]} == set(ids)
    window.export_png(tmp_path / "view.png")
    assert (tmp_path / "view.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_screenshot_of_a_stream_from_the_command_line(endpoint_factory, tmp_path):
    results_ep = endpoint_factory()
    stream = Stream(results_ep)
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "viewer",
                "--results",
                results_ep,
                "--no-frames",
                "--screenshot",
                str(tmp_path / "live.png"),
                "--wait",
                "30",
                "--collect",
                "1",
                "--size",
                "900x600",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
    finally:
        stream.close()
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "live.png").read_bytes()[:4] == b"\x89PNG"
    silent = subprocess.run(
        [
            sys.executable,
            "-m",
            "viewer",
            "--results",
            endpoint_factory(),
            "--no-frames",
            "--screenshot",
            str(tmp_path / "none.png"),
            "--wait",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert silent.returncode == 1 and "no result within 1 s" in silent.stderr
    assert (tmp_path / "none.png").exists()
