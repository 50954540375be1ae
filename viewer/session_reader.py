"""Read a recorded (or simulated) session file for display; tolerant of what it lacks.

Layout: docs/CONTRACTS.md "Session file" and docs/SESSION_FILE.md -- ``frames`` (T, H, W),
``timestamps_s`` (T,), ``sequence`` (T,); ``results/`` (``has_result``, maps ``depth`` (255: no
result), ``confidence``, ``species``, per-row ``latency_ms``, ``skipped``, ``model_id``,
``backend``, ``drift_px``); ``columns/`` (``id``, ``species`` (C,) and per-row (T, C) series
``x_px``, ``y_px``, ``depth``, ``expected_depth``, ``confidence``, ``depth_filtered``,
``expected_filtered``, and (T, C, 11) ``column_probabilities[_filtered]``; NaN / -1 where a
column is absent). A file with frames only (a simulated session, a recording without engine)
shows its frames; a file whose writer is still running is opened in SWMR mode.

Each row is turned into the same :class:`streamer.protocol.Message` a live result would be, so
the display code does not know where its data came from.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from streamer.protocol import Message
from streamer.session_file import open_for_reading
from viewer.history import ColumnHistory

#: per-row column series copied into the result header's ``columns`` table.
_TABLE_SERIES = (
    "x_px",
    "y_px",
    "depth",
    "expected_depth",
    "confidence",
    "depth_filtered",
    "expected_filtered",
)
_PROBABILITIES = ("column_probabilities", "column_probabilities_filtered")
_MAPS = ("depth", "confidence", "species")
_NO_RESULT_U1 = 255


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace").rstrip("\x00")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _text(value[()])
    return str(value)


class SessionReader:
    """A session file opened read-only. ``len()`` rows; :meth:`frame`, :meth:`result` per row."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no session file at {self.path}")
        try:
            self.file = open_for_reading(self.path)
        except OSError as exc:
            raise ValueError(f"{self.path} is not an HDF5 file ({exc})") from None
        f = self.file
        self.frames = f["frames"] if "frames" in f and f["frames"].ndim == 3 else None
        res = f.get("results")
        self.maps = {
            n: res[n]
            for n in _MAPS
            if isinstance(res, h5py.Group) and n in res and res[n].ndim == 3
        }
        if self.frames is None and "depth" not in self.maps:
            f.close()
            raise ValueError(
                f"{self.path} is not a session file: neither a (T, H, W) 'frames' "
                f"nor a 'results/depth' dataset"
            )
        first = self.frames if self.frames is not None else self.maps["depth"]
        self.n_rows = int(first.shape[0])
        self.shape = tuple(first.shape[1:])
        self.timestamps_s = self._row_series("timestamps_s", np.float64, math.nan)
        if not np.isfinite(self.timestamps_s).any():
            interval = float(f.attrs.get("frame_interval_s", 1.0))
            self.timestamps_s = np.arange(self.n_rows) * (interval if interval > 0 else 1.0)
        self.sequence = self._row_series("sequence", np.int64, -1)
        if (self.sequence < 0).all():
            self.sequence = np.arange(self.n_rows, dtype=np.int64)
        self.session_id = _text(f.attrs.get("session_id", self.path.stem))
        self.pixel_size_pm = float(f.attrs.get("pixel_size_pm", math.nan))
        self.has_result = self._has_result()
        self._columns = self._read_columns()

    def __len__(self) -> int:
        return self.n_rows

    def _row_series(self, name: str, dtype: type, fill: Any, group: str = "") -> np.ndarray:
        f = self.file[group] if group else self.file
        out: np.ndarray = np.full(self.n_rows, fill, dtype=dtype)
        if name in f and f[name].ndim == 1:
            data = f[name][: self.n_rows]
            out[: len(data)] = data
        return out

    def _has_result(self) -> np.ndarray:
        if "results" in self.file and "has_result" in self.file["results"]:
            return self._row_series("has_result", np.uint8, 0, "results").astype(bool)
        if "depth" in self.maps:  # no flag: a row has a result where the map was written
            return np.array(
                [self.maps["depth"][k, 0, 0] != _NO_RESULT_U1 for k in range(self.n_rows)],
                dtype=bool,
            )
        return np.zeros(self.n_rows, dtype=bool)

    def _read_columns(self) -> dict[str, np.ndarray]:
        cols = self.file.get("columns")
        if not isinstance(cols, h5py.Group) or "id" not in cols:
            return {}
        out = {"id": cols["id"][:].astype(np.int64)}
        c = out["id"].size
        out["species"] = (
            cols["species"][:c].astype(np.int64) if "species" in cols else np.zeros(c, np.int64)
        )
        for name in (*_TABLE_SERIES, *_PROBABILITIES):
            if name in cols and cols[name].shape[:1] and cols[name].ndim >= 2:
                data = cols[name][: self.n_rows, :c]
                if data.shape[:2] == (self.n_rows, c):
                    out[name] = data
        return out

    @property
    def has_columns(self) -> bool:
        return "x_px" in self._columns and "y_px" in self._columns

    def frame(self, k: int) -> np.ndarray | None:
        """The raw frame of row ``k`` (counts), or None if the file holds no frames."""
        return None if self.frames is None else np.asarray(self.frames[k])

    def _column_table(self, k: int) -> tuple[dict[str, list], dict[str, np.ndarray]]:
        cols = self._columns
        if not self.has_columns:
            return {}, {}
        present = np.isfinite(cols["x_px"][k]) & np.isfinite(cols["y_px"][k])
        table: dict[str, list] = {
            "id": cols["id"][present].tolist(),
            "species": cols["species"][present].tolist(),
        }
        for name in _TABLE_SERIES:
            if name in cols:
                table[name] = cols[name][k][present].tolist()
        arrays = {
            name: np.nan_to_num(cols[name][k][present]).astype(np.float32)
            for name in _PROBABILITIES
            if name in cols
        }
        return table, arrays

    def result(self, k: int) -> Message | None:
        """Row ``k`` as a result message (header and arrays), or None if it has no result."""
        if not 0 <= k < self.n_rows:
            raise IndexError(f"row {k} outside 0..{self.n_rows - 1}")
        if not self.has_result[k]:
            return None
        res = self.file.get("results")

        def value(name: str, default: Any) -> Any:
            if (
                isinstance(res, h5py.Group)
                and name in res
                and res[name].shape[:1]
                and res[name].shape[0] > k
            ):
                v = res[name][k]
                return _text(v) if isinstance(v, (bytes, np.bytes_)) else v.tolist()
            return default

        table, arrays = self._column_table(k)
        for name, dset in self.maps.items():
            arrays[name] = np.asarray(dset[k])
        head = {
            "kind": "result",
            "session": self.session_id,
            "seq": int(self.sequence[k]),
            "frame_seq": int(self.sequence[k]),
            "t_acq": float(self.timestamps_s[k]),
            "source": _text(self.file.attrs.get("source", "file")),
            "model_id": value("model_id", ""),
            "backend": value("backend", ""),
            "latency_ms": value("latency_ms", math.nan),
            "skipped": value("skipped", 0),
            "ood_score": value("ood_score", math.nan),
            "ood_turn_score": value("ood_turn_score", math.nan),
            "ood_warning": value("ood_warning", -1) == 1,
            "pixel_size_pm": self.pixel_size_pm,
            "columns": table,
        }
        return Message(head, arrays)

    def fill_history(self, history: ColumnHistory) -> None:
        """Append every row's column table to ``history`` (sized for the whole session)."""
        history.clear()
        if not self.has_columns:
            return
        for k in np.flatnonzero(self.has_result):
            table, arrays = self._column_table(int(k))
            head = {
                "session": self.session_id,
                "seq": int(self.sequence[k]),
                "t_acq": float(self.timestamps_s[k]),
                "columns": table,
            }
            history.append(head, arrays)

    def close(self) -> None:
        self.file.close()
