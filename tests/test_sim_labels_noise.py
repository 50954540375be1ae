"""Depth/species label maps from the 3-D structure, and the Poisson noise model of eq. (1)."""

import numpy as np
import pytest
import torch

from sim_source.hrtem import make_grid
from sim_source.labels import COLUMN_RADIUS_A, label_maps
from sim_source.noise import add_poisson_noise, poisson_counts
from sim_source.structure import StructureConfig, build_columns


@pytest.fixture(scope="module")
def structure():
    grid = make_grid(256)
    table, params = build_columns(
        np.random.default_rng(9),
        grid.fov_A,
        grid.n_cells_y,
        grid.crystal_end_x_A,
        StructureConfig(vacancy_probability=0.3),
    )
    return grid, table, label_maps(table, grid)


def test_column_centres_carry_the_structures_atom_count(structure):
    grid, table, labels = structure
    assert len(labels.x_px) > 20
    r, c = np.round(labels.y_px).astype(int), np.round(labels.x_px).astype(int)
    ok = (r >= 0) & (r < 256) & (c >= 0) & (c < 256)
    # ground truth straight from the 3-D structure: atoms per (x, y) column of the ASE model
    atoms_per_column = table.cells.sum(axis=1)
    assert np.array_equal(labels.depth[r[ok], c[ok]], atoms_per_column[labels.index[ok]])
    assert np.array_equal(labels.species[r[ok], c[ok]], table.species[labels.index[ok]])
    assert len(np.unique(labels.column_depth)) > 3


def test_disks_have_the_stated_radius_and_background_is_zero(structure):
    grid, _, labels = structure
    p_A = grid.pixel_size_pm / 100
    area_px = np.pi * (COLUMN_RADIUS_A / p_A) ** 2
    inside = (labels.y_px > 15) & (labels.y_px < 240) & (labels.x_px > 15) & (labels.x_px < 240)
    assert (labels.depth > 0).sum() >= inside.sum() * area_px * 0.9
    # the pixel halfway between a Ce column and its O neighbour (0.68 Å > radius) is background
    xy = np.stack([labels.y_px, labels.x_px], axis=1)
    ce, o = xy[labels.column_species == 1], xy[labels.column_species == 2]
    dist = np.linalg.norm(ce[:, None] - o[None], axis=2) * p_A
    i, j = np.nonzero(np.abs(dist - 1.353) < 0.01)
    mid = np.round((ce[i] + o[j]) / 2).astype(int)
    ok = np.all((mid >= 0) & (mid < 256), axis=1)
    assert ok.sum() > 10 and np.all(labels.depth[mid[ok, 0], mid[ok, 1]] == 0)
    assert set(np.unique(labels.species)) <= {0, 1, 2}
    assert (labels.species > 0).sum() == (labels.depth > 0).sum()


def test_numpy_noise_has_poisson_mean_and_variance():
    clean = np.full((400, 400), 1.0, np.float32)
    clean[:, 200:] = 1.8
    dose = 2.5
    noisy = add_poisson_noise(clean, dose, np.random.default_rng(0))
    assert noisy.dtype == np.float32
    for value, part in ((1.0, noisy[:, :200]), (1.8, noisy[:, 200:])):
        assert part.mean() == pytest.approx(value, rel=0.02)  # vacuum mean 1 within noise
        assert part.var() == pytest.approx(value / dose, rel=0.04)  # Var = c / λ
    counts = poisson_counts(clean, dose, np.random.default_rng(0))
    assert np.allclose(counts / dose, noisy)
    assert np.array_equal(noisy, add_poisson_noise(clean, dose, np.random.default_rng(0)))
    assert not np.array_equal(noisy, add_poisson_noise(clean, dose, np.random.default_rng(1)))


def test_torch_noise_matches_the_model_and_is_seeded():
    clean = torch.full((2, 1, 300, 300), 1.4)
    gen = torch.Generator().manual_seed(5)
    noisy = add_poisson_noise(clean, 0.5, gen)
    assert noisy.shape == clean.shape and noisy.dtype == torch.float32
    assert noisy.mean().item() == pytest.approx(1.4, rel=0.02)
    assert noisy.var().item() == pytest.approx(1.4 / 0.5, rel=0.04)
    again = add_poisson_noise(clean, 0.5, torch.Generator().manual_seed(5))
    assert torch.equal(noisy, again)


def test_noise_rejects_bad_input():
    with pytest.raises(ValueError):
        add_poisson_noise(np.ones((4, 4)), 0.0, np.random.default_rng(0))
    with pytest.raises(TypeError):
        add_poisson_noise(np.ones((4, 4)), 1.0, torch.Generator())
    with pytest.raises(TypeError):
        add_poisson_noise([1.0, 2.0], 1.0, np.random.default_rng(0))
