"""OpenVINO on the CPU: the FP32 ONNX graph, and an INT8 form of it quantized by NNCF.

OpenVINO compiles one graph per input shape (batch, 1, H, W), with the input's shape fixed, and
runs it on its own CPU kernels. On the project's 2-core AVX2 machine (2026-11-27, 512^2, batch 1,
network alone, alternating runs in one process) onnxruntime FP32 ran 2.6-3.0 frames/s, OpenVINO
FP32 3.8-4.0 and the INT8 form (below) 5.8-6.0 (``segdepth bench engine``; README "Camera rate
on the CPU").

The INT8 form: NNCF's post-training quantization (``MIXED`` preset: symmetric per-channel int8
weights, asymmetric activations), calibrated on the same simulated frames as onnxruntime's INT8
graph (:func:`engine.quantize.calibration_frames`). The full-resolution level's convolutions,
the 1x1 output heads and the channel softmax stay in float32 (:data:`FLOAT_LAYERS`,
:data:`FLOAT_TYPES`). Screened on robustness-suite frames other than the parity record's (six
rows, draws of seeds 100-101): with only the first convolution and the heads in float32, up to
1.1 points of column exact were lost on a row (mean -0.51) at 7.4 frames/s; with the whole
full-resolution level, up to 0.48 (mean -0.18) at 5.9. The layers are named as in OpenVINO's
graph, where the ONNX name belongs to the bias addition after the convolution, and NNCF checks
that every name exists. The model is given a fixed input shape before it is quantized: with
dynamic sides NNCF cannot follow the exported graph's padding arithmetic, and a trial quantized
that way read every pixel as background. The quantized graph is saved as OpenVINO IR beside the
FP32 export, named by model hash and the whole quantization form (:func:`int8_path`), and
reshaped to each frame shape when compiled.

Both compile with ``INFERENCE_PRECISION_HINT`` f32: on a CPU with AMX or AVX512-BF16, OpenVINO
would otherwise run the float layers in bfloat16. INT8 is offered only for a model whose parity
record (``<model>.int8-openvino.json``, ``segdepth bench parity --candidate openvino-int8``)
passes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from engine.export import EXPORT_VERSION, OUTPUT_NAMES, export_onnx
from engine.model_io import LoadedModel
from engine.quantize import CalibrationConfig, calibration_frames

log = logging.getLogger(__name__)

#: layers the INT8 form keeps in float32, by their names in OpenVINO's graph (the ONNX name is
#: the bias addition's there): the full-resolution level's convolutions -- the first (it sees the
#: raw noisy counts), the encoder's second and the decoder's last two -- and the 1x1 output heads
#: (their logits set the confidence); with the softmax after the heads (:data:`FLOAT_TYPES`)
FLOAT_LAYERS = tuple(
    f"/model/{layer}/Conv/WithoutBiases"
    for layer in (
        "inc/inc.0",
        "inc/inc.3",
        "ups.4/conv/conv.0",
        "ups.4/conv/conv.3",
        "depth_head",
        "species_head",
    )
)
FLOAT_TYPES = ("Divide", "ReduceMax", "Subtract", "Exp", "ReduceSum")


def unavailable_reason(int8: bool = False) -> str | None:
    """Why OpenVINO (and, with ``int8``, NNCF to quantize for it) cannot run here, or None."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "openvino is not installed"
    if int8:
        try:
            import nncf  # noqa: F401
        except ImportError:
            return "nncf is not installed"
    return None


def int8_form() -> dict[str, Any]:
    """What an OpenVINO INT8 parity record must have been measured on (:mod:`engine.parity`)."""
    return {
        "runtime": "openvino",
        "export_version": EXPORT_VERSION,
        "calibration": asdict(CalibrationConfig()),
        "preset": "mixed",
        "float_layers": list(FLOAT_LAYERS),
        "float_types": list(FLOAT_TYPES),
    }


def int8_path(loaded: LoadedModel, cache_dir: Path) -> Path:
    """Where the INT8 graph of ``loaded`` is cached: ``<model hash>_ov_int8_<form hash>.xml``,
    named by all of :func:`int8_form` (export version, calibration, float32 layers), so that a
    graph quantized in another form is never reused under this form's parity record."""
    form = hashlib.sha256(json.dumps(int8_form(), sort_keys=True).encode()).hexdigest()[:8]
    return Path(cache_dir) / f"{loaded.sha256[:16]}_ov_int8_{form}.xml"


def int8_model(loaded: LoadedModel, cache_dir: Path) -> Path:
    """Write (or reuse) the INT8 graph at :func:`int8_path` (an ``.xml`` and its ``.bin``)."""
    import nncf
    import openvino as ov

    cfg = CalibrationConfig()
    cache_dir = Path(cache_dir)
    path = int8_path(loaded, cache_dir)
    if path.is_file() and path.with_suffix(".bin").is_file():
        return path
    fp32 = export_onnx(loaded, cache_dir, half=False)
    frames = calibration_frames(cfg, cache_dir)
    log.info(
        "quantizing %s to OpenVINO INT8 (calibration: %d simulated %d^2 frames; first time only)",
        loaded.model_id,
        len(frames),
        cfg.size,
    )
    model = ov.Core().read_model(str(fp32))
    model.reshape([1, 1, cfg.size, cfg.size])
    quantized = nncf.quantize(
        model,
        nncf.Dataset([frame[None] for frame in frames]),
        preset=nncf.QuantizationPreset.MIXED,
        subset_size=len(frames),
        # validated: a name missing from the graph fails here rather than quantizing the layer
        ignored_scope=nncf.IgnoredScope(names=list(FLOAT_LAYERS), types=list(FLOAT_TYPES)),
    )
    partial = path.with_name(path.stem + ".partial.xml")
    try:
        ov.save_model(quantized, str(partial), compress_to_fp16=False)
        # the weights first: the .xml appearing is what marks the pair complete
        partial.with_suffix(".bin").replace(path.with_suffix(".bin"))
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
        partial.with_suffix(".bin").unlink(missing_ok=True)
    return path


#: compiled shapes kept at once: a source that changes frame shape often recompiles (about a
#: second each) rather than holding one compiled graph per shape it ever sent
MAX_SHAPES = 8


class CompiledShapes:
    """A graph file compiled by OpenVINO once per input shape, on ``threads`` CPU threads, in
    float32 (where not quantized); the ``max_shapes`` most recently used shapes are kept."""

    def __init__(self, graph: Path, threads: int, max_shapes: int = MAX_SHAPES):
        import openvino as ov

        self._core = ov.Core()
        self._model = self._core.read_model(str(graph))  # read once; a copy per shape compiled
        self._config = {
            "INFERENCE_NUM_THREADS": int(threads),
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32",
        }
        self.max_shapes = max_shapes
        self._requests: OrderedDict[tuple[int, ...], Any] = OrderedDict()

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """The shapes compiled now, least recently used first."""
        return list(self._requests)

    def _request(self, shape: tuple[int, ...]):
        if shape in self._requests:
            self._requests.move_to_end(shape)
        else:
            model = self._model.clone()
            model.reshape(list(shape))
            compiled = self._core.compile_model(model, "CPU", self._config)
            self._requests[shape] = compiled.create_infer_request()
            while len(self._requests) > self.max_shapes:
                self._requests.popitem(last=False)
        return self._requests[shape]

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(b, 1, H, W) float32 -> (depth, species) float32 arrays (copies: the request's own
        output buffers are reused by its next run)."""
        request = self._request(tuple(x.shape))
        request.infer({0: x})
        depth, species = (np.array(request.get_tensor(name).data) for name in OUTPUT_NAMES)
        return depth, species
