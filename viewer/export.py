"""Exports: the pinned columns' time series as CSV, the current view as PNG."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PyQt6 import QtWidgets

from streamer.domain import N_DEPTHS
from viewer.colormaps import species_name
from viewer.history import ColumnSeries

CSV_FIELDS = (
    ["column_id", "species", "seq", "t_s", "expected_atoms", "expected_filtered_atoms"]
    + [f"p{d}" for d in range(N_DEPTHS)]
    + [f"p{d}_filtered" for d in range(N_DEPTHS)]
)


def _cell(v: float) -> str:
    return "" if not np.isfinite(v) else f"{v:.6g}"


def write_series_csv(path: str | Path, series: Iterable[ColumnSeries]) -> int:
    """One line per column and result (empty cells: column not reported); lines written."""
    n = 0
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(CSV_FIELDS)
        for s in series:
            for k in range(s.t_s.size):
                out.writerow(
                    [
                        s.column_id,
                        species_name(s.species),
                        int(s.seq[k]),
                        _cell(s.t_s[k]),
                        _cell(s.expected[k]),
                        _cell(s.expected_filtered[k]),
                        *map(_cell, s.probabilities[k]),
                        *map(_cell, s.probabilities_filtered[k]),
                    ]
                )
                n += 1
    return n


def save_png(widget: QtWidgets.QWidget, path: str | Path) -> None:
    """Render ``widget`` (works offscreen) into a PNG file; OSError if it cannot be written."""
    if not widget.grab().save(str(path), "PNG"):
        raise OSError(f"could not write {path}")
