"""HDF5 session files: the writer behind ``segdepth record`` and the reader behind ``replay``.

The layout is documented in docs/SESSION_FILE.md; its base (``frames``, ``timestamps_s``,
``sequence`` and the root attributes) is the "Session file" of docs/CONTRACTS.md, so a recording
replays like a simulated session. Every dataset is chunked and resizable along time (axis 0);
the writer works in SWMR mode (readers: ``h5py.File(path, "r", swmr=True)`` and ``refresh()``).
A file whose writer was killed keeps its SWMR flag set: :func:`recover` (``segdepth recover``)
rewrites it so plain h5py opens it, keeping every row that has its sequence number and
timestamp; :func:`open_session` also reads such a file as it is (``swmr=True``).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from streamer.domain import N_DEPTHS
from streamer.protocol import PROTOCOL_VERSION, Message

LAYOUT_VERSION = 1
#: per-column time series (T, n_columns): name -> (dtype, fill value for "column absent", units)
COLUMN_SERIES: dict[str, tuple[str, Any, str]] = {
    "x_px": ("f4", np.nan, "px"),
    "y_px": ("f4", np.nan, "px"),
    "depth": ("i1", -1, "atoms"),
    "expected_depth": ("f4", np.nan, "atoms"),
    "confidence": ("f4", np.nan, "1"),
    "depth_filtered": ("i1", -1, "atoms"),
    "expected_filtered": ("f4", np.nan, "atoms"),
    "change_probability": ("f4", np.nan, "P(depth changed since the previous frame)"),
}
#: one row per depth-change event (docs/SESSION_FILE.md "events"; engine.hmm.Event).
EVENT_DTYPE = np.dtype(
    [
        ("column_id", "<i8"),
        ("species", "u1"),
        ("frame", "<i8"),
        ("time_s", "<f8"),
        ("before", "i1"),
        ("after", "i1"),
        ("probability", "<f4"),
        ("detected_frame", "<i8"),
        ("delay_frames", "<i4"),
        ("delay_s", "<f4"),
    ]
)
#: per-column depth probability series (T, n_columns, 11), from the result buffers of that name.
COLUMN_PROBABILITIES = ("column_probabilities", "column_probabilities_filtered")
#: result maps (T, H, W): name -> (dtype, fill value for "no result", units)
RESULT_MAPS: dict[str, tuple[str, Any, str]] = {
    "depth": ("u1", 255, "atoms (255: no result)"),
    "confidence": ("f4", np.nan, "1"),
    "species": ("u1", 255, "0 background, 1 Ce, 2 O (255: no result)"),
}

log = logging.getLogger(__name__)
_UNCLOSABLE: list = []  #: writers whose file could not be closed after a write error


def git_revision() -> str:
    """The git commit of this checkout, or ``unknown``."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _compression_opts(compress: bool) -> dict[str, Any]:
    if not compress:
        return {}
    import hdf5plugin

    return dict(hdf5plugin.Bitshuffle(cname="lz4"))


def _float(header: dict, name: str) -> float:
    value = header.get(name)
    return (
        float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool)
        else math.nan
    )


class SessionWriter:
    """Appends frames and their results to a new session file (SWMR, flushed on a clock).

    The file is created from the first frame (its shape and dtype fix the ``frames`` dataset);
    all datasets and attributes exist before SWMR mode starts. ``flush_interval_s``: at most
    this long between flushes (what a SIGKILL can lose). ``attrs``: extra root attributes
    (provenance). Raises OSError from HDF5 (e.g. a full disk); the caller stops on it.
    """

    def __init__(
        self,
        path: str | Path,
        first: Message,
        *,
        compress: bool = False,
        flush_interval_s: float = 0.5,
        attrs: dict[str, Any] | None = None,
    ):
        self.path = Path(path)
        frame = first.arrays["frame"]
        self.shape = frame.shape
        self.dtype = frame.dtype
        self.flush_interval_s = flush_interval_s
        self.n_frames = 0
        self.n_results = 0
        #: frames safely on disk as of the last successful flush.
        self.n_flushed = 0
        #: model id and backend of the first result (root attributes once closed).
        self.provenance: dict[str, str] = {"model_id": "", "backend": ""}
        self.n_columns = 0
        self._column_index: dict[int, int] = {}
        self._last_flush = time.monotonic()
        head = first.header
        self.f = h5py.File(self.path, "w", libver="latest")
        try:
            self._create(head, compress, attrs or {})
        except BaseException:
            self.f.close()
            raise
        self.f.swmr_mode = True

    # --- layout --------------------------------------------------------------------------
    def _series(
        self,
        group: h5py.Group,
        name: str,
        shape: tuple[int, ...],
        dtype: str,
        units: str,
        fill: Any = 0,
        compress: dict | None = None,
    ) -> h5py.Dataset:
        """A dataset growing along time: (0, *shape), one chunk per frame for images."""
        chunks = (1, *shape) if len(shape) == 2 else (1024, *shape)
        dset = group.create_dataset(
            name,
            shape=(0, *shape),
            maxshape=(None, *shape),
            dtype=dtype,
            chunks=chunks,
            fillvalue=fill,
            **(compress or {}),
        )
        dset.attrs["units"] = units
        return dset

    def _create(self, head: dict, compress: bool, attrs: dict[str, Any]) -> None:
        f, (h, w) = self.f, self.shape
        cz = _compression_opts(compress)
        self.frames = self._series(f, "frames", (h, w), self.dtype.str, "counts", compress=cz)
        self.timestamps = self._series(f, "timestamps_s", (), "f8", "s (Unix epoch)")
        self.sequence = self._series(f, "sequence", (), "i8", "1", fill=-1)
        self.received = self._series(f, "received_s", (), "f8", "s (Unix epoch)")
        self.frame_dose = self._series(
            f, "frame_dose_e_per_px", (), "f4", "electrons per pixel per frame", fill=np.nan
        )
        res = f.create_group("results")
        self.has_result = self._series(res, "has_result", (), "u1", "bool")
        self.maps = {
            name: self._series(res, name, (h, w), dt, units, fill, cz)
            for name, (dt, fill, units) in RESULT_MAPS.items()
        }
        self.latency = self._series(res, "latency_ms", (), "f4", "ms", fill=np.nan)
        self.drift = self._series(res, "drift_px", (2,), "f4", "px (dy, dx)", fill=np.nan)
        self.ood = self._series(
            res, "ood_score", (), "f4", "mean 1 - confidence over column pixels", fill=np.nan
        )
        self.ood_turn = self._series(
            res,
            "ood_turn_score",
            (),
            "f4",
            "disagreement of the frame and its quarter-turn (total variation over column "
            "pixels); NaN: not checked",
            fill=np.nan,
        )
        self.ood_warning = self._series(
            res,
            "ood_warning",
            (),
            "i1",
            "1 outside the model's domain, 0 inside, -1 unknown",
            fill=-1,
        )
        self.skipped = self._series(res, "skipped", (), "i8", "frames", fill=-1)
        self.batch_size = self._series(res, "batch_size", (), "i4", "frames", fill=-1)
        self.model_id = self._series(res, "model_id", (), "S64", "", fill=b"")
        self.backend = self._series(res, "backend", (), "S32", "", fill=b"")
        cols = f.create_group("columns")
        self.col_id = cols.create_dataset("id", (0,), "i8", maxshape=(None,), chunks=(256,))
        self.col_species = cols.create_dataset(
            "species", (0,), "u1", maxshape=(None,), chunks=(256,)
        )
        self.col_species.attrs["units"] = "1 Ce, 2 O"
        self.col_first_row = cols.create_dataset(
            "first_row", (0,), "i8", maxshape=(None,), chunks=(256,)
        )
        self.col_series = {
            name: cols.create_dataset(
                name, (0, 0), dt, maxshape=(None, None), chunks=(64, 64), fillvalue=fill
            )
            for name, (dt, fill, _) in COLUMN_SERIES.items()
        }
        for name, (_, _, units) in COLUMN_SERIES.items():
            self.col_series[name].attrs["units"] = units
        self.col_probs = {
            name: cols.create_dataset(
                name,
                (0, 0, N_DEPTHS),
                "f4",
                maxshape=(None, None, N_DEPTHS),
                chunks=(16, 64, N_DEPTHS),
                fillvalue=np.nan,
            )
            for name in COLUMN_PROBABILITIES
        }
        for dset in self.col_probs.values():
            dset.attrs["units"] = "probability of 0..10 atoms"
        self.events = f.create_dataset("events", (0,), EVENT_DTYPE, maxshape=(None,), chunks=(256,))
        self.events.attrs["units"] = (
            "frame, detected_frame: sequence numbers; time_s: s "
            "(Unix epoch); before, after: atoms; delay_s: s"
        )
        a = f.attrs
        a["layout_version"] = LAYOUT_VERSION
        a["protocol_version"] = PROTOCOL_VERSION
        a["session_id"] = str(head["session"])
        a["source"] = str(head["source"])
        a["mode"] = str(head.get("mode", "unknown"))
        a["pixel_size_pm"] = _float(head, "pixel_size_pm")
        a["dose_e_per_px"] = _float(head, "dose_e_per_px")
        a["frame_interval_s"] = math.nan  # known at the end (finalize)
        a["git_revision"] = git_revision()
        a["created_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        a["compression"] = "bitshuffle-lz4" if compress else "none"
        a["complete"] = 0
        for key, value in attrs.items():
            a[key] = value

    # --- appending -----------------------------------------------------------------------
    def _grow_time(self, n: int) -> None:
        for dset in (
            self.frames,
            self.timestamps,
            self.sequence,
            self.received,
            self.frame_dose,
            self.has_result,
            self.latency,
            self.drift,
            self.ood,
            self.ood_turn,
            self.ood_warning,
            self.skipped,
            self.batch_size,
            self.model_id,
            self.backend,
            *self.maps.values(),
            *self.col_series.values(),
            *self.col_probs.values(),
        ):
            dset.resize(n, axis=0)

    def add_frame(self, msg: Message) -> int:
        """Append a frame (already checked to match the file's shape and dtype); its row."""
        row = self.n_frames
        self._grow_time(row + 1)
        head = msg.header
        self.timestamps[row] = head["t_acq"]  # first: a row is valid once these two are set
        self.sequence[row] = head["seq"]
        self.frames[row] = msg.arrays["frame"]
        self.received[row] = time.time()
        self.frame_dose[row] = _float(head, "dose_e_per_px")
        self.n_frames = row + 1
        return row

    def _columns_of(self, head: dict, row: int) -> np.ndarray:
        """File column indices of the result's column table (new ids appended)."""
        ids = [int(i) for i in head["columns"]["id"]]
        species = head["columns"].get("species", [0] * len(ids))
        new = [(i, s) for i, s in zip(ids, species) if i not in self._column_index]
        if new:
            n0 = self.n_columns
            self.n_columns += len(new)
            for k, (cid, _) in enumerate(new):
                self._column_index[cid] = n0 + k
            for dset in (self.col_id, self.col_species, self.col_first_row):
                dset.resize(self.n_columns, axis=0)
            self.col_id[n0:] = [c for c, _ in new]
            self.col_species[n0:] = [int(s) for _, s in new]
            self.col_first_row[n0:] = row
            for dset in (*self.col_series.values(), *self.col_probs.values()):
                dset.resize(self.n_columns, axis=1)
        return np.array([self._column_index[i] for i in ids], dtype=np.int64)

    def add_result(self, row: int, msg: Message) -> None:
        """Store a result in the row of the frame it answers (shapes already checked)."""
        head = msg.header
        for name, dset in self.maps.items():
            if name in msg.arrays:
                dset[row] = msg.arrays[name]
        self.has_result[row] = 1
        self.latency[row] = _float(head, "latency_ms")
        self.ood[row] = _float(head, "ood_score")
        self.ood_turn[row] = _float(head, "ood_turn_score")
        warning = head.get("ood_warning")
        self.ood_warning[row] = int(warning) if isinstance(warning, bool) else -1
        drift = head.get("drift_px")
        if isinstance(drift, list) and len(drift) == 2:
            self.drift[row] = [_float({"v": d}, "v") for d in drift]
        self.skipped[row] = (
            int(head.get("skipped", -1)) if isinstance(head.get("skipped"), int) else -1
        )
        self.batch_size[row] = head["batch_size"]
        if not self.n_results:  # root attributes at close: the model that made the results
            self.provenance = {"model_id": head["model_id"], "backend": head["backend"]}
        self.model_id[row] = head["model_id"].encode("utf-8")[:64]
        self.backend[row] = head["backend"].encode("utf-8")[:32]
        if isinstance(head.get("columns"), dict) and head["columns"].get("id"):
            index = self._columns_of(head, row)
            order = np.argsort(index)
            lo, hi = int(index.min()), int(index.max()) + 1
            for name, dset in self.col_series.items():
                values = head["columns"].get(name)
                if values is None or len(values) != len(index):
                    continue
                dt, fill, _ = COLUMN_SERIES[name]
                line = np.full(hi - lo, fill, dtype=dt)
                line[index - lo] = np.asarray(values, dtype=np.float64).astype(dt)
                dset[row, lo:hi] = line
            for name, dset in self.col_probs.items():
                probs = msg.arrays.get(name)
                if probs is None or probs.shape != (len(index), N_DEPTHS):
                    continue
                block = np.full((hi - lo, N_DEPTHS), np.nan, np.float32)
                block[index[order] - lo] = probs[order]
                dset[row, lo:hi] = block
        if head.get("events"):
            self.add_events(head["events"])
        self.n_results += 1

    def add_events(self, events: list[dict]) -> None:
        """Append events (dicts with the fields of EVENT_DTYPE) to the ``events`` table."""
        rows = events_table(events)
        n = len(self.events)
        self.events.resize(n + len(rows), axis=0)
        self.events[n:] = rows

    def flush(self, force: bool = False) -> bool:
        """Flush to disk if ``flush_interval_s`` has passed (or ``force``); True if it did."""
        now = time.monotonic()
        if force or now - self._last_flush >= self.flush_interval_s:
            n = self.n_frames
            self.f.flush()
            self._last_flush = now
            self.n_flushed = n
            return True
        return False

    def close(self, final_attrs: dict[str, Any] | None = None) -> None:
        """Close the file; then reopen it briefly (not SWMR) to write the final attributes."""
        if self.n_frames > 1:
            interval = float(np.median(np.diff(self.timestamps[: self.n_frames])))
        else:
            interval = math.nan
        self.f.close()
        with h5py.File(self.path, "r+", libver="latest") as f:
            f.attrs["frame_interval_s"] = interval
            f.attrs["complete"] = 1
            for key, value in {**self.provenance, **(final_attrs or {})}.items():
                f.attrs[key] = value

    def abandon(self) -> None:
        """Close after a write error, without adding anything."""
        try:
            self.f.close()
        except Exception as exc:  # the file may be beyond repair from here; say so
            log.error("closing %s after a write error failed too: %s", self.path, exc)
            # releasing this writer's HDF5 objects now can crash libhdf5 (seen as a segfault
            # after ENOSPC): keep them referenced until the process leaves (record: os._exit)
            _UNCLOSABLE.append(self)


def events_table(events: list[dict]) -> np.ndarray:
    """Event dicts (missing fields: fill 0) as a structured EVENT_DTYPE array."""
    rows = np.zeros(len(events), EVENT_DTYPE)
    for i, event in enumerate(events):
        for name in EVENT_DTYPE.names or ():
            rows[name][i] = event.get(name, 0)
    return rows


def _csv_value(value, dtype: np.dtype) -> str:
    """Integers as such, float32 with the 7 digits it holds, float64 in full."""
    if dtype.kind != "f":
        return str(int(value))
    return f"{float(value):.7g}" if dtype.itemsize == 4 else repr(float(value))


def write_events_csv(path: str | Path, rows: np.ndarray) -> None:
    """An events table (EVENT_DTYPE rows) as CSV with a header line."""
    names = rows.dtype.names or ()
    with open(path, "w") as out:
        out.write(",".join(names) + "\n")
        for row in rows:
            out.write(",".join(_csv_value(row[n], rows.dtype[n]) for n in names) + "\n")


@dataclass
class Session:
    """A session file opened for reading (simulated or recorded), frames read lazily."""

    path: Path
    file: h5py.File
    frames: h5py.Dataset
    timestamps_s: np.ndarray | None
    sequence: np.ndarray | None
    pixel_size_pm: float
    dose_e_per_px: float
    frame_dose_e_per_px: np.ndarray | None
    frame_interval_s: float
    session_id: str
    source: str

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    def dose(self, i: int) -> float:
        """Dose of frame ``i`` in electrons per pixel (NaN: unknown)."""
        if self.frame_dose_e_per_px is not None and math.isfinite(self.frame_dose_e_per_px[i]):
            return float(self.frame_dose_e_per_px[i])
        return self.dose_e_per_px

    def iter_frames(self, block: int = 16) -> Iterator[tuple[int, np.ndarray]]:
        """(index, frame) for every frame, read ``block`` frames at a time."""
        for start in range(0, len(self), block):
            chunk = self.frames[start : start + block]
            for k, frame in enumerate(chunk):
                yield start + k, frame

    def close(self) -> None:
        self.file.close()


def _attr(f: h5py.File, name: str, default: Any) -> Any:
    value = f.attrs.get(name, default)
    return value.decode() if isinstance(value, bytes) else value


def open_for_reading(path: str | Path) -> h5py.File:
    """A session file opened read-only: SWMR where it is being written (or was, by a killed
    recorder), else plainly; the Bitshuffle/LZ4 filter of compressed sessions registered."""
    import hdf5plugin  # noqa: F401  (registers the Bitshuffle filter for compressed sessions)

    if not Path(path).is_file():
        raise FileNotFoundError(errno.ENOENT, "no such session file", str(path))
    try:
        return h5py.File(path, "r", swmr=True)
    except OSError:
        try:
            return h5py.File(path, "r")
        except OSError as exc:
            raise ValueError(
                f"{path} is not an HDF5 session file ({exc}); give a file "
                f"written by segdepth record or simulate --session"
            ) from None


def open_session(path: str | Path) -> Session:
    """Open a session file for reading (also one left by a killed recorder)."""
    path = Path(path)
    f = open_for_reading(path)
    if "frames" not in f or f["frames"].ndim != 3:
        f.close()
        raise ValueError(f"{path} is not a session file: no (T, H, W) 'frames' dataset")
    n = f["frames"].shape[0]

    def series(name: str) -> np.ndarray | None:
        return f[name][:n] if name in f and f[name].shape[:1] == (n,) else None

    timestamps = series("timestamps_s")
    interval = float(_attr(f, "frame_interval_s", math.nan))
    if not math.isfinite(interval) and timestamps is not None and n > 1:
        interval = float(np.median(np.diff(timestamps)))
    return Session(
        path=path,
        file=f,
        frames=f["frames"],
        timestamps_s=timestamps,
        sequence=series("sequence"),
        pixel_size_pm=float(_attr(f, "pixel_size_pm", math.nan)),
        dose_e_per_px=float(_attr(f, "dose_e_per_px", math.nan)),
        frame_dose_e_per_px=series("frame_dose_e_per_px"),
        frame_interval_s=interval,
        session_id=str(_attr(f, "session_id", path.stem)),
        source=str(_attr(f, "source", "file")),
    )


def needs_recovery(path: str | Path) -> bool:
    """True for an existing session file its writer never closed (killed, crashed)."""
    try:
        with h5py.File(path, "r") as f:
            return int(f.attrs.get("complete", 1)) == 0 and "sequence" in f
    except OSError:  # still flagged as open for writing (SWMR), or damaged
        return True


def _valid_rows(f: h5py.File) -> int:
    """Rows from the start that have a sequence number and a timestamp."""
    n = f["frames"].shape[0]
    if "sequence" not in f or "timestamps_s" not in f:
        return n
    seq = f["sequence"][:n]
    t = f["timestamps_s"][:n]
    bad = np.flatnonzero((seq < 0) | ~np.isfinite(t))  # written before seq (add_frame)
    return int(bad[0]) if bad.size else n


def _along_time(name: str, dset: h5py.Dataset) -> bool:
    """Whether axis 0 of a session-file dataset is time (docs/SESSION_FILE.md)."""
    if name.startswith("columns/"):
        return dset.ndim >= 2  # (T, n_columns[, 11]); id, species, first_row run along columns
    return dset.ndim >= 1 and name not in ("events",) and not name.startswith("analysis/")


def recover(path: str | Path) -> dict[str, Any]:
    """Rewrite a session file left by a killed recorder so plain h5py opens it.

    Keeps the rows (frames and their results) that have a sequence number and a timestamp,
    drops the rest, marks the file ``recovered`` (``complete`` stays 0). Works on a copy that
    replaces the file at the end (needs as much free space as the file). Returns
    ``{"path", "rows", "dropped_rows", "session_id", "last_seq"}``. Raises ValueError for a
    file that is not a session file or cannot be read at all.
    """
    import hdf5plugin  # noqa: F401  (compressed recordings)

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        src = h5py.File(path, "r", swmr=True)
    except OSError:
        try:
            src = h5py.File(path, "r")
        except OSError as exc:
            raise ValueError(f"{path} cannot be read as HDF5 ({exc}); nothing to recover") from exc
    tmp = path.with_name(path.name + ".recover-tmp")
    try:
        if "frames" not in src or src["frames"].ndim != 3:
            raise ValueError(f"{path} is not a session file: no (T, H, W) 'frames' dataset")
        total = src["frames"].shape[0]
        n = _valid_rows(src)
        with h5py.File(tmp, "w", libver="latest") as dst:
            for key, value in src.attrs.items():
                dst.attrs[key] = value
            for name in src:
                src.copy(src[name], dst, name=name)

            def trim(name: str, obj: Any) -> None:
                if (
                    isinstance(obj, h5py.Dataset)
                    and _along_time(name, obj)
                    and obj.shape[0] == total
                ):
                    obj.resize(n, axis=0)

            dst.visititems(trim)
            seq = dst["sequence"][:n] if "sequence" in dst else np.arange(n)
            if n > 1 and "timestamps_s" in dst:
                dst.attrs["frame_interval_s"] = float(np.median(np.diff(dst["timestamps_s"][:n])))
            dst.attrs["complete"] = 0
            dst.attrs["recovered"] = 1
            dst.attrs["recovered_dropped_rows"] = total - n
            session_id = str(_attr(dst, "session_id", ""))
            last_seq = int(seq[-1]) if n else -1
    except BaseException:
        src.close()
        tmp.unlink(missing_ok=True)
        raise
    src.close()
    os.replace(tmp, path)
    return {
        "path": str(path),
        "rows": n,
        "dropped_rows": total - n,
        "session_id": session_id,
        "last_seq": last_seq,
    }


def config_json(obj: Any) -> str:
    """A dataclass config as JSON (saved in the file it produced)."""
    from dataclasses import asdict

    return json.dumps(asdict(obj), default=str, sort_keys=True)
