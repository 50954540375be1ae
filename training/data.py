"""Dataset files (docs/CONTRACTS.md "Dataset file") in memory, with the training targets, random
crops and flips, and fresh Poisson noise per epoch (continuous noise sampling, eq. 1).

Flips along rows ([1-10]) and columns ([001]) map the CeO2 [110] projection onto itself, so
they are the augmentations used; transposes are not (the two axes have different periods).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from sim_source.noise import add_poisson_noise
from training.labels import TargetConfig, make_targets
from training.model import file_sha256


def file_seed(path: str | Path) -> int | None:
    """The ``seed`` attribute of a simulated file (None when absent)."""
    with h5py.File(path, "r") as f:
        seed = f.attrs.get("seed")
    return None if seed is None else int(seed)


@dataclass
class LabelledSet:
    """A dataset file in memory: ``images`` (N,H,W) float32 clean (vacuum 1), ``depth`` and
    ``species`` (N,H,W) uint8, ``labels`` (smoothed) uint8, ``weights`` float32, ``centres``
    per image: (n,2) (row, col) px with ``centre_species`` (1 Ce, 2 O)."""

    images: np.ndarray
    depth: np.ndarray
    species: np.ndarray
    labels: np.ndarray
    weights: np.ndarray
    centres: list[np.ndarray]
    centre_species: list[np.ndarray]
    pixel_size_pm: float
    sha256: str
    path: str

    def __len__(self) -> int:
        return len(self.images)


def read_columns(f: h5py.File, n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-image (row, col) centres and species from the ``columns`` table (depth > 0 only)."""
    cols = f["columns"][:] if "columns" in f else np.zeros(0, [("image", "i4")])
    centres, species = [], []
    for i in range(n):
        c = cols[(cols["image"] == i) & (cols["depth"] > 0)] if len(cols) else cols
        centres.append(
            np.stack([c["y_px"], c["x_px"]], axis=1).astype(np.float64)
            if len(c)
            else np.zeros((0, 2))
        )
        species.append(c["species"].astype(np.uint8) if len(c) else np.zeros(0, np.uint8))
    return centres, species


def load_set(
    path: str | Path, targets: TargetConfig, limit: int | None = None, progress: bool = True
) -> LabelledSet:
    """Read the complete images of a dataset file and compute their training targets."""
    path = Path(path)
    with h5py.File(path, "r") as f:
        for key in ("images", "depth", "species"):
            if key not in f:
                raise ValueError(f"{path} has no '{key}' dataset: not a `segdepth simulate` file")
        n = int(f.attrs.get("n_complete", len(f["images"])))
        if n == 0:
            raise ValueError(f"{path} holds no complete image (n_complete = 0)")
        n = min(n, limit) if limit else n
        if "pixel_size_pm" not in f.attrs:
            raise ValueError(f"{path} has no pixel_size_pm attribute")
        pixel_size_pm = float(f.attrs["pixel_size_pm"])
        images = f["images"][:n].astype(np.float32)
        depth, species = f["depth"][:n], f["species"][:n]
        centres, centre_species = read_columns(f, n)
    labels = np.empty_like(depth)
    weights = np.empty(depth.shape, np.float32)
    for i in tqdm(range(n), desc=f"targets {path.name}", unit="img", disable=not progress):
        labels[i], weights[i] = make_targets(depth[i], centres[i], pixel_size_pm, targets)
    return LabelledSet(
        images,
        depth,
        species,
        labels,
        weights,
        centres,
        centre_species,
        pixel_size_pm,
        file_sha256(path),
        str(path),
    )


class CropDataset(torch.utils.data.Dataset):
    """One random crop (and random flips) of every image per epoch: (clean, labels, species,
    weights) tensors of shape (1,c,c), (c,c), (c,c), (c,c). ``crop`` None or ≥ size: whole image.
    Randomness comes from ``seed`` and the epoch (``set_epoch``), so runs are reproducible."""

    def __init__(self, data: LabelledSet, crop: int | None, seed: int, flips: bool = True):
        self.data, self.seed, self.flips = data, seed, flips
        h, w = data.images.shape[1:]
        self.crop = None if crop is None or crop >= min(h, w) else crop
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, self.epoch, i])
        d = self.data
        arrays = [d.images[i], d.labels[i], d.species[i], d.weights[i]]
        if self.crop:
            h, w = arrays[0].shape
            r, c = rng.integers(0, h - self.crop + 1), rng.integers(0, w - self.crop + 1)
            arrays = [a[r : r + self.crop, c : c + self.crop] for a in arrays]
        if self.flips:
            for axis in (0, 1):
                if rng.random() < 0.5:
                    arrays = [np.flip(a, axis) for a in arrays]
        image, labels, species, weights = (np.ascontiguousarray(a) for a in arrays)
        return (
            torch.from_numpy(image)[None],
            torch.from_numpy(labels.astype(np.int64)),
            torch.from_numpy(species.astype(np.int64)),
            torch.from_numpy(weights),
        )


def noisy(clean: torch.Tensor, noise_lambda: float, generator: torch.Generator) -> torch.Tensor:
    """Fresh shot noise of eq. 1 (sim_source.noise): Poisson(λ·c)/λ, same device and dtype."""
    return add_poisson_noise(clean, noise_lambda, generator)
