"""End to end over real processes and sockets without the simulator: a synthetic session with
truth is replayed (``segdepth replay``) through ``segdepth serve`` into ``segdepth record``; the
recording is checked for every frame and the O-column score is computed against the truth.
With a random model the floor is structural (see test_e2e_demo.py for the bundled model)."""

import h5py
import numpy as np
import pytest
from engine_support import save_random_model, write_synthetic_session

from engine.model_io import load
from segdepth.demo import DemoConfig, run_pipeline

FRAMES, SIDE = 16, 128


@pytest.mark.slow
def test_replay_engine_recorder_processes(tmp_path):
    model = save_random_model(tmp_path / "random.pt")
    session = write_synthetic_session(tmp_path / "session.h5", FRAMES, SIDE)
    config = DemoConfig(
        frames=FRAMES,
        size=SIDE,
        out=str(tmp_path / "out"),
        headless=True,
        backend="torch-cpu",
        max_batch=4,
        timeout_s=300,
    )
    summary = run_pipeline(config, session, str(model))
    assert summary["frames_processed"] == FRAMES and summary["frames_lost"] == 0
    assert summary["engine_skipped"] == 0 and summary["backend"] == "torch-cpu"
    with h5py.File(tmp_path / "out" / "recording.h5", "r") as rec, h5py.File(session) as sim:
        assert rec["sequence"][:].tolist() == list(range(FRAMES))
        assert (rec["frames"][:] == sim["frames"][:]).all()
        assert rec["results/has_result"][:].all()
        assert (rec["results/batch_size"][:] <= 4).all()
        assert np.isfinite(rec["results/latency_ms"][:]).all()
        assert rec["results/model_id"][0].decode() == load(model).model_id
    occ = summary["oxygen_occupancy"]
    assert occ["oxygen_columns"] == len(occ["columns"]) > 0
