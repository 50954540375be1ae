"""``segdepth bench simulate``: images/s of our path vs. abTEM once per (structure, defocus).

Ours: one potential + multislice per structure, then a CTF + intensity per defocus (the
dataset writer's path). Baseline: abTEM's whole pipeline (potential, multislice, CTF,
intensity) run once per (structure, defocus) pair, as a plain abTEM script would. Both run in
this process after a warm-up image (numba JIT, FFT planning), on the same structures.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sim_source.hrtem import (
    BINNING,
    Grid,
    Optics,
    computed,
    configure_abtem,
    exit_wave,
    image,
    make_grid,
)
from sim_source.structure import StructureConfig, build_columns, slice_thicknesses_A, to_atoms
from streamer.cli_support import machine_info, write_json
from streamer.domain import MAX_ATOMS


@dataclass(frozen=True)
class BenchConfig:
    """``size``: output pixels per side (simulated at ≈ twice that, ≈ 2.65 pm)."""

    size: int = 1024
    structures: int = 2
    defocus: int = 3
    seed: int = 0


def _baseline_image(table, grid: Grid, defocus_nm: float, optics: Optics) -> np.ndarray:
    import abtem

    atoms = to_atoms(table, *grid.extent_A, n_cells_z=MAX_ATOMS)
    potential = abtem.Potential(
        atoms,
        gpts=grid.gpts,
        slice_thickness=slice_thicknesses_A(),
        projection="infinite",
        parametrization="lobato",
    )
    wave = abtem.PlaneWave(energy=optics.voltage_kV * 1e3, normalize=False)
    exit: Any = wave.multislice(potential)  # abTEM types it as a union of result kinds
    arr = computed(exit.apply_ctf(optics.ctf(defocus_nm)).intensity())
    n = grid.size * BINNING
    crop = arr[:n, grid.crop_y0 : grid.crop_y0 + n]
    return crop.reshape(grid.size, BINNING, grid.size, BINNING).mean(axis=(1, 3))


def run_bench(cfg: BenchConfig, json_path: str | Path | None = None) -> dict:
    """Time both paths, print a table, write JSON; returns the figures."""
    configure_abtem()
    optics = Optics()
    grid = make_grid(cfg.size)
    rng = np.random.default_rng(cfg.seed)
    tables = [
        build_columns(rng, grid.fov_A, grid.n_cells_y, grid.crystal_end_x_A, StructureConfig())[0]
        for _ in range(cfg.structures)
    ]
    defoci = np.linspace(*optics.defocus_nm, cfg.defocus)
    image(exit_wave(tables[0], grid, optics), grid, defoci[0], optics)  # warm-up
    n_images = cfg.structures * cfg.defocus
    t0 = time.perf_counter()
    ours = [
        image(w, grid, d, optics)
        for w in (exit_wave(t, grid, optics) for t in tables)
        for d in defoci
    ]
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    base = [_baseline_image(t, grid, d, optics) for t in tables for d in defoci]
    t_base = time.perf_counter() - t0
    max_diff = float(max(np.abs(a - b).max() for a, b in zip(ours, base)))
    result = dict(
        config=asdict(cfg),
        simulation_gpts=list(grid.gpts),
        pixel_size_pm=grid.pixel_size_pm,
        images=n_images,
        ours_s=t_ours,
        ours_images_per_s=n_images / t_ours,
        abtem_per_pair_s=t_base,
        abtem_per_pair_images_per_s=n_images / t_base,
        speedup=t_base / t_ours,
        max_abs_difference=max_diff,
        machine=machine_info(),
    )
    print(
        f"segdepth bench simulate: {n_images} images of {cfg.size}^2 px "
        f"(simulated {grid.gpts[0]}x{grid.gpts[1]}), {cfg.structures} structures x "
        f"{cfg.defocus} defocus"
    )
    print(f"{'path':<38}{'time s':>10}{'images/s':>12}")
    print(f"{'ours (exit wave reused per defocus)':<38}{t_ours:>10.2f}{n_images / t_ours:>12.3f}")
    print(f"{'abTEM once per (structure, defocus)':<38}{t_base:>10.2f}{n_images / t_base:>12.3f}")
    print(f"speed-up {t_base / t_ours:.2f}x; max |difference| {max_diff:.2e} (vacuum = 1)")
    if json_path:
        write_json(json_path, result)
    return result
