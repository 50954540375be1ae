"""The temporal depth model (engine.hmm) on synthetic per-frame evidence with known truth."""

import math

import numpy as np
import pytest

from engine.hmm import (
    LEGACY,
    DepthFilter,
    EventDetector,
    HMMConfig,
    filter_sequence,
    likelihoods,
    smooth,
    transition_matrix,
)
from streamer.domain import N_DEPTHS

DT = 0.13  # s between frames


def evidence(truth, rng, strength=4.0, outliers=(), spread=0.5):
    """Per-frame posteriors: a Dirichlet around the true depth (weight ``strength``, its
    neighbours ``spread`` x that), and at ``outliers`` a confident wrong answer."""
    probs = []
    for t, d in enumerate(truth):
        alpha = np.ones(N_DEPTHS)
        alpha[d] += strength
        for n in (d - 1, d + 1):
            if 0 <= n < N_DEPTHS:
                alpha[n] += strength * spread
        p = rng.dirichlet(alpha)
        if t in outliers:
            p = np.full(N_DEPTHS, 0.02)
            p[(d + 3) % N_DEPTHS] = 1 - 0.02 * (N_DEPTHS - 1)
        probs.append(p)
    return np.array(probs)


def confident(depth, p=0.99, neighbours=0.0):
    """A posterior with ``p`` at ``depth``, ``neighbours`` at each of depth +- 1."""
    row = np.full(N_DEPTHS, (1 - p - 2 * neighbours) / (N_DEPTHS - 3))
    row[depth] = p
    row[[depth - 1, depth + 1]] = neighbours
    return row / row.sum()


def test_transitions_allow_multi_atom_jumps_decaying_with_size():
    t = transition_matrix(0.1, jump_decay=0.5, max_jump=10)
    assert np.allclose(t.sum(axis=1), 1)
    assert t[5, 5] == pytest.approx(0.9)
    assert t[5, 4] == pytest.approx(t[5, 6]) and t[5, 3] == pytest.approx(t[5, 4] / 2)
    assert t[5, 1] == pytest.approx(t[5, 4] / 8) and t[5, 3] > 0
    legacy = transition_matrix(0.02)  # the old filter: +-1 atom only
    assert legacy[5, 3] == 0 and legacy[5, 4] == pytest.approx(0.01)
    assert legacy[0, 1] == pytest.approx(0.02)


def test_rates_are_per_second_whatever_the_frame_interval():
    config = HMMConfig(change_rate_per_s=0.2)
    for dt in (0.05, 1.0, 10.0):
        filt = DepthFilter(config)
        filt.update(np.array([1]), confident(5, 0.999999)[None], dt)
        _, change = filt.update(np.array([1]), np.full((1, N_DEPTHS), 1 / N_DEPTHS), dt)
        assert change[0] == pytest.approx(1 - math.exp(-0.2 * dt), rel=1e-3)
    assert LEGACY.change_probability(0.05) == LEGACY.change_probability(10.0) == 0.02


def test_a_two_atom_drop_is_followed_at_once_and_directly():
    truth = [6] * 30 + [4] * 30
    probs = np.array([confident(d, 0.5, 0.2) for d in truth])  # the network hedges +-1
    dt = np.full(len(truth), DT)
    new = filter_sequence(probs, dt, HMMConfig())[0].argmax(axis=1)
    old = filter_sequence(probs, dt, LEGACY)[0].argmax(axis=1)
    assert (new[:30] == 6).all() and (new[31:] == 4).all()  # one frame late at most
    assert 5 not in set(new)  # never stops half-way
    assert (old[30:35] != 4).all() and (old[31:35] == 5).all()  # the old one creeps


def test_a_biased_class_prior_does_not_pull_a_static_column():
    """The network saw 3-atom columns 4x as often as 4-atom ones in training: each frame's
    posterior leans to 3 although the image evidence favours the true 4 a little."""
    prior = np.full(N_DEPTHS, 1.0)
    prior[3] = 4.0
    like = np.full(N_DEPTHS, 0.02)
    like[4], like[3] = 0.5, 0.2
    rng = np.random.default_rng(0)
    frames = []
    for _ in range(60):
        row = like * rng.uniform(0.8, 1.2, N_DEPTHS) * prior
        frames.append(row / row.sum())
    frames = np.array(frames)
    assert (frames.argmax(axis=1) == 3).mean() > 0.5  # single frames read 3 mostly
    dt = np.full(len(frames), DT)
    corrected = HMMConfig(class_prior=tuple(prior))
    assert (filter_sequence(frames, dt, corrected)[0].argmax(axis=1)[5:] == 4).all()
    assert (smooth(frames, dt, corrected)[0].argmax(axis=1) == 4).all()
    uncorrected = filter_sequence(
        frames, dt, HMMConfig(class_prior=tuple(prior), prior_correction=False)
    )[0]
    assert (uncorrected.argmax(axis=1)[5:] == 3).all()
    # uniform prior = no correction; the likelihoods are proper distributions
    assert np.allclose(
        likelihoods(frames, HMMConfig()), likelihoods(frames, HMMConfig(prior_correction=False))
    )
    assert np.allclose(likelihoods(frames, corrected).sum(axis=1), 1)


def test_filter_ignores_single_frame_outliers_and_smoother_places_changes():
    rng = np.random.default_rng(3)
    truth = np.array([5] * 40 + [4] * 40 + [6] * 40)
    outliers = {10, 25, 55, 70, 100}
    probs = evidence(truth, rng, outliers=outliers)
    dt = np.full(len(truth), DT)
    filt, _ = filter_sequence(probs, dt, HMMConfig())
    sm, change = smooth(probs, dt, HMMConfig())
    raw, f_est, s_est = probs.argmax(axis=1), filt.argmax(axis=1), sm.argmax(axis=1)
    for t in outliers:
        assert raw[t] != truth[t] and f_est[t] == truth[t] and s_est[t] == truth[t]
    assert (s_est == truth).mean() >= (f_est == truth).mean() > (raw == truth).mean() + 0.2
    assert np.allclose(sm.sum(axis=1), 1)
    top2 = sorted(np.argsort(change)[-2:])
    assert abs(top2[0] - 40) <= 1 and abs(top2[1] - 80) <= 1
    assert change[np.r_[1:35, 45:75, 85:120]].max() < 0.2


def test_events_have_sizes_change_points_and_delays_and_ignore_noise():
    rng = np.random.default_rng(5)
    truth = np.array([6] * 30 + [4] * 25 + [6] * 25)
    probs = evidence(truth, rng, strength=12.0, outliers={10, 45}, spread=0.2)
    config = HMMConfig()
    filt, det = DepthFilter(config), EventDetector(config)
    events = []
    for t, p in enumerate(probs):
        post, _ = filt.update(np.array([9]), p[None], DT)
        events += det.update(
            t, 100 + t * DT, np.array([9]), np.array([2]), post, likelihoods(p[None], config)
        )
    assert [(e.before, e.after) for e in events] == [(6, 4), (4, 6)]
    for e, start in zip(events, (30, 55)):
        assert abs(e.frame - start) <= 1 and e.column_id == 9 and e.species == 2
        assert 0 <= e.delay_frames <= 5 and e.delay_s == pytest.approx(e.delay_frames * DT)
        assert e.time_s == pytest.approx(100 + e.frame * DT) and e.probability >= 0.9


def test_columns_are_independent_and_new_ids_start_from_their_evidence():
    filt = DepthFilter()
    for _ in range(10):
        out, _ = filt.update(np.array([1, 2]), np.stack([confident(3, 0.9), confident(8, 0.9)]), DT)
    assert out.argmax(axis=1).tolist() == [3, 8]
    flat = np.full(N_DEPTHS, 1 / N_DEPTHS)
    out, change = filt.update(np.array([1, 9]), np.stack([flat, flat]), DT)
    assert out[0].argmax() == 3  # memory of column 1 survives an uninformative frame
    assert np.allclose(out[1], 1 / N_DEPTHS) and change[1] == 0
    filt.reset()
    assert np.allclose(filt.update(np.array([1]), flat[None], DT)[0], 1 / N_DEPTHS)


def test_bad_input_is_rejected():
    filt = DepthFilter()
    with pytest.raises(ValueError, match="probabilities must be"):
        filt.update(np.array([0]), np.ones((1, 5)))
    with pytest.raises(ValueError, match="ids"):
        filt.update(np.array([0, 1]), np.ones((1, N_DEPTHS)))
    with pytest.raises(ValueError, match="per_frame_change"):
        HMMConfig(per_frame_change=1.5)
    with pytest.raises(ValueError, match="class_prior"):
        HMMConfig(class_prior=(1.0, 2.0))
