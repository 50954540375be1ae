"""Post-processing on the inference device: the published maps, the columns' depth averages and
the drift registration, computed from probability tensors left where the network wrote them
(torch: CUDA on a GPU machine; the same code runs on the CPU, where the tests hold it equal to
the host path of :mod:`engine.prediction`, :mod:`engine.columns` and :mod:`engine.drift`).

What crosses back to the host per frame: the depth (uint8), confidence (float32) and species
(uint8) maps, the columns' averaged depth probabilities (n, 11) and a window of the
drift-correlation surface ((2(r + 8) + 3)² around the batch's first prior; r: the search
radius, px); the species maps (3, H, W) only while a session's column reference grows (its
first ``ColumnConfig.reference_frames`` frames). Against copying the full float32
probabilities (14 channels: 14.7 MB per 512² frame) that is 1.5 MB. Once the reference is
complete, a batch's frames of one session wait for the device twice in all (drift windows,
then column averages: :meth:`engine.columns.ColumnTracker.update_series`), not twice each.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from engine.columns import FrameMaps, disk_offsets
from engine.drift import DriftEstimator


class DevicePrediction:
    """Per-pixel probabilities for a batch as tensors on one device: depth (B, 11, H, W),
    species (B, 3, H, W), float16 or float32 (:class:`engine.prediction.Prediction`'s
    interface; host copies on demand)."""

    def __init__(self, depth: torch.Tensor, species: torch.Tensor):
        self.depth, self.species = depth, species
        #: on CUDA, marks on the current stream the moment the tensors are written, for work
        #: on another stream to wait for (:func:`post_stream`); None elsewhere
        self.written: torch.cuda.Event | None = None
        if depth.device.type == "cuda":
            self.written = torch.cuda.Event()
            self.written.record()

    @property
    def depth_prob(self) -> np.ndarray:
        """Host copy (B, 11, H, W) float32."""
        return self.depth.float().cpu().numpy()

    @property
    def species_prob(self) -> np.ndarray:
        """Host copy (B, 3, H, W) float32."""
        return self.species.float().cpu().numpy()

    def turn_scores(self, frames: list[int], turned: DevicePrediction) -> np.ndarray:
        """The turn check's score (len(frames),) float64 of frames ``frames`` against
        ``turned`` (the same frames turned by 90°), as
        :func:`training.inference.turn_scores` (to float32 rounding), on the device: the two
        (n, 11, H, W) probabilities stay there (at 1024² a pageable copy of each took ~30 ms)."""
        return turn_scores_of(self.depth[frames], turned.depth)

    @functools.cached_property
    def _depth_max(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per pixel the largest depth probability and its channel (B, H, W), on the device."""
        with torch.inference_mode():
            confidence, depth = self.depth.max(dim=1)
        return confidence, depth

    def maps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Depth (uint8), confidence (float32) and species (uint8) maps (B, H, W), reduced on
        the device (ties: the first channel, as :func:`engine.prediction.channel_max`)."""
        confidence, depth = self._depth_max
        with torch.inference_mode():
            species = self.species.argmax(dim=1)
            depth_u8, confidence_f32, species_u8 = to_host(
                depth.to(torch.uint8), confidence.float(), species.to(torch.uint8)
            )
            return depth_u8, confidence_f32, species_u8

    def uncertainty_scores(self) -> np.ndarray:
        """The one-pass OOD score per frame (B,) float64, as
        :func:`training.inference.uncertainty_scores` of :meth:`maps` (to float32 rounding),
        reduced on the device: only B numbers come back."""
        return _uncertainty(*self._depth_max)

    def frame(self, i: int) -> TorchFrameMaps:
        """Frame ``i``'s maps as the column tracker reads them, left on the device."""
        return TorchFrameMaps(self.species[i], self.depth[i])


@contextlib.contextmanager
def post_stream(pred: object, stream: torch.cuda.Stream | None) -> Iterator[None]:
    """Run the block's device work on ``stream``, once ``pred``'s tensors are written: on a
    GPU the post-processing of one batch then waits for that batch's inference alone, not
    behind the next batch's, which the inference stage has queued on its own stream by then.
    The block's work is finished on leaving (its tensors may be freed and reused by the
    inference stream). Nothing happens for a host prediction or without a stream."""
    written = getattr(pred, "written", None)
    if stream is None or written is None:
        yield
        return
    stream.wait_event(written)
    try:
        with torch.cuda.stream(stream):
            yield
    finally:
        stream.synchronize()


def turn_scores_of(depth: torch.Tensor, turned: torch.Tensor) -> np.ndarray:
    """:func:`training.inference.turn_scores` (to float32 rounding) of depth probabilities
    (n, 11, H, W) against those of the same frames turned by 90° (``turned``, (n, 11, W, H),
    not yet turned back), on their device: (n,) float64 on the host."""
    with torch.inference_mode():
        p = depth.float()
        q = torch.rot90(turned.float(), -1, dims=(2, 3))
        tv = 0.5 * (p - q).abs().sum(dim=1)
        column = (p.argmax(dim=1) > 0) | (q.argmax(dim=1) > 0)
        return _masked_means(tv, column)


def uncertainty_scores_of(depth: torch.Tensor) -> np.ndarray:
    """:func:`training.inference.uncertainty_scores` (to float32 rounding) of depth
    probabilities (B, 11, H, W) on their device: (B,) float64 on the host."""
    return _uncertainty(*depth.max(dim=1))


def _uncertainty(confidence: torch.Tensor, depth: torch.Tensor) -> np.ndarray:
    """Per frame the mean of 1 − confidence over the pixels whose depth (B, H, W) is a
    column (all pixels when none)."""
    with torch.inference_mode():
        return 1 - _masked_means(confidence.float(), depth > 0)


def _masked_means(values: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """Per frame the mean of ``values`` (B, H, W) over the pixels in ``mask`` (B, H, W), or
    over all pixels where the mask is empty: (B,) float64 on the host."""
    n = mask.sum(dim=(1, 2))
    masked = (values * mask).sum(dim=(1, 2)) / n.clamp_min(1)
    return torch.where(n > 0, masked, values.mean(dim=(1, 2))).double().cpu().numpy()


def to_host(*tensors: torch.Tensor) -> list[np.ndarray]:
    """Host copies of ``tensors`` (all on one device). From a CUDA device they go into
    page-locked memory, issued together and waited for once: pageable copies of a batch's
    1024² maps ran at ~1.5 GB/s on an H100 (``scripts/profile_post.py``), 4 of the 7.4 ms per
    frame of post-processing."""
    if not tensors or tensors[0].device.type != "cuda":
        return [t.cpu().numpy() for t in tensors]
    hosts = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for host, t in zip(hosts, tensors):
        host.copy_(t, non_blocking=True)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return [host.numpy() for host in hosts]


class TorchFrameMaps(FrameMaps):
    """One frame's species (3, H, W) and depth (11, H, W) probability tensors on a device."""

    def __init__(self, species: torch.Tensor, depth: torch.Tensor):
        self._species_t, self._depth_t = species, depth
        self._species_host: np.ndarray | None = None

    @property
    def species_shape(self) -> tuple[int, ...]:
        return tuple(self._species_t.shape)

    def species_host(self) -> np.ndarray:
        if self._species_host is None:
            self._species_host = self._species_t.float().cpu().numpy()
        return self._species_host

    def registration_maps(self) -> torch.Tensor:
        return self._species_t[1:]

    def drift_estimator(self, reference: np.ndarray) -> DriftEstimator:
        return DriftEstimator(reference, self._species_t.device)

    def disk_average(
        self, y_px: np.ndarray, x_px: np.ndarray, radius_px: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """As :func:`engine.columns.disk_average`, with the disks' pixel indices built, gathered
        and averaged on the device: only the rounded centres (n, 2) go up, one (n, 12) array
        comes back."""
        return _split(self._disk_means(y_px, x_px, radius_px).cpu().numpy())

    @staticmethod
    def disk_averages(
        frames: Sequence[FrameMaps],
        y_px: Sequence[np.ndarray],
        x_px: Sequence[np.ndarray],
        radius_px: float,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`disk_average` of each frame at its own positions (the same number of
        positions in each), computed on the device and copied back in one go."""
        means = []
        for frame, y, x in zip(frames, y_px, x_px):
            assert isinstance(frame, TorchFrameMaps)
            means.append(frame._disk_means(y, x, radius_px))
        return [_split(m) for m in torch.stack(means).cpu().numpy()]

    def _disk_means(self, y_px: np.ndarray, x_px: np.ndarray, radius_px: float) -> torch.Tensor:
        """(n, C + 1) on the device: each disk's mean depth probabilities and its pixel count
        inside the frame."""
        c, h, w = self._depth_t.shape
        device = self._depth_t.device
        offsets = _disk_offsets_on(float(radius_px), device)
        centres = np.rint(np.stack([y_px, x_px], axis=1)).astype(np.int64)
        with torch.inference_mode():
            pixels = torch.from_numpy(centres).to(device)[:, None, :] + offsets[None]  # (n, k, 2)
            cy, cx = pixels[..., 0], pixels[..., 1]
            weight = ((cy >= 0) & (cy < h) & (cx >= 0) & (cx < w)).float()
            flat = cy.clamp(0, h - 1) * w + cx.clamp(0, w - 1)
            values = self._depth_t.reshape(c, -1)[:, flat].float()  # (C, n, k)
            count = weight.sum(dim=1)
            mean = (values * weight[None]).sum(dim=2) / count.clamp_min(1)[None]
            return torch.cat([mean.T, count[:, None]], dim=1)


def _split(means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, C + 1) disk means and counts -> ((n, C) means, (n,) inside the frame)."""
    return means[:, :-1], means[:, -1] > 0


@functools.lru_cache(maxsize=16)
def _disk_offsets_on(radius_px: float, device: torch.device) -> torch.Tensor:
    """:func:`engine.columns.disk_offsets` (k, 2) as a tensor on ``device``, built once."""
    return torch.from_numpy(disk_offsets(radius_px)).to(device)
