"""Inference backends behind one interface: frames in, depth and species probabilities out.

``tensorrt`` (serialized FP16 plan, optimisation profile over batch), ``torch-cuda`` (FP16,
channels-last, one CUDA graph replayed per batch size and frame shape), ``torch-cpu-bf16``
(bfloat16 on a CPU with AMX or AVX512-BF16, compiled by TorchInductor), ``openvino-int8``
(OpenVINO on the model's INT8 graph fitted by :mod:`engine.openvino_qat`, CPU),
``onnxruntime-int8`` (the statically quantized graph of :mod:`engine.quantize`, CPU),
``openvino`` (OpenVINO on the FP32 graph, CPU), ``onnxruntime`` (the FP32 ONNX graph; CUDA
provider when present, else CPU) and ``torch-cpu`` (eager FP32, the reference).
:func:`unavailable_reason` says why a backend cannot run here and :meth:`Backend.refusal` why
it is not offered for a given model (BF16 or INT8 without a passing parity record,
:mod:`engine.parity`); ``auto`` picks the
first backend in :data:`PREFERENCE` (fastest first, see ``segdepth bench engine``) that is
neither.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, cast

import numpy as np
import torch

from engine.device_maps import DevicePrediction, turn_scores_of, uncertainty_scores_of
from engine.export import (
    INPUT_NAME,
    OUTPUT_NAMES,
    PlanProfile,
    build_tensorrt_plan,
    default_cache_dir,
    export_onnx,
    tensorrt_unavailable_reason,
)
from engine.model_io import LoadedModel, pad_to_multiple, padded_side
from engine.prediction import Prediction
from training.precision import native_bf16_reason

log = logging.getLogger(__name__)


class TTAResult(NamedTuple):
    """What :func:`infer_tta` gives for a batch of B frames: the 8 views' mean prediction, the
    turn scores (B,) of the unturned and quarter-turned passes, and the one-pass uncertainty
    scores (B,) of the unturned pass: the scores the model's warning levels were measured on
    (the averaged answer is less sure, so its own score runs higher: 0.406 against 0.393 in
    distribution on the robustness suite)."""

    pred: Prediction | DevicePrediction
    turn: np.ndarray
    uncertainty: np.ndarray


def infer_tta(backend: Backend, frames: np.ndarray) -> TTAResult:
    """Test-time augmentation: the backend's probabilities averaged over the 8 flips and
    quarter turns of the frames (B, H, W), each mapped back (8 passes; a backend whose plan
    has a fixed H × W needs square frames), with the scores of :class:`TTAResult`. The views
    are mapped back and summed where the backend leaves its outputs: a backend with
    ``device_maps`` gets a :class:`DevicePrediction` back, on its device."""
    from training.inference import DIHEDRAL

    depth: torch.Tensor | None = None
    species: torch.Tensor | None = None
    raw: dict[int, torch.Tensor] = {}  # the unflipped passes at 0 and 90°, as the network gave
    with torch.inference_mode():
        for k, flip in DIHEDRAL:
            x = np.rot90(frames[..., ::-1] if flip else frames, k, axes=(-2, -1))
            pred = backend.infer(np.ascontiguousarray(x))
            if isinstance(pred, DevicePrediction):
                d, s = pred.depth.float(), pred.species.float()
            else:
                d, s = torch.from_numpy(pred.depth_prob), torch.from_numpy(pred.species_prob)
            if not flip and k < 2:
                raw[k] = d
            d, s = (torch.rot90(t, -k, dims=(-2, -1)) for t in (d, s))
            if flip:
                d, s = d.flip(-1), s.flip(-1)
            depth = d if depth is None else depth + d
            species = s if species is None else species + s
        assert depth is not None and species is not None
        n = len(DIHEDRAL)
        # the sum of turned views can keep a turned layout: one C-order copy here, not one in
        # each compiled host kernel that needs it (channel_max, disk_average)
        mean = DevicePrediction((depth / n).contiguous(), (species / n).contiguous())
    turn, uncertainty = turn_scores_of(raw[0], raw[1]), uncertainty_scores_of(raw[0])
    if backend.device_maps:
        return TTAResult(mean, turn, uncertainty)
    return TTAResult(Prediction(mean.depth_prob, mean.species_prob), turn, uncertainty)


def _joined(chunks: list[torch.Tensor]) -> torch.Tensor:
    """The batch's chunks as one tensor (the one chunk itself when there is only one)."""
    return torch.cat(chunks) if len(chunks) > 1 else chunks[0]


class Backend(ABC):
    """One way of running the model. ``infer`` takes normalised frames (B, H, W) float32.

    A backend whose network writes torch tensors can leave them on its device
    (``device_maps``: :class:`DevicePrediction`, post-processing there) or copy them to the
    host (:class:`Prediction`); ``device_maps_default`` says which it does unless told.
    """

    name: ClassVar[str]
    precision: ClassVar[str]
    #: the suffix of a model's parity record for this backend (``<stem>.<suffix>.json``,
    #: :func:`engine.parity.record_path`); used only where :meth:`parity_form` is not None
    parity_record: ClassVar[str] = ""
    #: frames per batch the engine uses unless told otherwise: on the 2-core CPU machines
    #: batch 1 measured faster than 4 through serve (onnxruntime 512^2: 2.88 vs 2.21 frames/s)
    preferred_batch: int = 8
    #: whether the network runs on a GPU (there the engine has time for turn checks by default)
    on_gpu: bool = True
    #: None: outputs are host arrays (no device maps possible); else the default of device_maps
    device_maps_default: ClassVar[bool | None] = None

    def __init__(
        self,
        loaded: LoadedModel,
        max_batch: int = 32,
        cache_dir: Path | None = None,
        device_maps: bool | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if device_maps and self.device_maps_default is None:
            raise ValueError(
                f"backend {self.name!r} returns host arrays: it cannot post-process on a device"
            )
        self.loaded = loaded
        self.max_batch = max_batch
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.device_maps = bool(self.device_maps_default if device_maps is None else device_maps)

    @staticmethod
    def unavailable_reason() -> str | None:
        """Why this backend cannot run on this machine, or None."""
        return None

    @classmethod
    def parity_form(cls, loaded: LoadedModel) -> dict[str, Any] | None:
        """What this backend's parity record for ``loaded`` must have been measured on, for a
        backend that is offered only with a passing record (:mod:`engine.parity`); None for
        the others."""
        return None

    @classmethod
    def refusal(cls, loaded: LoadedModel) -> str | None:
        """Why this backend is not offered for ``loaded`` although it runs here, or None."""
        form = cls.parity_form(loaded)
        if form is None:
            return None
        from engine.parity import refusal

        return refusal(loaded, cls.name, cls.parity_record, form)

    def warm(self, shape: tuple[int, int]) -> None:
        """Make ready for frames of ``shape`` (H, W) px before the first one is timed (the CUDA
        backend captures its graphs here); nothing for the others."""
        return None

    def infer(self, frames: np.ndarray) -> Prediction | DevicePrediction:
        """Probabilities for ``frames`` (B, H, W) (any B: split into chunks of max_batch), on
        the backend's device when ``device_maps`` is set."""
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
        if not isinstance(depth[0], torch.Tensor):
            return Prediction(np.concatenate(depth), np.concatenate(species))
        with torch.inference_mode():
            on_device = DevicePrediction(
                *(_joined(cast(list[torch.Tensor], p)) for p in (depth, species))
            )
        if self.device_maps:
            return on_device
        return Prediction(on_device.depth_prob, on_device.species_prob)

    @abstractmethod
    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray] | tuple[torch.Tensor, ...]:
        """(b, 1, H, W) float32, b <= max_batch -> (depth, species): float32 numpy arrays, or
        tensors on the backend's device (float16 or float32)."""


class TorchCPUBackend(Backend):
    """PyTorch eager, FP32, on the CPU: the reference every other backend is checked against."""

    name, precision = "torch-cpu", "fp32"
    preferred_batch = 1
    on_gpu = False
    #: numpy's per-channel pass (engine.prediction.channel_max) is the faster reduction here
    device_maps_default = False
    #: the network in bfloat16 (engine.model_io.ProbabilityHead)
    bf16: ClassVar[bool] = False

    def __init__(self, loaded: LoadedModel, max_batch: int = 32, **kw):
        super().__init__(loaded, max_batch, **kw)
        self._head = loaded.head(bf16=self.bf16)

    def _run(self, x: np.ndarray) -> tuple[torch.Tensor, ...]:
        with torch.inference_mode():
            return tuple(self._head(torch.from_numpy(x)))


def graph_batch(b: int, max_batch: int) -> int:
    """The batch a graph is captured for that runs ``b`` frames: the next power of two, at most
    ``max_batch`` (so a shape needs log2(max_batch) + 1 graphs, not max_batch)."""
    if not 1 <= b <= max_batch:
        raise ValueError(f"batch {b} outside 1..{max_batch}")
    return min(1 << (b - 1).bit_length(), max_batch)


class TorchCPUBF16Backend(TorchCPUBackend):
    """PyTorch on the CPU, autocast to bfloat16, channels-last, on oneDNN's AMX / AVX512-BF16
    kernels, the first convolution, the output heads and the softmax in float32
    (:class:`engine.model_io.ProbabilityHead`), compiled by TorchInductor with frozen
    weights (it fuses the casts, padding, concatenation, upsampling and ReLUs that eager mode
    runs as separate passes over memory) for each frame shape on first use, one frame
    at a time (batch 1 measured fastest on the CPU). Offered only on a CPU with native BF16 and
    for a model whose BF16 parity record passes (:mod:`engine.parity`).

    ``compile``: False runs eager (the same arithmetic in other kernels: slower, no compile
    time); a compilation that fails (no C++ compiler) falls back to eager with a warning.
    """

    name, precision, parity_record = "torch-cpu-bf16", "bf16", "bf16"
    bf16 = True

    def __init__(self, loaded: LoadedModel, max_batch: int = 32, compile: bool = True, **kw):
        super().__init__(loaded, max_batch, **kw)
        self._net: torch.nn.Module = self._head
        if compile:
            # freezing: weights become constants, so their casts to bfloat16 fold away
            self._net = cast(
                torch.nn.Module,
                torch.compile(self._head, dynamic=False, options={"freezing": True}),
            )
        self.compiled = compile

    @staticmethod
    def unavailable_reason() -> str | None:
        return native_bf16_reason()

    @classmethod
    def parity_form(cls, loaded: LoadedModel) -> dict[str, Any]:
        return {
            "network": "autocast bfloat16, channels-last, first convolution and heads float32",
            "softmax": "float32",
            "compiled": True,
        }

    def warm(self, shape: tuple[int, int]) -> None:
        """Compile for frames of ``shape`` (H, W) px (TorchInductor: tens of seconds the first
        time on 2 cores, seconds when its on-disk cache has the graph)."""
        h, w = (padded_side(side, self.loaded.size_multiple) for side in shape)
        self._run(np.zeros((1, 1, h, w), np.float32))

    def _run(self, x: np.ndarray) -> tuple[torch.Tensor, ...]:
        # a copy has the strides of a fresh array: the batch's (b, 1, H, W) view has stride 0
        # along its channel axis, which would fail the compiled graph's guard and recompile
        outputs = [self._frame(torch.from_numpy(np.array(x[i : i + 1]))) for i in range(len(x))]
        return tuple(_joined(list(o)) for o in zip(*outputs))

    def _frame(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            if self._net is self._head:
                return self._head(x)
            try:
                return self._net(x)
            except Exception as exc:  # inductor needs a C++ compiler and may fail on odd hosts
                log.warning("torch.compile failed (%s): running BF16 eager", exc)
                self._net = self._head
                self.compiled = False
                return self._head(x)


class TorchCUDABackend(Backend):
    """PyTorch on CUDA: FP16, channels-last, a CUDA graph captured per (batch, H, W), the batch
    padded up to a power of two (:func:`graph_batch`)."""

    name, precision = "torch-cuda", "fp16"
    device_maps_default = True

    def __init__(self, loaded: LoadedModel, max_batch: int = 32, **kw):
        super().__init__(loaded, max_batch, **kw)
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
        #: a pinned host buffer per input shape, and the event of its last upload
        self._staging: dict[tuple[int, ...], tuple[torch.Tensor, torch.cuda.Event]] = {}

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

    def _upload(self, x: np.ndarray, into: torch.Tensor) -> None:
        """Copy ``x`` into the device tensor through a pinned buffer kept per shape (the
        previous upload from it must be done before it is overwritten)."""
        shape = tuple(x.shape)
        if shape not in self._staging:
            self._staging[shape] = (torch.empty(shape).pin_memory(), torch.cuda.Event())
        pinned, uploaded = self._staging[shape]
        uploaded.synchronize()
        pinned.numpy()[...] = x
        into.copy_(pinned, non_blocking=True)
        uploaded.record()

    def warm(self, shape: tuple[int, int]) -> None:
        """Capture the graphs of every padded batch for frames of ``shape`` (H, W) px."""
        h, w = (padded_side(side, self.loaded.size_multiple) for side in shape)
        for b in sorted({graph_batch(n, self.max_batch) for n in range(1, self.max_batch + 1)}):
            self._graph((b, 1, h, w))

    def _run(self, x: np.ndarray) -> tuple[torch.Tensor, ...]:
        b = len(x)
        padded = graph_batch(b, self.max_batch)
        if padded != b:
            x = np.concatenate([x, np.zeros((padded - b, *x.shape[1:]), x.dtype)])
        graph, static_in, outputs = self._graph(tuple(x.shape))
        self._upload(x, static_in)
        graph.replay()
        # the next replay overwrites the graph's own outputs: copy the real frames' out
        return tuple(o[:b].clone() for o in outputs)


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on the FP32 graph (dynamic batch/H/W); CUDA provider when it has one.

    Threads: ``intra_op_num_threads`` = the cores torch sees, and idle workers do not spin,
    so that the engine's post-processing stage gets the cores while a batch waits.
    """

    name, precision = "onnxruntime", "fp32"
    providers_wanted: ClassVar[tuple[str, ...]] = ("CUDAExecutionProvider", "CPUExecutionProvider")

    def __init__(self, loaded: LoadedModel, max_batch: int = 32, **kw):
        super().__init__(loaded, max_batch, **kw)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.intra_op_num_threads = torch.get_num_threads()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = [p for p in self.providers_wanted if p in ort.get_available_providers()]
        self._session = ort.InferenceSession(str(self._graph()), options, providers=providers)
        self.providers = self._session.get_providers()
        self.on_gpu = "CUDAExecutionProvider" in self.providers
        self.preferred_batch = 8 if self.on_gpu else 1

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

    name, precision, parity_record = "onnxruntime-int8", "int8", "int8"
    providers_wanted = ("CPUExecutionProvider",)

    def _graph(self) -> Path:
        from engine.quantize import int8_graph

        return int8_graph(self.loaded, self.cache_dir)

    @classmethod
    def parity_form(cls, loaded: LoadedModel) -> dict[str, Any]:
        from engine.quantize import int8_form

        return int8_form()


class OpenVINOBackend(Backend):
    """OpenVINO on the CPU with the FP32 graph, compiled once per input shape
    (:mod:`engine.openvino_graph`) on the cores torch sees, float32 throughout."""

    name, precision = "openvino", "fp32"
    preferred_batch = 1
    on_gpu = False

    def __init__(self, loaded: LoadedModel, max_batch: int = 32, **kw):
        super().__init__(loaded, max_batch, **kw)
        from engine.openvino_graph import CompiledShapes

        self._shapes = CompiledShapes(self._graph(), torch.get_num_threads())

    def _graph(self) -> Path:
        return export_onnx(self.loaded, self.cache_dir, half=False)

    @staticmethod
    def unavailable_reason() -> str | None:
        from engine.openvino_graph import unavailable_reason

        return unavailable_reason()

    def warm(self, shape: tuple[int, int]) -> None:
        """Compile for single frames of ``shape`` (H, W) px (about a second)."""
        h, w = (padded_side(side, self.loaded.size_multiple) for side in shape)
        self._run(np.zeros((1, 1, h, w), np.float32))

    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._shapes.run(x)


class OpenVINOInt8Backend(OpenVINOBackend):
    """OpenVINO on the CPU with the model's INT8 graph (``<stem>.int8-openvino.xml`` beside it,
    fitted by ``segdepth quantize``, :mod:`engine.openvino_qat`); offered only for a model with
    that graph and a parity record measured on it that passes."""

    name, precision, parity_record = "openvino-int8", "int8", "int8-openvino"

    def _graph(self) -> Path:
        from engine.openvino_qat import graph_path, graph_refusal

        reason = graph_refusal(self.loaded)
        if reason:
            raise RuntimeError(f"backend {self.name!r} cannot run: {reason}")
        return graph_path(self.loaded.path)

    @classmethod
    def parity_form(cls, loaded: LoadedModel) -> dict[str, Any]:
        from engine.openvino_qat import int8_form

        return int8_form(loaded)

    @classmethod
    def refusal(cls, loaded: LoadedModel) -> str | None:
        from engine.openvino_qat import graph_refusal

        return graph_refusal(loaded) or super().refusal(loaded)


class TensorRTBackend(Backend):
    """A serialized TensorRT plan (FP16), built and cached by :mod:`engine.export`."""

    name, precision = "tensorrt", "fp16"
    device_maps_default = True

    def __init__(
        self,
        loaded: LoadedModel,
        max_batch: int = 32,
        profile: PlanProfile | None = None,
        **kw,
    ):
        super().__init__(loaded, max_batch, **kw)
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

    def _run(self, x: np.ndarray) -> tuple[torch.Tensor, ...]:
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
        self._stream.synchronize()
        return tuple(outputs)


#: backends by name, fastest first: ``auto`` takes the first available and offered one.
PREFERENCE: tuple[type[Backend], ...] = (
    TensorRTBackend,
    TorchCUDABackend,
    TorchCPUBF16Backend,
    OpenVINOInt8Backend,
    OnnxRuntimeInt8Backend,
    OpenVINOBackend,
    OnnxRuntimeBackend,
    TorchCPUBackend,
)
BACKENDS: dict[str, type[Backend]] = {cls.name: cls for cls in PREFERENCE}


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run here (None: it can)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {sorted(BACKENDS)} or auto")
    return BACKENDS[name].unavailable_reason()


def resolve(name: str, loaded: LoadedModel | None = None, ignore_parity: bool = False) -> str:
    """``auto`` -> the fastest backend that runs here (and, given ``loaded``, is offered for
    that model); any other name is checked the same way, except that ``ignore_parity`` runs a
    backend named explicitly although ``loaded``'s parity record refuses it (with a warning;
    ``auto`` never picks a refused backend)."""
    if name == "auto":
        return next(
            cls.name
            for cls in PREFERENCE
            if cls.unavailable_reason() is None and (loaded is None or cls.refusal(loaded) is None)
        )
    reason = unavailable_reason(name)
    if reason:
        raise RuntimeError(f"backend {name!r} is unavailable here: {reason}")
    refusal = BACKENDS[name].refusal(loaded) if loaded else None
    if refusal and not ignore_parity:
        raise RuntimeError(
            f"backend {name!r} is unavailable here: {refusal} (--ignore-parity runs it anyway)"
        )
    if refusal:
        log.warning("backend %s is not offered for this model, run anyway: %s", name, refusal)
    return name


def create(
    name: str,
    loaded: LoadedModel,
    max_batch: int = 32,
    cache_dir: Path | None = None,
    device_maps: bool | None = None,
    ignore_parity: bool = False,
) -> Backend:
    """Instantiate backend ``name`` (or ``auto``) for ``loaded`` (:func:`resolve`);
    ``device_maps``: keep the probabilities on the backend's device (None: the backend's
    default)."""
    return BACKENDS[resolve(name, loaded, ignore_parity)](
        loaded, max_batch=max_batch, cache_dir=cache_dir, device_maps=device_maps
    )
