"""The wire protocol: round trips, every rejection reason, and a hypothesis fuzz of the decoder."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamer.protocol import (
    PROTOCOL_VERSION,
    MalformedCounter,
    ProtocolError,
    SequenceTracker,
    compress_parts,
    decode,
    encode,
    encode_control,
    encode_frame,
    make_header,
)


def frame_msg(frame=None, **fields):
    frame = np.arange(12, dtype=np.uint16).reshape(3, 4) if frame is None else frame
    return encode_frame(frame, session="s", seq=3, source="t", pixel_size_pm=5.3, **fields)


def test_frame_round_trip_keeps_values_metadata_and_no_copy():
    frame = np.arange(12, dtype=np.uint16).reshape(3, 4)
    parts = frame_msg(frame, dose_e_per_px=2.5, mode="live")
    assert parts[0] == b"frame"
    msg = decode(parts)
    assert msg.kind == "frame" and msg.seq == 3
    assert msg.header["v"] == PROTOCOL_VERSION and msg.header["dose_e_per_px"] == 2.5
    np.testing.assert_array_equal(msg.arrays["frame"], frame)
    assert np.shares_memory(msg.arrays["frame"], frame)  # zero-copy both ways
    assert not msg.arrays["frame"].flags.writeable


def test_big_endian_and_strided_arrays_are_sent_as_little_endian_contiguous():
    frame = np.arange(20, dtype=">f4").reshape(4, 5)[:, ::2]
    msg = decode(encode_frame(frame, session="s", seq=0, source="t", pixel_size_pm=1.0))
    assert msg.arrays["frame"].dtype == np.dtype("<f4")
    np.testing.assert_array_equal(msg.arrays["frame"], frame)


def test_control_messages_have_no_buffers():
    msg = decode(encode_control("eos", session="s", seq=10, source="t"))
    assert msg.kind == "eos" and msg.seq == 10 and msg.arrays == {}


def _tamper(parts, **changes):
    head = msgpack.unpackb(parts[1])
    head.update(changes)
    return [parts[0], msgpack.packb(head), *parts[2:]]


@pytest.mark.parametrize(
    "make_parts, reason",
    [
        (lambda p: [p[0]], "parts"),
        (lambda p: [p[0], b"\xc1", *p[2:]], "msgpack"),
        (lambda p: [p[0], msgpack.packb([1, 2]), *p[2:]], "msgpack"),
        (lambda p: _tamper(p, v=PROTOCOL_VERSION + 1), "version"),
        (lambda p: _tamper(p, kind="bogus"), "kind"),
        (lambda p: _tamper(p, seq="3"), "field"),
        (lambda p: _tamper(p, seq=-1), "field"),
        (lambda p: _tamper(p, t_acq=float("nan")), "field"),
        (lambda p: _tamper(p, pixel_size_pm=None), "field"),
        (lambda p: [b"result", *p[1:]], "topic"),
        (lambda p: p[:2], "buffers"),
        (lambda p: [*p, b"extra"], "buffers"),
        (lambda p: [p[0], p[1], b"\x00" * 5], "bytes"),
        (
            lambda p: _tamper(p, buffers=[{"name": "frame", "dtype": "<c8", "shape": [3, 4]}]),
            "dtype",
        ),
        (
            lambda p: _tamper(p, buffers=[{"name": "frame", "dtype": "<u2", "shape": [-3, 4]}]),
            "shape",
        ),
        (lambda p: _tamper(p, buffers=[{"name": "frame", "dtype": "<u2", "shape": [12]}]), "shape"),
        (lambda p: _tamper(p, buffers=["frame"]), "buffers"),
    ],
)
def test_each_defect_is_a_protocol_error_with_its_reason(make_parts, reason):
    with pytest.raises(ProtocolError) as info:
        decode(make_parts(frame_msg()))
    assert info.value.reason == reason


def test_nan_pixels_are_rejected_unless_asked_not_to():
    frame = np.ones((4, 4), np.float32)
    frame[1, 2] = np.inf
    parts = frame_msg(frame)
    with pytest.raises(ProtocolError, match="nonfinite"):
        decode(parts)
    assert not np.isfinite(decode(parts, check_finite=False).arrays["frame"]).all()


def test_malformed_counter_logs_each_reason_once(caplog):
    counter = MalformedCounter("here")
    for reason in ("bytes", "bytes", "topic"):
        counter.record(ProtocolError(reason, "x"))
    assert counter.as_dict() == {"bytes": 2, "topic": 1} and counter.total == 3
    assert len([r for r in caplog.records if "malformed" in r.getMessage()]) == 2


def test_sequence_tracker_counts_gaps_tail_and_sessions():
    tracker = SequenceTracker()
    for seq in (0, 1, 4, 3, 5):
        tracker.update("a", seq)
    assert tracker.as_dict() == {"received": 4, "lost": 2, "lost_at_start": 0, "out_of_order": 1}
    assert tracker.end("a", 8) == 2  # frames 6 and 7 never came
    assert tracker.end("a", 8) == 0  # a repeated eos counts nothing more
    tracker.update("b", 0)  # a new session starts afresh
    assert tracker.lost == 4 and tracker.received == 5


# --- fuzzing: no input may crash the decoder with anything but ProtocolError ----------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8), st.binary(max_size=8)
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
descriptors = st.fixed_dictionaries(
    {
        "name": st.one_of(st.just("frame"), st.text(max_size=6), st.integers()),
        "dtype": st.one_of(
            st.sampled_from(["|u1", "<u2", "<f4", "<f8", ">f4", "<c8", "O"]), st.integers()
        ),
        "shape": st.one_of(st.lists(st.integers(-2, 70000), max_size=5), st.integers(), st.none()),
    }
)
headers = st.fixed_dictionaries(
    {
        "v": st.one_of(st.just(PROTOCOL_VERSION), values),
        "kind": st.one_of(st.sampled_from(["frame", "result", "eos", "heartbeat"]), values),
        "session": st.one_of(st.just("s"), values),
        "seq": st.one_of(st.integers(-5, 2**64), values),
        "t_acq": st.one_of(st.floats(), values),
        "source": st.one_of(st.just("t"), values),
        "buffers": st.one_of(st.lists(descriptors, max_size=3), values),
    },
    optional={
        "pixel_size_pm": st.one_of(st.floats(), values),
        "model_id": values,
        "backend": values,
        "batch_size": values,
        "latency_ms": values,
    },
)


def _check_decode(parts):
    try:
        msg = decode(parts)
    except ProtocolError:
        return
    # whatever is accepted is self-consistent
    assert msg.kind in ("frame", "result", "eos", "heartbeat")
    for desc in msg.header["buffers"]:
        assert msg.arrays[desc["name"]].shape == tuple(desc["shape"])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=64), max_size=5))
def test_fuzz_random_bytes(parts):
    _check_decode(parts)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([b"frame", b"result", b"eos", b"x"]),
    headers,
    st.lists(st.binary(max_size=96), max_size=4),
)
def test_fuzz_structured_headers(topic, head, buffers):
    try:
        packed = msgpack.packb(head, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return
    _check_decode([topic, packed, *buffers])


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_valid_messages(data):
    frame = np.arange(12, dtype=np.float32).reshape(3, 4)
    parts = [
        bytes(memoryview(p).cast("B")) if not isinstance(p, bytes) else p for p in frame_msg(frame)
    ]
    index = data.draw(st.integers(0, len(parts) - 1))
    raw = bytearray(parts[index])
    for _ in range(data.draw(st.integers(1, 4))):
        if raw and data.draw(st.booleans()):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        else:
            raw = raw[: data.draw(st.integers(0, len(raw)))]
    parts[index] = bytes(raw)
    _check_decode(parts)


def test_make_header_rejects_unknown_kind():
    with pytest.raises(ProtocolError):
        make_header("bogus", session="s", seq=0, source="t")
    with pytest.raises(ProtocolError):
        encode(
            make_header("frame", session="s", seq=0, source="t", pixel_size_pm=1.0),
            {"frame": np.zeros((2, 2), np.complex64)},
        )


# --- compressed buffers (encrypted links) -----------------------------------------------------
def _noisy(shape=(256, 256), dtype=np.uint16):
    return np.random.default_rng(0).poisson(2.5, shape).astype(dtype)


@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.uint8])
def test_compressed_buffers_round_trip_exactly(dtype):
    frame = _noisy(dtype=dtype)
    parts = compress_parts(frame_msg(frame, dose_e_per_px=2.5))
    head = msgpack.unpackb(parts[1])
    assert head["buffers"][0]["codec"] == "blosc" and len(parts[2]) < frame.nbytes / 2
    msg = decode(parts, allow_codec=True)
    assert msg.arrays["frame"].dtype == dtype and (msg.arrays["frame"] == frame).all()
    assert not msg.arrays["frame"].flags.writeable and msg.header["dose_e_per_px"] == 2.5
    small = compress_parts(frame_msg())  # below COMPRESS_MIN_BYTES: sent as it is
    assert "codec" not in msgpack.unpackb(small[1])["buffers"][0]


def _with_buffer(parts, shape=None, codec="blosc", payload=None):
    head = msgpack.unpackb(parts[1])
    head["buffers"][0]["codec"] = codec
    if shape is not None:
        head["buffers"][0]["shape"] = shape
    return [parts[0], msgpack.packb(head), parts[2] if payload is None else payload]


def test_compressed_buffers_are_refused_with_a_reason_when_wrong_or_not_allowed():
    parts = compress_parts(frame_msg(_noisy()))
    packed = bytes(parts[2])

    def reason(p, **kw):
        with pytest.raises(ProtocolError) as err:
            decode(p, **{"allow_codec": True, **kw})
        return err.value.reason

    assert reason(parts, allow_codec=False) == "codec"  # a plain link takes raw buffers only
    assert reason(_with_buffer(parts, codec="zip")) == "codec"
    assert reason(_with_buffer(parts, payload=packed[:10])) == "codec"  # shorter than a header
    assert reason(_with_buffer(parts, payload=packed[:-5])) == "codec"  # truncated
    # a bomb: a small buffer whose header claims another (larger) array is not inflated
    assert reason(_with_buffer(parts, shape=[512, 512])) == "codec"
    assert reason(_with_buffer(parts, shape=[60000, 60000])) == "size"  # 7 GB: beyond limits
    damaged = bytearray(packed)
    damaged[100:200] = b"\xff" * 100
    assert reason(_with_buffer(parts, payload=bytes(damaged))) == "codec"
