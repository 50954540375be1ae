"""Helpers shared by the engine, e2e, fault and demo tests (no tests here): a random model
file, session files, child processes and the command lines of the pipeline's processes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


def save_random_model(path: Path, seed: int = 0, **meta) -> Path:
    """A default SegDepthUNet with random weights, saved with training.model.save_model (with
    ``meta`` in its meta, e.g. a low ``temperature`` for answers far from uniform)."""
    model_mod = pytest.importorskip("training.model", reason="training/model.py not there yet")
    import torch

    torch.manual_seed(seed)
    model = model_mod.SegDepthUNet(model_mod.UNetConfig())
    model_mod.save_model(path, model, {"model_id": f"random-seed{seed}", **meta})
    return path


def write_session(
    path: Path, frames, pixel_size_pm: float = 5.3, dose: float = 20.0, interval_s: float = 0.05
) -> Path:
    """A minimal session file (docs/CONTRACTS.md "Session file") that ``segdepth replay`` reads."""
    import h5py
    import numpy as np

    n = len(frames)
    with h5py.File(path, "w") as f:
        f["frames"] = np.asarray(frames)
        f["timestamps_s"] = np.arange(n) * interval_s
        f["sequence"] = np.arange(n, dtype=np.int64)
        f.attrs.update(
            pixel_size_pm=pixel_size_pm,
            dose_e_per_px=dose,
            frame_interval_s=interval_s,
            session_id="test",
            source="test",
        )
    return path


class ProcessGroup:
    """Real child processes of a test, each logging to a file; all ended at exit by pid."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str]):

        with open(self.log_dir / f"{name}.log", "w") as logfile:
            proc = subprocess.Popen(argv, stdout=logfile, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text()

    def wait(self, name: str, timeout_s: float) -> int:

        try:
            return self.procs[name].wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{name} still running after {timeout_s} s; its log:\n{self.log(name)[-3000:]}"
            ) from None

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def serve_argv(cmd: list[str], ep: dict[str, str], model: Path, *extra: str) -> list[str]:
    """``segdepth serve`` in replay mode on the torch CPU backend, frames from ``ep["engine"]``
    and results to ``ep["results"]``, no viewer, leaving at the session's eos."""
    return [
        *cmd,
        "serve",
        *("--frames", ep["engine"], "--results", ep["results"], "--viewer", "none"),
        *("--model", str(model), "--backend", "torch-cpu", "--mode", "replay", "--exit-on-eos"),
        *extra,
    ]


def record_argv(cmd: list[str], out: Path, frames: str, results: str, *extra: str) -> list[str]:
    """``segdepth record`` of raw frames from ``frames`` and results from ``results``
    (an endpoint or ``none``) into ``out``."""
    return [*cmd, "record", "--out", str(out), "--frames", frames, "--results", results, *extra]


def replay_argv(
    cmd: list[str], session: Path, engine: str, recorder: str, *extra: str
) -> list[str]:
    """``segdepth replay`` of ``session`` to ``engine`` and ``recorder`` (either may be
    ``none``), no viewer."""
    return [
        *cmd,
        "replay",
        str(session),
        *("--to-engine", engine, "--to-recorder", recorder, "--to-viewer", "none", *extra),
    ]


def results_recorded(path: Path) -> int:
    """Frames of a recording (read while it is being written) that hold a result; 0 before
    the file or its results group exists."""
    import h5py

    try:
        with h5py.File(path, "r", swmr=True) as f:
            return int(f["results/has_result"][:].sum())
    except (OSError, KeyError):  # not created yet
        return 0


def write_synthetic_session(
    path: Path,
    n_frames: int,
    side: int,
    seed: int = 0,
    pixel_size_pm: float = 5.3,
    dose: float = 20.0,
) -> Path:
    """A session with truth (docs/CONTRACTS.md "Session file", simulated): Gaussian Ce and O
    columns on a lattice below a vacuum band, drifting 0.3 px/frame, with one O column losing
    an atom half way; Poisson counts at ``dose``. Not physics: a stand-in for plumbing tests."""
    import h5py
    import numpy as np

    rng = np.random.default_rng(seed)
    step = 40
    ce = [(y, x) for y in range(side // 4, side - 20, step) for x in range(20, side - 40, step)]
    pos = np.array(ce + [(y, x + 20) for y, x in ce], dtype=float)
    species = np.array([1] * len(ce) + [2] * len(ce))
    depth = np.tile(np.where(species == 1, 6, 5).astype(np.uint8), (n_frames, 1))
    depth[n_frames // 2 :, -1] -= 1
    drift = np.stack([0.3 * np.arange(n_frames), 0.2 * np.arange(n_frames)], axis=1)
    yy, xx = np.mgrid[:side, :side].astype(float)
    frames = np.empty((n_frames, side, side), np.uint16)
    for t in range(n_frames):
        image = np.ones((side, side))
        for (y, x), s, d in zip(pos + drift[t], species, depth[t]):
            amp = (0.08 if s == 1 else 0.03) * d
            image += amp * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 3.0**2))
        frames[t] = rng.poisson(dose * image)
    table = np.array(
        [(i, x, y, s) for i, ((y, x), s) in enumerate(zip(pos, species))],
        dtype=[("id", "i8"), ("x_px", "f4"), ("y_px", "f4"), ("species", "u1")],
    )
    write_session(path, frames, pixel_size_pm, dose)
    with h5py.File(path, "a") as f:
        f["truth/columns"] = table
        f["truth/depth"] = depth
        f["truth/drift_px"] = drift
    return path
