"""Training-set files: random surface models → HRTEM images + depth/species labels (HDF5).

Images come in groups of ``defocus_per_structure`` images of one structure (one exit wave,
one CTF per defocus). Everything drawn for group g comes from ``SeedSequence([seed, g])`` and
for image i's defocus from ``SeedSequence([seed, i, 1])``, so a file is a pure function of its
config: a resumed run writes the same bytes as an uninterrupted one. Layout: "Dataset file" in
docs/CONTRACTS.md. Images are written in index order; ``n_complete`` counts the finished
prefix, so an interrupted file is valid and ``resume`` continues it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm import tqdm

from sim_source.hrtem import Optics, check_output_size, configure_abtem, exit_wave, image, make_grid
from sim_source.labels import COLUMN_RADIUS_A, label_maps
from sim_source.structure import StructureConfig, build_columns

log = logging.getLogger(__name__)

AXIS_CONVENTION = (
    "arrays are [image, row, col]; row = crystal x = [1-10] (surface normal, vacuum toward "
    "row 0), col = crystal y = [001], beam along [110]; column tables: x_px = col, y_px = row, "
    "pixel (r, c) is centred at crystal ((r + 0.25) p, (c + 0.25) p + y0) Å with "
    "p = pixel_size_pm / 100"
)
COLUMN_DTYPE = np.dtype(
    [("image", "<i4"), ("x_px", "<f4"), ("y_px", "<f4"), ("species", "u1"), ("depth", "u1")]
)
PAPER_TRAIN, PAPER_VALIDATION = 7000, 2000


@dataclass(frozen=True)
class DatasetConfig:
    """What a dataset file is a function of (saved as the ``config`` JSON attribute).
    ``size``: output pixels per side (≈ 5.3 pm/px)."""

    count: int = 8
    size: int = 512
    seed: int = 0
    defocus_per_structure: int = 4
    optics: Optics = field(default_factory=Optics)
    structure: StructureConfig = field(default_factory=StructureConfig)

    def __post_init__(self) -> None:
        check_output_size(self.size)  # before any file is written

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @property
    def n_groups(self) -> int:
        return -(-self.count // self.defocus_per_structure)

    def group_images(self, group: int) -> range:
        k = self.defocus_per_structure
        return range(group * k, min((group + 1) * k, self.count))


@dataclass
class ImageRecord:
    index: int
    image: np.ndarray
    depth: np.ndarray
    species: np.ndarray
    columns: np.ndarray  # COLUMN_DTYPE
    defocus_nm: float
    structure: dict


def simulate_group(cfg: DatasetConfig, group: int) -> list[ImageRecord]:
    """The images of structure ``group`` (deterministic in cfg and group)."""
    configure_abtem()
    grid = make_grid(cfg.size)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, group]))
    table, params = build_columns(
        rng, grid.fov_A, grid.n_cells_y, grid.crystal_end_x_A, cfg.structure
    )
    labels = label_maps(table, grid)
    wave = exit_wave(table, grid, cfg.optics)
    out = []
    for i in cfg.group_images(group):
        lo, hi = cfg.optics.defocus_nm
        defocus = float(
            np.random.default_rng(np.random.SeedSequence([cfg.seed, i, 1])).uniform(lo, hi)
        )
        cols = np.zeros(len(labels.x_px), COLUMN_DTYPE)
        cols["image"], cols["x_px"], cols["y_px"] = i, labels.x_px, labels.y_px
        cols["species"], cols["depth"] = labels.column_species, labels.column_depth
        out.append(
            ImageRecord(
                i,
                image(wave, grid, defocus, cfg.optics),
                labels.depth,
                labels.species,
                cols,
                defocus,
                dict(asdict(params), structure_index=group),
            )
        )
    return out


def _versions() -> str:
    import abtem
    import ase

    return json.dumps(
        {
            "abtem": abtem.__version__,
            "ase": ase.__version__,
            "numpy": np.__version__,
            "h5py": h5py.__version__,
        }
    )


class DatasetWriter:
    """Creates (or reopens for resume) a dataset file and appends images in index order."""

    def __init__(self, path: str | Path, cfg: DatasetConfig, resume: bool = False):
        self.path, self.cfg = Path(path), cfg
        n, s = cfg.count, cfg.size
        if resume and self.path.exists():
            self.f = h5py.File(self.path, "r+")
            saved = self.f.attrs.get("config")
            if saved != cfg.to_json():
                self.f.close()
                raise ValueError(
                    f"{self.path} was written with another config; resume needs "
                    f"the same --count/--size/--seed/--preset.\n saved: {saved}"
                )
            self.n_complete = int(self.f.attrs["n_complete"])
            cols = self.f["columns"]
            keep = int(np.searchsorted(cols["image"][:], self.n_complete)) if len(cols) else 0
            cols.resize(keep, axis=0)
            return
        if self.path.exists() and not resume:
            log.info("overwriting %s", self.path)
        self.f = h5py.File(self.path, "w")
        self.n_complete = 0
        grid = make_grid(s)
        f, o = self.f, cfg.optics
        f.create_dataset("images", (n, s, s), "f4", chunks=(1, s, s)).attrs["units"] = (
            "intensity, vacuum = 1"
        )
        for name, units in (("depth", "atoms"), ("species", "0 background, 1 Ce, 2 O")):
            f.create_dataset(
                name, (n, s, s), "u1", chunks=(1, s, s), compression="gzip", compression_opts=1
            ).attrs["units"] = units
        f.create_dataset("columns", (0,), COLUMN_DTYPE, maxshape=(None,), chunks=(4096,))
        for name, dt, units in (
            ("defocus_nm", "f4", "nm (C10 = +defocus)"),
            ("structure_index", "i4", "1"),
            ("shape", "S8", "flat | sawtooth | stepped"),
            ("thickness_atoms", "u1", "atoms (bulk)"),
            ("wedge_width_A", "f4", "Å"),
            ("surface_x_A", "f4", "Å"),
        ):
            f.create_dataset(name, (n,), dt).attrs["units"] = units
        a = f.attrs
        a.update(
            dict(
                pixel_size_pm=grid.pixel_size_pm,
                voltage_kV=o.voltage_kV,
                C3_um=o.C3_um,
                C5_mm=o.C5_mm,
                focal_spread_A=o.focal_spread_A,
                aperture_mrad=o.aperture_mrad,
                seed=cfg.seed,
                count=n,
                size=s,
                column_radius_A=COLUMN_RADIUS_A,
                crop_y0_A=grid.crop_y0 * grid.sampling_A,
                simulation_gpts=grid.gpts,
                simulation_sampling_pm=grid.sampling_A * 100,
                axis_convention=AXIS_CONVENTION,
                defocus_convention=(
                    "defocus_nm = C10/10; positive with C3 < 0 gives bright O columns; "
                    "abTEM's defocus = -C10"
                ),
                versions=_versions(),
                config=cfg.to_json(),
                n_complete=0,
            )
        )

    def write(self, rec: ImageRecord) -> None:
        """Write the next image (must be index ``n_complete``) and advance ``n_complete``."""
        if rec.index != self.n_complete:
            raise ValueError(f"image {rec.index} written out of order (expected {self.n_complete})")
        f, i = self.f, rec.index
        f["images"][i], f["depth"][i], f["species"][i] = rec.image, rec.depth, rec.species
        cols = f["columns"]
        cols.resize(len(cols) + len(rec.columns), axis=0)
        cols[len(cols) - len(rec.columns) :] = rec.columns
        f["defocus_nm"][i] = rec.defocus_nm
        for key in ("structure_index", "shape", "thickness_atoms", "wedge_width_A", "surface_x_A"):
            f[key][i] = rec.structure[key]
        self.n_complete = i + 1
        f.attrs["n_complete"] = self.n_complete
        f.flush()

    def close(self) -> None:
        self.f.close()


Runner = Callable[[DatasetConfig, list[int]], Iterator[list[ImageRecord]]]


def run_inline(cfg: DatasetConfig, groups: list[int]) -> Iterator[list[ImageRecord]]:
    """Groups one after the other in this process (abTEM's own threads)."""
    for g in groups:
        yield simulate_group(cfg, g)


def clean_images(cfg: DatasetConfig) -> np.ndarray:
    """The clean images (count, size, size) float32 of ``cfg``, vacuum = 1, in memory (no
    file): calibration and benchmark frames."""
    groups = run_inline(cfg, list(range(cfg.n_groups)))
    return np.stack([r.image for records in groups for r in records])


def run_dask(client, task: Callable = simulate_group) -> Callable:
    """``task(cfg, index)`` for every index as tasks on a ``distributed`` client (default: the
    structure groups of a dataset); results yielded as they finish."""

    def run(cfg, indices: list[int]) -> Iterator:
        from distributed import as_completed

        futures = [client.submit(task, cfg, g, pure=False) for g in indices]
        try:
            for fut in as_completed(futures):
                yield fut.result()
        finally:
            client.cancel(futures)

    return run


def write_dataset(
    path: str | Path,
    cfg: DatasetConfig,
    runner: Runner = run_inline,
    resume: bool = False,
    progress: bool = True,
    interrupted: Callable[[], bool] = lambda: False,
) -> int:
    """Simulate the images not yet in ``path`` and write them; returns ``n_complete``.

    Results arriving out of order wait in memory until the prefix reaches them. On any
    exception (Ctrl-C included) the file is closed valid, holding the finished prefix, and
    the exception propagates. ``interrupted`` is polled after each structure: when true,
    KeyboardInterrupt is raised there (a Ctrl-C that landed where Python ignores exceptions,
    e.g. in a weakref callback, still stops the run)."""
    writer = DatasetWriter(path, cfg, resume)
    groups = list(range(writer.n_complete // cfg.defocus_per_structure, cfg.n_groups))
    return append_in_order(writer, runner(cfg, groups), cfg.count, "img", progress, interrupted)


def append_in_order(
    writer,
    batches: Iterable[Iterable],
    total: int,
    unit: str,
    progress: bool,
    interrupted: Callable[[], bool],
) -> int:
    """Write records (each with an ``index``) arriving in batches in any order through
    ``writer`` (``n_complete``, ``write``, ``close``) as a growing prefix; returns
    ``n_complete``. Out-of-order records wait in memory; on any exception the writer is
    closed with the finished prefix. ``interrupted`` is polled after each batch."""
    try:
        pending: dict[int, Any] = {}
        with tqdm(
            total=total, initial=writer.n_complete, unit=unit, desc="simulate", disable=not progress
        ) as bar:
            for records in batches:
                pending.update({r.index: r for r in records if r.index >= writer.n_complete})
                while writer.n_complete in pending:
                    writer.write(pending.pop(writer.n_complete))
                    bar.update(1)
                if interrupted():
                    raise KeyboardInterrupt
        return writer.n_complete
    finally:
        writer.close()
