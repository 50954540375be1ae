"""INT8 inference on the CPU: onnxruntime static quantization of the FP32 graph.

Weights are quantized per output channel (int8), activations per tensor (uint8) with ranges
calibrated on simulated frames: ``segdepth simulate``-style CeO2 [110] slabs (multislice,
abTEM), Poisson noise at doses drawn log-uniform over the training range, divided by their
dose exactly as the engine's :mod:`engine.normalise` does. The QOperator form (QLinearConv) is
used: on the 2-core AVX2 machines it measured 1.4x faster than the QDQ form of the same
quantization (README "Benchmarks"). The quantized graph is cached beside the FP32 export,
named by model hash and calibration settings.

An INT8 graph is only *offered* for a model whose parity record
(``<model>.int8.json``, written by ``segdepth bench parity``) shows that its column-level
accuracy stays within :data:`PARITY_BOUND_POINTS` of FP32 on every row of the robustness suite.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.export import INPUT_NAME, export_onnx
from engine.model_io import LoadedModel

log = logging.getLogger(__name__)

#: largest drop (or rise) of column-level exact accuracy against FP32, in percentage points,
#: on any robustness-suite row, for an INT8 graph to be offered (issue #13).
PARITY_BOUND_POINTS = 0.5


@dataclass(frozen=True)
class CalibrationConfig:
    """What an INT8 graph is a function of: calibration frames (count, side in px, seed of the
    simulated structures and noise) and the dose range (e-/px, log-uniform)."""

    frames: int = 16
    size: int = 256
    seed: int = 7000
    dose_min: float = 0.5
    dose_max: float = 10.0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]


def calibration_frames(cfg: CalibrationConfig) -> np.ndarray:
    """Dose-normalised noisy frames (N, 1, size, size) float32 of simulated slabs, 4 defoci per
    structure (deterministic in ``cfg``)."""
    from sim_source.dataset import DatasetConfig, simulate_group
    from sim_source.noise import add_poisson_noise

    data = DatasetConfig(count=cfg.frames, size=cfg.size, seed=cfg.seed)
    clean = np.stack([r.image for g in range(data.n_groups) for r in simulate_group(data, g)])
    rng = np.random.default_rng(cfg.seed)
    dose = np.exp(rng.uniform(np.log(cfg.dose_min), np.log(cfg.dose_max), len(clean)))
    return add_poisson_noise(clean, dose[:, None, None], rng)[:, None]


class _Frames:
    """onnxruntime's CalibrationDataReader over an array of frames, one per call."""

    def __init__(self, frames: np.ndarray):
        self._it = iter(frames)

    def get_next(self) -> dict[str, np.ndarray] | None:
        frame = next(self._it, None)
        return None if frame is None else {INPUT_NAME: frame[None]}


def int8_graph(loaded: LoadedModel, cache_dir: Path,
               cfg: CalibrationConfig = CalibrationConfig()) -> Path:
    """Write (or reuse) ``<hash>_int8_<calibration key>.onnx`` in ``cache_dir``."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    cache_dir = Path(cache_dir)
    path = cache_dir / f"{loaded.sha256[:16]}_int8_{cfg.key()}.onnx"
    if path.is_file():
        return path
    fp32 = export_onnx(loaded, cache_dir, half=False)
    log.info("quantizing %s to INT8 (calibration: %d simulated %d^2 frames)", loaded.model_id,
             cfg.frames, cfg.size)
    prepared = path.with_suffix(".pre.onnx")
    partial = path.with_suffix(".partial.onnx")
    try:
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(partial), _Frames(calibration_frames(cfg)),
                        quant_format=QuantFormat.QOperator, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        partial.replace(path)  # atomic: a crash never leaves a half-written graph in the cache
    finally:
        prepared.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
    return path


def parity_path(model_path: Path) -> Path:
    """Where a model's INT8 parity record lies: beside it, ``<stem>.int8.json``."""
    return Path(model_path).with_suffix(".int8.json")


def parity_refusal(loaded: LoadedModel) -> str | None:
    """Why INT8 is not offered for ``loaded`` (no record, another model's, or a failed check),
    or None when its parity record passes."""
    path = parity_path(loaded.path)
    fix = f"run `segdepth bench parity --model {loaded.path}`"
    if not path.is_file():
        return f"no INT8 parity record for this model ({path}): {fix}"
    record: dict[str, Any] = json.loads(path.read_text())
    if record.get("model_sha256") != loaded.sha256:
        return f"{path} was measured on another model file: {fix}"
    if not record.get("passed"):
        return (f"INT8 changed column accuracy by {record.get('max_abs_diff_points')} points "
                f"on the robustness suite (bound {PARITY_BOUND_POINTS}; {path})")
    return None
