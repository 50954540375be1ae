"""Fault injection (issue 11) over real sockets and real processes: wire probes against a
running engine, receiver and engine crashes during a lossless replay, a full disk, strangers on
the links, CURVE, and the replayer's manners. Small frames (64 x 64) and the tiny random model
keep it fast."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import h5py
import msgpack
import numpy as np
import pytest
import zmq
from engine_support import (
    ProcessGroup,
    record_argv,
    replay_argv,
    results_recorded,
    save_random_model,
    serve_argv,
    write_session,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from link_support import RawLink

from streamer import security, sockets
from streamer.protocol import (
    FrameLimits,
    ProtocolError,
    compress_parts,
    decode,
    encode,
    encode_control,
    encode_frame,
    make_header,
)
from streamer.sockets import Input, Output

SIDE = 64


def frame(seq: int, session: str = "s", shape=(SIDE, SIDE), **fields) -> list:
    return encode_frame(
        np.full(shape, seq % 60000, np.uint16),
        session=session,
        seq=seq,
        source="test",
        pixel_size_pm=fields.pop("pixel_size_pm", 5.3),
        **fields,
    )


def raw_frame(arr: np.ndarray, **head) -> list:
    """A frame message built by hand (what a careless or hostile client may send)."""
    h = make_header(
        "frame",
        session="probe",
        seq=head.pop("seq", 0),
        source="probe",
        pixel_size_pm=head.pop("pixel_size_pm", 5.3),
        **head,
    )
    h["buffers"] = [{"name": "frame", "dtype": arr.dtype.str, "shape": list(arr.shape)}]
    return [b"frame", msgpack.packb(h), arr.tobytes()]


# --- every wire probe of the issue against a running engine ----------------------------------
PROBES = {  # name -> (parts, reason the engine's receiver gives)
    "0 x 0 frame": (raw_frame(np.zeros((0, 0), np.uint16)), "shape"),
    "128 x 0 frame": (raw_frame(np.zeros((128, 0), np.uint16)), "shape"),
    "pixel size 1e-3 pm": (
        raw_frame(np.ones((SIDE, SIDE), np.uint16), pixel_size_pm=1e-3),
        "pixel_size",
    ),
    "1e308 in a <f8 frame": (raw_frame(np.full((SIDE, SIDE), 1e308)), "range"),
    "dose 1e-300": (raw_frame(np.ones((SIDE, SIDE), np.uint16), dose_e_per_px=1e-300), "dose"),
    "4096 x 9000 claimed": (raw_frame(np.zeros((4096, 9000), np.uint8))[:2] + [b"x"], "shape"),
    "NaN pixels": (raw_frame(np.full((SIDE, SIDE), np.nan, np.float32)), "nonfinite"),
}


def test_engine_survives_every_wire_probe(tmp_path, segdepth_cmd, endpoint_factory):
    model = save_random_model(tmp_path / "random.pt")
    ep = {k: endpoint_factory() for k in ("frames", "results")}
    stats = tmp_path / "engine.json"
    probe = RawLink(ep["frames"])
    procs = ProcessGroup(tmp_path)
    try:
        procs.start(
            "engine",
            serve_argv(segdepth_cmd, {**ep, "engine": ep["frames"]}, model, "--stats", str(stats)),
        )
        results = Input(ep["results"])
        probe.wait_for_reader(60)
        for parts, _ in PROBES.values():
            probe.send(parts)
        probe.send(
            frame(20, session="probe", dose_e_per_px=20.0)[:1]
            + [
                msgpack.packb(
                    {**msgpack.unpackb(frame(20, session="probe", dose_e_per_px=20.0)[1]), "seq": 0}
                )
            ]
            + frame(20)[2:]
        )
        probe.send(encode_control("eos", session="probe", seq=1, source="probe"))
        got = []
        while (msg := results.recv(timeout_s=60)) is not None:
            got.append(msg)
            if msg.kind == "eos":
                break
        assert procs.wait("engine", 60) == 0, procs.log("engine")[-3000:]
        results.close()
    finally:
        probe.close()
        procs.close()
    assert [m.kind for m in got] == ["result", "eos"], procs.log("engine")[-3000:]
    malformed = json.loads(stats.read_text())["stats"]["input"]["malformed"]
    expected: dict[str, int] = {}
    for _, reason in PROBES.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert malformed == expected


def test_a_part_beyond_the_size_limit_closes_the_connection_not_the_reader(endpoint_factory):
    """ZMQ_MAXMSGSIZE: the reader never holds an oversized part; libzmq drops the connection
    for good, the reader notices, counts it and connects again."""
    ep = endpoint_factory()
    probe = RawLink(ep)
    limits = FrameLimits(max_side_px=64)  # parts up to max(64^2 x 8, 16 MiB)
    with Input(ep, limits=limits) as inp:
        probe.wait_for_reader()
        probe.send([b"frame", b"x", b"\0" * (limits.max_part_bytes + 1)])
        assert inp.recv(timeout_s=1.0) is None
        deadline = time.monotonic() + 10
        got = None
        while got is None and time.monotonic() < deadline:  # the reader is back
            probe.send(frame(0))
            got = inp.recv(timeout_s=0.3)
        assert got is not None and got.seq == 0
        assert inp.malformed.as_dict() == {"size": 1}  # never read whole; counted
    probe.close()


header_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.lists(st.integers(-5, 70000), max_size=5),
)


def valid_or_any(valid):
    return st.one_of(valid, header_values)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    h=st.one_of(st.integers(-3, 10), st.integers(4090, 9000)),
    w=st.one_of(st.integers(-3, 10), st.integers(4090, 9000)),
    pixel=valid_or_any(st.floats(allow_nan=True, allow_infinity=True)),
    dose=valid_or_any(st.floats(allow_nan=True, allow_infinity=True)),
    seq=valid_or_any(st.integers(0, 2**63 - 1)),
    t_acq=valid_or_any(st.floats(0, 2e9)),
    value=st.floats(allow_nan=True, allow_infinity=True),
)
def test_header_fields_either_pass_the_limits_or_are_refused_with_a_reason(
    h, w, pixel, dose, seq, t_acq, value
):
    """Whatever the header says, decode returns a frame within the limits or raises
    ProtocolError; it never allocates for a claimed shape (the bytes sent are tiny)."""
    limits = FrameLimits(max_side_px=4096)
    head = {
        "v": 1,
        "kind": "frame",
        "session": "s",
        "seq": seq,
        "t_acq": t_acq,
        "source": "p",
        "pixel_size_pm": pixel,
        "dose_e_per_px": dose,
        "buffers": [{"name": "frame", "dtype": "<f4", "shape": [h, w]}],
    }
    n = h * w if 0 <= h <= 10 and 0 <= w <= 10 else 4
    with np.errstate(over="ignore"):  # a value past float32's range becomes inf, on purpose
        body = np.full(max(n, 0), value, np.float32).tobytes()
    try:
        msg = decode([b"frame", msgpack.packb(head), body], limits=limits)
    except ProtocolError as err:
        assert err.reason in {
            "field",
            "shape",
            "bytes",
            "pixel_size",
            "dose",
            "range",
            "nonfinite",
            "msgpack",
        }
        return
    fh, fw = msg.arrays["frame"].shape
    assert 0 < fh <= 4096 and 0 < fw <= 4096
    assert math.isnan(pixel) or 0.1 <= pixel <= 1000
    assert dose is None or 1e-3 <= dose <= 1e6
    assert np.isfinite(msg.arrays["frame"]).all()


# --- crashes during a lossless replay ---------------------------------------------------------
def rows(path) -> list[int]:
    try:
        with h5py.File(path, "r", swmr=True) as f:
            return f["sequence"][:].tolist()
    except (OSError, KeyError):
        return []


@pytest.mark.slow
def test_recorder_and_engine_killed_and_restarted_lose_no_frame(
    tmp_path, segdepth_cmd, endpoint_factory
):
    """1,000 frames, lossless replay: the recorder is SIGKILLed and restarted (it recovers its
    file and continues beside it), then the engine; the union of the files holds every frame
    and a result for each, and the restarted recorder counts no loss."""
    n = 1000
    model = save_random_model(tmp_path / "random.pt")
    rng = np.random.default_rng(0)
    session = write_session(
        tmp_path / "session.h5", rng.poisson(20.0, (n, SIDE, SIDE)).astype(np.uint16)
    )
    out = tmp_path / "rec.h5"
    ep = {k: endpoint_factory() for k in ("engine", "recorder", "results")}
    serve = serve_argv(segdepth_cmd, ep, model, "--max-batch", "16")
    record = record_argv(
        segdepth_cmd, out, ep["recorder"], ep["results"], "--grace-s", "20", "--flush-s", "0.2"
    )
    procs = ProcessGroup(tmp_path)

    def wait_until(check, what):
        deadline = time.monotonic() + 120
        while not check():
            assert time.monotonic() < deadline, f"{what}: " + procs.log("replay")[-2000:]
            time.sleep(0.05)

    try:
        procs.start("recorder", record)
        procs.start("engine", serve)
        procs.start(
            "replay",
            replay_argv(
                segdepth_cmd,
                session,
                ep["engine"],
                ep["recorder"],
                "--mode",
                "replay",
                "--max-rate",
            ),
        )
        wait_until(lambda: len(rows(out)) >= 200, "first recorder")
        procs.procs["recorder"].kill()
        procs.procs["recorder"].wait(10)
        procs.start("recorder2", record)
        second = tmp_path / "rec.1.h5"
        wait_until(lambda: results_recorded(second) >= 50, "second recorder")
        procs.procs["engine"].kill()
        procs.procs["engine"].wait(10)
        procs.start("engine2", serve)
        assert procs.wait("replay", 180) == 0, procs.log("replay")[-3000:]
        assert procs.wait("engine2", 120) == 0, procs.log("engine2")[-3000:]
        assert procs.wait("recorder2", 120) == 0, procs.log("recorder2")[-3000:]
    finally:
        procs.close()
    with h5py.File(out, "r") as f:  # recovered: plain h5py opens it
        first_rows = f["sequence"][:].tolist()
        first_answered = f["results/has_result"][:].astype(bool)
        assert f.attrs["recovered"] == 1
    with h5py.File(second, "r") as f:
        second_rows = f["sequence"][:].tolist()
        summary = json.loads(f.attrs["summary"])
        answered = f["results/has_result"][:].astype(bool)
    assert first_rows == list(range(len(first_rows))) and len(first_rows) >= 150
    assert second_rows == list(range(second_rows[0], n))
    assert set(first_rows) | set(second_rows) == set(range(n))  # 0 frames missing
    assert summary["lost"] == 0 and summary["continues"] == str(out)
    # no result died with the engine: its source resent to the restarted one the frames whose
    # results the recorder had not acknowledged, so every frame of the second file has one
    assert answered.all(), np.flatnonzero(~answered)[:10]
    # what a killed recorder loses: results of frames it had written but whose results were
    # still on their way. A frame it had flushed but not yet acknowledged is resent and written
    # again, with its result, in the second file; every other one's result reaches the new
    # recorder and is counted there, not written
    only_first = set(np.asarray(first_rows)[~first_answered].tolist()) - set(second_rows)
    assert summary["results_without_frame"] >= len(only_first), (summary, sorted(only_first))
    assert summary["frames_without_result"] == len(second_rows) - int(answered.sum())
    log = procs.log("recorder2")
    assert "recovered" in log
    print(
        f"frames: {len(first_rows)} in the first file, {len(second_rows)} in the second "
        f"(overlap {len(set(first_rows) & set(second_rows))}); results in the second file: "
        f"{int(answered.sum())} of {len(second_rows)}; results without a frame "
        f"{summary['results_without_frame']} (rows of the first file without one: "
        f"{len(only_first)})"
    )


# --- a full disk ------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    mounted = []

    def mount(mib: int):
        mnt = tmp_path / f"disk{mib}"
        mnt.mkdir()
        if (
            os.geteuid() != 0
            or subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(mnt)],
                capture_output=True,
            ).returncode
            != 0
        ):
            pytest.skip("mounting a small tmpfs needs root")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("mib", [17, 20, 26])
def test_disk_full_stops_cleanly_with_every_row_valid(
    small_disk, mib, segdepth_cmd, endpoint_factory
):
    out = small_disk(mib) / "rec.h5"
    fep = endpoint_factory()
    proc = subprocess.Popen(
        record_argv(segdepth_cmd, out, fep, "none", "--min-free-mib", "16", "--flush-s", "0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    big = np.ones((256, 256), np.uint16)
    with Output(fep, linger_s=0) as src:
        for seq in range(200):
            if proc.poll() is not None or not src.send(
                encode_frame(big * seq, session="s", seq=seq, source="t", pixel_size_pm=5.3),
                timeout_s=3,
            ):
                break
    text, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1 and proc.returncode != -signal.SIGSEGV, text
    assert text.count("recorder ERROR: recording stopped (disk full)") == 1, text  # once
    if "keeps the 0 frames" in text:  # no room for a single row: no file at all
        assert not out.exists()
        return
    with h5py.File(out, "r") as f:  # closed properly: plain h5py opens it
        seqs = f["sequence"][:]
        assert f.attrs["complete"] == 1 and len(seqs) > 0
        assert seqs.tolist() == list(range(len(seqs)))
        assert (f["timestamps_s"][:] > 0).all()
        assert all((f["frames"][i] == i).all() for i in range(len(seqs)))


def test_recover_makes_a_killed_recording_open_with_plain_h5py(
    tmp_path, segdepth_cmd, endpoint_factory
):
    out = tmp_path / "killed.h5"
    fep = endpoint_factory()
    proc = subprocess.Popen(
        record_argv(segdepth_cmd, out, fep, "none", "--flush-s", "0"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with Output(fep, linger_s=0) as src:
        for seq in range(20):
            assert src.send(frame(seq), timeout_s=30)
        assert src.flush(timeout_s=30)  # acknowledged: on disk
    proc.kill()
    proc.wait(10)
    with pytest.raises(OSError):
        h5py.File(out, "r")  # what the issue found: flagged as open for writing
    done = subprocess.run(
        [*segdepth_cmd, "recover", str(out)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "20 rows kept" in done.stdout
    with h5py.File(out, "r") as f:
        assert f["sequence"][:].tolist() == list(range(20)) and f.attrs["recovered"] == 1


# --- strangers --------------------------------------------------------------------------------
def test_foreign_eos_and_foreign_session_are_refused_and_counted(
    tmp_path, segdepth_cmd, endpoint_factory
):
    fep, rep = endpoint_factory(), endpoint_factory()
    out = tmp_path / "rec.h5"
    proc = subprocess.Popen(
        record_argv(segdepth_cmd, out, fep, rep),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    with Output(fep) as src, Output(rep) as stranger:
        for seq in range(5):
            assert src.send(frame(seq, session="mine"), timeout_s=30)
        # a stranger holding the results port: another session's result and eos
        assert stranger.send(
            encode(
                make_header(
                    "result",
                    session="theirs",
                    seq=0,
                    source="x",
                    model_id="m",
                    backend="b",
                    batch_size=1,
                    latency_ms=1.0,
                    frame_seq=0,
                )
            ),
            timeout_s=30,
        )
        assert stranger.send(
            encode_control("eos", session="theirs", seq=0, source="x"), timeout_s=30
        )
        assert stranger.flush(timeout_s=30)
        time.sleep(0.5)
        assert proc.poll() is None  # the foreign eos did not end the recording
        assert src.send(frame(5, session="mine"), timeout_s=30)
        assert src.send(encode_control("eos", session="mine", seq=6, source="t"), timeout_s=30)
        assert stranger.send(encode_control("eos", session="mine", seq=6, source="x"), timeout_s=30)
        text, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, text
    assert "other sessions refused         2" in text and "'result': 1, 'eos': 1" in text
    with h5py.File(out, "r") as f:
        assert f["sequence"][:].tolist() == list(range(6))
        assert f.attrs["session_id"] == "mine"


def test_an_intruding_reader_is_refused_and_takes_nothing(tmp_path, segdepth_cmd, endpoint_factory):
    n = 60
    session = write_session(tmp_path / "s.h5", np.ones((n, SIDE, SIDE), np.uint16))
    rep = endpoint_factory()
    out = tmp_path / "rec.h5"
    procs = ProcessGroup(tmp_path)
    try:
        procs.start(
            "recorder",
            record_argv(segdepth_cmd, out, rep, "none"),
        )
        procs.start(
            "replay",
            replay_argv(segdepth_cmd, session, "none", rep, "--rate", "40"),
        )
        deadline = time.monotonic() + 60
        while not rows(out) and time.monotonic() < deadline:
            time.sleep(0.05)
        with Input(rep) as intruder:  # a second PULL on 5556, as in the issue
            taken = [m for _ in range(10) if (m := intruder.recv(timeout_s=0.1))]
            assert intruder.refused is not None and taken == []
        assert procs.wait("replay", 60) == 0
        assert procs.wait("recorder", 60) == 0
    finally:
        procs.close()
    assert rows(out) == list(range(n))
    assert "a second reader connected and was refused" in procs.log("replay")


# --- CURVE ------------------------------------------------------------------------------------
def test_curve_admits_the_allowed_key_and_refuses_an_unknown_one(
    tmp_path, endpoint_factory, monkeypatch
):
    keys = security.make_keys(tmp_path / "keys")
    other = security.make_keys(tmp_path / "other")  # an unknown client key
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    for name in ("server.key", "server.key_secret"):  # it knows the server's public key
        (stranger / name).write_bytes((keys.folder / name).read_bytes())
    for name in ("client.key", "client.key_secret"):
        (stranger / name).write_bytes((other.folder / name).read_bytes())
    ctx = zmq.Context()
    try:
        monkeypatch.setenv(security.KEYS_ENV, str(keys.folder))
        ep = endpoint_factory()
        out = Output(ep, ctx=ctx, linger_s=0)
        good = Input(ep, ctx=ctx)
        assert out.send(frame(0), timeout_s=10)
        msg = good.recv(timeout_s=10)
        assert msg is not None and msg.seq == 0  # the right key works
        # an encrypted link sends noisy frames compressed, and they arrive exactly
        assert out.compress and good.allow_codec
        counts = np.random.default_rng(1).poisson(2.5, (256, 256)).astype(np.uint16)
        sent = encode_frame(counts, session="s", seq=1, source="t", pixel_size_pm=5.3)
        assert len(compress_parts(sent)[2]) < counts.nbytes / 3
        assert out.send(sent, timeout_s=10)
        msg = good.recv(timeout_s=10)
        assert msg is not None and (msg.arrays["frame"] == counts).all()
        good.close()
        time.sleep(0.5)  # the sender notices the reader left
        monkeypatch.setenv(security.KEYS_ENV, str(stranger))
        bad = Input(ep, ctx=ctx)
        assert not out.send(frame(1), timeout_s=2)  # never admitted: no reader at all
        assert bad.recv(timeout_s=0.5) is None and not out.connected
        bad.close()
        out.close(0)
        monkeypatch.delenv(security.KEYS_ENV)
        with pytest.raises(security.EndpointError, match="without encryption"):
            Output("tcp://0.0.0.0:0", ctx=ctx)  # refused before anything binds
    finally:
        security.stop_zap(ctx)
        ctx.destroy(linger=0)


# --- counts that agree ------------------------------------------------------------------------
def test_live_drops_at_the_sender_equal_the_losses_at_the_receiver(endpoint_factory):
    """Frames sent before the reader came, and while it was stopped, are counted once by the
    sender (dropped) and once by the receiver (lost), and the two agree."""
    ep = endpoint_factory()
    with Output(ep, mode="live", hwm=8) as out:
        for seq in range(30):  # nobody connected yet
            out.send(frame(seq))
        with Input(ep, hwm=8) as inp:
            assert out.wait_for_reader(5)
            seq = 30
            for _ in range(3):  # the reader stalls (SIGSTOP-like) while the camera goes on
                for _ in range(40):
                    out.send(frame(seq))
                    seq += 1
                while inp.recv(timeout_s=0.2) is not None:
                    pass
            assert out.send(
                encode_control("eos", session="s", seq=seq, source="t"), wait=True, timeout_s=5
            )
            while (msg := inp.recv(timeout_s=2)) is not None and msg.kind != "eos":
                pass
            stats = inp.stats()["frames"]
    assert out.dropped > 30 and stats["lost_at_start"] == 30
    assert stats["lost"] == out.dropped and stats["received"] + stats["lost"] == seq


# --- the replayer's manners -------------------------------------------------------------------
def test_replay_says_when_nobody_reads_and_obeys_ctrl_c(tmp_path, segdepth_cmd, endpoint_factory):
    session = write_session(tmp_path / "s.h5", np.ones((5, SIDE, SIDE), np.uint16))
    t0 = time.monotonic()
    missing = subprocess.run(
        [*segdepth_cmd, "replay", str(tmp_path / "nope.h5")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode != 0 and "nope.h5" in missing.stderr
    startup = time.monotonic() - t0  # at once: no 10 s wait for an eos
    proc = subprocess.Popen(
        [
            *segdepth_cmd,
            "replay",
            str(session),
            "--to-engine",
            endpoint_factory(),
            "--to-viewer",
            "none",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout))
    reader.start()
    deadline = time.monotonic() + 30
    while not any("no reader connected" in ln for ln in lines):
        assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
        time.sleep(0.05)
    said = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=10)
    stopped = time.monotonic() - said
    reader.join(5)
    assert stopped < 1.5, f"{stopped:.2f} s after Ctrl-C"  # 1 s plus process exit
    assert startup < 8, f"{startup:.1f} s to report a missing file"  # was 10 s + start-up
    assert sockets.NO_READER_NOTICE_S <= 2
    print(f"missing file: {startup:.2f} s; Ctrl-C obeyed after {stopped:.2f} s")


def test_probe_helpers_are_honest():
    """The probes above really are what they claim (guards against a test that cannot fail)."""
    assert raw_frame(np.zeros((0, 0), np.uint16))[0] == b"frame"
    with pytest.raises(ProtocolError):
        decode(PROBES["pixel size 1e-3 pm"][0], limits=FrameLimits())
    assert decode(PROBES["pixel size 1e-3 pm"][0]).kind == "frame"  # only the limits refuse it


def test_the_client_in_protocol_md_works(tmp_path, endpoint_factory):
    """The 25-line DEALER client of docs/PROTOCOL.md, run as written, gets every frame."""
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "PROTOCOL.md").read_text()
    code = doc.split("## A client in 25 lines")[1].split("```python\n")[1].split("```")[0]
    ep = endpoint_factory()
    script = tmp_path / "client.py"
    script.write_text(code.replace("tcp://127.0.0.1:5555", ep))
    with Output(ep) as out:
        proc = subprocess.Popen(
            [sys.executable, str(script)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for seq in range(5):
            assert out.send(frame(seq), timeout_s=30)
        assert out.send(encode_control("eos", session="s", seq=5, source="t"), timeout_s=30)
        text, _ = proc.communicate(timeout=30)
        assert out.flush(timeout_s=5)  # the client acknowledged everything
    assert [ln.split()[0] for ln in text.splitlines()] == ["0", "1", "2", "3", "4"], text


def test_a_late_start_is_a_loss_on_a_link_but_not_for_a_viewer():
    from streamer.protocol import SequenceTracker

    link, viewer = SequenceTracker(), SequenceTracker(count_start=False)
    for tracker in (link, viewer):
        tracker.update("s", 7)
        tracker.update("s", 9)
    assert link.as_dict()["lost"] == 8 and link.lost_at_start == 7
    assert viewer.as_dict()["lost"] == 1 and viewer.lost_at_start == 0
    resumed = SequenceTracker()
    resumed.resume_after("s", 6)  # a restarted recorder whose recovered file ends at 6
    resumed.update("s", 7)
    assert resumed.lost == 0


def test_a_manual_reader_acknowledges_only_what_it_said_is_safe(endpoint_factory):
    """With auto_ack=False nothing is acknowledged until ack() (not even by a malformed
    message that follows): a reader that dies first leaves it to the next one."""
    ep = endpoint_factory()
    with Output(ep, hwm=8, linger_s=0) as out:
        first = Input(ep, auto_ack=False)
        assert out.send(frame(0), timeout_s=10) and out.send([b"frame", b"\xc1"], timeout_s=10)
        assert out.send(frame(1), timeout_s=10)
        got = first.recv(timeout_s=10)
        assert got.seq == 0 and got.link_seq == 0
        first.ack(upto=got)  # frame 0 is safe, frame 1 not yet
        assert first.recv(timeout_s=10).seq == 1
        assert not out.flush(timeout_s=0.5)  # the sender hears of frame 0 (only)
        first.close()  # dies before frame 1 was safe
        second = Input(ep, auto_ack=False)
        sender = threading.Thread(target=out.flush, args=(10,))  # the source is still running
        sender.start()
        again = second.recv(timeout_s=10)
        second.ack()
        second.service()
        sender.join()
        second.close()
    assert again is not None and again.seq == 1 and out.resent == 2  # the garbage and frame 1


def test_sigstop_in_live_mode_sender_drops_equal_receiver_losses(
    tmp_path, segdepth_cmd, endpoint_factory
):
    """The issue's SIGSTOP case over real processes: a live replay keeps going while the
    recorder is stopped for a second; the replay's drop count and the recorder's loss count
    are the same number."""
    import re

    n = 300
    session = write_session(tmp_path / "s.h5", np.ones((n, SIDE, SIDE), np.uint16))
    rep, out = endpoint_factory(), tmp_path / "rec.h5"
    procs = ProcessGroup(tmp_path)
    try:
        procs.start(
            "recorder",
            record_argv(segdepth_cmd, out, rep, "none"),
        )
        time.sleep(1.0)
        procs.start(
            "replay",
            replay_argv(segdepth_cmd, session, "none", rep, "--mode", "live", "--rate", "150"),
        )
        deadline = time.monotonic() + 60
        while len(rows(out)) < 20:
            assert time.monotonic() < deadline, procs.log("recorder")[-2000:]
            time.sleep(0.05)
        procs.procs["recorder"].send_signal(signal.SIGSTOP)
        time.sleep(1.0)
        procs.procs["recorder"].send_signal(signal.SIGCONT)
        assert procs.wait("replay", 60) == 0, procs.log("replay")[-2000:]
        assert procs.wait("recorder", 60) == 0, procs.log("recorder")[-2000:]
    finally:
        procs.close()
    dropped = int(
        re.search(r"'to_recorder': \{'sent': \d+, 'dropped': (\d+)", procs.log("replay")).group(1)
    )
    lost = int(re.search(r"frames lost \(sequence gaps\)\s+(\d+)", procs.log("recorder")).group(1))
    assert dropped > 0 and lost == dropped
    assert len(rows(out)) + lost == n
