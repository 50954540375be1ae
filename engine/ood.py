"""The engine's out-of-distribution checks.

Every frame gets the one-pass uncertainty score (:func:`training.inference.uncertainty_scores`,
free but weak). A *turn check* infers a frame a second time, turned by 90°, and scores how much
the two answers disagree (:func:`training.inference.turn_scores`, the robustness suite's "turn"
score): a model trained on every orientation answers both alike on images it knows. It costs
one more inference per checked frame, so the engine checks every ``every``-th frame of a
session (optics, support film and dose change slowly within one) and carries the latest
verdict to the frames between checks; with test-time augmentation the turned pass is one of the
eight already run, and every frame is checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from engine.device_maps import DevicePrediction
    from engine.prediction import Prediction


@dataclass
class TurnCheck:
    """One session's turn checks: which frames are due (inference stage) and the latest
    score (publish stage)."""

    every: int  # frames between checks; 0: never
    last_seq: int | None = None  # seq of the last frame checked
    score: float = math.nan  # the latest checked frame's score

    def due(self, seq: int) -> bool:
        """Whether frame ``seq`` is checked; marks it so when it is (a session's first frame
        always is, and so is a frame whose seq went backwards: a restarted source)."""
        if self.every <= 0:
            return False
        if self.last_seq is None or not 0 <= seq - self.last_seq < self.every:
            self.last_seq = seq
            return True
        return False


def checked_scores(
    infer, frames: np.ndarray, pred: Prediction | DevicePrediction, due: list[int]
) -> np.ndarray:
    """Turn scores (len(due),) of frames ``due`` of the normalised ``frames`` (B, H, W), whose
    prediction is ``pred``: ``infer`` (a backend's) runs on those frames turned by 90°, and the
    score is computed where the probabilities lie (host or inference device)."""
    turned = infer(np.ascontiguousarray(np.rot90(frames[due], 1, axes=(1, 2))))
    return pred.turn_scores(due, turned)
