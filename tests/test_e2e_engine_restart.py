"""Kill the engine mid-session (SIGKILL): the recorder keeps every raw frame, and a restarted
engine resumes publishing results. Real processes: replay, serve, record, over loopback TCP."""

import time

import h5py
import numpy as np
import pytest
from engine_support import (
    ProcessGroup,
    record_argv,
    replay_argv,
    results_recorded,
    save_random_model,
    serve_argv,
    write_session,
)

# the source is slower than the engine, so few frames are in flight when it is killed and
# the replay is still sending when the new engine starts
T, SIDE, RATE_HZ = 80, 64, 8.0


@pytest.mark.slow
def test_engine_killed_and_restarted(tmp_path, segdepth_cmd, endpoint_factory):
    model = save_random_model(tmp_path / "random.pt")
    rng = np.random.default_rng(0)
    session = write_session(
        tmp_path / "session.h5", rng.poisson(20.0, (T, SIDE, SIDE)).astype(np.uint16)
    )
    recording = tmp_path / "recording.h5"
    ep = {k: endpoint_factory() for k in ("engine", "recorder", "results")}
    serve = serve_argv(segdepth_cmd, ep, model)
    procs = ProcessGroup(tmp_path)
    try:
        procs.start(
            "recorder",
            record_argv(segdepth_cmd, recording, ep["recorder"], ep["results"], "--grace-s", "30"),
        )
        procs.start("engine", serve)
        procs.start(
            "replay",
            replay_argv(
                segdepth_cmd,
                session,
                ep["engine"],
                ep["recorder"],
                *("--mode", "replay", "--rate", str(RATE_HZ)),
            ),
        )
        deadline = time.monotonic() + 120
        while results_recorded(recording) < 8:
            assert time.monotonic() < deadline, procs.log("engine")[-3000:]
            for name in ("engine", "recorder", "replay"):
                assert procs.procs[name].poll() is None, procs.log(name)[-3000:]
            time.sleep(0.2)
        procs.procs["engine"].kill()  # a crash: no clean-up, no eos
        procs.procs["engine"].wait(10)
        before = results_recorded(recording)
        time.sleep(1.0)  # a while without an engine
        procs.start("engine2", serve)
        assert procs.wait("replay", 120) == 0, procs.log("replay")[-3000:]
        assert procs.wait("engine2", 120) == 0, procs.log("engine2")[-3000:]
        assert procs.wait("recorder", 120) == 0, procs.log("recorder")[-3000:]
    finally:
        procs.close()
    with h5py.File(recording, "r") as f:
        assert f["sequence"][:].tolist() == list(range(T))  # every raw frame kept, in order
        assert (f["frames"][:] == h5py.File(session, "r")["frames"][:]).all()
        has = f["results/has_result"][:].astype(bool)
        backend = f["results/backend"][:]
    assert before >= 8
    assert has.sum() > before  # the restarted engine published more results
    assert has[-5:].all()  # ... up to the end of the session
    assert (backend[has] == b"torch-cpu").all()
