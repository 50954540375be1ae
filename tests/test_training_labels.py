"""Training targets: smoothed labels (Fig. 4: rings around the column) and loss weights (Fig. 5)."""

from __future__ import annotations

import numpy as np

from training.labels import TargetConfig, column_centres, loss_weights, make_targets, smooth_labels

PIXEL_PM = 5.0


def one_column(size: int = 41, radius: float = 4.0, depth: int = 8) -> np.ndarray:
    rows, cols = np.indices((size, size))
    c = size // 2
    return np.where((rows - c) ** 2 + (cols - c) ** 2 <= radius**2, depth, 0).astype(np.uint8)


def test_smoothed_labels_are_rings_decreasing_from_the_column():
    depth = one_column()
    labels = smooth_labels(depth, PIXEL_PM, ring_width_pm=25.0)  # 5 px of rings
    c = depth.shape[0] // 2
    assert labels[c, c] == 8 and labels.max() == 8
    assert np.array_equal(labels[depth > 0], depth[depth > 0])  # the column keeps its depth
    for ray in (labels[c, c:], labels[c:, c], labels[c, c::-1], np.diagonal(labels)[c:]):
        assert np.all(np.diff(ray.astype(int)) <= 0)  # monotone outward
    ring_values = set(np.unique(labels[(depth == 0) & (labels > 0)]))
    assert len(ring_values) >= 3 and max(ring_values) < 8  # several intermediate rings
    rows, cols = np.indices(depth.shape)
    dist = np.hypot(rows - c, cols - c)
    assert np.all(labels[dist > 4 + 5 + 1] == 0)  # background beyond the rings
    for r in (5.0, 6.0, 7.0):  # concentric: one value per distance (± 1 from pixelisation)
        ring = labels[np.isclose(dist, r)].astype(int)
        assert ring.max() - ring.min() <= 1


def test_weights_peak_at_centres_and_decrease_to_the_floor():
    depth = one_column()
    c = depth.shape[0] // 2
    w = loss_weights(
        depth.shape, np.array([[c, c]]), PIXEL_PM, sigma_pm=30.0, background_weight=0.2
    )
    assert w[c, c] == np.float32(1.0) and w.max() == np.float32(1.0)
    assert np.all(np.diff(w[c, c:]) < 0) and np.all(np.diff(w[c, c::-1]) < 0)
    assert np.isclose(w[0, 0], 0.2, atol=1e-3) and w.min() >= 0.2 - 1e-6
    assert w[c, c + 6] > w[c + 6, c + 6]  # radial: nearer is heavier


def test_make_targets_uses_depth_map_centroids_without_a_table():
    depth = np.zeros((60, 60), np.uint8)
    depth[10:15, 10:15] = 3
    depth[40:45, 30:35] = 6
    assert np.allclose(column_centres(depth), [[12, 12], [42, 32]])
    labels, w = make_targets(depth, None, PIXEL_PM, TargetConfig(16.0, 30.0, 0.1))
    assert labels.dtype == np.uint8 and w.dtype == np.float32
    assert w[12, 12] == np.float32(1.0) and w[42, 32] == np.float32(1.0)
    assert labels[42, 32] == 6 and labels[0, 59] == 0
