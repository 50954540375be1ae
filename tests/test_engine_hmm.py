"""The temporal depth model (engine.hmm) on synthetic per-frame evidence with known truth."""

import math
from collections import deque

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


class PerColumn:
    """The filter and event detector written one column at a time, as they were before the
    array form (2026-11-26): each column its own belief, confirmed depth and window of log
    likelihoods. The specification the array form must reproduce."""

    def __init__(self, config):
        self.config = config
        self.belief, self.confirmed, self.window = {}, {}, {}

    def update(self, frame, time_s, ids, species, probabilities, dt):
        c = self.config
        like = likelihoods(probabilities, c)
        move = transition_matrix(c.change_probability(round(dt, 3)), c.jump_decay, c.max_jump)
        posts, changes, events = [], [], []
        for cid, sp, lk in zip(ids.tolist(), species.tolist(), like):
            b = self.belief.get(cid)
            if b is None:
                post, change = lk / lk.sum(), 0.0
            else:
                post = (b @ move) * lk
                change = 1 - (b * np.diag(move) * lk).sum() / post.sum()
                post = post / post.sum()
            self.belief[cid] = post
            window = self.window.setdefault(cid, deque(maxlen=c.event_window_frames))
            window.append((frame, time_s, np.log(lk)))
            post32 = post.astype(np.float32)  # the filter's output, which events read
            best = int(np.argmax(post32))
            if post32[best] >= c.event_threshold:
                before = self.confirmed.get(cid)
                self.confirmed[cid] = best
                if before is not None and before != best:
                    diff = np.array([ll[best] - ll[before] for _, _, ll in window])
                    j = int(np.argmax(np.cumsum(diff[::-1])[::-1]))
                    start, start_s = window[j][0], window[j][1]
                    events.append((cid, sp, start, start_s, before, best, frame))
                    while len(window) > 1 and window[0][0] < start:
                        window.popleft()
            posts.append(post)
            changes.append(change)
        return np.array(posts), np.array(changes), events


def test_many_columns_at_once_give_each_columns_own_filter_and_events():
    """Columns seen in a changing order, leaving the view and coming back, new ids mid-way,
    irregular frame intervals, multi-atom changes: the array form equals the per-column one."""
    rng = np.random.default_rng(11)
    n_cols, n_frames = 60, 90
    truth = np.tile(rng.integers(2, 9, n_cols), (n_frames, 1))
    for col in rng.choice(n_cols, 25, replace=False):  # changes of 1-3 atoms, some undone
        a, b = np.sort(rng.choice(np.arange(5, n_frames), 2, replace=False))
        truth[a:b, col] = np.clip(truth[a, col] + rng.choice([-3, -2, -1, 1, 2]), 0, 10)
    for col in range(5):  # excursions shorter than the event window: back within 4-7 frames
        a = 20 + 12 * col
        truth[a : a + 4 + col % 4, col] -= 2
    config = HMMConfig()
    filt, det, reference = DepthFilter(config), EventDetector(config), PerColumn(config)
    ids_all, species_all = 1000 + np.arange(n_cols), rng.integers(1, 3, n_cols)
    time_s, n_events = 0.0, 0
    previous = np.arange(0)
    for t in range(n_frames):
        dt = DT * rng.uniform(0.8, 1.5)
        time_s += dt
        seen = rng.permutation(
            np.flatnonzero((rng.random(n_cols) > 0.1) & (np.arange(n_cols) < 40 + t))
        )
        if t % 3:  # often the previous frame's columns in the same order, as in a session
            unseen = np.setdiff1d(np.arange(min(n_cols, 40 + t)), previous)[: t % 3 - 1]
            seen = np.concatenate([previous, unseen]).astype(int)  # + one when t % 3 == 2
        previous = seen
        probs = np.stack([evidence([truth[t, c]], rng, strength=10.0, spread=0.2)[0] for c in seen])
        ids, species = ids_all[seen], species_all[seen]
        want_post, want_change, want_events = reference.update(t, time_s, ids, species, probs, dt)
        post, change = filt.update(ids, probs, dt)
        events = det.update(t, time_s, ids, species, post, likelihoods(probs, config))
        np.testing.assert_allclose(post, want_post, rtol=0, atol=1e-6)
        np.testing.assert_allclose(change, want_change, rtol=0, atol=1e-6)
        got = [
            (e.column_id, e.species, e.frame, e.time_s, e.before, e.after, e.detected_frame)
            for e in events
        ]
        assert got == want_events
        n_events += len(events)
    assert n_events >= 15  # the changes were found, so the window and change points were used
