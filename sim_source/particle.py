"""Faceted CeO2 [110] particles seen in profile, for training sets that span real specimens.

Crystal frame as in :mod:`structure` (Å): x = [1-10], y = [001], beam z = [110]. A particle is
the lattice (shifted by a random sub-cell offset) inside a square block with a vacuum margin at
the cell edges, cut by 1-3 random facets whose in-plane normals belong to the {110}, {100} or
{111} families seen edge-on along [110]; a facet may carry a step. Columns thin toward the
nearest surface over a wedge width, both species may lose atoms (vacancies), every atom is
displaced by a frozen-phonon snapshot (isotropic Gaussian, RMS per species) and an amorphous
carbon support film of random thickness may lie under the particle (labelled background).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim_source.structure import (
    CELL_X,
    CELL_Y,
    ColumnTable,
    slice_thicknesses_A,
    thermal_rms_A,
    to_atoms,
    unit_cell_columns,
)
from streamer.domain import MAX_ATOMS

#: in-plane facet normals (degrees from x = [1-10] toward y = [001]) of the low-index facets
#: seen edge-on along [110]; {111} normals lie atan(1/√2) = 35.26° from [1-10].
ANGLE_111_DEG = float(np.degrees(np.arctan(1 / np.sqrt(2))))
FACET_NORMALS_DEG: dict[str, tuple[float, ...]] = {
    "110": (0.0, 180.0),
    "100": (90.0, 270.0),
    "111": (ANGLE_111_DEG, -ANGLE_111_DEG, 180.0 - ANGLE_111_DEG, 180.0 + ANGLE_111_DEG),
}
CARBON_DENSITY_PER_A3 = 0.10  # amorphous carbon, ≈ 2.0 g/cm³
CARBON_SLICE_A = 2.0  # slice thickness through the film (Å)


@dataclass(frozen=True)
class ParticleConfig:
    """Ranges one particle is drawn from (lengths in Å, probabilities per structure or column).

    ``facets``: families the cuts are drawn from; ``cuts``: number of facet cuts (inclusive
    range); ``cut_depth``: how far each cut reaches into the block, as a fraction of its size;
    ``step_probability``: chance that a cut carries a step of ``step_height_A``;
    ``vacancy_probability``: per column and species code; ``carbon_probability``: chance of a
    support film ``carbon_thickness_A`` thick; ``thermal``: frozen-phonon displacements on/off."""

    facets: tuple[str, ...] = ("110", "100", "111")
    edge_margin_A: float = 2.0
    cuts: tuple[int, int] = (1, 3)
    cut_depth: tuple[float, float] = (0.1, 0.6)
    step_probability: float = 0.4
    step_height_A: tuple[float, float] = (1.5, 5.0)
    thickness_atoms: tuple[int, int] = (3, 10)
    wedge_width_A: tuple[float, float] = (0.0, 12.0)
    vacancy_probability: tuple[tuple[int, float], ...] = ((1, 0.03), (2, 0.10))
    carbon_probability: float = 0.5
    carbon_thickness_A: tuple[float, float] = (5.0, 30.0)
    thermal: bool = True


@dataclass
class Particle:
    """One drawn particle: its column table, extra film atoms and what was drawn."""

    table: ColumnTable
    carbon_xyz_A: np.ndarray  # (n, 3) film atoms, z measured from the film's entrance face
    carbon_thickness_A: float
    thermal_seed: int
    params: dict


def _facet_cuts(
    rng: np.random.Generator, cfg: ParticleConfig, centre: np.ndarray, half: float
) -> list[tuple[np.ndarray, float, float, float, float]]:
    """Random cuts: (unit normal, offset Å from centre, step height, step position, step side)."""
    cuts = []
    for _ in range(int(rng.integers(cfg.cuts[0], cfg.cuts[1] + 1))):
        family = str(rng.choice(cfg.facets))
        angle = np.radians(float(rng.choice(FACET_NORMALS_DEG[family])))
        normal = np.array([np.cos(angle), np.sin(angle)])
        reach = half * (np.abs(normal).sum())  # support of the square block along the normal
        offset = reach * (1 - rng.uniform(*cfg.cut_depth))
        step = rng.uniform(*cfg.step_height_A) if rng.random() < cfg.step_probability else 0.0
        cuts.append((normal, offset, step, rng.uniform(-0.5, 0.5) * half, rng.choice([-1, 1])))
    return cuts


def _inside_distance(xy: np.ndarray, centre: np.ndarray, half: float, cuts: list) -> np.ndarray:
    """Signed distance (Å, > 0 inside) of points to the particle's boundary."""
    rel = xy - centre
    dist = half - np.abs(rel).max(axis=1)  # square block (distance to its nearest edge)
    for normal, offset, step, position, side in cuts:
        tangent = np.array([-normal[1], normal[0]])
        stepped = side * (rel @ tangent - position) > 0
        dist = np.minimum(dist, offset - step * stepped - rel @ normal)
    return dist


def build_particle(
    rng: np.random.Generator, field_A: float, cfg: ParticleConfig = ParticleConfig()
) -> Particle:
    """A random faceted particle in a square field of ``field_A`` Å (lattice origin drawn
    uniformly within one cell: the random sub-cell offset)."""
    cell = unit_cell_columns()
    offset = rng.uniform([0, 0], [CELL_X, CELL_Y])
    nx, ny = int(np.ceil(field_A / CELL_X)) + 2, int(np.ceil(field_A / CELL_Y)) + 2
    ix, iy = np.meshgrid(np.arange(-1, nx), np.arange(-1, ny), indexing="ij")
    x = (ix.ravel()[:, None] * CELL_X + cell[None, :, 0]).ravel() + offset[0]
    y = (iy.ravel()[:, None] * CELL_Y + cell[None, :, 1]).ravel() + offset[1]
    z = np.tile(cell[:, 2], ix.size)
    species = np.tile(cell[:, 3], ix.size).astype(np.uint8)
    centre = np.full(2, field_A / 2)
    half = field_A / 2 - cfg.edge_margin_A
    cuts = _facet_cuts(rng, cfg, centre, half)
    depth_A = _inside_distance(np.stack([x, y], axis=1), centre, half, cuts)
    keep = depth_A >= 0
    x, y, z, species, depth_A = x[keep], y[keep], z[keep], species[keep], depth_A[keep]
    thickness = int(rng.integers(cfg.thickness_atoms[0], cfg.thickness_atoms[1] + 1))
    wedge = float(rng.uniform(*cfg.wedge_width_A))
    ramp = np.ones_like(depth_A) if wedge == 0 else np.clip((depth_A + CELL_X / 4) / wedge, 0, 1)
    n_atoms = np.clip(np.round(thickness * ramp), 1, MAX_ATOMS).astype(int)
    for code, probability in cfg.vacancy_probability:
        vacant = (species == code) & (rng.random(len(x)) < probability) & (n_atoms > 1)
        n_atoms[vacant] -= rng.integers(1, n_atoms[vacant])
    cells = np.zeros((len(x), MAX_ATOMS), bool)
    start = (MAX_ATOMS - n_atoms) // 2
    for k in range(MAX_ATOMS):
        cells[:, k] = (k >= start) & (k < start + n_atoms)
    carbon_t = (
        float(rng.uniform(*cfg.carbon_thickness_A))
        if rng.random() < cfg.carbon_probability
        else 0.0
    )
    n_carbon = int(rng.poisson(CARBON_DENSITY_PER_A3 * field_A**2 * carbon_t))
    carbon = rng.uniform(0, 1, (n_carbon, 3)) * [field_A, field_A, carbon_t]
    params = dict(
        thickness_atoms=thickness,
        wedge_width_A=wedge,
        offset_A=offset.tolist(),
        facets=[float(np.degrees(np.arctan2(n[1], n[0]))) for n, *_ in cuts],
        steps_A=[float(c[2]) for c in cuts],
        carbon_thickness_A=carbon_t,
    )
    return Particle(
        ColumnTable(x, y, species, z, cells), carbon, carbon_t, int(rng.integers(2**31)), params
    )


def particle_atoms(particle: Particle, field_A: float, thermal: bool = True):
    """ASE atoms of the particle (:func:`structure.to_atoms`) with the carbon film after the
    crystal, plus the slice thicknesses (Å) that centre every atomic layer in its slice;
    frozen-phonon displacements from the particle's thermal seed when ``thermal``."""
    from ase import Atoms

    crystal = to_atoms(particle.table, field_A, field_A)
    positions = crystal.positions
    if thermal:
        # drawn per atom (not per site as structure.thermal_displacements): the stored
        # libraries were made this way, and their seeds must keep reproducing them
        rms = thermal_rms_A(particle.table.species[np.nonzero(particle.table.cells)[0]])
        positions = (
            positions
            + np.random.default_rng(particle.thermal_seed).normal(size=positions.shape)
            * rms[:, None]
        )
    n_film = (
        int(np.ceil(particle.carbon_thickness_A / CARBON_SLICE_A))
        if len(particle.carbon_xyz_A)
        else 0
    )
    film = particle.carbon_xyz_A + [0, 0, crystal.cell[2, 2]]
    slices = slice_thicknesses_A() + (particle.carbon_thickness_A / max(n_film, 1),) * n_film
    atoms = Atoms(
        symbols=list(crystal.symbols) + ["C"] * len(film),
        positions=np.concatenate([positions, film]),
        cell=[field_A, field_A, sum(slices)],
        pbc=True,
    )
    return atoms, slices
