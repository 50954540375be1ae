"""Batching policies (size or time, live drops oldest, replay back-pressures) and dose handling."""

import threading
import time

import numpy as np
import pytest

from engine.batching import FrameQueue, Item
from engine.normalise import DoseNormaliser


def frame(i, key=("s", (4, 4))):
    return Item(payload=i, key=key, t_recv=time.monotonic())


def test_batch_closes_at_max_batch():
    q = FrameQueue(capacity=100)
    for i in range(10):
        q.put(frame(i), live=False)
    batch = q.take_batch(max_batch=4, max_wait_s=10.0)
    assert [it.payload for it in batch] == [0, 1, 2, 3]
    assert len(q) == 6


def test_batch_closes_at_max_wait_with_fewer_frames():
    q = FrameQueue(capacity=100)
    q.put(frame(0), live=False)
    q.put(frame(1), live=False)
    batch = q.take_batch(max_batch=8, max_wait_s=0.05)  # returns once the wait is over
    assert [it.payload for it in batch] == [0, 1]


def test_frames_arriving_during_the_wait_join_the_batch():
    q = FrameQueue(capacity=100)
    q.put(frame(0), live=False)

    def later():
        time.sleep(0.02)
        q.put(frame(1), live=False)

    threading.Thread(target=later).start()
    batch = q.take_batch(max_batch=2, max_wait_s=5.0)
    assert [it.payload for it in batch] == [0, 1]


def test_batch_holds_one_session_and_shape_and_control_items_stand_alone():
    q = FrameQueue(capacity=100)
    q.put(frame(0), live=False)
    q.put(frame(1, key=("s", (8, 8))), live=False)
    q.put(Item(payload="eos", key=("s",), t_recv=time.monotonic(), is_frame=False), live=False)
    q.put(frame(2, key=("t", (4, 4))), live=False)
    assert [it.payload for it in q.take_batch(8, 0.0)] == [0]
    assert [it.payload for it in q.take_batch(8, 0.0)] == [1]
    assert [it.payload for it in q.take_batch(8, 0.0)] == ["eos"]
    assert [it.payload for it in q.take_batch(8, 0.0)] == [2]
    assert q.take_batch(8, 0.0, idle_timeout_s=0.01) == []


def test_live_mode_keeps_the_newest_frames_and_counts_the_skipped():
    q = FrameQueue(capacity=4)
    for i in range(10):
        assert q.put(frame(i), live=True)
    assert len(q) == 4 and q.skipped == 6
    assert [it.payload for it in q.take_batch(10, 0.0)] == [6, 7, 8, 9]


def test_replay_mode_waits_for_room_and_loses_nothing():
    q = FrameQueue(capacity=2)
    done = threading.Event()

    def producer():
        for i in range(6):
            q.put(frame(i), live=False)
        done.set()

    threading.Thread(target=producer).start()
    time.sleep(0.05)
    assert not done.is_set() and len(q) == 2  # the producer is held back
    got = []
    while len(got) < 6:
        got += [it.payload for it in q.take_batch(2, 0.0)]
    assert got == list(range(6)) and q.skipped == 0
    assert done.wait(2)


def test_close_releases_a_waiting_producer():
    q = FrameQueue(capacity=1)
    q.put(frame(0), live=False)
    result = []
    t = threading.Thread(target=lambda: result.append(q.put(frame(1), live=False)))
    t.start()
    q.close()
    t.join(2)
    assert result == [False]


def test_dose_from_header_and_estimated_from_the_frame_mean():
    norm = DoseNormaliser()
    counts = np.full((8, 8), 40, dtype=np.uint16)
    x, dose, estimated = norm.normalise(counts, 40.0)
    assert dose == 40.0 and not estimated and x.dtype == np.float32 and np.allclose(x, 1.0)
    rng = np.random.default_rng(0)
    frames = [rng.poisson(25.0, (64, 64)).astype(np.uint16) for _ in range(20)]
    doses = [norm.dose(f, None) for f in frames]
    assert all(estimated for _, estimated in doses)
    assert doses[-1][0] == pytest.approx(25.0, rel=0.005)  # running mean over 20 frames
    assert norm.estimated_frames == 20
    with pytest.raises(ValueError, match="positive"):
        norm.dose(counts, -1.0)
    with pytest.raises(ValueError, match="no counts"):
        norm.dose(np.zeros((4, 4)), None)


def test_a_pixel_budget_caps_the_batch_but_always_serves_one_frame():
    q = FrameQueue(capacity=100)
    for i in range(5):
        q.put(frame(i, key=("s", (100, 100))), live=False)
    big = frame(9, key=("s", (300, 300)))
    assert [it.payload for it in q.take_batch(8, 0.0, max_pixels=25_000)] == [0, 1]
    assert [it.payload for it in q.take_batch(8, 0.0, max_pixels=None)] == [2, 3, 4]
    q.put(big, live=False)
    assert [it.payload for it in q.take_batch(8, 0.0, max_pixels=25_000)] == [9]
