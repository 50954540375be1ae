"""The four metrics of paper section IV-A, the confusion matrix (Fig. 6) and calibration (Fig. 7).

All metrics are pooled over pixels of every image (counts are summed, then divided):
- pixelwise accuracy: estimated depth == true depth, over all pixels;
- centre accuracy: the same over the truth column pixels (true depth > 0) within 16 px of a Ce
  and 12 px of an O column centre at 5.3 pm/px (radii scaled by 5.3 / pixel_size_pm for other
  pixel sizes). The paper's disks are larger than our 0.6 Å label disks, so about 30 % of the
  pixels inside them are background; scoring them would reward predicting background there;

- real-atom detection rate: fraction of column pixels (true depth > 0) estimated > 0;
- hallucinated-atom rate: fraction of pixels estimated > 0 whose true depth is 0.

Column-level metrics (:class:`ColumnMetrics`) judge what a microscopist reads: per true column,
the majority estimated depth over the pixels within ``COLUMN_VOTE_RADIUS_PX`` (5 px at 5.3 pm)
of its centre: exact count, within ±1 atom, found (majority > 0); and false columns: connected
regions estimated > 0 whose centroid lies farther than ``FALSE_COLUMN_DISTANCE_A`` from every
true column.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from streamer.domain import N_DEPTHS

REFERENCE_PIXEL_PM = 5.3  #: pixel size at which the paper states its centre radii
CENTRE_RADIUS_PX = {1: 16.0, 2: 12.0}  #: Ce, O centre radii in px at REFERENCE_PIXEL_PM
COLUMN_VOTE_RADIUS_PX = 5.0  #: vote disk of the column-level metrics, px at REFERENCE_PIXEL_PM
FALSE_COLUMN_DISTANCE_A = 0.6  #: an estimated region farther than this from every column is false


def centre_mask(
    shape: tuple[int, int], centres_rc: np.ndarray, species: np.ndarray, pixel_size_pm: float
) -> np.ndarray:
    """(H,W) bool: pixels within the species' centre radius of any column centre (row, col)."""
    mask = np.zeros(shape, bool)
    rows, cols = np.ogrid[0 : shape[0], 0 : shape[1]]
    for (r, c), s in zip(np.asarray(centres_rc).reshape(-1, 2), species):
        radius = CENTRE_RADIUS_PX.get(int(s))
        if radius is None:
            continue
        radius *= REFERENCE_PIXEL_PM / pixel_size_pm
        mask |= (rows - r) ** 2 + (cols - c) ** 2 <= radius**2
    return mask


@dataclass
class DepthMetrics:
    """Pooled counts; ``update`` per image, ``summary`` for the four numbers."""

    n_classes: int = N_DEPTHS
    confusion: np.ndarray = field(init=False)  # [true, estimated] pixel counts
    centre_correct: int = 0
    centre_total: int = 0

    def __post_init__(self) -> None:
        self.confusion = np.zeros((self.n_classes, self.n_classes), np.int64)

    def update(
        self, estimated: np.ndarray, truth: np.ndarray, centre: np.ndarray | None = None
    ) -> None:
        """Add one image (or batch): ``estimated``/``truth`` integer depth maps of equal shape;
        ``centre`` the bool centre mask of :func:`centre_mask` (same shape) or None."""
        est = np.asarray(estimated, np.int64).ravel()
        tru = np.asarray(truth, np.int64).ravel()
        if est.shape != tru.shape:
            raise ValueError(f"estimate {np.shape(estimated)} and truth {np.shape(truth)} differ")
        k = self.n_classes
        self.confusion += np.bincount(tru * k + np.clip(est, 0, k - 1), minlength=k * k).reshape(
            k, k
        )
        if centre is not None:  # scored on truth column pixels only (module docstring)
            m = np.asarray(centre, bool).ravel() & (tru > 0)
            self.centre_correct += int((est[m] == tru[m]).sum())
            self.centre_total += int(m.sum())

    def summary(self) -> dict[str, float]:
        c = self.confusion
        total = c.sum()
        column_truth = c[1:].sum()
        estimated_positive = c[:, 1:].sum()

        def ratio(a, b):
            return float(a / b) if b else float("nan")

        return {
            "pixelwise_accuracy": ratio(np.trace(c), total),
            "centre_accuracy": ratio(self.centre_correct, self.centre_total),
            "detection_rate": ratio(c[1:, 1:].sum(), column_truth),
            "hallucination_rate": ratio(c[0, 1:].sum(), estimated_positive),
            "pixels": int(total),
            "centre_pixels": int(self.centre_total),
        }


@dataclass
class Calibration:
    """Reliability diagram counts: confidence bins of width 1/n_bins (Fig. 7)."""

    n_bins: int = 20
    count: np.ndarray = field(init=False)  # pixels per confidence bin
    correct: np.ndarray = field(init=False)
    confidence_sum: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.count, self.correct, self.confidence_sum = (
            np.zeros(self.n_bins, np.float64) for _ in range(3)
        )

    def update(self, confidence: np.ndarray, correct: np.ndarray) -> None:
        conf = np.asarray(confidence, np.float64).ravel()
        bins = np.clip((conf * self.n_bins).astype(np.int64), 0, self.n_bins - 1)
        self.count += np.bincount(bins, minlength=self.n_bins)
        self.correct += np.bincount(
            bins, weights=np.asarray(correct, np.float64).ravel(), minlength=self.n_bins
        )
        self.confidence_sum += np.bincount(bins, weights=conf, minlength=self.n_bins)

    def ece(self) -> float:
        """Expected calibration error Σ_b (n_b/n)·|accuracy_b − confidence_b|."""
        n = self.count.sum()
        seen = self.count > 0
        gap = np.abs(self.correct[seen] - self.confidence_sum[seen])  # n_b·|acc_b − conf_b|
        return float(gap.sum() / n) if n else float("nan")

    def table(self) -> dict[str, list[float]]:
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                "bin_lower": list(np.arange(self.n_bins) / self.n_bins),
                "count": self.count.tolist(),
                "accuracy": (self.correct / self.count).tolist(),
                "confidence": (self.confidence_sum / self.count).tolist(),
            }


@dataclass
class ColumnMetrics:
    """Column-level counts pooled over images (module docstring)."""

    columns: int = 0
    exact: int = 0
    within_one: int = 0
    found: int = 0
    estimated_regions: int = 0
    false_regions: int = 0
    #: per scored column, in scoring order, the atom count read (its majority vote): two
    #: readings of the same frames can be compared column by column (:meth:`read_differently`)
    majorities: list[int] = field(default_factory=list)

    def update(
        self,
        estimated: np.ndarray,
        centres_rc: np.ndarray,
        depths: np.ndarray,
        pixel_size_pm: float,
    ) -> None:
        """One image: ``estimated`` (H,W) depth map, true column ``centres_rc`` (n,2) px and
        their atom counts ``depths`` (n,)."""
        from scipy import ndimage
        from scipy.spatial import cKDTree

        est = np.asarray(estimated, np.int64)
        centres = np.asarray(centres_rc, np.float64).reshape(-1, 2)
        radius = COLUMN_VOTE_RADIUS_PX * REFERENCE_PIXEL_PM / pixel_size_pm
        rows, cols = np.mgrid[0 : est.shape[0], 0 : est.shape[1]]
        for (r, c), d in zip(centres, np.asarray(depths, np.int64)):
            votes = est[(rows - r) ** 2 + (cols - c) ** 2 <= radius**2]
            if not votes.size:
                continue
            majority = int(np.bincount(votes).argmax())
            self.majorities.append(majority)
            self.columns += 1
            self.exact += majority == d
            self.within_one += abs(majority - d) <= 1
            self.found += majority > 0
        regions, n = ndimage.label(est > 0)
        if n:
            centroids = np.array(ndimage.center_of_mass(est > 0, regions, range(1, n + 1)))
            far = cKDTree(centres).query(centroids)[0] if len(centres) else np.full(n, np.inf)
            self.estimated_regions += n
            self.false_regions += int((far * pixel_size_pm / 100 > FALSE_COLUMN_DISTANCE_A).sum())

    def __add__(self, other: ColumnMetrics) -> ColumnMetrics:
        """Both sets of counts pooled (as if their images had been scored together)."""
        return ColumnMetrics(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )

    def read_differently(self, other: ColumnMetrics) -> int:
        """How many columns ``other``, scored on the same frames, read as another count."""
        if len(self.majorities) != len(other.majorities):
            raise ValueError(
                f"not the same columns: {len(self.majorities)} against {len(other.majorities)}"
            )
        return int(np.count_nonzero(np.array(self.majorities) != np.array(other.majorities)))

    def summary(self) -> dict[str, float]:
        def ratio(a, b):
            return float(a / b) if b else float("nan")

        return {
            "column_exact": ratio(self.exact, self.columns),
            "column_within_one": ratio(self.within_one, self.columns),
            "column_found": ratio(self.found, self.columns),
            "false_column_rate": ratio(self.false_regions, self.estimated_regions),
            "columns": self.columns,
        }
