"""Atomic columns of a session: detection on a running reference, drift tracking, occupancy.

The reference is the mean of the first ``reference_frames`` species-probability maps, each
shifted back by its drift so that all are in frame-0 pixels. Ce and O columns are the peaks of
P(Ce) and P(O) on that mean; columns are re-detected while the reference grows, and a detection
within ``match_A`` of a known column of the same species keeps its id (ids are never reused).
After that the reference is frozen, so a column that empties later keeps its id and its depth
falls to 0. Every frame is registered against the reference (:mod:`engine.drift`) on the
species-resolved maps P(Ce) and P(O), never on a species-blind column map: in CeO2 [110] a
shift by the projected Ce-O distance a/4 = 1.353 Å lines up two thirds of the columns of such a
map. The search window around the previous drift is checked against the lattice: it must stay
below half the shortest lattice translation in the image plane (3.31 Å). A column's position in
the frame is its reference position plus the drift, and its occupancy is the depth-probability
vector averaged over a disk there.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numba import njit
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.feature import peak_local_max

from engine.drift import DriftEstimator
from streamer.domain import SPECIES_CE, SPECIES_O, px_per_angstrom

#: CeO2 [110] projected distances, Å: Ce-O (a/4 along [001]), O-O (along [1-10]), and the
#: shortest lattice translation in the image plane (a/2 [101] projected).
CE_O_A, O_O_A, SHORTEST_TRANSLATION_A = 1.353, 1.913, 3.31


@dataclass(frozen=True)
class ColumnConfig:
    """Column detection and tracking settings; distances in Å, probabilities in [0, 1].

    ``reference_frames``: frames averaged (after alignment) into the column reference.
    ``min_peak_probability``: a species-probability peak below this is not a column.
    ``min_separation_A``: closest two columns of one species may be (CeO2 [110]: O-O
    1.91 Å, Ce-Ce 3.31 Å).
    ``disk_radius_A``: radius over which a column's depth probabilities are averaged (Ce-O
    projected distance is 1.353 Å, so keep it below ~0.6 Å).
    ``match_A``: a re-detected column this close to a known one keeps its id.
    ``drift_search_A``: largest drift step between consecutive frames searched for; it must
    stay below half the shortest lattice translation (3.31 Å / 2), or a whole-lattice shift
    could win.
    """

    reference_frames: int = 8
    min_peak_probability: float = 0.5
    min_separation_A: float = 0.9
    disk_radius_A: float = 0.45
    match_A: float = 0.5
    drift_search_A: float = 1.6

    def __post_init__(self) -> None:
        if not 0 < self.drift_search_A < SHORTEST_TRANSLATION_A / 2:
            raise ValueError(
                f"drift_search_A must be in (0, {SHORTEST_TRANSLATION_A / 2}) Å "
                f"(half the shortest lattice translation), got "
                f"{self.drift_search_A}"
            )


@dataclass
class FrameColumns:
    """Columns seen in one frame: ids, positions in this frame's pixels, species (1 Ce, 2 O),
    depth-probability vectors (n, 11) and the frame's drift (dy, dx) px against the reference."""

    ids: np.ndarray
    x_px: np.ndarray
    y_px: np.ndarray
    species: np.ndarray
    probabilities: np.ndarray
    drift_px: tuple[float, float]

    @property
    def depth(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1).astype(np.int64)

    @property
    def expected_depth(self) -> np.ndarray:
        return self.probabilities @ np.arange(self.probabilities.shape[1], dtype=np.float32)

    @property
    def confidence(self) -> np.ndarray:
        return self.probabilities.max(axis=1)


def disk_offsets(radius_px: float) -> np.ndarray:
    """Integer (dy, dx) offsets (k, 2) of the pixels within ``radius_px`` of a centre pixel."""
    r = max(int(np.floor(radius_px)), 0)
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    inside = dy**2 + dx**2 <= max(radius_px, 0.5) ** 2
    return np.stack([dy[inside], dx[inside]], axis=1)


@functools.lru_cache(maxsize=16)
def disk_rows(radius_px: float) -> np.ndarray:
    """The pixels of :func:`disk_offsets` as runs along rows (m, 3) int64: dy, first dx, last
    dx (a disk's pixels in a row are contiguous). Built once per radius (about 0.1 ms, on every
    frame otherwise): the array is shared, to be read only."""
    offsets = disk_offsets(radius_px)
    rows = []
    for dy in np.unique(offsets[:, 0]):
        dx = offsets[offsets[:, 0] == dy, 1]
        rows.append((dy, dx.min(), dx.max()))
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


@njit(
    "void(float32[:, :, ::1], int64[::1], int64[::1], int64[:, ::1], float64[:, ::1])",
    nogil=True,
    cache=True,
)
def _disk_sums(maps, cy, cx, rows, out):  # pragma: no cover -- compiled; via disk_average
    """Per centre (cy, cx) the sum of each channel of ``maps`` over the disk's runs ``rows``
    inside the frame (out[:, :C]), and how many pixels that was (out[:, C])."""
    c, h, w = maps.shape
    for i in range(cy.shape[0]):
        out[i, :] = 0.0
        for r in range(rows.shape[0]):
            y = cy[i] + rows[r, 0]
            x0, x1 = max(cx[i] + rows[r, 1], 0), min(cx[i] + rows[r, 2], w - 1)
            if y < 0 or y >= h or x1 < x0:
                continue
            out[i, c] += x1 - x0 + 1
            for k in range(c):
                line = maps[k, y]
                acc = 0.0
                for x in range(x0, x1 + 1):
                    acc += line[x]
                out[i, k] += acc


def disk_average(
    maps: np.ndarray, y_px: np.ndarray, x_px: np.ndarray, radius_px: float
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``maps`` (C, H, W) over a disk at each position: ((n, C) float32, in-frame mask
    (n,)).

    Pixels of a disk outside the frame are left out; a disk wholly outside gives a False mask.
    One compiled pass over the disks' row runs (numba, no GIL held): for 141 columns of
    11 × 512² maps fresh from inference 1.6–1.8 ms per frame on the 2-core Xeon
    (``scripts/profile_post.py``, batch 1), against 2.0–2.8 for numpy's gather (``np.take`` of
    every disk pixel, then a weighted sum) that it replaced.
    """
    maps = np.ascontiguousarray(maps, dtype=np.float32)
    cy, cx = (np.ascontiguousarray(np.rint(v), dtype=np.int64).reshape(-1) for v in (y_px, x_px))
    sums = np.empty((len(cy), maps.shape[0] + 1))
    _disk_sums(maps, cy, cx, disk_rows(radius_px), sums)
    count = sums[:, -1]
    return (sums[:, :-1] / np.maximum(count, 1)[:, None]).astype(np.float32), count > 0


def _axis_lerp(maps: np.ndarray, axis: int, shift: float) -> np.ndarray:
    """``maps`` read at coordinate i + ``shift`` along ``axis`` (linear interpolation, edge
    values beyond the ends)."""
    n = maps.shape[axis]
    coord = np.arange(n) + shift
    lo = np.floor(coord)
    frac = (coord - lo).astype(maps.dtype)
    lo = lo.astype(np.int64)
    below = np.take(maps, np.clip(lo, 0, n - 1), axis=axis)
    above = np.take(maps, np.clip(lo + 1, 0, n - 1), axis=axis)
    view = [1] * maps.ndim
    view[axis] = n
    return below + frac.reshape(view) * (above - below)


def shift_back(maps: np.ndarray, dy: float, dx: float) -> np.ndarray:
    """Maps (C, H, W) whose content moved by (dy, dx) px, moved back: out[y, x] = maps[y + dy,
    x + dx], bilinear, edge values beyond the frame. Equals ``ndimage.shift(maps, (0, -dy,
    -dx), order=1, mode="nearest")`` to float32 rounding, about 8 times faster (3 × 512²:
    7 against 59 ms; separable: two gathers and two blends instead of a spline per pixel)."""
    return _axis_lerp(_axis_lerp(maps, 1, dy), 2, dx)


def find_columns(
    species_prob: np.ndarray, pixel_size_pm: float, config: ColumnConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Column positions (y_px, x_px) and species in a species-probability map (3, H, W).

    P(Ce) and P(O) are smoothed (Gaussian, sigma = half the disk radius) so that a column's
    flat-topped disk of high probability has one maximum; maxima at least
    ``min_separation_A`` apart where the unsmoothed probability reaches
    ``min_peak_probability`` are columns, refined to the probability-weighted centroid over the
    column disk.
    """
    px_per_A = px_per_angstrom(pixel_size_pm)
    min_distance = max(1, int(config.min_separation_A * px_per_A))
    radius = config.disk_radius_A * px_per_A
    offsets = disk_offsets(radius)
    ys, xs, species = [], [], []
    for sp in (SPECIES_CE, SPECIES_O):
        prob = species_prob[sp]
        smooth = ndimage.gaussian_filter(prob, sigma=max(radius / 2, 0.5))
        peaks = peak_local_max(
            smooth,
            min_distance=min_distance,
            exclude_border=False,
            threshold_abs=config.min_peak_probability / 2,
        )
        peaks = peaks[prob[peaks[:, 0], peaks[:, 1]] >= config.min_peak_probability]
        if len(peaks) == 0:
            continue
        h, w = prob.shape
        cy = np.clip(peaks[:, :1] + offsets[None, :, 0], 0, h - 1)
        cx = np.clip(peaks[:, 1:] + offsets[None, :, 1], 0, w - 1)
        weight = prob[cy, cx]
        total = np.maximum(weight.sum(axis=1), 1e-12)
        ys.append((weight * cy).sum(axis=1) / total)
        xs.append((weight * cx).sum(axis=1) / total)
        species.append(np.full(len(peaks), sp, dtype=np.int64))
    if not ys:
        return np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64)
    return np.concatenate(ys), np.concatenate(xs), np.concatenate(species)


class FrameMaps:
    """One frame's probability maps as the tracker reads them: species (3, H, W) and depth
    (11, H, W), here numpy float32 arrays on the host. :class:`engine.device_maps.TorchFrameMaps`
    reads the same from tensors on the inference device and copies back only what it must."""

    def __init__(self, species_prob: np.ndarray, depth_prob: np.ndarray):
        self._species = np.asarray(species_prob, dtype=np.float32)
        self._depth = np.asarray(depth_prob, dtype=np.float32)

    @property
    def species_shape(self) -> tuple[int, ...]:
        return tuple(self._species.shape)

    def species_host(self) -> np.ndarray:
        """Species probabilities (3, H, W) float32 on the host (the column reference's input)."""
        return self._species

    def registration_maps(self):
        """P(Ce), P(O) (2, H, W), where :meth:`drift_estimator`'s estimators read them."""
        return self._species[1:]

    def drift_estimator(self, reference: np.ndarray) -> DriftEstimator:
        """A registration against ``reference`` (2, H, W) for maps like these (torch's FFTs on
        the CPU)."""
        return DriftEstimator(reference)

    def disk_average(
        self, y_px: np.ndarray, x_px: np.ndarray, radius_px: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Depth probabilities averaged over a disk at each position (:func:`disk_average`)."""
        return disk_average(self._depth, y_px, x_px, radius_px)

    @staticmethod
    def disk_averages(
        frames: Sequence[FrameMaps],
        y_px: Sequence[np.ndarray],
        x_px: Sequence[np.ndarray],
        radius_px: float,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`disk_average` of each of ``frames`` at its own positions (here frame by
        frame; :class:`engine.device_maps.TorchFrameMaps` reads them back together)."""
        return [f.disk_average(y, x, radius_px) for f, y, x in zip(frames, y_px, x_px)]


@dataclass
class _Reference:
    sum: np.ndarray  # (3, H, W) sum of aligned species-probability maps, frame-0 pixels
    count: int
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    y_px: np.ndarray = field(default_factory=lambda: np.zeros(0))
    x_px: np.ndarray = field(default_factory=lambda: np.zeros(0))
    species: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def species_maps(self) -> np.ndarray:
        """Mean P(Ce), P(O) (2, H, W): what frames are registered on."""
        return self.sum[1:] / self.count


class ColumnTracker:
    """Follows the atomic columns of one session frame by frame (see the module docstring)."""

    def __init__(self, pixel_size_pm: float, config: ColumnConfig | None = None, first_id: int = 0):
        """``first_id``: the first column id handed out (then +1 per new column)."""
        self.config = config or ColumnConfig()
        self.pixel_size_pm = float(pixel_size_pm)
        self._px_per_A = px_per_angstrom(self.pixel_size_pm)
        self._ref: _Reference | None = None
        self._registration: DriftEstimator | None = None  # against the current reference
        self._drift = (0.0, 0.0)
        self._next_id = int(first_id)

    @property
    def reference_complete(self) -> bool:
        return self._ref is not None and self._ref.count >= self.config.reference_frames

    def update(self, species_prob: np.ndarray, depth_prob: np.ndarray) -> FrameColumns:
        """One frame's maps: species (3, H, W) and depth (11, H, W) probabilities."""
        return self.update_maps(FrameMaps(species_prob, depth_prob))

    def update_maps(self, maps: FrameMaps) -> FrameColumns:
        """One frame's maps, on the host or on the inference device (:class:`FrameMaps`)."""
        if self._ref is None:
            self._ref = _Reference(sum=maps.species_host().astype(np.float64), count=0)
            self._drift = (0.0, 0.0)
        else:
            self._check_shape(maps)
            assert self._registration is not None  # made with the first reference
            self._drift = self._registration.estimate(
                maps.registration_maps(), prior=self._drift, search_px=self._search_px
            )
        if not self.reference_complete:
            self._grow_reference(maps)
        ref = self._ref
        dy, dx = self._drift
        y, x = ref.y_px + dy, ref.x_px + dx
        return self._columns(y, x, maps.disk_average(y, x, self._radius_px), self._drift)

    def update_series(self, frames: Sequence[FrameMaps]) -> list[FrameColumns]:
        """Consecutive frames of the session: :meth:`update_maps` of each in turn, with the
        same answers, but once the reference is complete the frames' drifts are estimated
        together (:meth:`engine.drift.DriftEstimator.estimate_series`) and their columns'
        averages read together (:meth:`FrameMaps.disk_averages`): on the inference device two
        copies to the host for the lot instead of two per frame."""
        out, k = [], 0
        while k < len(frames) and not self.reference_complete:
            out.append(self.update_maps(frames[k]))
            k += 1
        rest = frames[k:]
        if not rest:
            return out
        for maps in rest:
            self._check_shape(maps)
        assert self._ref is not None and self._registration is not None  # reference complete
        drifts = self._registration.estimate_series(
            [maps.registration_maps() for maps in rest],
            prior=self._drift,
            search_px=self._search_px,
        )
        self._drift = drifts[-1]
        ys = [self._ref.y_px + dy for dy, _ in drifts]
        xs = [self._ref.x_px + dx for _, dx in drifts]
        averages = type(rest[0]).disk_averages(rest, ys, xs, self._radius_px)
        return out + [self._columns(*c) for c in zip(ys, xs, averages, drifts)]

    @property
    def _search_px(self) -> float:
        return self.config.drift_search_A * self._px_per_A

    @property
    def _radius_px(self) -> float:
        return self.config.disk_radius_A * self._px_per_A

    def _check_shape(self, maps: FrameMaps) -> None:
        assert self._ref is not None
        if self._ref.sum.shape != maps.species_shape:
            raise ValueError(
                f"frame shape {maps.species_shape[1:]} differs from the "
                f"session's {self._ref.sum.shape[1:]}"
            )

    def _columns(
        self,
        y: np.ndarray,
        x: np.ndarray,
        average: tuple[np.ndarray, np.ndarray],
        drift: tuple[float, float],
    ) -> FrameColumns:
        """The frame's columns from the reference's at (y, x) and their disk averages."""
        assert self._ref is not None
        probs, inside = average
        probs = probs / np.maximum(probs.sum(axis=1, keepdims=True), 1e-12)
        return FrameColumns(
            ids=self._ref.ids[inside],
            x_px=x[inside],
            y_px=y[inside],
            species=self._ref.species[inside],
            probabilities=probs[inside],
            drift_px=(float(drift[0]), float(drift[1])),
        )

    def _grow_reference(self, maps: FrameMaps) -> None:
        ref = self._ref
        assert ref is not None  # update() made it
        if ref.count == 0:
            ref.count = 1
        else:
            dy, dx = self._drift
            aligned = shift_back(maps.species_host(), dy, dx)
            ref.sum += aligned
            ref.count += 1
        self._registration = maps.drift_estimator(ref.species_maps)
        y, x, species = find_columns(
            (ref.sum / ref.count).astype(np.float32), self.pixel_size_pm, self.config
        )
        ref.ids = self._match_ids(y, x, species)
        ref.y_px, ref.x_px, ref.species = y, x, species

    def _match_ids(self, y: np.ndarray, x: np.ndarray, species: np.ndarray) -> np.ndarray:
        ref = self._ref
        assert ref is not None  # update() made it
        ids = np.full(len(y), -1, dtype=np.int64)
        taken: set[int] = set()
        for sp in (SPECIES_CE, SPECIES_O):
            old = np.flatnonzero(ref.species == sp)
            new = np.flatnonzero(species == sp)
            if len(old) == 0 or len(new) == 0:
                continue
            tree = cKDTree(np.stack([ref.y_px[old], ref.x_px[old]], axis=1))
            dist, idx = tree.query(np.stack([y[new], x[new]], axis=1))
            for n, d, i in sorted(zip(new, dist, idx), key=lambda t: t[1]):
                old_id = int(ref.ids[old[i]])
                if d <= self.config.match_A * self._px_per_A and old_id not in taken:
                    ids[n] = old_id
                    taken.add(old_id)
        for n in np.flatnonzero(ids < 0):
            ids[n] = self._next_id
            self._next_id += 1
        return ids
