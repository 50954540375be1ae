"""On-the-fly microscopes: faceted particles, the optics / rotation / offset draws, and the
exactness of rotated labels against rotated images."""

from __future__ import annotations

import numpy as np
import pytest

from sim_source.hrtem import BINNING, Optics
from sim_source.microscope import (
    OpticsDraw,
    OpticsRanges,
    View,
    draw_view,
    intensity,
    sample_view,
    view_labels,
)
from sim_source.particle import FACET_NORMALS_DEG, ParticleConfig, build_particle
from sim_source.structure import CELL_X, CELL_Y, ColumnTable
from streamer.domain import MAX_ATOMS

SAMPLING_A = 0.0265


def one_column_image(x_A: float, y_A: float, n: int = 384) -> np.ndarray:
    """A simulated-grid image with one bright Gaussian column at (x, y) Å (sample (i, j) at
    (i, j)·sampling)."""
    i, j = np.indices((n, n)) * SAMPLING_A
    return 1 + np.exp(-((i - x_A) ** 2 + (j - y_A) ** 2) / (2 * 0.15**2))


def one_column_table(x_A: float, y_A: float) -> ColumnTable:
    cells = np.zeros((1, MAX_ATOMS), bool)
    cells[0, :4] = True
    return ColumnTable(
        np.array([x_A]), np.array([y_A]), np.array([2], np.uint8), np.zeros(1), cells
    )


@pytest.mark.parametrize(
    "angle, mirror", [(0.0, False), (37.0, False), (90.0, True), (211.0, True)]
)
def test_turned_and_mirrored_labels_sit_on_the_turned_image(angle, mirror):
    x, y = 4.3, 5.9
    image, table = one_column_image(x, y), one_column_table(x, y)
    view = View(5.0, 5.0, angle, mirror, size=64)
    crop = sample_view(image, SAMPLING_A, view)
    labels = view_labels(table, SAMPLING_A, view)
    assert len(labels.centres) == 1 and labels.column_depth[0] == 4
    peak = np.unravel_index(np.argmax(crop), crop.shape)
    assert np.hypot(*(np.array(peak) - labels.centres[0])) < 0.75
    disk = np.argwhere(labels.depth > 0)
    assert np.abs(disk.mean(axis=0) - labels.centres[0]).max() < 0.5
    radius_px = 0.6 / (SAMPLING_A * BINNING)
    assert abs(len(disk) - np.pi * radius_px**2) < 0.15 * np.pi * radius_px**2


def test_mirror_is_a_reflection_not_a_turn():
    """A mirrored view equals the unmirrored one flipped across its columns."""
    image = one_column_image(4.0, 6.0) + one_column_image(5.5, 4.6)
    plain = sample_view(image, SAMPLING_A, View(5.0, 5.0, 20.0, False, 48))
    mirrored = sample_view(image, SAMPLING_A, View(5.0, 5.0, 20.0, True, 48))
    np.testing.assert_allclose(mirrored, plain[:, ::-1], atol=1e-5)
    assert not np.allclose(mirrored, plain, atol=1e-3)


def test_views_cover_the_circle_and_stay_inside_the_field():
    rng = np.random.default_rng(0)
    views = [draw_view(rng, 20.0, 0.053, 128) for _ in range(400)]
    angles = np.array([v.angle_deg for v in views])
    assert angles.min() < 20 and angles.max() > 340
    assert 0.35 < np.mean([v.mirror for v in views]) < 0.65
    half_diagonal = 128 * 0.053 / np.sqrt(2)
    assert all(half_diagonal < v.x0_A < 20 - half_diagonal for v in views)
    with pytest.raises(ValueError, match="does not fit"):
        draw_view(rng, 8.0, 0.053, 128)


def test_optics_draws_span_the_ranges():
    ranges = OpticsRanges()
    draws = [ranges.draw(np.random.default_rng(k)) for k in range(300)]
    c10 = np.array([d.C10_A for d in draws]) / 10
    assert c10.min() < 1 and c10.max() > 9 and (c10 >= 0).all() and (c10 <= 10).all()
    assert min(d.C3_um for d in draws) < -13 and max(d.C3_um for d in draws) > -5
    assert max(d.C12_A for d in draws) > 15 and max(d.C21_A for d in draws) > 800
    assert len({round(d.phi12_rad, 3) for d in draws}) > 250
    assert 0.15 < np.mean([d.aperture_mrad is None for d in draws]) < 0.35
    assert max(d.focal_spread_A for d in draws) > 40 and max(d.mtf_sigma_px for d in draws) > 0.5


def test_on_the_fly_ctf_matches_the_dataset_path():
    """intensity() with the paper's optics equals abTEM's apply_ctf as hrtem.image uses it."""
    import abtem

    rng = np.random.default_rng(3)
    wave = np.exp(1j * 0.3 * rng.standard_normal((96, 96))).astype(np.complex64)
    optics = Optics()
    waves = abtem.Waves(wave, energy=300e3, sampling=SAMPLING_A)
    reference = np.asarray(
        waves.apply_ctf(optics.ctf(5.0)).intensity().compute(scheduler="synchronous").array
    )
    ours = intensity(wave, SAMPLING_A, OpticsDraw(C10_A=50.0))
    np.testing.assert_allclose(ours, reference, rtol=2e-4, atol=2e-5)
    astigmatic = intensity(wave, SAMPLING_A, OpticsDraw(C10_A=50.0, C12_A=20.0))
    assert np.abs(astigmatic - ours).max() > 1e-3


def test_numpy_ctf_kernel_equals_abtems_for_every_kind_of_draw():
    """OpticsDraw.kernel (no abTEM needed) against abTEM's CTF(soft=True) term for term:
    astigmatism, coma, C3, C5, focal spread, soft aperture or none."""
    from abtem import CTF

    rng = np.random.default_rng(11)
    draws = [OpticsRanges().draw(rng) for _ in range(24)]
    assert any(d.aperture_mrad is None for d in draws)
    assert any(d.aperture_mrad is not None for d in draws)
    for o in draws:
        reference = CTF(
            energy=o.voltage_kV * 1e3,
            soft=True,
            focal_spread=o.focal_spread_A,
            semiangle_cutoff=np.inf if o.aperture_mrad is None else o.aperture_mrad,
            aberration_coefficients={
                "C10": o.C10_A,
                "C12": o.C12_A,
                "phi12": o.phi12_rad,
                "C21": o.C21_A,
                "phi21": o.phi21_rad,
                "C30": o.C3_um * 1e4,
                "C50": o.C5_mm * 1e7,
            },
            gpts=(96, 120),
            sampling=SAMPLING_A,
        )._evaluate_kernel()
        # abTEM evaluates χ in float32: at the grid's largest angles (χ ~ 10⁴ rad) its phase
        # carries ~1e-4 of rounding, ours (float64) does not
        np.testing.assert_allclose(o.kernel((96, 120), SAMPLING_A), reference, atol=1e-3)


def test_particles_have_random_sub_cell_offsets_and_drawn_facets():
    field = 20.0
    firsts = []
    for seed in range(40):
        p = build_particle(np.random.default_rng(seed), field, ParticleConfig(carbon_probability=0))
        ce = p.table.species == 1
        firsts.append((p.table.x_A[ce].min() % CELL_X, p.table.y_A[ce].min() % CELL_Y))
        assert p.table.n_atoms.min() >= 1 and p.table.n_atoms.max() <= MAX_ATOMS
        allowed = {round(a % 360, 2) for a in sum(FACET_NORMALS_DEG.values(), ())}
        assert {round(a % 360, 2) for a in p.params["facets"]} <= allowed
    firsts = np.array(firsts)
    # uniform over one cell: standard deviation cell/√12 ≈ 0.29 cell
    assert firsts[:, 0].std() > 0.18 * CELL_X and firsts[:, 1].std() > 0.18 * CELL_Y
    assert len(np.unique(np.round(firsts, 3), axis=0)) == 40


def test_only_111_facets_when_asked_and_films_when_drawn():
    cfg = ParticleConfig(facets=("111",), carbon_probability=1.0)
    p = build_particle(np.random.default_rng(1), 20.0, cfg)
    assert all(
        abs(abs(a) % 180 - 35.26) < 0.01 or abs(abs(a) % 180 - 144.74) < 0.01
        for a in p.params["facets"]
    )
    assert p.carbon_thickness_A >= 5.0 and len(p.carbon_xyz_A) > 100
