"""CeO2 [110] column tables and the ASE atoms built from them."""

import numpy as np
import pytest

from sim_source.structure import (
    CELL_Z,
    SHAPES,
    THERMAL_RMS_A,
    StructureConfig,
    build_columns,
    slice_thicknesses_A,
    thermal_displacements,
    to_atoms,
    unit_cell_columns,
)
from streamer.domain import MAX_ATOMS


def test_unit_cell_has_4_ce_and_8_o_columns_a_quarter_lattice_apart():
    cell = unit_cell_columns()
    assert (cell[:, 3] == 1).sum() == 4 and (cell[:, 3] == 2).sum() == 8
    ce, o = cell[cell[:, 3] == 1, :2], cell[cell[:, 3] == 2, :2]
    nearest = np.min(np.linalg.norm(ce[:, None] - o[None], axis=2), axis=1)
    assert np.allclose(nearest, 5.411 / 4, atol=1e-3)  # projected Ce-O distance a/4
    assert set(np.round(cell[:, 2], 3)) == {0.0, round(CELL_Z / 2, 3)}


def _build(seed, shape=None, **kw):
    return build_columns(
        np.random.default_rng(seed), 30.0, 5, 40.0, StructureConfig(**kw), shape=shape
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_thickness_range_and_wedge(shape):
    table, params = _build(3, shape)
    assert params.shape == shape and 3 <= params.thickness_atoms <= 10
    n = table.n_atoms
    assert n.min() >= 1 and n.max() <= MAX_ATOMS
    assert np.all(table.x_A >= params.surface_x_A) and np.all(table.x_A < 40.0)
    deep = table.x_A > params.surface_x_A + params.wedge_width_A + 10
    ce = table.species == 1
    assert np.all(n[deep & ce] == params.thickness_atoms)  # bulk Ce columns: full thickness


def test_wedge_thins_toward_the_surface():
    table, params = _build(
        5, "flat", wedge_width_A=(12.0, 12.0), thickness_atoms=(9, 9), vacancy_probability=0.0
    )
    depth = table.x_A - params.surface_x_A
    assert table.n_atoms[depth < 2].max() < 9 and np.all(table.n_atoms[depth > 12] == 9)


def test_reproducible_from_seed_and_vacancies_only_on_oxygen():
    a, _ = _build(11, vacancy_probability=0.5, wedge_width_A=(0.0, 0.0))
    b, _ = _build(11, vacancy_probability=0.5, wedge_width_A=(0.0, 0.0))
    c, _ = _build(12, vacancy_probability=0.5, wedge_width_A=(0.0, 0.0))
    assert np.array_equal(a.cells, b.cells) and np.array_equal(a.x_A, b.x_A)
    assert not (len(a) == len(c) and np.array_equal(a.cells, c.cells))
    ce = a.species == 1
    assert len(np.unique(a.n_atoms[ce])) == 1  # Ce columns untouched
    assert len(np.unique(a.n_atoms[~ce])) > 1  # some O columns lost atoms


def test_atoms_have_one_atom_per_cell_per_column_centred_in_slices():
    table, _ = _build(2)
    atoms = to_atoms(table, 40.0, 5 * 5.411)
    assert len(atoms) == table.n_atoms.sum()
    z = atoms.positions[:, 2]
    half = CELL_Z / 2
    assert np.allclose((z % half), half / 2, atol=1e-6)  # each layer mid-slice
    assert sum(slice_thicknesses_A()) == pytest.approx(atoms.cell[2, 2])
    symbols = np.array(atoms.get_chemical_symbols())
    assert set(symbols) == {"Ce", "O"}


def test_removing_atoms_changes_only_that_column():
    table, _ = _build(4, vacancy_probability=0.0)
    i = int(np.flatnonzero((table.species == 2) & (table.n_atoms >= 3))[0])
    out = table.with_atoms_removed(i, 2)
    assert out.n_atoms[i] == table.n_atoms[i] - 2
    others = np.arange(len(table)) != i
    assert np.array_equal(out.n_atoms[others], table.n_atoms[others])
    with pytest.raises(ValueError):
        table.with_atoms_removed(i, 99)


def test_a_thermal_snapshot_moves_each_site_by_its_species_rms_and_survives_atom_loss():
    table, _ = _build(4, vacancy_probability=0.0)
    snapshot = thermal_displacements(table, seed=11)
    assert snapshot.shape == (len(table), MAX_ATOMS, 3)
    for code in (1, 2):  # RMS per axis of each species, from its Debye-Waller factor
        rms = np.sqrt((snapshot[table.species == code] ** 2).mean())
        assert rms == pytest.approx(THERMAL_RMS_A[code], rel=0.05)
    still = to_atoms(table, 40.0, 5 * 5.411)
    moved = to_atoms(table, 40.0, 5 * 5.411, displacements_A=snapshot)
    shift = moved.positions - still.positions
    assert 0.03 < np.sqrt((shift**2).mean()) < 0.1
    # an event removes atoms from one column: every other atom keeps its displaced position
    i = int(np.flatnonzero((table.species == 2) & (table.n_atoms >= 3))[0])
    removed = table.with_atoms_removed(i, 2)
    after = to_atoms(removed, 40.0, 5 * 5.411, displacements_A=snapshot)
    before_rows, after_rows = np.nonzero(table.cells)[0], np.nonzero(removed.cells)[0]
    np.testing.assert_array_equal(
        after.positions[after_rows != i], moved.positions[before_rows != i]
    )
    assert not np.array_equal(snapshot, thermal_displacements(table, seed=12))
