"""HRTEM images of column tables with abTEM: plane-wave multislice once, CTF per defocus.

Sign convention: ``defocus_nm`` here is the paper's defocus, i.e. the aberration coefficient
C10 = +10·defocus_nm Å (positive values with the negative C3 = −9 µm give bright O columns);
abTEM's own ``defocus`` argument is −C10, so we pass C10 explicitly.
Partial coherence is the quasi-coherent envelope approximation of abTEM's CTF: a focal spread
(Å, the 1/e half-width as abTEM defines it) and an objective aperture (mrad, soft edge).

Grid: the image array is [row, col] = [x, y] of the crystal frame (abTEM's order), row = x =
[1-10] (surface normal, vacuum at small rows), col = y = [001]. Simulated pixel (i, j) samples
(x, y) = (i, j)·sampling; after 2 × 2 binning output pixel (r, c) is centred at
((r + 0.25)·p, (c + 0.25)·p) with p = 2·sampling, minus the crop origin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from sim_source.structure import CELL_Y, slice_thicknesses_A, to_atoms
from streamer.cli_support import check_image_side
from streamer.domain import MAX_ATOMS

TARGET_SAMPLING_PM = 2.65  # simulated pixel size; binned 2× to ≈ 5.3 pm
BINNING = 2
MIN_OUTPUT_PX = 16  # smallest output side, px
#: vacuum margin (Å) below the crystal's far end and crystal margin below the crop, so the
#: periodic wrap of the multislice puts no artificial surface in the field of view.
CRYSTAL_MARGIN_A = 6.0
VACUUM_MARGIN_A = 4.0


@dataclass(frozen=True)
class Optics:
    """Microscope parameters (paper III-B2). Units in the names; C10 = +defocus."""

    voltage_kV: float = 300.0
    C3_um: float = -9.0
    C5_mm: float = 5.0
    defocus_nm: tuple[float, float] = (1.0, 9.0)
    focal_spread_A: float = 20.0
    aperture_mrad: float = 40.0

    def ctf(self, defocus_nm: float):
        """abTEM CTF for one defocus (C10 = +10·defocus_nm Å)."""
        from abtem import CTF

        return CTF(
            energy=self.voltage_kV * 1e3,
            semiangle_cutoff=self.aperture_mrad,
            soft=True,
            focal_spread=self.focal_spread_A,
            aberration_coefficients={
                "C10": 10.0 * defocus_nm,
                "C30": self.C3_um * 1e4,
                "C50": self.C5_mm * 1e7,
            },
        )


def _smooth(n: int) -> bool:
    for p in (2, 3, 5, 7, 11, 13):
        while n % p == 0:
            n //= p
    return n == 1


def _smooth_at_least(n: int) -> int:
    while not _smooth(n):
        n += 1
    return n


@dataclass(frozen=True)
class Grid:
    """Simulation grid for an output of ``size`` × ``size`` pixels.

    Along y the cell is ``n_cells_y`` lattice periods (periodic crystal); along x it is the
    field of view plus margins. ``sampling_A`` is the same on both axes; the output is the
    binned crop starting at simulated pixel (0, crop_y0)."""

    size: int
    gpts: tuple[int, int]
    sampling_A: float
    n_cells_y: int
    crop_y0: int

    @property
    def pixel_size_pm(self) -> float:
        return self.sampling_A * BINNING * 100.0

    @property
    def extent_A(self) -> tuple[float, float]:
        return self.gpts[0] * self.sampling_A, self.gpts[1] * self.sampling_A

    @property
    def fov_A(self) -> float:
        return self.size * BINNING * self.sampling_A

    @property
    def crystal_end_x_A(self) -> float:
        return self.extent_A[0] - VACUUM_MARGIN_A

    def to_output_px(self, x_A: np.ndarray, y_A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Crystal-frame positions (Å) → output (row, col) pixel coordinates."""
        p = self.sampling_A * BINNING
        return (
            np.asarray(x_A) / p - 0.25,
            (np.asarray(y_A) - self.crop_y0 * self.sampling_A) / p - 0.25,
        )


def check_output_size(size: int) -> None:
    """Output sides the simulator makes: multiples of the binning, at least ``MIN_OUTPUT_PX``."""
    check_image_side(size, BINNING, MIN_OUTPUT_PX, f"--size {size}")


@cache
def make_grid(size: int, sampling_pm: float = TARGET_SAMPLING_PM) -> Grid:
    """The grid for ``size`` output pixels: y spans whole periods of a (smooth FFT size
    closest to the target sampling), x the field of view plus margins."""
    check_output_size(size)
    n_sim = size * BINNING
    target = sampling_pm / 100.0
    n_cells_y = math.ceil(n_sim * target / CELL_Y)
    length_y = n_cells_y * CELL_Y
    candidates = [n for n in range(n_sim, int(length_y / target * 1.05) + 2) if _smooth(n)]
    gy = min(candidates, key=lambda n: abs(length_y / n - target))
    sampling = length_y / gy
    gx = _smooth_at_least(n_sim + math.ceil((CRYSTAL_MARGIN_A + VACUUM_MARGIN_A) / sampling))
    return Grid(size, (gx, gy), sampling, n_cells_y, (gy - n_sim) // 2)


def configure_abtem(threads: int = 1) -> None:
    """Deterministic FFTs (FFTW_ESTIMATE plans) and eager evaluation in this process."""
    import abtem

    abtem.config.set(
        {
            "fftw.planning_effort": "FFTW_ESTIMATE",
            "fftw.threads": threads,
            "diagnostics.progress_bar": False,
        }
    )


def computed(lazy: Any) -> np.ndarray:
    """The array of a lazy abTEM result (waves, measurements), computed in this process."""
    return np.asarray(lazy.compute(scheduler="synchronous").array)


def exit_wave(
    table, grid: Grid, optics: Optics = Optics(), displacements_A: np.ndarray | None = None
) -> np.ndarray:
    """Complex exit wave (gx, gy) of a plane wave through the column table (Lobato potential,
    two slices per cell, infinite projection), incident intensity 1 per pixel; atoms moved by
    ``displacements_A`` (a thermal snapshot, :func:`structure.thermal_displacements`) if given."""
    import abtem

    atoms = to_atoms(table, *grid.extent_A, n_cells_z=MAX_ATOMS, displacements_A=displacements_A)
    potential = abtem.Potential(
        atoms,
        gpts=grid.gpts,
        slice_thickness=slice_thicknesses_A(),
        projection="infinite",
        parametrization="lobato",
    )
    wave = abtem.PlaneWave(energy=optics.voltage_kV * 1e3, normalize=False)
    return computed(wave.multislice(potential))


def image(exit: np.ndarray, grid: Grid, defocus_nm: float, optics: Optics = Optics()) -> np.ndarray:
    """Output image (size, size) float32 for one defocus: CTF on the exit wave, intensity,
    crop, 2 × 2 binning, normalised so the incident (vacuum) intensity is 1."""
    import abtem

    waves = abtem.Waves(exit, energy=optics.voltage_kV * 1e3, sampling=grid.sampling_A)
    intensity = computed(waves.apply_ctf(optics.ctf(defocus_nm)).intensity())
    n = grid.size * BINNING
    crop = intensity[:n, grid.crop_y0 : grid.crop_y0 + n]
    return crop.reshape(grid.size, BINNING, grid.size, BINNING).mean(axis=(1, 3)).astype(np.float32)
