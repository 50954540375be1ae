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


#: pixels per row band of :func:`channel_max`: a band of one channel (256 kB of float32) and
#: the running maximum stay in the core's cache while the channels pass over them
BAND_PX = 65536


def channel_max(prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Argmax (uint8, the first on ties) and maximum over axis 1 of (B, C, H, W) maps.

    One pass per channel over contiguous planes, band of rows by band of rows (:data:`BAND_PX`):
    on one core at 512² for 11 + 3 channels 2.5 ms against 4.4 for whole planes (16.2 -> 11.4 ms
    at 1024²), which were already 4x faster than torch's or numpy's reduction over the channel
    axis (2.7 vs 10.7 / 13.9 ms for 11 channels).
    """
    b, c, h, w = prob.shape
    best = np.empty((b, h, w), prob.dtype)
    index = np.zeros((b, h, w), np.uint8)
    rows = max(1, BAND_PX // max(w, 1))
    higher = np.empty((b, rows, w), bool)
    for r0 in range(0, h, rows):
        band, top = index[:, r0 : r0 + rows], best[:, r0 : r0 + rows]
        above = higher[:, : top.shape[1]]
        top[...] = prob[:, 0, r0 : r0 + rows]
        for k in range(1, c):
            plane = prob[:, k, r0 : r0 + rows]
            np.greater(plane, top, out=above)
            np.maximum(top, plane, out=top)
            np.copyto(band, k, where=above)
    return index, best
