"""The paper's four metrics, calibration, temperature scaling and gradient spread on hand-made
cases."""

from __future__ import annotations

import numpy as np
import pytest

from training.calibration import fit_temperature
from training.gradients import gradient_spread_px
from training.metrics import Calibration, DepthMetrics, centre_mask

TRUTH = np.array([[0, 0, 0, 0], [0, 3, 3, 0], [0, 3, 5, 0], [0, 0, 0, 0]])
ESTIMATE = np.array([[0, 1, 0, 0], [0, 3, 2, 0], [0, 0, 5, 0], [0, 0, 0, 2]])


def test_four_metrics_match_hand_counts():
    m = DepthMetrics()
    centre = np.zeros((4, 4), bool)
    centre[1:3, 1:3] = True
    m.update(ESTIMATE, TRUTH, centre)
    s = m.summary()
    # correct pixels: 16 - 4 wrong ((0,1), (1,2), (2,1), (3,3)) = 12
    assert s["pixelwise_accuracy"] == pytest.approx(12 / 16)
    # centre pixels: (1,1) ok, (1,2) wrong, (2,1) wrong, (2,2) ok
    assert s["centre_accuracy"] == pytest.approx(2 / 4)
    # column pixels (truth > 0): 4, estimated > 0 among them: (1,1), (1,2), (2,2) = 3
    assert s["detection_rate"] == pytest.approx(3 / 4)
    # estimated > 0: 5 pixels, of which background in truth: (0,1), (3,3) = 2
    assert s["hallucination_rate"] == pytest.approx(2 / 5)
    assert m.confusion.sum() == 16 and m.confusion[3, 2] == 1 and m.confusion[0, 1] == 1


def test_metrics_pool_pixels_over_images():
    m = DepthMetrics()
    m.update(ESTIMATE, TRUTH)
    m.update(TRUTH, TRUTH)
    assert m.summary()["pixelwise_accuracy"] == pytest.approx(28 / 32)
    assert m.summary()["hallucination_rate"] == pytest.approx(2 / 9)


def test_centre_radii_scale_with_pixel_size():
    centres = np.array([[20.0, 20.0], [20.0, 60.0]])
    # at twice the paper's pixel size the Ce radius is 8 px and the O radius 6 px
    mask = centre_mask((41, 81), centres, np.array([1, 2]), pixel_size_pm=10.6)
    assert mask[20, 28] and not mask[20, 29]
    assert mask[20, 66] and not mask[20, 67]
    paper = centre_mask((41, 81), centres, np.array([1, 2]), pixel_size_pm=5.3)
    assert paper[20, 36] and not paper[20, 37]  # 16 px at 5.3 pm/px


def test_ece_hand_example():
    c = Calibration(n_bins=10)
    # bin [0.9, 1): confidences 0.95 x4, 3 correct -> |0.75 - 0.95| = 0.2 with weight 4/6
    # bin [0.5, 0.6): confidences 0.55 x2, 1 correct -> |0.5 - 0.55| = 0.05 with weight 2/6
    c.update(np.array([0.95, 0.95, 0.95, 0.95, 0.55, 0.55]), np.array([1, 1, 1, 0, 1, 0], bool))
    assert c.ece() == pytest.approx(4 / 6 * 0.2 + 2 / 6 * 0.05)
    table = c.table()
    assert table["accuracy"][9] == pytest.approx(0.75) and table["count"][5] == 2


def test_temperature_fit_recovers_the_generating_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(20000, 11))
    true_t = 2.0
    p = np.exp(logits / true_t)
    p /= p.sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(11, p=row) for row in p])
    assert fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.05)


def test_gradient_spread_is_the_distance_of_the_mass():
    g = np.zeros((21, 21))
    g[10, 13] = -2.0  # 3 px to the right of the pixel; sign does not matter
    assert gradient_spread_px(g, (10, 10)) == pytest.approx(3.0)
