"""Training samples rendered on the fly from an exit-wave library (sim_source.wave_library):
every sample gets its own microscope (optics drawn from :class:`OpticsRanges`), in-plane angle
over the full circle, mirror, crop position and dose λ (log-uniform), so no two epochs see the
same images. Randomness comes from (seed, epoch, structure), so runs are reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from sim_source.hrtem import BINNING
from sim_source.microscope import (
    OpticsDraw,
    OpticsRanges,
    View,
    camera,
    draw_view,
    intensity,
    sample_view,
    view_labels,
)
from sim_source.structure import ColumnTable
from sim_source.wave_library import is_library, read_waves
from streamer.domain import MAX_ATOMS
from training.data import LabelledSet, load_set
from training.labels import TargetConfig, make_targets
from training.model import file_sha256


@dataclass
class WaveLibrary:
    """A library file in memory: ``waves`` (N, n, n) complex64, one ColumnTable per structure."""

    waves: np.ndarray
    tables: list[ColumnTable]
    sampling_A: float
    seed: int
    sha256: str
    path: str

    @property
    def field_A(self) -> float:
        return self.waves.shape[1] * self.sampling_A

    @property
    def pixel_size_pm(self) -> float:
        return self.sampling_A * BINNING * 100

    def __len__(self) -> int:
        return len(self.waves)


def load_library(path: str | Path, limit: int | None = None) -> WaveLibrary:
    """Read the complete structures of a library file."""
    with h5py.File(path, "r") as f:
        n = int(f.attrs["n_complete"])
        if n == 0:
            raise ValueError(f"{path} holds no complete structure (n_complete = 0)")
        n = min(n, limit) if limit else n
        waves = read_waves(f, n)
        cols = f["columns"][:]
        sampling, seed = float(f.attrs["sampling_A"]), int(f.attrs["seed"])
    tables = []
    for s in range(n):
        c = cols[cols["structure"] == s]
        cells = np.arange(MAX_ATOMS)[None, :] < c["atoms"][:, None]
        tables.append(
            ColumnTable(
                c["x_A"].astype(np.float64),
                c["y_A"].astype(np.float64),
                c["species"],
                np.zeros(len(c)),
                cells,
            )
        )
    return WaveLibrary(waves, tables, sampling, seed, file_sha256(path), str(path))


@dataclass(frozen=True)
class RenderConfig:
    """How samples are drawn: ``dose`` log-uniform range (mean vacuum counts per pixel),
    ``angles_deg`` range of the in-plane turn, ``views_per_wave`` crops per optics draw."""

    crop: int = 128
    views_per_wave: int = 4
    dose: tuple[float, float] = (0.5, 10.0)
    angles_deg: tuple[float, float] = (0.0, 360.0)
    mirror_probability: float = 0.5
    optics: OpticsRanges = field(default_factory=OpticsRanges)


@dataclass
class Rendered:
    """One clean sample with its truth: image (H, W) float32 (vacuum ≈ 1), depth, species,
    centres (n, 2) (row, col) px with their species and atom counts, and what was drawn."""

    image: np.ndarray
    depth: np.ndarray
    species: np.ndarray
    centres: np.ndarray
    centre_species: np.ndarray
    column_depth: np.ndarray
    optics: OpticsDraw
    view: View
    #: the library's index of the structure shown
    structure: int = -1


def render_views(
    library: WaveLibrary, index: int, optics: OpticsDraw, views: list[View]
) -> list[Rendered]:
    """Structure ``index`` through one microscope, cropped as each view."""
    image = intensity(library.waves[index], library.sampling_A, optics)
    out = []
    for view in views:
        labels = view_labels(library.tables[index], library.sampling_A, view)
        clean = camera(sample_view(image, library.sampling_A, view), optics)
        out.append(
            Rendered(
                clean,
                labels.depth,
                labels.species,
                labels.centres,
                labels.column_species,
                labels.column_depth,
                optics,
                view,
                index,
            )
        )
    return out


def draw_dose(rng: np.random.Generator, dose: tuple[float, float]) -> float:
    """λ drawn log-uniformly in [lo, hi]."""
    return float(np.exp(rng.uniform(np.log(dose[0]), np.log(dose[1]))))


class MicroscopeDataset(torch.utils.data.Dataset):
    """Item i of an epoch: ``views_per_wave`` samples of structure i under one freshly drawn
    microscope: (clean (K,1,c,c), labels (K,c,c), species (K,c,c), weights (K,c,c), dose (K,)).
    Use :func:`collate_views` to flatten items into a batch."""

    def __init__(
        self, library: WaveLibrary, render: RenderConfig, targets: TargetConfig, seed: int
    ):
        self.library, self.render, self.targets, self.seed = library, render, targets, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.library)

    def draws(self, i: int) -> tuple[OpticsDraw, list[View], list[float]]:
        """What item i of this epoch draws: one microscope, its views, a dose per view."""
        rng = np.random.default_rng([self.seed, self.epoch, i])
        r, lib = self.render, self.library
        optics = r.optics.draw(rng)
        views = [
            draw_view(
                rng,
                lib.field_A,
                lib.sampling_A * BINNING,
                r.crop,
                r.angles_deg,
                r.mirror_probability,
            )
            for _ in range(r.views_per_wave)
        ]
        return optics, views, [draw_dose(rng, r.dose) for _ in views]

    def __getitem__(self, i: int):
        optics, views, doses = self.draws(i)
        lib = self.library
        samples = render_views(lib, i, optics, views)
        labels, weights = zip(
            *(make_targets(s.depth, s.centres, lib.pixel_size_pm, self.targets) for s in samples)
        )
        return (
            torch.from_numpy(np.stack([s.image for s in samples]))[:, None],
            torch.from_numpy(np.stack(labels).astype(np.int64)),
            torch.from_numpy(np.stack([s.species for s in samples]).astype(np.int64)),
            torch.from_numpy(np.stack(weights)),
            torch.tensor(doses, dtype=torch.float32),
        )


def collate_views(items):
    """Concatenate the K views of every item into one batch."""
    return tuple(torch.cat(parts) for parts in zip(*items))


def render_set(
    library: WaveLibrary,
    count: int,
    seed: int,
    render: RenderConfig,
    targets: TargetConfig,
    fixed_optics: OpticsDraw | None = None,
    with_rendered: bool = False,
):
    """A fixed labelled set of ``count`` clean samples (structures in turn, one microscope each,
    or ``fixed_optics`` for all) for validation and tests; noise is added by the caller.
    ``with_rendered``: return (set, the Rendered samples) instead."""
    rendered = []
    for k in range(count):
        rng = np.random.default_rng([seed, k])
        optics = fixed_optics or render.optics.draw(rng)
        view = draw_view(
            rng,
            library.field_A,
            library.sampling_A * BINNING,
            render.crop,
            render.angles_deg,
            render.mirror_probability,
        )
        rendered.extend(render_views(library, k % len(library), optics, [view]))
    data = labelled(rendered, library.pixel_size_pm, targets, library.sha256, library.path)
    return (data, rendered) if with_rendered else data


def labelled(
    rendered: list[Rendered], pixel_size_pm: float, targets: TargetConfig, sha256: str, path: str
) -> LabelledSet:
    """Rendered samples as a LabelledSet (what validation and evaluation read)."""
    depth = np.stack([s.depth for s in rendered])
    centres = [s.centres.astype(np.float64) for s in rendered]
    labels, weights = zip(
        *(make_targets(d, c, pixel_size_pm, targets) for d, c in zip(depth, centres))
    )
    return LabelledSet(
        np.stack([s.image for s in rendered]),
        depth,
        np.stack([s.species for s in rendered]),
        np.stack(labels),
        np.stack(weights),
        centres,
        [s.centre_species for s in rendered],
        pixel_size_pm,
        sha256,
        path,
    )


def load_or_render(
    path: str | Path, targets: TargetConfig, limit: int | None, seed: int, crop: int = 192
) -> LabelledSet:
    """An image dataset file as stored, or ``limit`` (default 64) samples rendered from an
    exit-wave library with microscopes drawn from the training ranges (any angle)."""
    if not is_library(path):
        return load_set(path, targets, limit)
    return render_set(load_library(path), limit or 64, seed, RenderConfig(crop=crop), targets)
