"""Batched inference on images of any size: replicate-pad to the model's size multiple, crop
back."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from training.model import pad_to_multiple


@dataclass
class Prediction:
    """Per-pixel outputs of a batch: ``depth`` (B,H,W) uint8 argmax (eq. 4), ``confidence``
    (B,H,W) float32 max probability (eq. 5), ``species`` (B,H,W) uint8, ``probabilities``
    (B,11,H,W) float32 softmax (eq. 3) and ``depth_logits`` (B,11,H,W) float32."""

    depth: np.ndarray
    confidence: np.ndarray
    species: np.ndarray
    probabilities: np.ndarray
    depth_logits: np.ndarray
    #: with test-time augmentation, per frame (B,): the turn score of its own unturned and
    #: quarter-turned passes (:func:`turn_scores`) and the spread of its 8 views
    #: (:func:`spread_scores`); None without
    turn: np.ndarray | None = None
    spread: np.ndarray | None = None


def forward_padded(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Model outputs for (B,1,H,W) input of any H, W (padded internally, cropped back)."""
    multiple = int(getattr(getattr(model, "module", model), "size_multiple", 1))
    padded, (h, w) = pad_to_multiple(x, multiple)
    depth_logits, species_logits = model(padded)
    return depth_logits[..., :h, :w], species_logits[..., :h, :w]


#: the 8 symmetries of the square: (quarter turns, flip across columns first)
DIHEDRAL = tuple((k, flip) for flip in (False, True) for k in range(4))


class TTAOutputs(NamedTuple):
    """What :func:`forward_tta` gives for a batch: the mean depth probabilities (B, 11, H, W),
    depth logits and species logits over the 8 views, each view's depth probabilities mapped
    back for the unturned (``quarter[0]``) and quarter-turned (``quarter[1]``) passes, and per
    pixel (B, H, W) the views' spread: the sum over classes of the variance of the views'
    probabilities, 0 where all 8 agree, at most 1 − 1/11."""

    probabilities: torch.Tensor
    depth_logits: torch.Tensor
    species_logits: torch.Tensor
    quarter: tuple[torch.Tensor, torch.Tensor]
    spread: torch.Tensor


def forward_tta(model: torch.nn.Module, x: torch.Tensor, temperature: float) -> TTAOutputs:
    """Test-time augmentation over the 8 flips and quarter turns of the input, each output
    mapped back (:class:`TTAOutputs`)."""
    total: list[torch.Tensor] = []  # running sums of (probabilities, logits, species logits)
    squares = torch.zeros(())  # running sum over views of each pixel's sum of p²
    quarter: dict[int, torch.Tensor] = {}
    for k, flip in DIHEDRAL:
        t = torch.rot90(x.flip(-1) if flip else x, k, dims=(-2, -1))
        d, s = (torch.rot90(o.float(), -k, dims=(-2, -1)) for o in forward_padded(model, t))
        if flip:
            d, s = d.flip(-1), s.flip(-1)
        p = torch.softmax(d / temperature, dim=1)
        if not flip and k < 2:
            quarter[k] = p
        squares = squares + (p * p).sum(dim=1)
        parts = (p, d, s)
        total = [a + b for a, b in zip(total, parts)] if total else list(parts)
    n = len(DIHEDRAL)
    mean = total[0] / n
    spread = (squares / n - (mean * mean).sum(dim=1)).clamp_min(0)
    return TTAOutputs(mean, total[1] / n, total[2] / n, (quarter[0], quarter[1]), spread)


@torch.no_grad()
def predict_batches(
    model: torch.nn.Module,
    images: np.ndarray,
    batch_size: int = 4,
    temperature: float = 1.0,
    device: str | torch.device = "cpu",
    tta: bool = False,
) -> Iterator[tuple[slice, Prediction]]:
    """Yield (index slice, Prediction) over (N,H,W) float32 images (vacuum = 1). Depth
    probabilities are softmax(logits / ``temperature``) (temperature scaling, Fig. 7); with
    ``tta`` their mean over the 8 flips and quarter turns (8× the cost)."""
    model.eval()
    for start in range(0, len(images), batch_size):
        sl = slice(start, min(start + batch_size, len(images)))
        x = torch.as_tensor(np.asarray(images[sl], np.float32))[:, None].to(device)
        views = forward_tta(model, x, temperature) if tta else None
        if views is not None:
            probs, depth_logits, species_logits = views[:3]
        else:
            depth_logits, species_logits = forward_padded(model, x)
            depth_logits = depth_logits.float()
            probs = torch.softmax(depth_logits / temperature, dim=1)
        confidence, depth = probs.max(dim=1)
        pred = Prediction(
            depth.to(torch.uint8).cpu().numpy(),
            confidence.cpu().numpy().astype(np.float32),
            species_logits.argmax(dim=1).to(torch.uint8).cpu().numpy(),
            probs.cpu().numpy(),
            depth_logits.cpu().numpy(),
        )
        if views is not None:
            pred.turn = turn_scores(*(q.cpu().numpy() for q in views.quarter))
            pred.spread = spread_scores(pred.depth, views.spread.cpu().numpy())
        yield sl, pred


def column_means(depth: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per frame the mean of ``values`` over the pixels ``depth`` calls a column (all pixels
    when none), for (B, H, W) maps."""
    return np.array(
        [
            float(v[d > 0].mean()) if (d > 0).any() else float(v.mean())
            for d, v in zip(np.asarray(depth), np.asarray(values))
        ]
    )


def uncertainty_scores(depth: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """Per-frame out-of-distribution score at no extra cost: the mean of 1 − confidence over
    the pixels estimated as a column (all pixels when none), for (B, H, W) maps."""
    return column_means(depth, 1 - np.asarray(confidence))


def spread_scores(depth: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """Per-frame out-of-distribution score of test-time augmentation: the mean of the 8 views'
    spread (:class:`TTAOutputs`) over the pixels the averaged answer calls a column (all
    pixels when none). A model that knows the image answers every flip and quarter turn
    alike."""
    return column_means(depth, spread)


def turned_probabilities(
    model: torch.nn.Module, frames: np.ndarray, temperature: float, batch: int = 8
) -> np.ndarray:
    """Depth probabilities (B, 11, H, W) of ``frames`` (B, H, W) turned by 90°, turned back:
    the second pass of :func:`turn_scores`."""
    turned = np.ascontiguousarray(np.rot90(frames, 1, axes=(1, 2)))
    probs = np.concatenate(
        [p.probabilities for _, p in predict_batches(model, turned, batch, temperature)]
    )
    return np.rot90(probs, -1, axes=(2, 3))


def turn_scores(probabilities: np.ndarray, turned: np.ndarray) -> np.ndarray:
    """Per-frame out-of-distribution score in [0, 1] from depth probabilities (B, 11, H, W) of
    frames and of the same frames turned by 90° (turned back): the mean total-variation distance
    between the two over the pixels either pass calls a column. A model trained on every
    orientation answers both the same in distribution; where it does not know the image, the
    two disagree."""
    tv = 0.5 * np.abs(probabilities - turned).sum(axis=1)  # (B, H, W)
    column = (probabilities.argmax(1) > 0) | (turned.argmax(1) > 0)
    return np.array(
        [float(t[c].mean()) if c.any() else float(t.mean()) for t, c in zip(tv, column)]
    )
