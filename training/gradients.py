"""Gradient analysis of eq. 7: g(i, d) = ∇_y F_θ(y)_i[d], the sensitivity of the depth-d
probability at output pixel i to every input pixel (Fig. 8)."""

from __future__ import annotations

import numpy as np
import torch

from training.inference import forward_padded


def input_gradients(
    model: torch.nn.Module,
    image: np.ndarray,
    pixel_rc: tuple[int, int],
    depths: list[int],
    temperature: float = 1.0,
) -> np.ndarray:
    """(len(depths), H, W) float32 gradients of softmax probability ``d`` at ``pixel_rc``
    (row, col) with respect to the (H,W) input ``image`` (model in eval mode)."""
    model.eval()
    x = torch.tensor(np.asarray(image, np.float32)[None, None], requires_grad=True)
    depth_logits, _ = forward_padded(model, x)
    probs = torch.softmax(depth_logits / temperature, dim=1)[0, :, pixel_rc[0], pixel_rc[1]]
    grads = []
    for k, d in enumerate(depths):
        (g,) = torch.autograd.grad(probs[d], x, retain_graph=k < len(depths) - 1)
        grads.append(g[0, 0].numpy())
    return np.stack(grads).astype(np.float32)


def gradient_spread_px(gradient: np.ndarray, pixel_rc: tuple[int, int]) -> float:
    """|g|-weighted RMS distance (px) of a (H,W) gradient map from ``pixel_rc``: how far the
    estimate at that pixel looks (larger = more long-range context)."""
    mag = np.abs(np.asarray(gradient, np.float64))
    total = mag.sum()
    if total == 0:
        return 0.0
    rows, cols = np.indices(mag.shape)
    r2 = (rows - pixel_rc[0]) ** 2 + (cols - pixel_rc[1]) ** 2
    return float(np.sqrt((mag * r2).sum() / total))
