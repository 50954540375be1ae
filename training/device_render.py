"""Training samples rendered on the training device (a GPU), for when CPU rendering would leave
it idle: the same draws as :class:`training.library_data.MicroscopeDataset` (optics, views and
doses from (seed, epoch, structure)) and the same physics -- CTF from
:meth:`OpticsDraw.chi_coefficients` on the cached angle grid, bilinear 2 × 2 sub-pixel views,
the camera's Gaussian blur (edges repeated), disk labels of the nearest projected column and
Gaussian loss weights around the column centres -- as batched torch operations. Tests hold it
equal to the CPU path. Smoothed-label rings (``ring_width_pm`` > 0) are CPU-only.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from sim_source.hrtem import BINNING
from sim_source.labels import COLUMN_RADIUS_A
from sim_source.microscope import OpticsDraw, View, angular_grid, project_columns, view_frame
from training.labels import TargetConfig
from training.library_data import MicroscopeDataset, RenderConfig, WaveLibrary


@lru_cache(maxsize=4)
def _grid_on(device: str, gpts: tuple[int, int], sampling_A: float, wavelength_A: float):
    g = angular_grid(gpts, sampling_A, wavelength_A)
    return tuple(torch.from_numpy(a).to(device) for a in (g.alpha, g.basis, g.edge))


def ctf_kernel(
    optics: OpticsDraw, gpts: tuple[int, int], sampling_A: float, device
) -> torch.Tensor:
    """:meth:`OpticsDraw.kernel` as a complex64 tensor computed on ``device``."""
    alpha, basis, edge = _grid_on(str(device), gpts, sampling_A, optics.wavelength_A)
    coefficients = torch.from_numpy(optics.chi_coefficients()).to(basis)
    chi = torch.tensordot(coefficients, basis, dims=1)
    amplitude = torch.exp(-optics.envelope_coefficient() * basis[5])
    if optics.aperture_mrad is not None:
        aperture = ((optics.aperture_mrad * 1e-3 - alpha) / edge + 0.5).clamp(0.0, 1.0)
        aperture[0, 0] = 1.0
        amplitude = amplitude * aperture
    return torch.polar(amplitude.float(), -chi.float())


def _gaussian_taps(sigma_px: float) -> np.ndarray:
    """scipy.ndimage.gaussian_filter1d's weights (truncate 4)."""
    radius = int(4.0 * sigma_px + 0.5)
    x = np.arange(-radius, radius + 1)
    taps = np.exp(-0.5 * (x / sigma_px) ** 2)
    return taps / taps.sum()


def camera_blur(images: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Gaussian PSF of ``sigma_px`` on (K, 1, H, W) images, edges repeated ('nearest')."""
    if sigma_px <= 0:
        return images
    taps = torch.from_numpy(_gaussian_taps(sigma_px)).to(images)
    r = (len(taps) - 1) // 2
    out = torch.nn.functional.pad(images, (r, r, r, r), mode="replicate")
    out = torch.nn.functional.conv2d(out, taps.view(1, 1, 1, -1))
    return torch.nn.functional.conv2d(out, taps.view(1, 1, -1, 1))


class DeviceRenderer:
    """Renders structure i's views of an epoch on ``device``: :meth:`item` returns what
    ``MicroscopeDataset[i]`` does, as tensors on the device."""

    def __init__(
        self,
        library: WaveLibrary,
        render: RenderConfig,
        targets: TargetConfig,
        seed: int,
        device: torch.device,
    ):
        if targets.ring_width_pm:
            raise ValueError("rendering on the device needs ring_width_pm 0 (no label rings)")
        self.draws = MicroscopeDataset(library, render, targets, seed)
        self.library, self.targets, self.device = library, targets, device
        self.spectra = torch.fft.fft2(torch.from_numpy(library.waves).to(device))
        self.pixel_A = library.sampling_A * BINNING

    def set_epoch(self, epoch: int) -> None:
        self.draws.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.library)

    def item(self, i: int):
        optics, views, doses = self.draws.draws(i)
        lib = self.library
        kernel = ctf_kernel(optics, tuple(self.spectra.shape[1:]), lib.sampling_A, self.device)
        wave = torch.fft.ifft2(self.spectra[i] * kernel)
        image = wave.real**2 + wave.imag**2
        clean = camera_blur(self._sample(image, views), optics.mtf_sigma_px)
        labels = [self._labels(i, view) for view in views]
        depth, species, weights = (torch.stack(parts) for parts in zip(*labels))
        return (
            clean,
            depth.long(),
            species.long(),
            weights,
            torch.tensor(doses, dtype=torch.float32, device=self.device),
        )

    def _sample(self, image: torch.Tensor, views: list[View]) -> torch.Tensor:
        """(K, 1, c, c): each output pixel the mean of 2 × 2 bilinear sub-samples, as
        :func:`sim_source.microscope.sample_view`."""
        s, p = self.library.sampling_A, self.pixel_A
        n_rows, n_cols = image.shape
        size = views[0].size
        k = (torch.arange(size, device=self.device, dtype=torch.float64) - (size - 1) / 2) * p
        sub = torch.tensor([-p / 4, p / 4], device=self.device, dtype=torch.float64)
        u = (k[:, None, None, None] + sub[None, None, :, None]).expand(size, size, 2, 2)
        v = (k[None, :, None, None] + sub[None, None, None, :]).expand(size, size, 2, 2)
        grids = []
        for view in views:
            rot, centre = view_frame(view)
            rows = (centre[0] + rot[0, 0] * u + rot[0, 1] * v) / s
            cols = (centre[1] + rot[1, 0] * u + rot[1, 1] * v) / s
            grid = torch.stack([2 * cols / (n_cols - 1) - 1, 2 * rows / (n_rows - 1) - 1], dim=-1)
            grids.append(grid.reshape(size, size * 4, 2))
        grid_t = torch.stack(grids).float()
        images = image[None, None].expand(len(views), 1, n_rows, n_cols)
        out = torch.nn.functional.grid_sample(
            images, grid_t, mode="bilinear", padding_mode="border", align_corners=True
        )
        return out.view(len(views), 1, size, size, 4).mean(dim=-1)

    def _labels(self, i: int, view: View):
        """(depth uint8, species uint8, loss weights float32) (c, c) of one view, as
        :func:`sim_source.microscope.view_labels` and :func:`training.labels.make_targets`."""
        cols = project_columns(self.library.tables[i], self.library.sampling_A, view)
        n, dev = view.size, self.device
        depth = torch.zeros(n * n, dtype=torch.uint8, device=dev)
        species = torch.zeros(n * n, dtype=torch.uint8, device=dev)
        bg = self.targets.background_weight
        weights = torch.full((n * n,), bg, dtype=torch.float32, device=dev)
        if len(cols.rc):
            centres = torch.from_numpy(cols.rc).to(dev)
            dist = (_pixel_grid(n, str(dev)) - centres[None]).norm(dim=-1)  # (n², m) px
            nearest = dist.min(dim=1)
            hit = nearest.values < COLUMN_RADIUS_A / self.pixel_A
            atoms = torch.from_numpy(cols.atoms.astype(np.uint8)).to(dev)
            codes = torch.from_numpy(cols.codes.astype(np.uint8)).to(dev)
            depth[hit], species[hit] = atoms[nearest.indices[hit]], codes[nearest.indices[hit]]
            if cols.inside.any():
                sigma = self.targets.weight_sigma_pm / (self.pixel_A * 100)
                d = dist[:, torch.from_numpy(cols.inside).to(dev)].min(dim=1).values
                weights = (bg + (1 - bg) * torch.exp(-0.5 * (d / sigma) ** 2)).float()
        return depth.view(n, n), species.view(n, n), weights.view(n, n)


@lru_cache(maxsize=4)
def _pixel_grid(n: int, device: str) -> torch.Tensor:
    """(n², 1, 2) (row, col) of every pixel of an n × n view, on ``device``."""
    r = torch.arange(n, device=device)
    return torch.stack(torch.meshgrid(r, r, indexing="ij"), dim=-1).reshape(-1, 1, 2)


class DeviceBatches:
    """Batches of ``items`` structures' views from a :class:`DeviceRenderer`, in a shuffled
    order drawn from ``generator`` (the trainer reseeds it every epoch), as the DataLoader of
    the CPU path yields them."""

    def __init__(self, renderer: DeviceRenderer, items: int):
        self.renderer, self.items = renderer, items
        self.generator = torch.Generator()

    def __len__(self) -> int:
        """Full batches only, as the DataLoader's drop_last; one short batch when there are
        fewer structures than a batch holds."""
        return max(1, len(self.renderer) // self.items)

    def __iter__(self):
        order = torch.randperm(len(self.renderer), generator=self.generator).tolist()
        for start in range(0, len(self) * self.items, self.items):
            parts = [self.renderer.item(i) for i in order[start : start + self.items]]
            yield tuple(torch.cat(p) for p in zip(*parts))
