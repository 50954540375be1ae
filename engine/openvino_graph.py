"""OpenVINO on the CPU: the FP32 ONNX graph, and the model's INT8 graph.

OpenVINO compiles one graph per input shape (batch, 1, H, W), with the input's shape fixed, and
runs it on its own CPU kernels. On the project's 2-core AVX2 machine (2026-11-27, 512^2, batch 1,
network alone, alternating runs in one process) onnxruntime FP32 ran 2.6-3.0 frames/s, OpenVINO
FP32 3.8-4.0 and the INT8 form (below) 5.8-6.0 (``segdepth bench engine``; README "Camera rate
on the CPU").

The INT8 graph (``openvino-int8``) is the model's own, fitted by quantization-aware
distillation and kept beside it (:mod:`engine.openvino_qat`); it is reshaped to each frame shape
when compiled, like the FP32 graph.

Both compile with ``INFERENCE_PRECISION_HINT`` f32: on a CPU with AMX or AVX512-BF16, OpenVINO
would otherwise run the float layers in bfloat16. INT8 is offered only for a model whose parity
record (``<model>.int8-openvino.json``, ``segdepth bench parity --candidate openvino-int8``)
passes on that graph.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from engine.export import OUTPUT_NAMES


def unavailable_reason() -> str | None:
    """Why OpenVINO cannot run here, or None."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "openvino is not installed"
    return None


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
