"""Online temporal filter of a column's depth: a hidden Markov model over depth 0-10 atoms.

The paper reads each frame on its own. A column's depth changes rarely (a vacancy forms or
heals: one atom more or less), while the per-frame estimate is noisy. The HMM's hidden state is
the true depth; between frames it stays with probability ``1 - switch_prob`` and otherwise moves
one atom up or down. Each frame's network probability vector is taken as the emission likelihood
(mixed with a uniform floor so that one overconfident frame cannot zero a state). Forward
filtering gives, online, P(depth at t | frames 0..t): it follows a real change after a few
frames and ignores a single-frame outlier.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_DEPTHS = 11  # depth classes 0..10 atoms


@dataclass(frozen=True)
class HMMConfig:
    """``switch_prob``: probability per frame that a column gains or loses one atom.
    ``emission_floor``: weight of a uniform likelihood mixed into each frame's probabilities."""

    switch_prob: float = 0.02
    emission_floor: float = 0.05

    def __post_init__(self) -> None:
        if not 0.0 <= self.switch_prob < 1.0:
            raise ValueError(f"switch_prob must be in [0, 1), got {self.switch_prob}")
        if not 0.0 < self.emission_floor <= 1.0:
            raise ValueError(f"emission_floor must be in (0, 1], got {self.emission_floor}")


def transition_matrix(switch_prob: float, n_states: int = N_DEPTHS) -> np.ndarray:
    """Row-stochastic (n, n) matrix: stay with 1 - p, else move to a neighbouring depth (+-1)."""
    t = np.eye(n_states) * (1.0 - switch_prob)
    for d in range(n_states):
        neighbours = [n for n in (d - 1, d + 1) if 0 <= n < n_states]
        for n in neighbours:
            t[d, n] += switch_prob / len(neighbours)
    return t


class DepthFilter:
    """Forward filter for many columns at once, keyed by column id (new ids start uniform)."""

    def __init__(self, config: HMMConfig | None = None):
        self.config = config or HMMConfig()
        self._transition = transition_matrix(self.config.switch_prob)
        self._belief: dict[int, np.ndarray] = {}

    def reset(self) -> None:
        """Forget every column (a new session)."""
        self._belief.clear()

    def update(self, ids: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
        """Fold in one frame: ``probabilities`` (n, 11) for columns ``ids`` (n,).

        Returns the filtered posteriors (n, 11), rows summing to 1.
        """
        probabilities = np.asarray(probabilities, dtype=np.float64)
        if probabilities.ndim != 2 or probabilities.shape[1] != N_DEPTHS:
            raise ValueError(f"probabilities must be (n, {N_DEPTHS}), got {probabilities.shape}")
        if len(ids) != len(probabilities):
            raise ValueError(f"{len(ids)} ids for {len(probabilities)} probability rows")
        if len(ids) == 0:
            return np.zeros((0, N_DEPTHS), dtype=np.float32)
        floor = self.config.emission_floor
        rows = np.clip(probabilities, 0.0, None)
        rows = rows / np.maximum(rows.sum(axis=1, keepdims=True), 1e-12)
        likelihood = (1.0 - floor) * rows + floor / N_DEPTHS
        uniform = np.full(N_DEPTHS, 1.0 / N_DEPTHS)
        prior = np.stack([self._belief[int(i)] @ self._transition if int(i) in self._belief
                          else uniform for i in ids])
        posterior = prior * likelihood
        posterior /= posterior.sum(axis=1, keepdims=True)
        for i, row in zip(ids, posterior):
            self._belief[int(i)] = row
        return posterior.astype(np.float32)
