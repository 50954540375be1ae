"""Depth and species label maps (paper III-B4) on the output pixel grid of :mod:`hrtem`.

Each column with at least one atom owns a disk of ``COLUMN_RADIUS_A`` around its projected
centre; a pixel inside one or more disks takes the depth (atom count) and species of the nearest
column, every other pixel is background (0). The radius is below half the projected Ce–O
distance (a/4 = 1.35 Å), so the disks of neighbouring columns do not touch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from sim_source.hrtem import BINNING, Grid
from sim_source.structure import CELL_Y, ColumnTable

COLUMN_RADIUS_A = 0.6


@dataclass
class Labels:
    """``depth`` (H, W) uint8 atoms; ``species`` (H, W) uint8 (0 bg, 1 Ce, 2 O); column
    table of the columns whose centre lies in the image: ``x_px`` (column index), ``y_px``
    (row index), ``species``, ``depth``, ``index`` (row of the source ColumnTable)."""

    depth: np.ndarray
    species: np.ndarray
    x_px: np.ndarray
    y_px: np.ndarray
    column_species: np.ndarray
    column_depth: np.ndarray
    index: np.ndarray


def label_maps(table: ColumnTable, grid: Grid, radius_A: float = COLUMN_RADIUS_A) -> Labels:
    """Label maps and in-image column table of ``table`` on ``grid``'s output pixels."""
    n = grid.size
    present = np.flatnonzero(table.n_atoms > 0)
    length_y = grid.n_cells_y * CELL_Y
    # periodic images along y, so columns across the cell's wrap are found too
    xs = np.concatenate([table.x_A[present]] * 3)
    ys = np.concatenate([table.y_A[present] + k * length_y for k in (-1, 0, 1)])
    owner = np.concatenate([present] * 3)
    p = grid.sampling_A * BINNING
    rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    px = np.stack(
        [(rows.ravel() + 0.25) * p, (cols.ravel() + 0.25) * p + grid.crop_y0 * grid.sampling_A],
        axis=1,
    )
    depth = np.zeros(n * n, np.uint8)
    species = np.zeros(n * n, np.uint8)
    if len(present):
        dist, nearest = cKDTree(np.stack([xs, ys], axis=1)).query(px, distance_upper_bound=radius_A)
        hit = np.isfinite(dist)
        src = owner[nearest[hit]]
        depth[hit] = table.n_atoms[src]
        species[hit] = table.species[src]
    r, c = grid.to_output_px(table.x_A[present], table.y_A[present])
    inside = (r > -0.5) & (r < n - 0.5) & (c > -0.5) & (c < n - 0.5)
    idx = present[inside]
    return Labels(
        depth.reshape(n, n),
        species.reshape(n, n),
        c[inside].astype(np.float32),
        r[inside].astype(np.float32),
        table.species[idx].astype(np.uint8),
        table.n_atoms[idx].astype(np.uint8),
        idx,
    )
