"""Per-session post-processing: columns, their occupancy per frame, and its HMM-filtered twin.

:class:`SessionAnalysis` is pure computation on probability maps: it knows nothing of sockets
or backends, so the same code serves the live engine, a replay and the tests.
"""
from __future__ import annotations

from dataclasses import dataclass
import numpy as np

from engine.columns import ColumnConfig, ColumnTracker, FrameColumns
from engine.hmm import DepthFilter, HMMConfig


@dataclass
class Occupancy:
    """One frame's column table: the columns, and filtered depth probabilities (n, 11)."""

    columns: FrameColumns
    filtered: np.ndarray

    def table(self) -> dict[str, list]:
        """The result header's ``columns`` table (docs/CONTRACTS.md "Result message")."""
        c = self.columns
        depths = np.arange(self.filtered.shape[1], dtype=np.float32)
        return {"id": [int(i) for i in c.ids],
                "x_px": [float(v) for v in c.x_px],
                "y_px": [float(v) for v in c.y_px],
                "species": [int(s) for s in c.species],
                "depth": [int(d) for d in c.depth],
                "expected_depth": [float(v) for v in c.expected_depth],
                "confidence": [float(v) for v in c.confidence],
                "depth_filtered": [int(d) for d in self.filtered.argmax(axis=1)],
                "expected_filtered": [float(v) for v in self.filtered @ depths]}

    def buffers(self) -> dict[str, np.ndarray]:
        return {"column_probabilities": self.columns.probabilities.astype(np.float32),
                "column_probabilities_filtered": self.filtered.astype(np.float32)}


class SessionAnalysis:
    """Column tracking and temporal filtering for one session (new session: new instance)."""

    def __init__(self, pixel_size_pm: float, columns: ColumnConfig | None = None,
                 hmm: HMMConfig | None = None, first_id: int = 0):
        self.tracker = ColumnTracker(pixel_size_pm, columns, first_id)
        self.filter = DepthFilter(hmm)

    def update(self, species_prob: np.ndarray, depth_prob: np.ndarray) -> Occupancy:
        """One frame: species (3, H, W) and depth (11, H, W) probability maps."""
        cols = self.tracker.update(species_prob, depth_prob)
        return Occupancy(cols, self.filter.update(cols.ids, cols.probabilities))
