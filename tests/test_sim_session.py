"""Simulated sessions: frames with known column occupancy, drift and Poisson counts."""

import json

import h5py
import numpy as np
import pytest

from sim_source.session import SessionConfig, plan_session, write_session

CFG = SessionConfig(frames=40, seed=2, size=128, dose_e_per_px=50.0, events=2)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    path = tmp_path_factory.mktemp("session") / "s.h5"
    truth = write_session(path, CFG, progress=False)
    with h5py.File(path, "r") as f:
        data = {
            k: f[k][:]
            for k in (
                "frames",
                "timestamps_s",
                "sequence",
                "truth/columns",
                "truth/depth",
                "truth/drift_px",
            )
        }
        attrs, events = dict(f.attrs), json.loads(f["truth"].attrs["events"])
    return path, truth, data, attrs, events


def test_layout_follows_the_contract(session):
    _, _, data, attrs, _ = session
    assert data["frames"].shape == (40, 128, 128) and data["frames"].dtype == np.uint16
    assert np.allclose(np.diff(data["timestamps_s"]), CFG.frame_interval_s)
    assert np.array_equal(data["sequence"], np.arange(40))
    assert attrs["dose_e_per_px"] == 50.0 and attrs["source"] == "simulated"
    assert attrs["pixel_size_pm"] == pytest.approx(5.3, rel=0.02)
    assert data["truth/depth"].shape == (40, len(data["truth/columns"]))
    assert data["truth/drift_px"].shape == (40, 2)
    assert np.all(data["truth/drift_px"][0] == 0) and np.abs(data["truth/drift_px"]).max() > 0


def test_chosen_oxygen_columns_lose_and_regain_atoms_at_known_times(session):
    _, _, data, _, events = session
    depth, columns = data["truth/depth"], data["truth/columns"]
    assert len(events) == 2
    changing = np.flatnonzero(np.any(depth != depth[0], axis=0))
    assert sorted(changing) == sorted(e["column_id"] for e in events)
    for e in events:
        col = depth[:, e["column_id"]]
        assert columns["species"][e["column_id"]] == 2
        a, b = e["start_frame"], e["end_frame"]
        assert np.all(col[a:b] == col[0] - e["atoms_lost"]) and e["atoms_lost"] > 0
        assert np.all(col[:a] == col[0]) and np.all(col[b:] == col[0])


def test_frames_are_poisson_counts_of_the_drifted_states(session):
    _, _, data, _, _ = session
    frames = data["frames"].astype(float)
    grid, tables, truth = plan_session(CFG)
    vacuum_rows = int(0.3 * grid.fov_A / (grid.pixel_size_pm / 100)) - 20
    vac = frames[:, 2:vacuum_rows, 5:-5]
    assert vac.mean() == pytest.approx(CFG.dose_e_per_px, rel=0.03)  # vacuum mean = dose
    assert vac.var() == pytest.approx(vac.mean(), rel=0.1)  # Poisson: variance = mean
    # fresh noise per frame: two frames of the same state differ
    assert not np.array_equal(frames[0], frames[1])


def test_same_seed_same_session(session, tmp_path):
    _, _, data, _, _ = session
    write_session(tmp_path / "a.h5", CFG, progress=False)
    with h5py.File(tmp_path / "a.h5", "r") as f:
        assert np.array_equal(f["frames"][:], data["frames"])
        assert np.array_equal(f["truth/depth"][:], data["truth/depth"])
        assert np.array_equal(f["truth/drift_px"][:], data["truth/drift_px"])


def test_drift_truth_is_the_shift_of_frame_t_against_frame_0(tmp_path):
    from skimage.registration import phase_cross_correlation

    cfg = SessionConfig(frames=12, seed=5, size=128, dose_e_per_px=1e5, events=0, drift_step_px=0.8)
    truth = write_session(tmp_path / "d.h5", cfg, progress=False)
    with h5py.File(tmp_path / "d.h5", "r") as f:
        first, last = f["frames"][0].astype(float), f["frames"][-1].astype(float)
    assert np.all(truth.depth == truth.depth[0])  # no events: one state
    m = 12  # compare away from the borders the shift fills in
    shift, _, _ = phase_cross_correlation(last[m:-m, m:-m], first[m:-m, m:-m], upsample_factor=20)
    expected = truth.drift_px[-1]
    assert np.linalg.norm(expected) > 1.0
    assert np.allclose(shift, expected, atol=0.2)


def test_the_recorders_reader_opens_a_simulated_session(session):
    from streamer.session_file import open_session

    path, _, data, _, _ = session
    opened = open_session(path)
    assert len(opened) == 40 and opened.frame_interval_s == pytest.approx(CFG.frame_interval_s)
    frames = dict(opened.iter_frames())
    assert np.array_equal(frames[39], data["frames"][39])


def test_the_evaluation_session_has_a_gradient_and_events_a_constant_answer_misses():
    from dataclasses import replace

    from sim_source.session import EVALUATION

    _, tables, truth = plan_session(replace(EVALUATION, frames=60, seed=3))
    species, depth = truth.columns["species"], truth.depth
    assert len(set(depth[0][species == 2])) >= 4  # thickness gradient over the O columns
    events = truth.events
    assert {e["species"] for e in events} == {1, 2}
    assert {e["atoms_lost"] for e in events} == {1, 2}
    never_back = [e for e in events if e["end_frame"] == 60]
    assert len(never_back) >= 1
    for e in events:
        col = depth[:, e["column_id"]]
        a, b = e["start_frame"], e["end_frame"]
        assert np.all(col[a:b] == col[0] - e["atoms_lost"]) and np.all(col[:a] == col[0])
        assert species[e["column_id"]] == e["species"]
    assert len(tables) == len(np.unique(truth.state))


def test_atoms_vibrate_by_default_and_a_static_lattice_is_an_option(tmp_path):
    """One frozen-phonon snapshot (the training libraries' physics) moves the atoms, not the
    vacuum; ``thermal=False`` (``--static-lattice``) gives the old static-lattice images."""
    base = SessionConfig(frames=1, seed=3, size=128, dose_e_per_px=2e4, events=0)
    assert base.thermal
    images = {}
    for thermal in (True, False):
        path = tmp_path / f"t{thermal}.h5"
        write_session(path, SessionConfig(**{**base.__dict__, "thermal": thermal}), progress=False)
        with h5py.File(path, "r") as f:
            images[thermal] = f["frames"][0] / base.dose_e_per_px
            assert json.loads(f.attrs["config"])["thermal"] is thermal
    grid, _, _ = plan_session(base)
    vacuum_rows = int(0.3 * grid.fov_A / (grid.pixel_size_pm / 100)) - 20
    diff = np.abs(images[True] - images[False])
    noise = diff[:vacuum_rows].mean()  # counting noise alone (≈ 0.005 at this dose)
    crystal = diff[vacuum_rows + 30 :].mean()  # measured 0.064
    print(f"mean |thermal - static|: vacuum {noise:.4f}, crystal {crystal:.4f}")
    assert crystal > 2 * max(noise, 0.004)
