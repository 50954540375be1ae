"""Simulated in-situ sessions: one structure whose surface columns lose and regain atoms.

Each chosen O column (and Ce column, ``ce_events``) within ``event_depth_A`` of the outermost
layer of its species loses ``atoms_lost`` atoms during one time window; the first
``permanent`` of them never regain them. ``wedge_width_A`` > 0 thins the crystal toward the
surface (a thickness gradient). The defaults are the original flat session (3 O events of 2
atoms); :data:`EVALUATION` is one that a constant answer cannot pass.

Only a few occupancy states occur, so each distinct state is simulated once (exit wave + CTF
at one defocus); every frame is its state's clean image shifted by a smooth
sub-pixel drift (a random walk, px) and drawn as Poisson counts with vacuum mean = dose λ
(uint16). The ground truth (column table in frame-0 pixels, atoms per column per frame, drift)
is saved beside the frames: "Session file" in docs/CONTRACTS.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np
from scipy.ndimage import shift as nd_shift
from tqdm import tqdm

from sim_source.hrtem import Optics, check_output_size, configure_abtem, exit_wave, image, make_grid
from sim_source.labels import label_maps
from sim_source.structure import StructureConfig, build_columns, thermal_displacements
from streamer.domain import PAPER_DOSE_E_PER_PX

TRUTH_COLUMN_DTYPE = np.dtype([("id", "<i8"), ("x_px", "<f4"), ("y_px", "<f4"), ("species", "u1")])


@dataclass(frozen=True)
class SessionConfig:
    """A simulated session. ``dose_e_per_px``: mean counts of a vacuum pixel per frame;
    ``drift_step_px``: standard deviation of the per-frame drift step (px); ``events``: O
    columns (``ce_events``: Ce columns) that lose atoms for a window of 15-40 % of the
    session; event k loses ``atoms_lost`` atoms (a tuple: its k-th entry, cyclically), at most
    all but one; ``permanent``: the first events never end; ``event_depth_A``: how far (Å)
    behind the outermost column of its species an event column may lie;
    ``wedge_width_A``: thinning toward the surface over this width (Å; 0: flat);
    ``thermal``: atoms displaced by one frozen-phonon snapshot (RMS per species at room
    temperature, the same for every frame, as in the training libraries) instead of sitting on
    a static lattice."""

    frames: int = 120
    seed: int = 0
    size: int = 512
    dose_e_per_px: float = PAPER_DOSE_E_PER_PX
    frame_interval_s: float = 0.13
    defocus_nm: float = 5.0
    thickness_atoms: int = 6
    events: int = 3
    atoms_lost: int | tuple[int, ...] = 2
    drift_step_px: float = 0.15
    ce_events: int = 0
    permanent: int = 0
    event_depth_A: float = 0.0
    wedge_width_A: float = 0.0
    optics: Optics = field(default_factory=Optics)
    thermal: bool = True

    def __post_init__(self) -> None:
        check_output_size(self.size)  # before any file is written


@dataclass
class SessionTruth:
    columns: np.ndarray  # TRUTH_COLUMN_DTYPE, frame-0 pixels
    depth: np.ndarray  # (T, n_columns) uint8
    drift_px: np.ndarray  # (T, 2) float (dy, dx): frame t = frame 0 moved by drift
    state: np.ndarray  # (T,) index of the occupancy state
    events: list[dict]


def plan_session(cfg: SessionConfig):
    """Structure, grid, per-state column tables and the ground truth (no simulation yet)."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 7]))
    grid = make_grid(cfg.size)
    structure = StructureConfig(
        shapes=("flat",),
        thickness_atoms=(cfg.thickness_atoms,) * 2,
        wedge_width_A=(cfg.wedge_width_A,) * 2,
        surface_fraction=(0.3, 0.3),
        vacancy_probability=0.0,
    )
    table, _ = build_columns(rng, grid.fov_A, grid.n_cells_y, grid.crystal_end_x_A, structure)
    labels = label_maps(table, grid)
    margin = 0.1 * cfg.size
    inside = (labels.x_px > margin) & (labels.x_px < cfg.size - margin)

    def surface_columns(species: int) -> np.ndarray:
        cand = labels.index[inside & (labels.column_species == species)]
        cand = cand[table.n_atoms[cand] > 1]
        top = table.x_A[cand].min() if len(cand) else np.inf
        return cand[table.x_A[cand] <= top + max(cfg.event_depth_A, 1e-6)]

    surface_o = surface_columns(2)
    chosen = list(rng.choice(surface_o, size=min(cfg.events, len(surface_o)), replace=False))
    if cfg.ce_events:
        surface_ce = surface_columns(1)
        chosen += list(
            rng.choice(surface_ce, size=min(cfg.ce_events, len(surface_ce)), replace=False)
        )
    sizes = np.atleast_1d(cfg.atoms_lost)
    t = cfg.frames
    windows = []
    for k, col in enumerate(chosen):
        length = max(1, int(rng.uniform(0.15, 0.4) * t))
        start = int(rng.integers(1, max(2, t - length)))
        end = t if k < cfg.permanent else min(t, start + length)
        n_lost = min(int(sizes[k % len(sizes)]), int(table.n_atoms[col]) - 1)
        windows.append((int(col), start, end, n_lost))
    lost = np.zeros((t, len(windows)), bool)
    for k, (_, a, b, _) in enumerate(windows):
        lost[a:b, k] = True
    states, state_of = np.unique(lost, axis=0, return_inverse=True)
    tables = []
    for row in states:
        tab = table
        for (col, _, _, n_lost), on in zip(windows, row):
            if on:
                tab = tab.with_atoms_removed(col, n_lost)
        tables.append(tab)
    ids = np.arange(len(labels.index))
    columns = np.zeros(len(ids), TRUTH_COLUMN_DTYPE)
    columns["id"], columns["x_px"], columns["y_px"] = ids, labels.x_px, labels.y_px
    columns["species"] = labels.column_species
    depth = np.stack([tables[s].n_atoms[labels.index] for s in state_of.ravel()]).astype(np.uint8)
    steps = rng.normal(0, cfg.drift_step_px, (t, 2))
    steps[0] = 0
    drift = np.cumsum(steps, axis=0)
    events = [
        dict(
            column_id=int(np.flatnonzero(labels.index == c)[0]),
            start_frame=a,
            end_frame=b,
            atoms_lost=n_lost,
            species=int(table.species[c]),
        )
        for c, a, b, n_lost in windows
    ]
    truth = SessionTruth(columns, depth, drift, state_of.ravel(), events)
    return grid, tables, truth


#: a session a constant answer cannot pass: thickness gradient (O columns of 3-7 atoms),
#: 1- and 2-atom events on 5 O and 2 Ce columns near the surface, one never regained.
EVALUATION = SessionConfig(
    frames=80,
    size=384,
    thickness_atoms=7,
    wedge_width_A=14.0,
    events=5,
    ce_events=2,
    atoms_lost=(2, 1),
    permanent=1,
    event_depth_A=4.0,
)


def write_session(path: str | Path, cfg: SessionConfig, progress: bool = True) -> SessionTruth:
    """Simulate and write a session file; returns its ground truth."""
    if cfg.dose_e_per_px <= 0:
        raise ValueError("dose must be > 0")
    configure_abtem()
    grid, tables, truth = plan_session(cfg)
    snapshot = (
        thermal_displacements(
            tables[0], int(np.random.SeedSequence([cfg.seed, 9]).generate_state(1)[0])
        )
        if cfg.thermal
        else None
    )
    clean = [
        image(exit_wave(tab, grid, cfg.optics, snapshot), grid, cfg.defocus_nm, cfg.optics)
        for tab in tqdm(tables, desc="states", unit="state", disable=not progress)
    ]
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 8]))
    with h5py.File(path, "w") as f:
        frames = f.create_dataset(
            "frames", (cfg.frames, cfg.size, cfg.size), "u2", chunks=(1, cfg.size, cfg.size)
        )
        frames.attrs["units"] = "counts"
        for i in tqdm(range(cfg.frames), desc="frames", unit="frame", disable=not progress):
            moved = nd_shift(clean[truth.state[i]], truth.drift_px[i], order=1, mode="nearest")
            counts = rng.poisson(cfg.dose_e_per_px * np.clip(moved, 0, None))
            frames[i] = np.clip(counts, 0, np.iinfo(np.uint16).max)
        f.create_dataset("timestamps_s", data=np.arange(cfg.frames) * cfg.frame_interval_s).attrs[
            "units"
        ] = "s from the first frame"
        f.create_dataset("sequence", data=np.arange(cfg.frames, dtype=np.int64))
        g = f.create_group("truth")
        g.create_dataset("columns", data=truth.columns).attrs["units"] = "px (frame 0), 1 Ce 2 O"
        g.create_dataset("depth", data=truth.depth).attrs["units"] = "atoms"
        g.create_dataset("drift_px", data=truth.drift_px.astype(np.float32)).attrs["units"] = (
            "px (dy, dx): frame t shows frame 0 moved by this"
        )
        g.attrs["events"] = json.dumps(truth.events)
        o = cfg.optics
        f.attrs.update(
            dict(
                pixel_size_pm=grid.pixel_size_pm,
                dose_e_per_px=cfg.dose_e_per_px,
                frame_interval_s=cfg.frame_interval_s,
                session_id=f"sim-seed{cfg.seed}-{cfg.frames}x{cfg.size}",
                source="simulated",
                voltage_kV=o.voltage_kV,
                C3_um=o.C3_um,
                C5_mm=o.C5_mm,
                defocus_nm=cfg.defocus_nm,
                config=json.dumps(asdict(cfg), sort_keys=True),
            )
        )
    return truth
