"""Inference backends behind one interface: frames in, depth and species probabilities out.

``tensorrt`` (serialized FP16 plan, optimisation profile over batch), ``torch-cuda`` (FP16,
channels-last, one CUDA graph replayed per batch size and frame shape), ``onnxruntime-int8``
(the statically quantized graph of :mod:`engine.quantize`, CPU), ``onnxruntime`` (the FP32 ONNX
graph; CUDA provider when present, else CPU) and ``torch-cpu`` (eager FP32, the reference).
:func:`unavailable_reason` says why a backend cannot run here and :meth:`Backend.refusal` why
it is not offered for a given model (INT8 without a passing parity record); ``auto`` picks the
first backend in :data:`PREFERENCE` (fastest first, see ``segdepth bench engine``) that is
neither.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from engine.export import (
    INPUT_NAME,
    OUTPUT_NAMES,
    PlanProfile,
    build_tensorrt_plan,
    default_cache_dir,
    export_onnx,
    tensorrt_unavailable_reason,
)
from engine.model_io import LoadedModel, pad_to_multiple


@dataclass
class Prediction:
    """Per-pixel probabilities for a batch: depth (B, 11, H, W), species (B, 3, H, W) float32."""

    depth_prob: np.ndarray
    species_prob: np.ndarray

    def maps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per pixel: depth (argmax, uint8), confidence (its probability, float32) and species
        (argmax, uint8), each (B, H, W) -- paper eqs. (4)-(5)."""
        depth, confidence = channel_max(self.depth_prob)
        species, _ = channel_max(self.species_prob)
        return depth, confidence, species


def channel_max(prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Argmax (uint8, the first on ties) and maximum over axis 1 of (B, C, H, W) maps.

    One pass per channel over contiguous planes: 4x faster than torch's or numpy's reduction
    over the channel axis on one core at 512² (2.7 vs 10.7 / 13.9 ms for 11 channels).
    """
    best = prob[:, 0].copy()
    index = np.zeros(best.shape, np.uint8)
    for k in range(1, prob.shape[1]):
        higher = prob[:, k] > best
        np.copyto(best, prob[:, k], where=higher)
        index[higher] = k
    return index, best


def infer_tta(backend: Backend, frames: np.ndarray) -> Prediction:
    """Test-time augmentation: the backend's probabilities averaged over the 8 flips and
    quarter turns of the frames (B, H, W), each mapped back (8 passes; a backend whose plan
    has a fixed H × W needs square frames)."""
    from training.inference import DIHEDRAL

    depth = np.zeros((), np.float64)
    species = np.zeros((), np.float64)
    for k, flip in DIHEDRAL:
        x = np.rot90(frames[..., ::-1] if flip else frames, k, axes=(-2, -1))
        pred = backend.infer(np.ascontiguousarray(x))
        d, s = (np.rot90(p, -k, axes=(-2, -1)) for p in (pred.depth_prob, pred.species_prob))
        depth, species = (
            depth + (d[..., ::-1] if flip else d),
            species + (s[..., ::-1] if flip else s),
        )
    n = len(DIHEDRAL)
    return Prediction(
        np.ascontiguousarray(depth / n, np.float32), np.ascontiguousarray(species / n, np.float32)
    )


class Backend(ABC):
    """One way of running the model. ``infer`` takes normalised frames (B, H, W) float32."""

    name: ClassVar[str]
    precision: ClassVar[str]
    #: frames per batch the engine uses unless told otherwise: on the 2-core CPU machines
    #: batch 1 measured faster than 4 through serve (onnxruntime 512^2: 2.88 vs 2.21 frames/s)
    preferred_batch: int = 8

    def __init__(self, loaded: LoadedModel, max_batch: int = 32, cache_dir: Path | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.loaded = loaded
        self.max_batch = max_batch
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    @staticmethod
    def unavailable_reason() -> str | None:
        """Why this backend cannot run on this machine, or None."""
        return None

    @staticmethod
    def refusal(loaded: LoadedModel) -> str | None:
        """Why this backend is not offered for ``loaded`` although it runs here, or None."""
        return None

    def infer(self, frames: np.ndarray) -> Prediction:
        """Probabilities for ``frames`` (B, H, W) (any B: split into chunks of max_batch)."""
        frames = np.asarray(frames, dtype=np.float32)
        if frames.ndim != 3:
            raise ValueError(f"frames must be (B, H, W), got shape {frames.shape}")
        padded, (h, w) = pad_to_multiple(frames, self.loaded.size_multiple)
        depth, species = [], []
        for start in range(0, len(padded), self.max_batch):
            chunk = np.ascontiguousarray(padded[start : start + self.max_batch, None])
            d, s = self._run(chunk)
            depth.append(d[..., :h, :w])
            species.append(s[..., :h, :w])
        return Prediction(np.concatenate(depth), np.concatenate(species))

    @abstractmethod
    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(b, 1, H, W) float32, b <= max_batch -> (depth, species) float32 numpy arrays."""


class TorchCPUBackend(Backend):
    """PyTorch eager, FP32, on the CPU: the reference every other backend is checked against."""

    name, precision = "torch-cpu", "fp32"
    preferred_batch = 1

    def __init__(self, loaded: LoadedModel, max_batch: int = 32, cache_dir: Path | None = None):
        super().__init__(loaded, max_batch, cache_dir)
        self._head = loaded.head()

    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            depth, species = self._head(torch.from_numpy(x))
        return depth.numpy(), species.numpy()


class TorchCUDABackend(Backend):
    """PyTorch on CUDA: FP16, channels-last, a CUDA graph captured per (batch, H, W)."""

    name, precision = "torch-cuda", "fp16"

    def __init__(self, loaded: LoadedModel, max_batch: int = 32, cache_dir: Path | None = None):
        super().__init__(loaded, max_batch, cache_dir)
        self._device = torch.device("cuda")
        head = loaded.head().to(self._device).half()
        # Module.to(memory_format=...) works (it forwards to every tensor) but is not in
        # torch's type stubs for Module.to
        self._head = head.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self._graphs: dict[
            tuple[int, ...],
            tuple[torch.cuda.CUDAGraph, torch.Tensor, tuple[torch.Tensor, torch.Tensor]],
        ] = {}
        # one memory pool for all graphs: they never run at once, and outputs are copied out
        # right after each replay, so sharing is safe and saves a pool per batch size
        self._pool = torch.cuda.graph_pool_handle()

    @staticmethod
    def unavailable_reason() -> str | None:
        return None if torch.cuda.is_available() else "no CUDA device"

    def _graph(self, shape: tuple[int, ...]):
        if shape not in self._graphs:
            static_in = torch.zeros(shape, device=self._device, dtype=torch.float16)
            static_in = static_in.contiguous(memory_format=torch.channels_last)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(3):  # warm-up (cuDNN autotuning) off the capture
                    self._head(static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool), torch.inference_mode():
                static_out = self._head(static_in)
            self._graphs[shape] = (graph, static_in, static_out)
        return self._graphs[shape]

    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        graph, static_in, (depth, species) = self._graph(tuple(x.shape))
        static_in.copy_(torch.from_numpy(x).pin_memory().to(self._device, non_blocking=True))
        graph.replay()
        return depth.float().cpu().numpy(), species.float().cpu().numpy()


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on the FP32 graph (dynamic batch/H/W); CUDA provider when it has one.

    Threads: ``intra_op_num_threads`` = the cores torch sees, and idle workers do not spin,
    so that the engine's post-processing stage gets the cores while a batch waits.
    """

    name, precision = "onnxruntime", "fp32"
    providers_wanted: ClassVar[tuple[str, ...]] = ("CUDAExecutionProvider", "CPUExecutionProvider")

    def __init__(self, loaded: LoadedModel, max_batch: int = 32, cache_dir: Path | None = None):
        super().__init__(loaded, max_batch, cache_dir)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.intra_op_num_threads = torch.get_num_threads()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = [p for p in self.providers_wanted if p in ort.get_available_providers()]
        self._session = ort.InferenceSession(str(self._graph()), options, providers=providers)
        self.providers = self._session.get_providers()
        self.preferred_batch = 8 if "CUDAExecutionProvider" in self.providers else 1

    def _graph(self) -> Path:
        return export_onnx(self.loaded, self.cache_dir, half=False)

    @staticmethod
    def unavailable_reason() -> str | None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "onnxruntime is not installed"
        return None

    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        depth, species = self._session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        return depth, species


class OnnxRuntimeInt8Backend(OnnxRuntimeBackend):
    """ONNX Runtime on the CPU with the INT8 graph of :mod:`engine.quantize` (quantized and
    cached on first use); offered only for a model whose INT8 parity record passes."""

    name, precision = "onnxruntime-int8", "int8"
    providers_wanted = ("CPUExecutionProvider",)

    def _graph(self) -> Path:
        from engine.quantize import int8_graph

        return int8_graph(self.loaded, self.cache_dir)

    @staticmethod
    def refusal(loaded: LoadedModel) -> str | None:
        from engine.quantize import parity_refusal

        return parity_refusal(loaded)


class TensorRTBackend(Backend):
    """A serialized TensorRT plan (FP16), built and cached by :mod:`engine.export`."""

    name, precision = "tensorrt", "fp16"

    def __init__(
        self,
        loaded: LoadedModel,
        max_batch: int = 32,
        cache_dir: Path | None = None,
        profile: PlanProfile | None = None,
    ):
        super().__init__(loaded, max_batch, cache_dir)
        reason = self.unavailable_reason()
        if reason:
            raise RuntimeError(f"tensorrt backend unavailable: {reason}")
        import tensorrt as trt

        profile = profile or PlanProfile(max_batch=max_batch, opt_batch=min(8, max_batch))
        self.plan_path = build_tensorrt_plan(loaded, self.cache_dir, profile)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        self._context = self._engine.create_execution_context()
        self._stream = torch.cuda.Stream()

    @staticmethod
    def unavailable_reason() -> str | None:
        return tensorrt_unavailable_reason()

    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.cuda.stream(self._stream):
            xt = torch.from_numpy(x).pin_memory().to("cuda", non_blocking=True)
            if not self._context.set_input_shape(INPUT_NAME, tuple(x.shape)):
                raise ValueError(
                    f"input {x.shape} is outside the plan's optimisation profile "
                    f"(see {self.plan_path.with_suffix('.json')})"
                )
            self._context.set_tensor_address(INPUT_NAME, xt.data_ptr())
            outputs = []
            for name in OUTPUT_NAMES:
                shape = tuple(self._context.get_tensor_shape(name))
                out = torch.empty(shape, device="cuda", dtype=torch.float32)
                self._context.set_tensor_address(name, out.data_ptr())
                outputs.append(out)
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            depth, species = (o.cpu().numpy() for o in outputs)
        self._stream.synchronize()
        return depth, species


#: backends by name, fastest first: ``auto`` takes the first available and offered one.
PREFERENCE: tuple[type[Backend], ...] = (
    TensorRTBackend,
    TorchCUDABackend,
    OnnxRuntimeInt8Backend,
    OnnxRuntimeBackend,
    TorchCPUBackend,
)
BACKENDS: dict[str, type[Backend]] = {cls.name: cls for cls in PREFERENCE}


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run here (None: it can)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {sorted(BACKENDS)} or auto")
    return BACKENDS[name].unavailable_reason()


def resolve(name: str, loaded: LoadedModel | None = None) -> str:
    """``auto`` -> the fastest backend that runs here (and, given ``loaded``, is offered for
    that model); any other name is checked the same way."""
    if name == "auto":
        return next(
            cls.name
            for cls in PREFERENCE
            if cls.unavailable_reason() is None and (loaded is None or cls.refusal(loaded) is None)
        )
    reason = unavailable_reason(name) or (BACKENDS[name].refusal(loaded) if loaded else None)
    if reason:
        raise RuntimeError(f"backend {name!r} is unavailable here: {reason}")
    return name


def create(
    name: str, loaded: LoadedModel, max_batch: int = 32, cache_dir: Path | None = None
) -> Backend:
    """Instantiate backend ``name`` (or ``auto``) for ``loaded``."""
    return BACKENDS[resolve(name, loaded)](loaded, max_batch=max_batch, cache_dir=cache_dir)
