"""Post-processing on the inference device (engine.device_maps) gives the host path's answers:
maps, column averages and drift alone, a simulated session's column tables frame by frame, and
the engine's results through ``serve`` over real sockets. Run on the CPU here and on CUDA too
where a GPU is present."""

import threading

import h5py
import numpy as np
import pytest
import torch
from scipy import ndimage

from engine import backends
from engine.columns import disk_average
from engine.device_maps import DevicePrediction, TorchFrameMaps, post_stream
from engine.drift import DriftEstimator
from engine.model_io import default_model_path, load
from engine.occupancy import SessionAnalysis
from engine.prediction import Prediction
from engine.serve import ServeConfig, Server
from sim_source.session import SessionConfig, write_session  # abTEM imported on use
from streamer import sockets
from streamer.protocol import encode_control, encode_frame
from training.inference import turn_scores, uncertainty_scores

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here"),
        ],
    ),
]
SESSION = SessionConfig(frames=20, seed=5, size=128, dose_e_per_px=10.0, events=2)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def device_and_host(depth, species, device, dtype) -> tuple[DevicePrediction, Prediction]:
    """Probabilities (B, 11, H, W) and (B, 3, H, W) as a prediction on ``device`` in ``dtype``,
    and the host prediction of what a host copy of those tensors holds (float16 -> float32)."""
    on_device = DevicePrediction(
        *(torch.from_numpy(p).to(device=device, dtype=dtype) for p in (depth, species))
    )
    return on_device, Prediction(on_device.depth_prob, on_device.species_prob)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_maps_reduced_on_the_device_equal_the_host_maps(device, dtype):
    rng = np.random.default_rng(0)
    depth = softmax(rng.normal(0, 2, (2, 11, 48, 40)))
    species = softmax(rng.normal(0, 2, (2, 3, 48, 40)))
    depth[0, 3:5, 10, 10] = depth[0, :, 10, 10].max()  # a tie: the first channel wins
    on_device, host = device_and_host(depth, species, device, dtype)
    for got, want in zip(on_device.maps(), host.maps()):
        assert got.dtype == want.dtype and np.array_equal(got, want)
    assert host.maps()[0][0, 10, 10] == 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_pass_scores_reduced_on_the_device_equal_the_host_ones(device, dtype):
    rng = np.random.default_rng(1)
    depth = softmax(rng.normal(0, 2, (3, 11, 48, 40)))
    depth[2, 0] = 2.0  # frame 2: background everywhere, the score falls back to the mean
    species = softmax(rng.normal(0, 2, (3, 3, 48, 40)))
    on_device, host = device_and_host(depth, species, device, dtype)
    want = uncertainty_scores(*host.maps()[:2])
    assert (host.maps()[0][2] == 0).all() and (host.maps()[0][:2] > 0).any()
    np.testing.assert_allclose(on_device.uncertainty_scores(), want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(host.uncertainty_scores(), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_turn_scores_on_the_device_equal_the_host_ones(device, dtype):
    rng = np.random.default_rng(2)
    depth = softmax(rng.normal(0, 2, (3, 11, 40, 40)))
    turned = softmax(rng.normal(0, 2, (2, 11, 40, 40)))
    depth[2, 0], turned[1, 0] = 2.0, 2.0  # frame 2 and its turn: no column, all pixels count
    species = softmax(rng.normal(0, 2, (3, 3, 40, 40)))
    pred, host = device_and_host(depth, species, device, dtype)
    turned_pred, turned_host = device_and_host(turned, species[:2], device, dtype)
    due = [0, 2]
    want = host.turn_scores(due, turned_host)
    back = np.rot90(turned_host.depth_prob, -1, axes=(2, 3))
    np.testing.assert_array_equal(want, turn_scores(host.depth_prob[due], back))
    assert want[0] != want[1]
    np.testing.assert_allclose(pred.turn_scores(due, turned_pred), want, rtol=0, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_post_stream_waits_for_its_batch_and_not_for_the_next_inference():
    """Post-processing on its own stream reads the probabilities only once the inference
    stream has written them (they are written after a slow kernel here: read early, the maps
    would be all zeros), and gives the host answers while more work is queued behind."""
    rng = np.random.default_rng(4)
    depth = softmax(rng.normal(0, 2, (2, 11, 256, 256)))
    species = softmax(rng.normal(0, 2, (2, 3, 256, 256)))
    src = [torch.from_numpy(p).cuda() for p in (depth, species)]
    probs = [torch.zeros_like(t) for t in src]
    slow = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    for _ in range(30):  # "inference": tens of ms on the inference (current) stream
        slow = (slow @ slow).clamp_(-1, 1)
    for dst, t in zip(probs, src):
        dst.copy_(t)
    pred = DevicePrediction(*probs)
    for _ in range(30):  # the next batch's inference, queued behind
        slow = (slow @ slow).clamp_(-1, 1)
    stream = torch.cuda.Stream()
    with post_stream(pred, stream):
        got = pred.maps()
    want = Prediction(depth, species).maps()
    for g, w in zip(got, want):
        assert np.array_equal(g, w)
    assert pred.written is not None and stream.query()
    assert DevicePrediction(*(t.cpu() for t in src)).written is None


@pytest.mark.parametrize("device", DEVICES)
def test_column_averages_on_the_device_equal_the_host_ones_at_the_frame_edges(device):
    rng = np.random.default_rng(1)
    depth = softmax(rng.normal(0, 1, (1, 11, 50, 60)))[0]
    y = np.array([0.2, 25.4, 49.6, 30.0, -20.0, 10.5])
    x = np.array([0.4, 30.6, 59.5, -3.0, 10.0, 70.0])
    want, want_inside = disk_average(depth, y, x, 4.2)
    maps = TorchFrameMaps(torch.zeros(3, 50, 60), torch.from_numpy(depth).to(device))
    got, inside = maps.disk_average(y, x, 4.2)
    assert np.array_equal(inside, want_inside) and not inside[4]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_drift_on_the_device_equals_the_host_registration(device):
    rng = np.random.default_rng(2)
    reference = ndimage.gaussian_filter(rng.random((2, 96, 80)), (0, 2, 2)).astype(np.float32)
    host, on_device = DriftEstimator(reference), DriftEstimator(reference, device)
    for shift in ([1.3, -0.6], [-2.7, 2.2], [0.4, 0.1]):
        moved = ndimage.shift(reference, (0, *shift), order=3, mode="wrap").astype(np.float32)
        moved += rng.normal(0, 0.01, moved.shape).astype(np.float32)
        np.testing.assert_allclose(
            on_device.correlation(torch.from_numpy(moved).to(device)),
            host.correlation(moved),
            atol=1e-5,
        )
        want = host.estimate(moved, prior=(0.5, 0.0), search_px=4.0)
        got = on_device.estimate(torch.from_numpy(moved).to(device), (0.5, 0.0), 4.0)
        assert got == pytest.approx(want, abs=1e-3)
        assert want == pytest.approx(shift, abs=0.3)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """A simulated session (vibrating atoms, drift, two O events) and the bundled model."""
    pytest.importorskip("abtem", reason="the session is simulated with abTEM")
    path = tmp_path_factory.mktemp("session") / "s.h5"
    write_session(path, SESSION, progress=False)
    with h5py.File(path, "r") as f:
        frames, pixel_pm = f["frames"][:], float(f.attrs["pixel_size_pm"])
    return frames, pixel_pm, load(default_model_path())


def assert_same_columns(got, want):
    """Two frames' Occupancy equal: ids, species, depths and events exactly, floats closely."""
    g, w = got.table(), want.table()
    for key in ("id", "species", "depth", "depth_filtered"):
        assert g[key] == w[key], key
    for key in ("x_px", "y_px", "expected_depth", "confidence", "expected_filtered"):
        np.testing.assert_allclose(g[key], w[key], rtol=0, atol=1e-4, err_msg=key)
    np.testing.assert_allclose(got.columns.drift_px, want.columns.drift_px, atol=1e-3)
    assert [e.as_dict() for e in got.events] == [e.as_dict() for e in want.events]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_session_tracked_on_the_device_gives_the_host_tables(session, device, dtype):
    frames, pixel_pm, loaded = session
    backend = backends.create("torch-cpu", loaded, max_batch=4)
    pred = backend.infer(frames / np.float32(SESSION.dose_e_per_px))
    on_device = DevicePrediction(
        *(
            torch.from_numpy(p).to(device=device, dtype=dtype)
            for p in (pred.depth_prob, pred.species_prob)
        )
    )
    host = Prediction(on_device.depth_prob, on_device.species_prob)
    a, b = SessionAnalysis(pixel_pm), SessionAnalysis(pixel_pm)
    columns, wanted = 0, []
    for i in range(len(frames)):
        want = a.update_maps(host.frame(i), frame=i)
        got = b.update_maps(on_device.frame(i), frame=i)
        assert_same_columns(got, want)
        columns += len(want.columns.ids)
        wanted.append(want)
    assert columns >= 5 * len(frames)  # the model found the particle's columns
    # the engine's way: a batch's frames of one session together; series of 5 frames, the
    # second one across the end of the column reference (its first 8 frames)
    c = SessionAnalysis(pixel_pm)
    series = []
    for start in range(0, len(frames), 5):
        chunk = range(start, min(start + 5, len(frames)))
        series += c.update_series([on_device.frame(i) for i in chunk], list(chunk), [None] * 5)
    assert len(series) == len(frames)
    assert c.tracker._drift == pytest.approx(a.tracker._drift, abs=1e-3)  # the next prior
    for got, want in zip(series, wanted):
        assert_same_columns(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_drifts_of_a_series_on_the_device_share_one_window_and_equal_frame_by_frame(
    device, monkeypatch
):
    """DriftEstimator.estimate_series reads one window for a whole series and gives the
    frame-by-frame answers of estimate; frames that drifted past the window's slack read their
    own."""
    rng = np.random.default_rng(3)
    reference = ndimage.gaussian_filter(rng.random((2, 128, 112)), (0, 3, 3)).astype(np.float32)
    steps = [(0.4, -0.3)] * 4 + [(6.0, 5.0)] * 3 + [(0.2, 0.1)] * 3  # then past the slack
    images, drift = [], np.zeros(2)
    for step in steps:
        drift = drift + step
        moved = ndimage.shift(reference, (0, *drift), order=3, mode="wrap")
        images.append((moved + rng.normal(0, 0.01, moved.shape)).astype(np.float32))
    host, on_device = DriftEstimator(reference), DriftEstimator(reference, device)
    reads = []
    values = on_device._values
    monkeypatch.setattr(
        on_device, "_values", lambda s, r, c: reads.append(s.ndim) or values(s, r, c)
    )
    want, prior = [], (0.0, 0.0)
    for image in images:  # frame by frame
        prior = host.estimate(image, prior, search_px=10.0)
        want.append(prior)
    got = on_device.estimate_series([torch.from_numpy(i).to(device) for i in images], (0, 0), 10.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)
    np.testing.assert_allclose(want, np.cumsum(steps, axis=0), atol=0.5)  # Hann-window bias
    assert reads[0] == 3 and 1 < len(reads) < len(images)  # one shared read, some of their own


def serve_session(frames, pixel_pm, model_path, postprocess, endpoint_factory):
    """Every frame of ``frames`` through a Server (torch-cpu) over real sockets, replay mode;
    the result messages in order."""
    cfg = ServeConfig(
        frames=endpoint_factory(),
        results=endpoint_factory(),
        viewer=None,
        model=str(model_path),
        backend="torch-cpu",
        mode="replay",
        max_batch=4,
        postprocess=postprocess,
        ood_check_every=16,  # the turn check runs here too (off by default on the CPU)
    )
    src = sockets.Output(cfg.frames, mode="replay", hwm=1000)
    server = Server(cfg)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    results = sockets.Input(cfg.results, hwm=1000, auto_ack=True)
    try:
        assert src.wait_for_reader(10), "the engine never said ready"
        for i, frame in enumerate(frames):
            src.send(
                encode_frame(
                    frame,
                    session="s",
                    seq=i,
                    source="test",
                    pixel_size_pm=pixel_pm,
                    t_acq=i * SESSION.frame_interval_s,  # both runs: the same time steps
                    dose_e_per_px=SESSION.dose_e_per_px,
                    mode="replay",
                )
            )
        src.send(encode_control("eos", session="s", seq=len(frames), source="test"))
        got = []
        while not got or got[-1].kind != "eos":
            msg = results.recv(timeout_s=120)
            assert msg is not None, f"no result after {len(got)}"
            got.append(msg)
        return server.stats(), got[:-1]
    finally:
        server.stop.set()
        thread.join(10)
        server.close()
        src.close(0)
        results.close()


def test_serve_with_device_postprocessing_publishes_the_host_results(session, endpoint_factory):
    frames, pixel_pm, loaded = session
    runs = {
        mode: serve_session(frames, pixel_pm, loaded.path, mode, endpoint_factory)
        for mode in ("host", "device")
    }
    assert runs["host"][0]["postprocess"] == "host"
    assert runs["device"][0]["postprocess"] == "device"
    host, device = runs["host"][1], runs["device"][1]
    assert len(host) == len(device) == len(frames)
    for h, d in zip(host, device):
        assert h.header["frame_seq"] == d.header["frame_seq"]
        for key in ("depth", "species"):
            assert np.array_equal(h.arrays[key], d.arrays[key]), key
        np.testing.assert_allclose(d.arrays["confidence"], h.arrays["confidence"], atol=1e-6)
        for key in ("column_probabilities", "column_probabilities_filtered"):
            np.testing.assert_allclose(d.arrays[key], h.arrays[key], atol=1e-5, err_msg=key)
        hc, dc = h.header["columns"], d.header["columns"]
        assert hc["id"] == dc["id"] and hc["depth_filtered"] == dc["depth_filtered"]
        np.testing.assert_allclose(d.header["drift_px"], h.header["drift_px"], atol=1e-3)
        assert d.header["ood_score"] == pytest.approx(h.header["ood_score"], abs=1e-6)
        if h.header["ood_turn_score"] is None:
            assert d.header["ood_turn_score"] is None
        else:
            assert d.header["ood_turn_score"] == pytest.approx(h.header["ood_turn_score"], abs=1e-5)
        assert_same_events(d.header["events"], h.header["events"])
    assert any(h.header["ood_turn_score"] is not None for h in host)  # a turn check ran
    # frames after the column reference were tracked in series (update_series) on the device
    assert max(d.header["batch_size"] for d in device[8:]) > 1
    # and each published frame carries its own frame's answer, as tracked one by one
    pred = backends.create("torch-cpu", loaded).infer(frames / np.float32(SESSION.dose_e_per_px))
    alone = SessionAnalysis(pixel_pm)
    for i, h in enumerate(host):
        want = alone.update_maps(pred.frame(i), i, i * SESSION.frame_interval_s)
        assert h.header["columns"]["id"] == want.table()["id"]
        np.testing.assert_allclose(h.header["drift_px"], want.columns.drift_px, atol=1e-3)


def assert_same_events(got: list[dict], want: list[dict]) -> None:
    """The same events; their probabilities to float32 rounding (the two paths sum in a
    different order)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        assert {k: v for k, v in g.items() if k != "probability"} == {
            k: v for k, v in w.items() if k != "probability"
        }
        assert g["probability"] == pytest.approx(w["probability"], abs=1e-5)


def test_a_backend_with_host_outputs_refuses_device_postprocessing():
    pytest.importorskip("onnxruntime")
    with pytest.raises(ValueError, match="host arrays"):
        backends.create("onnxruntime", load(default_model_path()), device_maps=True)
