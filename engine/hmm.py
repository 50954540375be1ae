"""Temporal model of a column's depth: a hidden Markov model over 0-10 atoms, and its events.

Evidence. The network's column posterior q_t(d) = P(d | frame t) (temperature-calibrated where
the model has a temperature, :mod:`engine.model_io`) is proportional to p(frame | d) * pi(d),
pi the class prior the network learnt in training. Multiplying the posteriors of many frames
would count pi once per frame, so the per-frame likelihood is L_t(d) ~ q_t(d) / pi(d), mixed
with a uniform floor so that one overconfident frame cannot zero a state. pi is
``HMMConfig.class_prior``: the model meta's ``class_prior`` where it has one
(:func:`engine.model_io.LoadedModel.class_prior`), else uniform, which makes the correction a
no-op; ``segdepth serve --class-prior`` injects another.

Transitions. A column changes at ``change_rate_per_s`` changes per second, so over a frame
interval dt (s) it changes with probability 1 - exp(-rate dt). A change moves k atoms, up or
down alike, with probability proportional to ``jump_decay`` ** (k - 1), k = 1..``max_jump``,
among the depths 0..10 that exist. A 2-atom loss is one step, not two.

Outputs. The causal filter (live) gives P(d_t | frames <= t); the forward-backward smoother
(offline) gives P(d_t | all frames). Both give P(change at t) = P(d_t != d_{t-1} | evidence).
:class:`EventDetector` turns posteriors into events: a column whose most probable depth b
differs from its last confirmed depth a with P(b) >= ``event_threshold`` has changed a -> b;
the frame of the change is the most likely change point over the last ``event_window_frames``
likelihoods, so the detection delay (frames and seconds) is known.

``LEGACY`` is the filter before issue 10 (posterior as evidence, +-1 atom, 0.02 per frame,
floor 0.05), kept so that old and new can be compared on one recording.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from streamer.domain import N_DEPTHS


@dataclass(frozen=True)
class HMMConfig:
    """Settings of the temporal model (module docstring). Rates per second, times in frames.

    ``change_rate_per_s``: expected depth changes per column per second.
    ``per_frame_change``: if set, the change probability per frame whatever the interval
    (the legacy filter; overrides the rate). ``jump_decay``: ratio of the probabilities of a
    (k+1)- and a k-atom change. ``max_jump``: largest change in atoms in one frame.
    ``emission_floor``: weight of the uniform likelihood mixed into each frame's evidence.
    ``prior_correction``: divide the posterior by ``class_prior`` (11 values, any scale;
    None: uniform). ``event_threshold``: filtered probability a new depth needs to be an event.
    ``event_window_frames``: frames searched back for the change point of an event.
    """

    change_rate_per_s: float = 0.1
    per_frame_change: float | None = None
    jump_decay: float = 0.5
    max_jump: int = 10
    emission_floor: float = 0.02
    prior_correction: bool = True
    class_prior: tuple[float, ...] | None = None
    event_threshold: float = 0.9
    event_window_frames: int = 12

    def __post_init__(self) -> None:
        if not self.change_rate_per_s >= 0:
            raise ValueError(f"change_rate_per_s must be >= 0, got {self.change_rate_per_s}")
        if self.per_frame_change is not None and not 0 <= self.per_frame_change < 1:
            raise ValueError(f"per_frame_change must be in [0, 1), got {self.per_frame_change}")
        if not 0 < self.emission_floor <= 1:
            raise ValueError(f"emission_floor must be in (0, 1], got {self.emission_floor}")
        if not (1 <= self.max_jump < N_DEPTHS and 0 <= self.jump_decay):
            raise ValueError("max_jump must be in 1..10 and jump_decay >= 0")
        if not 0 < self.event_threshold <= 1:
            raise ValueError(f"event_threshold must be in (0, 1], got {self.event_threshold}")
        if self.class_prior is not None:
            prior = np.asarray(self.class_prior, dtype=float)
            if prior.shape != (N_DEPTHS,) or not (prior > 0).all():
                raise ValueError(f"class_prior needs {N_DEPTHS} positive values")

    def change_probability(self, dt_s: float) -> float:
        """Probability of a change over ``dt_s`` seconds (one frame interval)."""
        if self.per_frame_change is not None:
            return self.per_frame_change
        return 1.0 - math.exp(-self.change_rate_per_s * max(float(dt_s), 0.0))


#: the filter before issue 10, for comparisons (``segdepth serve --filter legacy``).
LEGACY = HMMConfig(
    per_frame_change=0.02, jump_decay=0.0, max_jump=1, emission_floor=0.05, prior_correction=False
)
FILTERS = {"rate": HMMConfig(), "legacy": LEGACY}


def transition_matrix(
    change_prob: float, jump_decay: float = 0.0, max_jump: int = 1, n_states: int = N_DEPTHS
) -> np.ndarray:
    """Row-stochastic (n, n) matrix: stay with 1 - p; else jump k atoms up or down with weight
    ``jump_decay`` ** (k - 1), k <= ``max_jump``, renormalised over the depths that exist."""
    d = np.arange(n_states)
    k = np.abs(d[:, None] - d[None, :])
    weight = np.where((k >= 1) & (k <= max_jump), float(jump_decay) ** np.maximum(k - 1, 0), 0.0)
    weight /= weight.sum(axis=1, keepdims=True)
    return np.eye(n_states) * (1.0 - change_prob) + change_prob * weight


def likelihoods(probabilities: np.ndarray, config: HMMConfig) -> np.ndarray:
    """Per-frame likelihoods (..., 11), rows summing to 1, from column posteriors (..., 11):
    divided by the class prior (if ``prior_correction``), floored. NaN rows give uniform."""
    rows = np.nan_to_num(np.clip(np.asarray(probabilities, dtype=np.float64), 0, None), nan=1.0)
    if config.prior_correction and config.class_prior is not None:
        rows = rows / np.asarray(config.class_prior, dtype=np.float64)
    rows = rows / np.maximum(rows.sum(axis=-1, keepdims=True), 1e-300)
    return (1.0 - config.emission_floor) * rows + config.emission_floor / N_DEPTHS


class _Transitions:
    """Transition matrices of one config, cached per frame interval (rounded to 1 ms)."""

    def __init__(self, config: HMMConfig):
        self.config = config
        self._cache: dict[float, np.ndarray] = {}

    def __call__(self, dt_s: float) -> np.ndarray:
        key = round(float(dt_s), 3)
        if key not in self._cache:
            c = self.config
            self._cache[key] = transition_matrix(
                c.change_probability(key), c.jump_decay, c.max_jump
            )
        return self._cache[key]


def _forward_step(
    belief: np.ndarray, likelihood: np.ndarray, transition: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(posterior (n, 11), P(change) (n,)) from last beliefs (n, 11) and likelihoods (n, 11)."""
    joint_stay = belief * np.diag(transition)[None] * likelihood
    posterior = (belief @ transition) * likelihood
    total = posterior.sum(axis=1)
    return posterior / total[:, None], 1.0 - joint_stay.sum(axis=1) / total


class DepthFilter:
    """Causal filter for many columns at once, keyed by column id (new ids start uniform)."""

    def __init__(self, config: HMMConfig | None = None):
        self.config = config or HMMConfig()
        self._transitions = _Transitions(self.config)
        self._belief: dict[int, np.ndarray] = {}

    def reset(self) -> None:
        """Forget every column (a new session)."""
        self._belief.clear()

    def update(
        self, ids: np.ndarray, probabilities: np.ndarray, dt_s: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Fold in one frame, ``dt_s`` seconds after the previous one: column posteriors
        ``probabilities`` (n, 11) of columns ``ids`` (n,). Returns the filtered posteriors
        (n, 11) and P(change since the previous frame) (n,) (0 for a new column)."""
        probabilities = np.asarray(probabilities, dtype=np.float64)
        if probabilities.ndim != 2 or probabilities.shape[1] != N_DEPTHS:
            raise ValueError(f"probabilities must be (n, {N_DEPTHS}), got {probabilities.shape}")
        if len(ids) != len(probabilities):
            raise ValueError(f"{len(ids)} ids for {len(probabilities)} probability rows")
        if len(ids) == 0:
            return np.zeros((0, N_DEPTHS), np.float32), np.zeros(0, np.float32)
        like = likelihoods(probabilities, self.config)
        known = np.array([int(i) in self._belief for i in ids])
        belief = np.stack(
            [self._belief.get(int(i), np.full(N_DEPTHS, 1.0 / N_DEPTHS)) for i in ids]
        )
        posterior, change = _forward_step(belief, like, self._transitions(dt_s))
        posterior[~known] = like[~known] / like[~known].sum(axis=1, keepdims=True)
        change[~known] = 0.0
        for i, row in zip(ids, posterior):
            self._belief[int(i)] = row
        return posterior.astype(np.float32), change.astype(np.float32)


def smooth(
    probabilities: np.ndarray, dt_s: np.ndarray, config: HMMConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Forward-backward smoother of one column: posteriors (T, 11) (NaN rows: no evidence)
    and the interval before each frame ``dt_s`` (T,) s. Returns P(d_t | all frames) (T, 11)
    and P(d_t != d_{t-1} | all frames) (T,) (0 at t = 0)."""
    like = likelihoods(probabilities, config)
    n = len(like)
    trans = _Transitions(config)
    alpha = np.empty_like(like)
    alpha[0] = like[0] / like[0].sum()
    for t in range(1, n):
        alpha[t], _ = _forward_step(alpha[t - 1 : t], like[t : t + 1], trans(dt_s[t]))
    beta = np.ones_like(like)
    change = np.zeros(n)
    for t in range(n - 1, 0, -1):
        m = trans(dt_s[t])
        lb = like[t] * beta[t]
        pair = alpha[t - 1][:, None] * m * lb[None, :]
        change[t] = 1.0 - np.trace(pair) / pair.sum()
        beta[t - 1] = m @ lb
        beta[t - 1] /= beta[t - 1].sum()
    post = alpha * beta
    return post / post.sum(axis=1, keepdims=True), change


def filter_sequence(
    probabilities: np.ndarray, dt_s: np.ndarray, config: HMMConfig
) -> tuple[np.ndarray, np.ndarray]:
    """The causal filter over one column's whole series (T, 11): (posteriors, P(change))."""
    filt = DepthFilter(config)
    out = [filt.update(np.array([0]), row[None], dt) for row, dt in zip(probabilities, dt_s)]
    return (
        np.concatenate([o[0] for o in out]).astype(np.float64),
        np.concatenate([o[1] for o in out]).astype(np.float64),
    )


@dataclass(frozen=True)
class Event:
    """A depth change of one column. ``frame``/``time_s``: the change point (frame seq, its
    acquisition time in s); ``before``/``after``: atoms; ``probability``: posterior of
    ``after`` when detected; ``detected_frame``; ``delay_frames``/``delay_s``: detection delay
    (live filter: how late it was known; offline smoother: not a latency)."""

    column_id: int
    species: int
    frame: int
    time_s: float
    before: int
    after: int
    probability: float
    detected_frame: int
    delay_frames: int
    delay_s: float

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in EVENT_FIELDS}


EVENT_FIELDS = (
    "column_id",
    "species",
    "frame",
    "time_s",
    "before",
    "after",
    "probability",
    "detected_frame",
    "delay_frames",
    "delay_s",
)


class EventDetector:
    """Events from per-frame posteriors of many columns (module docstring). ``update`` takes
    the frame's seq, time (s), columns, their posteriors and their likelihoods."""

    def __init__(self, config: HMMConfig | None = None):
        self.config = config or HMMConfig()
        self._confirmed: dict[int, int] = {}
        self._history: dict[int, deque] = {}

    def update(
        self,
        frame: int,
        time_s: float,
        ids: np.ndarray,
        species: np.ndarray,
        posterior: np.ndarray,
        likelihood: np.ndarray,
    ) -> list[Event]:
        events = []
        log_like = np.log(likelihood)
        for cid, sp, post, ll in zip(ids, species, posterior, log_like):
            cid = int(cid)
            hist = self._history.setdefault(cid, deque(maxlen=self.config.event_window_frames))
            hist.append((int(frame), float(time_s), ll))
            best = int(np.argmax(post))
            if post[best] < self.config.event_threshold:
                continue
            before = self._confirmed.get(cid)
            self._confirmed[cid] = best
            if before is None or before == best:
                continue
            start, start_s = self._change_point(hist, before, best)
            events.append(
                Event(
                    cid,
                    int(sp),
                    start,
                    start_s,
                    before,
                    best,
                    float(post[best]),
                    int(frame),
                    int(frame) - start,
                    float(time_s) - start_s,
                )
            )
            while len(hist) > 1 and hist[0][0] < start:  # the next change starts from here
                hist.popleft()
        return events

    @staticmethod
    def _change_point(hist: deque, before: int, after: int) -> tuple[int, float]:
        """(frame, time) in ``hist`` where switching from ``before`` to ``after`` explains the
        likelihoods best."""
        diff = np.array([ll[after] - ll[before] for _, _, ll in hist])
        # score of a change at j: sum of log L(after) - log L(before) from j on
        score = np.cumsum(diff[::-1])[::-1]
        j = int(np.argmax(score))
        return hist[j][0], hist[j][1]
