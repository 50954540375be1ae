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


class ColumnRows:
    """Row of each column id in per-column arrays: append-only, a new id gets the next row
    (ids are unique within one call)."""

    def __init__(self) -> None:
        self._row: dict[int, int] = {}
        self._last: tuple[np.ndarray, np.ndarray] | None = None  # (ids, rows) of the last call

    def __len__(self) -> int:
        return len(self._row)

    def rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row of each id (n,), which ids were new (n,)); new ids are given rows here."""
        ids = np.asarray(ids)
        # a session's columns are mostly the same from frame to frame: skip the dict lookups
        if self._last is not None and np.array_equal(ids, self._last[0]):
            return self._last[1].copy(), np.zeros(len(ids), bool)
        rows, new = self._lookup(ids)
        self._last = (ids.copy(), rows.copy())
        return rows, new

    def _lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        get = self._row.get
        rows = np.fromiter((get(i, -1) for i in ids.tolist()), np.int64, len(ids))
        new = rows < 0
        for j in np.flatnonzero(new):
            rows[j] = self._row[int(ids[j])] = len(self._row)
        return rows, new


def _grown(array: np.ndarray, rows: int, fill: float) -> np.ndarray:
    """``array`` with rows of ``fill`` added up to ``rows`` rows."""
    if len(array) >= rows:
        return array
    extra = np.full((rows - len(array), *array.shape[1:]), fill, array.dtype)
    return np.concatenate([array, extra])


class DepthFilter:
    """Causal filter for many columns at once, keyed by column id (new ids start uniform);
    the beliefs of all columns are one (columns, 11) array."""

    def __init__(self, config: HMMConfig | None = None):
        self.config = config or HMMConfig()
        self._transitions = _Transitions(self.config)
        self.reset()

    def reset(self) -> None:
        """Forget every column (a new session)."""
        self._rows = ColumnRows()
        self._belief = np.zeros((0, N_DEPTHS))

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
        rows, new = self._rows.rows(ids)
        self._belief = _grown(self._belief, len(self._rows), 1.0 / N_DEPTHS)
        posterior, change = _forward_step(self._belief[rows], like, self._transitions(dt_s))
        posterior[new] = like[new] / like[new].sum(axis=1, keepdims=True)
        change[new] = 0.0
        self._belief[rows] = posterior
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
    the frame's seq, time (s), columns, their posteriors and their likelihoods. Per column it
    keeps the last confirmed depth and a ring of its last ``event_window_frames`` log
    likelihoods (those since its last change point count)."""

    def __init__(self, config: HMMConfig | None = None):
        self.config = config or HMMConfig()
        w = self.config.event_window_frames
        self._rows = ColumnRows()
        self._confirmed = np.zeros(0, np.int64)  # -1: none yet
        self._since = np.zeros(0, np.int64)  # frame of the column's last change point
        self._seen = np.zeros(0, np.int64)  # frames the column was seen in
        self._log_like = np.zeros((0, w, N_DEPTHS))
        self._frame = np.zeros((0, w), np.int64)
        self._time = np.zeros((0, w))

    def _grow(self) -> None:
        n = len(self._rows)
        self._confirmed = _grown(self._confirmed, n, -1)
        self._since = _grown(self._since, n, np.iinfo(np.int64).min)
        self._seen = _grown(self._seen, n, 0)
        self._log_like = _grown(self._log_like, n, 0.0)
        self._frame = _grown(self._frame, n, 0)
        self._time = _grown(self._time, n, 0.0)

    def update(
        self,
        frame: int,
        time_s: float,
        ids: np.ndarray,
        species: np.ndarray,
        posterior: np.ndarray,
        likelihood: np.ndarray,
    ) -> list[Event]:
        rows, _ = self._rows.rows(ids)
        self._grow()
        slot = self._seen[rows] % self.config.event_window_frames
        self._log_like[rows, slot] = np.log(likelihood)
        self._frame[rows, slot] = int(frame)
        self._time[rows, slot] = float(time_s)
        self._seen[rows] += 1
        posterior = np.asarray(posterior)
        best = posterior.argmax(axis=1)
        p_best = posterior[np.arange(len(best)), best]
        sure = p_best >= self.config.event_threshold
        before = self._confirmed[rows]
        self._confirmed[rows[sure]] = best[sure]
        events = []
        for j in np.flatnonzero(sure & (before >= 0) & (before != best)):
            row = rows[j]
            start, start_s = self._change_point(row, int(before[j]), int(best[j]))
            events.append(
                Event(
                    int(ids[j]),
                    int(species[j]),
                    start,
                    start_s,
                    int(before[j]),
                    int(best[j]),
                    float(p_best[j]),
                    int(frame),
                    int(frame) - start,
                    float(time_s) - start_s,
                )
            )
            self._since[row] = start  # the next change starts from here
        return events

    def _change_point(self, row: int, before: int, after: int) -> tuple[int, float]:
        """(frame, time) in the column's window where switching from ``before`` to ``after``
        explains its likelihoods best."""
        w = self.config.event_window_frames
        n = min(int(self._seen[row]), w)
        slots = (self._seen[row] - n + np.arange(n)) % w  # oldest first
        slots = slots[self._frame[row, slots] >= self._since[row]]
        ll = self._log_like[row, slots]
        # score of a change at j: sum of log L(after) - log L(before) from j on
        score = np.cumsum((ll[:, after] - ll[:, before])[::-1])[::-1]
        j = int(np.argmax(score))
        return int(self._frame[row, slots[j]]), float(self._time[row, slots[j]])
