"""Warning levels of the engine's out-of-distribution scores, measured on whole frames.

Both scores (the one-pass :func:`training.inference.uncertainty_scores` and the turn check's
:func:`training.inference.turn_scores`) are means over the pixels a frame's answer calls a
column, so their spread and level depend on how much of the field is particle: the robustness
suite's 192² crops (a particle edge in most) score higher and scatter more than the engine's
512² session frames. Levels the engine compares live frames with are therefore taken here on
simulated in-distribution sessions (`segdepth simulate --session`) at the frame size served:
the given percentile of their per-frame scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import torch

from training.inference import (
    predict_batches,
    turn_scores,
    turned_probabilities,
    uncertainty_scores,
)

PERCENTILE = 95.0  #: in-distribution frames that stay below a level, %


def session_scores(
    model: torch.nn.Module, temperature: float, paths: Sequence[str | Path], batch: int = 4
) -> dict[str, np.ndarray]:
    """Per-frame scores {"uncertainty", "turn"} (frames of all files, in order) of the frames
    of session files, each divided by its file's ``dose_e_per_px`` as the engine does."""
    scores: dict[str, list[np.ndarray]] = {"uncertainty": [], "turn": []}
    for path in paths:
        with h5py.File(path, "r") as f:
            frames = f["frames"][:].astype(np.float32) / np.float32(f.attrs["dose_e_per_px"])
        back = turned_probabilities(model, frames, temperature, batch)
        for sl, p in predict_batches(model, frames, batch, temperature):
            scores["uncertainty"].append(uncertainty_scores(p.depth, p.confidence))
            scores["turn"].append(turn_scores(p.probabilities, back[sl]))
    return {k: np.concatenate(v) for k, v in scores.items()}


def session_levels(
    model: torch.nn.Module,
    temperature: float,
    paths: Sequence[str | Path],
    percentile: float = PERCENTILE,
) -> dict:
    """The meta's warning levels from in-distribution session files: ``ood_threshold`` (one
    pass), ``ood_turn_threshold`` and ``ood_levels`` (how they were measured)."""
    scores = session_scores(model, temperature, paths)
    with h5py.File(paths[0], "r") as f:
        frame_px = list(f["frames"].shape[1:])
    return {
        "ood_threshold": float(np.percentile(scores["uncertainty"], percentile)),
        "ood_turn_threshold": float(np.percentile(scores["turn"], percentile)),
        "ood_levels": {
            "source": "in-distribution sessions",
            "files": [str(p) for p in paths],
            "frames": int(len(scores["turn"])),
            "frame_px": frame_px,
            "percentile": percentile,
        },
    }
