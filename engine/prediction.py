"""A batch's per-pixel probabilities on the host and the maps the engine publishes from them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.columns import FrameMaps
from training.inference import turn_scores, uncertainty_scores


@dataclass
class Prediction:
    """Per-pixel probabilities for a batch: depth (B, 11, H, W), species (B, 3, H, W) float32,
    numpy arrays on the host (:class:`engine.device_maps.DevicePrediction`: the same on the
    inference device)."""

    depth_prob: np.ndarray
    species_prob: np.ndarray
    _maps: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def maps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per pixel: depth (argmax, uint8), confidence (its probability, float32) and species
        (argmax, uint8), each (B, H, W) -- paper eqs. (4)-(5). Computed once per prediction."""
        if self._maps is None:
            depth, confidence = channel_max(self.depth_prob)
            species, _ = channel_max(self.species_prob)
            self._maps = depth, confidence, species
        return self._maps

    def uncertainty_scores(self) -> np.ndarray:
        """The one-pass OOD score per frame (B,) of :meth:`maps`
        (:func:`training.inference.uncertainty_scores`)."""
        depth, confidence, _ = self.maps()
        return uncertainty_scores(depth, confidence)

    def turn_scores(self, frames: list[int], turned: Prediction) -> np.ndarray:
        """The turn check's score (len(frames),) of frames ``frames`` of this batch against
        ``turned``, the prediction of the same frames turned by 90°
        (:func:`training.inference.turn_scores`)."""
        back = np.rot90(turned.depth_prob, -1, axes=(2, 3))
        return turn_scores(self.depth_prob[frames], back)

    def frame(self, i: int) -> FrameMaps:
        """Frame ``i``'s maps as the column tracker reads them."""
        return FrameMaps(self.species_prob[i], self.depth_prob[i])


def channel_max(prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Argmax (uint8, the first on ties) and maximum over axis 1 of (B, C, H, W) maps.

    One pass per channel over contiguous planes: 4x faster than torch's or numpy's reduction
    over the channel axis on one core at 512² (2.7 vs 10.7 / 13.9 ms for 11 channels).
    """
    best = prob[:, 0].copy()
    index = np.zeros(best.shape, np.uint8)
    for k in range(1, prob.shape[1]):
        higher = prob[:, k] > best
        np.copyto(best, prob[:, k], where=higher)
        index[higher] = k
    return index, best
