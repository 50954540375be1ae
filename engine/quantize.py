"""INT8 inference on the CPU: onnxruntime static quantization of the FP32 graph.

Weights are quantized per output channel (int8), activations per tensor (uint8), in the
QOperator form (QLinearConv), with ``reduce_range`` (7-bit weights): on AVX2 machines without
VNNI, onnxruntime's u8s8 kernels add pairs of products in 16 bits, which can saturate with
full-range weights (onnxruntime's own advice for such machines).
Activation ranges are calibrated on simulated frames like the training set's: faceted particles
from a small exit-wave library (:mod:`sim_source.wave_library`) under microscopes, angles and
doses drawn from the training ranges (:mod:`training.library_data`), plus axis-aligned
``segdepth simulate`` slabs; Poisson noise at doses log-uniform over 0.5-10 e-/px, divided by
the dose exactly as the engine's :mod:`engine.normalise` does. The library and the quantized
graph are cached beside the FP32 export, named by model hash and calibration settings.

An INT8 graph is only *offered* for a model whose parity record
(``<model>.int8.json``, written by ``segdepth bench parity``) shows that its column-level
accuracy stays within :data:`engine.parity.PARITY_BOUND_POINTS` of FP32 on every row of the
robustness suite.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.export import EXPORT_VERSION, INPUT_NAME, export_onnx
from engine.model_io import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationConfig:
    """What an INT8 graph is a function of: calibration frames rendered from ``structures``
    simulated particles (``library_frames`` views of ``size`` px) and ``slab_frames``
    simulated slabs, the seed of both, and the dose range (e-/px, log-uniform)."""

    structures: int = 3
    library_frames: int = 48
    slab_frames: int = 16
    size: int = 256
    seed: int = 7000
    dose_min: float = 0.5
    dose_max: float = 10.0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]


def _particle_frames(cfg: CalibrationConfig, cache_dir: Path) -> np.ndarray:
    """Clean views (N, size, size) of a small exit-wave library simulated into ``cache_dir``."""
    from sim_source.wave_library import LibraryConfig, write_library
    from training.labels import TargetConfig
    from training.library_data import RenderConfig, load_library, render_set

    path = Path(cache_dir) / f"calibration_waves_{cfg.key()}.h5"
    write_library(
        path, LibraryConfig(count=cfg.structures, seed=cfg.seed), resume=True, progress=False
    )
    data = render_set(
        load_library(path),
        cfg.library_frames,
        cfg.seed,
        RenderConfig(crop=cfg.size),
        TargetConfig(),
    )
    return data.images


def calibration_frames(cfg: CalibrationConfig, cache_dir: Path) -> np.ndarray:
    """Dose-normalised noisy frames (N, 1, size, size) float32: particle views, then slabs at
    four defoci per structure (deterministic in ``cfg``)."""
    from sim_source.dataset import DatasetConfig, clean_images
    from sim_source.noise import add_poisson_noise

    clean = list(clean_images(DatasetConfig(count=cfg.slab_frames, size=cfg.size, seed=cfg.seed)))
    if cfg.structures and cfg.library_frames:
        clean = [*_particle_frames(cfg, cache_dir), *clean]
    rng = np.random.default_rng(cfg.seed)
    dose = np.exp(rng.uniform(np.log(cfg.dose_min), np.log(cfg.dose_max), len(clean)))
    return add_poisson_noise(np.stack(clean), dose[:, None, None], rng)[:, None]


class _Frames:
    """onnxruntime's CalibrationDataReader over an array of frames, one per call."""

    def __init__(self, frames: np.ndarray):
        self._it = iter(frames)

    def get_next(self) -> dict[str, np.ndarray] | None:
        frame = next(self._it, None)
        return None if frame is None else {INPUT_NAME: frame[None]}


def int8_graph(
    loaded: LoadedModel, cache_dir: Path, cfg: CalibrationConfig = CalibrationConfig()
) -> Path:
    """Write (or reuse) ``<hash>_int8_<calibration key>_v<EXPORT_VERSION>.onnx`` in
    ``cache_dir``."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    cache_dir = Path(cache_dir)
    path = cache_dir / f"{loaded.sha256[:16]}_int8_{cfg.key()}_v{EXPORT_VERSION}.onnx"
    if path.is_file():
        return path
    fp32 = export_onnx(loaded, cache_dir, half=False)
    log.info(
        "quantizing %s to INT8 (calibration: %d simulated %d^2 frames; first time only)",
        loaded.model_id,
        cfg.library_frames + cfg.slab_frames,
        cfg.size,
    )
    prepared = path.with_suffix(".pre.onnx")
    partial = path.with_suffix(".partial.onnx")
    try:
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(partial),
            _Frames(calibration_frames(cfg, cache_dir)),
            quant_format=QuantFormat.QOperator,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        partial.replace(path)  # atomic: a crash never leaves a half-written graph in the cache
    finally:
        prepared.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
    return path


def int8_form() -> dict[str, Any]:
    """What an INT8 parity record must have been measured on (:mod:`engine.parity`): this
    export version and this calibration."""
    return {"export_version": EXPORT_VERSION, "calibration": asdict(CalibrationConfig())}
