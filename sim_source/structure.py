"""CeO2 [110] profile-view surface models as column tables, and their ASE atoms.

Crystal frame (all distances in Å): x = [1-10] (the surface normal, vacuum at small x),
y = [001] (along the surface, periodic), z = [110] (the beam). The orthogonal cell is
a√2 × a × a/√2 with 4 Ce + 8 O, one atom per column per cell along z, so a column of
``n_atoms`` atoms is ``n_atoms`` cells thick. A structure is first a :class:`ColumnTable`
(one row per projected column: x, y, species, atom count, z-offset in the cell); the ASE atoms
are built from it, so depth labels are exact by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamer.domain import MAX_ATOMS, SPECIES_CE, SPECIES_NAME, SPECIES_O

A_CEO2 = 5.411  # Å, fluorite lattice constant
CELL_X = A_CEO2 * np.sqrt(2.0)  # Å, [1-10]
CELL_Y = A_CEO2  # Å, [001]
CELL_Z = A_CEO2 / np.sqrt(2.0)  # Å, [110] (one atom per column per cell)
SHAPES: tuple[str, ...] = ("flat", "sawtooth", "stepped")
#: RMS thermal displacement per axis (Å) at room temperature, from B ≈ 0.3 Å² (Ce) and
#: 0.6 Å² (O): u = sqrt(B / 8π²).
THERMAL_RMS_A = {SPECIES_CE: 0.062, SPECIES_O: 0.087}


def unit_cell_columns() -> np.ndarray:
    """The 12 columns of the orthogonal [110] cell: (x Å, y Å, z Å in cell, species code).

    Derived from the cubic fluorite basis (Ce fcc, O at the (1/4,1/4,1/4) tetrahedral sites)
    rotated so that x' = (X - Y)/√2, y' = Z, z' = (X + Y)/√2, folded into the cell.
    """
    fcc = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
    tetra = np.array([[i, j, k] for i in (0.25, 0.75) for j in (0.25, 0.75) for k in (0.25, 0.75)])
    rows: list[tuple[float, ...]] = []
    for frac, code in ((fcc, SPECIES_CE), (tetra, SPECIES_O)):
        shifts = np.array(
            [[i, j, k] for i in range(-2, 3) for j in range(-2, 3) for k in range(-2, 3)]
        )
        cart = ((frac[:, None, :] + shifts[None]) * A_CEO2).reshape(-1, 3)
        xr = (cart[:, 0] - cart[:, 1]) / np.sqrt(2)
        yr = cart[:, 2]
        zr = (cart[:, 0] + cart[:, 1]) / np.sqrt(2)
        eighth = np.array([CELL_X, CELL_Y, CELL_Z]) / 8  # every site is on this grid
        steps = np.round(np.stack([xr, yr, zr], axis=1) / eighth).astype(int) % 8
        rows.extend((*(k * eighth), code) for k in np.unique(steps, axis=0))
    table = np.array(rows)
    assert (table[:, 3] == SPECIES_CE).sum() == 4 and (table[:, 3] == SPECIES_O).sum() == 8
    return table


@dataclass(frozen=True)
class StructureConfig:
    """Ranges the random surface models are drawn from (distances in Å).

    ``thickness_atoms``: bulk column length range (atoms, inclusive); ``wedge_width_A``: width
    over which columns thin toward the surface (0 = abrupt); ``vacancy_probability``: chance
    that an O column loses atoms (each such column keeps at least one atom)."""

    shapes: tuple[str, ...] = SHAPES
    thickness_atoms: tuple[int, int] = (3, 10)
    wedge_width_A: tuple[float, float] = (0.0, 12.0)
    surface_fraction: tuple[float, float] = (0.2, 0.5)
    sawtooth_amplitude_A: tuple[float, float] = (2.0, 6.0)
    step_height_A: tuple[float, float] = (2.0, 6.0)
    vacancy_probability: float = 0.1


@dataclass
class ColumnTable:
    """Projected columns of one structure (Å in the crystal frame).

    ``cells`` (n, MAX_ATOMS) bool: which cells along z hold an atom (row sum = ``n_atoms``);
    ``z_offset_A``: the column's height inside each cell."""

    x_A: np.ndarray
    y_A: np.ndarray
    species: np.ndarray  # 1 Ce, 2 O
    z_offset_A: np.ndarray
    cells: np.ndarray

    @property
    def n_atoms(self) -> np.ndarray:
        return self.cells.sum(axis=1).astype(np.int64)

    def __len__(self) -> int:
        return len(self.x_A)

    def with_atoms_removed(self, index: int, n_remove: int) -> ColumnTable:
        """A copy in which column ``index`` lost its ``n_remove`` outermost atoms (toward
        the exit surface)."""
        cells = self.cells.copy()
        filled = np.flatnonzero(cells[index])
        if n_remove > len(filled):
            raise ValueError(f"column {index} has {len(filled)} atoms, cannot remove {n_remove}")
        if n_remove:
            cells[index, filled[-n_remove:]] = False
        return ColumnTable(self.x_A, self.y_A, self.species, self.z_offset_A, cells)


def _surface_profile(
    shape: str, y: np.ndarray, length_y_A: float, rng: np.random.Generator, cfg: StructureConfig
) -> np.ndarray:
    """Surface depth offset (Å, ≥ 0 = further from vacuum) along y, periodic in length_y_A."""
    if shape == "flat":
        return np.zeros_like(y)
    if shape == "sawtooth":
        n_teeth = int(rng.integers(1, 3))
        amp = rng.uniform(*cfg.sawtooth_amplitude_A)
        phase = rng.uniform(0, 1)
        t = (y / length_y_A * n_teeth + phase) % 1.0
        return amp * np.abs(2 * t - 1)
    if shape == "stepped":
        height = rng.uniform(*cfg.step_height_A)
        start, width = rng.uniform(0, 1), rng.uniform(0.3, 0.7)
        t = (y / length_y_A - start) % 1.0
        return np.where(t < width, height, 0.0)
    raise ValueError(f"unknown surface shape {shape!r}; choose from {SHAPES}")


@dataclass(frozen=True)
class StructureParams:
    """What was drawn for one structure (saved per image)."""

    shape: str
    thickness_atoms: int
    wedge_width_A: float
    surface_x_A: float


def build_columns(
    rng: np.random.Generator,
    length_x_A: float,
    n_cells_y: int,
    crystal_end_x_A: float,
    cfg: StructureConfig = StructureConfig(),
    shape: str | None = None,
) -> tuple[ColumnTable, StructureParams]:
    """A random surface model filling x in [surface, crystal_end_x_A], y in [0, n_cells_y·a).

    ``length_x_A``: extent of the field of view along x (the surface is placed at a drawn
    fraction of it). Columns are centred along z; O columns may lose atoms (vacancies)."""
    cell = unit_cell_columns()
    length_y_A = n_cells_y * CELL_Y
    shape = shape or str(rng.choice(cfg.shapes))
    thickness = int(rng.integers(cfg.thickness_atoms[0], cfg.thickness_atoms[1] + 1))
    wedge = float(rng.uniform(*cfg.wedge_width_A))
    surface_x = float(rng.uniform(*cfg.surface_fraction) * length_x_A)
    nx = int(np.ceil(crystal_end_x_A / CELL_X)) + 1
    ix, iy = np.meshgrid(np.arange(nx), np.arange(n_cells_y), indexing="ij")
    x = (ix.ravel()[:, None] * CELL_X + cell[None, :, 0]).ravel()
    y = (iy.ravel()[:, None] * CELL_Y + cell[None, :, 1]).ravel()
    z = np.tile(cell[:, 2], ix.size)
    species = np.tile(cell[:, 3], ix.size).astype(np.uint8)
    surface = surface_x + _surface_profile(shape, y, length_y_A, rng, cfg)
    keep = (x >= surface) & (x < crystal_end_x_A)
    x, y, z, species, depth_A = x[keep], y[keep], z[keep], species[keep], (x - surface)[keep]
    ramp = np.ones_like(depth_A) if wedge == 0 else np.clip((depth_A + CELL_X / 2) / wedge, 0, 1)
    n_atoms = np.clip(np.round(thickness * ramp), 1, MAX_ATOMS).astype(int)
    vacant = (species == SPECIES_O) & (rng.random(len(x)) < cfg.vacancy_probability) & (n_atoms > 1)
    n_atoms[vacant] -= rng.integers(1, n_atoms[vacant])
    cells = np.zeros((len(x), MAX_ATOMS), bool)
    start = (MAX_ATOMS - n_atoms) // 2
    for k in range(MAX_ATOMS):
        cells[:, k] = (k >= start) & (k < start + n_atoms)
    table = ColumnTable(x, y, species, z, cells)
    return table, StructureParams(shape, thickness, wedge, surface_x)


def slice_thicknesses_A(n_cells_z: int = MAX_ATOMS) -> tuple[float, ...]:
    """Two slices per cell along z (a/(2√2) each), one atomic layer centred in each."""
    return (CELL_Z / 2,) * (2 * n_cells_z)


def thermal_rms_A(species: np.ndarray) -> np.ndarray:
    """RMS thermal displacement per axis (Å, :data:`THERMAL_RMS_A`) of each species code."""
    return np.where(species == SPECIES_CE, THERMAL_RMS_A[SPECIES_CE], THERMAL_RMS_A[SPECIES_O])


def thermal_displacements(table: ColumnTable, seed: int) -> np.ndarray:
    """A frozen-phonon snapshot: an isotropic Gaussian displacement (Å, RMS per species,
    :func:`thermal_rms_A`) for every site (column, cell), shape (n_columns, MAX_ATOMS, 3).
    Drawn per site, not per atom, so a column that loses atoms keeps the others' positions."""
    noise = np.random.default_rng(seed).normal(size=(len(table), table.cells.shape[1], 3))
    return noise * thermal_rms_A(table.species)[:, None, None]


def to_atoms(
    table: ColumnTable,
    length_x_A: float,
    length_y_A: float,
    n_cells_z: int = MAX_ATOMS,
    displacements_A: np.ndarray | None = None,
):
    """ASE atoms of the column table in a (length_x, length_y, n_cells_z·c) Å cell.

    Atomic layers sit at z = k·c/2 + c/4 so each is centred in its slice of
    :func:`slice_thicknesses_A` (the two layers of the cell are at z_offset 0 and c/2).
    ``displacements_A`` (n_columns, MAX_ATOMS, 3): added to each site's atom (a thermal
    snapshot, :func:`thermal_displacements`)."""
    from ase import Atoms

    rows, ks = np.nonzero(table.cells)
    z = ks * CELL_Z + table.z_offset_A[rows] + CELL_Z / 4
    symbols = [SPECIES_NAME[int(s)] for s in table.species[rows]]
    positions = np.stack([table.x_A[rows], table.y_A[rows], z], axis=1)
    if displacements_A is not None:
        positions = positions + displacements_A[rows, ks]
    return Atoms(
        symbols=symbols,
        positions=positions,
        cell=[length_x_A, length_y_A, n_cells_z * CELL_Z],
        pbc=True,
    )
