"""Summary of all oxygen columns: current occupancy (histogram of filtered depths, totals) and
the recent occupancy events (the engine's, docs/CONTRACTS.md "Result message")."""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PyQt6 import QtWidgets

from streamer.domain import N_DEPTHS, SPECIES_O
from viewer.colormaps import DEPTH_COLOURS
from viewer.history import ColumnHistory

MAX_EVENTS_SHOWN = 100


class OxygenSummary(QtWidgets.QWidget):
    """Occupancy of the shown result's O columns, and the last events from the history."""

    def __init__(self) -> None:
        super().__init__()
        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        title = QtWidgets.QLabel("<b>Oxygen columns</b>")
        self.totals = QtWidgets.QLabel("no result yet")
        self.totals.setWordWrap(True)
        self.histogram = pg.PlotWidget(background="#101010")
        self.histogram.setLabel("bottom", "filtered depth (atoms)")
        self.histogram.setLabel("left", "columns")
        self.histogram.setMouseEnabled(x=False, y=False)
        self.histogram.setMenuEnabled(False)
        self.histogram.getAxis("bottom").setTicks([[(d, str(d)) for d in range(N_DEPTHS)]])
        self.bars = pg.BarGraphItem(
            x=np.arange(N_DEPTHS),
            height=np.zeros(N_DEPTHS),
            width=0.8,
            brushes=[pg.mkBrush(c) for c in DEPTH_COLOURS],
        )
        self.histogram.addItem(self.bars)
        self.histogram.setXRange(-0.6, N_DEPTHS - 0.4, padding=0)
        self.histogram.setMinimumHeight(120)
        events_title = QtWidgets.QLabel("<b>Recent events</b> (the engine's)")
        self.events = QtWidgets.QListWidget()
        self.events.setMinimumHeight(80)
        for widget in (title, self.totals, self.histogram, events_title, self.events):
            layout.addWidget(widget)
        layout.setStretch(2, 3)
        layout.setStretch(4, 2)
        self._last_event_key: tuple | None = None

    def update_from(
        self, table: dict[str, np.ndarray], history: ColumnHistory, until_seq: int | None = None
    ) -> None:
        """Show ``table``'s O columns and the events up to result ``until_seq`` (None: all)."""
        o = table["species"] == SPECIES_O
        filtered = table["depth_filtered"][o]
        counts = np.bincount(filtered[(filtered >= 0) & (filtered < N_DEPTHS)], minlength=N_DEPTHS)
        self.bars.setOpts(height=counts)
        self.histogram.setYRange(0, max(1, counts.max()) * 1.1, padding=0)
        expected = table["expected_filtered"][o]
        expected = expected[np.isfinite(expected)]
        if o.any():
            self.totals.setText(
                f"{int(o.sum())} columns; {expected.sum():.1f} O atoms "
                f"(filtered); mean {expected.mean() if expected.size else 0:.2f} "
                f"atoms per column"
            )
        else:
            self.totals.setText("no oxygen columns in the shown result")
        events = history.recent_events(SPECIES_O, MAX_EVENTS_SHOWN, until_seq)
        key = (history.session, history.appended, until_seq, len(events))
        if key == self._last_event_key:
            return
        self._last_event_key = key
        self.events.clear()
        self.events.addItems(
            [
                f"{e.t_s:7.2f} s  #{e.column_id:<5} {e.old:>2} \u2192 {e.new:<2} (frame {e.seq})"
                for e in events
            ]
        )
