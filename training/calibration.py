"""Temperature scaling (Guo et al. 2017) fitted on validation pixels: softmax(logits / T)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of ``labels`` (n,) under softmax(``logits`` (n,K) / T)."""
    logp = log_softmax(logits / temperature, axis=1)
    return float(-logp[np.arange(len(labels)), labels].mean())


def fit_temperature(
    logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
    """T > 0 minimising the NLL of ``labels`` (n,) given ``logits`` (n,K) (bounded 1-D search
    over log T)."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    res = minimize_scalar(
        lambda log_t: nll(logits, labels, float(np.exp(log_t))),
        bounds=tuple(np.log(bounds)),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(res.x))


def sample_pixels(
    logits: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` random pixels of (B,K,H,W) logits and (B,H,W) labels as ((n,K), (n,))."""
    k = logits.shape[1]
    flat_logits = np.moveaxis(logits, 1, -1).reshape(-1, k)
    flat_labels = labels.reshape(-1)
    idx = rng.choice(len(flat_labels), size=min(n, len(flat_labels)), replace=False)
    return flat_logits[idx], flat_labels[idx]
