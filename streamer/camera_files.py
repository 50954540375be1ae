"""Camera files as frame stacks: TIFF (tifffile), MRC (mrcfile), Gatan DM3/DM4 (rosettasciio)
and K3 In-Situ datasets (a ``NAME.dm4`` director beside ``NAME.raw``, ``NAME.raw_1``, ...).

Every reader gives a :class:`CameraStack`: ``frames`` indexable as (N, H, W) (memory-mapped
where the format allows), the pixel size in pm and the frame interval in s (NaN when the file
does not say). Files still being written raise :class:`Incomplete`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SUFFIXES = (".tif", ".tiff", ".mrc", ".mrcs", ".dm3", ".dm4")
#: pm per unit of length names found in camera files.
PM_PER_UNIT = {
    "pm": 1.0,
    "Å": 100.0,
    "A": 100.0,
    "angstrom": 100.0,
    "nm": 1e3,
    "µm": 1e6,
    "um": 1e6,
    "micron": 1e6,
    "mm": 1e9,
    "cm": 1e10,
    "m": 1e12,
}
_RAW_INDEX = re.compile(r"\.raw(?:_(\d+))?$")


class Incomplete(Exception):
    """The file is still being written (or truncated): try again later."""


@dataclass
class CameraStack:
    """Frames of one camera file: ``frames[i]`` is an (H, W) array."""

    path: Path
    frames: Any
    pixel_size_pm: float = math.nan
    frame_interval_s: float = math.nan
    dose_e_per_px: float = math.nan
    closers: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.frames)

    def close(self) -> None:
        for close in self.closers:
            close()


def _as_stack(data: np.ndarray, path: Path) -> np.ndarray:
    if data.ndim == 2:
        return data[np.newaxis]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected one frame or a stack of frames, got shape {data.shape}")
    return data


def read_tiff(path: Path) -> CameraStack:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first  # the first page is always a full TiffPage
            res, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
            pixel_pm = math.nan
            if res is not None and unit is not None:
                num, den = res.value
                per_unit = {2: 2.54e10, 3: 1e10}.get(int(unit.value))  # inch, cm in pm
                if per_unit and num:
                    pixel_pm = per_unit * den / num
            try:
                data: np.ndarray = tifffile.memmap(path, mode="r")
            except ValueError:  # compressed or not contiguous: read it
                data = tif.asarray()
    except (tifffile.TiffFileError, EOFError, IndexError, ValueError, OSError) as exc:
        raise Incomplete(f"{path}: {exc}") from exc
    return CameraStack(path, _as_stack(data, path), pixel_size_pm=pixel_pm)


def read_mrc(path: Path) -> CameraStack:
    import mrcfile

    size = path.stat().st_size
    with open(path, "rb") as fh:  # check the byte count before mapping (file may be growing)
        head = fh.read(1024)
    if len(head) < 1024:
        raise Incomplete(f"{path}: header not complete")
    nx, ny, nz, mode = np.frombuffer(head[:16], "<i4")
    nsymbt = int(np.frombuffer(head[92:96], "<i4")[0])
    itemsize = {0: 1, 1: 2, 2: 4, 6: 2, 12: 2}.get(int(mode))
    if itemsize is None:
        raise ValueError(f"{path}: MRC mode {mode} is not a camera image mode")
    if size < 1024 + nsymbt + int(nx) * int(ny) * int(nz) * itemsize:
        raise Incomplete(f"{path}: {size} bytes, data not complete")
    mrc = mrcfile.mmap(path, mode="r", permissive=True)
    voxel_a = float(mrc.voxel_size.x)
    return CameraStack(
        path,
        _as_stack(mrc.data, path),
        pixel_size_pm=voxel_a * 100.0 if voxel_a > 0 else math.nan,
        closers=[mrc.close],
    )


def _dm_tag(tags: dict, *names: str) -> Any:
    for name in names:
        if not isinstance(tags, dict) or name not in tags:
            return None
        tags = tags[name]
    return tags


def _read_dm(path: Path) -> tuple[Any, float, dict]:
    """(data, pixel size in pm, image tags) of the (first) image of a DM3/DM4 file."""
    from rsciio.digitalmicrograph import file_reader

    try:
        images = file_reader(str(path), lazy=True)
    except Exception as exc:  # rsciio raises many types on a truncated file
        raise Incomplete(f"{path}: {type(exc).__name__}: {exc}") from exc
    if not images:
        raise ValueError(f"{path}: no image in this DM file")
    image = images[0]
    signal_axes = [a for a in image["axes"] if not a.get("navigate", False)]
    pixel_pm = math.nan
    if signal_axes:
        axis = signal_axes[-1]
        per_unit = PM_PER_UNIT.get(str(axis.get("units", "")).strip())
        if per_unit:
            pixel_pm = float(axis["scale"]) * per_unit
    tags = _dm_tag(image["original_metadata"], "ImageList", "TagGroup0", "ImageTags") or {}
    return image["data"], pixel_pm, tags


def read_dm(path: Path) -> CameraStack:
    data, pixel_pm, _ = _read_dm(path)
    stack = _as_stack(np.asarray(data), path) if data.ndim == 2 else _as_stack(data, path)
    return CameraStack(path, _LazyFrames(stack), pixel_size_pm=pixel_pm)


class _LazyFrames:
    """Index a lazy (dask) stack frame by frame."""

    def __init__(self, data: Any):
        self.data = data

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def __getitem__(self, i: int) -> np.ndarray:
        frame = self.data[i]
        return np.asarray(frame.compute() if hasattr(frame, "compute") else frame)


def raw_files(director: Path) -> list[Path]:
    """``NAME.raw``, ``NAME.raw_1``, ... beside ``NAME.dm4``, in order."""
    found = []
    for p in director.parent.glob(director.stem + ".raw*"):
        m = _RAW_INDEX.search(p.name)
        if m and p.name[: m.start()] == director.stem:
            found.append((int(m.group(1) or 0), p))
    return [p for _, p in sorted(found)]


class K3InSituDataset:
    """A K3 In-Situ recording: frames of the director's dtype and shape, back to back across
    ``NAME.raw``, ``NAME.raw_1``, ...; a frame may straddle two files. Files are memory-mapped
    and re-mapped as they grow, so frames can be read while the camera still writes.
    """

    def __init__(self, director: Path):
        self.director = Path(director)
        data, self.pixel_size_pm, tags = _read_dm(self.director)
        self.shape = tuple(int(s) for s in data.shape[-2:])
        self.dtype = np.dtype(data.dtype)
        self.frame_bytes = int(np.prod(self.shape)) * self.dtype.itemsize
        count = _dm_tag(tags, "In-situ", "Recorded", "# Frames")
        self.recorded_frames = int(count) if isinstance(count, (int, float)) else None
        self._maps: list[np.memmap] = []
        self._paths: list[Path] = []

    def refresh(self) -> int:
        """Re-scan the raw files (they may have grown); the number of complete frames."""
        mapped = dict(zip(self._paths, self._maps))
        self._paths, self._maps = [], []
        for path in raw_files(self.director):
            size = path.stat().st_size
            if not size:
                break  # later files cannot hold frames before an empty one is written
            old = mapped.get(path)
            self._paths.append(path)
            self._maps.append(
                old
                if old is not None and old.size == size
                else np.memmap(path, dtype=np.uint8, mode="r", shape=(size,))
            )
        return self.available()

    def available(self) -> int:
        total = sum(m.size for m in self._maps)
        n = total // self.frame_bytes
        # the tag may disagree with the bytes on disk: never read past either
        return min(n, self.recorded_frames) if self.recorded_frames is not None else n

    def frame(self, i: int) -> np.ndarray:
        """Frame ``i`` as an (H, W) array (a view into the mapped file unless it straddles)."""
        start = i * self.frame_bytes
        pieces, offset = [], 0
        for m in self._maps:
            lo, hi = max(start - offset, 0), min(start + self.frame_bytes - offset, m.size)
            if lo < hi:
                pieces.append(m[lo:hi])
            offset += m.size
        raw = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        if raw.size != self.frame_bytes:
            raise IndexError(f"frame {i} is not on disk yet")
        return raw.view(self.dtype).reshape(self.shape)

    def __len__(self) -> int:
        return self.available()

    def __getitem__(self, i: int) -> np.ndarray:
        return self.frame(i)


def is_k3_director(path: Path) -> bool:
    """A ``.dm4`` with raw files beside it, or tagged as an In-Situ recording (whose raw files
    may not be there yet)."""
    if path.suffix.lower() != ".dm4":
        return False
    if raw_files(path):
        return True
    try:
        _, _, tags = _read_dm(path)
    except (Incomplete, ValueError):
        return False
    return _dm_tag(tags, "In-situ", "Recorded") is not None


def read_camera_file(path: str | Path) -> CameraStack:
    """The frames of one camera file (a K3 In-Situ director reads its raw files)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        return read_tiff(path)
    if suffix in (".mrc", ".mrcs"):
        return read_mrc(path)
    if suffix in (".dm3", ".dm4"):
        if is_k3_director(path):
            dataset = K3InSituDataset(path)
            dataset.refresh()
            return CameraStack(path, dataset, pixel_size_pm=dataset.pixel_size_pm)
        return read_dm(path)
    raise ValueError(f"{path}: not a camera file ({', '.join(SUFFIXES)})")


def camera_files(folder: str | Path) -> list[Path]:
    """Camera files in ``folder`` (not its raw companions), sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)


def iter_folder(folder: str | Path) -> Iterator[CameraStack]:
    """Every camera file of ``folder`` in name order, opened one at a time."""
    for path in camera_files(folder):
        stack = read_camera_file(path)
        try:
            yield stack
        finally:
            stack.close()
