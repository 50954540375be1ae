"""Ring buffers of every column's occupancy over the recent results, and occupancy events.

Each result's column table (docs/CONTRACTS.md "Result message") is appended whole: the depth
probabilities (single-frame and filtered) of every column, quantised to 1/254 in uint8, and
its expected depths (atoms). A change of a column's filtered depth (argmax) is an
:class:`OccupancyEvent`. Thread-safe: a receiving thread appends while the GUI thread reads.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamer.domain import N_DEPTHS, SPECIES_O

_MISSING = 255  # uint8 probability code of "column not in this result"
_SCALE = 254.0


@dataclass(frozen=True)
class OccupancyEvent:
    """Column ``column_id`` changed its depth from ``old`` to ``new`` atoms at frame ``seq``,
    ``t_s`` seconds after the session's first result (the engine's event, or with older
    engines a change of the filtered depth)."""

    seq: int
    t_s: float
    column_id: int
    species: int
    old: int
    new: int


@dataclass
class ColumnSeries:
    """One column's recent history, oldest first; NaN where the column was not reported.

    ``t_s`` (k,) seconds since the session's first result, ``seq`` (k,) result numbers,
    ``probabilities`` / ``probabilities_filtered`` (k, 11), ``expected`` / ``expected_filtered``
    (k,) atoms.
    """

    column_id: int
    species: int
    t_s: np.ndarray
    seq: np.ndarray
    probabilities: np.ndarray
    probabilities_filtered: np.ndarray
    expected: np.ndarray
    expected_filtered: np.ndarray


def column_table(header: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The result header's ``columns`` table as numpy arrays (empty arrays if absent)."""
    cols = header.get("columns") or {}
    n = len(cols.get("id", ()))
    out = {"id": np.asarray(cols.get("id", ()), dtype=np.int64)}
    for key, dtype in (
        ("x_px", np.float64),
        ("y_px", np.float64),
        ("species", np.int64),
        ("depth", np.int64),
        ("expected_depth", np.float64),
        ("confidence", np.float64),
        ("depth_filtered", np.int64),
        ("expected_filtered", np.float64),
    ):
        values = cols.get(key)
        out[key] = (
            np.asarray(values, dtype=dtype)
            if values is not None and len(values) == n
            else np.full(n, np.nan if dtype is np.float64 else -1, dtype=dtype)
        )
    return out


class ColumnHistory:
    """The last ``capacity`` results' column occupancy, for every column of one session.

    A result of a new session clears it. ``max_events`` most recent events are kept.
    """

    def __init__(self, capacity: int = 2000, max_events: int = 500):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.events: deque[OccupancyEvent] = deque(maxlen=max_events)
        self._lock = threading.Lock()
        self._reset(slots=64)

    def _reset(self, slots: int) -> None:
        cap = self.capacity
        self.session: str | None = None
        self.t0: float | None = None
        self.appended = 0
        self.events.clear()
        self._slot: dict[int, int] = {}
        self._last_ids: tuple[np.ndarray, np.ndarray] | None = None
        self._ids = np.full(slots, -1, np.int64)
        self._species = np.zeros(slots, np.int64)
        self._last_filtered = np.full(slots, -1, np.int64)
        self._t = np.full(cap, np.nan)
        self._seq = np.full(cap, -1, np.int64)
        self._p = np.full((cap, slots, N_DEPTHS), _MISSING, np.uint8)
        self._pf = np.full((cap, slots, N_DEPTHS), _MISSING, np.uint8)
        self._e = np.full((cap, slots), np.nan, np.float32)
        self._ef = np.full((cap, slots), np.nan, np.float32)

    def clear(self) -> None:
        with self._lock:
            self._reset(slots=64)

    def _grow(self, need: int) -> None:
        slots = self._ids.size
        if need <= slots:
            return
        new = max(need, 2 * slots)
        pad = new - slots
        self._ids = np.concatenate([self._ids, np.full(pad, -1, np.int64)])
        self._species = np.concatenate([self._species, np.zeros(pad, np.int64)])
        self._last_filtered = np.concatenate([self._last_filtered, np.full(pad, -1, np.int64)])
        self._p = np.concatenate(
            [self._p, np.full((self.capacity, pad, N_DEPTHS), _MISSING, np.uint8)], axis=1
        )
        self._pf = np.concatenate(
            [self._pf, np.full((self.capacity, pad, N_DEPTHS), _MISSING, np.uint8)], axis=1
        )
        self._e = np.concatenate([self._e, np.full((self.capacity, pad), np.nan, np.float32)], 1)
        self._ef = np.concatenate([self._ef, np.full((self.capacity, pad), np.nan, np.float32)], 1)

    def _slots_of(self, ids: np.ndarray, species: np.ndarray) -> np.ndarray:
        if self._last_ids is not None and np.array_equal(ids, self._last_ids[0]):
            return self._last_ids[1]  # the same columns as last time (the common case)
        fresh = [int(i) for i in ids if int(i) not in self._slot]
        if fresh:
            self._grow(len(self._slot) + len(fresh))
            for i in fresh:
                s = len(self._slot)
                self._slot[i] = s
                self._ids[s] = i
        slots = np.fromiter((self._slot[int(i)] for i in ids), np.int64, ids.size)
        self._species[slots] = species
        self._last_ids = (ids.copy(), slots)
        return slots

    def append(self, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        """Add one result: its header and buffers as :func:`streamer.protocol.decode` gives."""
        table = column_table(header)
        with self._lock:
            if header.get("session") != self.session:
                self._reset(slots=max(64, table["id"].size))
                self.session = header.get("session")
            t_acq = float(header.get("t_acq", 0.0))
            if self.t0 is None:
                self.t0 = t_acq
            row = self.appended % self.capacity
            self.appended += 1
            self._t[row] = t_acq - self.t0
            self._seq[row] = int(header.get("seq", -1))
            self._p[row] = _MISSING
            self._pf[row] = _MISSING
            self._e[row] = np.nan
            self._ef[row] = np.nan
            if table["id"].size == 0:
                return
            slots = self._slots_of(table["id"], table["species"])
            n = slots.size
            for name, store in (
                ("column_probabilities", self._p),
                ("column_probabilities_filtered", self._pf),
            ):
                probs = arrays.get(name)
                if probs is not None and probs.shape == (n, N_DEPTHS):
                    store[row, slots] = np.clip(np.rint(probs * _SCALE), 0, _SCALE)
            self._e[row, slots] = table["expected_depth"]
            self._ef[row, slots] = table["expected_filtered"]
            self._record_events(slots, table, self._seq[row], self._t[row], header.get("events"))

    def _record_events(
        self,
        slots: np.ndarray,
        table: dict[str, np.ndarray],
        seq: int,
        t_s: float,
        engine_events: list | None,
    ) -> None:
        """The engine's own events where the result has them (docs/CONTRACTS.md: thresholded,
        with the change point), else changes of the filtered depth (older engines)."""
        new = table["depth_filtered"]
        assert self.t0 is not None  # set by append() before it records events
        if engine_events is not None:
            for e in engine_events:
                self.events.append(
                    OccupancyEvent(
                        int(e["frame"]),
                        float(e["time_s"]) - self.t0,
                        int(e["column_id"]),
                        int(e["species"]),
                        int(e["before"]),
                        int(e["after"]),
                    )
                )
            self._last_filtered[slots] = new
            return
        old = self._last_filtered[slots]
        changed = np.flatnonzero((old >= 0) & (new >= 0) & (new != old))
        for k in changed:
            self.events.append(
                OccupancyEvent(
                    int(seq),
                    float(t_s),
                    int(table["id"][k]),
                    int(table["species"][k]),
                    int(old[k]),
                    int(new[k]),
                )
            )
        self._last_filtered[slots] = new

    def ids(self) -> list[int]:
        with self._lock:
            return list(self._slot)

    def recent_events(
        self, species: int | None = SPECIES_O, n: int = 50, until_seq: int | None = None
    ) -> list[OccupancyEvent]:
        """The ``n`` most recent events of ``species`` (None: all) up to result ``until_seq``
        (None: the newest), newest first."""
        with self._lock:
            events = [
                e
                for e in reversed(self.events)
                if (species is None or e.species == species)
                and (until_seq is None or e.seq <= until_seq)
            ]
        return events[:n]

    def series(self, column_id: int) -> ColumnSeries | None:
        """Column ``column_id``'s history (a copy), or None if it was never reported."""
        with self._lock:
            slot = self._slot.get(int(column_id))
            if slot is None:
                return None
            k = min(self.appended, self.capacity)
            order = np.arange(self.appended - k, self.appended) % self.capacity

            def probs(store: np.ndarray) -> np.ndarray:
                q = store[order, slot].astype(np.float32)
                q[q == _MISSING] = np.nan
                return q / _SCALE

            return ColumnSeries(
                int(column_id),
                int(self._species[slot]),
                self._t[order].copy(),
                self._seq[order].copy(),
                probs(self._p),
                probs(self._pf),
                self._e[order, slot].copy(),
                self._ef[order, slot].copy(),
            )
