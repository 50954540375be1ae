"""Exit-wave libraries: one multislice per random faceted particle, stored for on-the-fly imaging.

A library file (HDF5) holds, per structure s, the complex exit wave ``waves[s]`` (n, n) of a unit
plane wave (vacuum ≈ 1) on a square field of ``field_A`` Å sampled at ``sampling_A``, and its
projected columns in ``columns`` (structure, x_A, y_A, species, atoms; crystal frame, Å; arrays
are [row, col] = [x, y] with sample (i, j) at (i, j)·sampling). Everything drawn for structure s
comes from ``SeedSequence([seed, s])``, so a file is a pure function of its config and a resumed
run writes the same bytes; ``n_complete`` counts the finished prefix. Optics, orientation,
camera and dose are applied later (:mod:`microscope`), so every epoch sees new microscopes.

A *band-limited* copy (:func:`write_band_limited`) stores instead of ``waves`` the centred
square block ``spectrum`` (n, m, m, 2) float16 of each wave's Fourier coefficients
(``fft2(wave, norm="forward")``, real and imaginary parts) up to ``band_limit_inv_A`` along each
axis: about 1/40 of the size, small enough to carry to a GPU machine. :func:`read_waves` turns
either form back into waves; the copy equals the original wherever the CTF (aperture or focal
spread envelope) is negligible beyond the band limit.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np
from scipy import fft as sfft

from sim_source.dataset import append_in_order
from sim_source.hrtem import TARGET_SAMPLING_PM, computed, configure_abtem
from sim_source.particle import ParticleConfig, build_particle, particle_atoms
from sim_source.structure import CELL_Z, ColumnTable

LIBRARY_KIND = "segdepth exit-wave library"
LIBRARY_COLUMN_DTYPE = np.dtype(
    [("structure", "<i4"), ("x_A", "<f4"), ("y_A", "<f4"), ("species", "u1"), ("atoms", "u1")]
)


@dataclass(frozen=True)
class LibraryConfig:
    """What a library is a function of. ``gpts``: simulated pixels per side (≈ 2.65 pm each)."""

    count: int = 8
    gpts: int = 768
    seed: int = 0
    voltage_kV: float = 300.0
    particle: ParticleConfig = field(default_factory=ParticleConfig)
    #: specimen tilt off the [110] zone axis, mrad: magnitude drawn uniformly in this range per
    #: structure, direction uniformly over the circle (:func:`draw_tilt`)
    tilt_mrad: tuple[float, float] = (0.0, 5.0)

    def __post_init__(self) -> None:
        lo, hi = self.tilt_mrad
        if not 0.0 <= lo <= hi:
            raise ValueError(f"tilt_mrad: give 0 <= LO <= HI mrad, got {lo:g} {hi:g}")

    @property
    def sampling_A(self) -> float:
        return TARGET_SAMPLING_PM / 100.0

    @property
    def field_A(self) -> float:
        return self.gpts * self.sampling_A

    def to_json(self) -> str:
        settings = asdict(self)
        if self.tilt_mrad == (0.0, 0.0):  # as written before tilt existed: those files stay valid
            del settings["tilt_mrad"]
        return json.dumps(settings, sort_keys=True)


@dataclass
class WaveRecord:
    index: int
    wave: np.ndarray
    columns: np.ndarray  # LIBRARY_COLUMN_DTYPE
    params: dict


def simulate_wave(cfg: LibraryConfig, index: int) -> WaveRecord:
    """Exit wave and columns of structure ``index`` (deterministic in cfg and index)."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, index]))
    particle = build_particle(rng, cfg.field_A, cfg.particle)
    atoms, slices = particle_atoms(particle, cfg.field_A, cfg.particle.thermal)
    tilt = draw_tilt(np.random.default_rng(np.random.SeedSequence([cfg.seed, index, 1])), cfg)
    wave = exit_wave(atoms, slices, cfg, tilt)
    table = particle.table
    shift = tilt_shift_A(table, tilt, sum(slices))
    cols = np.zeros(len(table), LIBRARY_COLUMN_DTYPE)
    cols["structure"], cols["x_A"], cols["y_A"] = index, table.x_A + shift[0], table.y_A + shift[1]
    cols["species"], cols["atoms"] = table.species, table.n_atoms
    params = {**particle.params, "tilt_mrad": [float(t) for t in tilt]}
    return WaveRecord(index, wave, cols, params)


def exit_wave(atoms, slices: tuple[float, ...], cfg: LibraryConfig, tilt_mrad) -> np.ndarray:
    """Complex64 (gpts, gpts) exit wave of a unit plane wave through ASE ``atoms`` cut into
    ``slices`` (Å), the specimen tilted by ``tilt_mrad`` (x, y)."""
    import abtem

    configure_abtem()
    potential = abtem.Potential(
        atoms,
        gpts=(cfg.gpts, cfg.gpts),
        slice_thickness=slices,
        projection="infinite",
        parametrization="lobato",
    )
    tilt = (float(tilt_mrad[0]), float(tilt_mrad[1]))
    wave = abtem.PlaneWave(energy=cfg.voltage_kV * 1e3, normalize=False, tilt=tilt)
    return computed(wave.multislice(potential)).astype(np.complex64)


def draw_tilt(rng: np.random.Generator, cfg: LibraryConfig) -> np.ndarray:
    """(tilt_x, tilt_y) mrad of one structure: magnitude uniform in ``cfg.tilt_mrad``, direction
    uniform over the circle (x, y: the library's array axes)."""
    magnitude = rng.uniform(*cfg.tilt_mrad)
    angle = rng.uniform(0.0, 2 * np.pi)
    return magnitude * np.array([np.cos(angle), np.sin(angle)])


def tilt_shift_A(table: ColumnTable, tilt_mrad: np.ndarray, thickness_A: float) -> np.ndarray:
    """(2, n_columns) Å where each column's image lies in the exit plane of a specimen tilted by
    ``tilt_mrad``, relative to its untilted projection: abTEM propagates a tilted wave by
    shifting it tan(tilt)·Δz laterally per slice, so an atom at depth z (Å below the entrance
    face) is seen shifted by tan(tilt)·(thickness − z); a column by that at its mean depth.
    ``thickness_A``: the whole potential's (crystal and any carbon film after it)."""
    rows, ks = np.nonzero(table.cells)
    z = ks * CELL_Z + table.z_offset_A[rows] + CELL_Z / 4  # as structure.to_atoms places them
    counts = np.bincount(rows, minlength=len(table))
    depth = np.bincount(rows, weights=z, minlength=len(table)) / np.maximum(counts, 1)
    depth[counts == 0] = thickness_A  # an empty site has no image to shift
    return np.tan(np.asarray(tilt_mrad, np.float64)[:, None] / 1e3) * (thickness_A - depth)


class LibraryWriter:
    """Creates (or reopens for resume) a library file and appends structures in index order."""

    def __init__(self, path: str | Path, cfg: LibraryConfig, resume: bool = False):
        self.path, self.cfg = Path(path), cfg
        if resume and self.path.exists():
            self.f = h5py.File(self.path, "r+")
            if self.f.attrs.get("config") != cfg.to_json():
                saved = self.f.attrs.get("config")
                self.f.close()
                raise ValueError(
                    f"{self.path} was written with another config; resume needs "
                    f"the same --count/--gpts/--seed.\n saved: {saved}"
                )
            self.n_complete = int(self.f.attrs["n_complete"])
            cols = self.f["columns"]
            cols.resize(int(np.searchsorted(cols["structure"][:], self.n_complete)), axis=0)
            return
        self.f = h5py.File(self.path, "w")
        self.n_complete = 0
        n, g = cfg.count, cfg.gpts
        self.f.create_dataset("waves", (n, g, g), "c8", chunks=(1, g, g)).attrs["units"] = (
            "exit wave of a unit plane wave (vacuum ≈ 1)"
        )
        self.f.create_dataset(
            "columns", (0,), LIBRARY_COLUMN_DTYPE, maxshape=(None,), chunks=(8192,)
        )
        self.f.create_dataset("params", (n,), h5py.string_dtype())
        self.f.attrs.update(
            dict(
                kind=LIBRARY_KIND,
                sampling_A=cfg.sampling_A,
                field_A=cfg.field_A,
                seed=cfg.seed,
                count=n,
                voltage_kV=cfg.voltage_kV,
                config=cfg.to_json(),
                n_complete=0,
            )
        )

    def write(self, rec: WaveRecord) -> None:
        if rec.index != self.n_complete:
            raise ValueError(
                f"structure {rec.index} written out of order (expected {self.n_complete})"
            )
        self.f["waves"][rec.index] = rec.wave
        self.f["params"][rec.index] = json.dumps(rec.params)
        cols = self.f["columns"]
        cols.resize(len(cols) + len(rec.columns), axis=0)
        cols[len(cols) - len(rec.columns) :] = rec.columns
        self.n_complete += 1
        self.f.attrs["n_complete"] = self.n_complete
        self.f.flush()

    def close(self) -> None:
        self.f.close()


Runner = Callable[[LibraryConfig, list[int]], Iterator[WaveRecord]]


def run_inline(cfg: LibraryConfig, indices: list[int]) -> Iterator[WaveRecord]:
    for i in indices:
        yield simulate_wave(cfg, i)


def write_library(
    path: str | Path,
    cfg: LibraryConfig,
    runner: Runner = run_inline,
    resume: bool = False,
    progress: bool = True,
    interrupted: Callable[[], bool] = lambda: False,
) -> int:
    """Simulate the structures not yet in ``path``; returns ``n_complete``. On any exception
    (Ctrl-C included) the file is closed valid with the finished prefix."""
    writer = LibraryWriter(path, cfg, resume)
    records = runner(cfg, list(range(writer.n_complete, cfg.count)))
    return append_in_order(writer, ([r] for r in records), cfg.count, "wave", progress, interrupted)


def band_block(gpts: int, sampling_A: float, k_max_inv_A: float) -> int:
    """Side m (odd) of the centred block of Fourier coefficients with |k| ≤ k_max per axis."""
    half = int(np.floor(k_max_inv_A * gpts * sampling_A))
    if not 0 < half < gpts // 2:
        raise ValueError(
            f"band limit {k_max_inv_A} 1/Å must lie inside (0, {0.5 / sampling_A:.1f}) 1/Å, "
            "the grid's Nyquist frequency"
        )
    return 2 * half + 1


def _band_window(gpts: int, m: int) -> tuple[slice, slice]:
    """The (rows, cols) slices of the centred m × m block of an fftshift-ed gpts spectrum."""
    c = gpts // 2
    window = slice(c - m // 2, c + m // 2 + 1)
    return window, window


def write_band_limited(src: str | Path, dst: str | Path, k_max_inv_A: float) -> int:
    """Copy library ``src`` to ``dst`` with each wave's spectrum cut to |kx|, |ky| ≤
    ``k_max_inv_A`` (1/Å) and stored as float16; returns the number of structures copied."""
    with h5py.File(src, "r") as f, h5py.File(dst, "w") as g:
        if "waves" not in f:
            raise ValueError(f"{src} holds no full waves (already band-limited?)")
        n, gpts = int(f.attrs["n_complete"]), f["waves"].shape[1]
        m = band_block(gpts, float(f.attrs["sampling_A"]), k_max_inv_A)
        spec = g.create_dataset(
            "spectrum", (n, m, m, 2), "f2", chunks=(1, m, m, 2), compression="gzip", shuffle=True
        )
        spec.attrs["units"] = "fft2(wave, norm='forward'), centred block, (real, imaginary)"
        window = _band_window(gpts, m)
        for s in range(n):
            block = np.fft.fftshift(np.fft.fft2(f["waves"][s], norm="forward"))[window]
            spec[s] = np.stack([block.real, block.imag], axis=-1).astype(np.float16)
        cols = f["columns"][:]
        g.create_dataset("columns", data=cols[cols["structure"] < n])
        g.create_dataset("params", data=f["params"][:n], dtype=h5py.string_dtype())
        g.attrs.update(dict(f.attrs))
        g.attrs.update(dict(n_complete=n, count=n, gpts=gpts, band_limit_inv_A=k_max_inv_A))
    return n


def read_waves(f: h5py.File, n: int) -> np.ndarray:
    """The first ``n`` exit waves (n, gpts, gpts) complex64 of an open library file, full or
    band-limited (zero beyond the band limit)."""
    if "waves" in f:
        return f["waves"][:n]
    gpts = int(f.attrs["gpts"])
    spec = f["spectrum"]
    window = _band_window(gpts, spec.shape[1])
    out = np.empty((n, gpts, gpts), np.complex64)
    padded = np.zeros((gpts, gpts), np.complex64)
    for s in range(n):
        block = spec[s].astype(np.float32)
        padded[window] = block[..., 0] + 1j * block[..., 1]
        out[s] = sfft.ifft2(sfft.ifftshift(padded), norm="forward", workers=-1)
    return out


def is_library(path: str | Path) -> bool:
    """True when ``path`` is an exit-wave library (not an image dataset)."""
    with h5py.File(path, "r") as f:
        return f.attrs.get("kind") == LIBRARY_KIND
