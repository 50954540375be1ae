"""A new microscope for every training sample: optics, orientation, camera and dose drawn on the
fly and applied to a stored exit wave (the multislice is the expensive part and is done once per
structure, :mod:`wave_library`).

Optics follow abTEM's polar aberration convention (Å, radians); ``C10_A`` = +10·defocus_nm as in
:mod:`hrtem` (positive with C3 < 0 gives bright O columns). Partial coherence is abTEM's
quasi-coherent focal-spread envelope and a soft objective aperture (None = no aperture). The
CTF is abTEM's, written out in numpy (:meth:`OpticsDraw.kernel`), so that training renders
need no abTEM (a GPU machine without it); a test holds the two equal.

A *view* is a square crop of ``size`` output pixels of p = 2·sampling (the 2 × 2 binning of
:mod:`hrtem`, done here by averaging four bilinear samples per output pixel), centred at
(x0, y0) Å of the simulated field, turned by ``angle_deg`` and optionally mirrored: output
pixel (r, c) has local coordinates (u, v) = ((r − (size−1)/2)·p, ±(c − (size−1)/2)·p) and sits at
(x, y) = (x0, y0) + R(angle)·(u, v). Labels are drawn from the column table through the same
map, so they are exact at any angle. The camera is a Gaussian point-spread of ``mtf_sigma_px``
output pixels (the counting detector's MTF beyond the pixel aperture).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from scipy import constants
from scipy import fft as sfft
from scipy.ndimage import gaussian_filter, map_coordinates
from scipy.spatial import cKDTree

from sim_source.hrtem import BINNING
from sim_source.labels import COLUMN_RADIUS_A
from sim_source.structure import ColumnTable


@dataclass(frozen=True)
class OpticsDraw:
    """One microscope: aberrations (Å, rad), partial coherence, camera MTF, voltage."""

    C10_A: float = 50.0
    C12_A: float = 0.0
    phi12_rad: float = 0.0
    C21_A: float = 0.0
    phi21_rad: float = 0.0
    C3_um: float = -9.0
    C5_mm: float = 5.0
    focal_spread_A: float = 20.0
    aperture_mrad: float | None = 40.0
    mtf_sigma_px: float = 0.0
    voltage_kV: float = 300.0

    @property
    def wavelength_A(self) -> float:
        """Relativistic electron wavelength (Å) at ``voltage_kV``."""
        e = self.voltage_kV * 1e3 * constants.e
        mc2 = constants.m_e * constants.c**2
        return constants.h * constants.c / np.sqrt(e * (e + 2 * mc2)) * 1e10

    def chi_coefficients(self) -> np.ndarray:
        """(7,) weights of the phase χ (rad) on the basis of :class:`AngularGrid`: χ = 2π/λ·[α²/2
        (C10 + C12 cos 2(φ−φ12)) + α³/3·C21 cos(φ−φ21) + α⁴/4·C30 + α⁶/6·C50]."""
        c2, s2 = np.cos(2 * self.phi12_rad), np.sin(2 * self.phi12_rad)
        c1, s1 = np.cos(self.phi21_rad), np.sin(self.phi21_rad)
        weights = [
            self.C10_A / 2,
            self.C12_A * c2 / 2,
            self.C12_A * s2 / 2,
            self.C21_A * c1 / 3,
            self.C21_A * s1 / 3,
            self.C3_um * 1e4 / 4,
            self.C5_mm * 1e7 / 6,
        ]
        return np.array(weights) * (2 * np.pi / self.wavelength_A)

    def envelope_coefficient(self) -> float:
        """c of the focal-spread envelope exp(−c·α⁴), c = (π·Δ/(2λ))² (0: coherent)."""
        return float((0.5 * np.pi / self.wavelength_A * self.focal_spread_A) ** 2)

    def kernel(self, gpts: tuple[int, int], sampling_A: float) -> np.ndarray:
        """The CTF (gpts) complex64 in FFT order: exp(−iχ) (:meth:`chi_coefficients`), the
        quasi-coherent focal-spread envelope and a soft aperture edge one angular pixel wide
        -- abTEM's CTF(soft=True) term for term (tests hold them equal), in numpy so that
        images render without abTEM. The angle grid is cached: a draw costs its arithmetic."""
        g = angular_grid(tuple(gpts), float(sampling_A), self.wavelength_A)
        chi = np.tensordot(self.chi_coefficients(), g.basis, axes=1)
        amplitude = np.exp(-self.envelope_coefficient() * g.basis[5])
        if self.aperture_mrad is not None:
            aperture = np.clip((self.aperture_mrad * 1e-3 - g.alpha) / g.edge + 0.5, 0.0, 1.0)
            aperture[0, 0] = 1.0
            amplitude *= aperture
        kernel = np.empty(chi.shape, np.complex64)
        kernel.real = amplitude * np.cos(chi)
        kernel.imag = -amplitude * np.sin(chi)
        return kernel

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AngularGrid:
    """Scattering angle α (rad) of an FFT grid, the basis χ is a sum over (α², α² cos 2φ,
    α² sin 2φ, α³ cos φ, α³ sin φ, α⁴, α⁶; (7, *gpts)) and the soft aperture's edge width
    (rad) along each direction."""

    alpha: np.ndarray
    basis: np.ndarray
    edge: np.ndarray


@lru_cache(maxsize=4)
def angular_grid(gpts: tuple[int, int], sampling_A: float, wavelength_A: float) -> AngularGrid:
    """The (cached) :class:`AngularGrid` of a gpts grid at sampling_A for wavelength_A."""
    kx = np.fft.fftfreq(gpts[0], sampling_A)
    ky = np.fft.fftfreq(gpts[1], sampling_A)
    alpha = np.sqrt(kx[:, None] ** 2 + ky[None] ** 2) * wavelength_A
    phi = np.arctan2(ky[None], kx[:, None])
    cos, sin = np.cos(phi), np.sin(phi)
    step = (wavelength_A / (gpts[0] * sampling_A), wavelength_A / (gpts[1] * sampling_A))
    edge = np.hypot(cos * step[0], sin * step[1])  # one angular pixel, rad
    edge[0, 0] = 1.0
    a2, a3 = alpha**2, alpha**3
    basis = np.stack(
        [a2, a2 * np.cos(2 * phi), a2 * np.sin(2 * phi), a3 * cos, a3 * sin, a2**2, a2**3]
    )
    return AngularGrid(alpha, basis, edge)


@dataclass(frozen=True)
class OpticsRanges:
    """Ranges optics are drawn from, uniformly unless stated (issue #9's microscope):
    defocus 0-10 nm, focal spread 0-50 Å, aperture 25-60 mrad or none, C3 −15…−3 µm,
    C5 0-10 mm, two-fold astigmatism ≤ 2 nm and axial coma ≤ 100 nm at random angles,
    camera MTF σ 0-0.7 px."""

    defocus_nm: tuple[float, float] = (0.0, 10.0)
    focal_spread_A: tuple[float, float] = (0.0, 50.0)
    aperture_mrad: tuple[float, float] = (25.0, 60.0)
    no_aperture_probability: float = 0.25
    C3_um: tuple[float, float] = (-15.0, -3.0)
    C5_mm: tuple[float, float] = (0.0, 10.0)
    astigmatism_nm: tuple[float, float] = (0.0, 2.0)
    coma_nm: tuple[float, float] = (0.0, 100.0)
    mtf_sigma_px: tuple[float, float] = (0.0, 0.7)

    def draw(self, rng: np.random.Generator) -> OpticsDraw:
        return OpticsDraw(
            C10_A=10 * rng.uniform(*self.defocus_nm),
            C12_A=10 * rng.uniform(*self.astigmatism_nm),
            phi12_rad=rng.uniform(0, np.pi),
            C21_A=10 * rng.uniform(*self.coma_nm),
            phi21_rad=rng.uniform(0, 2 * np.pi),
            C3_um=rng.uniform(*self.C3_um),
            C5_mm=rng.uniform(*self.C5_mm),
            focal_spread_A=rng.uniform(*self.focal_spread_A),
            aperture_mrad=(
                None
                if rng.random() < self.no_aperture_probability
                else rng.uniform(*self.aperture_mrad)
            ),
            mtf_sigma_px=rng.uniform(*self.mtf_sigma_px),
        )


@dataclass(frozen=True)
class View:
    """Where and how a crop is taken: centre (Å), in-plane angle (deg), mirror, size (px)."""

    x0_A: float
    y0_A: float
    angle_deg: float = 0.0
    mirror: bool = False
    size: int = 128


def draw_view(
    rng: np.random.Generator,
    field_A: float,
    pixel_A: float,
    size: int,
    angles_deg: tuple[float, float] = (0.0, 360.0),
    mirror_probability: float = 0.5,
) -> View:
    """A random view whose turned crop stays inside the field (centre drawn uniformly)."""
    radius = size * pixel_A / np.sqrt(2) + pixel_A
    if 2 * radius >= field_A:
        raise ValueError(
            f"a {size}-px crop at {pixel_A * 100:.2f} pm/px does not fit a "
            f"{field_A:.1f} Å field at every angle"
        )
    x0, y0 = rng.uniform(radius, field_A - radius, 2)
    return View(
        float(x0),
        float(y0),
        float(rng.uniform(*angles_deg)),
        bool(rng.random() < mirror_probability),
        size,
    )


def intensity(wave: np.ndarray, sampling_A: float, optics: OpticsDraw) -> np.ndarray:
    """Image intensity (float32, vacuum ≈ 1) of an exit wave through the optics' CTF."""
    kernel = optics.kernel(wave.shape, sampling_A)
    out = sfft.ifft2(sfft.fft2(wave) * kernel)
    return (out.real**2 + out.imag**2).astype(np.float32)


def view_frame(view: View) -> tuple[np.ndarray, np.ndarray]:
    """(rotation·mirror matrix mapping local (u, v) to field (x, y), centre (x0, y0))."""
    a = np.radians(view.angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    if view.mirror:
        rot = rot @ np.diag([1.0, -1.0])
    return rot, np.array([view.x0_A, view.y0_A])


def sample_view(image: np.ndarray, sampling_A: float, view: View) -> np.ndarray:
    """The view's crop of a simulated-grid image: each output pixel the mean of its 2 × 2
    simulated sub-pixels (bilinear), as the binning of :mod:`hrtem`."""
    pixel = sampling_A * BINNING
    rot, centre = view_frame(view)
    k = (np.arange(view.size) - (view.size - 1) / 2) * pixel
    sub = np.array([-pixel / 4, pixel / 4])
    u = (k[:, None, None, None] + sub[None, None, :, None]) * np.ones((1, view.size, 1, 2))
    v = (k[None, :, None, None] + sub[None, None, None, :]) * np.ones((view.size, 1, 2, 1))
    x = centre[0] + rot[0, 0] * u + rot[0, 1] * v
    y = centre[1] + rot[1, 0] * u + rot[1, 1] * v
    values = map_coordinates(
        image, [x.ravel() / sampling_A, y.ravel() / sampling_A], order=1, mode="grid-wrap"
    )
    return values.reshape(view.size, view.size, 4).mean(axis=2).astype(np.float32)


@dataclass
class ViewLabels:
    """Label maps of a view: ``depth``/``species`` (H, W) uint8 and the columns inside it,
    ``centres`` (n, 2) (row, col) px with ``species`` and ``depth``."""

    depth: np.ndarray
    species: np.ndarray
    centres: np.ndarray
    column_species: np.ndarray
    column_depth: np.ndarray


@dataclass
class ProjectedColumns:
    """The columns whose label disks can reach a view: ``rc`` (m, 2) (row, col) px in the view,
    their ``atoms`` and species ``codes``, and which lie ``inside`` the view's pixels."""

    rc: np.ndarray
    atoms: np.ndarray
    codes: np.ndarray
    inside: np.ndarray


def project_columns(
    table: ColumnTable, sampling_A: float, view: View, radius_A: float = COLUMN_RADIUS_A
) -> ProjectedColumns:
    """The occupied columns of ``table`` through the view's map, kept where a disk of
    ``radius_A`` around them can touch the view."""
    pixel = sampling_A * BINNING
    rot, centre = view_frame(view)
    present = table.n_atoms > 0
    xy = np.stack([table.x_A[present], table.y_A[present]], axis=1) - centre
    local = xy @ rot  # rot is orthogonal: (x − x0) = rot·(u, v) ⇒ (u, v) = rotᵀ·(x − x0)
    n = view.size
    rc = local / pixel + (n - 1) / 2
    near = np.all((rc > -radius_A / pixel - 1) & (rc < n + radius_A / pixel), axis=1)
    inside = np.all((rc[near] > -0.5) & (rc[near] < n - 0.5), axis=1)
    return ProjectedColumns(
        rc[near], table.n_atoms[present][near], table.species[present][near], inside
    )


def view_labels(
    table: ColumnTable, sampling_A: float, view: View, radius_A: float = COLUMN_RADIUS_A
) -> ViewLabels:
    """Exact labels (disks of ``radius_A`` around each projected column, nearest column wins)
    of the view, from the column table through the view's map."""
    cols = project_columns(table, sampling_A, view, radius_A)
    n = view.size
    depth = np.zeros(n * n, np.uint8)
    species = np.zeros(n * n, np.uint8)
    if len(cols.rc):
        rows, cc = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        dist, nearest = cKDTree(cols.rc).query(
            np.stack([rows.ravel(), cc.ravel()], axis=1),
            distance_upper_bound=radius_A / (sampling_A * BINNING),
        )
        hit = np.isfinite(dist)
        depth[hit], species[hit] = cols.atoms[nearest[hit]], cols.codes[nearest[hit]]
    return ViewLabels(
        depth.reshape(n, n),
        species.reshape(n, n),
        cols.rc[cols.inside],
        cols.codes[cols.inside].astype(np.uint8),
        cols.atoms[cols.inside].astype(np.uint8),
    )


def camera(clean: np.ndarray, optics: OpticsDraw) -> np.ndarray:
    """The detector's blur (Gaussian PSF of ``mtf_sigma_px``) on a clean output image."""
    if optics.mtf_sigma_px <= 0:
        return clean
    return gaussian_filter(clean, optics.mtf_sigma_px, mode="nearest").astype(np.float32)
