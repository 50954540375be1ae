"""abTEM HRTEM images of CeO2 [110] surfaces at the paper's optics (C3 = -9 µm, C5 = 5 mm)."""

import numpy as np
import pytest

from sim_source.hrtem import Optics, configure_abtem, exit_wave, image, make_grid
from sim_source.labels import label_maps
from sim_source.structure import StructureConfig, build_columns

SIZE = 256


def _slab(thickness, seed=0):
    grid = make_grid(SIZE)
    cfg = StructureConfig(
        shapes=("flat",),
        thickness_atoms=(thickness, thickness),
        wedge_width_A=(0.0, 0.0),
        surface_fraction=(0.5, 0.5),
        vacancy_probability=0.0,
    )
    table, params = build_columns(
        np.random.default_rng(seed), grid.fov_A, grid.n_cells_y, grid.crystal_end_x_A, cfg
    )
    return grid, table, params


@pytest.fixture(scope="module")
def waves():
    configure_abtem()
    out = {}
    for t in (3, 8):
        grid, table, params = _slab(t)
        out[t] = (grid, table, params, exit_wave(table, grid))
    return out


def _column_means(img, labels):
    """Mean intensity in a 3 px disk at each in-image column centre, by species."""
    r = np.round(labels.y_px).astype(int)
    c = np.round(labels.x_px).astype(int)
    ok = (r > 3) & (r < SIZE - 4) & (c > 3) & (c < SIZE - 4)
    vals = np.array([img[i - 2 : i + 3, j - 2 : j + 3].mean() for i, j in zip(r, c)])
    return {s: vals[ok & (labels.column_species == s)].mean() for s in (1, 2)}


def test_sign_convention_c10_is_plus_defocus():
    ctf = Optics().ctf(5.0)
    assert ctf.aberration_coefficients["C10"] == pytest.approx(50.0)
    assert ctf.defocus == pytest.approx(-50.0)  # abTEM's defocus = -C10
    assert ctf.aberration_coefficients["C30"] == pytest.approx(-9e4)
    assert ctf.aberration_coefficients["C50"] == pytest.approx(5e7)


@pytest.mark.parametrize("thickness", [3, 8])
def test_oxygen_columns_bright_at_paper_optics(waves, thickness):
    grid, table, _, wave = waves[thickness]
    img = image(wave, grid, 5.0)  # C10 = +50 Å
    means = _column_means(img, label_maps(table, grid))
    assert means[2] > 1.1  # O columns brighter than vacuum (= 1)


def test_vacuum_is_one(waves):
    grid, _, params, wave = waves[8]
    for defocus in (1.0, 5.0, 9.0):
        img = image(wave, grid, defocus)
        top = int((params.surface_x_A - 3.0) / (grid.pixel_size_pm / 100))
        assert top > 10
        assert img[:top].mean() == pytest.approx(1.0, abs=0.02)


def test_contrast_changes_with_thickness(waves):
    thin = _column_means(image(waves[3][3], waves[3][0], 5.0), label_maps(waves[3][1], waves[3][0]))
    thick = _column_means(
        image(waves[8][3], waves[8][0], 5.0), label_maps(waves[8][1], waves[8][0])
    )
    assert abs(thin[1] - thick[1]) > 0.1 or abs(thin[2] - thick[2]) > 0.1
    # and the Ce/O contrast relation itself changes (non-linear, species-dependent)
    assert (thin[1] - thin[2]) != pytest.approx(thick[1] - thick[2], abs=0.1)


def test_defocus_changes_image_and_exit_wave_is_reused(waves):
    grid, _, _, wave = waves[8]
    a, b = image(wave, grid, 2.0), image(wave, grid, 8.0)
    assert a.shape == (SIZE, SIZE) and a.dtype == np.float32
    assert np.abs(a - b).max() > 0.1
    assert np.array_equal(a, image(wave, grid, 2.0))


def test_grid_pixel_size_near_paper():
    for size in (128, 256, 512, 1024):
        grid = make_grid(size)
        assert grid.pixel_size_pm == pytest.approx(5.3, rel=0.02)
        assert grid.gpts[1] >= 2 * size and grid.gpts[0] >= 2 * size
    with pytest.raises(ValueError):
        make_grid(15)
