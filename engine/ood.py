"""The engine's out-of-distribution checks.

Every frame gets the one-pass uncertainty score (:func:`training.inference.uncertainty_scores`,
free; what the warning reads by default, ``ServeConfig.ood_warn_on``). A *turn check* infers a
frame a second time, turned by 90°, and scores how much the two answers disagree
(:func:`training.inference.turn_scores`, the robustness suite's "turn" score): a model trained
on every orientation answers both alike on images it knows. It costs one more inference per
checked frame, so the engine checks every ``every``-th frame of a session (optics, support film
and dose change slowly within one) and carries the latest verdict to the frames between checks;
with test-time augmentation the turned pass is one of the eight already run, and every frame is
checked. The session's verdict is the median of its last
:data:`training.ood_levels.CHECKS_PER_VERDICT` checks, so that one check past the level (one in
twenty in distribution, by the level's definition) does not warn on its own.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from training.ood_levels import CHECKS_PER_VERDICT

if TYPE_CHECKING:
    from engine.device_maps import DevicePrediction
    from engine.prediction import Prediction


#: frames between turn checks where the engine has time for them (a GPU backend)
TURN_CHECK_EVERY = 16


def default_check_every(on_gpu: bool, warn_on: str) -> int:
    """Frames between a session's turn checks when ``serve`` is not told: every
    :data:`TURN_CHECK_EVERY`-th frame on a GPU or when the warning reads the turn score
    (``warn_on`` "turn"); none on the CPU otherwise, where inference alone runs below the
    camera's rate and each check costs a whole inference (about 6 % of the engine's time at
    one check per 16 frames, 512^2)."""
    return TURN_CHECK_EVERY if on_gpu or warn_on == "turn" else 0


@dataclass
class TurnCheck:
    """One session's turn checks: which frames are due (inference stage) and the session's
    score from the latest checks (publish stage)."""

    every: int  # frames between checks; 0: never
    last_seq: int | None = None  # seq of the last frame checked
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=CHECKS_PER_VERDICT))

    def record(self, score: float) -> None:
        """A checked frame's turn score (publish stage)."""
        self.recent.append(score)

    @property
    def score(self) -> float:
        """The session's turn score: the median of its last checks' (NaN: none yet)."""
        return float(np.median(self.recent)) if self.recent else math.nan

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
