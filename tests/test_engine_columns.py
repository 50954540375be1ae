"""Drift estimation, column detection, stable ids and per-column occupancy on synthetic maps."""

import numpy as np
import pytest

from engine.columns import ColumnConfig, ColumnTracker, disk_average, disk_offsets, shift_back
from engine.drift import DriftEstimator, estimate_drift
from engine.occupancy import SessionAnalysis
from streamer.domain import SPECIES_CE, SPECIES_O, px_per_angstrom

PIXEL_PM = 5.3  # 0.45 Å disk = 8.5 px, 0.9 Å separation = 17 px
SIZE = 160


def truth_columns():
    """Ce on a 40 px grid below a vacuum band (rows < 40), O 20 px to the right of each Ce."""
    ys, xs = np.meshgrid(
        np.arange(60, SIZE - 20, 40.0), np.arange(30, SIZE - 40, 40.0), indexing="ij"
    )
    ce = np.stack([ys.ravel() + 0.3, xs.ravel() + 0.6], axis=1)
    o = ce + [0.0, 20.0]
    pos = np.concatenate([ce, o])
    species = np.array([SPECIES_CE] * len(ce) + [SPECIES_O] * len(o))
    return pos, species


def render(pos, species, depths, drift, rng, noise=0.05):
    """Species (3, H, W) and depth (11, H, W) probability maps with columns shifted by drift."""
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(float)
    sp = np.zeros((3, SIZE, SIZE))
    depth_cls = np.zeros((SIZE, SIZE), dtype=int)
    for (y, x), s, d in zip(pos + drift, species, depths):
        r2 = (yy - y) ** 2 + (xx - x) ** 2
        sp[s] += 0.95 * np.exp(-r2 / (2 * 4.0**2))
        depth_cls[r2 <= 10**2] = d
    sp[1:] = np.clip(sp[1:] + rng.normal(0, noise, sp[1:].shape), 0, 0.97)
    sp[0] = 1 - sp[1] - sp[2]
    depth = np.full((11, SIZE, SIZE), 0.02)
    np.put_along_axis(depth, depth_cls[None], 0.8, axis=0)
    depth += rng.uniform(0, 0.1, depth.shape)
    depth /= depth.sum(axis=0, keepdims=True)
    return sp.astype(np.float32), depth.astype(np.float32)


def test_drift_sign_and_subpixel_accuracy():
    rng = np.random.default_rng(0)
    pos, species = truth_columns()
    depths = np.full(len(pos), 5)
    ref, _ = render(pos, species, depths, np.zeros(2), rng)
    for shift in ([3.4, -2.7], [-0.4, 0.8], [9.6, 5.2]):
        img, _ = render(pos, species, depths, np.array(shift), rng)
        dy, dx = estimate_drift(1 - ref[0], 1 - img[0], search_px=15)
        assert dy == pytest.approx(shift[0], abs=0.3) and dx == pytest.approx(shift[1], abs=0.3)


def test_drift_search_stays_near_the_prior():
    rng = np.random.default_rng(1)
    pos, species = truth_columns()
    ref, _ = render(pos, species, np.full(len(pos), 5), np.zeros(2), rng)
    img, _ = render(pos, species, np.full(len(pos), 5), np.array([20.0, 21.0]), rng)
    # searched near the truth, it is found; searched near zero with a small window, it is not
    found = estimate_drift(1 - ref[0], 1 - img[0], prior=(18, 18), search_px=6)
    assert found == pytest.approx((20.0, 21.0), abs=0.3)
    near_zero = estimate_drift(1 - ref[0], 1 - img[0], prior=(0, 0), search_px=6)
    assert max(abs(near_zero[0]), abs(near_zero[1])) <= 6.5


def test_disk_average_leaves_out_pixels_outside_the_frame():
    maps = np.zeros((2, 20, 20), dtype=np.float32)
    maps[0] = 1.0
    maps[1, :, 19] = 1.0  # only the last column of the frame
    mean, inside = disk_average(
        maps, np.array([10.0, 10.0, -50.0]), np.array([5.0, 19.0, 5.0]), radius_px=3
    )
    assert inside.tolist() == [True, True, False]
    assert mean[:2, 0] == pytest.approx([1.0, 1.0])
    assert mean[0, 1] == 0.0
    # disk at the right edge: 18 of its 29 pixels are in the frame, 7 of those in column 19
    assert len(disk_offsets(3)) == 29
    assert mean[1, 1] == pytest.approx(7 / 18)


def test_disk_average_equals_a_pixel_by_pixel_mean_anywhere_in_and_around_the_frame():
    rng = np.random.default_rng(7)
    maps = rng.random((11, 37, 53)).astype(np.float32)
    y, x = rng.uniform(-6, 43, 200), rng.uniform(-6, 59, 200)
    mean, inside = disk_average(maps, y, x, radius_px=4.5)
    offsets = disk_offsets(4.5)
    for i in range(len(y)):
        py = (np.rint(y[i]) + offsets[:, 0]).astype(int)
        px = (np.rint(x[i]) + offsets[:, 1]).astype(int)
        keep = (py >= 0) & (py < 37) & (px >= 0) & (px < 53)
        assert inside[i] == keep.any()
        want = maps[:, py[keep], px[keep]].mean(axis=1) if keep.any() else np.zeros(11)
        np.testing.assert_allclose(mean[i], want, rtol=0, atol=1e-6)
    assert mean.dtype == np.float32 and (~inside).any() and inside.any()


@pytest.mark.parametrize(
    "dy, dx", [(0.3, -1.7), (-5.25, 3.5), (2.0, -3.0), (-0.999, 0.001), (0.0, 0.0), (500, -500)]
)
def test_shifting_maps_back_equals_scipys_linear_shift(dy, dx):
    """The reference's alignment (bilinear, edge values beyond the frame) equals
    ndimage.shift(order=1, mode="nearest") to float32 rounding, for sub-pixel, whole-pixel
    and beyond-the-frame shifts, on a non-square frame."""
    from scipy import ndimage

    maps = np.random.default_rng(3).random((3, 40, 56)).astype(np.float32)
    want = ndimage.shift(maps, (0, -dy, -dx), order=1, mode="nearest")
    got = shift_back(maps, dy, dx)
    assert got.dtype == np.float32 and got.shape == maps.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_tracker_keeps_ids_through_drift_and_follows_a_vacancy():
    rng = np.random.default_rng(2)
    pos, species = truth_columns()
    n = len(pos)
    vacancy_col, vacancy_frame = n - 1, 14  # an O column loses one atom at frame 14
    analysis = SessionAnalysis(PIXEL_PM, ColumnConfig(reference_frames=5), first_id=700)
    base_depth = 3 + np.arange(n) % 6
    seen_ids, events = None, []
    for t in range(24):
        drift = np.array([0.55 * t, -0.35 * t])
        depths = base_depth.copy()
        if t >= vacancy_frame:
            depths[vacancy_col] -= 1
        sp, dp = render(pos, species, depths, drift, rng)
        occ = analysis.update(sp, dp, frame=t, t_acq=50.0 + 0.1 * t)
        events += occ.events
        cols = occ.columns
        assert len(cols.ids) == n
        assert cols.drift_px == pytest.approx(tuple(drift), abs=0.5)
        # match detected to truth columns by position in this frame
        truth_now = pos + drift
        d2 = ((np.stack([cols.y_px, cols.x_px], 1)[:, None] - truth_now[None]) ** 2).sum(-1)
        match = d2.argmin(axis=1)
        assert np.sqrt(d2.min(axis=1)).max() < 1.0
        assert sorted(match) == list(range(n))
        assert (cols.species == species[match]).all()
        assert (cols.depth == depths[match]).all()
        ids_by_truth = dict(zip(match, cols.ids))
        if seen_ids is None:
            seen_ids = ids_by_truth
        assert ids_by_truth == seen_ids  # every column keeps its id through the session
        table = occ.table()
        assert table["id"] == [int(i) for i in cols.ids]
        assert set(table) == {
            "id",
            "x_px",
            "y_px",
            "species",
            "depth",
            "expected_depth",
            "confidence",
            "depth_filtered",
            "expected_filtered",
            "change_probability",
        }
        assert occ.buffers()["column_probabilities_filtered"].shape == (n, 11)
    assert analysis.tracker.reference_complete
    assert sorted(seen_ids.values()) == list(range(700, 700 + n))  # ids from first_id on
    row = list(cols.ids).index(seen_ids[vacancy_col])
    assert table["depth_filtered"][row] == base_depth[vacancy_col] - 1
    # the one change is one event, at the right frame, with its size and the column's species
    assert len(events) == 1
    e = events[0]
    assert (e.column_id, e.species) == (seen_ids[vacancy_col], species[vacancy_col])
    assert (e.before, e.after) == (base_depth[vacancy_col], base_depth[vacancy_col] - 1)
    assert e.frame == vacancy_frame and e.time_s == pytest.approx(50.0 + 0.1 * vacancy_frame)


def test_no_columns_in_flat_maps():
    tracker = ColumnTracker(PIXEL_PM)
    sp = np.full((3, 64, 64), 1 / 3, dtype=np.float32)
    dp = np.full((11, 64, 64), 1 / 11, dtype=np.float32)
    cols = tracker.update(sp, dp)
    assert len(cols.ids) == 0 and cols.probabilities.shape == (0, 11)
    with pytest.raises(ValueError, match="differs"):
        tracker.update(sp[:, :32], dp[:, :32])


def ceo2_110_columns(size, pixel_pm=PIXEL_PM, rotation_deg=0.0):
    """CeO2 [110] projected columns (y = [001], x = [1-10]) filling a frame of ``size`` px:
    Ce on the centred lattice (3.826 Å, 0), (1.913 Å, 2.706 Å); O at Ce +- a/4 along y;
    optionally rotated about the frame centre."""
    a, px = 5.411, px_per_angstrom(pixel_pm)
    ce = np.array(
        [
            (j * a / 2, i * a / np.sqrt(2) / 2)
            for i in range(-4, 20)
            for j in range(-4, 20)
            if (i + j) % 2 == 0
        ]
    )  # (y, x) Å
    o = np.concatenate([ce + [a / 4, 0], ce - [a / 4, 0]])
    pos = np.concatenate([ce, o]) * px
    species = np.array([SPECIES_CE] * len(ce) + [SPECIES_O] * len(o))
    c = size / 2
    t = np.deg2rad(rotation_deg)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    pos = (pos - c) @ rot.T + c
    keep = ((pos > 15) & (pos < size - 15)).all(axis=1)
    return pos[keep], species[keep]


def render_lattice(pos, species, size, rng, sigma_px=4.0, noise=0.05):
    """Species probability maps (3, H, W) of columns at ``pos`` (y, x) px."""
    yy, xx = np.mgrid[:size, :size].astype(float)
    sp = np.zeros((3, size, size))
    for (y, x), s in zip(pos, species):
        sp[s] += 0.95 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma_px**2))
    sp[1:] = np.clip(sp[1:] + rng.normal(0, noise, sp[1:].shape), 0, 0.97)
    sp[0] = 1 - sp[1] - sp[2]
    return sp.astype(np.float32)


def test_registration_survives_steps_beyond_the_ce_o_distance_and_a_slow_rotation():
    """Steps of 1.45-1.55 Å between frames (beyond a/4 = 1.353 Å, where a species-blind map
    lines up two thirds of the columns) and a rotation of 0.05 deg per frame: every column
    keeps its id and its species, and the drift is found within 0.1 Å."""
    size, px = 224, px_per_angstrom(PIXEL_PM)
    rng = np.random.default_rng(4)
    steps_A = [
        (0, 0),
        (1.45, 0),
        (0, -1.5),
        (-1.55, 0.2),
        (0.3, 1.45),
        (-1.45, -0.3),
        (1.5, 0),
        (0, 1.5),
    ] + [(0.05, -0.05)] * 8
    drift = np.cumsum(np.array(steps_A) * px, axis=0)
    base, species = ceo2_110_columns(size, rotation_deg=0.0)
    tracker = ColumnTracker(PIXEL_PM, ColumnConfig(reference_frames=1))
    for t, d in enumerate(drift):
        pos = ceo2_110_columns(size, rotation_deg=0.05 * t)[0] if t else base
        sp = render_lattice(
            base + d + (pos - base if len(pos) == len(base) else 0), species, size, rng
        )
        cols = tracker.update(sp, np.full((11, size, size), 1 / 11, np.float32))
        assert np.hypot(*(np.array(cols.drift_px) - d)) < 0.1 * px, t
        if t == 0:
            ids = dict(zip(cols.ids, zip(cols.y_px, cols.x_px)))
            kinds = dict(zip(cols.ids, cols.species))
        else:
            assert set(cols.ids) <= set(ids) and len(cols.ids) > 0.8 * len(ids)
            assert all(kinds[i] == s for i, s in zip(cols.ids, cols.species))


def test_species_resolved_registration_gives_the_ce_o_shift_no_false_peak():
    """At a shift of a/4 along [001] a species-blind map lines up two thirds of its columns
    (a false peak of ~2/3 height); P(Ce) and P(O) registered apart give at most a third."""
    size, px = 224, px_per_angstrom(PIXEL_PM)
    rng = np.random.default_rng(6)
    pos, species = ceo2_110_columns(size)
    sp = render_lattice(pos, species, size, rng, noise=0.0)
    shift = int(round(5.411 / 4 * px))
    blind = DriftEstimator(1 - sp[0]).correlation(1 - sp[0])
    resolved = DriftEstimator(sp[1:]).correlation(sp[1:])
    assert blind[shift, 0] / blind[0, 0] > 0.5
    assert resolved[shift, 0] / resolved[0, 0] < 0.35


def test_registration_window_is_checked_against_the_lattice():
    with pytest.raises(ValueError, match="shortest lattice translation"):
        ColumnConfig(drift_search_A=1.7)
