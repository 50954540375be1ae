"""The K3 bridge's publishing logic outside GMS: a fake live view updated in place by a
'camera' thread, published over real sockets in live mode."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from streamer.k3_bridge import (
    BridgeConfig,
    ChangeDetector,
    config_from_env,
    pixel_size_pm,
    run_bridge,
)
from streamer.sockets import Input
from streamer.source import FrameSender, SourceConfig


def test_pixel_size_from_dm_calibration():
    assert pixel_size_pm(0.0053, "nm") == pytest.approx(5.3)
    assert pixel_size_pm(0.053, "Å") == pytest.approx(5.3)
    assert math.isnan(pixel_size_pm(1.0, "pixel"))
    assert pixel_size_pm(0.0, "nm", default=4.0) == 4.0


def test_config_from_environment(monkeypatch):
    monkeypatch.setenv("SEGDEPTH_K3_TO_ENGINE", "tcp://10.0.0.2:6000")
    monkeypatch.setenv("SEGDEPTH_K3_POLL_S", "0.01")
    config = config_from_env(BridgeConfig())
    assert config.to_engine == "tcp://10.0.0.2:6000" and config.poll_s == 0.01


def test_change_detector_sends_each_frame_once_after_it_settles():
    view = np.zeros((64, 64), np.uint16)
    det = ChangeDetector(stride=7, settle_s=0.005)
    assert det.new_frame(view, 0.0) is None  # copied, not yet settled
    assert det.new_frame(view, 0.004) is None
    assert det.new_frame(view, 0.006) is not None
    assert det.new_frame(view, 0.010) is None  # the same frame seen again
    view[3, 5] = 1  # a change between sampled pixels is not seen...
    assert det.new_frame(view, 0.020) is None
    view[7, 14] = 9  # ...one on the sample grid is
    assert det.new_frame(view, 0.030) is None
    got = det.new_frame(view, 0.040)
    assert got is not None and got[7, 14] == 9 and not np.shares_memory(got, view)
    assert det.taken_s == 0.030


def test_change_detector_never_sends_a_copy_of_a_half_written_frame():
    """A writer that stalls part-way through a frame: the copy taken meanwhile holds two frames.
    When the writer finishes, that copy is dropped and the finished frame goes out."""
    view = np.full((64, 64), 1, np.uint16)
    det = ChangeDetector(stride=7, settle_s=0.005)
    det.new_frame(view, 0.0)
    assert det.new_frame(view, 0.01) is not None
    view[:30] = 2  # frame 2 half written; the writer stalls for 3 ms
    assert det.new_frame(view, 0.020) is None
    assert det.new_frame(view, 0.023) is None
    view[30:] = 2  # the writer finishes before the torn copy settled
    assert det.new_frame(view, 0.024) is None
    assert det.unsettled == 1
    got = det.new_frame(view, 0.030)
    assert got is not None and (got == 2).all()


def test_bridge_publishes_live_frames_without_tearing(endpoint_factory):
    ep = endpoint_factory()
    n_frames, shape = 60, (96, 128)
    view = np.zeros(shape, np.uint16)  # the live-view buffer GMS overwrites in place
    camera_done, stop = threading.Event(), threading.Event()

    def camera():
        for k in range(1, n_frames + 1):
            view[:] = k  # every pixel of frame k holds k; a torn copy would mix values
            stop.wait(0.01)
        camera_done.set()

    config = BridgeConfig(poll_s=0.001, settle_s=0.003, sample_stride=5, dose_e_per_px=1.5)
    sender = FrameSender(SourceConfig(mode="live", to_engine=ep, to_viewer=None), source="k3")
    got = []
    with Input(ep) as inp:
        assert sender.outputs["to_engine"].wait_for_reader(5)
        last = []

        def read():  # the engine reads while the bridge publishes
            while (msg := inp.recv(timeout_s=5)) is not None and msg.kind != "eos":
                got.append(msg)
            last.append(msg)

        reader = threading.Thread(target=read)
        reader.start()
        bridge = threading.Thread(
            target=lambda: run_bridge(lambda: view, sender, config, 5.3, stop)
        )
        bridge.start()
        threading.Thread(target=camera).start()
        camera_done.wait(20)
        stop.set()
        bridge.join(20)
        reader.join(20)
        msg = last[0]
    sender.close()
    values = [int(m.arrays["frame"][0, 0]) for m in got]
    for m in got:
        frame = m.arrays["frame"]
        assert frame.shape == shape and (frame == frame[0, 0]).all()  # never torn
        assert m.header["mode"] == "live" and m.header["dose_e_per_px"] == 1.5
    assert values == sorted(set(values))  # each camera frame at most once, in order
    assert len(values) >= n_frames // 2  # the bridge keeps up with a 100 Hz live view
    assert [m.seq for m in got] == list(range(len(got)))
    assert msg is not None and msg.kind == "eos" and msg.seq == len(got)
