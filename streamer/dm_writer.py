"""A minimal Gatan DM4 writer, for synthetic camera data (tests, demos, folder-watcher drills).

Writes one image (2-D frame or 3-D stack) with its spatial calibration and, optionally, the K3
In-Situ frame-count tag, in the DM4 tag-tree format rosettasciio and GMS read. Also writes a
K3 In-Situ dataset (director + raw files, frames possibly straddling files). GMS itself is not
needed. DM stores dimensions x-first: numpy (N, H, W) is DM (W, H, N).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

#: numpy dtype -> (DM image DataType, DM tag element type of the Data array)
_IMAGE_TYPES = {
    "int16": (1, 2),
    "float32": (2, 6),
    "uint8": (6, 10),
    "int32": (7, 3),
    "int8": (9, 10),
    "uint16": (10, 4),
    "uint32": (11, 5),
    "float64": (12, 7),
}
_TAG_GROUP, _TAG_DATA = 20, 21
_LONG, _DOUBLE, _USHORT, _ARRAY = 3, 7, 4, 20


def _name(name: str) -> bytes:
    raw = name.encode("latin-1")
    return struct.pack(">H", len(raw)) + raw


def _data_tag(name: str, info: list[int], payload: bytes) -> bytes:
    body = b"%%%%" + struct.pack(">Q", len(info)) + struct.pack(f">{len(info)}Q", *info) + payload
    return bytes([_TAG_DATA]) + _name(name) + struct.pack(">Q", len(body)) + body


def _group_tag(name: str, tags: list[bytes]) -> bytes:
    body = struct.pack(">BBQ", 0, 1, len(tags)) + b"".join(tags)
    return bytes([_TAG_GROUP]) + _name(name) + struct.pack(">Q", len(body)) + body


def _long(name: str, value: int) -> bytes:
    return _data_tag(name, [_LONG], struct.pack("<i", value))


def _double(name: str, value: float) -> bytes:
    return _data_tag(name, [_DOUBLE], struct.pack("<d", value))


def _text(name: str, value: str) -> bytes:
    chars = [ord(c) for c in value]
    return _data_tag(name, [_ARRAY, _USHORT, len(chars)], struct.pack(f"<{len(chars)}H", *chars))


def _tags(tree: dict[str, Any]) -> list[bytes]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out.append(_group_tag(key, _tags(value)))
        elif isinstance(value, str):
            out.append(_text(key, value))
        elif isinstance(value, float):
            out.append(_double(key, value))
        else:
            out.append(_long(key, int(value)))
    return out


def write_dm4(
    path: str | Path,
    data: np.ndarray,
    *,
    pixel_size_pm: float = 100.0,
    image_tags: dict[str, Any] | None = None,
) -> Path:
    """Write ``data`` ((H, W) or (N, H, W)) as a DM4 file with a pixel size in pm (stored in
    nm, as GMS does); ``image_tags`` become the image's ImageTags tree."""
    data = np.ascontiguousarray(data)
    if data.dtype.name not in _IMAGE_TYPES or data.ndim not in (2, 3):
        raise ValueError(f"cannot write a {data.ndim}-D {data.dtype} image as DM4")
    data = data.astype(data.dtype.newbyteorder("<"), copy=False)
    image_type, element_type = _IMAGE_TYPES[data.dtype.name]
    dims = list(data.shape[::-1])  # DM is x-first
    scales = [pixel_size_pm / 1e3, pixel_size_pm / 1e3, 1.0][: len(dims)]
    units = ["nm", "nm", ""][: len(dims)]
    calibration = [
        _group_tag("", _tags({"Origin": 0.0, "Scale": s, "Units": u}))
        for s, u in zip(scales, units)
    ]
    image_data = [
        _group_tag(
            "Calibrations",
            [
                _group_tag("Brightness", _tags({"Origin": 0.0, "Scale": 1.0, "Units": "counts"})),
                _group_tag("Dimension", calibration),
            ],
        ),
        _data_tag("Data", [_ARRAY, element_type, data.size], data.tobytes()),
        _long("DataType", image_type),
        _group_tag("Dimensions", [_long("", d) for d in dims]),
        _long("PixelDepth", data.dtype.itemsize),
    ]
    image = _group_tag(
        "",
        [
            _group_tag("ImageData", image_data),
            _group_tag("ImageTags", _tags(image_tags or {})),
            _text("Name", Path(path).stem),
        ],
    )
    root = struct.pack(">BBQ", 0, 1, 1) + _group_tag("ImageList", [image])
    path = Path(path)
    with open(path, "wb") as fh:
        fh.write(struct.pack(">IQI", 4, len(root) + 8, 1) + root + b"\0" * 8)
    return path


def write_k3_insitu(
    folder: str | Path,
    name: str,
    frames: np.ndarray,
    *,
    bytes_per_raw_file: int,
    pixel_size_pm: float = 100.0,
    recorded_frames: int | None = None,
) -> Path:
    """Write a K3 In-Situ dataset: ``NAME.dm4`` (director: the first frame, with the tag
    ``In-situ/Recorded/# Frames``) and the frames back to back in ``NAME.raw``,
    ``NAME.raw_1``, ... of ``bytes_per_raw_file`` each (so frames may straddle two files)."""
    folder = Path(folder)
    frames = np.ascontiguousarray(frames)
    raw = frames.tobytes()
    for k, start in enumerate(range(0, len(raw), bytes_per_raw_file)):
        suffix = ".raw" if k == 0 else f".raw_{k}"
        (folder / f"{name}{suffix}").write_bytes(raw[start : start + bytes_per_raw_file])
    count = len(frames) if recorded_frames is None else recorded_frames
    return write_dm4(
        folder / f"{name}.dm4",
        frames[0],
        pixel_size_pm=pixel_size_pm,
        image_tags={"In-situ": {"Recorded": {"# Frames": count}}},
    )
