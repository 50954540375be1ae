"""The HMM depth filter on synthetic per-frame probability sequences with known truth."""
import numpy as np
import pytest

from engine.hmm import N_DEPTHS, DepthFilter, HMMConfig, transition_matrix


def noisy_sequence(truth, rng, outliers=()):
    """Per-frame probability vectors: a Dirichlet around the true depth, and at ``outliers``
    a confident wrong answer (single-frame noise)."""
    probs = []
    for t, d in enumerate(truth):
        alpha = np.ones(N_DEPTHS)
        alpha[d] += 4.0
        for n in (d - 1, d + 1):
            if 0 <= n < N_DEPTHS:
                alpha[n] += 2.0
        p = rng.dirichlet(alpha)
        if t in outliers:
            p = np.full(N_DEPTHS, 0.02)
            p[(d + 3) % N_DEPTHS] = 1 - 0.02 * (N_DEPTHS - 1)
        probs.append(p)
    return np.array(probs)


def run_filter(probs, config=None):
    filt = DepthFilter(config)
    return np.array([filt.update(np.array([7]), p[None])[0] for p in probs])


def test_transition_matrix_is_stochastic_and_local():
    t = transition_matrix(0.1)
    assert np.allclose(t.sum(axis=1), 1)
    assert t[5, 5] == pytest.approx(0.9)
    assert t[5, 4] == pytest.approx(0.05) and t[5, 6] == pytest.approx(0.05)
    assert t[5, 7] == 0 and t[0, 1] == pytest.approx(0.1)


def test_filter_follows_a_vacancy_with_short_lag_and_ignores_single_frame_noise():
    rng = np.random.default_rng(3)
    truth = np.array([5] * 40 + [4] * 40 + [5] * 40)
    outliers = {10, 25, 55, 70, 100}
    probs = noisy_sequence(truth, rng, outliers)
    filtered = run_filter(probs)
    raw_est, filt_est = probs.argmax(axis=1), filtered.argmax(axis=1)
    assert np.allclose(filtered.sum(axis=1), 1, atol=1e-5)
    # single-frame outliers: the raw estimate is wrong there, the filtered one is not
    for t in outliers:
        assert raw_est[t] != truth[t] and filt_est[t] == truth[t]
    # real changes at frames 40 and 80 (raw accuracy ~60 %) are followed within 6 frames
    for change in (40, 80):
        lag = next(k for k in range(20) if filt_est[change + k] == truth[change])
        assert lag <= 6
        assert (filt_est[change + 7:change + 35] == truth[change]).all()
    # every filtered error is in the first frames (no history) or within the lag after a change
    allowed = {0, 1, *range(40, 47), *range(80, 87)}
    assert set(np.flatnonzero(filt_est != truth)) <= allowed
    assert (filt_est == truth).mean() > (raw_est == truth).mean() + 0.2


def test_columns_are_independent_and_new_ids_start_uniform():
    filt = DepthFilter(HMMConfig(switch_prob=0.01))
    sure3 = np.eye(N_DEPTHS)[3] * 0.9 + 0.1 / N_DEPTHS
    sure8 = np.eye(N_DEPTHS)[8] * 0.9 + 0.1 / N_DEPTHS
    for _ in range(10):
        out = filt.update(np.array([1, 2]), np.stack([sure3, sure8]))
    assert out.argmax(axis=1).tolist() == [3, 8]
    flat = np.full(N_DEPTHS, 1 / N_DEPTHS)
    out = filt.update(np.array([1, 9]), np.stack([flat, flat]))
    assert out[0].argmax() == 3  # memory of column 1 survives an uninformative frame
    assert np.allclose(out[1], 1 / N_DEPTHS)  # a new column starts from the uniform prior
    filt.reset()
    assert np.allclose(filt.update(np.array([1]), flat[None]), 1 / N_DEPTHS)


def test_bad_input_is_rejected():
    filt = DepthFilter()
    with pytest.raises(ValueError, match="probabilities must be"):
        filt.update(np.array([0]), np.ones((1, 5)))
    with pytest.raises(ValueError, match="ids"):
        filt.update(np.array([0, 1]), np.ones((1, N_DEPTHS)))
    with pytest.raises(ValueError, match="switch_prob"):
        HMMConfig(switch_prob=1.5)
