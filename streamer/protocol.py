"""The SegDepth Live wire protocol: the one contract every process shares.

A message is a ZeroMQ multipart message ``[topic, header, buffer_0, buffer_1, ...]``:

* ``topic`` -- ASCII bytes equal to the message kind (``frame``, ``result``, ``eos``,
  ``heartbeat``), so PUB/SUB peers can filter by prefix.
* ``header`` -- a msgpack map (see :data:`REQUIRED_FIELDS`). ``buffers`` in it lists, in order,
  one descriptor ``{"name", "dtype", "shape"}`` per raw buffer that follows.
* ``buffer_i`` -- the raw bytes of a C-contiguous little-endian array, sent zero-copy; or, when
  its descriptor says ``"codec": "blosc"``, those bytes compressed by Blosc (bit-shuffle + LZ4,
  :func:`compress_parts`), which a receiver accepts only over an authenticated (CURVE) link.

Units: times in seconds (Unix epoch), pixel sizes in pm, dose in electrons per pixel per frame
(the mean count of a vacuum pixel), latency in ms, column positions in pixels (x = column index,
y = row index of the frame array, origin at the centre of the top-left pixel).

A frame carries one buffer named ``frame`` (H, W). A result carries ``depth`` (H, W) uint8,
``confidence`` (H, W) float32 and ``species`` (H, W) uint8 maps, optionally
``column_probabilities`` (n_columns, 11) float32, and the column table in the header.
"""

from __future__ import annotations

import logging
import math
import struct
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
KINDS = ("frame", "result", "eos", "heartbeat")
#: dtypes allowed on the wire (little-endian, numpy ``dtype.str`` spelling).
WIRE_DTYPES = frozenset({"|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<f2", "<f4", "<f8"})
#: header fields every message must carry, with their Python types.
REQUIRED_FIELDS: Mapping[str, tuple[type, ...]] = {
    "v": (int,),
    "kind": (str,),
    "session": (str,),
    "seq": (int,),
    "t_acq": (float, int),
    "source": (str,),
    "buffers": (list,),
}
#: extra fields a frame must carry.
FRAME_FIELDS: Mapping[str, tuple[type, ...]] = {"pixel_size_pm": (float, int)}
#: extra fields a result must carry.
RESULT_FIELDS: Mapping[str, tuple[type, ...]] = {
    "model_id": (str,),
    "backend": (str,),
    "batch_size": (int,),
    "latency_ms": (float, int),
}
MAX_BUFFERS = 16
MAX_DIM = 1 << 16
MAX_HEADER_BYTES = 16 << 20
#: default largest frame side a receiver accepts, px (``FrameLimits.max_side_px``).
MAX_FRAME_SIDE_PX = 8192
#: pixel sizes a receiver accepts, pm (HRTEM: a few pm; 1e-3 pm would make the engine's
#: column disks millions of pixels wide).
PIXEL_SIZE_RANGE_PM = (0.1, 1000.0)
#: doses a receiver accepts, electrons per pixel per frame (mean count of a vacuum pixel).
DOSE_RANGE_E_PER_PX = (1e-3, 1e6)
#: largest magnitude of a value in a floating-point frame, counts (1e308 overflows float32).
MAX_FRAME_VALUE = 1e9
#: the one buffer codec: Blosc's self-describing container (bit-shuffle + LZ4).
CODEC = "blosc"
#: buffers smaller than this are sent as they are by :func:`compress_parts`, bytes.
COMPRESS_MIN_BYTES = 16 * 1024
#: Blosc's container header, bytes (a compressed buffer is never shorter).
BLOSC_HEADER_BYTES = 16

log = logging.getLogger(__name__)


class ProtocolError(ValueError):
    """A message that does not follow the protocol. ``reason`` is a short category for counting."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Message:
    """A decoded message: its header (a dict) and its buffers as read-only numpy arrays."""

    header: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    #: its number on the link it came over (streamer.sockets.Input), -1 otherwise.
    link_seq: int = -1

    @property
    def kind(self) -> str:
        return self.header["kind"]

    @property
    def seq(self) -> int:
        return self.header["seq"]


def _wire_array(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    arr = np.ascontiguousarray(arr)
    if arr.dtype.str not in WIRE_DTYPES:
        raise ProtocolError("dtype", f"dtype {arr.dtype} cannot be sent")
    return arr


def make_header(
    kind: str, *, session: str, seq: int, source: str, t_acq: float | None = None, **fields: Any
) -> dict[str, Any]:
    """A header dict for ``kind`` with the common fields filled in (``t_acq`` defaults to now)."""
    if kind not in KINDS:
        raise ProtocolError("kind", f"unknown kind {kind!r}")
    head = {
        "v": PROTOCOL_VERSION,
        "kind": kind,
        "session": session,
        "seq": int(seq),
        "t_acq": float(time.time() if t_acq is None else t_acq),
        "source": source,
        "buffers": [],
    }
    head.update(fields)
    return head


def encode(header: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> list:
    """Encode a message as multipart parts; buffers are numpy arrays, not copies of their bytes.

    ``header["buffers"]`` is (re)written from ``arrays`` (an ordered name -> array mapping).
    """
    arrays = {name: _wire_array(a) for name, a in (arrays or {}).items()}
    head = dict(header)
    head["buffers"] = [
        {"name": n, "dtype": a.dtype.str, "shape": list(a.shape)} for n, a in arrays.items()
    ]
    _check_header(head)
    return [head["kind"].encode("ascii"), msgpack.packb(head, use_bin_type=True), *arrays.values()]


def encode_frame(
    frame: np.ndarray,
    *,
    session: str,
    seq: int,
    source: str,
    pixel_size_pm: float,
    t_acq: float | None = None,
    **fields: Any,
) -> list:
    """Encode one camera frame (H, W) with its metadata."""
    if np.asarray(frame).ndim != 2:
        raise ProtocolError("shape", f"a frame is 2-D, got shape {np.shape(frame)}")
    head = make_header(
        "frame",
        session=session,
        seq=seq,
        source=source,
        t_acq=t_acq,
        pixel_size_pm=float(pixel_size_pm),
        **fields,
    )
    return encode(head, {"frame": frame})


def encode_control(kind: str, *, session: str, seq: int, source: str, **fields: Any) -> list:
    """Encode an ``eos`` (end of stream: ``seq`` = frames sent) or ``heartbeat`` message."""
    if kind not in ("eos", "heartbeat"):
        raise ProtocolError("kind", f"{kind!r} is not a control kind")
    return encode(make_header(kind, session=session, seq=seq, source=source, **fields))


def _blosc():
    from numcodecs import Blosc

    return Blosc(cname="lz4", clevel=5, shuffle=Blosc.BITSHUFFLE, blocksize=0)


def compress_parts(parts: Sequence[Any]) -> list:
    """Encoded ``parts`` with every buffer of at least :data:`COMPRESS_MIN_BYTES` compressed
    (:data:`CODEC`; lossless). Noisy low-dose counts shrink 4-5x, which pays on links whose
    bytes cost (CURVE encryption, a network)."""
    head = msgpack.unpackb(_part_bytes(parts[1]), raw=False, strict_map_key=True)
    out = [parts[0], None]
    for desc, part in zip(head["buffers"], parts[2:]):
        buf = _part_bytes(part)
        if buf.nbytes >= COMPRESS_MIN_BYTES and desc.get("codec") is None:
            dtype = np.dtype(desc["dtype"])
            part = _blosc().encode(np.frombuffer(buf, dtype))
            desc["codec"] = CODEC
        out.append(part)
    out[1] = msgpack.packb(head, use_bin_type=True)
    return out


def _decompress(name: str, buf: memoryview, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A :data:`CODEC` buffer decoded into a new array, its sizes checked before any
    allocation (a small buffer claiming a large array is refused, not inflated)."""
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if buf.nbytes < BLOSC_HEADER_BYTES:
        raise ProtocolError("codec", f"buffer {name!r} is too short for its codec")
    # Blosc 1 header: version, codec version, flags, type size, then uint32 LE sizes:
    # uncompressed bytes, block size, compressed bytes
    raw, _, packed = struct.unpack_from("<4xIII", buf)
    if packed != buf.nbytes or raw != expected:
        raise ProtocolError(
            "codec",
            f"buffer {name!r}: the codec claims {raw} bytes from {packed}, the message has "
            f"{buf.nbytes} for shape {shape} {dtype} ({expected} bytes)",
        )
    arr = np.empty(shape, dtype)
    try:
        _blosc().decode(buf, out=arr)
    except Exception as exc:  # numcodecs raises RuntimeError/ValueError on damaged data
        raise ProtocolError("codec", f"buffer {name!r} does not decompress ({exc})") from None
    return arr


def _part_bytes(part: Any) -> memoryview:
    buf = getattr(part, "buffer", part)  # zmq.Frame (copy=False) exposes .buffer
    try:
        return memoryview(buf).cast("B")
    except TypeError as exc:
        raise ProtocolError("parts", f"part of type {type(part).__name__} is not bytes") from exc


def _check_fields(head: Mapping[str, Any], spec: Mapping[str, tuple[type, ...]]) -> None:
    for name, types in spec.items():
        if name not in head:
            raise ProtocolError("field", f"missing header field {name!r}")
        value = head[name]
        if isinstance(value, bool) or not isinstance(value, types):
            raise ProtocolError("field", f"header field {name!r} has type {type(value).__name__}")


def _check_header(head: Mapping[str, Any]) -> None:
    if not isinstance(head, Mapping):
        raise ProtocolError("msgpack", "header is not a map")
    if head.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            "version", f"protocol version {head.get('v')!r}, expected {PROTOCOL_VERSION}"
        )
    _check_fields(head, REQUIRED_FIELDS)
    kind = head["kind"]
    if kind not in KINDS:
        raise ProtocolError("kind", f"unknown kind {kind!r}")
    if kind == "frame":
        _check_fields(head, FRAME_FIELDS)
    elif kind == "result":
        _check_fields(head, RESULT_FIELDS)
    if not 0 <= head["seq"] < 1 << 63:
        raise ProtocolError("field", f"sequence number {head['seq']} out of range")
    if not math.isfinite(head["t_acq"]):
        raise ProtocolError("field", "acquisition time is not finite")
    if len(head["buffers"]) > MAX_BUFFERS:
        raise ProtocolError("buffers", f"{len(head['buffers'])} buffers (max {MAX_BUFFERS})")
    for desc in head["buffers"]:
        _buffer_spec(desc)
    if kind == "frame":
        names = [d["name"] for d in head["buffers"]]
        if names != ["frame"]:
            raise ProtocolError("buffers", f"a frame carries one buffer 'frame', got {names}")
        if len(head["buffers"][0]["shape"]) != 2:
            raise ProtocolError("shape", "a frame is 2-D")


def _buffer_spec(desc: Any) -> tuple[str, np.dtype, tuple[int, ...]]:
    if not isinstance(desc, Mapping) or not {"name", "dtype", "shape"} <= set(desc):
        raise ProtocolError("buffers", f"bad buffer descriptor {desc!r:.80}")
    name, dtype, shape = desc["name"], desc["dtype"], desc["shape"]
    if not isinstance(name, str) or not isinstance(dtype, str) or dtype not in WIRE_DTYPES:
        raise ProtocolError("dtype", f"buffer {name!r:.40} has unsupported dtype {dtype!r:.20}")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 4
        or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_DIM for s in shape
        )
    ):
        raise ProtocolError("shape", f"buffer {name!r:.40} has bad shape {shape!r:.60}")
    return name, np.dtype(dtype), tuple(shape)


def decode(
    parts: Sequence[Any],
    *,
    check_finite: bool = True,
    limits: FrameLimits | None = None,
    allow_codec: bool = False,
) -> Message:
    """Decode and validate multipart ``parts``; raise :class:`ProtocolError` on any defect.

    Arrays are views on the received buffers (no copy) and are read-only. ``limits``: also
    check frames against them (:func:`check_frame_header` before the buffers are read,
    :func:`check_frame_values` after). ``allow_codec``: accept compressed buffers (only from
    an authenticated peer: decompression trusts more of the data than a raw view does).
    """
    if len(parts) < 2:
        raise ProtocolError("parts", f"{len(parts)} parts, need at least topic and header")
    topic = bytes(_part_bytes(parts[0]))
    raw_head = _part_bytes(parts[1])
    if raw_head.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError("msgpack", f"header of {raw_head.nbytes} bytes is too large")
    try:
        head = msgpack.unpackb(raw_head, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types on garbage
        raise ProtocolError(
            "msgpack", f"header is not valid msgpack ({type(exc).__name__})"
        ) from None
    _check_header(head)
    if topic != head["kind"].encode("ascii"):
        raise ProtocolError("topic", f"topic {topic[:20]!r} does not match kind {head['kind']!r}")
    if limits is not None and head["kind"] == "frame":
        check_frame_header(head, limits)
    specs = [_buffer_spec(d) for d in head["buffers"]]
    if len(parts) - 2 != len(specs):
        raise ProtocolError(
            "buffers", f"header lists {len(specs)} buffers, message has {len(parts) - 2}"
        )
    arrays: dict[str, np.ndarray] = {}
    max_bytes = (limits or DEFAULT_LIMITS).max_part_bytes
    for (name, dtype, shape), part, desc in zip(specs, parts[2:], head["buffers"]):
        buf = _part_bytes(part)
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        codec = desc.get("codec")
        if codec is not None:
            if codec != CODEC or not allow_codec:
                raise ProtocolError(
                    "codec",
                    f"buffer {name!r} has codec {codec!r:.20}"
                    + ("" if codec == CODEC else f" (known: {CODEC!r})")
                    + ("" if allow_codec else " on a link that takes raw buffers only"),
                )
            if expected > max_bytes:
                raise ProtocolError(
                    "size",
                    f"buffer {name!r} would decompress to {expected} bytes (max {max_bytes})",
                )
            arr = _decompress(name, buf, dtype, shape)
        elif buf.nbytes != expected:
            raise ProtocolError(
                "bytes",
                f"buffer {name!r} has {buf.nbytes} bytes, shape {shape} {dtype} needs {expected}",
            )
        else:
            arr = np.frombuffer(buf, dtype=dtype).reshape(shape)
        arr.flags.writeable = False
        if check_finite and dtype.kind == "f" and not np.isfinite(arr).all():
            raise ProtocolError("nonfinite", f"buffer {name!r} holds NaN or Inf")
        arrays[name] = arr
    if limits is not None and head["kind"] == "frame":
        check_frame_values(arrays["frame"], limits)
    return Message(head, arrays)


@dataclass(frozen=True)
class FrameLimits:
    """What a receiver accepts before it allocates anything for a frame.

    ``max_side_px``: largest H and W (0 < H, W), px. ``pixel_size_range_pm``: accepted pixel
    sizes, pm (NaN, "unknown", passes here; the engine refuses it itself).
    ``dose_range_e_per_px``: accepted ``dose_e_per_px`` when present. ``max_value``: largest
    magnitude in a floating-point frame, counts.
    """

    max_side_px: int = MAX_FRAME_SIDE_PX
    pixel_size_range_pm: tuple[float, float] = PIXEL_SIZE_RANGE_PM
    dose_range_e_per_px: tuple[float, float] = DOSE_RANGE_E_PER_PX
    max_value: float = MAX_FRAME_VALUE

    def __post_init__(self) -> None:
        if not 1 <= self.max_side_px <= MAX_DIM:
            raise ValueError(f"max_side_px must be in 1..{MAX_DIM}, got {self.max_side_px}")

    @property
    def max_part_bytes(self) -> int:
        """Largest message part a receiver needs: a float64 frame of the largest side, or the
        largest header (ZMQ_MAXMSGSIZE is set from it)."""
        return max(self.max_side_px**2 * 8, MAX_HEADER_BYTES)


#: the limits every receiver applies unless given others.
DEFAULT_LIMITS = FrameLimits()


def _in_range(value: Any, bounds: tuple[float, float]) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and bounds[0] <= value <= bounds[1]
    )


def check_frame_header(head: Mapping[str, Any], limits: FrameLimits | None = None) -> None:
    """Check a frame header (already protocol-valid) against ``limits`` (default
    :data:`DEFAULT_LIMITS`); raise ProtocolError with reason ``shape``, ``pixel_size`` or
    ``dose``. Runs before any buffer is looked at."""
    limits = limits or DEFAULT_LIMITS
    h, w = head["buffers"][0]["shape"]
    if not (0 < h <= limits.max_side_px and 0 < w <= limits.max_side_px):
        raise ProtocolError(
            "shape", f"frame of {h} x {w} px: each side must be 1..{limits.max_side_px} px"
        )
    pixel = head["pixel_size_pm"]
    if not (isinstance(pixel, float) and math.isnan(pixel)) and not _in_range(
        pixel, limits.pixel_size_range_pm
    ):
        lo, hi = limits.pixel_size_range_pm
        raise ProtocolError(
            "pixel_size",
            f"pixel_size_pm = {pixel!r:.20} is outside {lo:g}..{hi:g} pm (NaN: unknown)",
        )
    dose = head.get("dose_e_per_px")
    if dose is not None and not _in_range(dose, limits.dose_range_e_per_px):
        lo, hi = limits.dose_range_e_per_px
        raise ProtocolError(
            "dose", f"dose_e_per_px = {dose!r:.20} is outside {lo:g}..{hi:g} electrons per pixel"
        )


def check_frame_values(frame: np.ndarray, limits: FrameLimits | None = None) -> None:
    """Reject a floating-point frame with a value beyond ``limits.max_value`` (reason
    ``range``); NaN/Inf are caught by :func:`decode` (reason ``nonfinite``)."""
    limits = limits or DEFAULT_LIMITS
    if frame.dtype.kind == "f" and frame.size and float(np.max(np.abs(frame))) > limits.max_value:
        raise ProtocolError("range", f"frame values beyond +-{limits.max_value:g} counts")


class MalformedCounter:
    """Counts rejected messages by reason and logs each reason once (thread-safe)."""

    def __init__(self, where: str, logger: logging.Logger | None = None):
        self.where = where
        self.counts: Counter[str] = Counter()
        self._log = logger or log
        self._lock = threading.Lock()

    def record(self, err: ProtocolError) -> None:
        with self._lock:
            first = self.counts[err.reason] == 0
            self.counts[err.reason] += 1
        if first:
            self._log.warning(
                "%s: skipped a malformed message (%s); further ones of this kind "
                "are counted silently",
                self.where,
                err,
            )

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)


class SequenceTracker:
    """Counts frames lost as gaps in sequence numbers, per session (a new session resets it).

    The first frame of a session counts the frames before it as lost (``seq`` numbers from 0),
    unless ``resume_after`` says which sequence number this receiver already holds (e.g. a
    restarted recorder that recovered its previous file)."""

    def __init__(self, count_start: bool = True) -> None:
        #: count the frames before the first one received as lost (False for viewers, which
        #: join a PUB/SUB stream wherever it is)
        self.count_start = count_start
        self.session: str | None = None
        self.last_seq: int | None = None
        self.received = 0
        self.lost = 0
        self.lost_at_start = 0
        self.out_of_order = 0

    def resume_after(self, session: str, seq: int) -> None:
        """Continue ``session`` after ``seq`` (held already): no gap counted before it."""
        self.session, self.last_seq = session, seq

    def update(self, session: str, seq: int) -> int:
        """Record ``seq``; return the number of frames missing just before it."""
        if session != self.session:
            self.session, self.last_seq = session, None
        if self.last_seq is None:
            gap = seq if self.count_start else 0  # frames 0..seq-1 never arrived
            self.lost_at_start += gap
        elif seq > self.last_seq:
            gap = seq - self.last_seq - 1
        else:
            self.out_of_order += 1
            return 0
        self.lost += gap
        self.received += 1
        self.last_seq = seq
        return gap

    def end(self, session: str, n_sent: int) -> int:
        """Record the end of ``session`` after ``n_sent`` frames (an ``eos``); return the frames
        missing at its tail (sent after the last one received), which count as lost."""
        if session != self.session:
            self.session, self.last_seq = session, None
        expected_next = 0 if self.last_seq is None else self.last_seq + 1
        tail = max(0, n_sent - expected_next)
        self.lost += tail
        if n_sent > 0:
            self.last_seq = max(n_sent - 1, self.last_seq if self.last_seq is not None else -1)
        return tail

    def as_dict(self) -> dict[str, int]:
        return {
            "received": self.received,
            "lost": self.lost,
            "lost_at_start": self.lost_at_start,
            "out_of_order": self.out_of_order,
        }
