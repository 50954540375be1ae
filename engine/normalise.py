"""Dose normalisation: the model reads counts / dose, so that a vacuum pixel is 1 on average.

A frame's ``dose_e_per_px`` header (mean counts of a vacuum pixel per frame) is used as given.
A frame without it gets an estimate: the frame's mean count. In a phase-contrast HRTEM image the
specimen mostly redistributes the incident electrons rather than removing them (a thin CeO2
particle absorbs little; a wide objective aperture cuts little), so the mean of a clean image
normalised to vacuum = 1 is close to 1 and the mean count estimates the dose (on a simulated
256^2 session at 2.5 e-/px, 40 mrad aperture: mean count / dose = 0.96). Frames without a dose
in one session share a running mean of these estimates (weight 1/n), which averages the
Poisson noise of single frames away.
"""

from __future__ import annotations

import math

import numpy as np


class DoseNormaliser:
    """Turns raw frames into model input; keeps the running dose estimate of one session."""

    def __init__(self) -> None:
        self.estimated_frames = 0
        self._estimate = 0.0

    def dose(self, frame: np.ndarray, header_dose: float | None) -> tuple[float, bool]:
        """The dose (e-/px/frame) to divide ``frame`` by, and whether it was estimated."""
        if header_dose is not None:
            if not (
                isinstance(header_dose, (int, float))
                and math.isfinite(header_dose)
                and header_dose > 0
            ):
                raise ValueError(f"dose_e_per_px must be a positive number, got {header_dose!r}")
            return float(header_dose), False
        mean = float(np.mean(frame, dtype=np.float64))
        if not mean > 0:
            raise ValueError("frame without dose_e_per_px has no counts to estimate a dose from")
        self.estimated_frames += 1
        self._estimate += (mean - self._estimate) / self.estimated_frames
        return self._estimate, True

    def normalise(
        self, frame: np.ndarray, header_dose: float | None
    ) -> tuple[np.ndarray, float, bool]:
        """``frame`` / dose as float32, the dose used and whether it was estimated."""
        dose, estimated = self.dose(frame, header_dose)
        return np.asarray(frame, dtype=np.float32) / np.float32(dose), dose, estimated
