"""streamer.sockets over real loopback sockets: lossless replay, lossy live, restarts, garbage."""

from __future__ import annotations

import threading
import time

import numpy as np
import psutil
from link_support import RawLink

from streamer.protocol import encode, encode_control, encode_frame, make_header
from streamer.sockets import Input, Output, Publisher, Subscriber


def frame_parts(seq: int, shape=(64, 64), session="s1"):
    frame = np.full(shape, seq % 65536, dtype=np.uint16)
    return encode_frame(frame, session=session, seq=seq, source="test", pixel_size_pm=5.3)


def wait_connected(out: Output, timeout_s: float = 5.0) -> None:
    """Wait until a receiver is connected (it said ready)."""
    assert out.wait_for_reader(timeout_s), "receiver never connected"


def test_replay_10000_frames_complete_and_in_order(endpoint_factory):
    ep = endpoint_factory()
    n = 10_000
    with Output(ep, mode="replay", hwm=16) as out, Input(ep, hwm=16) as inp:
        sender = threading.Thread(
            target=lambda: (
                [out.send(frame_parts(i)) for i in range(n)]
                + [out.send(encode_control("eos", session="s1", seq=n, source="test"))]
            )
        )
        sender.start()
        seqs, values = [], []
        while True:
            msg = inp.recv(timeout_s=10)
            assert msg is not None, f"stalled after {len(seqs)} frames"
            if msg.kind == "eos":
                break
            seqs.append(msg.seq)
            values.append(int(msg.arrays["frame"][0, 0]))
        sender.join()
        assert seqs == list(range(n))
        assert values == [i % 65536 for i in range(n)]
        assert out.dropped == 0 and out.sent == n + 1
        assert inp.stats()["frames"] == {
            "received": n,
            "lost": 0,
            "lost_at_start": 0,
            "out_of_order": 0,
        }


def test_live_mode_slow_consumer_bounded_memory_and_counted_losses(endpoint_factory):
    """A consumer 5x slower than the source: the source never waits, memory stays bounded,
    losses counted by the sender equal the sequence gaps seen by the receiver."""
    ep = endpoint_factory()
    n, period_s = 1500, 0.001
    shape = (256, 256)  # 128 kB per frame: 190 MB in all if nothing were dropped
    proc = psutil.Process()
    with Output(ep, mode="live", hwm=8) as out, Input(ep, hwm=8) as inp:
        wait_connected(out)
        received = []

        def consume():
            while True:
                msg = inp.recv(timeout_s=10)
                if msg is None or msg.kind == "eos":
                    return
                received.append(msg.seq)
                time.sleep(5 * period_s)

        consumer = threading.Thread(target=consume)
        consumer.start()
        rss0 = proc.memory_info().rss
        peak = rss0
        for i in range(n):
            out.send(frame_parts(i, shape))
            time.sleep(period_s)
            if i % 100 == 0:
                peak = max(peak, proc.memory_info().rss)
        assert out.send(
            encode_control("eos", session="s1", seq=n, source="test"), timeout_s=10, wait=True
        )
        consumer.join(timeout=30)
        assert not consumer.is_alive()
    assert out.dropped > n // 2, "a 5x slower consumer must lose most frames"
    assert out.sent + out.dropped == n + 1
    assert len(received) == out.sent - 1  # everything queued arrived, minus the eos
    assert received == sorted(received)
    gaps = inp.sequences["frame"]
    assert gaps.lost == out.dropped
    assert gaps.received + gaps.lost == n
    assert peak - rss0 < 64 * 2**20, f"memory grew by {(peak - rss0) / 2**20:.0f} MB"


def test_receiver_crash_and_restart_is_picked_up(endpoint_factory):
    ep = endpoint_factory()
    with Output(ep, mode="replay", hwm=4) as out:
        first = Input(ep, hwm=4)
        out.send(frame_parts(0))
        assert first.recv(timeout_s=5).seq == 0
        first.close()  # the receiver dies (its TCP connection drops)
        # with nobody connected, a replay send waits; the timeout lets a shutdown through
        time.sleep(0.3)
        assert not out.send(frame_parts(1), timeout_s=0.3)
        second = Input(ep, hwm=4)
        assert out.send(frame_parts(2), timeout_s=5)
        msg = second.recv(timeout_s=5)
        assert msg is not None and msg.seq == 2
        second.close()


def test_sender_crash_and_restart_is_picked_up(endpoint_factory):
    ep = endpoint_factory()
    with Input(ep, hwm=4) as inp:
        out = Output(ep, mode="replay", linger_s=0)
        out.send(frame_parts(0, session="before"))
        assert inp.recv(timeout_s=5).seq == 0
        out.close()
        out = Output(ep, mode="replay")  # a restarted source binds again: the receiver reconnects
        sent = []
        sender = threading.Thread(
            target=lambda: sent.append(out.send(frame_parts(0, session="after"), timeout_s=10))
        )
        sender.start()  # a reader reads while the source sends (its ready finds the new one)
        msg = inp.recv(timeout_s=10)
        sender.join()
        out.close()
        assert sent == [True]
        assert msg is not None and msg.header["session"] == "after"
        assert inp.stats()["frames"]["lost"] == 0


def test_stop_interrupts_a_blocked_replay_send(endpoint_factory):
    with Output(endpoint_factory(), mode="replay") as out:
        threading.Timer(0.2, out.stop.set).start()
        assert out.send(frame_parts(0)) is False  # no receiver: would wait forever


def test_malformed_messages_are_counted_and_skipped(endpoint_factory):
    ep = endpoint_factory()
    raw = RawLink(ep)
    good = frame_parts(7)
    bad_nan = encode(
        make_header(
            "result",
            session="s1",
            seq=1,
            source="t",
            model_id="m",
            backend="b",
            batch_size=1,
            latency_ms=1.0,
        ),
        {"confidence": np.full((4, 4), np.nan, np.float32)},
    )
    with Input(ep, accept=("frame", "eos")) as inp:
        raw.wait_for_reader()
        raw.send([b"frame", b"\xc1garbage"])  # bad msgpack
        raw.send([b"frame"])  # too few parts
        raw.send(good[:2] + [b"\x00" * 10])  # byte count mismatch
        raw.send([b"result", *good[1:]])  # topic != kind
        raw.send(bad_nan)  # NaN pixels
        raw.send_unframed([b"frame", b"x"])  # no link framing
        raw.send(good)
        msg = inp.recv(timeout_s=5)
        assert msg is not None and msg.seq == 7
        assert inp.malformed.as_dict() == {
            "msgpack": 1,
            "parts": 2,
            "bytes": 1,
            "topic": 1,
            "nonfinite": 1,
        }
    raw.close()


def test_publisher_subscriber_bounded_and_fresh(endpoint_factory):
    """The viewer link keeps a bounded queue; after a drain the next frame comes through."""
    ep = endpoint_factory()
    shape = (256, 256)
    with Publisher(ep) as pub, Subscriber(ep, topics=("frame",)) as sub:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # PUB/SUB loses what is sent before the join
            pub.send(frame_parts(0, shape))
            if sub.recv(timeout_s=0.05) is not None:
                break
        else:
            raise AssertionError("subscriber never joined")
        sub.drain()
        for i in range(1, 200):
            pub.send(frame_parts(i, shape))
        pub.send(encode_control("heartbeat", session="s1", seq=0, source="t"))  # filtered out
        time.sleep(0.3)
        # the source goes on publishing while the viewer drains: fresh frames come through
        got: list[int] = []
        seq, deadline = 500, time.monotonic() + 10
        while not got or got[-1] < 500:
            assert time.monotonic() < deadline, "no fresh frame came through"
            pub.send(frame_parts(seq, shape))
            seq += 1
            time.sleep(0.02)
            got += [m.seq for m in sub.drain()]
        assert got == sorted(got)
        assert len(got) < 199 + seq - 500  # lossy by design: small HWM, the publisher never waited


SENDER_SCRIPT = """
import sys
import numpy as np
from streamer.protocol import encode_control, encode_frame
from streamer.sockets import Output
frames = [np.full((256, 256), i, np.uint16) for i in range(4)]  # 128 kB: sent zero-copy
out = Output(sys.argv[1], mode="replay", hwm=8, linger_s=30)
for seq in range(200):
    out.send(encode_frame(frames[seq % 4], session="z", seq=seq, source="t", pixel_size_pm=1.0))
out.send(encode_control("eos", session="z", seq=200, source="t"))
out.close()
del frames  # the process ends with messages still queued: they must go out intact
"""


def test_a_sender_exiting_right_after_zero_copy_sends_delivers_everything(endpoint_factory):
    import subprocess
    import sys

    ep = endpoint_factory()
    proc = subprocess.Popen([sys.executable, "-c", SENDER_SCRIPT, ep])
    got = []
    with Input(ep, hwm=8) as inp:
        while True:
            msg = inp.recv(timeout_s=20)
            assert msg is not None, f"stalled after {len(got)} frames"
            if msg.kind == "eos":
                break
            got.append(int(msg.arrays["frame"][5, 5]))
            time.sleep(0.002)  # a slower receiver: messages are still queued when it exits
    assert proc.wait(timeout=30) == 0
    assert got == [seq % 4 for seq in range(200)]


# acknowledges a frame only once it is printed, as serve and the recorder acknowledge only
# what is published or on disk (auto_ack would acknowledge it on receipt, so a kill between
# receipt and print would lose it from the printed record)
RECEIVER_SCRIPT = """
import sys
from streamer.sockets import Input
inp = Input(sys.argv[1], hwm=4, auto_ack=False)
while True:
    msg = inp.recv(timeout_s=30)
    if msg is None or msg.kind == "eos":
        break
    print(msg.seq, flush=True)
    inp.ack(msg)
print("eos", msg.seq if msg is not None else None, flush=True)
if msg is not None:
    inp.ack(msg)
inp.close()
"""


def test_receiver_killed_and_restarted_as_a_process(endpoint_factory):
    """A replay-mode sender outlives a receiver process killed with SIGKILL and serves the
    restarted one, first with what the dead one had not acknowledged: nothing is lost."""
    import signal
    import subprocess
    import sys

    ep = endpoint_factory()
    out = Output(ep, mode="replay", hwm=4)
    first = subprocess.Popen(
        [sys.executable, "-c", RECEIVER_SCRIPT, ep], stdout=subprocess.PIPE, text=True
    )
    n, stop = 400, threading.Event()
    out.stop = stop
    sender = threading.Thread(
        target=lambda: (
            [out.send(frame_parts(i)) for i in range(n)]
            + [out.send(encode_control("eos", session="s1", seq=n, source="test"))]
        )
    )
    sender.start()
    seen_first = []
    for line in first.stdout:
        seen_first.append(int(line))
        if len(seen_first) == 50:
            first.send_signal(signal.SIGKILL)
            break
    first.wait(timeout=10)
    # lines the killed reader printed after the 50th are still in the pipe: it acknowledged
    # those messages, so they count as seen
    seen_first += [int(line) for line in first.stdout.read().split()]
    second = subprocess.Popen(
        [sys.executable, "-c", RECEIVER_SCRIPT, ep], stdout=subprocess.PIPE, text=True
    )
    lines = second.communicate(timeout=60)[0].split()
    sender.join(timeout=30)
    out.close()
    assert lines[-2:] == ["eos", str(n)]
    seen_second = [int(x) for x in lines[:-2]]
    # the new reader starts at the oldest message the dead one had not acknowledged (it may
    # have printed a few of them): together they saw every frame, the second in order
    assert seen_first == list(range(len(seen_first))) and seen_second[0] <= seen_first[-1] + 1
    assert seen_second == list(range(seen_second[0], n))
    assert out.resent > 0 and out.unacknowledged == 0
