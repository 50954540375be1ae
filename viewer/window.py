"""The viewer's main window: linked images, pinned column plots, oxygen summary, controls and
the status bar, fed either by a live stream (:class:`~viewer.live.LiveFeed`) or by a session
file (:class:`~viewer.session_reader.SessionReader`, with a time slider).

Widgets are updated only on the GUI thread, from a QTimer at ``refresh_hz`` (at most 30 Hz),
with the newest result; the receiving thread never touches them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PyQt6 import QtCore, QtGui, QtWidgets

from streamer.protocol import Message
from viewer.colormaps import COLORMAPS, species_name
from viewer.column_plots import PinnedColumns
from viewer.export import save_png, write_series_csv
from viewer.history import ColumnHistory, column_table
from viewer.image_panels import ImagePanels
from viewer.live import FeedStats, LiveFeed
from viewer.recording import RecordingProcess
from viewer.session_reader import SessionReader
from viewer.summary import OxygenSummary

MAX_REFRESH_HZ = 30.0
#: the oxygen summary is redrawn at most this often, Hz.
SUMMARY_HZ = 4.0


@dataclass
class ViewerConfig:
    """What the viewer connects to and how it draws. Endpoints are connected to (PUB binds).

    ``refresh_hz``: image updates per second (at most 30); ``plots_hz``: updates of the pinned
    columns' plots per second (they cost more than the images). ``stale_s``: seconds without any
    message before the status bar says the stream is unreachable. ``history_len``: results kept
    per column for the plots. ``pick_radius_px``: a click selects the nearest column within this
    many image pixels. ``record_dir`` / ``record_args``: where ``segdepth record`` writes and
    what else it is told (endpoints, ...).
    """

    results: list[str] = field(default_factory=list)
    frames: list[str] = field(default_factory=list)
    refresh_hz: float = 30.0
    plots_hz: float = 5.0
    stale_s: float = 5.0
    history_len: int = 2000
    max_pins: int = 3
    pick_radius_px: float = 20.0
    frame_cmap: str = "gray"
    confidence_cmap: str = "viridis"
    record_dir: str = "."
    record_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("refresh_hz", "plots_hz"):
            if not 0 < getattr(self, name) <= MAX_REFRESH_HZ:
                raise ValueError(
                    f"{name} must be in (0, {MAX_REFRESH_HZ:g}], got {getattr(self, name)}"
                )
        for name in (self.frame_cmap, self.confidence_cmap):
            if name not in COLORMAPS:
                raise ValueError(f"unknown colormap {name!r}; choose one of {', '.join(COLORMAPS)}")


def nearest_column(
    table: dict[str, np.ndarray], x: float, y: float, radius_px: float
) -> int | None:
    """Index (row of ``table``) of the column nearest (x, y) within ``radius_px``, or None."""
    if table["id"].size == 0:
        return None
    d2 = (table["x_px"] - x) ** 2 + (table["y_px"] - y) ** 2
    k = int(np.nanargmin(d2)) if np.isfinite(d2).any() else None
    return k if k is not None and d2[k] <= radius_px**2 else None


class ViewerWindow(QtWidgets.QMainWindow):
    """The SegDepth Live viewer. Call :meth:`connect_live` or :meth:`open_session`."""

    def __init__(self, config: ViewerConfig | None = None):
        super().__init__()
        self.config = config or ViewerConfig()
        self.setWindowTitle("SegDepth Live")
        self.history = ColumnHistory(self.config.history_len)
        self.feed: LiveFeed | None = None
        self.session: SessionReader | None = None
        self.recorder = RecordingProcess(self.config.record_dir, self.config.record_args)
        self.paused = False
        self.displayed = 0  # display updates so far (the benchmark counts them)
        self.result: Message | None = None
        self.table = column_table({})
        self._shown_generation = -1
        self._levels_set = False
        self._last_summary = 0.0
        self._last_plots = 0.0
        self._status_alarm = False

        self.images = ImagePanels(self.config.frame_cmap, self.config.confidence_cmap)
        self.images.columnClicked.connect(self.pick_column)
        self.pins = PinnedColumns(self.config.max_pins)
        self.summary = OxygenSummary()
        self._build_controls()
        self._build_layout()
        self.timer = QtCore.QTimer(self)
        self.timer.setInterval(int(round(1000.0 / self.config.refresh_hz)))
        self.timer.timeout.connect(self.tick)
        self.timer.start()

    # --- construction --------------------------------------------------------------------
    def _build_controls(self) -> None:
        bar = QtWidgets.QToolBar("controls", self)
        self.addToolBar(bar)
        bar.setMovable(False)
        self.pause_action = self._action(bar, "Pause")
        self.pause_action.setCheckable(True)
        self.pause_action.setShortcut("Space")
        self.pause_action.toggled.connect(self.set_paused)
        bar.addSeparator()
        self._action(
            bar,
            "Auto contrast",
            self.images.auto_levels,
            "Set the raw frame's display levels from the frame shown now (0.5-99.5 "
            "percentile); they stay fixed afterwards",
        )
        self.frame_cmap = self._combo(
            bar, "Frame", self.config.frame_cmap, self.images.set_frame_colormap
        )
        self.conf_cmap = self._combo(
            bar, "Confidence", self.config.confidence_cmap, self.images.set_confidence_colormap
        )
        self.columns_action = self._action(
            bar, "Columns", None, "Show detected columns (yellow: Ce, magenta: O)"
        )
        self.columns_action.setCheckable(True)
        self.columns_action.setChecked(True)
        self.columns_action.toggled.connect(self.images.show_columns)
        self._action(bar, "Clear pins", self.clear_pins)
        bar.addSeparator()
        self.record_action = self._action(
            bar, "Record", None, "Start / stop a `segdepth record` process"
        )
        self.record_action.setCheckable(True)
        self.record_action.toggled.connect(self._toggle_recording)
        self._action(bar, "Export CSV…", self._ask_export_csv)
        self._action(bar, "Export PNG…", self._ask_export_png)
        self._action(bar, "Open session…", self._ask_open_session)

    def _status_bar(self) -> QtWidgets.QStatusBar:
        bar = self.statusBar()  # QMainWindow makes it on first use
        assert bar is not None
        return bar

    def _action(
        self, bar: QtWidgets.QToolBar, text: str, slot=None, tip: str | None = None
    ) -> QtGui.QAction:
        """A toolbar button (``slot`` called when it is clicked)."""
        action = QtGui.QAction(text, self)
        if slot is not None:
            action.triggered.connect(slot)
        if tip:
            action.setToolTip(tip)
        bar.addAction(action)
        return action

    @staticmethod
    def _combo(bar: QtWidgets.QToolBar, label: str, value: str, slot) -> QtWidgets.QComboBox:
        bar.addWidget(QtWidgets.QLabel(f" {label}: "))
        combo = QtWidgets.QComboBox()
        combo.addItems(COLORMAPS)
        combo.setCurrentText(value)
        combo.currentTextChanged.connect(slot)
        bar.addWidget(combo)
        return combo

    def _build_layout(self) -> None:
        self.slider = QtWidgets.QSlider(QtCore.Qt.Orientation.Horizontal)
        self.slider.valueChanged.connect(self.seek)
        self.slider_label = QtWidgets.QLabel()
        slider_row = QtWidgets.QWidget()
        row = QtWidgets.QHBoxLayout(slider_row)
        row.setContentsMargins(6, 0, 6, 0)
        row.addWidget(QtWidgets.QLabel("Frame"))
        row.addWidget(self.slider, 1)
        row.addWidget(self.slider_label)
        self.slider_row = slider_row
        slider_row.setVisible(False)
        bottom = QtWidgets.QSplitter(QtCore.Qt.Orientation.Horizontal)
        bottom.addWidget(self.pins)
        bottom.addWidget(self.summary)
        bottom.setStretchFactor(0, 3)
        bottom.setStretchFactor(1, 1)
        main = QtWidgets.QSplitter(QtCore.Qt.Orientation.Vertical)
        main.addWidget(self.images)
        main.addWidget(bottom)
        main.setStretchFactor(0, 5)
        main.setStretchFactor(1, 4)
        central = QtWidgets.QWidget()
        layout = QtWidgets.QVBoxLayout(central)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(main, 1)
        layout.addWidget(slider_row)
        self.setCentralWidget(central)
        self.status = QtWidgets.QLabel("not connected")
        self._status_bar().addWidget(self.status, 1)
        self.summary.events.setFont(
            QtGui.QFontDatabase.systemFont(QtGui.QFontDatabase.SystemFont.FixedFont)
        )

    # --- sources -------------------------------------------------------------------------
    def connect_live(self) -> None:
        """Subscribe to the configured results (and frames) endpoints."""
        self._close_sources()
        self.history = ColumnHistory(self.config.history_len)
        self.feed = LiveFeed(self.config.results, self.config.frames, self.history).start()
        self.slider_row.setVisible(False)
        self.pins.set_marker(None)

    def open_session(self, path: str | Path) -> None:
        """Show a session file (stops the live feed); the slider moves through its frames."""
        reader = SessionReader(path)
        self._close_sources()
        self.session = reader
        self.history = ColumnHistory(max(self.config.history_len, len(reader)))
        reader.fill_history(self.history)
        self._levels_set = False
        self.slider.blockSignals(True)
        self.slider.setRange(0, len(reader) - 1)
        self.slider.setValue(0)
        self.slider.blockSignals(False)
        self.slider_row.setVisible(True)
        self.seek(0)

    def _close_sources(self) -> None:
        if self.feed is not None:
            self.feed.stop()
            self.feed = None
        if self.session is not None:
            self.session.close()
            self.session = None
        self._shown_generation = -1

    # --- display -------------------------------------------------------------------------
    def set_paused(self, paused: bool) -> None:
        """Freeze the display (the feed keeps receiving; plots resume where the stream is)."""
        self.paused = paused
        self.pause_action.setText("Resume" if paused else "Pause")
        if self.pause_action.isChecked() != paused:
            self.pause_action.setChecked(paused)

    def set_frame_levels(self, levels: tuple[float, float]) -> None:
        """Fix the raw frame's display levels (counts); auto contrast changes them on demand."""
        self.images.set_frame_levels(levels)
        self._levels_set = True

    def tick(self) -> None:
        """Timer slot: show the newest result if it changed, refresh the status bar."""
        if self.recorder.process is not None and not self.recorder.running:
            code = self.recorder.stop()
            self.record_action.setChecked(False)
            self._status_bar().showMessage(f"recorder exited with code {code}", 10000)
        if self.feed is None:
            return
        if not self.paused:
            generation, result, frame = self.feed.take()
            if generation != self._shown_generation:
                self._shown_generation = generation
                self.show_data(result, frame.arrays["frame"] if frame is not None else None)
        self._show_live_status(self.feed.stats())

    def show_data(self, result: Message | None, frame: np.ndarray | None) -> None:
        """Draw one result and its raw frame (either may be None)."""
        if frame is not None:
            self.images.set_frame(frame)
            if not self._levels_set:
                self.images.auto_levels()
                self._levels_set = True
        if result is not None:
            self.result = result
            self.table = column_table(result.header)
            self.images.set_result(result.arrays, result.header)
        now = time.monotonic()
        if self.session is not None or now - self._last_plots >= 1.0 / self.config.plots_hz:
            self._last_plots = now
            self.refresh_plots()
        else:
            self._mark_pins()
        if self.session is not None or now - self._last_summary >= 1.0 / SUMMARY_HZ:
            self._last_summary = now
            until = result.seq if self.session is not None and result is not None else None
            self.summary.update_from(self.table, self.history, until)
        self.displayed += 1

    def refresh_plots(self) -> None:
        """Redraw the pinned columns' plots and their markers in the images now."""
        self.pins.update_from(self.history, self.table)
        self._mark_pins()

    def _mark_pins(self) -> None:
        """Mark the pinned columns where the shown result has them."""
        where = []
        for cid in self.pins.pinned:
            hit = np.flatnonzero(self.table["id"] == cid)
            if hit.size:
                k = hit[0]
                where.append((cid, float(self.table["x_px"][k]), float(self.table["y_px"][k])))
        self.images.set_pins(where)

    def pick_column(self, x: float, y: float) -> int | None:
        """Pin (or unpin) the column nearest image point (x, y) px; its id, or None."""
        k = nearest_column(self.table, x, y, self.config.pick_radius_px)
        if k is None:
            self._status_bar().showMessage(
                f"no column within {self.config.pick_radius_px:g} px of ({x:.0f}, {y:.0f})", 4000
            )
            return None
        cid = int(self.table["id"][k])
        pinned = self.pins.toggle(cid)
        self.refresh_plots()
        self._status_bar().showMessage(
            f"{'pinned' if pinned else 'unpinned'} column #{cid} "
            f"({species_name(self.table['species'][k])})",
            4000,
        )
        return cid

    def clear_pins(self) -> None:
        self.pins.clear_pins()
        self.refresh_plots()

    def seek(self, k: int) -> None:
        """Show row ``k`` of the open session file."""
        if self.session is None:
            return
        reader = self.session
        result = reader.result(k)
        if result is None:
            self.result, self.table = None, column_table({})
            self.images.clear_result()
        self.show_data(result, reader.frame(k))
        t0 = self.history.t0 if self.history.t0 is not None else float(reader.timestamps_s[0])
        t_s = float(reader.timestamps_s[k]) - t0
        self.pins.set_marker(t_s)
        self.slider_label.setText(f"{k + 1} / {len(reader)}   t = {t_s:.2f} s")
        self._show_session_status(k, result)

    # --- status bar ----------------------------------------------------------------------
    def _set_status(self, text: str, alarm: bool = False) -> None:
        self.status.setText(text)
        if alarm != self._status_alarm:
            self._status_alarm = alarm
            self.status.setStyleSheet("color: #ff5050; font-weight: bold;" if alarm else "")

    def _show_live_status(self, s: FeedStats) -> None:
        prefix = "PAUSED · " if self.paused else ""
        if s.idle_s > self.config.stale_s:
            where = ", ".join(self.config.results or self.config.frames)
            verb = "since" if s.ever_received else "from"
            self._set_status(
                f"{prefix}No data {verb} {where} for {s.idle_s:.0f} s — is the engine running "
                f"(segdepth serve / demo)? Still listening…",
                alarm=True,
            )
            return
        warning = self._ood_warning()
        if warning:
            self._set_status(f"{prefix}{warning}", alarm=True)
            return
        latency = "–" if s.latency_ms is None else f"{s.latency_ms:.1f} ms"
        path = self.recorder.path
        rec = f" · recording {path.name}" if self.recorder.running and path is not None else ""
        if s.malformed:
            rec += f" · {s.malformed} malformed messages skipped"
        self._set_status(
            f"{prefix}{s.results_per_s:.1f} results/s · {s.frames_per_s:.1f} frames/s · "
            f"engine latency {latency} · lost: engine {s.engine_skipped}, viewer "
            f"{s.results_lost} results, {s.frames_lost} frames · backend {s.backend or '–'} · "
            f"model {s.model_id or '–'}{rec}"
        )

    def _ood_warning(self) -> str:
        """The alarm text when the shown result lies outside what the model knows, else ''."""
        head = self.result.header if self.result is not None else {}
        if not head.get("ood_warning"):
            return ""
        turn = head.get("ood_turn_score")
        checked = (
            f", turn check {float(turn):.2f}"
            if isinstance(turn, (int, float)) and math.isfinite(turn)
            else ""
        )
        return (
            f"WARNING: this frame lies outside what the model knows (OOD score "
            f"{float(head.get('ood_score', float('nan'))):.2f}{checked}): depths are "
            f"unreliable — check optics, orientation and dose"
        )

    def _show_session_status(self, k: int, result: Message | None) -> None:
        reader = self.session
        assert reader is not None  # called while a session is open
        text = f"{reader.path.name} · session {reader.session_id} · frame {k + 1}/{len(reader)}"
        if result is None:
            text += " · no engine result for this frame"
        else:
            h = result.header
            text += (
                f" · backend {h.get('backend') or '–'} · model "
                f"{h.get('model_id') or '–'}"
                f" · latency {h.get('latency_ms', float('nan')):.1f} ms"
            )
        warning = self._ood_warning() if result is not None else ""
        self._set_status(f"{text} · {warning}" if warning else text, alarm=bool(warning))

    # --- recording and export ------------------------------------------------------------
    def _toggle_recording(self, on: bool) -> None:
        if on and not self.recorder.running:
            try:
                path = self.recorder.start()
            except OSError as exc:
                self.record_action.setChecked(False)
                self._status_bar().showMessage(f"cannot start the recorder: {exc}", 10000)
                return
            self._status_bar().showMessage(f"recording to {path}", 5000)
        elif not on and self.recorder.process is not None:
            code = self.recorder.stop()
            self._status_bar().showMessage(
                f"recording stopped ({self.recorder.path}, exit code {code})", 8000
            )

    def export_csv(self, path: str | Path) -> int:
        """Write the pinned columns' time series; the number of lines written."""
        series = [s for s in (self.history.series(c) for c in self.pins.pinned) if s is not None]
        return write_series_csv(path, series)

    def export_png(self, path: str | Path) -> None:
        """Save the whole window as it is shown now."""
        save_png(self, path)

    def _ask_export_csv(self) -> None:
        path, _ = QtWidgets.QFileDialog.getSaveFileName(
            self, "Export pinned columns", "columns.csv", "CSV (*.csv)"
        )
        if path:
            n = self.export_csv(path)
            self._status_bar().showMessage(f"wrote {n} lines to {path}", 5000)

    def _ask_export_png(self) -> None:
        path, _ = QtWidgets.QFileDialog.getSaveFileName(
            self, "Export view", "view.png", "PNG (*.png)"
        )
        if path:
            self.export_png(path)
            self._status_bar().showMessage(f"saved {path}", 5000)

    def _ask_open_session(self) -> None:
        path, _ = QtWidgets.QFileDialog.getOpenFileName(
            self, "Open session", "", "HDF5 session (*.h5 *.hdf5)"
        )
        if path:
            try:
                self.open_session(path)
            except (OSError, ValueError) as exc:
                QtWidgets.QMessageBox.warning(self, "Cannot open session", str(exc))

    def closeEvent(self, event: QtGui.QCloseEvent | None) -> None:  # noqa: N802 (Qt name)
        self.timer.stop()
        self._close_sources()
        if self.recorder.running:
            self.recorder.stop()
        super().closeEvent(event)
