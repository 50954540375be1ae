"""Time-series plots of pinned columns (paper Fig. 12): the probability of each depth over time,
and the estimated occupancy (expected depth, single-frame and HMM-filtered), one row per column.

Curves use ``setDownsampling(auto=True, method='peak')`` and ``clipToView``; the data come from
the :class:`~viewer.history.ColumnHistory` ring buffers. Time axes are linked across rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyqtgraph as pg

from streamer.domain import N_DEPTHS
from viewer.colormaps import DEPTH_COLOURS, species_name
from viewer.history import ColumnHistory, ColumnSeries

#: a depth whose probability stays below this over the plotted time is not drawn.
MIN_SHOWN_PROBABILITY = 0.01
FILTERED_PEN = pg.mkPen("#ff9f1c", width=2.5)
SINGLE_PEN = pg.mkPen("#bbbbbb", width=1)


def _curve(plot: pg.PlotItem, pen) -> pg.PlotDataItem:
    curve = plot.plot(pen=pen, connect="finite")
    curve.setDownsampling(auto=True, method="peak")
    curve.setClipToView(True)
    return curve


@dataclass
class _Row:
    column_id: int
    title: pg.LabelItem
    probs: pg.PlotItem
    occupancy: pg.PlotItem
    prob_curves: list[pg.PlotDataItem]
    single: pg.PlotDataItem
    filtered: pg.PlotDataItem
    markers: list[pg.InfiniteLine]


class PinnedColumns(pg.GraphicsLayoutWidget):
    """Up to ``max_pins`` pinned columns (the oldest pin goes when one more is pinned)."""

    def __init__(self, max_pins: int = 3):
        super().__init__()
        self.setBackground("#101010")
        self.max_pins = max_pins
        self.rows: list[_Row] = []
        self._marker_t: float | None = None
        self.hint = pg.LabelItem(
            "Click a column in the images to plot its depth probabilities "
            "over time (click again to unpin).",
            color="#aaaaaa",
        )
        self.addItem(self.hint, row=0, col=0)

    @property
    def pinned(self) -> list[int]:
        return [r.column_id for r in self.rows]

    def toggle(self, column_id: int) -> bool:
        """Pin ``column_id``, or unpin it if pinned; True if it is pinned afterwards."""
        if column_id in self.pinned:
            self.unpin(column_id)
            return False
        self.pin(column_id)
        return True

    def pin(self, column_id: int) -> None:
        if column_id in self.pinned:
            return
        ids = (self.pinned + [column_id])[-self.max_pins :]
        self._rebuild(ids)

    def unpin(self, column_id: int) -> None:
        self._rebuild([c for c in self.pinned if c != column_id])

    def clear_pins(self) -> None:
        self._rebuild([])

    def _rebuild(self, ids: list[int]) -> None:
        self.clear()
        self.rows = []
        if not ids:
            self.addItem(self.hint, row=0, col=0)
            return
        for k, cid in enumerate(ids):
            self.rows.append(self._make_row(cid, 2 * k))
        for row in self.rows[1:]:
            row.probs.setXLink(self.rows[0].probs)
        for row in self.rows:
            row.occupancy.setXLink(self.rows[0].probs)
        last = self.rows[-1]
        for plot in (last.probs, last.occupancy):
            plot.getAxis("bottom").setLabel("time", units="s")
        self.set_marker(self._marker_t)

    def _make_row(self, column_id: int, grid_row: int) -> _Row:
        title = pg.LabelItem(f"column #{column_id}", justify="left", size="10pt")
        self.addItem(title, row=grid_row, col=0, colspan=2)
        probs = self.addPlot(row=grid_row + 1, col=0)
        probs.setLabel("left", "P(depth), colour = depth")
        probs.setYRange(0, 1, padding=0.02)
        probs.setMouseEnabled(y=False)
        prob_curves = [_curve(probs, pg.mkPen(DEPTH_COLOURS[d], width=1)) for d in range(N_DEPTHS)]
        occupancy = self.addPlot(row=grid_row + 1, col=1)
        occupancy.setLabel("left", "atoms")
        occupancy.setYRange(0, N_DEPTHS - 1, padding=0.02)
        occupancy.setMouseEnabled(y=False)
        occupancy.addLegend(offset=(-5, -5), labelTextSize="8pt")
        single = _curve(occupancy, SINGLE_PEN)
        filtered = _curve(occupancy, FILTERED_PEN)
        occupancy.legend.addItem(single, "single frame")
        occupancy.legend.addItem(filtered, "filtered")
        markers = []
        for plot in (probs, occupancy):
            line = pg.InfiniteLine(
                angle=90, movable=False, pen=pg.mkPen("w", style=pg.QtCore.Qt.PenStyle.DashLine)
            )
            line.setVisible(False)
            plot.addItem(line)
            markers.append(line)
        self.ci.layout.setColumnStretchFactor(0, 3)
        self.ci.layout.setColumnStretchFactor(1, 2)
        return _Row(column_id, title, probs, occupancy, prob_curves, single, filtered, markers)

    def set_marker(self, t_s: float | None) -> None:
        """A vertical line at ``t_s`` (the frame shown from a session file); None hides it."""
        self._marker_t = t_s
        for row in self.rows:
            for line in row.markers:
                line.setVisible(t_s is not None)
                if t_s is not None:
                    line.setValue(t_s)

    def update_from(self, history: ColumnHistory, table: dict[str, np.ndarray]) -> None:
        """Redraw every pinned column from ``history``; titles from the shown result ``table``."""
        for row in self.rows:
            series = history.series(row.column_id)
            self._title(row, series, table)
            if series is None:
                continue
            peak = np.nan_to_num(series.probabilities).max(axis=0, initial=0.0)
            for d, curve in enumerate(row.prob_curves):
                # a depth never above MIN_SHOWN_PROBABILITY lies on the axis: not drawn
                visible = bool(peak[d] >= MIN_SHOWN_PROBABILITY)
                curve.setVisible(visible)
                if visible:
                    curve.setData(series.t_s, series.probabilities[:, d])
                else:
                    curve.setData([], [])
            row.single.setData(series.t_s, series.expected)
            row.filtered.setData(series.t_s, series.expected_filtered)

    @staticmethod
    def _title(row: _Row, series: ColumnSeries | None, table: dict[str, np.ndarray]) -> None:
        hit = np.flatnonzero(table["id"] == row.column_id) if table else np.array([])
        species = species_name(series.species) if series is not None else "?"
        text = f"<b>column #{row.column_id}</b> &nbsp; {species}"
        if hit.size:
            k = hit[0]
            text += (
                f" &nbsp; at ({table['x_px'][k]:.1f}, {table['y_px'][k]:.1f}) px &nbsp; "
                f"depth {table['depth'][k]} (E = {table['expected_depth'][k]:.2f}) &nbsp; "
                f"filtered {table['depth_filtered'][k]} "
                f"(E = {table['expected_filtered'][k]:.2f}) atoms"
            )
        else:
            text += " &nbsp; not in the shown result"
        if text != row.title.text:
            row.title.setText(text)
