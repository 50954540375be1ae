"""Per-session post-processing: columns, their occupancy per frame, its filtered twin, events.

:class:`SessionAnalysis` is pure computation on probability maps: it knows nothing of sockets
or backends, so the same code serves the live engine, a replay and the tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from engine.columns import ColumnConfig, ColumnTracker, FrameColumns, FrameMaps
from engine.hmm import DepthFilter, Event, EventDetector, HMMConfig, likelihoods


@dataclass
class Occupancy:
    """One frame's column table: the columns, filtered depth probabilities (n, 11), the
    probability that each column changed since the previous frame (n,), and the events
    detected at this frame."""

    columns: FrameColumns
    filtered: np.ndarray
    change_probability: np.ndarray
    events: list[Event] = field(default_factory=list)

    def table(self) -> dict[str, list]:
        """The result header's ``columns`` table (docs/CONTRACTS.md "Result message")."""
        c = self.columns
        depths = np.arange(self.filtered.shape[1], dtype=np.float32)
        return {
            "id": _ints(c.ids),
            "x_px": _floats(c.x_px),
            "y_px": _floats(c.y_px),
            "species": _ints(c.species),
            "depth": _ints(c.depth),
            "expected_depth": _floats(c.expected_depth),
            "confidence": _floats(c.confidence),
            "depth_filtered": _ints(self.filtered.argmax(axis=1)),
            "expected_filtered": _floats(self.filtered @ depths),
            "change_probability": _floats(self.change_probability),
        }

    def buffers(self) -> dict[str, np.ndarray]:
        return {
            "column_probabilities": self.columns.probabilities.astype(np.float32),
            "column_probabilities_filtered": self.filtered.astype(np.float32),
        }


def _ints(values) -> list[int]:
    """``values`` as a list of Python ints (ndarray.tolist: ~5x faster than a comprehension)."""
    return np.asarray(values, dtype=np.int64).tolist()


def _floats(values) -> list[float]:
    """``values`` as a list of Python floats (float32 values exactly, as float64)."""
    return np.asarray(values, dtype=np.float64).tolist()


class SessionAnalysis:
    """Column tracking, temporal filtering and events for one session (new session: new
    instance)."""

    def __init__(
        self,
        pixel_size_pm: float,
        columns: ColumnConfig | None = None,
        hmm: HMMConfig | None = None,
        first_id: int = 0,
    ):
        self.tracker = ColumnTracker(pixel_size_pm, columns, first_id)
        self.filter = DepthFilter(hmm)
        self.events = EventDetector(self.filter.config)
        self._last_t: float | None = None

    def update(
        self,
        species_prob: np.ndarray,
        depth_prob: np.ndarray,
        frame: int = 0,
        t_acq: float | None = None,
    ) -> Occupancy:
        """One frame (seq ``frame``, acquired at ``t_acq`` s): species (3, H, W) and depth
        (11, H, W) probability maps. Without ``t_acq`` the frame number stands for the time in s."""
        return self.update_maps(FrameMaps(species_prob, depth_prob), frame, t_acq)

    def update_maps(self, maps: FrameMaps, frame: int = 0, t_acq: float | None = None) -> Occupancy:
        """As :meth:`update`, for maps on the host or on the inference device."""
        return self._occupancy(self.tracker.update_maps(maps), frame, t_acq)

    def update_series(
        self, maps: Sequence[FrameMaps], frames: Sequence[int], t_acq: Sequence[float | None]
    ) -> list[Occupancy]:
        """Consecutive frames of the session (seqs ``frames``, acquired at ``t_acq``): the same
        as :meth:`update_maps` of each in turn, with the column tracking done for the lot
        (:meth:`engine.columns.ColumnTracker.update_series`: fewer waits for the device)."""
        columns = self.tracker.update_series(maps)
        return [self._occupancy(c, f, t) for c, f, t in zip(columns, frames, t_acq)]

    def _occupancy(self, cols: FrameColumns, frame: int, t_acq: float | None) -> Occupancy:
        """Filter and events of one frame's columns."""
        t = float(frame) if t_acq is None else float(t_acq)
        dt = 1.0 if self._last_t is None else t - self._last_t
        self._last_t = t
        filtered, change = self.filter.update(cols.ids, cols.probabilities, dt)
        events = self.events.update(
            frame,
            t,
            cols.ids,
            cols.species,
            filtered,
            likelihoods(cols.probabilities, self.filter.config),
        )
        return Occupancy(cols, filtered, change, events)
