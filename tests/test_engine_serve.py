"""The engine server over real ZeroMQ sockets: replay is lossless, live skips the oldest frames,
malformed messages are skipped, eos is forwarded, a frame without dose gets an estimate."""

import threading
import time

import numpy as np
import pytest
from engine_support import save_random_model

from engine.serve import ServeConfig, Server
from streamer import sockets
from streamer.protocol import encode_control, encode_frame

SIDE = 64


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_random_model(tmp_path_factory.mktemp("model") / "random.pt")


@pytest.fixture
def engine(model_path, endpoint_factory):
    """Start a Server thread; yield start(mode, auto_ack=True, **ServeConfig) -> (source
    Output, results Input, server)."""
    made = []

    def start(mode, auto_ack=True, model=None, **kw):
        cfg = ServeConfig(
            frames=endpoint_factory(),
            results=endpoint_factory(),
            viewer=endpoint_factory(),
            model=str(model or model_path),
            backend="torch-cpu",
            mode=mode,
            **kw,
        )
        src = sockets.Output(cfg.frames, mode="replay" if mode == "replay" else "live", hwm=1000)
        server = Server(cfg)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        results = sockets.Input(cfg.results, hwm=1000, auto_ack=auto_ack)
        assert src.wait_for_reader(10), "the engine never said ready"
        made.append((src, results, server, thread))
        return src, results, server

    yield start
    for src, results, server, thread in made:
        server.stop.set()
        thread.join(10)
        server.close()
        src.close(0)
        results.close()


def frame_msg(i, rng, session="s1", dose=20.0, send_dose=True, shape=(SIDE, SIDE), **kw):
    counts = rng.poisson(dose, shape).astype(np.uint16)
    extra = {"dose_e_per_px": dose} if send_dose else {}
    return encode_frame(
        counts, session=session, seq=i, source="test", pixel_size_pm=5.3, **extra, **kw
    )


def collect(results, until_eos=True, timeout_s=60.0, n=None):
    got = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        msg = results.recv(timeout_s=1.0)
        if msg is None:
            if not until_eos and n is None and got:
                break
            continue
        got.append(msg)
        if (until_eos and msg.kind == "eos") or (n is not None and len(got) >= n):
            break
    return got


def test_replay_serves_every_frame_in_order_and_forwards_eos(engine):
    src, results, server = engine("replay", max_batch=4, max_wait_ms=50)
    rng = np.random.default_rng(0)
    n = 10
    for i in range(n):
        src.send(frame_msg(i, rng, mode="replay"))
        if i == 3:  # garbage between frames: counted, skipped, the engine goes on
            src.send([b"frame", b"\x00not msgpack"])
            src.send([b"frame"])
    src.send(encode_control("eos", session="s1", seq=n, source="test"))
    got = collect(results)
    assert [m.kind for m in got] == ["result"] * n + ["eos"]
    assert [m.header["frame_seq"] for m in got[:-1]] == list(range(n))
    for m in got[:-1]:
        h = m.header
        assert h["seq"] == h["frame_seq"] and h["session"] == "s1"
        assert h["backend"] == "torch-cpu" and 1 <= h["batch_size"] <= 4
        assert h["latency_ms"] > 0 and h["skipped"] == 0
        assert h["dose_e_per_px"] == 20.0 and h["dose_estimated"] is False
        assert len(h["drift_px"]) == 2
        assert 0 <= h["ood_score"] <= 1 and h["ood_warning"] is None  # no warning level
        assert set(h["columns"]) >= {
            "id",
            "x_px",
            "y_px",
            "species",
            "depth",
            "expected_depth",
            "confidence",
            "depth_filtered",
            "expected_filtered",
        }
        assert m.arrays["depth"].shape == (SIDE, SIDE) and m.arrays["depth"].dtype == np.uint8
        assert m.arrays["depth"].max() <= 10
        assert m.arrays["species"].max() <= 2
        conf = m.arrays["confidence"]
        assert conf.dtype == np.float32 and (conf >= 1 / 11 - 1e-6).all() and (conf <= 1).all()
        n_cols = len(h["columns"]["id"])
        assert m.arrays["column_probabilities"].shape == (n_cols, 11)
    assert max(m.header["batch_size"] for m in got[:-1]) > 1  # frames were batched
    assert got[-1].header["seq"] == n and got[-1].header["source"] == "engine"
    assert server.input.malformed.total == 2


def test_published_maps_are_the_backends_maps_of_each_frame(engine):
    """Depth, confidence and species as published (the maps are reduced on a worker thread
    while the columns are tracked) equal the backend's own maps of the normalised frame."""
    # batch 1, as below: torch's float rounding may differ between batch sizes
    src, results, server = engine("replay", max_batch=1)
    frames, got = send_in_order(src, results, np.random.default_rng(11), 5)
    for msg, m in zip(frames, got):
        assert_published_maps(m, server.backend.infer(normalised(msg)).maps())


def send_in_order(src, results, rng, n):
    """Send ``n`` replay frames of session s1; (the messages, their results in order)."""
    frames = [frame_msg(i, rng, mode="replay") for i in range(n)]
    for msg in frames:
        src.send(msg)
    got = collect(results, until_eos=False, n=n)
    assert [m.header["frame_seq"] for m in got] == list(range(n))
    return frames, got


def normalised(msg):
    """A frame message's counts divided by its dose (20 e-/px), as the engine does: (1, H, W)."""
    return (sockets_frame(msg) / np.float32(20.0))[None]


def assert_published_maps(result, maps):
    """A result's depth, confidence and species maps equal frame 0 of ``maps``."""
    for name, array in zip(("depth", "confidence", "species"), maps):
        np.testing.assert_array_equal(result.arrays[name], array[0], err_msg=name)


@pytest.mark.parametrize("postprocess", ["host", "device"])
def test_tta_publishes_the_eight_view_average_and_a_turn_score_every_frame(
    engine, postprocess, tmp_path
):
    """serve --tta, with the maps made on the host or on the backend's device (torch-cuda's
    default): every frame's published maps are those of the backend's 8-view average of the
    normalised frame, and every frame carries the turn score of its own passes and the
    one-pass score of its unturned pass (the score the warning levels were measured on)."""
    from engine.backends import infer_tta

    # a sharp random model (temperature 0.02): its views disagree far above float rounding
    sharp = save_random_model(tmp_path / "sharp.pt", temperature=0.02)
    src, results, server = engine(
        "replay", model=sharp, max_batch=1, tta=True, postprocess=postprocess
    )
    assert server.backend.device_maps == (postprocess == "device")
    frames, got = send_in_order(src, results, np.random.default_rng(12), 3)
    for msg, m in zip(frames, got):
        x = normalised(msg)
        pred, turn, uncertainty = infer_tta(server.backend, x)
        assert_published_maps(m, pred.maps())
        assert turn[0] > 0 and m.header["ood_turn_score"] == pytest.approx(turn[0], rel=1e-4)
        plain = server.backend.infer(x).uncertainty_scores()[0]
        assert plain == pytest.approx(uncertainty[0], rel=1e-5)
        assert m.header["ood_score"] == pytest.approx(plain, rel=1e-5)
        assert abs(plain - pred.uncertainty_scores()[0]) > 5e-5  # not the average's own


def test_live_overload_serves_the_newest_and_counts_skipped(engine):
    # receive credit for the whole burst: the engine's own queue does the skipping here
    src, results, server = engine(
        "live", max_batch=1, max_wait_ms=0, queue_frames=2, receive_hwm=64
    )
    rng = np.random.default_rng(1)
    n = 40
    msgs = [frame_msg(i, rng, mode="live") for i in range(n)]
    for m in msgs:  # far faster than the engine infers
        src.send(m)
    src.send(encode_control("eos", session="s1", seq=n, source="test"), wait=True, timeout_s=5)
    got = collect(results)
    res = [m for m in got if m.kind == "result"]
    assert got[-1].kind == "eos"
    skipped = got[-1].header["skipped"]
    assert skipped > 0 and len(res) + skipped == n  # every frame either served or skipped
    assert res[-1].header["frame_seq"] == n - 1  # the newest frame was served
    seqs = [m.header["frame_seq"] for m in res]
    assert seqs == sorted(seqs)
    assert res[-1].header["skipped"] == skipped


def test_frame_without_dose_gets_the_running_mean_estimate(engine):
    src, results, server = engine("replay", max_batch=2, max_wait_ms=5)
    rng = np.random.default_rng(2)
    for i in range(4):
        src.send(frame_msg(i, rng, dose=20.0, send_dose=False))
    src.send(frame_msg(4, rng, dose=20.0))
    got = collect(results, until_eos=False, n=5)
    assert [m.header["dose_estimated"] for m in got] == [True] * 4 + [False]
    for m in got[:4]:
        assert m.header["dose_e_per_px"] == pytest.approx(20.0, rel=0.02)
    assert server.sessions["s1"].dose.estimated_frames == 4


def test_frames_past_the_models_warning_level_are_flagged(engine):
    """The warning follows the model meta's ``ood_threshold`` (none: no verdict)."""
    src, results, server = engine("replay", max_batch=1, max_wait_ms=5)
    rng = np.random.default_rng(1)
    verdicts = []
    for i, threshold in enumerate((None, -1.0, 2.0)):  # none, below every score, above all
        if threshold is not None:
            server.loaded.meta["ood_threshold"] = threshold
        src.send(frame_msg(i, rng))
        (got,) = collect(results, until_eos=False, n=1)
        verdicts.append(got.header["ood_warning"])
    assert verdicts == [None, True, False]


def test_turn_checks_score_every_nth_frame_and_set_the_warning(engine):
    """--ood-check-every 4 --ood-warn-on turn: frames 0 and 4 of the session are inferred a
    second time, turned,
    and carry that turn score (as computed directly); the warning follows the session's turn
    score (the median of its last 3 checks) against the model's turn level, which overrides the
    one-pass score's level."""
    from training.inference import turn_scores

    src, results, server = engine(
        "replay", max_batch=2, max_wait_ms=50, ood_check_every=4, ood_warn_on="turn"
    )
    server.loaded.meta["ood_threshold"] = -1.0  # the one-pass score alone would warn always
    rng = np.random.default_rng(5)
    frames = [frame_msg(i, rng) for i in range(6)]
    normalised = [sockets_frame(msg) / np.float32(20.0) for msg in frames]
    for msg in frames[:3]:
        src.send(msg)
    got = collect(results, until_eos=False, n=3)
    # levels of one dose hold at every dose: turn above every score, no warning; one pass -1
    server.loaded.meta["ood_levels"] = {"dose_e_per_px": [20.0], "one_pass": [-1.0], "turn": [2.0]}
    for msg in frames[3:]:
        src.send(msg)
    got += collect(results, until_eos=False, n=3)

    assert [m.header["frame_seq"] for m in got] == list(range(6))
    turn = [m.header["ood_turn_score"] for m in got]
    assert [t is not None for t in turn] == [True, False, False, False, True, False]
    for i in (0, 4):
        x = normalised[i]
        plain = server.backend.infer(x[None]).depth_prob
        turned = server.backend.infer(np.ascontiguousarray(np.rot90(x, 1)[None])).depth_prob
        want = turn_scores(plain, np.rot90(turned, -1, axes=(2, 3)))[0]
        assert want > 0 and turn[i] == pytest.approx(want, rel=1e-4)
    # no turn level in the model for frames 0-2: the one-pass level decides; then the turn's
    assert [m.header["ood_warning"] for m in got] == [True] * 3 + [False] * 3
    server.loaded.meta["ood_levels"]["turn"] = [-1.0]
    src.send(frame_msg(6, rng))  # not checked itself: the latest check (frame 4) decides
    (last,) = collect(results, until_eos=False, n=1)
    assert last.header["ood_turn_score"] is None and last.header["ood_warning"] is True
    # levels per dose (training.ood_levels) take precedence, read at each frame's dose
    levels = {"dose_e_per_px": [10.0, 40.0], "one_pass": [-1.0, -1.0], "turn": [-1.0, 2.0]}
    server.loaded.meta["ood_levels"] = levels
    src.send(frame_msg(7, rng, dose=20.0))  # turn level halfway in log dose: 0.5
    src.send(frame_msg(8, rng, dose=5.0))  # below the measured doses: the end value, -1
    tail = collect(results, until_eos=False, n=2)
    assert [m.header["ood_warning"] for m in tail] == [False, True]
    # frames 0, 4 and 8 were checked: the session's score is their median
    checked = [m.header["ood_turn_score"] for m in got + [last] + tail]
    checked = [t for t in checked if t is not None]
    assert len(checked) == 3
    assert server.sessions["s1"].turn.score == pytest.approx(float(np.median(checked)), rel=1e-4)


def test_by_default_the_warning_reads_the_one_pass_score_even_where_turn_checks_run(engine):
    """Default --ood-warn-on one-pass: every frame is turn-checked and the model has a turn
    level that every score passes, yet the warning follows the one-pass level alone."""
    src, results, server = engine("replay", max_batch=1, max_wait_ms=5, ood_check_every=1)
    rng = np.random.default_rng(4)
    levels = {"dose_e_per_px": [20.0], "one_pass": [2.0], "turn": [-1.0]}
    server.loaded.meta["ood_levels"] = levels
    src.send(frame_msg(0, rng))
    (first,) = collect(results, until_eos=False, n=1)
    levels["one_pass"] = [-1.0]
    src.send(frame_msg(1, rng))
    (second,) = collect(results, until_eos=False, n=1)
    assert first.header["ood_turn_score"] is not None  # checked, and past the turn level
    assert [first.header["ood_warning"], second.header["ood_warning"]] == [False, True]


def sockets_frame(parts) -> np.ndarray:
    """The frame array of an encoded frame message."""
    from streamer.protocol import decode

    return np.asarray(decode(parts).arrays["frame"], np.float32)


@pytest.mark.parametrize("overlap", [True, False])
def test_inference_and_publishing_overlap_or_take_turns_and_stage_times_are_reported(
    engine, overlap
):
    """With overlap, batch n+1 is inferred while batch n is post-processed and published, so
    the slower stage, not the sum, sets the pace; without (the CPU default), the two never run
    at once; each stage's time per frame is reported either way."""
    src, results, server = engine("replay", max_batch=1, max_wait_ms=0, overlap=overlap)
    assert server.stats()["overlap"] is overlap
    spans: dict[str, list[tuple[float, float]]] = {"infer": [], "publish": []}

    def timed(name, fn):
        def run(*args, **kw):
            t0 = time.monotonic()
            time.sleep(0.15)  # a stage slow enough that any overlap shows
            out = fn(*args, **kw)
            spans[name].append((t0, time.monotonic()))
            return out

        return run

    server.backend.infer = timed("infer", server.backend.infer)
    server._post_and_publish = timed("publish", server._post_and_publish)
    rng = np.random.default_rng(3)
    n = 6
    for i in range(n):
        src.send(frame_msg(i, rng, mode="replay"))
    src.send(encode_control("eos", session="s1", seq=n, source="test"))
    got = collect(results)
    assert [m.header["frame_seq"] for m in got[:-1]] == list(range(n))
    assert got[-1].kind == "eos"
    overlapping = sum(
        1 for a0, a1 in spans["infer"] for b0, b1 in spans["publish"] if a0 < b1 and b0 < a1
    )
    if overlap:
        assert overlapping >= n - 2  # a sequential loop would give 0
    else:
        assert overlapping == 0 and len(spans["publish"]) == n
    stages = server.stats()["stage_ms_per_frame"]
    assert set(stages) == {"prepare", "infer", "postprocess", "publish"}
    assert stages["infer"] >= 150 and all(v is not None and v >= 0 for v in stages.values())


def test_on_the_cpu_inference_and_post_processing_take_turns_by_default(engine):
    _, _, server = engine("replay")
    assert server.backend.on_gpu is False and server.stats()["overlap"] is False


def test_frames_beyond_the_engines_size_limit_are_refused_before_allocation(engine):
    """--max-frame-px bounds the engine's memory: a larger frame is counted and skipped at the
    socket (its buffer is never read into an array), and the engine serves the next one."""
    src, results, server = engine("replay", max_batch=1, max_wait_ms=0, max_frame_px=SIDE)
    rng = np.random.default_rng(4)
    src.send(frame_msg(0, rng, shape=(SIDE + 32, SIDE), mode="replay"))
    src.send(frame_msg(1, rng, mode="replay"))
    (got,) = collect(results, until_eos=False, n=1)
    assert got.header["frame_seq"] == 1
    assert server.input.malformed.as_dict().get("shape") == 1


@pytest.mark.parametrize("warn_on, checked", [("one-pass", False), ("turn", True)])
def test_on_the_cpu_turn_checks_run_by_default_only_when_the_warning_reads_them(
    engine, warn_on, checked
):
    """Without --ood-check-every a CPU backend (below camera rate) spends no inference on turn
    checks unless the warning reads the turn score: a session's first frame is then checked,
    and so is every 16th after it."""
    src, results, server = engine("replay", max_batch=1, max_wait_ms=5, ood_warn_on=warn_on)
    assert not server.backend.on_gpu
    rng = np.random.default_rng(2)
    for i in range(17):
        src.send(frame_msg(i, rng))
    got = collect(results, until_eos=False, n=17)
    turn = [m.header["ood_turn_score"] is not None for m in got]
    assert turn == [checked] + [False] * 15 + [checked]
    assert server.stats()["ood_check_every"] == (16 if checked else 0)


def test_without_max_batch_the_engine_uses_its_backends_preferred_batch(engine):
    """torch-cpu (like onnxruntime on the CPU) prefers batch 1: batching measured slower on the
    CPU, so a burst of frames is served one by one unless --max-batch says otherwise."""
    src, results, server = engine("replay", max_wait_ms=50)
    assert server.max_batch == server.backend.preferred_batch == 1
    rng = np.random.default_rng(5)
    for i in range(4):
        src.send(frame_msg(i, rng, mode="replay"))
    got = collect(results, until_eos=False, n=4)
    assert [m.header["batch_size"] for m in got] == [1, 1, 1, 1]
    assert server.stats()["max_batch"] == 1


def test_a_frame_is_acknowledged_to_its_source_only_once_its_result_is_safe(engine):
    """Replay mode: the source may forget a frame only after the results' reader acknowledged
    its result, so an engine that dies with results not yet delivered gets the frames again."""
    src, results, server = engine("replay", auto_ack=False, max_batch=1, max_wait_ms=0)
    rng = np.random.default_rng(0)
    for i in range(5):
        assert src.send(frame_msg(i, rng), timeout_s=10)
    got = collect(results, until_eos=False, n=5)
    assert [m.seq for m in got] == list(range(5))
    time.sleep(0.5)  # several acknowledgement rounds of the engine's input
    src.service()
    assert src.acknowledged_upto == -1  # the results are not safe yet: nothing is forgotten
    results.ack(upto=got[2])
    results.service()
    deadline = time.monotonic() + 10
    while src.acknowledged_upto < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
        src.service()
    assert src.acknowledged_upto == 2  # exactly the frames whose results are safe
    results.ack()  # the rest, so that the engine closes without waiting for them
    results.service()


def test_the_backend_is_warmed_once_per_new_session_or_frame_shape(engine, monkeypatch):
    """serve readies the backend (CUDA graphs) when a session starts or changes frame shape,
    not on every frame."""
    from engine import backends

    warmed = []
    monkeypatch.setattr(backends.TorchCPUBackend, "warm", lambda self, shape: warmed.append(shape))
    src, results, _ = engine("replay", max_batch=1, max_wait_ms=0)
    rng = np.random.default_rng(3)
    for i in range(3):
        src.send(frame_msg(i, rng, mode="replay"))
    src.send(frame_msg(3, rng, session="s2", mode="replay"))
    src.send(frame_msg(4, rng, shape=(SIDE // 2, SIDE // 2), mode="replay"))
    assert len(collect(results, until_eos=False, n=5)) == 5
    assert warmed == [(SIDE, SIDE), (SIDE, SIDE), (SIDE // 2, SIDE // 2)]


def test_warm_readies_the_backend_for_the_given_shapes_before_the_first_frame(
    model_path, endpoint_factory
):
    cfg = ServeConfig(
        frames=endpoint_factory(),
        results=endpoint_factory(),
        viewer=None,
        model=str(model_path),
        backend="torch-cpu",
        warm=[(48, 40), (64, 64)],
    )
    server = Server(cfg)
    readied = []
    server.backend.warm = readied.append
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while len(readied) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert readied == [(48, 40), (64, 64)]  # with no frame sent
        assert server.stats()["results_sent"] == 0
    finally:
        server.stop.set()
        thread.join(10)
        server.close()


@pytest.mark.parametrize(
    "text, shape", [("512x256", (512, 256)), ("1024", (1024, 1024)), ("64X48", (64, 48))]
)
def test_warm_shapes_parse_as_h_x_w_or_one_side(text, shape):
    from engine.cli import frame_shape

    assert frame_shape(text) == shape


@pytest.mark.parametrize("text", ["0x5", "axb", "1x2x3", "-4", ""])
def test_bad_warm_shapes_are_refused(text):
    import argparse

    from engine.cli import frame_shape

    with pytest.raises(argparse.ArgumentTypeError, match="HxW"):
        frame_shape(text)
