"""Training targets of section III-C: spatially smoothed depth labels (Fig. 4) and spatial loss
weights (Fig. 5).

Smoothed labels keep each column's depth on its label disk and add concentric rings outside it
whose depth steps down to 0 over ``ring_width_pm``: a pixel at distance t (px) from the nearest
column pixel of depth d gets ceil(d·(1 − t/w)), w the ring width in px. Weights are 1 at a column
centre and fall off as a Gaussian of the distance to the nearest centre (σ = ``weight_sigma_pm``)
to the floor ``background_weight``.

The rings lie outside the label disks, where the paper's metrics count any depth > 0 as a
hallucinated atom; with the simulator's clean disk labels (no irregular projection patterns to
regularise) they cost more than they give, so they are off by default (``ring_width_pm = 0``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from streamer.domain import N_DEPTHS


@dataclass
class TargetConfig:
    """How labels are smoothed and pixels weighted (lengths in pm, scaled by the pixel size)."""

    ring_width_pm: float = 0.0  # 0: off (see module docstring)
    weight_sigma_pm: float = 60.0
    background_weight: float = 0.2


def smooth_labels(depth: np.ndarray, pixel_size_pm: float, ring_width_pm: float) -> np.ndarray:
    """(H,W) uint8 depth map → smoothed labels (H,W) uint8 with rings around each column."""
    width_px = ring_width_pm / pixel_size_pm
    column = depth > 0
    if not column.any() or width_px <= 1:
        return depth.astype(np.uint8, copy=True)
    dist, (ri, ci) = ndimage.distance_transform_edt(~column, return_indices=True)
    nearest_depth = depth[ri, ci].astype(np.float64)
    ring = np.ceil(nearest_depth * (1.0 - dist / width_px))
    return np.where(column, depth, np.clip(ring, 0, None)).astype(np.uint8)


def loss_weights(
    shape: tuple[int, int],
    centres_rc: np.ndarray,
    pixel_size_pm: float,
    sigma_pm: float,
    background_weight: float,
) -> np.ndarray:
    """(H,W) float32 weights: 1 at the (row, col) centres, Gaussian decay to the floor."""
    h, w = shape
    if len(centres_rc) == 0:
        return np.full(shape, background_weight, np.float32)
    rows, cols = np.mgrid[0:h, 0:w]
    dist, _ = cKDTree(np.asarray(centres_rc, np.float64)).query(
        np.stack([rows.ravel(), cols.ravel()], axis=1)
    )
    sigma_px = sigma_pm / pixel_size_pm
    bump = np.exp(-0.5 * (dist / sigma_px) ** 2).reshape(shape)
    return (background_weight + (1.0 - background_weight) * bump).astype(np.float32)


def column_centres(depth: np.ndarray) -> np.ndarray:
    """(n,2) float (row, col) centroids of the connected column regions of a depth map."""
    labelled, n = ndimage.label(depth > 0)
    if n == 0:
        return np.zeros((0, 2))
    return np.array(ndimage.center_of_mass(depth > 0, labelled, range(1, n + 1)))


def make_targets(
    depth: np.ndarray, centres_rc: np.ndarray | None, pixel_size_pm: float, cfg: TargetConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(smoothed labels uint8, weights float32) for one image; centres from the depth map
    when no column table is given."""
    if centres_rc is None:
        centres_rc = column_centres(depth)
    return (
        smooth_labels(depth, pixel_size_pm, cfg.ring_width_pm),
        loss_weights(
            depth.shape, centres_rc, pixel_size_pm, cfg.weight_sigma_pm, cfg.background_weight
        ),
    )


def weighted_class_counts(
    labels: np.ndarray, weights: np.ndarray, n_classes: int = N_DEPTHS
) -> np.ndarray:
    """(n_classes,) sum of the loss weights of the pixels of each label."""
    return np.bincount(
        np.asarray(labels, np.int64).ravel(),
        weights=np.asarray(weights, np.float64).ravel(),
        minlength=n_classes,
    )[:n_classes]


def prior_from_counts(counts: np.ndarray, floor: float = 0.002) -> np.ndarray:
    """Normalised class frequencies plus ``floor`` (relative) so that no class has prior 0;
    sums to 1."""
    prior = np.asarray(counts, np.float64) / np.sum(counts) + floor
    return prior / prior.sum()


def class_prior(
    labels: np.ndarray, weights: np.ndarray, n_classes: int = N_DEPTHS, floor: float = 0.002
) -> np.ndarray:
    """The depth-class prior a network trained with the weighted loss of eq. 6 learns: the
    loss-weighted frequency of each label over the given training-like pixels, plus ``floor``
    (relative) so that no class has prior 0. Sums to 1."""
    return prior_from_counts(weighted_class_counts(labels, weights, n_classes), floor)
