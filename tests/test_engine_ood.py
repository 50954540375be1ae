"""The engine's out-of-distribution checks: which frames the turn check takes and the session
score it warns on (engine.ood.TurnCheck), the warning levels per dose and the thinning that
measures them (training.ood_levels)."""

import math

import numpy as np
import pytest

from engine.ood import TURN_CHECK_EVERY, TurnCheck, default_check_every
from training.ood_levels import CHECKS_PER_VERDICT, running_medians, thinned, warning_level


def test_every_nth_frame_from_the_first_and_again_after_a_restart():
    check = TurnCheck(every=3)
    assert [s for s in range(10, 18) if check.due(s)] == [10, 13, 16]
    assert not check.due(16)  # the same frame again (a resend) is not checked twice
    assert check.due(2)  # seq went backwards: a restarted source starts over
    assert [s for s in range(3, 6) if check.due(s)] == [5]


def test_zero_never_checks():
    check = TurnCheck(every=0)
    assert not any(check.due(s) for s in range(20))


def test_turn_checks_by_default_on_a_gpu_or_when_the_warning_reads_them():
    assert default_check_every(on_gpu=True, warn_on="one-pass") == TURN_CHECK_EVERY
    assert default_check_every(on_gpu=True, warn_on="turn") == TURN_CHECK_EVERY
    assert default_check_every(on_gpu=False, warn_on="turn") == TURN_CHECK_EVERY
    assert default_check_every(on_gpu=False, warn_on="one-pass") == 0


def test_one_check_past_the_level_does_not_warn_a_session_alone():
    """The session score is the median of the last 3 checks: a lone high check (one in twenty
    in distribution) stays below a level of 0.2; two in the last three pass it."""
    assert CHECKS_PER_VERDICT == 3
    check = TurnCheck(every=1)
    assert math.isnan(check.score)  # no check yet: no verdict
    seen = []
    for score in (0.1, 0.1, 0.5, 0.1, 0.5, 0.5, 0.1):
        check.record(score)
        seen.append(check.score)
    assert seen == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.5, 0.5, 0.5])
    assert [s > 0.2 for s in seen] == [False] * 4 + [True] * 3
    # the offline rule that ood_levels --check reports is the engine's, check for check
    scores = np.random.default_rng(3).uniform(0, 1, 40)
    check = TurnCheck(every=1)
    engine_scores = []
    for score in scores:
        check.record(float(score))
        engine_scores.append(check.score)
    np.testing.assert_allclose(running_medians(scores), engine_scores)


def test_levels_interpolate_in_log_dose_and_fall_back_to_a_single_level():
    meta = {"ood_levels": {"dose_e_per_px": [1.0, 4.0], "one_pass": [0.6, 0.4], "turn": [0.2, 0.1]}}
    assert warning_level(meta, "one_pass", 2.0) == pytest.approx(0.5)  # halfway in log dose
    assert warning_level(meta, "turn", 0.1) == pytest.approx(0.2)  # the ends beyond them
    assert warning_level(meta, "turn", 50.0) == pytest.approx(0.1)
    old = {"ood_threshold": 0.61}  # a model file from before the levels per dose: no turn level
    assert warning_level(old, "one_pass", 2.0) == 0.61 and warning_level(old, "turn", 2.0) is None
    assert warning_level({}, "one_pass", 2.0) is None


def test_thinning_gives_poisson_counts_of_the_lower_dose():
    rng = np.random.default_rng(0)
    counts = rng.poisson(10.0, 200_000)
    low = thinned(counts, 0.25, np.random.default_rng(1))
    assert low.mean() == pytest.approx(2.5, rel=0.01)
    assert low.var() == pytest.approx(2.5, rel=0.02)  # Poisson: variance = mean
    assert math.isclose(float(np.mean(low == 0)), math.exp(-2.5), rel_tol=0.03)
    with pytest.raises(ValueError, match="lower dose"):
        thinned(counts, 1.5, rng)
